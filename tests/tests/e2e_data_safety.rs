//! End to end on real PostgreSQL 15: the configurations the docs allow that once lost WAL or
//! handed recovery another cluster's WAL (issue 15).
//!
//! - one `archive_command` into two repositories (`PGPITR_REPO=a pgpitr-archive %p %f &&
//!   PGPITR_REPO=b pgpitr-archive %p %f`) with a backlog of 40 `.ready` segments, longer than
//!   a batch: every segment PostgreSQL marks `.done` is in both repositories, byte for byte;
//! - a recovery whose `restore_command` names another cluster's repository stops with
//!   pgpitr-restore's error instead of taking that cluster's WAL for the end of WAL.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgpitr::pg::WalFileName;
use pgpitr_tests::pg::{client_bin, Cluster};
use pgpitr_tests::{as_pg_user, bin, give_to_pg_user, run_ok, temp_dir};

const CONF: &str = "wal_level = replica\narchive_mode = on\nmax_wal_senders = 4\nwal_keep_size = '4GB'\nmax_wal_size = '4GB'\ncheckpoint_timeout = '1h'";

/// A new empty repository directory that the server's user can write.
fn repo_dir(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let root = temp_dir(tag);
    let repo = root.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    (root, repo)
}

/// The WAL segment names stored in the local repository `repo`.
fn archived_segments(repo: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir(repo) {
        let key = e.strip_prefix(repo).unwrap().to_str().unwrap().to_string();
        if let Some((WalFileName::Segment(s), _)) = pgpitr::repo::layout::parse_wal_object_key(&key)
        {
            out.push(s.to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walkdir(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The names of the files in `pg_wal/archive_status` with `suffix` (`.ready`, `.done`).
fn status(c: &Cluster, suffix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(c.pg_wal().join("archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(suffix)
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24)
        .collect();
    out.sort();
    out
}

/// Writes a little and switches to a new segment, `n` times.
fn switch_segments(c: &Cluster, n: usize) {
    c.psql("CREATE TABLE IF NOT EXISTS t (x int)");
    for i in 0..n {
        c.psql(&format!(
            "INSERT INTO t VALUES ({i}); SELECT pg_switch_wal()"
        ));
    }
}

#[test]
fn one_archive_command_into_two_repositories_loses_nothing() {
    let (_a_root, a) = repo_dir("two-repos-a");
    let (_b_root, b) = repo_dir("two-repos-b");
    // Archiving off at first, so that a backlog of `.ready` files builds up.
    let mut c = Cluster::init(15, &format!("{CONF}\narchive_command = ''"));
    c.start();
    switch_segments(&c, 40);
    let backlog = status(&c, ".ready");
    assert!(backlog.len() >= 40, "{backlog:?}");

    let archive = bin("pgpitr-archive");
    c.psql(&format!(
        "ALTER SYSTEM SET archive_command = 'PGPITR_REPO={} {} %p %f && PGPITR_REPO={} {} %p %f'",
        a.display(),
        archive.display(),
        b.display(),
        archive.display()
    ));
    c.psql("SELECT pg_reload_conf()");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !status(&c, ".ready").is_empty() {
        assert!(
            Instant::now() < deadline,
            "backlog not archived: {:?}\n{}",
            status(&c, ".ready"),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = status(&c, ".done");
    assert!(done.len() >= 40, "{done:?}");
    for (label, repo) in [("a", &a), ("b", &b)] {
        let stored = archived_segments(repo);
        let missing: Vec<&String> = done.iter().filter(|n| !stored.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "repository {label} misses {} of the {} segments PostgreSQL marked .done: {missing:?}",
            missing.len(),
            done.len()
        );
    }
    // And each comes back from repository a byte for byte.
    let scratch = temp_dir("two-repos-fetch");
    std::fs::create_dir(scratch.path().join("pg_wal")).unwrap();
    std::fs::create_dir(scratch.path().join("global")).unwrap();
    std::fs::copy(
        c.data.join("global/pg_control"),
        scratch.path().join("global/pg_control"),
    )
    .unwrap();
    for name in &done {
        run_ok(
            Command::new(bin("pgpitr-restore"))
                .args([name.as_str(), "pg_wal/RECOVERYXLOG"])
                .current_dir(scratch.path())
                .env("PGPITR_REPO", &a)
                .env("PGPITR_RESTORE_PREFETCH", "0")
                .env_remove("PGPITR_CONFIG"),
        );
        assert!(
            std::fs::read(scratch.path().join("pg_wal/RECOVERYXLOG")).unwrap()
                == std::fs::read(c.pg_wal().join(name)).unwrap(),
            "{name} differs"
        );
    }
}

#[test]
fn recovery_from_another_clusters_repository_stops_instead_of_ending_early() {
    let (_a_root, a) = repo_dir("foreign-a");
    let (_b_root, b) = repo_dir("foreign-b");
    let conf = |repo: &Path| {
        format!(
            "{CONF}\narchive_command = 'PGPITR_REPO={} {} %p %f'",
            repo.display(),
            bin("pgpitr-archive").display()
        )
    };
    let mut primary_a = Cluster::init(15, &conf(&a));
    primary_a.start();
    let mut primary_b = Cluster::init(15, &conf(&b));
    primary_b.start();

    // A base backup of A without WAL: recovery needs A's WAL from the archive.
    let base_root = temp_dir("foreign-standby");
    give_to_pg_user(base_root.path());
    let base = base_root.path().join("data");
    run_ok(
        as_pg_user(client_bin("pg_basebackup"))
            .arg("-D")
            .arg(&base)
            .args(["-X", "none", "-c", "fast", "-U", "postgres", "-h"])
            .arg(&primary_a.socket_dir)
            .args(["-p", &primary_a.port.to_string()]),
    );
    // Both clusters archive the same segment names.
    for c in [&primary_a, &primary_b] {
        switch_segments(c, 3);
        let last = c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
        c.psql("SELECT pg_switch_wal()");
        c.wait_archived(&last);
    }

    // Recovery of A, with restore_command reading B's repository.
    let mut restored = Cluster::adopt(15, base_root, base.clone());
    std::fs::write(base.join("recovery.signal"), "").unwrap();
    give_to_pg_user(&base);
    restored.append_conf(&format!(
        "archive_mode = off\nrestore_command = 'PGPITR_REPO={} {} %f %p'\nport = {}",
        b.display(),
        bin("pgpitr-restore").display(),
        restored.port
    ));
    restored.start_with(false);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !restored.log().contains("pgpitr-restore: error") {
        assert!(
            Instant::now() < deadline,
            "no error from pgpitr-restore:\n{}",
            restored.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    while restored.is_running() {
        assert!(
            Instant::now() < deadline,
            "recovery did not stop:\n{}",
            restored.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = restored.log();
    assert!(
        log.contains("belongs to the cluster with system identifier"),
        "{log}"
    );
    for never in [
        "from different database system",
        "selected new timeline ID",
        "ready to accept connections",
    ] {
        assert!(!log.contains(never), "{never}:\n{log}");
    }
}
