//! Out of disk space (ENOSPC), for real: small tmpfs mounts (root only; CI runs as root) under a
//! local repository, the spool, `pg_wal` and a restore target. Every failure is one line that
//! says the disk is full and where, exits non-zero (above 125 for `restore_command`, so that
//! recovery stops instead of promoting early), and leaves nothing a later reader takes for a
//! complete object, segment or data directory; once space returns, archiving catches up by
//! itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgpitr_tests::pg::Cluster;
use pgpitr_tests::tmpfs::Tmpfs;
use pgpitr_tests::wal::FakeDataDir;
use pgpitr_tests::{bin, files_under, give_to_pg_user, temp_dir, PG_USER};

const SEG: u32 = 1 << 20;
const SYSID: u64 = 7_400_000_000_000_000_077;

type Env = Vec<(String, String)>;

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `program` from the workspace with `env` only (no config file), in `cwd`.
fn run(program: &str, args: &[&str], cwd: &Path, env: &Env) -> Output {
    Command::new(bin(program))
        .args(args)
        .current_dir(cwd)
        .env_remove("PGPITR_CONFIG")
        .env("PGPITR_LOG", "warn")
        .envs(env.iter().cloned())
        .output()
        .unwrap()
}

/// Asserts `out` failed with one line that says the disk is full and names `location`.
fn assert_disk_full(out: &Output, location: &Path) {
    let err = stderr(out);
    assert_ne!(code(out), 0, "must fail: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.to_lowercase().contains("no space left on device"),
        "must say the disk is full: {err}"
    );
    assert!(
        err.contains(&location.display().to_string()),
        "must name {}: {err}",
        location.display()
    );
}

/// Every file under `dir` (recursively) whose name starts with `prefix`.
fn files_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = files_under(dir);
    found.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
    });
    found
}

/// A fake data directory (`global/pg_control`, `pg_wal/archive_status`) whose synthetic
/// segments the commands archive and restore as PostgreSQL would run them.
struct Fake {
    dir: FakeDataDir,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            dir: FakeDataDir::new("full-fake", SYSID, SEG),
        }
    }

    /// Writes segment `segno` into pg_wal; returns its name and bytes.
    fn segment(&self, segno: u64) -> (String, Vec<u8>) {
        self.dir.write_segment(segno, segno * 7919)
    }

    fn mark_ready(&self, name: &str) {
        self.dir.mark_ready(name);
    }

    fn archive(&self, env: &Env, name: &str) -> Output {
        run(
            "pgpitr-archive",
            &[&format!("pg_wal/{name}"), name],
            &self.dir.pgdata,
            env,
        )
    }

    fn restore(&self, env: &Env, name: &str, dest: &str) -> Output {
        run("pgpitr-restore", &[name, dest], &self.dir.pgdata, env)
    }
}

/// (a) A local repository whose disk is full: the archive call fails in one line naming the
/// repository, leaves no temporary file and nothing `verify` or `pgpitr-restore` takes for the
/// segment; once space is freed the same call succeeds.
#[test]
fn archive_into_a_full_local_repository_fails_cleanly_and_succeeds_once_space_returns() {
    let disk = Tmpfs::mount("full-repo", "3m");
    let repo = disk.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let env: Env = vec![("PGPITR_REPO".into(), repo.display().to_string())];
    let f = Fake::new();
    let (first, _) = f.segment(1);
    let out = f.archive(&env, &first);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let filler = disk.fill("filler");
    let (second, bytes) = f.segment(2);
    let out = f.archive(&env, &second);
    assert_disk_full(&out, &repo);
    assert_eq!(code(&out), 1, "archive_command failures exit 1");
    assert!(
        files_named(&repo, ".tmp.").is_empty(),
        "temporary files left: {:?}",
        files_named(&repo, ".tmp.")
    );
    let out = run("pgpitr", &["verify"], &f.dir.pgdata, &env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = f.restore(&env, &second, "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 1, "not archived: {}", stderr(&out));
    assert!(!f.dir.pgdata.join("pg_wal/RECOVERYXLOG").exists());

    std::fs::remove_file(&filler).unwrap();
    let out = f.archive(&env, &second);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = f.restore(&env, &second, "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(f.dir.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap() == bytes);
    let out = run("pgpitr", &["verify"], &f.dir.pgdata, &env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// `pgpitr-restore` into a full `pg_wal`: a code above 125 (recovery stops rather than
/// promoting without the segment), one line naming where, and no file at `%p`.
#[test]
fn restore_command_into_a_full_pg_wal_stops_recovery_and_leaves_no_partial_file() {
    let dir = temp_dir("full-restore-repo");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let env: Env = vec![
        ("PGPITR_REPO".into(), repo.display().to_string()),
        ("PGPITR_RESTORE_PREFETCH".into(), "0".into()),
    ];
    let f = Fake::new();
    let (name, bytes) = f.segment(1);
    assert_eq!(code(&f.archive(&env, &name)), 0);

    // pg_wal on a file system with room for half a segment.
    let disk = Tmpfs::mount("full-pgwal", "512k");
    let dest = disk.path().join("RECOVERYXLOG");
    let out = f.restore(&env, &name, dest.to_str().unwrap());
    assert_disk_full(&out, disk.path());
    assert!(code(&out) > 125, "must stop recovery: {}", code(&out));
    assert!(!dest.exists(), "a partial %p was left");
    let left: Vec<_> = std::fs::read_dir(disk.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    disk.resize("4m");
    let out = f.restore(&env, &name, dest.to_str().unwrap());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(&dest).unwrap() == bytes);
}

/// (c) The spool on a full (or nearly full) disk: archiving and restoring still succeed, and a
/// segment the refill could write only in part is never left in the spool for PostgreSQL to be
/// handed.
#[test]
fn a_full_spool_never_serves_a_short_segment() {
    let dir = temp_dir("full-spool-repo");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    // Room for one segment and a half.
    let spool = Tmpfs::mount("full-spool", "1536k");
    let env: Env = vec![
        ("PGPITR_REPO".into(), repo.display().to_string()),
        (
            "PGPITR_SPOOL_DIR".into(),
            spool.path().display().to_string(),
        ),
        ("PGPITR_ARCHIVE_BATCH".into(), "8".into()),
        ("PGPITR_RESTORE_PREFETCH".into(), "4".into()),
    ];
    let f = Fake::new();
    let segments: Vec<(String, Vec<u8>)> = (1..=4).map(|n| f.segment(n)).collect();
    for (name, _) in &segments {
        f.mark_ready(name);
    }
    // Archiving with the spool full: the push-ahead markers cannot be written; every call
    // still archives its own segment.
    let filler = spool.fill("filler");
    for (name, _) in &segments {
        let out = f.archive(&env, name);
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
    }
    let markers = files_named(&spool.path().join("archive"), "");
    assert!(markers.is_empty(), "partial markers left: {markers:?}");
    std::fs::remove_file(&filler).unwrap();

    // The refill (what `pgpitr-restore` starts in the background), run here to its end: room
    // for one segment, then ENOSPC in the middle of the next.
    let out = run(
        "pgpitr-restore",
        &["--refill", &segments[0].0, "pg_wal/RECOVERYXLOG"],
        &f.dir.pgdata,
        &env,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let spooled: Vec<PathBuf> = files_named(spool.path(), "");
    assert!(!spooled.is_empty(), "the refill wrote nothing");
    for path in &spooled {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some((_, bytes)) = segments.iter().find(|(n, _)| *n == name) {
            assert!(
                std::fs::read(path).unwrap() == *bytes,
                "{name} in the spool is not the archived segment (short?)"
            );
        } else {
            assert!(
                name.ends_with(".lock"),
                "unexpected file in the spool: {}",
                path.display()
            );
        }
    }
    // Each call gets the whole segment, from the spool or from the repository.
    for (name, bytes) in &segments[1..] {
        let out = f.restore(&env, name, "pg_wal/RECOVERYXLOG");
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
        assert!(
            std::fs::read(f.dir.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap() == *bytes,
            "{name}"
        );
    }
}

fn conninfo(c: &Cluster) -> String {
    format!(
        "host={} port={} user=postgres",
        c.socket_dir.display(),
        c.port
    )
}

fn archiver(c: &Cluster) -> (u64, String) {
    let row = c.psql(
        "SELECT failed_count || ' ' || coalesce(last_archived_wal, '') FROM pg_stat_archiver",
    );
    let (failed, last) = row.split_once(' ').unwrap();
    (failed.parse().unwrap(), last.to_string())
}

fn ready_files(c: &Cluster) -> Vec<String> {
    std::fs::read_dir(c.pg_wal().join("archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".ready"))
        .collect()
}

/// (b) and (d) on real PostgreSQL 15: a local repository on a small tmpfs fills up while the
/// server archives; archiving fails (PostgreSQL keeps the `.ready` files), and catches up by
/// itself once the filler is removed, every archived segment restoring byte for byte. Then a
/// restore of a backup into a target too small for it fails in one line, and leaves nothing
/// PostgreSQL could start from; with room, the same restore works.
#[test]
fn archiving_catches_up_after_a_full_repository_and_a_restore_into_a_full_target_fails_cleanly() {
    let disk = Tmpfs::mount("full-pg-repo", "96m");
    let repo = disk.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    let env: Env = vec![("PGPITR_REPO".into(), repo.display().to_string())];
    let conf = format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{} %p %f'\nmax_wal_senders = 4\nmax_wal_size = '1GB'\ncheckpoint_timeout = '1h'",
        bin("pgpitr-archive").display()
    );
    let mut c = Cluster::init(15, &conf);
    c.env = env.clone();
    c.start();
    c.psql("CREATE TABLE marker (id int primary key)");
    c.psql("INSERT INTO marker SELECT generate_series(1, 100)");
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archived(&seg);

    let filler = disk.fill("filler");
    let (failed_before, _) = archiver(&c);
    let mut switched = Vec::new();
    for i in 0..3 {
        c.psql(&format!(
            "INSERT INTO marker SELECT generate_series({0}, {0} + 99)",
            1000 * (i + 1)
        ));
        switched.push(c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())"));
        c.psql("SELECT pg_switch_wal()");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while archiver(&c).0 <= failed_before {
        assert!(
            std::time::Instant::now() < deadline,
            "archiving into a full disk did not fail:\n{}",
            c.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !ready_files(&c).is_empty(),
        "PostgreSQL must keep the segments it could not archive"
    );
    assert!(
        c.log().contains("no space left on device"),
        "the server log must say why:\n{}",
        c.log()
    );
    assert!(files_named(&repo, ".tmp.").is_empty());

    // Space returns; nothing else is done: PostgreSQL's archiver retries by itself.
    std::fs::remove_file(&filler).unwrap();
    c.wait_archived(switched.last().unwrap());
    c.wait_archive_idle();
    let mut restored = 0;
    let scratch = temp_dir("full-restored-wal");
    for done in std::fs::read_dir(c.pg_wal().join("archive_status"))
        .unwrap()
        .flatten()
    {
        let done = done.file_name().to_string_lossy().into_owned();
        let Some(name) = done.strip_suffix(".done") else {
            continue;
        };
        let original = c.pg_wal().join(name);
        if name.len() != 24 || !original.exists() {
            continue;
        }
        let dest = scratch.path().join(name);
        let out = run(
            "pgpitr-restore",
            &[name, dest.to_str().unwrap()],
            &c.data,
            &env,
        );
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(&original).unwrap(),
            "{name} restored differs from pg_wal"
        );
        restored += 1;
    }
    assert!(restored >= 4, "only {restored} segments compared");

    // A backup, then a restore into a target too small for it.
    let mut benv = env.clone();
    benv.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    let out = run(
        "pgpitr",
        &["backup", "--checkpoint", "fast"],
        &c.data,
        &benv,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    c.psql("INSERT INTO marker VALUES (5000)");
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archived(&seg);

    let target = Tmpfs::mount("full-target", "4m");
    let data = target.path().join("data");
    let args = [
        "restore",
        "--pgdata",
        data.to_str().unwrap(),
        "--target-action",
        "promote",
        "--owner",
        PG_USER,
    ];
    let out = run("pgpitr", &args, &c.data, &env);
    assert_disk_full(&out, target.path());
    assert_eq!(code(&out), 1);
    for marker in [
        "PG_VERSION",
        "global/pg_control",
        "recovery.signal",
        "backup_label",
    ] {
        assert!(
            !data.join(marker).exists(),
            "{marker} left in a data directory that is not complete"
        );
    }
    // With room, the same restore into the same directory works, and recovers everything.
    target.resize("256m");
    let out = run("pgpitr", &args, &c.data, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let root = temp_dir("full-target-sock");
    let mut r = Cluster::adopt(15, root, data);
    r.env = env.clone();
    r.start();
    assert!(
        r.wait_for("SELECT pg_is_in_recovery()", "f", 120),
        "{}",
        r.log()
    );
    assert_eq!(r.psql("SELECT count(*) FROM marker"), "401");
    r.stop();
    drop(r);
    c.stop();
}
