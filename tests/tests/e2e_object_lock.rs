//! Issue 19 item 4: `s3_object_lock`, immutability against a writer holding the bucket's
//! credentials. Garage has no Object Lock, so these tests run against moto's S3 server
//! (`pgpitr_tests::moto`), one per test, with buckets created with Object Lock enabled:
//!
//! - the storage layer locks what pgpitr writes once (a single PUT and a multipart upload) and
//!   never the mutable objects, refuses to delete a locked object, extends locks without ever
//!   shortening them, deletes unlocked objects with all their versions, and `check_writable`
//!   refuses a bucket without Object Lock or with a default retention;
//! - a PostgreSQL 15 cluster archives and is backed up into a compliance-locked repository,
//!   through a recording proxy: every PutObject and CreateMultipartUpload asks for the lock,
//!   except those of mutable objects (locks, `repo.json`), which ask for none;
//!   `expire` keeps a backup it would delete while its manifests are locked (reported as
//!   retained, in text and JSON) and deletes it, every version, once the locks end; an attacker
//!   with the credentials cannot delete a locked WAL file, pack or manifest by version id (even
//!   with the governance bypass), while a plain DELETE or an overwrite only hides it behind a
//!   newer version, which the documented recovery removes; a point-in-time restore from the
//!   attacked backup then works.
//! - the same with an encrypted repository: every sealed object is locked, key slots never are,
//!   so a passphrase is rotated (`key add`, `key remove`) under compliance mode, and a
//!   point-in-time restore with the new passphrase gives exactly the marker rows before its
//!   target.

use std::time::Duration;

use aws_sdk_s3::types::{ObjectLockConfiguration, ObjectLockEnabled, ObjectLockMode};
use bytes::Bytes;
use pgpitr::repo::layout;
use pgpitr::storage::{DynStorage, PutMode};
use pgpitr_tests::cli::{
    archiving_cluster, conninfo, passphrase_file, pgpitr, pgpitr_ok, text, with_passphrase, Env,
};
use pgpitr_tests::fault_proxy::{FaultProxy, Seen};
use pgpitr_tests::moto::Moto;
use pgpitr_tests::pitr::{
    add_markers, archive_everything, backup, create_markers, marker_ids, restore_and_start,
};
use pgpitr_tests::{runtime, storage_of};

const PREFIX: &str = "db";

/// The environment of `bucket` locked in `mode`, a new object locked for `within`.
fn locked_env(m: &Moto, bucket: &str, mode: &str, within: &str) -> Env {
    let mut env = m.env(bucket, PREFIX);
    env.push(("PGPITR_S3_OBJECT_LOCK".into(), mode.into()));
    env.push(("PGPITR_KEEP_WITHIN".into(), within.into()));
    env
}

/// `env` reaching S3 through `proxy` instead of directly.
fn through(proxy: &FaultProxy, mut env: Env) -> Env {
    for (k, v) in env.iter_mut() {
        if k == "PGPITR_S3_ENDPOINT" {
            *v = proxy.endpoint();
        }
    }
    env
}

/// Every version id (objects and delete markers) of `key` under the prefix, oldest last.
async fn versions(m: &Moto, bucket: &str, key: &str) -> (Vec<String>, Vec<String>) {
    let full = format!("{PREFIX}/{key}");
    let out = m
        .client()
        .list_object_versions()
        .bucket(bucket)
        .prefix(&full)
        .send()
        .await
        .unwrap();
    let ours = |k: Option<&str>| k == Some(full.as_str());
    (
        out.versions()
            .iter()
            .filter(|v| ours(v.key()))
            .map(|v| v.version_id().unwrap().to_string())
            .collect(),
        out.delete_markers()
            .iter()
            .filter(|v| ours(v.key()))
            .map(|v| v.version_id().unwrap().to_string())
            .collect(),
    )
}

/// The lock mode and retain-until date of the current version of `key`.
async fn lock_of(
    m: &Moto,
    bucket: &str,
    key: &str,
) -> (Option<ObjectLockMode>, Option<jiff::Timestamp>) {
    let head = m
        .client()
        .head_object()
        .bucket(bucket)
        .key(format!("{PREFIX}/{key}"))
        .send()
        .await
        .unwrap();
    (
        head.object_lock_mode().cloned(),
        head.object_lock_retain_until_date()
            .map(|t| jiff::Timestamp::from_second(t.secs()).unwrap()),
    )
}

fn after(d: Duration) -> jiff::Timestamp {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::try_from(d).unwrap())
        .unwrap()
}

#[test]
fn storage_locks_what_is_written_once_and_never_the_mutable_objects() {
    let m = Moto::start();
    let rt = runtime();
    rt.block_on(async {
        m.bucket("locked", true).await;
        m.bucket("unlocked", false).await;
        m.bucket("defaulted", true).await;
        m.client()
            .put_object_lock_configuration()
            .bucket("defaulted")
            .object_lock_configuration(
                ObjectLockConfiguration::builder()
                    .object_lock_enabled(ObjectLockEnabled::Enabled)
                    .rule(
                        aws_sdk_s3::types::ObjectLockRule::builder()
                            .default_retention(
                                aws_sdk_s3::types::DefaultRetention::builder()
                                    .mode(aws_sdk_s3::types::ObjectLockRetentionMode::Governance)
                                    .days(1)
                                    .build(),
                            )
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
    });

    // A bucket without Object Lock, or with a default retention, is refused clearly.
    for (bucket, want) in [
        ("unlocked", "has no Object Lock enabled"),
        ("defaulted", "default Object Lock retention"),
    ] {
        let env = locked_env(&m, bucket, "governance", "10m");
        let s = storage_of(&env);
        let e = rt.block_on(s.check_writable()).unwrap_err().to_string();
        assert!(e.contains(want) && !e.contains('\n'), "{bucket}: {e}");
        // `pgpitr check` fails its storage row with the same words.
        let out = pgpitr(&env, &["check", "--json"]);
        assert!(!out.status.success(), "{}", text(&out));
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let row = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "storage")
            .unwrap();
        assert!(
            row["ok"] == false && row["detail"].as_str().unwrap().contains(want),
            "{row}"
        );
    }

    let s: DynStorage = storage_of(&locked_env(&m, "locked", "governance", "10m"));
    rt.block_on(s.check_writable()).unwrap();
    let lock = s.object_lock().expect("configured");
    assert_eq!(lock.retain, Duration::from_secs(600));

    let wal = format!(
        "wal/0000000100000000/000000010000000000000001-{}.lz4",
        "ab".repeat(32)
    );
    let pack = format!("packs/cd/{}.pack", "cd".repeat(16));
    let mutable = "locks/1-2-3.lock";
    let earliest = after(Duration::from_secs(599));
    rt.block_on(async {
        s.put(&wal, Bytes::from_static(b"wal"), PutMode::Create)
            .await
            .unwrap();
        // Above the multipart threshold.
        let big = Bytes::from(vec![7u8; pgpitr::storage::s3::MULTIPART_THRESHOLD + 1]);
        s.put(&pack, big, PutMode::Create).await.unwrap();
        s.put(mutable, Bytes::from_static(b"lock"), PutMode::Overwrite)
            .await
            .unwrap();
        s.put(mutable, Bytes::from_static(b"beat"), PutMode::Overwrite)
            .await
            .unwrap();
    });
    let latest = after(Duration::from_secs(601));
    for key in [&wal, &pack] {
        let (mode, until) = rt.block_on(lock_of(&m, "locked", key));
        assert_eq!(mode, Some(ObjectLockMode::Governance), "{key}");
        let until = until.unwrap();
        assert!(until >= earliest && until <= latest, "{key}: {until}");
        assert_eq!(rt.block_on(s.locked_until(key)).unwrap(), Some(until));
        // Refused while locked, and still there.
        let e = rt.block_on(s.delete(key)).unwrap_err().to_string();
        assert!(e.contains("Object Lock"), "{e}");
        assert!(rt.block_on(s.head(key)).unwrap().is_some(), "{key}");
    }
    assert_eq!(rt.block_on(lock_of(&m, "locked", mutable)), (None, None));
    assert_eq!(rt.block_on(s.locked_until(mutable)).unwrap(), None);
    // A mutable object is deleted with every version: nothing is left taking space.
    assert_eq!(rt.block_on(versions(&m, "locked", mutable)).0.len(), 2);
    rt.block_on(s.delete(mutable)).unwrap();
    assert_eq!(
        rt.block_on(versions(&m, "locked", mutable)),
        (vec![], vec![])
    );
    // Mutable keys are never locked, not even on request.
    rt.block_on(s.put(mutable, Bytes::from_static(b"x"), PutMode::Overwrite))
        .unwrap();
    assert!(!rt
        .block_on(s.extend_lock(mutable, after(Duration::from_secs(3600))))
        .unwrap());
    assert_eq!(rt.block_on(lock_of(&m, "locked", mutable)), (None, None));

    // Extended, never shortened.
    let (_, before) = rt.block_on(lock_of(&m, "locked", &wal));
    let later = after(Duration::from_secs(1200));
    assert!(rt.block_on(s.extend_lock(&wal, later)).unwrap());
    let (mode, extended) = rt.block_on(lock_of(&m, "locked", &wal));
    assert_eq!(mode, Some(ObjectLockMode::Governance));
    assert!(extended.unwrap() >= later && extended > before);
    assert!(!rt
        .block_on(s.extend_lock(&wal, after(Duration::from_secs(60))))
        .unwrap());
    assert_eq!(rt.block_on(lock_of(&m, "locked", &wal)).1, extended);
    // A missing object is no error.
    assert!(!rt
        .block_on(s.extend_lock("packs/ee/nothing.idx", later))
        .unwrap());
}

/// Every PutObject and CreateMultipartUpload in `seen` asked for a compliance lock, except those
/// of mutable keys, which asked for none; objects under each of `roots` were among them.
fn assert_every_write_locked_but_the_mutable_ones(seen: &[Seen], roots: &[&str]) {
    let mut kinds = std::collections::BTreeMap::new();
    for r in seen {
        let (path, query) = r.target.split_once('?').unwrap_or((&r.target, ""));
        let create_upload = r.method == "POST" && query.split('&').any(|q| q == "uploads");
        let put_object = r.method == "PUT"
            && !query.contains("uploadId=")
            && !query.split('&').any(|q| q == "retention");
        if !(create_upload || put_object) {
            continue;
        }
        let key = path.strip_prefix(&format!("/repo/{PREFIX}/")).unwrap();
        let locked = (
            r.header("x-amz-object-lock-mode"),
            r.header("x-amz-object-lock-retain-until-date").is_some(),
        );
        if layout::is_mutable(key) {
            assert_eq!(locked, (None, false), "{} {key}", r.method);
        } else {
            assert_eq!(locked, (Some("COMPLIANCE"), true), "{} {key}", r.method);
        }
        *kinds
            .entry(key.split('/').next().unwrap().to_string())
            .or_insert(0) += 1;
    }
    for kind in roots {
        assert!(
            kinds.contains_key(*kind),
            "no write under {kind}/: {kinds:?}"
        );
    }
}

/// Polls (at most `limit`) until no lock of `keys` is in force any more.
fn wait_unlocked(s: &DynStorage, keys: &[String], limit: Duration) {
    let rt = runtime();
    let deadline = std::time::Instant::now() + limit;
    for key in keys {
        while let Some(until) = rt.block_on(s.locked_until(key)).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "{key} still locked until {until}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn expire_retains_locked_backups_an_attacker_cannot_delete_and_a_restore_works() {
    let m = Moto::start();
    let rt = runtime();
    rt.block_on(m.bucket("repo", true));
    // pgpitr reaches moto through a recording proxy; the attacker goes straight to moto.
    let proxy = FaultProxy::start(&m.endpoint, 0.0);
    proxy.record();
    let env = through(&proxy, locked_env(&m, "repo", "compliance", "150s"));
    let s = storage_of(&env);

    let c = archiving_cluster(env.clone(), "");
    create_markers(&c);
    add_markers(&c, 3);
    let a = backup(&env, &c);
    add_markers(&c, 3);
    c.psql("SELECT pg_create_restore_point('between')");
    let before_b = marker_ids(&c, None);
    add_markers(&c, 2);
    archive_everything(&c);
    // Backup B reuses A's packs: it extends their locks (PutObjectRetention) before its commit.
    let reused: Vec<String> = rt
        .block_on(s.list("packs/"))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(!reused.is_empty());
    let mut seen = proxy.seen();
    proxy.record();
    // Locks end on whole seconds (rounded up): a backup B within a second of A's packs would
    // need them locked no longer than they are, and rightly extend nothing.
    std::thread::sleep(Duration::from_secs(2));
    let b = backup(&env, &c);
    let extended: Vec<String> = proxy
        .seen()
        .iter()
        .filter(|r| r.method == "PUT" && r.target.contains("?retention"))
        .map(|r| r.target.split_once('?').unwrap().0.to_string())
        .collect();
    for key in &reused {
        assert!(
            extended.contains(&format!("/repo/{PREFIX}/{key}")),
            "{key} not extended by backup B: {extended:?}"
        );
    }
    archive_everything(&c);
    seen.extend(proxy.seen());
    assert_every_write_locked_but_the_mutable_ones(&seen, &["wal", "packs", "backups", "locks"]);

    // `pgpitr check` reports the lock. (Its archiving check switches WAL, which does nothing
    // at the very start of a segment: write something first.)
    add_markers(&c, 1);
    let mut check_env = env.clone();
    check_env.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    let checks: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&check_env, &["check", "--json"])).unwrap();
    let row = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "object lock")
        .unwrap_or_else(|| panic!("no object lock row: {checks}"));
    assert!(
        row["ok"] == true && row["detail"].as_str().unwrap().contains("compliance"),
        "{row}"
    );

    // The policy lets backup A go, its lock does not: retained, whole, in text and JSON.
    // (`--keep-within 0s` overrides the configuration's 150s; within counts whole seconds.)
    std::thread::sleep(Duration::from_secs(2));
    let policy = ["expire", "--keep-last", "1", "--keep-within", "0s"];
    let dry = pgpitr_ok(&env, &[&policy[..], &["--dry-run"]].concat());
    assert!(
        dry.contains("retained by Object Lock: 1 backup(s)"),
        "{dry}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &[&policy[..], &["--json"]].concat())).unwrap();
    assert_eq!(report["locked_backups"], 1, "{report}");
    assert_eq!(report["expired_backups"], serde_json::json!([]), "{report}");
    let reasons = report["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == a.as_str())
        .unwrap()["reasons"]
        .to_string();
    assert!(reasons.contains("under Object Lock until"), "{reasons}");
    let a_manifest = format!("backups/{a}/manifest.json");
    assert!(rt.block_on(s.head(&a_manifest)).unwrap().is_some());

    // The attacker, with the bucket's credentials: A's first WAL segment (named by its backup
    // history file, the first one archived), a pack, A's manifest.
    let wal = rt.block_on(s.list("wal/0000000100000000/")).unwrap();
    let backup_file = wal.iter().find(|o| o.key.contains(".backup-")).unwrap();
    let segment = &backup_file.key["wal/0000000100000000/".len()..][..24];
    let wal_of_a = wal
        .iter()
        .map(|o| o.key.clone())
        .find(|k| k.starts_with(&format!("wal/0000000100000000/{segment}-")))
        .unwrap();
    let pack = rt
        .block_on(s.list("packs/"))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .find(|k| k.ends_with(".pack"))
        .unwrap();
    let client = m.client();
    // Locked long enough for what follows on a slow machine, whatever the backups took.
    for key in [&wal_of_a, &pack, &a_manifest] {
        rt.block_on(s.extend_lock(key, after(Duration::from_secs(150))))
            .unwrap();
    }
    for key in [&wal_of_a, &pack, &a_manifest] {
        let full = format!("{PREFIX}/{key}");
        let (ids, markers) = rt.block_on(versions(&m, "repo", key));
        assert_eq!((ids.len(), markers.len()), (1, 0), "{key}");
        let original = ids[0].clone();
        for bypass in [false, true] {
            let refused = rt.block_on(
                client
                    .delete_object()
                    .bucket("repo")
                    .key(&full)
                    .version_id(&original)
                    .bypass_governance_retention(bypass)
                    .send(),
            );
            assert!(
                refused.is_err(),
                "{key}: deleting the locked version worked"
            );
        }
        // A plain DELETE and an overwrite succeed in a versioned bucket, but only hide the
        // locked version behind newer ones.
        rt.block_on(client.delete_object().bucket("repo").key(&full).send())
            .unwrap();
        rt.block_on(
            client
                .put_object()
                .bucket("repo")
                .key(&full)
                .body(Bytes::from_static(b"ransom").into())
                .send(),
        )
        .unwrap();
        let (ids, markers) = rt.block_on(versions(&m, "repo", key));
        assert!(ids.contains(&original) && markers.len() == 1, "{key}");
        // The recovery (docs/operations.md, "Immutable backups"): remove every version newer
        // than the locked one, delete markers included; none of them is locked.
        for id in ids.iter().filter(|v| **v != original).chain(&markers) {
            rt.block_on(
                client
                    .delete_object()
                    .bucket("repo")
                    .key(&full)
                    .version_id(id)
                    .send(),
            )
            .unwrap();
        }
        assert_eq!(
            rt.block_on(versions(&m, "repo", key)),
            (vec![original], vec![])
        );
    }

    // A point-in-time restore from the attacked backup A.
    let (r, report) = restore_and_start(15, &env, &["--target-name", "between"], &[], &env);
    assert!(report.contains(&format!("restored backup {a}")), "{report}");
    assert_eq!(marker_ids(&r, None), before_b);
    drop(r);
    drop(c);
    // Recovery is over: end the restore's lease, which would hold A back.
    pgpitr_ok(&env, &["unlock", "--leases"]);

    // Once its locks end, a later expire deletes A, every version of its manifests.
    let a_keys = [a_manifest.clone(), format!("backups/{a}/backup_manifest")];
    wait_unlocked(&s, &a_keys, Duration::from_secs(300));
    let report: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &[&policy[..], &["--json"]].concat())).unwrap();
    assert_eq!(
        report["expired_backups"],
        serde_json::json!([a]),
        "{report}"
    );
    assert_eq!(report["locked_backups"], 0, "{report}");
    for key in &a_keys {
        assert_eq!(rt.block_on(versions(&m, "repo", key)), (vec![], vec![]));
    }
    assert!(rt
        .block_on(s.head(&format!("backups/{b}/manifest.json")))
        .unwrap()
        .is_some());

    // A policy that now promises more extends the kept backup's locks (never shortens).
    let (_, before) = rt.block_on(lock_of(&m, "repo", &format!("backups/{b}/manifest.json")));
    let out = pgpitr(&env, &["expire", "--keep-within", "1h", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["locks_extended"].as_u64().unwrap() >= 3, "{report}");
    let (_, extended) = rt.block_on(lock_of(&m, "repo", &format!("backups/{b}/manifest.json")));
    assert!(
        extended.unwrap() >= after(Duration::from_secs(3500)) && extended > before,
        "{extended:?}"
    );
}

/// An encrypted repository under compliance-mode Object Lock: the sealed objects are locked like
/// plain ones, the key slots are not, so rotation works, and a restore with the new passphrase
/// is exact.
#[test]
fn an_encrypted_repository_is_locked_but_its_key_slots_rotate() {
    let m = Moto::start();
    let rt = runtime();
    rt.block_on(m.bucket("repo", true));
    let proxy = FaultProxy::start(&m.endpoint, 0.0);
    proxy.record();
    let secrets = pgpitr_tests::temp_dir("lock-secrets");
    let old = passphrase_file(secrets.path(), "old", "the first passphrase");
    let new = passphrase_file(secrets.path(), "new", "the passphrase after rotation");
    let locked = through(&proxy, locked_env(&m, "repo", "compliance", "10m"));
    let env = with_passphrase(&locked, &old);
    pgpitr_ok(&env, &["key", "create"]);

    let c = archiving_cluster(env.clone(), "");
    create_markers(&c);
    add_markers(&c, 2);
    backup(&env, &c);
    add_markers(&c, 2);
    c.psql("SELECT pg_create_restore_point('rotated')");
    let expected = marker_ids(&c, None);
    add_markers(&c, 2);
    archive_everything(&c);
    // The key slot was written unlocked, everything else locked; the objects are sealed.
    let roots = ["wal", "packs", "backups", "restore-points", "keys"];
    assert_every_write_locked_but_the_mutable_ones(&proxy.seen(), &roots);
    let (client, wal) = (m.client(), format!("{PREFIX}/wal/0000000100000000/"));
    let stored = rt.block_on(async {
        let listed = client
            .list_objects_v2()
            .bucket("repo")
            .prefix(&wal)
            .send()
            .await
            .unwrap();
        let key = listed.contents()[0].key().unwrap().to_string();
        let object = client
            .get_object()
            .bucket("repo")
            .key(&key)
            .send()
            .await
            .unwrap();
        object.body.collect().await.unwrap().into_bytes()
    });
    assert!(stored.starts_with(b"PGPITRE"));

    // Rotation under compliance mode: slots are mutable, never locked.
    let new_file = new.to_str().unwrap();
    pgpitr_ok(&env, &["key", "add", "--new-passphrase-file", new_file]);
    let slots: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &["key", "list", "--json"])).unwrap();
    let old_slot = slots
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["configured"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let new_env = with_passphrase(&locked, &new);
    pgpitr_ok(&new_env, &["key", "remove", &old_slot]);
    let out = pgpitr(&env, &["list"]);
    assert!(
        !out.status.success(),
        "the old passphrase still opens: {}",
        text(&out)
    );

    let (r, _) = restore_and_start(15, &new_env, &["--target-name", "rotated"], &[], &new_env);
    assert_eq!(marker_ids(&r, None), expected);
}
