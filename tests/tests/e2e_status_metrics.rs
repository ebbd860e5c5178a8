//! End to end: `pgpitr status` and `pgpitr metrics` on a real PostgreSQL 15 cluster archiving
//! into a local repository, and into Garage (S3):
//!
//! - before any backup: status is CRITICAL (exit 2) naming `pgpitr backup`; metrics say up 1,
//!   0 backups and have no backup series;
//! - after a backup: status warns only about the verify and drill never run (exit 1); the
//!   metrics hold the backup's completion time (between the times around the backup), a
//!   recovery window whose start is not after its end, the newest WAL of timeline 1;
//! - after `pgpitr verify`: the verify check is OK and its metrics exist, with 0 problems;
//! - with archiving broken (`archive_command = 'false'`) and `max_wal_age = 1s`: the WAL check
//!   is a warning or critical and names the fix;
//! - `--textfile` writes a file that parses and leaves no temporary file; `--listen` serves
//!   `/metrics` (two scrapes within the cache interval: one scan), 404 elsewhere;
//! - an unreachable repository: status CRITICAL in one line, metrics `up 0` alone (exit 1), with
//!   or without a passphrase configured (`--textfile` overwritten); a configuration error: status
//!   exit 3 (UNKNOWN).
//!
//! The exposition is read with a Prometheus text-format parser (`prometheus-parse`).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use pgpitr_tests::cli::{
    archiving_cluster, conninfo, local_repo, pgpitr, pgpitr_ok, repo_env, text, Env,
};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::monitoring::{check, http_get, metrics, must, parse, series, status, value};
use pgpitr_tests::temp_dir;

fn now() -> f64 {
    jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// The whole life of a repository, as described in the module docs; `extras` adds the
/// `--textfile` and `--listen` checks.
fn scenario(env: Env, extras: bool) {
    let c = archiving_cluster(env.clone(), "");
    c.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archive_idle();

    // No backup yet.
    let (report, code) = status(&env);
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(report["status"], "critical");
    let backup = check(&report, "backup");
    assert_eq!(backup["level"], "critical", "{report:#}");
    assert!(backup["fix"].as_str().unwrap().contains("pgpitr backup"));
    let out = pgpitr(&env, &["status"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.starts_with("PGPITR CRITICAL"), "{human}");
    let m = metrics(&env);
    assert_eq!(must(&m, "pgpitr_repository_up", None), 1.0);
    assert_eq!(must(&m, "pgpitr_backups", None), 0.0);
    assert_eq!(
        series(&m, "pgpitr_backup_last_completion_timestamp_seconds", None),
        None
    );
    assert!(must(&m, "pgpitr_wal_last_archived_timestamp_seconds", Some("1")) > 0.0);
    let location = m.samples[0].labels.get("repository").unwrap().to_string();
    assert!(
        m.samples
            .iter()
            .all(|s| s.labels.get("repository") == Some(location.as_str())),
        "{:?}",
        m.samples
    );

    // One backup.
    let mut benv = env.clone();
    benv.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    let before = now().floor();
    pgpitr_ok(&benv, &["backup", "--checkpoint", "fast"]);
    let after = now().ceil();
    c.psql("SELECT pg_switch_wal()");
    c.wait_archive_idle();
    let (report, code) = status(&env);
    assert_eq!(code, 1, "{report:#}");
    let not_ok: Vec<(&str, &str)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] != "ok")
        .map(|c| (c["name"].as_str().unwrap(), c["level"].as_str().unwrap()))
        .collect();
    assert_eq!(
        not_ok,
        [("verify", "warning"), ("drill", "warning")],
        "{report:#}"
    );
    let m = metrics(&env);
    assert_eq!(must(&m, "pgpitr_backups", None), 1.0);
    let done = must(&m, "pgpitr_backup_last_completion_timestamp_seconds", None);
    assert!(
        before <= done && done <= after,
        "{before} <= {done} <= {after}"
    );
    assert!(must(&m, "pgpitr_backup_last_size_bytes", None) > 1e6);
    assert_eq!(
        series(&m, "pgpitr_backup_previous_size_bytes", None),
        None,
        "one backup: no previous one"
    );
    let start = must(
        &m,
        "pgpitr_recovery_window_start_timestamp_seconds",
        Some("1"),
    );
    let end = must(
        &m,
        "pgpitr_recovery_window_end_timestamp_seconds",
        Some("1"),
    );
    assert!(start <= end, "window {start} .. {end}");
    assert!(
        must(&m, "pgpitr_repository_size_bytes", None)
            >= must(&m, "pgpitr_repository_written_last_7d_bytes", None)
    );
    assert!(must(&m, "pgpitr_repository_written_last_7d_bytes", None) > 0.0);
    assert_eq!(
        series(&m, "pgpitr_verify_last_run_timestamp_seconds", None),
        None
    );
    assert_eq!(
        series(&m, "pgpitr_drill_last_run_timestamp_seconds", None),
        None
    );

    // Verified.
    pgpitr_ok(&env, &["verify"]);
    let (report, code) = status(&env);
    assert_eq!(code, 1, "the drill is still missing: {report:#}");
    assert_eq!(check(&report, "verify")["level"], "ok", "{report:#}");
    let m = metrics(&env);
    assert_eq!(must(&m, "pgpitr_verify_last_problems", None), 0.0);
    assert_eq!(
        must(&m, "pgpitr_verify_last_run_timestamp_seconds", None),
        must(&m, "pgpitr_verify_last_success_timestamp_seconds", None)
    );

    if extras {
        textfile(&env);
        listen(&env);
    }

    // Archiving broken: WAL piles up in pg_wal, the repository's newest WAL ages.
    c.psql("ALTER SYSTEM SET archive_command = 'false'");
    c.psql("SELECT pg_reload_conf()");
    let mut failing = false;
    for _ in 0..30 {
        // New WAL each time: a segment switched before the archiver reloaded is archived.
        c.psql("INSERT INTO t SELECT generate_series(1, 1000)");
        c.psql("SELECT pg_switch_wal()");
        if c.wait_for("SELECT failed_count > 0 FROM pg_stat_archiver", "t", 2) {
            failing = true;
            break;
        }
    }
    assert!(failing, "archiving did not fail:\n{}", c.log());
    std::thread::sleep(Duration::from_secs(3));
    let mut short = env.clone();
    short.push(("PGPITR_MAX_WAL_AGE".into(), "1s".into()));
    let (report, code) = status(&short);
    let wal = check(&report, "wal");
    assert!(
        wal["level"] == "warning" || wal["level"] == "critical",
        "{report:#}"
    );
    assert!(wal["age_seconds"].as_i64().unwrap() >= 2, "{wal:#}");
    assert!(wal["fix"].as_str().unwrap().contains("pg_stat_archiver"));
    assert!(code >= 1, "{report:#}");
}

/// `--textfile`: the file parses, and nothing else is left in its directory.
fn textfile(env: &Env) {
    let dir = temp_dir("textfile");
    let path = dir.path().join("pgpitr.prom");
    let out = pgpitr_ok(env, &["metrics", "--textfile", path.to_str().unwrap()]);
    assert!(out.is_empty(), "{out}");
    let m = parse(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(must(&m, "pgpitr_repository_up", None), 1.0);
    assert_eq!(must(&m, "pgpitr_backups", None), 1.0);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("pgpitr.prom")]);
}

/// `--listen`: `/metrics` parses, a second scrape within the cache interval is the same scan,
/// other paths are 404.
fn listen(env: &Env) {
    let mut child = pgpitr_tests::cli::pgpitr_cmd(
        env,
        &["metrics", "--listen", "127.0.0.1:0", "--cache", "600"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("serving http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no address: {first:?}"))
        .to_string();
    let (code, body) = http_get(&addr, "/metrics").expect("an answer");
    let (code2, body2) = http_get(&addr, "/metrics").expect("an answer");
    let (missing, _) = http_get(&addr, "/").expect("an answer");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!((code, code2, missing), (200, 200, 404));
    let (a, b) = (parse(&body), parse(&body2));
    assert_eq!(must(&a, "pgpitr_repository_up", None), 1.0);
    assert_eq!(must(&a, "pgpitr_backups", None), 1.0);
    assert_eq!(
        must(&a, "pgpitr_scan_timestamp_seconds", None),
        must(&b, "pgpitr_scan_timestamp_seconds", None),
        "the second scrape was served from the cache"
    );
}

#[test]
fn status_and_metrics_on_a_local_repository() {
    let (_dir, repo) = local_repo();
    scenario(repo_env(&repo), true);
}

#[test]
fn status_and_metrics_on_s3() {
    let g = Garage::shared();
    let bucket = g.bucket();
    scenario(g.env(&bucket, "status"), false);
}

#[test]
fn an_unreachable_repository_and_a_bad_configuration() {
    let dir = temp_dir("unreachable");
    let env = repo_env(&dir.path().join("missing"));
    let out = pgpitr(&env, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("PGPITR CRITICAL") && stdout.contains("unreachable"),
        "{stdout}"
    );

    let out = pgpitr(&env, &["metrics"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let m = parse(&String::from_utf8_lossy(&out.stdout));
    let names: Vec<&str> = m.samples.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["pgpitr_repository_up"]);
    assert_eq!(value(&m.samples[0]), 0.0);

    // With a passphrase configured the key cannot be read either: still CRITICAL and `up 0`,
    // and the file node_exporter reads says so instead of keeping the last scan.
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, "a passphrase\n").unwrap();
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&passphrase, private).unwrap();
    let mut encrypted = env.clone();
    encrypted.push((
        "PGPITR_ENCRYPTION_PASSPHRASE_FILE".into(),
        passphrase.display().to_string(),
    ));
    let out = pgpitr(&encrypted, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("PGPITR CRITICAL"));
    let prom = dir.path().join("pgpitr.prom");
    std::fs::write(&prom, "pgpitr_repository_up 1\n").unwrap();
    let textfile = prom.display().to_string();
    let out = pgpitr(&encrypted, &["metrics", "--textfile", &textfile]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let m = parse(&std::fs::read_to_string(&prom).unwrap());
    let names: Vec<&str> = m.samples.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["pgpitr_repository_up"]);
    assert_eq!(value(&m.samples[0]), 0.0);

    let mut bad = env.clone();
    bad.push(("PGPITR_MAX_WAL_AGE".into(), "soon".into()));
    let out = pgpitr(&bad, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_wal_age") && !stderr.contains("soon"),
        "{stderr}"
    );
}
