//! End to end on real PostgreSQL 15, for a local repository and for Garage: a cluster archiving
//! through `pgpitr-archive` under pgbench with several `pg_switch_wal()`; every archived segment
//! fetched by `pgpitr-restore` is byte-identical to PostgreSQL's own; a second cluster
//! recovering only through `restore_command` replays to the same LSN and holds the same data.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pgpitr::pg::{Lsn, WalFileName};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::pg::{client_bin, Cluster};
use pgpitr_tests::{as_pg_user, bin, give_to_pg_user, run_ok, temp_dir};

fn archiving_cluster(env: Vec<(String, String)>) -> Cluster {
    let conf = format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{} %p %f'\nmax_wal_senders = 4\nwal_keep_size = '4GB'\nmax_wal_size = '4GB'\ncheckpoint_timeout = '1h'",
        bin("pgpitr-archive").display()
    );
    let mut c = Cluster::init(15, &conf);
    c.env = env;
    c.start();
    c
}

fn scenario(repo_env: Vec<(String, String)>, list_repo: impl Fn() -> Vec<String>) {
    let primary = archiving_cluster(repo_env.clone());
    // A base backup without WAL: everything the standby replays must come from the archive.
    let base_root = temp_dir("standby");
    give_to_pg_user(base_root.path());
    let base = base_root.path().join("data");
    run_ok(
        as_pg_user(client_bin("pg_basebackup"))
            .arg("-D")
            .arg(&base)
            .args(["-X", "none", "-c", "fast", "-U", "postgres", "-h"])
            .arg(&primary.socket_dir)
            .args(["-p", &primary.port.to_string()]),
    );

    run_ok(primary.pgbench().args(["-i", "-s", "4", "-q", "postgres"]));
    primary.psql("CHECKPOINT"); // so that the run below writes full-page images, like OLTP WAL
    let mut bench = primary
        .pgbench()
        .args(["-T", "6", "-c", "2", "-n", "postgres"])
        .spawn()
        .unwrap();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1200));
        primary.psql("SELECT pg_switch_wal()");
    }
    assert!(bench.wait().unwrap().success());
    primary.psql("CREATE TABLE marker AS SELECT g AS n FROM generate_series(1, 1000) g");
    let end: Lsn = primary
        .psql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    let last_segment = primary.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    primary.psql("SELECT pg_switch_wal()");
    primary.wait_archived(&last_segment);
    let expected = primary.psql("SELECT sum(abalance) || '/' || count(*) FROM pgbench_accounts");

    // Every archived segment comes back byte for byte.
    let keys = list_repo();
    let segments: Vec<String> = keys
        .iter()
        .filter_map(|k| pgpitr::repo::layout::parse_wal_object_key(k))
        .filter(|(n, _)| matches!(n, WalFileName::Segment(_)))
        .map(|(n, _)| n.to_string())
        .collect();
    assert!(
        segments.len() >= 6,
        "expected several archived segments, got {segments:?}"
    );
    // pgpitr-restore runs in a data directory of the cluster: pg_wal and global/pg_control.
    let scratch = temp_dir("fetch");
    std::fs::create_dir(scratch.path().join("pg_wal")).unwrap();
    std::fs::create_dir(scratch.path().join("global")).unwrap();
    std::fs::copy(
        primary.data.join("global/pg_control"),
        scratch.path().join("global/pg_control"),
    )
    .unwrap();
    for name in &segments {
        let mut cmd = Command::new(bin("pgpitr-restore"));
        cmd.args([name.as_str(), "pg_wal/RECOVERYXLOG"])
            .current_dir(scratch.path());
        cmd.envs(repo_env.iter().cloned());
        run_ok(&mut cmd);
        let fetched = std::fs::read(scratch.path().join("pg_wal/RECOVERYXLOG")).unwrap();
        let original = std::fs::read(primary.pg_wal().join(name)).unwrap();
        assert!(
            fetched == original,
            "segment {name} differs from PostgreSQL's"
        );
    }

    // A standby that only has restore_command replays everything.
    let mut standby = Cluster::adopt(15, base_root, base.clone());
    std::fs::write(base.join("standby.signal"), "").unwrap();
    give_to_pg_user(&base);
    standby.append_conf(&format!(
        "archive_mode = off\nhot_standby = on\nrestore_command = '{} %f %p'\nport = {}",
        bin("pgpitr-restore").display(),
        standby.port
    ));
    standby.env = repo_env;
    standby.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let replayed: Lsn = standby
            .psql("SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')")
            .parse()
            .unwrap();
        if replayed >= end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standby stuck at {replayed}, want {end}:\n{}",
            standby.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        standby.psql("SELECT sum(abalance) || '/' || count(*) FROM pgbench_accounts"),
        expected
    );
    assert_eq!(standby.psql("SELECT count(*) FROM marker"), "1000");
    assert!(
        !standby.log().contains("pgpitr-restore: error"),
        "{}",
        standby.log()
    );
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            walk(&e.path(), root, out);
        } else {
            out.push(e.path().strip_prefix(root).unwrap().display().to_string());
        }
    }
}

#[test]
fn postgres_archives_and_recovers_through_local_repository() {
    let dir = temp_dir("repo");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    let env = vec![("PGPITR_REPO".to_string(), repo.display().to_string())];
    scenario(env, || {
        let mut keys = Vec::new();
        walk(&repo, &repo, &mut keys);
        keys
    });
}

#[test]
fn postgres_archives_and_recovers_through_s3() {
    let g = Garage::shared();
    let bucket = g.bucket();
    let env = g.env(&bucket, "pg15");
    let list_env = env.clone();
    scenario(env, move || {
        for (k, v) in &list_env {
            std::env::set_var(k, v);
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let config = pgpitr::config::Config::load(None).unwrap();
            let storage = config.storage().await.unwrap();
            storage
                .list("")
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.key)
                .collect()
        })
    });
}
