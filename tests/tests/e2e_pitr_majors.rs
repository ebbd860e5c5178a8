//! End to end: point-in-time restore on every PostgreSQL major the project supports (13 to
//! 18), one test per major so that they run in parallel and a failure names its major. A major
//! whose server binaries are not installed fails (`PG<major>_SERVER_BIN`), never skips.
//!
//! Each test is kept small (a few hundred rows, a few segments): a cluster archives through
//! `pgpitr-archive`, commits markers, takes a base backup, commits more; then
//! - a time target between two markers committed after the backup: the restored server holds
//!   exactly the markers up to the target, and `pg_amcheck` passes;
//! - that restore, promoted with `--archive-mode preserve`, archives a new timeline (2) into
//!   the same repository; markers committed there, and a second restore to a time between two of
//!   them, following timeline 2 across the switch: exactly the markers up to that time, on
//!   timeline 3 after its promotion, `pg_amcheck` passes.

use pgpitr_tests::cli::{archiving_cluster_of, local_repo, pgpitr_ok, repo_env};
use pgpitr_tests::pitr::{
    add_markers, amcheck, archive_everything, backup, create_markers, marker_ids, nth_marker,
    restore_and_start, target_after_marker, timeline,
};

fn pitr_scenario(major: u32) {
    let began = std::time::Instant::now();
    let (_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let primary = archiving_cluster_of(major, env.clone(), "");
    create_markers(&primary);
    primary
        .psql("CREATE TABLE filler AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g");
    primary.psql("CREATE INDEX ON filler (h)");
    add_markers(&primary, 5);
    let id = backup(&env, &primary);
    add_markers(&primary, 20);
    archive_everything(&primary);

    // 1. A time on timeline 1, after the backup: exactly markers 1 to 15.
    let (target, expected) = target_after_marker(&primary, nth_marker(&primary, 15));
    assert_eq!(expected.split(',').count(), 15, "{expected}");
    let (b, report) = restore_and_start(
        major,
        &env,
        &["--target-time", &target],
        &["--archive-mode", "preserve"],
        &env,
    );
    assert!(
        report.contains(&format!("restored backup {id}")),
        "{report}"
    );
    assert_eq!(
        marker_ids(&b, None),
        expected,
        "PostgreSQL {major}: restore 1"
    );
    assert_eq!(timeline(&b), 2, "the promoted copy writes timeline 2");
    amcheck(&b);

    // 2. Markers on timeline 2, archived into the same repository; a time between two of them.
    add_markers(&b, 10);
    archive_everything(&b);
    let (target2, expected2) = target_after_marker(&b, nth_marker(&b, 15 + 6));
    assert_eq!(expected2.split(',').count(), 21, "{expected2}");
    let plan: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &[
            "plan",
            "--target-time",
            &target2,
            "--target-timeline",
            "2",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(plan["backup"]["id"], id.as_str(), "{plan}");
    assert_eq!(plan["target_timeline"], 2, "{plan}");
    let (c, _) = restore_and_start(
        major,
        &env,
        &["--target-time", &target2, "--target-timeline", "2"],
        &[],
        &Vec::new(),
    );
    assert_eq!(
        marker_ids(&c, None),
        expected2,
        "PostgreSQL {major}: restore across the timeline switch"
    );
    assert_eq!(timeline(&c), 3, "recovery on timeline 2 promotes to 3");
    amcheck(&c);
    eprintln!(
        "PostgreSQL {major}: point-in-time restores passed in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn point_in_time_restore_on_pg13() {
    pitr_scenario(13);
}

#[test]
fn point_in_time_restore_on_pg14() {
    pitr_scenario(14);
}

#[test]
fn point_in_time_restore_on_pg15() {
    pitr_scenario(15);
}

#[test]
fn point_in_time_restore_on_pg16() {
    pitr_scenario(16);
}

#[test]
fn point_in_time_restore_on_pg17() {
    pitr_scenario(17);
}

#[test]
fn point_in_time_restore_on_pg18() {
    pitr_scenario(18);
}
