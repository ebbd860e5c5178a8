//! Test harness for pgpitr's end-to-end tests: real PostgreSQL clusters started as an
//! unprivileged user (PostgreSQL refuses root, and CI runs as root), a real Garage S3 server on
//! loopback, and the workspace's binaries copied where that user can run them.

pub mod chaos;
pub mod cli;
#[cfg(test)]
mod doc_checks;
pub mod fault_proxy;
pub mod garage;
pub mod garage_cluster;
pub mod monitoring;
pub mod moto;
pub mod pg;
pub mod pitr;
pub mod tmpfs;
pub mod wal;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The user PostgreSQL and the archive/restore commands run as when the tests run as root.
pub const PG_USER: &str = "postgres";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as [`PG_USER`] when we are root, else as ourselves. The environment is kept.
pub fn as_pg_user(program: impl AsRef<Path>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg(PG_USER).arg("--").arg(program.as_ref());
        c
    } else {
        Command::new(program.as_ref())
    }
}

/// Hands `path` (file or directory tree) to [`PG_USER`] when running as root.
pub fn give_to_pg_user(path: &Path) {
    if is_root() {
        let st = Command::new("chown")
            .arg("-R")
            .arg(format!("{PG_USER}:{PG_USER}"))
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", path.display());
    }
}

/// A fresh temporary directory that [`PG_USER`] can traverse, removed on drop.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("pgpitr-{tag}-"))
        .tempdir_in("/tmp")
        .unwrap();
    set_mode(d.path(), 0o755);
    d
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The directory holding the workspace binaries (`pgpitr`, `pgpitr-archive`, `pgpitr-restore`)
/// where every user can run them, so that a cluster running as [`PG_USER`] can call them
/// whatever the checkout's permissions. One directory per target directory, shared by every test
/// process (nextest runs one process per test), holding hard links — never copies, which would
/// cost the size of three debug binaries per test process.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        let tag = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            target.hash(&mut h);
            h.finish()
        };
        let dir = std::env::temp_dir().join(format!("pgpitr-bin-{tag:016x}"));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        for name in ["pgpitr", "pgpitr-archive", "pgpitr-restore"] {
            let src = target.join(name);
            assert!(
                src.exists(),
                "{} is missing: run `cargo build --workspace` before the tests",
                src.display()
            );
            set_mode(&src, 0o755);
            // Link under a name of our own, then rename over the shared name: atomic for the
            // other test processes doing the same. Across file systems a copy, made only when
            // the shared one is missing or older, so that it happens once per build.
            let dst = dir.join(name);
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(&src, &tmp).is_err() {
                let (s, d) = (
                    std::fs::metadata(&src).unwrap(),
                    std::fs::metadata(&dst).ok(),
                );
                let fresh = d.is_some_and(|d| {
                    d.len() == s.len() && d.modified().unwrap() >= s.modified().unwrap()
                });
                if fresh {
                    continue;
                }
                std::fs::copy(&src, &tmp).unwrap();
                set_mode(&tmp, 0o755);
            }
            std::fs::rename(&tmp, &dst).unwrap();
        }
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A free TCP port on loopback (bound then released; good enough for tests run in one process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd`, panicking with its output if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A two-worker tokio runtime, for driving pgpitr's async library from synchronous tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The repository named by `env` (its `PGPITR_*` variables), through pgpitr's own storage layer.
/// The other variables (`AWS_*` credentials) are set in this process's environment, where the
/// binaries read them too.
pub fn storage_of(env: &[(String, String)]) -> pgpitr::storage::DynStorage {
    for (k, v) in env.iter().filter(|(k, _)| !k.starts_with("PGPITR_")) {
        std::env::set_var(k, v);
    }
    let keys: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("PGPITR_"))
        .cloned()
        .collect();
    let config = pgpitr::config::Config::from_parts(None, None, &keys).unwrap();
    runtime().block_on(config.storage()).unwrap()
}

/// Every file under `dir`, recursively (symlinks are not followed), sorted; none when `dir`
/// does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}
