//! Executing a [`RecoveryPlan`]: writing a new data directory that recovers to the plan's target
//! when PostgreSQL starts on it. The I/O half of recovery; the choices were made by the planner.
//!
//! Order, so that a failure never leaves something that looks restorable and never touches
//! anything that was there before:
//! 1. [`preflight`] checks everything that can be checked without writing: the data directory and
//!    every tablespace directory are absent or empty, their parents exist, remapped OIDs belong
//!    to the backup, `pgpitr-restore` is where `restore_command` will name it;
//! 2. the backup's files are written ([`crate::backup::materialize`]: directories 0700, files
//!    0600, `pg_tblspc/<oid>` symlinks, every chunk verified), in parallel;
//! 3. `tablespace_map` is rewritten for remapped tablespaces, `pgpitr-restore.toml` (the
//!    repository, no secrets) and the recovery settings are written
//!    ([`super::settings`]), `recovery.signal` last;
//! 4. everything is flushed (`syncfs`), and handed to the owner when one is given.
//!
//! If step 2 or 3 fails, what this restore wrote is removed again — only that: the directories
//! were empty or absent when it started. A restore killed before it could clean up leaves a
//! directory without `global/pg_control` (written last by [`materialize`]): PostgreSQL cannot
//! start from it, and the next restore into it is refused with [`RestoreError::Interrupted`].

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiff::Timestamp;

use super::plan::RecoveryPlan;
use super::settings::{self, ArchiveMode, AutoConf, TablespaceMapError, TargetAction};
use crate::backup::{materialize, MaterializeOptions};
use crate::config::Config;
use crate::repo::manifest::BackupManifest;
use crate::repo::RepoError;
use crate::storage::{DynStorage, ObjectMeta, PutMode, Storage, StorageResult};

/// The oldest PostgreSQL whose recovery is configured by `recovery.signal` and
/// `postgresql.conf` settings (12; before, `recovery.conf`).
const MIN_PG_VERSION_NUM: u32 = 120_000;

/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A user to hand the restored files to (and, for `--start`, to run the server as).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl Owner {
    /// Looks `name` up in the user database.
    ///
    /// # Errors
    /// An unknown user.
    pub fn lookup(name: &str) -> Result<Owner, RestoreError> {
        let unknown = || RestoreError::UnknownUser(name.to_string());
        let cname = std::ffi::CString::new(name).map_err(|_| unknown())?;
        passwd(|pwd, buf, result| {
            // SAFETY: every pointer is valid for the call; getpwnam_r writes only into them.
            unsafe { libc::getpwnam_r(cname.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
        })
        .ok_or_else(unknown)
    }

    /// The user this process runs as.
    ///
    /// # Errors
    /// A uid without an entry in the user database.
    pub fn current() -> Result<Owner, RestoreError> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        passwd(|pwd, buf, result| {
            // SAFETY: as in `lookup`.
            unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
        })
        .ok_or_else(|| RestoreError::UnknownUser(format!("uid {uid}")))
    }
}

/// Runs a `getpw*_r` call and copies the entry out.
fn passwd(
    call: impl Fn(&mut libc::passwd, &mut Vec<libc::c_char>, &mut *mut libc::passwd) -> libc::c_int,
) -> Option<Owner> {
    let mut buf: Vec<libc::c_char> = vec![0; 16 * 1024];
    // SAFETY: passwd is plain old data; an all-zero value is valid before the call fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    if call(&mut pwd, &mut buf, &mut result) != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success the string fields point into `buf`, NUL-terminated.
    let text = |p: *const libc::c_char| unsafe {
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    Some(Owner {
        name: text(pwd.pw_name),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: PathBuf::from(text(pwd.pw_dir)),
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Everything a restore needs besides the storage.
#[derive(Debug, Clone)]
pub struct RestoreRequest<'a> {
    pub config: &'a Config,
    pub plan: &'a RecoveryPlan,
    /// The manifest of `plan.backup`.
    pub manifest: &'a BackupManifest,
    /// The new data directory (absolute).
    pub pgdata: PathBuf,
    /// New locations of tablespaces, by OID (absolute).
    pub tablespace_map: HashMap<u32, PathBuf>,
    pub action: TargetAction,
    pub archive_mode: ArchiveMode,
    /// Absolute path of `pgpitr-restore`, for `restore_command`.
    pub restore_bin: PathBuf,
    /// Hand every restored file to this user.
    pub owner: Option<Owner>,
}

impl RestoreRequest<'_> {
    /// Each tablespace of the backup with the directory it is restored to.
    pub fn tablespace_dirs(&self) -> Vec<(u32, PathBuf)> {
        self.manifest
            .tablespaces
            .iter()
            .map(|t| {
                let dir = self
                    .tablespace_map
                    .get(&t.oid)
                    .cloned()
                    .unwrap_or_else(|| PathBuf::from(&t.location));
                (t.oid, dir)
            })
            .collect()
    }
}

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    pub pgdata: PathBuf,
    pub files: u64,
    /// Plain bytes written.
    pub bytes: u64,
    /// Compressed bytes read from the repository.
    pub fetched: u64,
    pub tablespaces: Vec<(u32, PathBuf)>,
    /// The settings appended to `postgresql.auto.conf`, unquoted.
    pub settings: Vec<(String, String)>,
    pub config_file: PathBuf,
    pub elapsed: Duration,
}

/// Why a restore did not happen or did not finish; messages are lowercase and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("refusing to restore into {path}: it is not empty; choose an empty or new directory (nothing was written)")]
    NotEmpty { path: PathBuf },
    #[error("refusing to restore into {path}: it holds an interrupted restore (no global/pg_control, which a restore writes last; PostgreSQL cannot start from it); remove the directory and restore again (nothing was written)")]
    Interrupted { path: PathBuf },
    #[error("refusing to restore into {path}: it is not a directory (nothing was written)")]
    NotADirectory { path: PathBuf },
    #[error(
        "the parent directory of {path} does not exist; create it first (nothing was written)"
    )]
    NoParent { path: PathBuf },
    #[error("{what} must be an absolute path, not '{path}'")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("--tablespace-map {oid}=…: the backup has no tablespace {oid} (it has: {known})")]
    UnknownTablespace { oid: u32, known: String },
    #[error("tablespaces {a} and {b} would both be restored into {path}; remap one with --tablespace-map OID=/new/path")]
    SharedTablespaceDir { a: u32, b: u32, path: PathBuf },
    #[error("tablespace {oid} would be restored into {path}, inside the data directory {pgdata}; choose a directory outside it with --tablespace-map {oid}=/new/path")]
    TablespaceInsidePgdata {
        oid: u32,
        path: PathBuf,
        pgdata: PathBuf,
    },
    #[error(
        "tablespace {oid}: {source}; restore it elsewhere with --tablespace-map {oid}=/new/path"
    )]
    TablespaceDir {
        oid: u32,
        #[source]
        source: Box<RestoreError>,
    },
    #[error(
        "{path} (restore_command) does not exist: pgpitr-restore must be installed beside pgpitr"
    )]
    NoRestoreCommand { path: PathBuf },
    #[error("backup {backup} is of PostgreSQL {version}; pgpitr restores PostgreSQL 12 and later")]
    UnsupportedVersion { backup: String, version: u32 },
    #[error("unknown user '{0}'")]
    UnknownUser(String),
    #[error(
        "--owner {owner}: only root can give the restored files to another user (this is {me})"
    )]
    OwnerNotRoot { owner: String, me: String },
    #[error("the backup has no backup_label; it cannot be recovered (its manifest is incomplete)")]
    NoBackupLabel,
    #[error(transparent)]
    TablespaceMap(#[from] TablespaceMapError),
    #[error("{0}; the files written by this restore were removed")]
    CleanedUp(Box<RestoreError>),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{}: {}", .path.display(), crate::storage::io_message(.source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `dir` is absent (`Ok(false)`) or an empty directory (`Ok(true)`); an error for
/// anything else. Its parent must exist.
fn absent_or_empty(dir: &Path) -> Result<bool, RestoreError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
            if entries.next().is_some() {
                let path = dir.to_path_buf();
                let interrupted =
                    dir.join("backup_label").is_file() && !dir.join("global/pg_control").exists();
                Err(if interrupted {
                    RestoreError::Interrupted { path }
                } else {
                    RestoreError::NotEmpty { path }
                })
            } else {
                Ok(true)
            }
        }
        Ok(_) => Err(RestoreError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) if parent.is_dir() => Ok(false),
                _ => Err(RestoreError::NoParent {
                    path: dir.to_path_buf(),
                }),
            }
        }
        Err(e) => Err(RestoreError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Checks everything that can be checked before writing; see the module documentation.
///
/// # Errors
/// The first problem found; nothing has been written.
pub fn preflight(req: &RestoreRequest<'_>) -> Result<(), RestoreError> {
    if req.manifest.pg_version_num < MIN_PG_VERSION_NUM {
        return Err(RestoreError::UnsupportedVersion {
            backup: req.manifest.id.to_string(),
            version: req.manifest.pg_version_num,
        });
    }
    if !req.pgdata.is_absolute() {
        return Err(RestoreError::NotAbsolute {
            what: "--pgdata",
            path: req.pgdata.clone(),
        });
    }
    absent_or_empty(&req.pgdata)?;
    for oid in req.tablespace_map.keys() {
        if !req.manifest.tablespaces.iter().any(|t| t.oid == *oid) {
            let known: Vec<String> = req
                .manifest
                .tablespaces
                .iter()
                .map(|t| format!("{} at {}", t.oid, t.location))
                .collect();
            return Err(RestoreError::UnknownTablespace {
                oid: *oid,
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        }
    }
    let dirs = req.tablespace_dirs();
    for (i, (oid, dir)) in dirs.iter().enumerate() {
        if !dir.is_absolute() {
            return Err(RestoreError::NotAbsolute {
                what: "a tablespace location",
                path: dir.clone(),
            });
        }
        if dir.starts_with(&req.pgdata) {
            return Err(RestoreError::TablespaceInsidePgdata {
                oid: *oid,
                path: dir.clone(),
                pgdata: req.pgdata.clone(),
            });
        }
        if let Some((other, _)) = dirs[..i].iter().find(|(_, d)| d == dir) {
            return Err(RestoreError::SharedTablespaceDir {
                a: *other,
                b: *oid,
                path: dir.clone(),
            });
        }
        absent_or_empty(dir).map_err(|e| RestoreError::TablespaceDir {
            oid: *oid,
            source: Box::new(e),
        })?;
    }
    if !req.restore_bin.is_file() {
        return Err(RestoreError::NoRestoreCommand {
            path: req.restore_bin.clone(),
        });
    }
    if let Some(owner) = &req.owner {
        if !is_root() {
            let me = Owner::current()?;
            if me.uid != owner.uid {
                return Err(RestoreError::OwnerNotRoot {
                    owner: owner.name.clone(),
                    me: me.name,
                });
            }
        }
    }
    Ok(())
}

/// Writes the data directory for `req.plan`; see the module documentation.
///
/// # Errors
/// [`preflight`]'s errors (nothing written); storage and checksum errors while writing and
/// file-system errors, after which what was written is removed ([`RestoreError::CleanedUp`]).
pub async fn restore(
    storage: DynStorage,
    req: &RestoreRequest<'_>,
) -> Result<Restored, RestoreError> {
    preflight(req)?;
    let began = Instant::now();
    let mut written = Written::default();
    written.note(&req.pgdata)?;
    let tablespaces = req.tablespace_dirs();
    for (_, dir) in &tablespaces {
        written.note(dir)?;
    }
    match write_all(storage, req, began, &tablespaces).await {
        Ok(r) => Ok(r),
        Err(e) => {
            written.undo();
            Err(RestoreError::CleanedUp(Box::new(e)))
        }
    }
}

async fn write_all(
    storage: DynStorage,
    req: &RestoreRequest<'_>,
    began: Instant,
    tablespaces: &[(u32, PathBuf)],
) -> Result<Restored, RestoreError> {
    let total: u64 = req
        .manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .map(|c| c.length)
        .sum();
    let fetched = Arc::new(AtomicU64::new(0));
    let counting: DynStorage = Arc::new(Counting {
        inner: storage,
        fetched: fetched.clone(),
    });
    let progress = Progress::start(total, fetched.clone());
    let opts = MaterializeOptions {
        tablespace_map: req.tablespace_map.clone(),
        parallel: req.config.restore_parallel.max(1) as usize,
    };
    let result = materialize(counting, req.manifest, &req.pgdata, &opts).await;
    progress.finish().await;
    let stats = result?;

    let pgdata = &req.pgdata;
    if !pgdata.join("backup_label").is_file() {
        return Err(RestoreError::NoBackupLabel);
    }
    // A backup of a standby carries its standby.signal; this is a point-in-time recovery.
    let standby = pgdata.join("standby.signal");
    if standby.exists() {
        std::fs::remove_file(&standby).map_err(io(&standby))?;
        tracing::info!("removed standby.signal taken from the backup: this restore is a point-in-time recovery, not a standby");
    }
    if !req.tablespace_map.is_empty() {
        let path = pgdata.join("tablespace_map");
        let original = std::fs::read_to_string(&path).map_err(io(&path))?;
        let rewritten = settings::rewrite_tablespace_map(&original, &req.tablespace_map)?;
        std::fs::write(&path, rewritten).map_err(io(&path))?;
    }
    let now = Timestamp::now();
    let config_file = pgdata.join(settings::RESTORE_CONFIG_FILE);
    write_new(
        &config_file,
        settings::restore_config_toml(req.config, &req.manifest.id.to_string(), now).as_bytes(),
    )?;
    let auto = AutoConf {
        plan: req.plan,
        restore_command: settings::restore_command(&req.restore_bin, &config_file),
        action: req.action,
        archive_mode: req.archive_mode,
        when: now,
    };
    let auto_conf = pgdata.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&auto_conf)
        .map_err(io(&auto_conf))?;
    f.write_all(settings::auto_conf_block(&auto).as_bytes())
        .map_err(io(&auto_conf))?;
    drop(f);
    write_new(&pgdata.join("recovery.signal"), b"")?;

    for dir in std::iter::once(pgdata).chain(tablespaces.iter().map(|(_, d)| d)) {
        sync_fs(dir)?;
    }
    if let Some(owner) = &req.owner {
        for dir in std::iter::once(pgdata).chain(tablespaces.iter().map(|(_, d)| d)) {
            chown_tree(dir, owner)?;
        }
    }
    Ok(Restored {
        pgdata: pgdata.clone(),
        files: stats.files,
        bytes: stats.bytes,
        fetched: fetched.load(Ordering::Relaxed),
        tablespaces: tablespaces.to_vec(),
        settings: settings::auto_conf_settings(&auto),
        config_file,
        elapsed: began.elapsed(),
    })
}

/// Creates `path` (which must not exist) with mode 0600 and `content`.
fn write_new(path: &Path, content: &[u8]) -> Result<(), RestoreError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(content).map_err(io(path))
}

/// Flushes the file system holding `dir` (`syncfs(2)`): one call instead of an fsync per file.
fn sync_fs(dir: &Path) -> Result<(), RestoreError> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).map_err(io(dir))?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(RestoreError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Gives `dir` and everything under it (not following symlinks) to `owner`.
fn chown_tree(dir: &Path, owner: &Owner) -> Result<(), RestoreError> {
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let entry = entry.map_err(|e| RestoreError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        std::os::unix::fs::lchown(entry.path(), Some(owner.uid), Some(owner.gid))
            .map_err(io(entry.path()))?;
    }
    Ok(())
}

/// The directories a restore writes into, and whether each existed (empty) before.
#[derive(Default)]
struct Written {
    dirs: Vec<(PathBuf, bool)>,
}

impl Written {
    fn note(&mut self, dir: &Path) -> Result<(), RestoreError> {
        let existed = absent_or_empty(dir)?;
        self.dirs.push((dir.to_path_buf(), existed));
        Ok(())
    }

    /// Removes what the restore wrote: the directories it created, the contents of those that
    /// existed (they were empty).
    fn undo(&self) {
        for (dir, existed) in self.dirs.iter().rev() {
            let result = if *existed {
                std::fs::read_dir(dir).and_then(|entries| {
                    for e in entries.flatten() {
                        let p = e.path();
                        if e.file_type()?.is_dir() {
                            std::fs::remove_dir_all(&p)?;
                        } else {
                            std::fs::remove_file(&p)?;
                        }
                    }
                    Ok(())
                })
            } else {
                std::fs::remove_dir_all(dir)
            };
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    "could not remove what was written in {}: {e}",
                    dir.display()
                ),
            }
        }
    }
}

/// A storage that counts the bytes read through `get_range` (how the materialiser reads
/// chunks), for progress.
#[derive(Debug)]
struct Counting {
    inner: DynStorage,
    fetched: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Storage for Counting {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn check_writable(&self) -> StorageResult<()> {
        self.inner.check_writable().await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StorageResult<()> {
        self.inner.put(key, data, mode).await
    }

    async fn get(&self, key: &str) -> StorageResult<Bytes> {
        let b = self.inner.get(key).await?;
        self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StorageResult<Bytes> {
        let b = self.inner.get_range(key, range).await?;
        self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> StorageResult<()> {
        self.inner.delete(key).await
    }
}

/// A progress bar on a terminal (stderr), a log line every [`LOG_EVERY`] otherwise.
struct Progress {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(total: u64, done: Arc<AtomicU64>) -> Progress {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "restore {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            bar
        });
        let task = tokio::spawn(async move {
            let began = Instant::now();
            let tick = if bar.is_some() {
                Duration::from_millis(200)
            } else {
                LOG_EVERY
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stopped.changed() => break,
                }
                let n = done.load(Ordering::Relaxed);
                match &bar {
                    Some(bar) => bar.set_position(n),
                    None => {
                        let rate = n as f64 / began.elapsed().as_secs_f64().max(0.001);
                        tracing::info!(
                            "restore: {} of {} compressed ({}%), {}/s",
                            crate::commands::backup::human_bytes(n),
                            crate::commands::backup::human_bytes(total),
                            (n * 100).checked_div(total).unwrap_or(100).min(100),
                            crate::commands::backup::human_bytes(rate as u64)
                        );
                    }
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Progress { stop, task }
    }

    async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absent_or_empty_directories_are_accepted() {
        let d = tempfile::tempdir().unwrap();
        assert!(!absent_or_empty(&d.path().join("new")).unwrap());
        assert!(absent_or_empty(d.path()).unwrap());
        std::fs::write(d.path().join("PG_VERSION"), "15").unwrap();
        assert!(matches!(
            absent_or_empty(d.path()),
            Err(RestoreError::NotEmpty { .. })
        ));
        // A backup_label without global/pg_control: a restore was killed before its end.
        std::fs::write(d.path().join("backup_label"), "START WAL LOCATION").unwrap();
        assert!(matches!(
            absent_or_empty(d.path()),
            Err(RestoreError::Interrupted { .. })
        ));
        std::fs::create_dir(d.path().join("global")).unwrap();
        std::fs::write(d.path().join("global/pg_control"), "").unwrap();
        assert!(matches!(
            absent_or_empty(d.path()),
            Err(RestoreError::NotEmpty { .. })
        ));
        assert!(matches!(
            absent_or_empty(&d.path().join("PG_VERSION")),
            Err(RestoreError::NotADirectory { .. })
        ));
        assert!(matches!(
            absent_or_empty(&d.path().join("no/such/dir")),
            Err(RestoreError::NoParent { .. })
        ));
    }

    #[test]
    fn undo_removes_only_what_was_written() {
        let d = tempfile::tempdir().unwrap();
        let existing = d.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        let created = d.path().join("created");
        let mut w = Written::default();
        w.note(&existing).unwrap();
        w.note(&created).unwrap();
        std::fs::create_dir_all(existing.join("base/1")).unwrap();
        std::fs::write(existing.join("base/1/1234"), "x").unwrap();
        std::fs::create_dir_all(created.join("pg_wal")).unwrap();
        w.undo();
        assert!(existing.is_dir(), "a directory that existed is kept");
        assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 0);
        assert!(!created.exists());
        assert!(d.path().is_dir());
    }
}
