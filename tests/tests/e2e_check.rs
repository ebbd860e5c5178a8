//! `pgpitr check` and `pgpitr init` against real PostgreSQL 15: a correct setup passes every
//! check including a WAL switch that must reach the repository; each misconfiguration fails the
//! right check and names the fix.

use std::process::{Command, Output};

use pgpitr_tests::pg::Cluster;
use pgpitr_tests::{bin, give_to_pg_user, set_mode, temp_dir};

fn check(c: &Cluster, repo: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(bin("pgpitr"))
        .arg("check")
        .args(extra)
        .env_remove("PGPITR_CONFIG")
        .env("PGPITR_REPO", repo)
        .env(
            "PGPITR_CONNINFO",
            format!(
                "host={} port={} user=postgres",
                c.socket_dir.display(),
                c.port
            ),
        )
        .output()
        .unwrap()
}

fn cluster(conf: &str, repo: &std::path::Path) -> Cluster {
    let mut c = Cluster::init(15, conf);
    c.env = vec![("PGPITR_REPO".into(), repo.display().to_string())];
    c.start();
    c
}

#[test]
fn a_correct_setup_passes_every_check() {
    let dir = temp_dir("check");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    let c = cluster(
        &format!(
            "archive_mode = on\narchive_command = '{} %p %f'",
            bin("pgpitr-archive").display()
        ),
        &repo,
    );
    let out = check(&c, &repo, &["--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks: serde_json::Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "config",
            "encryption",
            "storage",
            "replication connection",
            "wal_level",
            "archive_mode",
            "archive_command",
            "archiving"
        ]
    );
    assert!(
        checks.as_array().unwrap().iter().all(|c| c["ok"] == true),
        "{text}"
    );

    // Again at once: the server is idle at the start of the segment after the one the first
    // check switched, where a switch alone closes nothing.
    let out = check(&c, &repo, &["--timeout", "20"]);
    let again = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{again}");

    // Archiving that stops: the check's switch must reach the repository, not the segments
    // archived before.
    c.psql("SELECT txid_current()");
    let last = c.psql("SELECT pg_walfile_name(pg_switch_wal())");
    c.wait_archived(&last);
    set_writable(&repo, false);
    let out = check(&c, &repo, &["--timeout", "5"]);
    set_writable(&repo, true);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("archiving") && text.contains("did not reach the repository"),
        "{text}"
    );
}

/// Makes every directory under `dir` writable or not for everyone (PostgreSQL's user among
/// them; this test's user reads it either way).
fn set_writable(dir: &std::path::Path, writable: bool) {
    set_mode(dir, if writable { 0o777 } else { 0o555 });
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            set_writable(&entry.path(), writable);
        }
    }
}

#[test]
fn misconfigurations_fail_the_right_check_with_a_fix() {
    let dir = temp_dir("check-bad");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);

    // Archiving not configured.
    let c = cluster("archive_mode = off", &repo);
    let out = check(&c, &repo, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("archive_mode")
            && text.contains("FAIL")
            && text.contains("fix: set archive_mode = on"),
        "{text}"
    );
    assert!(text.contains("does not call pgpitr-archive"), "{text}");
    drop(c);

    // No walsenders, as with wal_level = minimal.
    let c = cluster(
        "wal_level = minimal\nmax_wal_senders = 0\narchive_mode = off",
        &repo,
    );
    let out = check(&c, &repo, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("replication connection") && text.contains("max_wal_senders"),
        "{text}"
    );
    drop(c);

    // A repository that does not exist.
    let c = cluster("", &repo);
    let out = check(&c, &dir.path().join("missing"), &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("storage") && text.contains("does not exist"),
        "{text}"
    );
}

#[test]
fn init_writes_a_config_that_check_accepts_and_refuses_to_overwrite() {
    let dir = temp_dir("init");
    let cfg = dir.path().join("etc/pgpitr.toml");
    let run = || {
        Command::new(bin("pgpitr"))
            .args(["init", "--repo", "/var/lib/pgpitr/repo", "--output"])
            .arg(&cfg)
            .env_remove("PGPITR_REPO")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("archive_mode = on") && text.contains("pgpitr-archive --config"),
        "{text}"
    );
    let out = run();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // A bad key in the file is an error naming the key.
    std::fs::write(&cfg, "repo = \"/x\"\nrepository = \"/y\"\n").unwrap();
    let out = Command::new(bin("pgpitr"))
        .arg("--config")
        .arg(&cfg)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("repository"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
