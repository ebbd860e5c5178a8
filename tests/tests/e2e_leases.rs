//! End to end (issue 15, items 4 and 6), on a PostgreSQL 15 cluster archiving through
//! `pgpitr-archive` into a local repository:
//!
//! - a backup whose lock is removed (`pgpitr unlock --force`) before its commit point fails
//!   with "lost" and leaves no `manifest.json`;
//! - `pgpitr restore` leaves a lease; `list` shows it; `expire --keep-last 1` then keeps the
//!   leased (older) backup and its WAL, says so, and the restored cluster recovers and holds the
//!   rows of that backup; `pgpitr unlock --leases` ends the lease and the next expire removes it;
//! - an unscoped lease (a restore still choosing its backup) makes expire delete nothing;
//! - a lease that appears while expire deletes stops it before its next batch;
//! - an expire whose lock is removed while it deletes stops before its next batch;
//! - `pgpitr verify` passes after each interruption;
//! - on Garage: the storage's clock (Last-Modified), `.beat` objects, a lock removed under its
//!   heartbeat staying removed, and a lease's scope.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pgpitr::repo::layout;
use pgpitr::repo::lease::Lease;
use pgpitr::repo::manifest::BackupManifest;
use pgpitr_tests::cli::{archiving_cluster, conninfo, pgpitr_cmd, pgpitr_ok, text, Env};
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::{give_to_pg_user, runtime, storage_of, temp_dir, PG_USER};

/// Waits for `child` to fail; returns its output.
fn fails(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "should have failed: {all}");
    all
}

fn manifests(repo: &Path) -> Vec<BackupManifest> {
    let mut out: Vec<BackupManifest> = std::fs::read_dir(repo.join("backups"))
        .map(|d| {
            d.filter_map(|e| {
                let p = e.ok()?.path().join("manifest.json");
                Some(serde_json::from_slice(&std::fs::read(p).ok()?).unwrap())
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a: &BackupManifest, b| a.id.cmp(&b.id));
    out
}

fn ids(repo: &Path) -> Vec<String> {
    manifests(repo).iter().map(|m| m.id.0.clone()).collect()
}

fn count_files(dir: PathBuf) -> usize {
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(p)
            } else {
                1
            }
        })
        .sum()
}

/// Every file under `dir/sub`, as keys relative to `dir`, sorted.
fn keys(dir: &Path, sub: &str) -> Vec<String> {
    fn walk(p: PathBuf, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(&p) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir.join(sub), &mut files);
    let mut out: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn wait_until(what: &str, child: &mut Child, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        assert!(child.try_wait().unwrap().is_none(), "ended before: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rows, a few WAL segments, then a backup; returns its id.
fn rows_then_backup(env: &Env, c: &Cluster, from: i64, to: i64) -> String {
    c.psql(&format!(
        "INSERT INTO t SELECT g FROM generate_series({from}, {to}) g"
    ));
    for _ in 0..3 {
        c.psql("INSERT INTO t SELECT -1 FROM generate_series(1, 10)");
        c.psql("DELETE FROM t WHERE i = -1");
        c.psql("SELECT pg_switch_wal()");
    }
    let mut env = env.clone();
    env.push(("PGPITR_CONNINFO".into(), conninfo(c)));
    let id = pgpitr_ok(&env, &["backup", "--checkpoint", "fast"])
        .trim()
        .to_string();
    // Its `.backup` history file too, so that listings taken next are complete.
    c.wait_archive_idle();
    id
}

/// A lease as `pgpitr restore` writes it first (unscoped), taken by this process.
fn take_lease(env: &Env) -> Lease {
    let storage = storage_of(env);
    runtime()
        .block_on(Lease::take(storage, Path::new("/nowhere")))
        .unwrap()
}

#[test]
fn leases_keep_what_a_restore_needs_and_lost_locks_stop_commits() {
    let repo_dir = temp_dir("repo");
    let repo = repo_dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    let env: Env = vec![("PGPITR_REPO".into(), repo.display().to_string())];
    let c = archiving_cluster(env.clone(), "");
    c.psql("CREATE TABLE t (i int)");
    let b1 = rows_then_backup(&env, &c, 1, 100);
    let b2 = rows_then_backup(&env, &c, 101, 200);
    assert_eq!(ids(&repo), [b1.clone(), b2.clone()]);

    // 1. A backup whose lock is removed before its commit point: refused, no manifest.
    let mut benv = env.clone();
    benv.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    let mut backup = pgpitr_cmd(
        &benv,
        &[
            "backup",
            "--checkpoint",
            "fast",
            "--commit-delay-ms",
            "8000",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let known = count_files(repo.join("backups"));
    // PostgreSQL's backup_manifest is stored just before the wait for WAL and the commit.
    wait_until("the third backup's backup_manifest", &mut backup, || {
        count_files(repo.join("backups")) > known
    });
    let out = pgpitr_ok(&env, &["unlock", "--force"]);
    assert!(out.contains("broke live lock"), "{out}");
    let all = fails(backup);
    assert!(
        all.contains("repository lock") && all.contains("was lost"),
        "{all}"
    );
    assert_eq!(ids(&repo), [b1.clone(), b2.clone()]);
    pgpitr_ok(&env, &["verify"]);

    // 2. Restore the older backup: it leaves a lease for the recovery.
    c.psql("INSERT INTO t SELECT g FROM generate_series(201, 300) g");
    c.psql("SELECT pg_switch_wal()");
    let root = temp_dir("restore");
    let data = root.path().join("data");
    let out = pgpitr_ok(
        &env,
        &[
            "restore",
            "--target",
            "immediate",
            "--backup",
            &b1,
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    assert!(out.contains("lease: leases/"), "{out}");
    assert_eq!(count_files(repo.join("leases")), 1);
    let listing = pgpitr_ok(&env, &["list"]);
    assert!(
        listing.contains("leases (expire keeps what they hold)")
            && listing.contains(&format!("backup {b1}")),
        "{listing}"
    );

    // 3. expire --keep-last 1 keeps the leased backup and the WAL from its start; the restored
    //    cluster then recovers with the WAL it needs.
    c.wait_archive_idle();
    let wal_before = keys(&repo, "wal");
    let first = &manifests(&repo)[0];
    let b1_start = pgpitr::pg::WalSegmentName::containing(
        first.start_timeline,
        first.start_lsn,
        first.wal_segment_size,
    )
    .to_string();
    let file_of = |k: &str| k.rsplit('/').next().unwrap().to_string();
    // What the restored backup's recovery reads: everything from its start (one timeline, so
    // names order like positions). WAL before it may go, as without the lease.
    let needed: Vec<String> = wal_before
        .iter()
        .filter(|k| file_of(k) >= b1_start || k.contains("history"))
        .cloned()
        .collect();
    let report: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &[
            "expire",
            "--keep-last",
            "1",
            "--pack-min-age",
            "0s",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(report["expired_backups"], serde_json::json!([]), "{report}");
    assert_eq!(report["leases"].as_array().unwrap().len(), 1, "{report}");
    let reasons = report["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == b1.as_str())
        .unwrap()["reasons"]
        .to_string();
    assert!(reasons.contains("leased by a restore"), "{report}");
    assert_eq!(ids(&repo), [b1.clone(), b2.clone()]);
    assert_eq!(keys(&repo, "wal"), needed);
    let text_out = pgpitr_ok(&env, &["expire", "--keep-last", "1", "--dry-run"]);
    assert!(
        text_out.contains("held back by lease leases/"),
        "{text_out}"
    );
    {
        let mut restored = Cluster::adopt(15, root, data);
        restored.start();
        assert!(
            restored.wait_for("SELECT pg_is_in_recovery()", "f", 300),
            "the restore of {b1} did not finish recovery:\n{}",
            restored.log()
        );
        assert_eq!(restored.psql("SELECT count(*) FROM t").trim(), "100");
    }

    // 4. An unscoped lease (a restore choosing its backup): expire deletes nothing.
    let out = pgpitr_ok(&env, &["unlock", "--leases"]);
    assert!(out.contains("removed lease leases/"), "{out}");
    assert_eq!(count_files(repo.join("leases")), 0);
    let unscoped = take_lease(&env);
    let out = pgpitr_ok(
        &env,
        &["expire", "--keep-last", "1", "--pack-min-age", "0s"],
    );
    assert!(
        out.contains("nothing deleted") && out.contains(unscoped.key()),
        "{out}"
    );
    assert_eq!(ids(&repo), [b1.clone(), b2.clone()]);
    assert_eq!(keys(&repo, "wal"), needed);
    runtime().block_on(unscoped.remove());

    // 5. A lease taken while expire deletes (one object per batch, slowly): it stops.
    let expire_slowly = [
        "expire",
        "--keep-last",
        "1",
        "--pack-min-age",
        "0s",
        "--delete-batch",
        "1",
        "--delete-delay-ms",
        "1000",
    ];
    let mut expire = pgpitr_cmd(&env, &expire_slowly)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("expire deleting", &mut expire, || ids(&repo).len() == 1);
    let late = take_lease(&env);
    let all = fails(expire);
    assert!(
        all.contains("took the lease") && all.contains(late.key()),
        "{all}"
    );
    let wal_left = count_files(repo.join("wal"));
    assert!(wal_left > 0);
    runtime().block_on(late.remove());
    pgpitr_ok(&env, &["verify"]);

    // 6. An expire whose lock is removed while it deletes: it stops before its next batch.
    let mut expire = pgpitr_cmd(&env, &expire_slowly)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("expire deleting again", &mut expire, || {
        count_files(repo.join("wal")) < wal_left
    });
    let out = pgpitr_ok(&env, &["unlock", "--force"]);
    assert!(out.contains("broke live lock"), "{out}");
    let all = fails(expire);
    assert!(all.contains("was lost"), "{all}");
    pgpitr_ok(&env, &["verify"]);
    // And undisturbed, the next one finishes.
    pgpitr_ok(
        &env,
        &["expire", "--keep-last", "1", "--pack-min-age", "0s"],
    );
    assert_eq!(ids(&repo), [b2]);
    assert_eq!(count_files(repo.join(layout::LOCKS_ROOT)), 0);
    pgpitr_ok(&env, &["verify"]);
}

/// On Garage (S3): the storage's clock comes from Last-Modified and leaves no object behind;
/// the heartbeat writes `.beat` objects and never brings back a lock removed under it; a
/// restore's lease is listed and held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_clock_heartbeat_and_leases_on_garage() {
    use pgpitr::repo::lock::{self, LockError, RepoLock};
    use pgpitr::repo::{lease, lease::LeaseScope};
    use pgpitr_tests::garage::{self, Garage};
    let g = Garage::shared();
    let bucket = g.bucket();
    std::env::set_var("AWS_ACCESS_KEY_ID", garage::KEY_ID);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", garage::SECRET);
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let env: Env = g
        .env(&bucket, "leasetest")
        .into_iter()
        .filter(|(k, _)| k.starts_with("PGPITR_"))
        .collect();
    let config = pgpitr::config::Config::from_parts(None, None, &env).unwrap();
    let storage = config.storage().await.unwrap();

    let before = jiff::Timestamp::now();
    let now = lock::storage_now(storage.as_ref()).await.unwrap();
    // Garage runs on this host: its clock is ours, to the second (Last-Modified is in seconds).
    assert!(
        now.duration_since(before).abs().as_secs() <= 10,
        "{before} vs {now}"
    );
    assert!(storage.list(layout::LOCKS_ROOT).await.unwrap().is_empty());

    let held = RepoLock::acquire_beating(storage.clone(), "backup", Duration::from_millis(200))
        .await
        .unwrap();
    // The heartbeat writes a beat beside the lock (polled: a loaded machine may be slow).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let keys: Vec<String> = storage
            .list(layout::LOCKS_ROOT)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert!(keys.iter().any(|k| k == held.key()), "{keys:?}");
        if keys.iter().any(|k| k.ends_with(".beat")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no beat: {keys:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held.check().await.unwrap();
    let (broken, _) = lock::break_locks(storage.as_ref(), true).await.unwrap();
    assert_eq!(broken.len(), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(storage.head(held.key()).await.unwrap().is_none());
    assert!(matches!(held.check().await, Err(LockError::Lost { .. })));
    held.release().await;

    let mut l = Lease::take(storage.clone(), Path::new("/srv/pg"))
        .await
        .unwrap();
    let found = lease::list(storage.as_ref()).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].written.is_some());
    let now = lock::storage_now(storage.as_ref()).await.unwrap();
    assert!(lease::hold(&found, now).everything);
    l.narrow(
        LeaseScope {
            backup: pgpitr::repo::manifest::BackupId("20261123T070000Z".into()),
            start_timeline: pgpitr::pg::TimelineId(1),
            start_lsn: pgpitr::pg::Lsn(0x0200_0028),
        },
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let h = lease::hold(&lease::list(storage.as_ref()).await.unwrap(), now);
    assert!(!h.everything && h.backups.len() == 1, "{h:?}");
    assert_eq!(lease::remove_all(storage.as_ref()).await.unwrap().len(), 1);
}
