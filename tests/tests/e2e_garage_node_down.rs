//! A node down: a three-node Garage cluster (replication factor 3, on loopback), the setup one
//! outgrows a single machine into (docs/operations.md). PostgreSQL 15 archives through node 0's
//! S3 API; node 2 is killed with `SIGKILL`; archiving goes on, a backup completes, and a
//! point-in-time restore to a restore point recovers every marker row before it. Node 2 comes
//! back; archiving and another backup go on, and `pgpitr verify` passes.

use std::process::{Command, Output};

use pgpitr_tests::garage_cluster::GarageCluster;
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::{bin, temp_dir, PG_USER};

type Env = Vec<(String, String)>;

fn pgpitr(env: &Env, args: &[&str]) -> Output {
    Command::new(bin("pgpitr"))
        .args(args)
        .env_remove("PGPITR_CONFIG")
        .env("PGPITR_LOG", "warn")
        .envs(env.iter().cloned())
        .output()
        .unwrap()
}

fn pgpitr_ok(env: &Env, args: &[&str]) -> String {
    let out = pgpitr(env, args);
    assert!(
        out.status.success(),
        "pgpitr {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn backup(env: &Env, c: &Cluster) -> String {
    let mut env = env.clone();
    env.push((
        "PGPITR_CONNINFO".into(),
        format!(
            "host={} port={} user=postgres",
            c.socket_dir.display(),
            c.port
        ),
    ));
    pgpitr_ok(&env, &["backup", "--checkpoint", "fast"])
        .trim()
        .to_string()
}

/// Commits markers `from..=to`, switches segments and waits until they are archived.
fn markers_archived(c: &Cluster, from: u32, to: u32) {
    c.psql(&format!(
        "INSERT INTO marker SELECT generate_series({from}, {to})"
    ));
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archived(&seg);
}

#[test]
fn archiving_backup_and_restore_go_on_with_one_of_three_garage_nodes_down() {
    let mut garage = GarageCluster::start(3);
    let bucket = garage.bucket();
    let env = garage.env(0, &bucket, "cluster1");
    let conf = format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{} %p %f'\nmax_wal_senders = 4\nmax_wal_size = '1GB'\ncheckpoint_timeout = '1h'",
        bin("pgpitr-archive").display()
    );
    let mut c = Cluster::init(15, &conf);
    c.env = env.clone();
    c.start();
    c.psql("CREATE TABLE marker (id int primary key)");
    markers_archived(&c, 1, 100);
    let first = backup(&env, &c);

    garage.kill(2);
    let failed_before = c.psql("SELECT failed_count FROM pg_stat_archiver");
    for round in 1..=3 {
        markers_archived(&c, round * 1000, round * 1000 + 99);
    }
    let second = backup(&env, &c);
    assert_ne!(first, second);
    markers_archived(&c, 5000, 5099);
    c.psql("SELECT pg_create_restore_point('node_down')");
    markers_archived(&c, 6000, 6099);
    assert_eq!(
        c.psql("SELECT failed_count FROM pg_stat_archiver"),
        failed_before,
        "an archive call failed with one node down:\n{}",
        c.log()
    );

    // A point-in-time restore with the node still down.
    let root = temp_dir("node-down-restore");
    let data = root.path().join("data");
    let out = pgpitr_ok(
        &env,
        &[
            "restore",
            "--target-name",
            "node_down",
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    assert!(out.contains(&second), "{out}");
    let mut r = Cluster::adopt(15, root, data);
    r.env = env.clone();
    r.start_with(false);
    assert!(
        r.wait_for("SELECT pg_is_in_recovery()", "f", 180),
        "the restored server did not finish recovery:\n{}",
        r.log()
    );
    assert_eq!(
        r.psql("SELECT count(*) || ' ' || max(id) FROM marker"),
        "500 5099"
    );
    r.stop();
    drop(r);

    // The node comes back: archiving and backups go on, and the repository verifies.
    garage.restart(2);
    markers_archived(&c, 7000, 7099);
    let third = backup(&env, &c);
    assert_ne!(second, third);
    markers_archived(&c, 8000, 8099);
    c.wait_archive_idle();
    let report = pgpitr_ok(&env, &["verify"]);
    assert!(
        report.contains("checked 3 backup(s)") && report.contains("no problems"),
        "{report}"
    );
    c.stop();
}
