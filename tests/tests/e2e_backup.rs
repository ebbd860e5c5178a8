//! End to end: `pgpitr backup` and `pgpitr list` against real PostgreSQL clusters archiving
//! through `pgpitr-archive`, on a local repository and on Garage. PostgreSQL itself judges the
//! result: a backup materialised from the repository passes `pg_verifybackup` against the
//! `backup_manifest` the server sent.
//!
//! Majors other than 15 run from `PG<major>_SERVER_BIN` (set by scripts/test); one test per
//! major, each failing (never skipping) when that variable is unset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpitr::backup::{materialize, MaterializeOptions};
use pgpitr::repo::layout;
use pgpitr::repo::manifest::{BackupManifest, FileKind};
use pgpitr::storage::Storage;
use pgpitr_tests::garage::Garage;
use pgpitr_tests::pg::{bin_dir, client_bin, Cluster};
use pgpitr_tests::{bin, give_to_pg_user, run_ok, runtime, storage_of, temp_dir};

type Env = Vec<(String, String)>;

fn archiving_cluster(major: u32, env: Env) -> Cluster {
    let conf = format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{} %p %f'\nmax_wal_senders = 4\nmax_wal_size = '1GB'\ncheckpoint_timeout = '1h'",
        bin("pgpitr-archive").display()
    );
    let mut c = Cluster::init(major, &conf);
    c.env = env;
    c.start();
    c
}

fn local_repo() -> (tempfile::TempDir, Env) {
    let dir = temp_dir("repo");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    let env = vec![("PGPITR_REPO".to_string(), repo.display().to_string())];
    (dir, env)
}

fn conninfo(c: &Cluster, user: &str) -> String {
    format!(
        "host={} port={} user={user}",
        c.socket_dir.display(),
        c.port
    )
}

/// Runs `pgpitr <args>` with the repository environment and `conninfo`.
fn pgpitr(env: &Env, conninfo: &str, args: &[&str]) -> Output {
    pgpitr_cmd(env, conninfo, args).output().unwrap()
}

fn pgpitr_cmd(env: &Env, conninfo: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("pgpitr"));
    cmd.args(args)
        .env_remove("PGPITR_CONFIG")
        .env("PGPITR_CONNINFO", conninfo)
        .envs(env.iter().cloned());
    cmd
}

fn backup_ok(env: &Env, conninfo: &str) -> String {
    let out = pgpitr(
        env,
        conninfo,
        &["backup", "--checkpoint", "fast", "--label", "test"],
    );
    assert!(
        out.status.success(),
        "pgpitr backup failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn backup_fails(env: &Env, conninfo: &str, expect: &[&str]) -> String {
    let out = pgpitr(env, conninfo, &["backup", "--checkpoint", "fast"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_failed_saying(&out, expect);
    eprintln!("refused as expected: {}", stderr.trim());
    stderr
}

/// Asserts that a command failed and that its stderr holds every string of `expect`.
fn assert_failed_saying(out: &Output, expect: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail:\n{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
}

/// Every committed backup in the repository, oldest first.
fn manifests(storage: &Arc<dyn Storage>) -> Vec<BackupManifest> {
    runtime().block_on(async {
        let mut out = Vec::new();
        for o in storage.list(layout::BACKUPS_ROOT).await.unwrap() {
            if layout::parse_backup_manifest_key(&o.key).is_some() {
                let body = storage.get(&o.key).await.unwrap();
                out.push(serde_json::from_slice::<BackupManifest>(&body).unwrap());
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    })
}

fn count_keys(storage: &Arc<dyn Storage>, suffix: &str) -> usize {
    runtime().block_on(async {
        storage
            .list(layout::PACKS_ROOT)
            .await
            .unwrap()
            .iter()
            .filter(|o| o.key.ends_with(suffix))
            .count()
    })
}

/// The keys under `prefix`.
fn keys_with(storage: &Arc<dyn Storage>, prefix: &str) -> Vec<String> {
    runtime().block_on(async {
        let list = storage.list(prefix).await.unwrap();
        list.into_iter().map(|o| o.key).collect()
    })
}

/// Waits until the repository has a `repo.json` (the first segment was archived).
fn switch_and_wait_for_archive(c: &Cluster, storage: &Arc<dyn Storage>) {
    c.psql("SELECT pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(60);
    while runtime()
        .block_on(storage.head(layout::REPO_JSON))
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "nothing archived:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Materialises `m` into a fresh directory (tablespaces remapped beside it) and runs
/// `pg_verifybackup -n` on it with the stored `backup_manifest`.
fn verify_with_postgres(storage: &Arc<dyn Storage>, m: &BackupManifest) {
    let root = temp_dir("verify");
    let dest = root.path().join("data");
    let mut opts = MaterializeOptions::default();
    for ts in &m.tablespaces {
        opts.tablespace_map
            .insert(ts.oid, root.path().join(format!("ts{}", ts.oid)));
    }
    let stats = runtime()
        .block_on(materialize(storage.clone(), m, &dest, &opts))
        .unwrap();
    assert!(stats.files > 0);
    let pg_manifest = runtime()
        .block_on(storage.get(&layout::pg_backup_manifest_key(&m.id)))
        .unwrap();
    std::fs::write(dest.join("backup_manifest"), &pg_manifest).unwrap();
    // pg_verifybackup of the server's major if it is there, else PostgreSQL 15's, which reads
    // the manifests of 13 to 16 (17 and later write manifest version 2).
    let major = m.pg_version_num / 10000;
    let beside = bin_dir(major).join("pg_verifybackup");
    let verifier = if beside.exists() {
        beside
    } else if major <= 16 {
        client_bin("pg_verifybackup")
    } else {
        eprintln!("notice: no pg_verifybackup for PostgreSQL {major}: verification skipped");
        return;
    };
    let out = run_ok(Command::new(verifier).arg("-n").arg(&dest));
    assert!(out.contains("successfully verified"), "{out}");
    // Modes as PostgreSQL wants them.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dest), 0o700);
    assert_eq!(mode(&dest.join("PG_VERSION")), 0o600);
    assert_eq!(mode(&dest.join("base")), 0o700);
}

fn file<'a>(m: &'a BackupManifest, path: &str) -> &'a pgpitr::repo::manifest::FileEntry {
    m.files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} not in the manifest"))
}

fn relation_path(c: &Cluster, table: &str) -> String {
    c.psql(&format!("SELECT pg_relation_filepath('{table}')"))
}

/// The whole scenario on one major: tablespace, empty files, big files, thousands of small
/// files, a second backup that stores almost nothing, proof by pg_verifybackup, `list`.
fn full_scenario(major: u32) {
    let (_repo_dir, env) = local_repo();
    let c = archiving_cluster(major, env.clone());
    let store = storage_of(&env);
    let ci = conninfo(&c, "postgres");

    // No WAL is archived yet (no segment was switched): the first backup below creates
    // repo.json itself and then waits for its own WAL to arrive through archive_command.
    assert!(
        !_repo_dir.path().join("repo/repo.json").exists(),
        "no WAL should be archived yet"
    );

    let ts_dir = c.root.path().join("ts1");
    std::fs::create_dir(&ts_dir).unwrap();
    give_to_pg_user(&ts_dir);
    c.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    c.psql("CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    c.psql("CREATE TABLE empty_t (a int)");
    run_ok(c.pgbench().args(["-i", "-s", "10", "-q", "postgres"]));
    c.psql(
        "DO $$ BEGIN FOR i IN 1..2000 LOOP EXECUTE format('CREATE TABLE small_%s (a int)', i); \
         EXECUTE format('INSERT INTO small_%s VALUES (%s)', i, i); END LOOP; END $$",
    );
    c.psql("CHECKPOINT");
    switch_and_wait_for_archive(&c, &store);

    let t = Instant::now();
    let id1 = backup_ok(&env, &ci);
    eprintln!("first backup {id1} took {:?}", t.elapsed());
    let m = manifests(&store);
    assert_eq!(m.len(), 1);
    let first = &m[0];
    assert_eq!(first.id.0, id1);
    assert_eq!(first.label, "test");
    assert!(first.stop_lsn >= first.start_lsn);
    assert_eq!(first.pg_version_num / 10000, major);
    assert!(first.stop_next_xid.is_some());
    assert!(first.new_bytes > 0 && first.new_bytes < first.size_bytes);
    assert_eq!(first.tablespaces.len(), 1);
    let ts_oid = first.tablespaces[0].oid;
    assert_eq!(first.tablespaces[0].location, ts_dir.display().to_string());
    // The tablespace's files, under pg_tblspc/<oid>/.
    let in_ts = relation_path(&c, "in_ts");
    assert!(
        in_ts.starts_with(&format!("pg_tblspc/{ts_oid}/")),
        "{in_ts}"
    );
    assert!(file(first, &in_ts).size > 0);
    // An empty file, a file larger than a chunk, thousands of small files.
    let empty = file(first, &relation_path(&c, "empty_t"));
    assert_eq!((empty.size, empty.chunks.len()), (0, 0));
    let accounts = file(first, &relation_path(&c, "pgbench_accounts"));
    assert!(accounts.size > 4 << 20 && accounts.chunks.len() >= 2);
    assert!(file(first, &relation_path(&c, "small_1999")).size > 0);
    let regular = first
        .files
        .iter()
        .filter(|f| f.kind == FileKind::File)
        .count();
    assert!(regular > 2900, "{regular} files");
    for name in ["backup_label", "tablespace_map", "global/pg_control"] {
        assert!(file(first, name).size > 0, "{name}");
    }
    assert!(first
        .files
        .iter()
        .all(|f| !f.path.starts_with("pg_wal/") || f.kind == FileKind::Directory));

    // A second backup of the unchanged cluster stores almost nothing new.
    let id2 = backup_ok(&env, &ci);
    let m = manifests(&store);
    assert_eq!(m.len(), 2);
    let second = &m[1];
    assert_eq!(second.id.0, id2);
    let ratio = second.new_bytes as f64 / second.size_bytes as f64;
    eprintln!(
        "second backup: {} new bytes of {} ({:.3}%)",
        second.new_bytes,
        second.size_bytes,
        ratio * 100.0
    );
    assert!(
        ratio <= 0.01,
        "second backup stored {:.2}% new",
        ratio * 100.0
    );

    // PostgreSQL's own judgement of what the repository holds.
    verify_with_postgres(&store, second);

    // `pgpitr list`, for people and for scripts.
    let out = pgpitr(&env, &ci, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&id1) && text.contains(&id2), "{text}");
    let out = pgpitr(&env, &ci, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let backups = doc["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2);
    assert_eq!(backups[1]["id"], id2.as_str());
    assert!(backups[1]["new_bytes"].as_u64().is_some());
    assert!(!doc["wal"].as_array().unwrap().is_empty(), "{doc}");
}

#[test]
fn backup_of_pg15_into_local_repository() {
    full_scenario(15);
}

#[test]
fn backup_of_pg13() {
    full_scenario(13);
}

#[test]
fn backup_of_pg14() {
    full_scenario(14);
}

#[test]
fn backup_of_pg16() {
    full_scenario(16);
}

#[test]
fn backup_of_pg17() {
    full_scenario(17);
}

#[test]
fn backup_of_pg18() {
    full_scenario(18);
}

#[test]
fn killed_backup_leaves_no_manifest_and_its_chunks_are_reused() {
    let (repo_dir, env) = local_repo();
    let c = archiving_cluster(15, env.clone());
    let store = storage_of(&env);
    let ci = conninfo(&c, "postgres");
    // Poorly compressible rows (hex text), so that packs fill early in the backup.
    // Frozen and without autovacuum, so that its pages do not change between the backups.
    c.psql("CREATE TABLE noise WITH (autovacuum_enabled = off) AS SELECT g, md5(g::text) || md5((g * 7)::text) AS t FROM generate_series(1, 2500000) g");
    c.psql("VACUUM (FREEZE, ANALYZE) noise");
    c.psql("CHECKPOINT");
    switch_and_wait_for_archive(&c, &store);

    let mut child = pgpitr_cmd(&env, &ci, &["backup", "--checkpoint", "fast"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut problem = None;
    while count_keys(&store, ".idx") < 2 {
        if child.try_wait().unwrap().is_some() {
            problem = Some("backup finished before it could be killed");
            break;
        }
        if Instant::now() > deadline {
            problem = Some("no packs appeared");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of our own child (still unreaped, so the pid is ours).
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    if let Some(p) = problem {
        panic!("{p}");
    }
    let packs_before = count_keys(&store, ".pack");
    assert!(packs_before >= 2);
    assert!(
        manifests(&store).is_empty(),
        "a killed backup left a manifest"
    );
    assert!(!walk_has(repo_dir.path(), "manifest.json"));

    // The killed backup's repository lock stays behind; its holder ran on this host and is
    // gone, so the next backup breaks it by itself (with a warning naming it), no `pgpitr
    // unlock` needed.
    let locks = keys_with(&store, layout::LOCKS_ROOT);
    assert_eq!(locks.len(), 1, "the killed backup's lock: {locks:?}");
    let out = pgpitr(
        &env,
        &ci,
        &["backup", "--checkpoint", "fast", "--label", "test"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgpitr backup failed:\n{stderr}");
    assert!(
        stderr.contains("broke the stale repository lock")
            && stderr.contains(&locks[0])
            && stderr.contains(&format!("pid {}", child.id()))
            && stderr.contains("not running"),
        "{stderr}"
    );
    assert!(keys_with(&store, layout::LOCKS_ROOT).is_empty());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let m = manifests(&store);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].id.0, id);
    // What a full backup of these files would store: every distinct chunk once.
    let mut seen = std::collections::HashSet::new();
    let full: u64 = m[0]
        .files
        .iter()
        .flat_map(|f| &f.chunks)
        .filter(|c| seen.insert(c.sha256.clone()))
        .map(|c| c.length)
        .sum();
    eprintln!(
        "after the kill: {} new bytes of a full {full}",
        m[0].new_bytes
    );
    // The killed backup had stored at least two packs (~64 MiB of this ~190 MiB).
    assert!(
        m[0].new_bytes < full / 10 * 9,
        "the chunks of the killed backup were not reused"
    );
    verify_with_postgres(&store, &m[0]);
}

fn walk_has(dir: &Path, name: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p: PathBuf = e.path();
        if p.is_dir() {
            walk_has(&p, name)
        } else {
            e.file_name() == name
        }
    })
}

#[test]
fn bad_input_is_refused_before_the_checkpoint_and_writes_no_manifest() {
    let (_repo_dir, env) = local_repo();
    let c = archiving_cluster(15, env.clone());
    let store = storage_of(&env);
    switch_and_wait_for_archive(&c, &store);
    let checkpoints = || c.psql("SELECT checkpoints_req FROM pg_stat_bgwriter");
    let before = checkpoints();

    // A role with a password, and a role without REPLICATION.
    c.psql("SET password_encryption = 'scram-sha-256'; CREATE ROLE bob LOGIN REPLICATION PASSWORD 'right'");
    c.psql("CREATE ROLE carol LOGIN");
    let hba = c.data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("local replication bob scram-sha-256\nlocal all bob scram-sha-256\n{old}"),
    )
    .unwrap();
    c.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));

    backup_fails(
        &env,
        &format!("{} password=wrong", conninfo(&c, "bob")),
        &["authentication failed", "bob", "hint:"],
    );
    backup_fails(
        &env,
        &conninfo(&c, "carol"),
        &["carol", "replication", "ALTER ROLE"],
    );
    // The right password works.
    let out = pgpitr(
        &env,
        &format!("{} password=right", conninfo(&c, "bob")),
        &["backup", "--checkpoint", "fast"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = manifests(&store).len();
    assert_eq!(committed, 1);

    // Another cluster into this repository.
    let mut other = Cluster::init(
        15,
        "max_wal_senders = 4\narchive_mode = on\narchive_command = '/bin/true'",
    );
    other.start();
    backup_fails(
        &env,
        &conninfo(&other, "postgres"),
        &["system identifier", "give each cluster its own repository"],
    );
    // wal_level = minimal (which forces max_wal_senders = 0).
    let mut minimal = Cluster::init(
        15,
        "wal_level = minimal\nmax_wal_senders = 0\narchive_mode = off",
    );
    minimal.start();
    backup_fails(
        &env,
        &conninfo(&minimal, "postgres"),
        &["wal_level", "replica"],
    );
    // An unreachable repository.
    let bad_env = vec![(
        "PGPITR_REPO".to_string(),
        "/nonexistent/pgpitr/repo".to_string(),
    )];
    backup_fails(
        &bad_env,
        &conninfo(&c, "postgres"),
        &["/nonexistent/pgpitr/repo"],
    );

    assert_eq!(manifests(&store).len(), committed);
    // Only the successful backup asked for a checkpoint.
    let after: u64 = checkpoints().parse().unwrap();
    assert!(
        after <= before.parse::<u64>().unwrap() + 1,
        "{before} -> {after}"
    );
}

/// A backup whose WAL never reaches the repository fails after `--wal-timeout` with an error
/// that names archive_command, and commits nothing; once archiving works again, the next backup
/// succeeds. (With the server's `WAIT true` the backup would hang for ever instead.)
#[test]
fn a_backup_whose_wal_is_never_archived_fails_at_the_wal_timeout() {
    let (_repo_dir, env) = local_repo();
    let c = archiving_cluster(15, env.clone());
    let store = storage_of(&env);
    switch_and_wait_for_archive(&c, &store);
    c.psql("ALTER SYSTEM SET archive_command = '/bin/false'");
    c.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));

    let mut child = pgpitr_cmd(
        &env,
        &conninfo(&c, "postgres"),
        &["backup", "--checkpoint", "fast", "--wal-timeout", "3"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("pgpitr backup still waiting for its WAL after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert_failed_saying(
        &out,
        &[
            "not in the repository after 3s",
            "archive_command",
            "--wal-timeout",
        ],
    );
    assert!(manifests(&store).is_empty());

    c.psql("ALTER SYSTEM RESET archive_command");
    c.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    backup_ok(&env, &conninfo(&c, "postgres"));
    assert_eq!(manifests(&store).len(), 1);
}

#[test]
fn backup_and_list_on_s3() {
    let g = Garage::shared();
    let bucket = g.bucket();
    let env = g.env(&bucket, "pg15");
    let c = archiving_cluster(15, env.clone());
    let store = storage_of(&env);
    let ci = conninfo(&c, "postgres");
    run_ok(c.pgbench().args(["-i", "-s", "5", "-q", "postgres"]));
    switch_and_wait_for_archive(&c, &store);
    let id = backup_ok(&env, &ci);
    let m = manifests(&store);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].id.0, id);
    assert!(count_keys(&store, ".idx") >= 1);
    verify_with_postgres(&store, &m[0]);
    let out = pgpitr(&env, &ci, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
}
