//! End to end: `pgpitr drill` on real PostgreSQL 15. A cluster archives through
//! `pgpitr-archive`, `pgpitr backup` takes a base backup, then marker rows are committed one by
//! one with WAL switches between them. Then:
//!
//! - a drill to a time between two markers with a `--check-sql` that counts them exactly passes,
//!   records ok with an RTO and the point reached, and leaves no scratch directory or server;
//! - the same drill with an expectation that does not hold fails naming `check-sql`, recorded;
//! - with a WAL segment the target needs deleted, a time drill and a `latest` drill both fail at
//!   the `target` step (recovery stopped early must never pass);
//! - on Garage (S3), a `latest` drill passes.

use std::path::Path;

use pgpitr_tests::cli::{archiving_cluster, conninfo, local_repo, pgpitr, repo_env, text, Env};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::monitoring::{check, metrics, must, status};
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::temp_dir;

/// A backup, then markers 1..=5 committed one at a time, each followed by a WAL switch;
/// returns the segment holding marker 3.
fn workload(env: &Env, c: &Cluster) -> String {
    c.psql("CREATE TABLE marker (id int PRIMARY KEY, t timestamptz NOT NULL)");
    let mut benv = env.clone();
    benv.push(("PGPITR_CONNINFO".into(), conninfo(c)));
    let out = pgpitr(&benv, &["backup", "--checkpoint", "fast"]);
    assert!(out.status.success(), "backup: {}", text(&out));
    let mut third = String::new();
    for id in 1..=5 {
        c.psql(&format!(
            "INSERT INTO marker VALUES ({id}, clock_timestamp())"
        ));
        if id == 3 {
            third = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
        }
        c.psql("SELECT pg_sleep(0.05)");
        c.psql("SELECT pg_switch_wal()");
    }
    c.wait_archive_idle();
    third
}

/// A time halfway between marker `id` and the next, as PostgreSQL prints it in UTC.
fn time_after_marker(c: &Cluster, id: i32) -> String {
    c.psql(&format!(
        "SELECT to_char((a.t + (b.t - a.t) / 2) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' \
         FROM marker a JOIN marker b ON b.id = a.id + 1 WHERE a.id = {id}"
    ))
}

/// `pgpitr drill --json --scratch <parent> <args>`; the exit code and the JSON report.
fn drill(env: &Env, scratch: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["drill", "--json", "--scratch", scratch.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = pgpitr(env, &all);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", text(&out)));
    (out.status.code(), report, text(&out))
}

/// Nothing left behind: the scratch parent is empty and no process names it.
fn assert_cleaned_up(scratch: &Path) {
    let left: Vec<_> = std::fs::read_dir(scratch).unwrap().flatten().collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
    let needle = scratch.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(
                !cmd.contains(&needle),
                "a process still runs in the scratch directory: {cmd}"
            );
        }
    }
}

fn check_file(dir: &Path, sql: &str) -> String {
    let path = dir.join("checks.sql");
    std::fs::write(&path, sql).unwrap();
    path.display().to_string()
}

/// The record the drill wrote in local repository `repo`.
fn record(repo: &Path, report: &serde_json::Value) -> serde_json::Value {
    let key = report["record"].as_str().unwrap();
    assert!(key.starts_with("runs/drill/"), "{key}");
    serde_json::from_slice(&std::fs::read(repo.join(key)).unwrap()).unwrap()
}

#[test]
fn a_drill_to_a_time_passes_and_a_failed_check_fails_both_recorded() {
    let (_keep, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "");
    workload(&env, &c);
    let target = time_after_marker(&c, 3);
    let work = temp_dir("drill-work");
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();

    let checks = check_file(
        work.path(),
        "-- exactly the markers at or before the target\nSELECT count(*) = 3 FROM marker;\nSELECT max(id) = 3\n  FROM marker;\n",
    );
    let (code, report, out) = drill(
        &env,
        &scratch,
        &["--target", &target, "--check-sql", &checks],
    );
    assert_eq!(code, Some(0), "{out}");
    let rec = record(&repo, &report);
    assert_eq!(rec["ok"], true, "{rec}");
    assert_eq!(rec["failed_step"], serde_json::Value::Null);
    assert!(rec["rto_seconds"].as_f64().unwrap() > 0.0, "{rec}");
    assert!(
        rec["reached"].as_str().unwrap().contains("last commit"),
        "{rec}"
    );
    assert_eq!(report["checks"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["amcheck"], "passed", "{report}");
    assert_cleaned_up(&scratch);
    // What status and metrics make of it: the drill check is OK, with the RTO measured.
    let drill_check = drill_status(&env);
    assert_eq!(drill_check["level"], "ok", "{drill_check}");
    let (last_run, last_ok, rto) = drill_metrics(&env);
    assert_eq!(last_run, last_ok);
    assert!(rto > 0.0);

    // An expectation that does not hold at that target: 5 markers exist only later.
    let checks = check_file(
        work.path(),
        "SELECT count(*) = 3 FROM marker;\nSELECT count(*) = 5 FROM marker;\n",
    );
    let (code, report, out) = drill(
        &env,
        &scratch,
        &["--target", &target, "--check-sql", &checks],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("failed at step check-sql"), "{out}");
    let rec = record(&repo, &report);
    assert_eq!(rec["ok"], false, "{rec}");
    assert_eq!(rec["failed_step"], "check-sql", "{rec}");
    assert!(rec["message"].as_str().unwrap().contains("line 2"), "{rec}");
    assert_cleaned_up(&scratch);
    // A failed drill is critical in status, and its run is newer than the last success.
    let drill_check = drill_status(&env);
    assert_eq!(drill_check["level"], "critical", "{drill_check}");
    let (failed_run, still_last_ok, _) = drill_metrics(&env);
    assert!(failed_run > still_last_ok && still_last_ok == last_ok);
}

#[test]
fn a_drill_fails_at_the_target_when_a_wal_segment_is_missing() {
    let (_keep, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "");
    let third = workload(&env, &c);
    let target = time_after_marker(&c, 4);
    let seg: pgpitr::pg::WalSegmentName = third.parse().unwrap();
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
    let work = temp_dir("drill-gap");
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();

    for target in [target.as_str(), "latest"] {
        let (code, report, out) = drill(&env, &scratch, &["--target", target]);
        assert_eq!(code, Some(1), "{target}: {out}");
        assert!(out.contains("failed at step target"), "{target}: {out}");
        let rec = record(&repo, &report);
        assert_eq!(rec["ok"], false, "{rec}");
        assert_eq!(rec["failed_step"], "target", "{rec}");
        assert_cleaned_up(&scratch);
    }
}

#[test]
fn a_latest_drill_passes_on_garage() {
    let g = Garage::shared();
    let bucket = g.bucket();
    let env = g.env(&bucket, "drill");
    let c = archiving_cluster(env.clone(), "");
    workload(&env, &c);
    let work = temp_dir("drill-s3");
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let checks = check_file(work.path(), "SELECT count(*) = 5 FROM marker;\n");
    let (code, report, out) = drill(
        &env,
        &scratch,
        &["--target", "latest", "--check-sql", &checks, "--no-amcheck"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["record"]
            .as_str()
            .unwrap()
            .starts_with("runs/drill/"),
        "{report}"
    );
    assert_cleaned_up(&scratch);
}

/// The `drill` check of `pgpitr status --json`.
fn drill_status(env: &Env) -> serde_json::Value {
    let (report, _) = status(env);
    check(&report, "drill").clone()
}

/// `pgpitr_drill_last_run_timestamp_seconds`, `…_last_success_…` and
/// `pgpitr_drill_last_rto_seconds` from `pgpitr metrics`.
fn drill_metrics(env: &Env) -> (f64, f64, f64) {
    let scrape = metrics(env);
    (
        must(&scrape, "pgpitr_drill_last_run_timestamp_seconds", None),
        must(&scrape, "pgpitr_drill_last_success_timestamp_seconds", None),
        must(&scrape, "pgpitr_drill_last_rto_seconds", None),
    )
}
