//! End to end: `pgpitr expire`, `pgpitr verify`, `pgpitr unlock` and the repository lock, on
//! real backups of a PostgreSQL 15 cluster archiving through `pgpitr-archive` into a local
//! repository, and on Garage (S3).
//!
//! - expire refuses to run without a policy; `--keep ID`, `--keep-last` (dry run, then for
//!   real), `--keep-within`; the oldest kept backup and the newest are then restored with
//!   `--target immediate` and hold the rows they should;
//! - grandfather-father-son (`--keep-daily/--keep-weekly/--keep-monthly`, and the same keys in
//!   the configuration file) on real backups whose manifests are moved to chosen days, weeks
//!   and months of the past;
//! - verify passes on the expired repository and catches, on copies of it, a flipped byte in a
//!   pack, a missing pack and a missing WAL segment, naming the key, with a non-zero exit;
//! - `kill -9` of an expire in the middle of its deletions leaves a repository that verify
//!   passes; the next expire breaks the dead holder's lock by itself; locks from another host
//!   are waited for (fresh heartbeat) or broken only by `pgpitr unlock` (stale heartbeat);
//! - a second backup while one runs fails with a message naming the holder;
//! - on S3: expire shrinks the manifests, packs and WAL as it should, verify passes and then
//!   catches a deleted pack; an incomplete multipart upload is a warning of verify and is
//!   aborted by expire once older than `--staging-grace`;
//! - leftover `.tmp.*` staging files in a local repository: warnings of verify, removed by
//!   expire once older than `--staging-grace`, never younger ones.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgpitr::repo::layout;
use pgpitr::repo::manifest::{BackupId, BackupManifest};
use pgpitr::storage::{DynStorage, PutMode};
use pgpitr_tests::cli::{
    archiving_cluster, conninfo, local_repo, pgpitr, pgpitr_cmd, pgpitr_ok, repo_env, text, Env,
};
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::{run_ok, runtime, storage_of, temp_dir, PG_USER};

/// Runs `pgpitr <args>`, expects a failure whose output contains every `expect`.
fn pgpitr_fails(env: &Env, args: &[&str], expect: &[&str]) -> String {
    let out = pgpitr(env, args);
    let all = text(&out);
    assert!(!out.status.success(), "pgpitr {args:?} should fail: {all}");
    for e in expect {
        assert!(all.contains(e), "expected {e:?} in pgpitr {args:?}: {all}");
    }
    all
}

fn backup(env: &Env, c: &Cluster) -> String {
    backup_with(env, c, &[])
}

fn backup_with(env: &Env, c: &Cluster, extra: &[&str]) -> String {
    let mut env = env.clone();
    env.push(("PGPITR_CONNINFO".into(), conninfo(c)));
    let mut args = vec!["backup", "--checkpoint", "fast", "--label", "retention"];
    args.extend_from_slice(extra);
    let id = pgpitr_ok(&env, &args).trim().to_string();
    // Its `.backup` history file too, so that listings taken next are complete.
    c.wait_archive_idle();
    id
}

/// The committed backups' manifests, oldest first (read from the directory).
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

/// Every file under `dir/sub`, as keys relative to `dir`.
fn keys(dir: &Path, sub: &str) -> Vec<String> {
    let mut out: Vec<String> = walkdir(dir.join(sub))
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn walkdir(dir: PathBuf) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(p));
        } else {
            out.push(p);
        }
    }
    out
}

fn copy_repo(repo: &Path, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir(tag);
    let copy = dir.path().join("repo");
    run_ok(Command::new("cp").arg("-a").arg(repo).arg(&copy));
    (dir, copy)
}

fn wait_for_repo_json(c: &Cluster, repo: &Path) {
    c.psql("SELECT pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !repo.join(layout::REPO_JSON).exists() {
        assert!(Instant::now() < deadline, "nothing archived:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restores backup `id` to its consistency point, starts it and returns `count(*)` of `t`.
fn restore_and_count(env: &Env, id: &str) -> i64 {
    let c = restore_immediate(env, id);
    c.psql("SELECT count(*) FROM t").trim().parse().unwrap()
}

/// Restores backup `id` to its consistency point (`--target immediate`) and starts it.
fn restore_immediate(env: &Env, id: &str) -> Cluster {
    let root = temp_dir("restore");
    let data = root.path().join("data");
    let out = pgpitr_ok(
        env,
        &[
            "restore",
            "--target",
            "immediate",
            "--backup",
            id,
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    assert!(out.contains(id), "{out}");
    let mut c = Cluster::adopt(15, root, data);
    c.start();
    assert!(
        c.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "the restore of {id} did not finish recovery:\n{}",
        c.log()
    );
    c
}

#[test]
fn expire_policies_restore_verify_and_crash() {
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "");
    run_ok(c.pgbench().args(["-i", "-s", "1", "-q", "postgres"]));
    c.psql("CREATE TABLE t (i int)");
    wait_for_repo_json(&c, &repo);

    // Four backups, 100 more rows before each.
    let began = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", began.elapsed().as_secs_f64());
    let mut taken = Vec::new();
    for k in 1..=4 {
        c.psql(&format!(
            "INSERT INTO t SELECT g FROM generate_series({}, {}) g",
            (k - 1) * 100 + 1,
            k * 100
        ));
        // The newest with `backup --keep`: never expired (it is the newest anyway here).
        taken.push(backup_with(
            &env,
            &c,
            if k == 4 { &["--keep"] } else { &[] },
        ));
    }
    assert_eq!(ids(&repo), taken);
    let keep_flags: Vec<bool> = manifests(&repo).iter().map(|m| m.keep).collect();
    assert_eq!(keep_flags, [false, false, false, true]);
    phase("four backups taken");
    let (_crash_dir, crash_repo) = copy_repo(&repo, "crash");

    // No policy: refused, nothing deleted.
    pgpitr_fails(&env, &["expire"], &["no retention policy given"]);
    assert_eq!(ids(&repo), taken);

    // --keep on the oldest, then keep-last 2: dry run first.
    let out = pgpitr_ok(&env, &["expire", "--keep", &taken[0]]);
    assert!(
        out.contains(&format!("marked backup {} as keep", taken[0])),
        "{out}"
    );
    assert!(manifests(&repo)[0].keep);
    let packs_before = keys(&repo, "packs");
    let wal_before = keys(&repo, "wal");
    let out = pgpitr_ok(
        &env,
        &[
            "expire",
            "--keep-last",
            "2",
            "--pack-min-age",
            "0s",
            "--dry-run",
        ],
    );
    assert!(
        out.contains(&format!("would expire  {}", taken[1])),
        "{out}"
    );
    assert!(out.contains("would free"), "{out}");
    assert_eq!(ids(&repo), taken);
    assert_eq!(keys(&repo, "packs"), packs_before);

    let report: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &[
            "expire",
            "--keep-last",
            "2",
            "--pack-min-age",
            "0s",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(report["expired_backups"], serde_json::json!([taken[1]]));
    assert_eq!(
        ids(&repo),
        vec![taken[0].clone(), taken[2].clone(), taken[3].clone()]
    );
    // WAL before the oldest kept backup's start went; from its start on, all stays (one
    // timeline here, so names order like positions).
    let oldest = &manifests(&repo)[0];
    let start = pgpitr::pg::WalSegmentName::containing(
        oldest.start_timeline,
        oldest.start_lsn,
        oldest.wal_segment_size,
    )
    .to_string();
    let file_of = |k: &str| k.rsplit('/').next().unwrap().to_string();
    let want: Vec<String> = wal_before
        .iter()
        .filter(|k| file_of(k) >= start || k.contains("history"))
        .cloned()
        .collect();
    assert!(want.len() < wal_before.len());
    assert_eq!(keys(&repo, "wal"), want);
    eprintln!("expired {}: {} pack(s) deleted", taken[1], report["packs"]);

    // keep-within: everything is younger than an hour.
    let report: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &["expire", "--keep-within", "1h", "--json"],
    ))
    .unwrap();
    assert_eq!(report["expired_backups"], serde_json::json!([]));

    phase("expired");
    pgpitr_ok(&env, &["verify"]);
    phase("verified");
    // The oldest kept backup and the newest restore, with their rows.
    assert_eq!(restore_and_count(&env, &taken[0]), 100);
    assert_eq!(restore_and_count(&env, &taken[3]), 400);
    phase("restored the oldest kept and the newest backup");
    drop(c);

    // verify catches damage, naming the key (checking only the newest backup, which reads
    // fewer objects).
    let newest = manifests(&repo).pop().unwrap();
    let newest_id = newest.id.0.clone();
    let chunk = newest
        .files
        .iter()
        .find_map(|f| f.chunks.iter().find(|c| c.length > 100))
        .unwrap()
        .clone();
    let pack_key = layout::pack_key(&chunk.pack);
    {
        let (_d, copy) = copy_repo(&repo, "flip");
        let path = copy.join(&pack_key);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(chunk.offset + chunk.length / 2) as usize] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let all = pgpitr_fails(
            &repo_env(&copy),
            &["verify", "--backup", &newest_id],
            &[&pack_key, "PROBLEM"],
        );
        assert!(all.contains(&chunk.sha256), "{all}");
    }
    {
        let (_d, copy) = copy_repo(&repo, "nopack");
        std::fs::remove_file(copy.join(&pack_key)).unwrap();
        let out = pgpitr(
            &repo_env(&copy),
            &["verify", "--backup", &newest_id, "--json"],
        );
        assert!(!out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["problems"].as_array().unwrap().iter().any(|p| {
                p["key"] == pack_key.as_str()
                    && p["message"].as_str().unwrap().contains("pack missing")
            }),
            "{v}"
        );
    }
    {
        let (_d, copy) = copy_repo(&repo, "nowal");
        let seg = pgpitr::pg::WalSegmentName::containing(
            newest.start_timeline,
            newest.start_lsn,
            newest.wal_segment_size,
        )
        .to_string();
        let key = keys(&copy, "wal")
            .into_iter()
            .find(|k| k.contains(&format!("/{seg}-")))
            .unwrap();
        std::fs::remove_file(copy.join(&key)).unwrap();
        pgpitr_fails(
            &repo_env(&copy),
            &["verify", "--backup", &newest_id],
            &[&seg, "is missing"],
        );
        // A damaged part index (a part hash near the end of the object): the content's SHA-256
        // still matches, but restore_command would refuse the file, and verify says so.
        let (_d, copy) = copy_repo(&repo, "badindex");
        let path = copy.join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 30;
        bytes[at] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        pgpitr_fails(
            &repo_env(&copy),
            &["verify", "--backup", &newest_id],
            &[&key, "XXH3-128 mismatch"],
        );
    }
    phase("damage found");
    // kill -9 in the middle of an expire (slowed down between deletions).
    let crash_env = repo_env(&crash_repo);
    let wal_total = keys(&crash_repo, "wal").len();
    let mut child = pgpitr_cmd(
        &crash_env,
        &[
            "expire",
            "--keep-last",
            "1",
            "--pack-min-age",
            "0s",
            "--delete-delay-ms",
            "150",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Wait until the manifests are gone and WAL deletion has begun.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids(&crash_repo).len() > 1 || keys(&crash_repo, "wal").len() == wal_total {
        assert!(Instant::now() < deadline, "expire made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "expire ended too early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let wal_left = keys(&crash_repo, "wal").len();
    eprintln!("killed expire with {wal_left} of {wal_total} WAL files left");
    assert!(
        !keys(&crash_repo, "locks").is_empty(),
        "the lock should remain"
    );
    pgpitr_ok(&crash_env, &["verify"]);
    // Its holder ran on this host and is gone: the next expire breaks the lock by itself,
    // naming it, and completes — no `pgpitr unlock` needed.
    let lock_key = keys(&crash_repo, "locks").pop().unwrap();
    let out = pgpitr(
        &crash_env,
        &["expire", "--keep-last", "1", "--pack-min-age", "0s"],
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("broke the stale repository lock")
            && all.contains(&lock_key)
            && all.contains(&format!("pid {}", child.id()))
            && all.contains("not running"),
        "{all}"
    );
    assert_eq!(ids(&crash_repo), vec![taken[3].clone()]);
    assert!(keys(&crash_repo, "wal").len() < wal_left);
    assert!(keys(&crash_repo, "locks").is_empty());
    pgpitr_ok(&crash_env, &["verify"]);
    phase("crash test done");

    // Locks from another host are never broken automatically (it may only be partitioned
    // away): one with a fresh heartbeat is waited for, and `pgpitr unlock` leaves it alone;
    // one whose heartbeat stopped is reported stale, and `pgpitr unlock` breaks it.
    let expire = ["expire", "--keep-last", "1", "--pack-min-age", "0s"];
    let fresh = forge_lock(&crash_repo, "db-elsewhere", Duration::ZERO);
    pgpitr_fails(
        &crash_env,
        &expire,
        &["locked by expire", "on host db-elsewhere", "wait for it"],
    );
    pgpitr_fails(
        &crash_env,
        &["unlock"],
        &["db-elsewhere", "looks alive", "--force"],
    );
    assert_eq!(keys(&crash_repo, "locks"), vec![fresh.clone()]);
    let out = pgpitr_ok(&crash_env, &["unlock", "--force"]);
    assert!(
        out.contains("broke live lock") && out.contains(&fresh),
        "{out}"
    );
    let stale = forge_lock(&crash_repo, "db-elsewhere", Duration::from_secs(3600));
    pgpitr_fails(
        &crash_env,
        &expire,
        &[
            "on host db-elsewhere",
            "stale",
            "no heartbeat",
            "pgpitr unlock",
        ],
    );
    assert_eq!(keys(&crash_repo, "locks"), vec![stale.clone()]);
    let out = pgpitr_ok(&crash_env, &["unlock"]);
    assert!(
        out.contains("broke stale lock") && out.contains(&stale),
        "{out}"
    );
    pgpitr_ok(&crash_env, &expire);
    assert!(keys(&crash_repo, "locks").is_empty());
}

/// Writes a lock object as a `pgpitr expire` on `host` would, last written (heartbeat and
/// mtime) `age` ago; returns its key.
fn forge_lock(repo: &Path, host: &str, age: Duration) -> String {
    use pgpitr::repo::lock::LockInfo;
    let now = jiff::Timestamp::now();
    let heartbeat = now - jiff::SignedDuration::try_from(age).unwrap();
    let token = format!("{:020}-4242-f0f0f0f0", now.as_nanosecond());
    let info = LockInfo {
        token: token.clone(),
        command: "expire".into(),
        host: host.into(),
        pid: 4242,
        started: heartbeat,
        heartbeat,
        process: None,
    };
    let key = layout::lock_key(&token);
    let path = repo.join(&key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec(&info).unwrap()).unwrap();
    // Staleness is judged by the storage's clock: the object was last written `age` ago.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::from(heartbeat))
        .unwrap();
    key
}

#[test]
fn a_second_backup_fails_while_one_runs() {
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "checkpoint_completion_target = 0.9");
    c.psql("CREATE TABLE t AS SELECT g AS i FROM generate_series(1, 50000) g");
    wait_for_repo_json(&c, &repo);

    // A spread checkpoint over dirty buffers with checkpoint_timeout = 1h keeps the first
    // backup busy (and holding the lock) for as long as we need.
    c.psql("UPDATE t SET i = i + 1");
    let mut benv = env.clone();
    benv.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    let mut first = pgpitr_cmd(&benv, &["backup", "--checkpoint", "spread"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while keys(&repo, "locks").is_empty() {
        assert!(Instant::now() < deadline, "the first backup took no lock");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first backup ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let msg = pgpitr_fails(
        &benv,
        &["backup", "--checkpoint", "fast"],
        &[
            "repository is locked by backup",
            &format!("pid {}", first.id()),
            "wait for it",
        ],
    );
    eprintln!("refused as expected: {msg}");
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first backup should still run"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let out = pgpitr_ok(&env, &["unlock"]);
    assert!(
        out.contains("broke stale lock") && out.contains("backup"),
        "{out}"
    );
    let id = backup(&env, &c);
    assert_eq!(ids(&repo), vec![id]);
    assert!(keys(&repo, "locks").is_empty());
}

/// The lock on S3 (Garage ignores `If-None-Match`): of contenders racing at once, at most one
/// holds the lock; after its release the next one gets it; `modified` (used by expire's pack
/// age rule) works there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_races_on_garage() {
    use pgpitr::repo::lock::RepoLock;
    use pgpitr_tests::garage::{self, Garage};
    let g = Garage::shared();
    let bucket = g.bucket();
    std::env::set_var("AWS_ACCESS_KEY_ID", garage::KEY_ID);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", garage::SECRET);
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let env: Env = g
        .env(&bucket, "locktest")
        .into_iter()
        .filter(|(k, _)| k.starts_with("PGPITR_"))
        .collect();
    let config = pgpitr::config::Config::from_parts(None, None, &env).unwrap();
    let storage = config.storage().await.unwrap();
    for round in 0..3 {
        let tries: Vec<_> = (0..6)
            .map(|_| tokio::spawn(RepoLock::acquire(storage.clone(), "expire")))
            .collect();
        let mut results = Vec::new();
        for t in tries {
            results.push(t.await.unwrap());
        }
        let (won, lost): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        assert!(won.len() <= 1, "round {round}: {} holders", won.len());
        for e in lost {
            let msg = e.unwrap_err().to_string();
            assert!(msg.contains("locked by expire"), "{msg}");
        }
        for w in won {
            let lock = w.unwrap();
            assert!(storage.modified(lock.key()).await.unwrap().is_some());
            lock.release().await;
        }
        let lock = RepoLock::acquire(storage.clone(), "backup").await.unwrap();
        lock.release().await;
        assert!(pgpitr::repo::lock::list(storage.as_ref())
            .await
            .unwrap()
            .is_empty());
    }
}

/// The keys under `prefix`, sorted.
fn listing(store: &DynStorage, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = runtime()
        .block_on(store.list(prefix))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    keys
}

/// Moves backup `id` in time: its manifest's stop time becomes `stop` and its start time keeps
/// its distance to it. The manifest is rewritten whole through the library's type and storage,
/// as `pgpitr expire --keep` does (manifests carry no checksum of their own).
fn move_backup(store: &DynStorage, id: &str, stop: jiff::Timestamp) {
    runtime().block_on(async {
        let key = layout::backup_manifest_key(&BackupId::parse(id).unwrap());
        let mut m: BackupManifest =
            serde_json::from_slice(&store.get(&key).await.unwrap()).unwrap();
        let took = m.stop_time.duration_since(m.start_time);
        m.stop_time = stop;
        m.start_time = stop - took;
        let body = bytes::Bytes::from(serde_json::to_vec(&m).unwrap());
        store.put(&key, body, PutMode::Overwrite).await.unwrap();
    });
}

/// The WAL keys that expiry must leave when `oldest` is the oldest kept backup: every file from
/// the segment holding its start on, and the history files (one timeline here, so file names
/// order like positions).
fn wal_kept_from(wal: &[String], oldest: &BackupManifest) -> Vec<String> {
    let start = pgpitr::pg::WalSegmentName::containing(
        oldest.start_timeline,
        oldest.start_lsn,
        oldest.wal_segment_size,
    )
    .to_string();
    wal.iter()
        .filter(|k| k.rsplit('/').next().unwrap() >= start.as_str() || k.contains("history"))
        .cloned()
        .collect()
}

fn expired_of(report: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = report["expired_backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The reasons the report gives for keeping `id` (empty when it expires).
fn reasons_of(report: &serde_json::Value, id: &str) -> Vec<String> {
    let v = report["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not in the report: {report}"));
    v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

/// Grandfather-father-son retention on real backups: seven backups, the six older ones moved
/// (in their manifests) to fixed days of 2024 so that days, ISO weeks and months differ, the
/// newest left at its real time; `--keep-daily 3 --keep-weekly 3 --keep-monthly 3` from the
/// command line and from the configuration file, dry run then for real; exactly the backups the
/// rule does not pick go; verify passes; the oldest kept and the newest restore with their rows.
#[test]
fn expire_grandfather_father_son_on_real_backups() {
    let began = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", began.elapsed().as_secs_f64());
    let (repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let store = storage_of(&env);
    let c = archiving_cluster(env.clone(), "");
    run_ok(c.pgbench().args(["-i", "-s", "1", "-q", "postgres"]));
    c.psql("CREATE TABLE t (i int)");
    wait_for_repo_json(&c, &repo);
    let mut taken = Vec::new();
    for k in 1..=7 {
        c.psql(&format!(
            "INSERT INTO t SELECT g FROM generate_series({}, {}) g",
            (k - 1) * 100 + 1,
            k * 100
        ));
        taken.push(backup(&env, &c));
    }
    assert_eq!(ids(&repo), taken);
    phase("seven backups taken");

    // 2024-01-01 is a Monday: ISO week N of 2024 starts on day 7(N-1)+1 of the year. Far
    // enough from today's day, week and month, whatever today is.
    let when = [
        "2024-01-10T10:00:00Z", // b0: Wed, W02, January
        "2024-02-05T10:00:00Z", // b1: Mon, W06, February
        "2024-02-20T10:00:00Z", // b2: Tue, W08, February (its newest)
        "2024-03-04T10:00:00Z", // b3: Mon, W10, March
        "2024-03-06T09:00:00Z", // b4: Wed, W10, March
        "2024-03-06T15:00:00Z", // b5: the same day, later: newest of its day, week and month
    ];
    for (id, stop) in taken.iter().zip(when) {
        move_backup(&store, id, stop.parse().unwrap());
    }
    let moved: Vec<String> = manifests(&repo)
        .iter()
        .map(|m| m.stop_time.to_string())
        .collect();
    assert_eq!(&moved[..6], when);
    let b = |i: usize| taken[i].clone();
    // Newest first: days b6, b5 (03-06), b3 (03-04) | weeks b6, b5 (W10), b2 (W08) | months b6,
    // b5 (2024-03), b2 (2024-02). Going: b4 (not the newest of its day), b1 (a fourth week, not
    // the newest of February), b0 (a fourth month).
    let want_expired = vec![b(0), b(1), b(4)];
    let gfs = [
        "--keep-daily",
        "3",
        "--keep-weekly",
        "3",
        "--keep-monthly",
        "3",
        "--pack-min-age",
        "0s",
    ];

    // Dry run, text and JSON: nothing changes.
    let wal_before = keys(&repo, "wal");
    let packs_before = keys(&repo, "packs");
    let mut args = vec!["expire", "--dry-run"];
    args.extend(gfs);
    let out = pgpitr_ok(&env, &args);
    for i in 0..7 {
        let expires = want_expired.contains(&b(i));
        assert_eq!(
            out.contains(&format!("would expire  {}", b(i))),
            expires,
            "backup {i}: {out}"
        );
        assert_eq!(
            out.contains(&format!("keep    {}", b(i))),
            !expires,
            "{out}"
        );
    }
    assert!(out.contains("would free"), "{out}");
    args.push("--json");
    let dry: serde_json::Value = serde_json::from_str(&pgpitr_ok(&env, &args)).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(expired_of(&dry), want_expired);
    assert_eq!(ids(&repo), taken);
    assert_eq!(keys(&repo, "wal"), wal_before);
    assert_eq!(keys(&repo, "packs"), packs_before);

    // Why each one stays: every rule contributes.
    let now = manifests(&repo)[6]
        .stop_time
        .to_zoned(jiff::tz::TimeZone::UTC);
    let iso = now.date().iso_week_date();
    let today = [
        "newest".to_string(),
        format!("daily {}", now.date()),
        format!("weekly {}-W{:02}", iso.year(), iso.week()),
        format!("monthly {}-{:02}", now.year(), now.month()),
    ];
    for r in &today {
        assert!(reasons_of(&dry, &b(6)).contains(r), "{r}: {dry}");
    }
    assert_eq!(
        reasons_of(&dry, &b(5)),
        ["daily 2024-03-06", "weekly 2024-W10", "monthly 2024-03"]
    );
    assert_eq!(reasons_of(&dry, &b(3)), ["daily 2024-03-04"]);
    assert_eq!(
        reasons_of(&dry, &b(2)),
        ["weekly 2024-W08", "monthly 2024-02"]
    );
    for i in [0, 1, 4] {
        assert!(reasons_of(&dry, &b(i)).is_empty(), "{dry}");
    }

    // The same policy from the configuration file; a command-line option overrides its key.
    let config = repo_dir.path().join("pgpitr.toml");
    std::fs::write(
        &config,
        format!(
            "repo = \"{}\"\nkeep_daily = 3\nkeep_weekly = 3\nkeep_monthly = 3\n",
            repo.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let conf_args = ["--config", config, "expire", "--dry-run", "--json"];
    let from_file: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&Env::new(), &conf_args)).unwrap();
    assert_eq!(
        from_file["policy"], "keep-daily 3, keep-weekly 3, keep-monthly 3",
        "{from_file}"
    );
    assert_eq!(expired_of(&from_file), want_expired);
    let mut args = conf_args.to_vec();
    args.extend(["--keep-monthly", "4"]);
    let overridden: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&Env::new(), &args)).unwrap();
    assert_eq!(expired_of(&overridden), vec![b(1), b(4)]);
    assert_eq!(reasons_of(&overridden, &b(0)), ["monthly 2024-01"]);
    assert_eq!(ids(&repo), taken);
    phase("dry runs");

    // For real.
    let mut args = vec!["expire", "--json"];
    args.extend(gfs);
    let report: serde_json::Value = serde_json::from_str(&pgpitr_ok(&env, &args)).unwrap();
    assert_eq!(expired_of(&report), want_expired);
    assert_eq!(ids(&repo), vec![b(2), b(3), b(5), b(6)]);
    for id in &want_expired {
        assert!(!repo
            .join("backups")
            .join(id)
            .join("backup_manifest")
            .exists());
    }
    let kept = manifests(&repo);
    let wal_want = wal_kept_from(&wal_before, &kept[0]);
    assert!(wal_want.len() < wal_before.len());
    assert_eq!(keys(&repo, "wal"), wal_want);
    // Every pack left is referenced by a kept backup, and none of those went.
    let referenced: std::collections::BTreeSet<String> = kept
        .iter()
        .flat_map(|m| m.files.iter().flat_map(|f| f.chunks.iter()))
        .flat_map(|c| [layout::pack_key(&c.pack), layout::pack_index_key(&c.pack)])
        .collect();
    assert_eq!(
        keys(&repo, "packs"),
        referenced.into_iter().collect::<Vec<_>>()
    );
    // Run again: the policy is stable, nothing more goes.
    let again: serde_json::Value = serde_json::from_str(&pgpitr_ok(&env, &args)).unwrap();
    assert!(expired_of(&again).is_empty(), "{again}");
    phase("expired");

    pgpitr_ok(&env, &["verify"]);
    phase("verified");
    // The oldest kept backup (b2) and the newest restore with their rows.
    assert_eq!(restore_and_count(&env, &b(2)), 300);
    assert_eq!(restore_and_count(&env, &b(6)), 700);
    phase("restored the oldest kept and the newest backup");
}

/// `expire` and `verify` on S3 (Garage): three backups, the first holding ~88 MiB that does not
/// compress and is dropped before the second, so that some of its packs hold nothing the later
/// backups use; `--keep-last 2` removes its manifests, the WAL before the second backup and
/// exactly the packs no kept backup references; verify passes, then catches a pack deleted
/// behind its back, naming its key.
#[test]
fn expire_and_verify_on_s3() {
    use pgpitr_tests::garage::Garage;
    let began = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", began.elapsed().as_secs_f64());
    let g = Garage::shared();
    let bucket = g.bucket();
    let env: Env = g.env(&bucket, "retention");
    let store = storage_of(&env);
    let c = archiving_cluster(env.clone(), "");
    c.psql("CREATE TABLE t (i int)");
    c.psql("CREATE TABLE big (i int, b bytea); ALTER TABLE big ALTER b SET STORAGE EXTERNAL");
    // 88 rows of 1 MiB of SHA-256 output, stored out of line and uncompressed.
    c.psql(
        "INSERT INTO big SELECT i, (SELECT string_agg(sha256(int4send(i * 100000 + j)), ''::bytea) \
         FROM generate_series(1, 32768) j) FROM generate_series(1, 88) i",
    );
    c.psql("SELECT pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(120);
    while runtime()
        .block_on(store.head(layout::REPO_JSON))
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "nothing archived:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    phase("cluster ready");

    let mut taken = Vec::new();
    for k in 1..=3 {
        c.psql(&format!(
            "INSERT INTO t SELECT g FROM generate_series({}, {}) g",
            (k - 1) * 100 + 1,
            k * 100
        ));
        taken.push(backup(&env, &c));
        if k == 1 {
            c.psql("DROP TABLE big");
        }
    }
    phase("three backups taken");
    let manifests_of = |ids: &[String]| -> Vec<BackupManifest> {
        ids.iter()
            .map(|id| {
                let key = layout::backup_manifest_key(&BackupId::parse(id).unwrap());
                serde_json::from_slice(&runtime().block_on(store.get(&key)).unwrap()).unwrap()
            })
            .collect()
    };
    let all = manifests_of(&taken);
    let backups_before = listing(&store, layout::BACKUPS_ROOT);
    let packs_before = listing(&store, layout::PACKS_ROOT);
    let wal_before = listing(&store, "wal/");
    assert_eq!(backups_before.len(), 6, "{backups_before:?}");

    let report: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &[
            "expire",
            "--keep-last",
            "2",
            "--pack-min-age",
            "0s",
            "--json",
        ],
    ))
    .unwrap();
    phase("expired");
    assert_eq!(expired_of(&report), vec![taken[0].clone()]);

    // Manifests: the first backup's two objects went.
    let first = format!("{}{}/", layout::BACKUPS_ROOT, taken[0]);
    let want: Vec<String> = backups_before
        .iter()
        .filter(|k| !k.starts_with(&first))
        .cloned()
        .collect();
    assert_eq!(want.len(), 4);
    assert_eq!(listing(&store, layout::BACKUPS_ROOT), want);
    // Packs: exactly those a kept backup references stay (pack and index).
    let referenced: std::collections::BTreeSet<String> = all[1..]
        .iter()
        .flat_map(|m| m.files.iter().flat_map(|f| f.chunks.iter()))
        .flat_map(|c| [layout::pack_key(&c.pack), layout::pack_index_key(&c.pack)])
        .collect();
    let packs_after = listing(&store, layout::PACKS_ROOT);
    assert_eq!(packs_after, referenced.into_iter().collect::<Vec<_>>());
    assert!(
        packs_after.len() < packs_before.len(),
        "no pack went: {packs_before:?}"
    );
    assert_eq!(
        report["packs"].as_u64().unwrap() as usize * 2,
        packs_before.len() - packs_after.len(),
        "{report}"
    );
    // WAL: what precedes the second backup's start went, the rest stays.
    let wal_want = wal_kept_from(&wal_before, &all[1]);
    assert!(wal_want.len() < wal_before.len());
    assert_eq!(listing(&store, "wal/"), wal_want);
    eprintln!(
        "S3 objects: backups {} -> {}, packs {} -> {}, WAL {} -> {}",
        backups_before.len(),
        want.len(),
        packs_before.len(),
        packs_after.len(),
        wal_before.len(),
        wal_want.len()
    );

    pgpitr_ok(&env, &["verify"]);
    phase("verified");

    // A backup killed mid-upload leaves its pack's multipart upload open: verify warns and
    // passes; expire keeps it while younger than --staging-grace, then aborts it.
    let pack_id = "ab".repeat(32);
    let upload = runtime().block_on(g.leave_upload_open(
        &bucket,
        &format!("retention/{}", layout::pack_key(&pack_id)),
        1000,
    ));
    let out = pgpitr_ok(&env, &["verify"]);
    assert!(
        out.contains(&format!(
            "WARNING {} (upload {upload}): leftover staging object, 1000 B,",
            layout::pack_key(&pack_id)
        )) && out.contains("no problems"),
        "{out}"
    );
    let out = pgpitr_ok(&env, &["expire", "--keep-last", "2"]);
    assert!(
        out.contains("1 leftover staging object(s) kept for now"),
        "{out}"
    );
    assert_eq!(runtime().block_on(store.list_staging()).unwrap().len(), 1);
    // Not a race against a deadline: the upload must be at least 2 s old by Garage's clock
    // (the storage's "now" has whole seconds) for a grace of 1 s to pass it.
    std::thread::sleep(Duration::from_secs(3));
    let out = pgpitr_ok(
        &env,
        &["expire", "--keep-last", "2", "--staging-grace", "1s"],
    );
    assert!(
        out.contains("removed 1 leftover staging object(s) of killed writers (1000 B)"),
        "{out}"
    );
    assert!(runtime().block_on(store.list_staging()).unwrap().is_empty());
    phase("leftover multipart upload aborted");

    // A pack of the newest backup deleted behind pgpitr's back: verify names it and fails.
    let pack_key = layout::pack_key(
        &all[2]
            .files
            .iter()
            .find_map(|f| f.chunks.first())
            .unwrap()
            .pack,
    );
    runtime().block_on(store.delete(&pack_key)).unwrap();
    let out = pgpitr(&env, &["verify", "--json"]);
    assert!(!out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["problems"].as_array().unwrap().iter().any(|p| {
            p["key"] == pack_key.as_str() && p["message"].as_str().unwrap().contains("pack missing")
        }),
        "{v}"
    );
    pgpitr_fails(
        &env,
        &["verify", "--backup", &taken[2]],
        &[&pack_key, "PROBLEM"],
    );
    phase("missing pack found");
}

/// Issue 15, item 5: after a point-in-time restore that replaced its source, expire keeps the
/// backup that restores the live timeline. Backup b0 on timeline 1, a restore point, then two
/// more backups b1 and b2 on timeline 1; the source stops and a restore to the restore point
/// (promoted, `--archive-mode preserve`) goes on as timeline 2 in the same repository, whose
/// history holds b0 only. `expire --keep-last 1` must keep b2 (the newest) and b0 (it restores
/// timeline 2, the latest) and timeline 2's WAL, expire b1, and a restore to the latest
/// timeline afterwards holds what was written on timeline 2.
#[test]
fn expire_keeps_the_live_timeline_restorable_after_a_point_in_time_restore() {
    let began = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", began.elapsed().as_secs_f64());
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let mut source = archiving_cluster(env.clone(), "");
    source.psql("CREATE TABLE t (i int)");
    wait_for_repo_json(&source, &repo);
    source.psql("INSERT INTO t SELECT g FROM generate_series(1, 100) g");
    let b0 = backup(&env, &source);
    source.psql("INSERT INTO t SELECT g FROM generate_series(101, 200) g");
    source.psql("SELECT pg_create_restore_point('before_the_mistake')");
    source.psql("DELETE FROM t WHERE i > 50");
    let b1 = backup(&env, &source);
    source.psql("DELETE FROM t");
    let b2 = backup(&env, &source);
    source.psql("INSERT INTO t VALUES (0)");
    let seg = source.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    source.psql("SELECT pg_switch_wal()");
    source.wait_archived(&seg);
    source.stop();
    assert_eq!(ids(&repo), [b0.clone(), b1.clone(), b2.clone()]);
    phase("three backups on timeline 1, source stopped");

    // The restore that replaces the source: timeline 2 leaves timeline 1 after b0, before b1.
    let root = temp_dir("live");
    let data = root.path().join("data");
    let out = pgpitr_ok(
        &env,
        &[
            "restore",
            "--target-name",
            "before_the_mistake",
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--archive-mode",
            "preserve",
            "--owner",
            PG_USER,
        ],
    );
    assert!(out.contains(&format!("restored backup {b0}")), "{out}");
    let mut live = Cluster::adopt(15, root, data);
    live.env = env.clone();
    live.start();
    assert!(
        live.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "the restore did not finish recovery:\n{}",
        live.log()
    );
    assert_eq!(live.psql("SELECT count(*) FROM t"), "200");
    live.psql("CREATE TABLE on_timeline_2 AS SELECT g AS n FROM generate_series(1, 50) g");
    let seg = live.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    assert!(seg.starts_with("00000002"), "{seg}");
    live.psql("SELECT pg_switch_wal()");
    live.wait_archived(&seg);
    let timeline_2_wal = |repo: &Path| -> Vec<String> {
        keys(repo, "wal")
            .into_iter()
            .filter(|k| k.rsplit('/').next().unwrap().starts_with("00000002"))
            .collect()
    };
    let wal_2 = timeline_2_wal(&repo);
    assert!(wal_2.iter().any(|k| k.contains(&seg)), "{wal_2:?}");
    phase("timeline 2 live and archived");
    // The restore's lease would keep b0 anyway; without it the timeline rule alone must.
    let out = pgpitr_ok(&env, &["unlock", "--leases"]);
    assert!(out.contains("lease"), "{out}");

    // Dry run: b1 alone goes; b0 stays for timeline 2.
    let dry: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &[
            "expire",
            "--keep-last",
            "1",
            "--pack-min-age",
            "0s",
            "--dry-run",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(expired_of(&dry), [b1.as_str()], "{dry}");
    assert_eq!(reasons_of(&dry, &b0), ["restores the latest timeline 2"]);
    assert_eq!(dry["latest_timeline"], 2, "{dry}");
    assert_eq!(dry["latest_timeline_backup"], b0.as_str(), "{dry}");

    // For real, in text: the output says why b0 stays.
    let out = pgpitr_ok(
        &env,
        &["expire", "--keep-last", "1", "--pack-min-age", "0s"],
    );
    assert!(
        out.contains(&format!(
            "latest timeline 2: backup {b0} is the newest that restores it; kept with the WAL it needs"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("keep    {b0}  (restores the latest timeline 2)")),
        "{out}"
    );
    assert!(out.contains(&format!("expired  {b1}")), "{out}");
    assert_eq!(ids(&repo), [b0.clone(), b2.clone()]);
    assert_eq!(timeline_2_wal(&repo), wal_2, "timeline 2's WAL was deleted");
    pgpitr_ok(&env, &["verify"]);
    live.stop();
    phase("expired");

    // The live timeline restores, with what was written on it.
    let root = temp_dir("after-expire");
    let data = root.path().join("data");
    let out = pgpitr_ok(
        &env,
        &[
            "restore",
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    assert!(out.contains(&format!("restored backup {b0}")), "{out}");
    let mut again = Cluster::adopt(15, root, data);
    again.start();
    assert!(
        again.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "the restore of timeline 2 did not finish recovery:\n{}",
        again.log()
    );
    assert_eq!(again.psql("SELECT count(*) FROM on_timeline_2"), "50");
    assert_eq!(again.psql("SELECT count(*) FROM t"), "200");
    phase("timeline 2 restored after expire");
}

/// Sets `path`'s mtime to `ago` before now.
fn set_age(path: &Path, ago: Duration) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - ago)
        .unwrap();
}

/// Killed writers' staging files (planted, with the names `pgpitr-archive` and `pgpitr backup`
/// give them, beside real WAL objects and packs): `verify` warns about each with its age and
/// still exits 0; `expire --dry-run` only reports; `expire` removes those older than
/// `--staging-grace` (24h by default, then 1h) and never a younger one.
#[test]
fn leftover_staging_files_are_reported_by_verify_and_removed_by_expire_after_their_grace() {
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "");
    c.psql("CREATE TABLE t AS SELECT g AS i FROM generate_series(1, 10000) g");
    wait_for_repo_json(&c, &repo);
    let id = backup(&env, &c);
    let clean = pgpitr_ok(&env, &["verify"]);
    assert!(
        clean.contains("no problems") && !clean.contains("WARNING"),
        "{clean}"
    );

    let dir_of = |sub: &str, suffix: &str| -> PathBuf {
        walkdir(repo.join(sub))
            .into_iter()
            .find(|p| {
                p.to_string_lossy().ends_with(suffix) && !p.to_string_lossy().contains("history")
            })
            .unwrap_or_else(|| panic!("no {suffix} under {sub}"))
            .parent()
            .unwrap()
            .to_path_buf()
    };
    let wal_dir = dir_of("wal", ".lz4");
    let pack_dir = dir_of("packs", ".pack");
    let day = Duration::from_secs(86_400);
    let planted = [
        // A killed `pgpitr-archive`, three days ago.
        (wal_dir.join(".tmp.4242.281474976710656"), 700_000, 3 * day),
        // A killed backup's pack, two days ago.
        (pack_dir.join(".tmp.4343.562949953421312"), 2 << 20, 2 * day),
        // Two hours old: within the default grace, not within 1h.
        (wal_dir.join(".tmp.4444.1"), 1000, Duration::from_secs(7200)),
    ];
    for (path, len, age) in &planted {
        std::fs::write(path, vec![0x5au8; *len]).unwrap();
        set_age(path, *age);
    }
    let rel = |p: &Path| {
        p.strip_prefix(&repo)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };

    // verify: a warning per leftover with its age, the summary, and success.
    let out = pgpitr(&env, &["verify"]);
    let all = text(&out);
    assert!(out.status.success(), "verify failed on leftovers: {all}");
    for (path, _, _) in &planted {
        assert!(
            all.contains(&format!("WARNING {}: leftover staging object", rel(path))),
            "{all}"
        );
    }
    assert!(
        all.contains("3d0h old") && all.contains("2d0h old"),
        "{all}"
    );
    assert!(
        all.contains("3 leftover staging object(s)")
            && all.contains("verify does not fail on them")
            && all.contains("no problems"),
        "{all}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &["verify", "--json"])).unwrap();
    assert_eq!(json["staging"].as_array().unwrap().len(), 3, "{json}");

    // expire --dry-run reports the two older than 24h and removes nothing.
    let out = pgpitr_ok(&env, &["expire", "--keep-last", "5", "--dry-run"]);
    assert!(
        out.contains("would remove 2 leftover staging object(s)")
            && out.contains("1 leftover staging object(s) kept for now"),
        "{out}"
    );
    assert!(planted.iter().all(|(p, _, _)| p.exists()));

    // expire: the two old ones go, the young one stays.
    let out = pgpitr_ok(&env, &["expire", "--keep-last", "5"]);
    assert!(
        out.contains("removed 2 leftover staging object(s) of killed writers (2.7 MiB)")
            && out.contains("1 leftover staging object(s) kept for now"),
        "{out}"
    );
    assert!(!planted[0].0.exists() && !planted[1].0.exists());
    assert!(planted[2].0.exists());
    let json: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &["expire", "--keep-last", "5", "--dry-run", "--json"],
    ))
    .unwrap();
    assert_eq!(
        json["staging_removed"].as_array().unwrap().len(),
        0,
        "{json}"
    );
    assert_eq!(json["staging_young_kept"], 1, "{json}");

    // A shorter grace takes the two-hour-old one too; then verify is clean again and the
    // backup is untouched.
    let out = pgpitr_ok(
        &env,
        &["expire", "--keep-last", "5", "--staging-grace", "1h"],
    );
    assert!(
        out.contains("removed 1 leftover staging object(s)"),
        "{out}"
    );
    assert!(!planted[2].0.exists());
    let clean = pgpitr_ok(&env, &["verify"]);
    assert!(
        clean.contains("no problems") && !clean.contains("WARNING"),
        "{clean}"
    );
    assert_eq!(ids(&repo), vec![id]);
}

/// The segment number of a WAL key (`wal/<dir>/<name>-<sha>.lz4`), for segments, `.partial`
/// and `.backup` files; `None` for `.history` files.
fn segno_of_key(key: &str) -> Option<u64> {
    let file = key.rsplit('/').next().unwrap();
    let name: pgpitr::pg::WalFileName = file.split('-').next().unwrap().parse().unwrap();
    name.segment()
        .map(|s| s.segno(pgpitr::pg::WalSegSize::DEFAULT))
}

/// Issue 19: a WAL window (`keep_wal_within`) on real backups. Five backups with marker rows
/// committed before each, the four older ones re-dated to 40, 30, 20 and 10 days ago;
/// `--keep-daily 7 --keep-wal-within 14d` keeps every backup, continuous WAL from the start of
/// the one 20 days old (the newest before the window) and only their own WAL for the two
/// older: exactly that WAL stays. Verify passes with the window configured and names the gap
/// without it; `list` and `status` show two isolated points before the window; a time between
/// the points is refused naming both; each old backup restores to its consistent end with its
/// markers; a time inside the window restores exactly.
#[test]
fn expire_with_a_wal_window_on_real_backups() {
    use pgpitr_tests::pitr::{
        add_markers, archive_everything, create_markers, marker_ids, nth_marker, restore_and_start,
        target_after_marker,
    };
    let began = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", began.elapsed().as_secs_f64());
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let mut windowed = env.clone();
    windowed.push(("PGPITR_KEEP_WAL_WITHIN".into(), "14d".into()));
    let store = storage_of(&env);
    let c = archiving_cluster(env.clone(), "");
    create_markers(&c);
    wait_for_repo_json(&c, &repo);
    let mut taken = Vec::new();
    for _ in 0..5 {
        // Three markers and at least one segment of WAL alone before each backup.
        add_markers(&c, 3);
        archive_everything(&c);
        taken.push(backup(&env, &c));
    }
    // Markers 16..18 after the newest backup, archived.
    add_markers(&c, 3);
    archive_everything(&c);
    let now = jiff::Timestamp::now();
    for (i, days) in [40, 30, 20, 10].iter().enumerate() {
        move_backup(
            &store,
            &taken[i],
            now - jiff::SignedDuration::from_hours(24 * days),
        );
    }
    let b = |i: usize| taken[i].clone();
    phase("five backups taken and re-dated");

    let wal_before = keys(&repo, "wal");
    // A window of zero or garbage is refused, naming the option or the key; nothing changes.
    pgpitr_fails(
        &env,
        &["expire", "--keep-daily", "7", "--keep-wal-within", "0d"],
        &["--keep-wal-within", "more than zero"],
    );
    let mut garbage = env.clone();
    garbage.push(("PGPITR_KEEP_WAL_WITHIN".into(), "two weeks".into()));
    pgpitr_fails(
        &garbage,
        &["expire", "--keep-daily", "7"],
        &["keep_wal_within"],
    );
    // The dry run says which backups keep only their own WAL.
    let dry = pgpitr_ok(&windowed, &["expire", "--dry-run", "--keep-daily", "7"]);
    let own = format!(
        "consistent end (pgpitr restore --backup ID --target immediate): {}, {}",
        b(0),
        b(1)
    );
    let base = format!(
        "continuous WAL from the start of backup {} on timeline 1",
        b(2)
    );
    assert!(dry.contains(&own) && dry.contains(&base), "{dry}");
    assert_eq!(keys(&repo, "wal"), wal_before);
    let report: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &env,
        &[
            "expire",
            "--json",
            "--keep-daily",
            "7",
            "--keep-wal-within",
            "14d",
        ],
    ))
    .unwrap();
    assert!(expired_of(&report).is_empty(), "{report}");
    assert_eq!(
        report["policy"], "keep-daily 7, keep-wal-within 14d",
        "{report}"
    );
    let window = &report["wal_window"];
    assert_eq!(
        window["own_wal_only"],
        serde_json::json!([b(0), b(1)]),
        "{report}"
    );
    assert_eq!(window["bases"][0]["backup"], b(2), "{report}");
    assert_eq!(window["bases"][0]["timeline"], 1, "{report}");

    // Exactly the WAL outside the window went: b0's and b1's own WAL stay, and all from b2 on.
    let m = manifests(&repo);
    let seg = |l: pgpitr::pg::Lsn| l.segno(pgpitr::pg::WalSegSize::DEFAULT);
    let own = |i: usize| seg(m[i].start_lsn)..=seg(m[i].stop_lsn);
    let want: Vec<String> = wal_before
        .iter()
        .filter(|k| match segno_of_key(k) {
            None => true,
            Some(n) => own(0).contains(&n) || own(1).contains(&n) || n >= seg(m[2].start_lsn),
        })
        .cloned()
        .collect();
    let gone = wal_before.len() - want.len();
    assert!(
        gone >= 2,
        "nothing between the backups to expire: {wal_before:?}"
    );
    assert_eq!(keys(&repo, "wal"), want);
    assert_eq!(report["wal_files"], gone, "{report}");
    // Stable: a second run deletes nothing more.
    let again: serde_json::Value = serde_json::from_str(&pgpitr_ok(
        &windowed,
        &["expire", "--json", "--keep-daily", "7"],
    ))
    .unwrap();
    assert_eq!(again["wal_files"], 0, "{again}");
    phase("expired");

    // verify: passes under the window, names the gap after b0 without it.
    pgpitr_ok(&windowed, &["verify"]);
    pgpitr_fails(
        &env,
        &["verify"],
        &[&format!("a gap between backup {}", b(0))],
    );
    phase("verified");

    // list and status show the points and the window.
    let listed: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &["list", "--json"])).unwrap();
    let ranges = listed["windows"][0]["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 3, "{listed}");
    for (i, r) in ranges.iter().enumerate() {
        assert_eq!(r["from"]["backup"], b(i), "{listed}");
        assert_eq!(r["point"], i < 2, "{listed}");
    }
    let text = pgpitr_ok(&env, &["list"]);
    for i in [0, 1] {
        assert!(
            text.contains("before that, only at")
                && text.contains(&format!("--backup {} --target immediate", b(i))),
            "{text}"
        );
    }
    let status = pgpitr(&env, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let window_fact = &status["facts"]["windows"][0];
    assert_eq!(
        window_fact["ranges"].as_array().unwrap().len(),
        3,
        "{status}"
    );
    let line = status["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "window")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        line.contains("before that only at 2 earlier moment(s)"),
        "{line}"
    );

    // A time between the two points: refused, naming both.
    let between = (m[0].stop_time + jiff::SignedDuration::from_hours(24 * 5)).to_string();
    pgpitr_fails(
        &env,
        &["plan", "--target-time", &between],
        &[
            "between two recoverable ranges",
            &format!("the end of backup {}", b(0)),
            &format!("the end of backup {}", b(1)),
        ],
    );
    phase("list, status, plan");

    // Each old backup restores to its consistent end, with the markers committed before it.
    for i in [0, 1] {
        let restored = restore_immediate(&env, &b(i));
        let n = restored.psql("SELECT count(*) FROM marker");
        assert_eq!(n, (3 * (i + 1)).to_string(), "backup {i}");
    }
    // A time between markers 13 and 14 (after b3, before b4): replayed from b3 exactly.
    let (target, expected) = target_after_marker(&c, nth_marker(&c, 13));
    assert_eq!(expected.split(',').count(), 13, "{expected}");
    let (restored, report) =
        restore_and_start(15, &env, &["--target-time", &target], &[], &Env::new());
    assert!(
        report.contains(&format!("restored backup {}", b(3))),
        "{report}"
    );
    assert_eq!(marker_ids(&restored, None), expected);
    phase("restored the points and a time inside the window");
}
