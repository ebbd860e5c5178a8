//! End to end: base backups taken from a hot standby (issue 20, item 1), on PostgreSQL 15 and
//! 18 (and 13, which tells a standby apart another way). A primary archives through `pgpitr-archive`; a streaming standby is built from it; the
//! backup connects to the standby only (its conninfo is the only one pgpitr gets), with the
//! primary committing markers meanwhile. Then a point-in-time restore from that backup holds
//! exactly the markers up to a time between two commits, `pg_amcheck` passes, and the restored
//! `backup_label` says the backup came from a standby.
//!
//! Two ways the WAL reaches the repository:
//! - the primary archives, the standby does not (`archive_mode = on` is inactive in recovery);
//!   a backup whose last segment the primary never switches fails at `--wal-timeout` with a
//!   message naming `archive_timeout`; `check` explains the setup, and names `hot_standby` once
//!   the standby refuses connections without it;
//! - both archive into the same repository (`archive_mode = always` on the standby): every
//!   segment is stored once, neither archiver ever fails, also after the standby is promoted
//!   (its `.partial` tail of timeline 1 and its timeline 2 beside the primary's timeline 1).

use std::process::{Child, Command};

use pgpitr_tests::cli::{archiving_cluster_of, conninfo, local_repo, pgpitr, repo_env, text, Env};
use pgpitr_tests::pg::{client_bin, Cluster};
use pgpitr_tests::pitr::{
    add_markers, amcheck, archive_everything, backup, create_markers, marker_ids, nth_marker,
    restore_and_start, target_after_marker,
};

/// Commits `n` markers on `c` in the background.
fn markers_in_background(c: &Cluster, n: u32) -> Child {
    Command::new(client_bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
        .arg(&c.socket_dir)
        .args(["-p", &c.port.to_string(), "-d", "postgres"])
        .args(["-c", &format!("CALL markers({n})")])
        .spawn()
        .unwrap()
}

/// `failed_count` of `c`'s archiver, and its archived count.
fn archiver(c: &Cluster) -> (u64, u64) {
    let row = c.psql("SELECT failed_count || ' ' || archived_count FROM pg_stat_archiver");
    let (failed, archived) = row.split_once(' ').unwrap();
    (failed.parse().unwrap(), archived.parse().unwrap())
}

/// Every WAL file name stored in the repository at `repo`, with how many contents each has.
fn stored_wal(repo: &std::path::Path) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for f in pgpitr_tests::files_under(&repo.join("wal")) {
        let key = f.strip_prefix(repo).unwrap().to_string_lossy().into_owned();
        if let Some((name, _)) = pgpitr::repo::layout::parse_wal_object_key(&key) {
            *out.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    out
}

fn standby_scenario(major: u32, standby_archives: bool) {
    let began = std::time::Instant::now();
    let (_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let mut primary = archiving_cluster_of(major, env.clone(), "wal_keep_size = '256MB'");
    create_markers(&primary);
    primary
        .psql("CREATE TABLE filler AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g");
    primary.psql("CREATE INDEX ON filler (h)");
    add_markers(&primary, 5);
    archive_everything(&primary);
    let mut standby = primary.standby(if standby_archives {
        "archive_mode = always"
    } else {
        ""
    });
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    // A checkpoint the standby can restart from, so that the backup starts after it.
    primary.psql("CHECKPOINT");
    standby.wait_replayed(&primary);

    let mut standby_env: Env = env.clone();
    standby_env.push(("PGPITR_CONNINFO".into(), conninfo(&standby)));

    // `check` on the standby says what a backup from it needs, and finds the last segment it
    // received complete in the repository (it cannot switch WAL to test archiving).
    let out = pgpitr(&standby_env, &["check", "--json", "--timeout", "30"]);
    assert!(out.status.success(), "{}", text(&out));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = |name: &str| -> String {
        let c = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks}"));
        assert_eq!(c["ok"], true, "{c}");
        c["detail"].as_str().unwrap().to_string()
    };
    let standby_detail = check("standby");
    assert!(
        standby_detail.contains("archive_mode = always")
            && standby_detail.contains("archive_timeout"),
        "{standby_detail}"
    );
    let mode = check("archive_mode");
    if !standby_archives {
        assert!(mode.contains("the primary must archive"), "{mode}");
    }
    assert!(check("archiving").contains("received complete"), "{checks}");
    if !standby_archives {
        // Nothing switches the primary's segment: the backup's last segment never arrives.
        let out = pgpitr(
            &standby_env,
            &["backup", "--checkpoint", "fast", "--wal-timeout", "3"],
        );
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("backup from a standby") && err.contains("archive_timeout"),
            "{err}"
        );
        assert!(
            !err.contains("port="),
            "no connection string in messages: {err}"
        );
    }
    // The primary now switches segments while it writes, as archive_timeout does in production.
    primary.psql("ALTER SYSTEM SET archive_timeout = '1s'");
    primary.psql("SELECT pg_reload_conf()");

    let mut writer = markers_in_background(&primary, 120);
    // `backup` gives pgpitr the standby's conninfo, and no other.
    let id = backup(&env, &standby);
    assert!(writer.wait().unwrap().success(), "the marker writer failed");
    add_markers(&primary, 20);
    let seg = primary.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    archive_everything(&primary);
    if standby_archives {
        standby.wait_replayed(&primary);
        standby.wait_archived(&seg);
    }
    let count: u32 = primary.psql("SELECT count(*) FROM marker").parse().unwrap();
    assert_eq!(count, 5 + 120 + 20);

    let (target, expected) = target_after_marker(&primary, nth_marker(&primary, count - 10));
    let (restored, report) =
        restore_and_start(major, &env, &["--target-time", &target], &[], &Vec::new());
    assert!(
        report.contains(&format!("restored backup {id}")),
        "{report}"
    );
    assert_eq!(
        marker_ids(&restored, None),
        expected,
        "PostgreSQL {major}: restore from the standby's backup"
    );
    let label = std::fs::read_to_string(restored.path().join("backup_label.old")).unwrap();
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    amcheck(&restored);
    drop(restored);

    // Neither archiver ever failed, and no WAL file name holds two contents.
    let no_duplicates = |stored: &std::collections::BTreeMap<String, usize>| {
        let twice: Vec<_> = stored.iter().filter(|(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "stored with two contents: {twice:?}");
    };
    assert_eq!(archiver(&primary).0, 0, "{}", primary.log());
    if standby_archives {
        let (failed, archived) = archiver(&standby);
        assert_eq!(failed, 0, "{}", standby.log());
        assert!(archived > 0, "the standby archived nothing");
        no_duplicates(&stored_wal(&repo));

        // The standby is promoted: its timeline 2 and the .partial tail of timeline 1 land
        // beside the primary's timeline 1, which goes on; neither archiver fails.
        // Promoted mid-segment (markers streamed since the last switch), so that the standby
        // leaves a .partial tail of the segment the primary goes on filling.
        primary.psql("ALTER SYSTEM SET archive_timeout = 0");
        primary.psql("SELECT pg_reload_conf()");
        archive_everything(&primary);
        add_markers(&primary, 3);
        standby.wait_replayed(&primary);
        standby.psql("SELECT pg_promote()");
        assert!(standby.wait_for("SELECT pg_is_in_recovery()", "f", 60));
        standby.psql("CREATE TABLE after_promotion AS SELECT 1 AS a");
        archive_everything(&standby);
        add_markers(&primary, 5);
        archive_everything(&primary);
        standby.wait_archive_idle();
        primary.wait_archive_idle();
        assert_eq!(archiver(&primary).0, 0, "{}", primary.log());
        assert_eq!(archiver(&standby).0, 0, "{}", standby.log());
        let stored = stored_wal(&repo);
        no_duplicates(&stored);
        assert!(stored.contains_key("00000002.history"), "{stored:?}");
        assert!(
            stored
                .keys()
                .any(|k| k.starts_with("00000001") && k.ends_with(".partial")),
            "{stored:?}"
        );
        assert!(
            stored
                .keys()
                .any(|k| k.starts_with("00000002") && k.len() == 24),
            "{stored:?}"
        );
    } else {
        // A standby without hot_standby accepts no connection: check names the setting.
        standby.stop();
        standby.append_conf("hot_standby = off");
        standby.start_with(false);
        let socket = standby
            .socket_dir
            .join(format!(".s.PGSQL.{}", standby.port));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "{}", standby.log());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = pgpitr(&standby_env, &["check"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("set hot_standby = on there and restart it"),
            "{report}"
        );
    }
    eprintln!(
        "PostgreSQL {major}: standby scenario (standby archives: {standby_archives}) passed in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn backup_from_standby_with_wal_archived_by_the_primary_pg15() {
    standby_scenario(15, false);
}

#[test]
fn backup_from_standby_with_wal_archived_by_the_primary_pg18() {
    standby_scenario(18, false);
}

#[test]
fn backup_from_standby_archiving_into_the_same_repository_pg15() {
    standby_scenario(15, true);
}

#[test]
fn backup_from_standby_archiving_into_the_same_repository_pg18() {
    standby_scenario(18, true);
}

/// PostgreSQL 13 reports no `in_hot_standby`: pgpitr asks `pg_is_in_recovery()` instead.
#[test]
fn backup_from_standby_with_wal_archived_by_the_primary_pg13() {
    standby_scenario(13, false);
}
