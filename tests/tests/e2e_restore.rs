//! End to end: point-in-time restore on real PostgreSQL 15, for a local repository and for
//! Garage. A cluster archives through `pgpitr-archive`; `pgpitr backup` takes a base backup; a
//! workload commits marker rows stamped with `clock_timestamp()` (one transaction each, every
//! ~50 ms for ~24 s) under pgbench noise, with a second backup midway. Then:
//!
//! - a time target before the second backup: the plan picks the first backup, the restored
//!   server (started by `pg_ctl` without any pgpitr environment) holds exactly the markers at or
//!   before the target, and `pg_amcheck` passes;
//! - a time target after it, restored with `--start --archive-mode preserve`: the second backup,
//!   the same check, and the promoted copy archives its new timeline into the same repository;
//! - rows written on that timeline, then restored again with `--target-timeline 2`;
//! - refusals: a non-empty `--pgdata` (left untouched), a target before the first backup (naming
//!   the earliest reachable time), a plan with a deleted WAL segment (nothing written).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use pgpitr_tests::garage::{Garage, SECRET};
use pgpitr_tests::pg::{bin_dir, client_bin, Cluster};
use pgpitr_tests::pitr::{
    amcheck, archive_everything, backup, marker_ids, restore_promoting, target_after_marker,
    wait_promoted,
};
use pgpitr_tests::{bin, give_to_pg_user, run_ok, temp_dir, PG_USER};

type Env = Vec<(String, String)>;

/// `pgpitr <args>` with the repository environment (and nothing from the caller's).
fn pgpitr(env: &Env, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("pgpitr"));
    cmd.args(args)
        .env_remove("PGPITR_CONFIG")
        .env("PGPITR_LOG", "warn")
        .envs(env.iter().cloned());
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pgpitr_ok(env: &Env, args: &[&str]) -> String {
    let out = pgpitr(env, args);
    assert!(
        out.status.success(),
        "pgpitr {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Stops a server that `pgpitr restore --start` started (the harness did not).
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = pgpitr_tests::as_pg_user(bin_dir(15).join("pg_ctl"))
            .arg("-D")
            .arg(&self.0)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Files directly in `dir` (the configuration files a restore writes live there).
fn top_level_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.path())
        .collect()
}

fn assert_mode(path: &Path, want: u32) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, want, "{}", path.display());
}

struct Workload {
    primary: Cluster,
    first: String,
    second: String,
    /// Marker ids just before the second backup started and just after it ended.
    before_second: i64,
    after_second: i64,
    last: i64,
    /// The last marker id before and after `pg_create_restore_point('before_second')`: a
    /// restore to that name holds the markers up to some id in this range.
    restore_point_between: (i64, i64),
}

fn run_workload(env: &Env) -> Workload {
    let primary = pgpitr_tests::cli::archiving_cluster(env.clone(), "");
    primary.psql("CREATE TABLE marker (id serial PRIMARY KEY, t timestamptz NOT NULL)");
    primary.psql(
        "CREATE PROCEDURE markers(n int) LANGUAGE plpgsql AS $$ BEGIN \
           FOR i IN 1..n LOOP \
             INSERT INTO marker(t) VALUES (clock_timestamp()); COMMIT; \
             PERFORM pg_sleep(0.05); \
           END LOOP; END $$",
    );
    run_ok(primary.pgbench().args(["-i", "-s", "2", "-q", "postgres"]));
    archive_everything(&primary);
    let first = backup(env, &primary);

    let mut bench: Child = primary
        .pgbench()
        .args(["-c", "2", "-T", "24", "-n", "postgres"])
        .spawn()
        .unwrap();
    let mut markers: Child = Command::new(client_bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
        .arg(&primary.socket_dir)
        .args(["-p", &primary.port.to_string(), "-d", "postgres"])
        .args(["-c", "CALL markers(480)"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(11));
    let max_id = |c: &Cluster| -> i64 {
        c.psql("SELECT coalesce(max(id), 0) FROM marker")
            .parse()
            .unwrap()
    };
    let restore_point = |name: &str| -> (i64, i64) {
        let before = max_id(&primary);
        primary.psql(&format!("SELECT pg_create_restore_point('{name}')"));
        (before, max_id(&primary))
    };
    let restore_point_between = restore_point("before_second");
    let before_second = max_id(&primary);
    let began = Instant::now();
    let second = backup(env, &primary);
    let after_second = max_id(&primary);
    restore_point("after_second");
    eprintln!(
        "second backup took {:.1} s; archiver: {}; current {}",
        began.elapsed().as_secs_f64(),
        primary.psql("SELECT archived_count || ' ' || coalesce(last_archived_wal, '') || ' failed ' || failed_count FROM pg_stat_archiver"),
        primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    );
    assert!(bench.wait().unwrap().success(), "pgbench failed");
    assert!(
        markers.wait().unwrap().success(),
        "the marker procedure failed"
    );
    let last = max_id(&primary);
    assert!(
        before_second > 50 && after_second < last - 50,
        "the second backup should fall in the middle of the markers ({before_second}, {after_second}, {last})"
    );
    archive_everything(&primary);
    Workload {
        primary,
        first,
        second,
        before_second,
        after_second,
        last,
        restore_point_between,
    }
}

/// The whole story on one repository; `server_env` is what a restored server gets from its
/// environment (only S3 credentials, never PGPITR_*).
fn scenario(env: &Env, server_env: &Env) -> Workload {
    let w = run_workload(env);
    let primary = &w.primary;

    // 1. A target before the second backup: restored from the first, by plain pg_ctl.
    let (target_a, expected_a) = target_after_marker(primary, w.before_second - 20);
    let plan = pgpitr_ok(env, &["plan", "--target-time", &target_a]);
    assert!(
        plan.contains(&w.first),
        "plan should use {}:\n{plan}",
        w.first
    );
    let plan_json: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        env,
        &["plan", "--target-time", &target_a, "--json"],
    ))
    .unwrap();
    assert_eq!(plan_json["backup"]["id"], w.first.as_str());
    assert_eq!(plan_json["target_timeline"], 1);

    // Restore points are found in the archived WAL: each name picks the newest backup that
    // ends before it, and a name never created is refused.
    let listing: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(env, &["list", "--json"])).unwrap();
    let names: Vec<&str> = listing["restore_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before_second", "after_second"], "{listing}");
    for (name, want) in [("before_second", &w.first), ("after_second", &w.second)] {
        let plan_json: serde_json::Value =
            serde_json::from_str(&pgpitr_ok(env, &["plan", "--target-name", name, "--json"]))
                .unwrap();
        assert_eq!(
            plan_json["backup"]["id"],
            want.as_str(),
            "{name}: {plan_json}"
        );
    }
    let out = pgpitr(env, &["plan", "--target-name", "never_created"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("restore point 'never_created' is not in the archived WAL"),
        "{}",
        stderr(&out)
    );

    let root_a = temp_dir("restore-a");
    let data_a = root_a.path().join("data");
    let out = restore_promoting(env, &["--target-time", &target_a], &data_a, &[]);
    assert!(
        out.contains(&format!("restored backup {}", w.first)),
        "{out}"
    );
    assert_mode(&data_a, 0o700);
    assert_mode(&data_a.join("PG_VERSION"), 0o600);
    assert_mode(&data_a.join("recovery.signal"), 0o600);
    assert_mode(&data_a.join("pgpitr-restore.toml"), 0o600);
    assert_mode(&data_a.join("base"), 0o700);
    let auto_conf = std::fs::read_to_string(data_a.join("postgresql.auto.conf")).unwrap();
    for want in [
        "recovery_target_action = 'promote'",
        "archive_mode = 'off'",
        "recovery_target_timeline = '1'",
        &format!("recovery_target_time = '{target_a}'"),
        &format!("{} --config", bin("pgpitr-restore").display()),
    ] {
        assert!(auto_conf.contains(want), "{want:?} missing:\n{auto_conf}");
    }
    for f in top_level_files(&data_a) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the S3 secret",
            f.display()
        );
    }
    let mut a = Cluster::adopt(15, root_a, data_a);
    a.env = server_env.clone();
    a.start();
    wait_promoted(&a);
    assert_eq!(
        marker_ids(&a, None),
        expected_a,
        "restore A holds other markers"
    );
    amcheck(&a);
    assert!(!a.log().contains("pgpitr-restore: error"), "{}", a.log());
    drop(a);

    // 2. A target after the second backup, with --start; the copy keeps archiving into the
    //    same repository (--archive-mode preserve) and so starts timeline 2 there.
    let (target_b, expected_b) = target_after_marker(primary, (w.after_second + w.last) / 2);
    let root_b = temp_dir("restore-b");
    let data_b = root_b.path().join("data");
    let mut b = Cluster::adopt(15, root_b, data_b.clone());
    b.env = env.clone();
    let server_options = format!(
        "-p {} -c unix_socket_directories='{}' -c listen_addresses=''",
        b.port,
        b.socket_dir.display()
    );
    let out = pgpitr(
        env,
        &[
            "restore",
            "--target-time",
            &target_b,
            "--pgdata",
            data_b.to_str().unwrap(),
            "--target-action",
            "promote",
            "--archive-mode",
            "preserve",
            "--owner",
            PG_USER,
            "--start",
            "--server-options",
            &server_options,
            "--start-timeout",
            "300",
        ],
    );
    let _stop_b = StopOnDrop(data_b.clone());
    assert!(
        out.status.success(),
        "restore --start failed ({}):\n{}\n{}\n{}",
        out.status,
        stdout(&out),
        stderr(&out),
        std::fs::read_to_string(data_b.join("pgpitr-start.log")).unwrap_or_default()
    );
    let report = stdout(&out);
    assert!(
        report.contains(&format!("restored backup {}", w.second)),
        "{report}"
    );
    assert!(report.contains("promoted to timeline 2"), "{report}");
    let auto_conf = std::fs::read_to_string(data_b.join("postgresql.auto.conf")).unwrap();
    assert!(!auto_conf.contains("archive_mode = 'off'"), "{auto_conf}");
    assert_eq!(
        marker_ids(&b, None),
        expected_b,
        "restore B holds other markers"
    );
    amcheck(&b);

    // 3. Write on timeline 2, archive it, restore again following timeline 2.
    b.psql("CREATE TABLE on_timeline_2 AS SELECT g AS n FROM generate_series(1, 100) g");
    archive_everything(&b);
    let plan_json: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        env,
        &["plan", "--target-timeline", "2", "--json"],
    ))
    .unwrap();
    assert_eq!(plan_json["target_timeline"], 2);
    assert_eq!(plan_json["backup"]["id"], w.second.as_str());
    assert!(
        plan_json["history_files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "00000002.history"),
        "{plan_json}"
    );
    let root_c = temp_dir("restore-c");
    let data_c = root_c.path().join("data");
    restore_promoting(env, &["--target-timeline", "2"], &data_c, &[]);
    let mut c = Cluster::adopt(15, root_c, data_c);
    c.env = server_env.clone();
    c.start();
    wait_promoted(&c);
    assert_eq!(c.psql("SELECT count(*) FROM on_timeline_2"), "100");
    assert_eq!(
        marker_ids(&c, None),
        expected_b,
        "timeline 2 holds B's markers"
    );
    assert_eq!(
        c.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000003",
        "recovery on timeline 2 promoted to timeline 3"
    );
    amcheck(&c);
    drop(c);
    drop(b);
    w
}

#[test]
fn point_in_time_restore_from_local_repository() {
    let dir = temp_dir("repo");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    let env: Env = vec![("PGPITR_REPO".to_string(), repo.display().to_string())];
    let w = scenario(&env, &Vec::new());

    // A restore to a restore point: the server stops exactly there.
    let root_rp = temp_dir("restore-rp");
    let data_rp = root_rp.path().join("data");
    let out = restore_promoting(&env, &["--target-name", "before_second"], &data_rp, &[]);
    assert!(
        out.contains(&format!("restored backup {}", w.first)),
        "{out}"
    );
    let auto_conf = std::fs::read_to_string(data_rp.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains("recovery_target_name = 'before_second'"),
        "{auto_conf}"
    );
    let mut rp = Cluster::adopt(15, root_rp, data_rp);
    rp.start();
    wait_promoted(&rp);
    let (low, high) = w.restore_point_between;
    let count: i64 = rp.psql("SELECT count(*) FROM marker").parse().unwrap();
    assert!(
        (low..=high).contains(&count),
        "{count} markers restored, expected {low} to {high}"
    );
    assert_eq!(
        rp.psql("SELECT coalesce(max(id), 0) FROM marker")
            .parse::<i64>()
            .unwrap(),
        count,
        "the markers restored are 1 to {count}"
    );
    assert!(
        rp.log()
            .contains("recovery stopping at restore point \"before_second\""),
        "{}",
        rp.log()
    );
    drop(rp);

    // Refusals, on the same repository.
    // A non-empty --pgdata is refused and left as it was.
    let busy = temp_dir("busy");
    std::fs::write(busy.path().join("keep.txt"), "user data").unwrap();
    let out = pgpitr(
        &env,
        &["restore", "--pgdata", busy.path().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(busy.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(
        std::fs::read_to_string(busy.path().join("keep.txt")).unwrap(),
        "user data"
    );

    // A target before the first backup names the earliest reachable point.
    let scratch = temp_dir("refused");
    let never = scratch.path().join("data");
    let out = pgpitr(
        &env,
        &[
            "restore",
            "--target-time",
            "2000-01-01 00:00:00+00",
            "--pgdata",
            never.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("earliest reachable point is"), "{err}");
    assert!(err.contains(&w.first), "{err}");
    assert!(!never.exists(), "nothing may be written");

    // --start with a target the archive does not reach: PostgreSQL stops ("recovery ended
    // before configured recovery target was reached") and restore exits 3.
    let root_far = temp_dir("restore-far");
    let data_far = root_far.path().join("data");
    let far = Cluster::adopt(15, root_far, data_far.clone());
    let server_options = format!(
        "-p {} -c unix_socket_directories='{}' -c listen_addresses=''",
        far.port,
        far.socket_dir.display()
    );
    let out = pgpitr(
        &env,
        &[
            "restore",
            "--target-time",
            "2999-01-01 00:00:00+00",
            "--target-timeline",
            "1",
            "--pgdata",
            data_far.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
            "--start",
            "--server-options",
            &server_options,
            "--start-timeout",
            "300",
        ],
    );
    let _stop_far = StopOnDrop(data_far.clone());
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("recovery ended before the target"),
        "{}",
        stdout(&out)
    );
    assert!(!far.is_running());

    // A WAL segment the plan needs is deleted: refused before anything is written.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.join(format!("backups/{}/manifest.json", w.second))).unwrap(),
    )
    .unwrap();
    let stop_lsn: pgpitr::pg::Lsn = manifest["stop_lsn"].as_str().unwrap().parse().unwrap();
    let seg = pgpitr::pg::WalSegmentName::containing(
        pgpitr::pg::TimelineId(1),
        stop_lsn,
        pgpitr::pg::WalSegSize::DEFAULT,
    );
    let prefix = pgpitr::repo::layout::wal_object_prefix(pgpitr::pg::WalFileName::Segment(seg));
    let dir = repo.join(Path::new(&prefix).parent().unwrap());
    let mut deleted = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{seg}-"))
        {
            std::fs::remove_file(e.path()).unwrap();
            deleted += 1;
        }
    }
    assert_eq!(deleted, 1, "segment {seg} should be archived once");
    let (target_b, _) = target_after_marker(&w.primary, (w.after_second + w.last) / 2);
    let out = pgpitr(
        &env,
        &[
            "restore",
            "--target-time",
            &target_b,
            "--target-timeline",
            "1",
            "--pgdata",
            never.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("WAL segment {seg} is missing")),
        "{err}"
    );
    assert!(!never.exists(), "nothing may be written");
}

#[test]
fn point_in_time_restore_from_s3() {
    let g = Garage::shared();
    let bucket = g.bucket();
    let env = g.env(&bucket, "pitr");
    // A restored server finds the repository through the file the restore wrote; only the
    // standard AWS credential variables come from its environment.
    let server_env: Env = env
        .iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .cloned()
        .collect();
    scenario(&env, &server_env);
}
