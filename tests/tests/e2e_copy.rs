//! End to end: `pgpitr copy` to a second location (issue 19, items 2 and 5), on a PostgreSQL 15
//! cluster archiving through `pgpitr-archive`.
//!
//! - Local directories: a copy with its own retention (`keep_last = 1`) gets only the newest
//!   backup and the WAL from its start; `kill -9` of `copy` at seeded moments leaves a copy that
//!   `pgpitr verify --copy` passes, and the resume sends exactly the objects the copy lacked
//!   (none twice), verified; a second run sends nothing. With the repository moved away, a
//!   restore `--from` the copy recovers to a time target and its server reads its WAL from the
//!   copy. A segment deleted from the middle of the copy's WAL is "not found" there (exit 1)
//!   and is not fetched from anywhere else. `expire --copy`
//!   applies the copy's policy under the copy's lock.
//! - `archive_to_copies = true`: every WAL file lands in both locations; while the copy
//!   cannot take one, archiving of it fails (not reported archived) until it can.
//! - An encrypted repository: the copy holds the same sealed bytes under the same keys, and its
//!   key slots; `verify --copy` opens everything; a restore from the copy recovers.
//! - Garage: the repository and the copy in two buckets behind two proxies; every object
//!   written to the copy carries the copy's storage class (`STANDARD_IA`), none written to the
//!   repository does; with the repository answering 500 to everything (unreachable after the
//!   retries), `plan` and `restore` fall through to the copy and the restored server recovers
//!   from it.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgpitr_tests::chaos::{kills, run_killing, Ending, Rng, Scale, Tally};
use pgpitr_tests::cli::{
    archiving_cluster, local_repo, passphrase_file, pgpitr, pgpitr_cmd, pgpitr_ok, repo_env, text,
    with_passphrase, Env,
};
use pgpitr_tests::fault_proxy::{Fault, FaultProxy};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::pitr::{
    add_markers, archive_everything, backup, create_markers, nth_marker, target_after_marker,
    wait_promoted,
};
use pgpitr_tests::{bin, files_under, give_to_pg_user, temp_dir, PG_USER};

/// A configuration file holding `text` (the `[[copy]]` tables), readable by the server's user;
/// the repository itself comes from `PGPITR_*` variables.
fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pgpitr.toml");
    std::fs::write(&path, text).unwrap();
    give_to_pg_user(&path);
    path
}

fn with(env: &Env, pairs: &[(&str, &str)]) -> Env {
    let mut env = env.clone();
    env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// `pgpitr copy --json <extra>`, which must succeed: its one report.
fn copy_json(env: &Env, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["copy", "--json"];
    args.extend_from_slice(extra);
    let out = pgpitr_ok(env, &args);
    let mut reports: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(reports.len(), 1, "{out}");
    let r = reports.remove(0);
    assert_eq!(r["errors"], serde_json::json!([]), "{out}");
    r
}

/// The data objects of a local repository (WAL, packs, backups, restore points), as relative
/// paths; staging files and locks left out.
fn data_objects(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = files_under(root)
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(root).ok()?.to_string_lossy().into_owned();
            let data = ["wal/", "packs/", "backups/", "restore-points/"]
                .iter()
                .any(|d| rel.starts_with(d));
            (data && !rel.contains(".tmp.")).then_some(rel)
        })
        .collect();
    out.sort();
    out
}

/// A table of about 24 MB of poorly compressible text: several packs and WAL segments, so that
/// a copy takes long enough to be killed in the middle.
fn load(c: &Cluster, table: &str) {
    c.psql(&format!(
        "CREATE TABLE {table} AS SELECT i, md5(random()::text) || md5(random()::text) AS pad \
         FROM generate_series(1, 250000) i"
    ));
}

#[test]
fn copy_to_a_local_directory_survives_kills_and_restores_from_the_copy() {
    let (_main_dir, repo) = local_repo();
    let (_probe_dir, probe) = local_repo();
    let (_copy_dir, copy) = local_repo();
    let conf_dir = temp_dir("copy-conf");
    let config = config_file(
        conf_dir.path(),
        &format!(
            "[[copy]]\nname = \"probe\"\nrepo = \"{}\"\nkeep_last = 1\n\n\
             [[copy]]\nname = \"disk\"\nrepo = \"{}\"\nkeep_last = 1\n",
            probe.display(),
            copy.display()
        ),
    );
    let main_env: Env = vec![("PGPITR_REPO".into(), repo.display().to_string())];
    let env = with(&main_env, &[("PGPITR_CONFIG", config.to_str().unwrap())]);
    let c = archiving_cluster(main_env.clone(), "");
    create_markers(&c);
    load(&c, "old_rows");
    let first = backup(&main_env, &c);
    add_markers(&c, 3);
    load(&c, "new_rows");
    let second = backup(&main_env, &c);
    add_markers(&c, 6);
    // A few more segments, so that the copy's WAL has a middle.
    for _ in 0..3 {
        archive_everything(&c);
    }

    // The copy's own policy keeps the newest backup only, with the WAL from its start.
    let mut scale = Scale::measure(&mut pgpitr_cmd(&env, &["copy", "--to", "probe"]));
    let listing: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &with(&main_env, &[("PGPITR_REPO", probe.to_str().unwrap())]),
        &["list", "--json"],
    ))
    .unwrap();
    let ids: Vec<&str> = listing["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.as_str()], "{listing}");
    assert_ne!(first, second);

    // kill -9 at seeded moments; each leaves a copy that verify accepts.
    let mut rng = Rng::from_env("e2e_copy");
    let mut tally = Tally::default();
    for _ in 0..kills(4) {
        let after = scale.pick(&mut rng);
        let ending = run_killing(&mut pgpitr_cmd(&env, &["copy", "--to", "disk"]), after);
        tally.note(&ending);
        if let Ending::Finished(out, took) = &ending {
            assert!(
                out.status.success(),
                "copy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            scale.learn(*took);
            // Start again from an empty copy, so that the next kill lands in a real run.
            for entry in std::fs::read_dir(&copy).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        if !copy.join("repo.json").exists() {
            // Killed before the copy became a repository: nothing to verify yet.
            assert_eq!(data_objects(&copy), Vec::<String>::new());
            continue;
        }
        let out = pgpitr(&env, &["verify", "--copy", "disk"]);
        assert!(
            out.status.success(),
            "verify of the copy after a kill at {after:?} ({}): {}",
            rng.replay(),
            text(&out)
        );
    }
    tally.report("copy");

    // The resume sends exactly what the copy lacks, each object once, verified.
    let before = data_objects(&copy);
    let resumed = copy_json(&env, &["--to", "disk"]);
    let after = data_objects(&copy);
    let sent = resumed["objects_sent"].as_u64().unwrap();
    assert_eq!(
        sent as usize,
        after.len() - before.len(),
        "sent {sent} objects, the copy gained {} ({})",
        after.len() - before.len(),
        rng.replay()
    );
    assert_eq!(resumed["objects_verified"], resumed["objects_sent"]);
    assert_eq!(
        after,
        data_objects(&probe),
        "the copy differs from a copy never killed"
    );
    let again = copy_json(&env, &["--to", "disk"]);
    assert_eq!(again["objects_sent"], 0, "{again}");
    assert!(again["objects_skipped"].as_u64().unwrap() > 0, "{again}");
    assert_eq!(again["backups_present"], serde_json::json!([second]));
    assert_eq!(again["backups_not_kept"], serde_json::json!([first]));
    pgpitr_ok(&env, &["verify", "--copy", "disk"]);

    // expire of the copy, by its own policy and under its own lock: nothing to expire.
    let expired: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &["expire", "--copy", "disk", "--json"])).unwrap();
    assert_eq!(
        expired["expired_backups"],
        serde_json::json!([]),
        "{expired}"
    );
    assert_eq!(expired["policy"], "keep-last 1", "{expired}");

    // The repository gone: a restore from the copy, whose server reads WAL from the copy.
    let (target, expected) = target_after_marker(&c, nth_marker(&c, 7));
    drop(c);
    let moved = repo.with_extension("moved");
    std::fs::rename(&repo, &moved).unwrap();
    let root = temp_dir("copy-restore");
    let data = root.path().join("data");
    pgpitr_ok(
        &env,
        &[
            "restore",
            "--from",
            "disk",
            "--target-time",
            &target,
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    let mut r = Cluster::adopt(15, root, data.clone());
    r.start();
    wait_promoted(&r);
    assert_eq!(
        r.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marker"),
        expected
    );
    assert_eq!(r.psql("SELECT count(*) FROM new_rows"), "250000");
    r.stop();

    // A segment missing from the middle of the copy's WAL: an error (202), never "not found".
    let mut segments: Vec<PathBuf> = files_under(&copy.join("wal"))
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.len() > 24
                && name.as_bytes()[24] == b'-'
                && !p.starts_with(copy.join("wal/history"))
        })
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    let middle = &segments[segments.len() / 2];
    let name = middle.file_name().unwrap().to_string_lossy()[..24].to_string();
    std::fs::remove_file(middle).unwrap();
    let _ = std::fs::remove_dir_all(data.join("pg_wal/pgpitr_spool"));
    let restore_cmd = |seg: &str| {
        Command::new(bin("pgpitr-restore"))
            .current_dir(&data)
            .env_remove("PGPITR_CONFIG")
            .envs(env.iter().cloned())
            .args(["--from", "disk", seg, "pg_wal/RECOVERYXLOG"])
            .output()
            .unwrap()
    };
    // The copy answers: its "not found" stands, nothing is looked for elsewhere.
    let _ = std::fs::remove_file(data.join("pg_wal/RECOVERYXLOG"));
    let out = restore_cmd(&name);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!data.join("pg_wal/RECOVERYXLOG").exists());
    std::fs::rename(&moved, &repo).unwrap();
}

#[test]
fn copy_to_a_second_bucket_and_restore_while_the_repository_is_unreachable() {
    let g = Garage::shared();
    let main_proxy = FaultProxy::start(&g.endpoint, 0.0);
    let copy_proxy = FaultProxy::start(&g.endpoint, 0.0);
    copy_proxy.record();
    main_proxy.record();
    let copy_bucket = g.bucket();
    let mut main_env = g.env(&g.bucket(), "prod");
    for (k, v) in main_env.iter_mut() {
        if k == "PGPITR_S3_ENDPOINT" {
            *v = main_proxy.endpoint();
        }
    }
    main_env.push(("PGPITR_S3_RETRIES".into(), "1".into()));
    let conf_dir = temp_dir("copy-conf-s3");
    let config = config_file(
        conf_dir.path(),
        &format!(
            "[[copy]]\nname = \"dr\"\nrepo = \"s3://{copy_bucket}/prod\"\ns3_endpoint = \"{}\"\ns3_storage_class = \"STANDARD_IA\"\nkeep_monthly = 24\n",
            copy_proxy.endpoint()
        ),
    );
    let env = with(&main_env, &[("PGPITR_CONFIG", config.to_str().unwrap())]);
    let c = archiving_cluster(main_env.clone(), "");
    create_markers(&c);
    load(&c, "rows");
    backup(&main_env, &c);
    add_markers(&c, 6);
    archive_everything(&c);

    let report = copy_json(&env, &[]);
    assert_eq!(report["name"], "dr");
    assert_eq!(report["initialized"], true);
    assert_eq!(
        report["backups_sent"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    assert!(report["wal_files_sent"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["objects_verified"], report["objects_sent"]);
    let again = copy_json(&env, &[]);
    assert_eq!(again["objects_sent"], 0, "{again}");
    pgpitr_ok(&env, &["verify", "--copy", "dr"]);

    // The copy's storage class on every object written to the copy, on none of the repository's.
    let class_of_writes = |p: &FaultProxy| -> Vec<Option<String>> {
        p.seen()
            .iter()
            .filter(|s| s.method == "PUT" && !s.target.contains("uploadId="))
            .map(|s| s.header("x-amz-storage-class").map(str::to_string))
            .collect()
    };
    let copy_writes = class_of_writes(&copy_proxy);
    assert!(copy_writes.len() > 5, "{copy_writes:?}");
    assert!(
        copy_writes
            .iter()
            .all(|c| c.as_deref() == Some("STANDARD_IA")),
        "{copy_writes:?}"
    );
    assert!(class_of_writes(&main_proxy).iter().all(Option::is_none));

    // The repository answers 500 to everything: plan and restore read the copy.
    let (target, expected) = target_after_marker(&c, nth_marker(&c, 4));
    drop(c);
    main_proxy.set_plan(1.0, &[Fault::InternalError]);
    let plan = pgpitr(&env, &["plan", "--target-time", &target]);
    assert!(plan.status.success(), "{}", text(&plan));
    assert!(
        String::from_utf8_lossy(&plan.stderr).contains("location main is unreachable"),
        "{}",
        text(&plan)
    );
    // Read alone, the repository is an error (no fall through from `--from main` without
    // another location: here there is one, so main alone is checked without the copy).
    let alone = pgpitr(&main_env, &["plan", "--target-time", &target]);
    assert!(!alone.status.success(), "{}", text(&alone));
    let root = temp_dir("copy-restore-s3");
    let data = root.path().join("data");
    pgpitr_ok(
        &env,
        &[
            "restore",
            "--target-time",
            &target,
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    let written = std::fs::read_to_string(data.join("pgpitr-restore.toml")).unwrap();
    assert!(written.contains(&copy_bucket), "{written}");
    let mut r = Cluster::adopt(15, root, data);
    r.env = env
        .iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .cloned()
        .collect();
    r.start();
    wait_promoted(&r);
    assert_eq!(
        r.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marker"),
        expected
    );
    assert_eq!(r.psql("SELECT count(*) FROM rows"), "250000");
}

#[test]
fn archive_to_copies_stores_every_wal_file_in_every_location_or_fails() {
    let (_main_dir, repo) = local_repo();
    let (_copy_dir, copy) = local_repo();
    let conf_dir = temp_dir("copy-conf-sync");
    let config = config_file(
        conf_dir.path(),
        &format!(
            "archive_to_copies = true\n[[copy]]\nname = \"disk\"\nrepo = \"{}\"\n",
            copy.display()
        ),
    );
    let env: Env = vec![
        ("PGPITR_REPO".into(), repo.display().to_string()),
        ("PGPITR_CONFIG".into(), config.display().to_string()),
    ];
    let c = archiving_cluster(env.clone(), "");
    archive_everything(&c);
    let wal = |root: &Path| -> Vec<String> {
        data_objects(root)
            .into_iter()
            .filter(|k| k.starts_with("wal/"))
            .collect()
    };
    assert!(!wal(&repo).is_empty());
    assert_eq!(wal(&repo), wal(&copy));
    assert_eq!(
        std::fs::read(repo.join("repo.json")).unwrap(),
        std::fs::read(copy.join("repo.json")).unwrap()
    );

    // The copy cannot take the next segment: archiving of it fails (PostgreSQL keeps it and
    // retries), it is not reported archived, although the repository holds it.
    let log_dir = files_under(&copy.join("wal"))
        .into_iter()
        .find(|p| !p.starts_with(copy.join("wal/history")))
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    pgpitr_tests::set_mode(&log_dir, 0o500);
    c.psql("SELECT pg_logical_emit_message(false, 'pgpitr-test', 'switch')");
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    assert!(
        c.wait_for("SELECT failed_count > 0 FROM pg_stat_archiver", "t", 120),
        "{}",
        c.log()
    );
    assert_ne!(
        c.psql("SELECT last_archived_wal FROM pg_stat_archiver"),
        seg
    );
    assert!(wal(&repo).iter().any(|k| k.contains(&seg)));
    assert!(!wal(&copy).iter().any(|k| k.contains(&seg)));
    pgpitr_tests::set_mode(&log_dir, 0o700);
    // A new segment wakes the archiver, which archives the failed one first.
    archive_everything(&c);
    assert!(wal(&copy).iter().any(|k| k.contains(&seg)));
    assert_eq!(wal(&repo), wal(&copy));
}

#[test]
fn an_encrypted_repository_is_copied_sealed_and_restores_from_the_copy() {
    let (_main_dir, repo) = local_repo();
    let (_copy_dir, copy) = local_repo();
    let secrets = temp_dir("copy-secrets");
    give_to_pg_user(secrets.path());
    let passphrase = passphrase_file(secrets.path(), "passphrase", "copy passphrase");
    let config = config_file(
        secrets.path(),
        &format!("[[copy]]\nname = \"disk\"\nrepo = \"{}\"\n", copy.display()),
    );
    let main_env = with_passphrase(&repo_env(&repo), &passphrase);
    let env = with(&main_env, &[("PGPITR_CONFIG", config.to_str().unwrap())]);
    pgpitr_ok(&main_env, &["key", "create"]);
    let c = archiving_cluster(main_env.clone(), "");
    create_markers(&c);
    backup(&main_env, &c);
    add_markers(&c, 4);
    archive_everything(&c);
    let report = copy_json(&env, &[]);
    assert_eq!(
        report["backups_sent"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    // Objects as stored: the same bytes under the same keys, key slots included.
    for key in data_objects(&copy).into_iter().chain(
        files_under(&copy.join("keys"))
            .into_iter()
            .map(|p| p.strip_prefix(&copy).unwrap().display().to_string()),
    ) {
        assert_eq!(
            std::fs::read(copy.join(&key)).unwrap(),
            std::fs::read(repo.join(&key)).unwrap(),
            "{key}"
        );
    }
    assert!(!files_under(&copy.join("keys")).is_empty());
    pgpitr_ok(&env, &["verify", "--copy", "disk"]);

    let (target, expected) = target_after_marker(&c, nth_marker(&c, 2));
    drop(c);
    let root = temp_dir("copy-restore-enc");
    let data = root.path().join("data");
    pgpitr_ok(
        &env,
        &[
            "restore",
            "--from",
            "disk",
            "--target-time",
            &target,
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    let mut r = Cluster::adopt(15, root, data);
    r.start();
    wait_promoted(&r);
    assert_eq!(
        r.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marker"),
        expected
    );
}
