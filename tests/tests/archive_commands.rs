//! `pgpitr-archive` and `pgpitr-restore` as PostgreSQL runs them — subprocesses in the data
//! directory with `%p` and `%f` — on synthetic segments: the archive_command and
//! restore_command contracts, bad input, and both repository kinds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgpitr_tests::garage::Garage;
use pgpitr_tests::wal::{synthetic_pg_control, synthetic_segment};
use pgpitr_tests::{bin, runtime, storage_of, temp_dir};

const SEG: u32 = 1 << 20; // initdb --wal-segsize=1: segment sizes are read from WAL, never assumed
const SYSID: u64 = 7_400_000_000_000_000_042;

/// A fake data directory with `global/pg_control`, `pg_wal/archive_status` and a repository.
struct Fixture {
    _dir: tempfile::TempDir,
    pgdata: PathBuf,
    env: Vec<(String, String)>,
}

impl Fixture {
    fn local() -> Fixture {
        let dir = temp_dir("archive");
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        Fixture::with_env(
            dir,
            vec![("PGPITR_REPO".into(), repo.display().to_string())],
        )
    }

    fn s3() -> Fixture {
        let g = Garage::shared();
        let bucket = g.bucket();
        Fixture::with_env(temp_dir("archive-s3"), g.env(&bucket, "cluster1"))
    }

    fn with_env(dir: tempfile::TempDir, env: Vec<(String, String)>) -> Fixture {
        let pgdata = dir.path().join("pgdata");
        std::fs::create_dir_all(pgdata.join("pg_wal/archive_status")).unwrap();
        std::fs::create_dir_all(pgdata.join("global")).unwrap();
        std::fs::write(
            pgdata.join("global/pg_control"),
            synthetic_pg_control(SYSID),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            pgdata,
            env,
        }
    }

    fn repo(&self) -> PathBuf {
        PathBuf::from(&self.env[0].1)
    }

    fn write_segment(&self, segno: u64, seed: u64) -> String {
        let name = format!(
            "00000001{:08X}{:08X}",
            segno / (0x1_0000_0000 / u64::from(SEG)),
            segno % (0x1_0000_0000 / u64::from(SEG))
        );
        std::fs::write(
            self.pgdata.join("pg_wal").join(&name),
            synthetic_segment(SYSID, SEG, segno, seed),
        )
        .unwrap();
        name
    }

    fn mark_ready(&self, name: &str) {
        std::fs::write(
            self.pgdata
                .join("pg_wal/archive_status")
                .join(format!("{name}.ready")),
            "",
        )
        .unwrap();
    }

    fn cmd(&self, program: &str, args: &[&str]) -> Output {
        self.cmd_with(program, args, &[])
    }

    /// [`Fixture::cmd`] with `extra` variables set after the fixture's own (so overriding them).
    fn cmd_with(&self, program: &str, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut c = Command::new(bin(program));
        c.args(args)
            .current_dir(&self.pgdata)
            .env_remove("PGPITR_CONFIG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// What PostgreSQL does once archive_command succeeded: `.ready` becomes `.done`.
    fn mark_done(&self, name: &str) {
        let status = self.pgdata.join("pg_wal/archive_status");
        std::fs::rename(
            status.join(format!("{name}.ready")),
            status.join(format!("{name}.done")),
        )
        .unwrap();
    }

    fn archive(&self, name: &str) -> Output {
        self.cmd("pgpitr-archive", &[&format!("pg_wal/{name}"), name])
    }

    fn restore(&self, name: &str, dest: &str) -> Output {
        self.cmd("pgpitr-restore", &[name, dest])
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// The names of the WAL segments stored in the local repository `repo`.
fn archived_names(repo: &Path) -> Vec<String> {
    let mut names: Vec<String> = walk(repo)
        .iter()
        .filter_map(|k| {
            let key = k.strip_prefix(&format!("{}/", repo.display()))?;
            pgpitr::repo::layout::parse_wal_object_key(key).map(|(n, _)| n.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn archive_contract(f: &Fixture) {
    let seg1 = f.write_segment(1, 11);
    let out = f.archive(&seg1);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        out.stderr.is_empty(),
        "archive of a new segment must be quiet: {}",
        stderr(&out)
    );

    // Same name, same content: success.
    let out = f.archive(&seg1);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // Same name, different content: refused, archived copy untouched.
    let original = std::fs::read(f.pgdata.join("pg_wal").join(&seg1)).unwrap();
    f.write_segment(1, 99);
    let out = f.archive(&seg1);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("already exists in the archive with a different checksum"),
        "{}",
        stderr(&out)
    );
    let got = f.restore(&seg1, "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&got), 0, "{}", stderr(&got));
    assert!(
        std::fs::read(f.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap() == original,
        "archived copy changed"
    );

    // .history files are never overwritten; .partial and .backup keep their own names.
    std::fs::write(
        f.pgdata.join("pg_wal/00000002.history"),
        "1\t0/3000000\tno recovery target specified\n",
    )
    .unwrap();
    assert_eq!(code(&f.archive("00000002.history")), 0);
    std::fs::write(
        f.pgdata.join("pg_wal/00000002.history"),
        "1\t0/4000000\tother\n",
    )
    .unwrap();
    assert_eq!(code(&f.archive("00000002.history")), 1);
    let partial = format!("{seg1}.partial");
    std::fs::copy(
        f.pgdata.join("pg_wal").join(&seg1),
        f.pgdata.join("pg_wal").join(&partial),
    )
    .unwrap();
    assert_eq!(code(&f.archive(&partial)), 0);
    let backup = "000000010000000000000001.00000028.backup";
    std::fs::write(
        f.pgdata.join("pg_wal").join(backup),
        "START WAL LOCATION: 0/100028\n",
    )
    .unwrap();
    assert_eq!(code(&f.archive(backup)), 0);

    let first_history = b"1\t0/3000000\tno recovery target specified\n".to_vec();
    let expected = [
        ("00000002.history", first_history),
        (
            partial.as_str(),
            std::fs::read(f.pgdata.join("pg_wal").join(&partial)).unwrap(),
        ),
        (
            backup,
            std::fs::read(f.pgdata.join("pg_wal").join(backup)).unwrap(),
        ),
    ];
    for (name, content) in expected {
        let out = f.restore(name, "pg_wal/RECOVERYHISTORY");
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
        assert!(
            std::fs::read(f.pgdata.join("pg_wal/RECOVERYHISTORY")).unwrap() == content,
            "{name} differs"
        );
    }
    // A missing file: exit 1, quietly, nothing written.
    let out = f.restore("000000010000000000000077", "pg_wal/RECOVERYXLOG.missing");
    assert_eq!(code(&out), 1);
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
    assert!(!f.pgdata.join("pg_wal/RECOVERYXLOG.missing").exists());
}

#[test]
fn archive_and_restore_contract_on_local_directory() {
    let f = Fixture::local();
    archive_contract(&f);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.repo().join("repo.json")).unwrap()).unwrap();
    assert_eq!(json["system_identifier"], SYSID.to_string());
    assert_eq!(json["wal_segment_size"], SEG);
    assert_eq!(json["pg_major"], 15);
}

#[test]
fn archive_and_restore_contract_on_s3() {
    archive_contract(&Fixture::s3());
}

/// Issue 15, item 7: a name stored with two contents (writers that raced on storage without
/// conditional PUT) fails every push of it, whichever content it carries, since
/// `pgpitr-restore` refuses the name (exit 202) and recovery would stop there.
fn two_stored_versions_contract(f: &Fixture) {
    use pgpitr::storage::{PutMode, Storage};
    let name = f.write_segment(1, 11);
    let out = f.archive(&name);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // The second content, stored as the losing writer of a race stores it: pushed into a
    // scratch repository by the library, its object copied under its own key.
    let scratch = temp_dir("scratch");
    let other = scratch.path().join("other-content");
    std::fs::write(&other, synthetic_segment(SYSID, SEG, 1, 99)).unwrap();
    let store = storage_of(&f.env);
    runtime().block_on(async {
        let local = pgpitr::storage::local::LocalStorage::new(scratch.path());
        let wal_name = name.parse().unwrap();
        pgpitr::repo::wal::push(&local, wal_name, &other)
            .await
            .unwrap();
        let planted = &pgpitr::repo::wal::find(&local, wal_name).await.unwrap()[0];
        let bytes = local.get(&planted.key).await.unwrap();
        store
            .put(&planted.key, bytes, PutMode::Create)
            .await
            .unwrap();
    });

    for seed in [11, 99, 7] {
        f.write_segment(1, seed);
        let out = f.archive(&name);
        assert_eq!(code(&out), 1, "content {seed}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "WAL file '{name}' is stored 2 times with different contents"
            )),
            "content {seed}: {}",
            stderr(&out)
        );
    }
    let out = f.restore(&name, "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 202, "{}", stderr(&out));
    assert!(stderr(&out).contains("stored 2 times"), "{}", stderr(&out));
    assert!(!f.pgdata.join("pg_wal/RECOVERYXLOG").exists());
}

#[test]
fn two_stored_versions_fail_every_push_on_local_directory() {
    two_stored_versions_contract(&Fixture::local());
}

#[test]
fn two_stored_versions_fail_every_push_on_s3() {
    two_stored_versions_contract(&Fixture::s3());
}

#[test]
fn batching_pushes_ready_segments_ahead_and_prefetch_serves_from_spool() {
    let f = Fixture::local();
    let names: Vec<String> = (1..=6).map(|n| f.write_segment(n, n)).collect();
    for n in &names {
        f.mark_ready(n);
    }
    assert_eq!(code(&f.archive(&names[0])), 0);
    // The others are already stored: the objects exist before PostgreSQL asks for them.
    let stored = walk(&f.repo());
    for n in &names {
        assert!(
            stored.iter().any(|k| k.contains(n.as_str())),
            "{n} not pushed ahead: {stored:?}"
        );
    }
    let marker =
        bound_spool(&f.pgdata.join("pg_wal/pgpitr_spool/archive")).join(format!("{}.ok", names[1]));
    assert!(marker.exists());
    assert_eq!(code(&f.archive(&names[1])), 0);
    assert!(
        !marker.exists(),
        "marker is consumed by the call it answers"
    );
    // A marker never vouches for changed bytes: rewrite segment 3, the call must really compare.
    f.write_segment(3, 1234);
    let out = f.archive(&names[2]);
    assert_eq!(
        code(&out),
        1,
        "changed segment accepted through a stale marker: {}",
        stderr(&out)
    );

    // Restore: the first call starts a background refill of the spool, which fetches the
    // following segments while the call has already returned; the next call is a rename.
    let out = f.restore(&names[0], "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let restore_spool = f.pgdata.join("pg_wal/pgpitr_spool/restore");
    while bound_spools(&restore_spool).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no spool created");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let spool = bound_spool(&restore_spool);
    while !names[1..].iter().all(|n| spool.join(n).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "segments 2-6 not prefetched: {:?}",
            std::fs::read_dir(&spool)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The refill has ended: its lock is free (a second refill would run).
    let lock = spool.with_extension("lock");
    while std::fs::File::open(&lock).unwrap().try_lock().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the refill never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Prefetched files are whole and verified: byte for byte what was archived.
    for n in &names[3..] {
        assert_eq!(
            std::fs::read(spool.join(n)).unwrap(),
            std::fs::read(f.pgdata.join("pg_wal").join(n)).unwrap()
        );
    }
    // Break the repository: a spooled segment must still be served.
    std::fs::rename(f.repo(), f.repo().with_extension("moved")).unwrap();
    let out = f.restore(&names[1], "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read(f.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap(),
        std::fs::read(f.pgdata.join("pg_wal").join(&names[1])).unwrap()
    );
}

#[test]
fn bad_input_is_a_one_line_error_and_writes_nothing() {
    let f = Fixture::local();
    let seg = f.write_segment(1, 1);
    let cases: Vec<(&str, Vec<&str>, i32, &str)> = vec![
        ("pgpitr-archive", vec![], 2, "required"),
        ("pgpitr-archive", vec!["pg_wal/x"], 2, "required"),
        (
            "pgpitr-archive",
            vec!["pg_wal/x", "../x"],
            2,
            "invalid WAL file name '../x'",
        ),
        (
            "pgpitr-archive",
            vec!["/etc/passwd", "/etc/passwd"],
            2,
            "invalid WAL file name '/etc/passwd'",
        ),
        (
            "pgpitr-archive",
            vec!["pg_wal/x", "00000001000000000000001"],
            2,
            "invalid WAL file name",
        ),
        (
            "pgpitr-archive",
            vec!["pg_wal/nope", "000000010000000000000009"],
            2,
            "cannot read %p",
        ),
        ("pgpitr-restore", vec![], 200, "required"),
        (
            "pgpitr-restore",
            vec!["../x", "pg_wal/RECOVERYXLOG"],
            200,
            "invalid WAL file name",
        ),
        (
            "pgpitr-restore",
            vec!["/etc/passwd", "pg_wal/RECOVERYXLOG"],
            200,
            "invalid WAL file name",
        ),
    ];
    for (program, args, expected, message) in cases {
        let out = f.cmd(program, &args);
        assert_eq!(code(&out), expected, "{program} {args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(message),
            "{program} {args:?}: {}",
            stderr(&out)
        );
    }
    // A segment whose header does not match its name (a file copied under the wrong name).
    std::fs::copy(
        f.pgdata.join("pg_wal").join(&seg),
        f.pgdata.join("pg_wal/000000010000000000000005"),
    )
    .unwrap();
    let out = f.archive("000000010000000000000005");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("is not the WAL segment"),
        "{}",
        stderr(&out)
    );
    assert!(
        walk(&f.repo()).is_empty(),
        "nothing may be written: {:?}",
        walk(&f.repo())
    );

    // A repository that does not exist, or is not writable.
    let mut missing = Fixture::local();
    missing.env[0].1 = "/nonexistent/repo".into();
    missing.write_segment(1, 1);
    let out = missing.archive(&seg);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let out = missing.restore(&seg, "pg_wal/RECOVERYXLOG");
    assert!(
        code(&out) > 125,
        "unreachable repository must stop recovery: {}",
        code(&out)
    );
    if !pgpitr_tests::is_root() {
        pgpitr_tests::set_mode(&f.repo(), 0o500);
        let out = f.archive(&seg);
        assert!(stderr(&out).contains("not writable"), "{}", stderr(&out));
        pgpitr_tests::set_mode(&f.repo(), 0o755);
    }
    // A relative repository path.
    let mut relative = Fixture::local();
    relative.env[0].1 = "repo".into();
    relative.write_segment(1, 1);
    let out = relative.archive(&seg);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("absolute path"), "{}", stderr(&out));
}

#[test]
fn wal_of_another_cluster_is_refused() {
    let f = Fixture::local();
    let seg = f.write_segment(1, 1);
    assert_eq!(code(&f.archive(&seg)), 0);
    let other = synthetic_segment(SYSID + 1, SEG, 2, 2);
    std::fs::write(f.pgdata.join("pg_wal/000000010000000000000002"), other).unwrap();
    let out = f.archive("000000010000000000000002");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("belongs to the cluster with system identifier"),
        "{}",
        stderr(&out)
    );
    // A non-empty location without repo.json is not adopted.
    let g = Fixture::local();
    std::fs::write(g.repo().join("somebody-elses-file"), "x").unwrap();
    let seg = g.write_segment(1, 1);
    let out = g.archive(&seg);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("is not a pgpitr repository"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn corrupt_object_stops_recovery_and_writes_nothing() {
    let f = Fixture::local();
    let seg = f.write_segment(1, 1);
    assert_eq!(code(&f.archive(&seg)), 0);
    let object = walk(&f.repo())
        .into_iter()
        .find(|k| k.contains(&seg))
        .unwrap();
    let sound = std::fs::read(&object).unwrap();
    // A byte in the middle of the frames, then one in a part hash of the part index at the end.
    for at in [sound.len() / 2, sound.len() - 30] {
        let mut bytes = sound.clone();
        bytes[at] ^= 0xFF;
        std::fs::write(&object, bytes).unwrap();
        let out = f.restore(&seg, "pg_wal/RECOVERYXLOG");
        assert_eq!(code(&out), 202, "byte {at}: {}", stderr(&out));
        assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
        assert!(
            !f.pgdata.join("pg_wal/RECOVERYXLOG").exists(),
            "%p written despite a failed verification"
        );
    }
    std::fs::write(&object, sound).unwrap();
    assert_eq!(code(&f.restore(&seg, "pg_wal/RECOVERYXLOG")), 0);
}

/// The spool directories under `dir` (`<spool>/<purpose>`), one per repository and cluster.
fn bound_spools(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// The one spool directory under `dir`.
fn bound_spool(dir: &Path) -> PathBuf {
    let dirs = bound_spools(dir);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.into_iter().next().unwrap()
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// An S3 endpoint that answers every request with HTTP 500, counting them.
fn failing_s3_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the request head (and any body the client sends with it), then fail.
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (format!("http://{addr}"), count)
}

#[test]
fn storage_errors_are_retried_then_fatal_for_restore_and_retryable_for_archive() {
    let (endpoint, requests) = failing_s3_endpoint();
    let env: Vec<(String, String)> = [
        ("PGPITR_REPO", "s3://bucket/prefix".to_string()),
        ("PGPITR_S3_ENDPOINT", endpoint),
        ("PGPITR_S3_REGION", "garage".to_string()),
        ("PGPITR_S3_FORCE_PATH_STYLE", "true".to_string()),
        (
            "AWS_ACCESS_KEY_ID",
            pgpitr_tests::garage::KEY_ID.to_string(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY",
            pgpitr_tests::garage::SECRET.to_string(),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let f = Fixture::with_env(temp_dir("s3-500"), env);
    let seg = f.write_segment(1, 1);

    let out = f.restore(&seg, "pg_wal/RECOVERYXLOG");
    assert_eq!(
        code(&out),
        201,
        "a failing server must stop recovery, not look like a missing file: {}",
        stderr(&out)
    );
    assert!(!f.pgdata.join("pg_wal/RECOVERYXLOG").exists());
    assert!(
        requests.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "no retries happened"
    );
    assert!(
        !stderr(&out).contains(pgpitr_tests::garage::SECRET),
        "secret leaked: {}",
        stderr(&out)
    );

    let out = f.archive(&seg);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("storage unavailable") || stderr(&out).contains("HTTP 500"),
        "{}",
        stderr(&out)
    );
}

/// Issue 15, item 1: `archive_command = 'PGPITR_REPO=/a pgpitr-archive %p %f && PGPITR_REPO=/b
/// pgpitr-archive %p %f'` with a backlog longer than one batch. The call into one repository
/// pushes segments ahead and leaves markers; they must never answer a call for the other
/// repository (which lost most of the backlog, every call exiting 0), nor a call after `repo`
/// changed, nor one into a repository emptied since the marker was written.
#[test]
fn markers_vouch_only_for_the_repository_they_were_pushed_to() {
    let f = Fixture::local();
    let a = f.repo();
    let b_root = temp_dir("archive-b");
    let b = b_root.path().join("repo");
    std::fs::create_dir(&b).unwrap();
    let names: Vec<String> = (1..=12).map(|n| f.write_segment(n, n)).collect();
    for n in &names {
        f.mark_ready(n);
    }
    let archive_to = |repo: &Path, name: &str| {
        let out = f.cmd_with(
            "pgpitr-archive",
            &[&format!("pg_wal/{name}"), name],
            &[
                ("PGPITR_REPO", &repo.display().to_string()),
                ("PGPITR_ARCHIVE_BATCH", "4"),
            ],
        );
        assert_eq!(
            code(&out),
            0,
            "{name} into {}: {}",
            repo.display(),
            stderr(&out)
        );
    };
    // PostgreSQL's calls, in order, each one the `&&` of two commands.
    for n in &names[..8] {
        archive_to(&a, n);
        archive_to(&b, n);
        f.mark_done(n);
    }
    // Every call exited 0, so every name PostgreSQL marked done is in both (pushing ahead may
    // have stored a few more).
    for (label, repo) in [("a", &a), ("b", &b)] {
        let stored = archived_names(repo);
        let missing: Vec<&String> = names[..8].iter().filter(|n| !stored.contains(n)).collect();
        assert!(missing.is_empty(), "repository {label} misses {missing:?}");
    }

    // `repo` changed from a to b while markers for a are outstanding (9 pushed 10-12 ahead).
    archive_to(&a, &names[8]);
    f.mark_done(&names[8]);
    for n in &names[9..] {
        archive_to(&b, n);
    }
    assert_eq!(archived_names(&b), names, "repository b after the change");

    // A repository emptied (and recreated) after markers were written into it.
    let g = Fixture::local();
    let names: Vec<String> = (1..=4).map(|n| g.write_segment(n, n)).collect();
    for n in &names {
        g.mark_ready(n);
    }
    assert_eq!(code(&g.archive(&names[0])), 0);
    assert_eq!(archived_names(&g.repo()), names, "pushed ahead");
    std::fs::remove_dir_all(g.repo()).unwrap();
    std::fs::create_dir(g.repo()).unwrap();
    for n in &names[1..] {
        let out = g.archive(n);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let stored = archived_names(&g.repo());
    assert!(
        names[1..].iter().all(|n| stored.contains(n)),
        "after emptying: {stored:?}"
    );
}

/// Issue 15, item 2: `pgpitr-restore` in the data directory of one cluster, configured with the
/// repository of another, writes nothing and stops recovery (exit above 125) instead of handing
/// over the other cluster's WAL; a data directory it cannot identify is refused too; and a
/// spool shared between clusters or left by another repository is never handed over.
#[test]
fn restore_refuses_another_clusters_wal_and_spool() {
    let shared_spool = temp_dir("shared-spool");
    let spool_env = (
        "PGPITR_SPOOL_DIR".to_string(),
        shared_spool.path().display().to_string(),
    );
    let mut f = Fixture::local();
    f.env.push(spool_env.clone());
    let names: Vec<String> = (1..=4).map(|n| f.write_segment(n, n)).collect();
    for n in &names {
        assert_eq!(code(&f.archive(n)), 0);
    }
    let history = "00000002.history";
    std::fs::write(
        f.pgdata.join("pg_wal").join(history),
        "1\t0/3000000\tno recovery target specified\n",
    )
    .unwrap();
    assert_eq!(code(&f.archive(history)), 0);

    // Another cluster's data directory, this cluster's repository.
    let other = Fixture::with_env(temp_dir("other-cluster"), f.env.clone());
    std::fs::write(
        other.pgdata.join("global/pg_control"),
        synthetic_pg_control(SYSID + 1),
    )
    .unwrap();
    for name in [names[0].as_str(), history] {
        let out = other.restore(name, "pg_wal/RECOVERYXLOG");
        assert_eq!(code(&out), 202, "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("belongs to the cluster with system identifier"),
            "{}",
            stderr(&out)
        );
        assert!(!other.pgdata.join("pg_wal/RECOVERYXLOG").exists());
    }
    // No pg_control at all: not a data directory.
    std::fs::remove_file(other.pgdata.join("global/pg_control")).unwrap();
    let out = other.restore(&names[0], "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("global/pg_control"),
        "{}",
        stderr(&out)
    );
    assert!(!other.pgdata.join("pg_wal/RECOVERYXLOG").exists());

    // This cluster restores: its refill spools segments 2-4 in the shared spool.
    assert_eq!(code(&f.restore(&names[0], "pg_wal/RECOVERYXLOG")), 0);
    let spool_root = shared_spool.path().join("restore");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let spools = bound_spools(&spool_root);
        if spools.len() == 1 && names[1..].iter().all(|n| spools[0].join(n).exists()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "segments not prefetched"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let lock = bound_spool(&spool_root).with_extension("lock");
    while std::fs::File::open(&lock).unwrap().try_lock().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the refill never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // A third cluster sharing the spool, with its own repository holding its own segment 2:
    // it gets its own bytes, and "not found" for segment 3, never the spooled files.
    let mut third = Fixture::local();
    third.env.push(spool_env);
    std::fs::write(
        third.pgdata.join("global/pg_control"),
        synthetic_pg_control(SYSID + 2),
    )
    .unwrap();
    let own = synthetic_segment(SYSID + 2, SEG, 2, 99);
    std::fs::write(third.pgdata.join("pg_wal").join(&names[1]), &own).unwrap();
    assert_eq!(code(&third.archive(&names[1])), 0);
    std::fs::remove_file(third.pgdata.join("pg_wal").join(&names[1])).unwrap();
    let out = third.restore(&names[1], "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(third.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap() == own);
    let out = third.restore(&names[2], "pg_wal/RECOVERYXLOG");
    assert_eq!(
        code(&out),
        1,
        "another cluster's spooled segment handed over: {}",
        stderr(&out)
    );

    // The same data directory with `repo` changed to a repository without segment 3: not
    // found, although the spool of the first repository holds it.
    let empty_root = temp_dir("repo-c");
    let c = empty_root.path().join("repo");
    std::fs::create_dir(&c).unwrap();
    let out = f.cmd_with(
        "pgpitr-archive",
        &[&format!("pg_wal/{}", names[0]), &names[0]],
        &[("PGPITR_REPO", &c.display().to_string())],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = f.cmd_with(
        "pgpitr-restore",
        &[&names[2], "pg_wal/RECOVERYXLOG"],
        &[("PGPITR_REPO", &c.display().to_string())],
    );
    assert_eq!(
        code(&out),
        1,
        "another repository's spooled segment handed over: {}",
        stderr(&out)
    );
    // With its own repository it is still served from the spool, byte for byte.
    std::fs::rename(f.repo(), f.repo().with_extension("moved")).unwrap();
    let out = f.restore(&names[2], "pg_wal/RECOVERYXLOG");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        std::fs::read(f.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap()
            == std::fs::read(f.pgdata.join("pg_wal").join(&names[2])).unwrap()
    );
}

/// Issue 15, item 3: no error message quotes a configuration value, a connection string or a
/// credential. The stderr of each of these failing calls (PostgreSQL's log, for the archive and
/// restore commands) is searched for the secret.
#[test]
fn failing_calls_never_print_a_secret() {
    const PASSWORD: &str = "Secr3tPw";
    let f = Fixture::local();
    let seg = f.write_segment(1, 1);
    let dir = temp_dir("secret-config");
    let leaks = |what: &str, out: &Output| {
        let err = stderr(out);
        assert!(!out.status.success(), "{what} succeeded: {err}");
        for secret in [PASSWORD, "ab\\c", pgpitr_tests::garage::SECRET] {
            assert!(!err.contains(secret), "{what} printed a secret: {err}");
        }
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        err
    };

    // A TOML syntax error on the conninfo line (a backslash escape TOML does not know).
    let config = dir.path().join("pgpitr.toml");
    std::fs::write(
        &config,
        format!(
            "repo = \"{}\"\nconninfo = \"host=/tmp user=backup password=ab\\c{PASSWORD}\"\n",
            f.repo().display()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    for (program, args) in [
        (
            "pgpitr-archive",
            vec!["--config", &config_arg, "pg_wal/x", &seg],
        ),
        (
            "pgpitr-restore",
            vec!["--config", &config_arg, &seg, "pg_wal/RECOVERYXLOG"],
        ),
        ("pgpitr", vec!["--config", &config_arg, "backup"]),
    ] {
        let out = f.cmd(program, &args);
        let err = leaks(&format!("{program} with a malformed file"), &out);
        assert!(
            err.contains("line 2") && err.contains("conninfo"),
            "{program}: the message must say where: {err}"
        );
    }
    // A well-formed file whose value has the wrong type.
    std::fs::write(
        &config,
        format!(
            "repo = \"{}\"\narchive_parallel = \"{PASSWORD}\"\n",
            f.repo().display()
        ),
    )
    .unwrap();
    let out = f.cmd(
        "pgpitr-archive",
        &["--config", &config_arg, "pg_wal/x", &seg],
    );
    let err = leaks("pgpitr-archive with a wrong type", &out);
    assert!(err.contains("archive_parallel"), "{err}");
    let out = f.cmd_with(
        "pgpitr-archive",
        &[&format!("pg_wal/{seg}"), &seg],
        &[("PGPITR_RESTORE_PREFETCH", PASSWORD)],
    );
    leaks("a bad environment variable", &out);

    // A refused connection, the password in the connection string.
    let port = pgpitr_tests::free_port().to_string();
    let out = f.cmd_with(
        "pgpitr",
        &["backup"],
        &[(
            "PGPITR_CONNINFO",
            &format!(
                "host=127.0.0.1 port={port} user=backup password={PASSWORD} connect_timeout=2"
            ),
        )],
    );
    leaks("a refused connection", &out);

    // Wrong S3 keys against a real S3 server.
    let g = Garage::shared();
    let bucket = g.bucket();
    let mut env = g.env(&bucket, "secrets");
    for (k, v) in &mut env {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = format!("{PASSWORD}{}", &pgpitr_tests::garage::SECRET[8..]);
        }
    }
    let s3 = Fixture::with_env(temp_dir("s3-wrong-key"), env);
    let seg = s3.write_segment(1, 1);
    let out = s3.archive(&seg);
    leaks("pgpitr-archive with a wrong S3 secret", &out);
    let out = s3.restore(&seg, "pg_wal/RECOVERYXLOG");
    assert!(code(&out) > 125, "{}", stderr(&out));
    leaks("pgpitr-restore with a wrong S3 secret", &out);
}

/// Issue 16, item 2 (in part): an S3 failure is one line naming the cause and the fix — no
/// credentials, endpoint unreachable, no such bucket — never the SDK's error chain, for the
/// archive and restore commands (whose stderr is PostgreSQL's log) and for `pgpitr`. A missing
/// bucket is never "not in the archive" for `pgpitr-restore` (that would end recovery).
#[test]
fn s3_failures_are_one_line_with_the_cause() {
    let f = Fixture::s3();
    let seg = f.write_segment(1, 1);
    let home = temp_dir("no-aws-home");
    let home = home.path().display().to_string();
    let get = |k: &str| {
        f.env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let calls = |extra: &[(&str, &str)], unset: &[&str]| -> Vec<(String, Output)> {
        let wal = format!("pg_wal/{seg}");
        [
            ("pgpitr-archive", vec![wal.as_str(), seg.as_str()]),
            ("pgpitr-restore", vec![seg.as_str(), "pg_wal/RECOVERYXLOG"]),
            ("pgpitr", vec!["list"]),
        ]
        .into_iter()
        .map(|(program, args)| {
            let mut c = Command::new(bin(program));
            c.args(&args)
                .current_dir(&f.pgdata)
                .env_remove("PGPITR_CONFIG")
                .env_remove("PGPITR_LOG");
            for (k, v) in &f.env {
                if !unset.contains(&k.as_str()) {
                    c.env(k, v);
                }
            }
            for (k, v) in extra {
                c.env(k, v);
            }
            (program.to_string(), c.output().unwrap())
        })
        .collect()
    };
    let check = |what: &str, outs: Vec<(String, Output)>, cause: &str| {
        for (program, out) in outs {
            let err = stderr(&out);
            assert!(!out.status.success(), "{program}, {what}: succeeded");
            assert_eq!(err.lines().count(), 1, "{program}, {what}: {err}");
            assert!(err.contains(cause), "{program}, {what}: {err}");
            for dump in ["DispatchFailure", "ProviderError", "SdkBody", "127.0.0.1"] {
                assert!(!err.contains(dump), "{program}, {what}: {err}");
            }
            if program == "pgpitr-restore" {
                assert!(code(&out) > 125, "{program}, {what}: {:?}", out.status);
            }
        }
    };
    check(
        "no credentials",
        calls(
            &[("HOME", &home)],
            &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        ),
        "no S3 credentials",
    );
    let port = pgpitr_tests::free_port();
    check(
        "endpoint unreachable",
        calls(
            &[("PGPITR_S3_ENDPOINT", &format!("http://127.0.0.1:{port}"))],
            &[],
        ),
        "unreachable",
    );
    let repo = get("PGPITR_REPO").replacen("s3://", "s3://no-such-bucket-", 1);
    check(
        "no such bucket",
        calls(&[("PGPITR_REPO", &repo)], &[]),
        "no such bucket",
    );
}
