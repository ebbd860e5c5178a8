//! `pgpitr-restore %f %p`: PostgreSQL's `restore_command`. Fetches one WAL file, verifies its
//! SHA-256 and renames it into `%p`. For segments, a background refill (`pgpitr-restore
//! --refill`, started by the call and outliving it) keeps the next `restore_prefetch` segments
//! fetched ahead in the spool, so that most calls are a rename and recovery replays while the
//! next segments download.
//!
//! Before it writes anything, a call checks that the repository belongs to the cluster being
//! recovered (the system identifier in the data directory's `global/pg_control`), and it takes
//! prefetched segments only from the spool bound to that repository, cluster and data directory
//! (`spool::spool_dir`): another cluster's WAL is never handed to recovery, which would take it
//! for the end of WAL and could promote early.
//!
//! The exit-code contract (PostgreSQL docs, "Recovering Using a Continuous Archive Backup", and
//! src/backend/access/transam/xlogarchive.c): 1–125 means "not found", which during archive
//! recovery can end recovery and promote; above 125 means fatal, and recovery stops. So only a
//! file that is truly absent returns [`FetchError::NotFound`]; everything else is fatal.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::spool;
use crate::config::{Config, ConfigError, RepoKind};
use crate::pg::control::ControlFileError;
use crate::pg::{ControlFile, WalFileName, WalSegmentName};
use crate::repo::wal::{self, ArchivedWal};
use crate::repo::{layout, RepoError, RepoIdentity};
use crate::storage::{Storage, StorageError};

/// Exit codes of `pgpitr-restore`, documented in docs/operations.md.
pub mod exit {
    /// The file was fetched, verified and written to `%p`.
    pub const OK: i32 = 0;
    /// The file is not in the archive (PostgreSQL asks for files that do not exist).
    pub const NOT_FOUND: i32 = 1;
    /// Bad arguments or configuration: recovery stops until it is fixed.
    pub const USAGE: i32 = 200;
    /// The storage could not be read after retries: recovery stops; a restart retries.
    pub const STORAGE: i32 = 201;
    /// The stored file is corrupt or ambiguous, or the repository is not this cluster's.
    pub const INTEGRITY: i32 = 202;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Taken from the spool, fetched ahead by an earlier call.
    Spool,
    Repository,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("WAL file {0} is not in the archive")]
    NotFound(WalFileName),
    #[error("{0}")]
    Usage(String),
    /// The working directory is not a data directory whose cluster pgpitr can identify.
    #[error("{0}")]
    DataDirectory(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl FetchError {
    /// Whether the location did not answer (storage unavailable after its retries): the only
    /// reason `pgpitr-restore` reads the next location (`crate::copy::read`).
    pub fn is_unreachable(&self) -> bool {
        match self {
            FetchError::Config(e) => e
                .storage_error()
                .is_some_and(crate::copy::read::is_unreachable),
            FetchError::Repo(RepoError::Storage(e)) => crate::copy::read::is_unreachable(e),
            _ => false,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            FetchError::NotFound(_) => exit::NOT_FOUND,
            FetchError::Config(e) => match e.storage_error() {
                Some(StorageError::Unauthentic { .. }) => exit::INTEGRITY,
                Some(_) => exit::STORAGE,
                None => exit::USAGE,
            },
            FetchError::Usage(_) | FetchError::DataDirectory(_) => exit::USAGE,
            FetchError::Repo(RepoError::Storage(StorageError::Unauthentic { .. })) => {
                exit::INTEGRITY
            }
            FetchError::Repo(RepoError::Storage(_) | RepoError::Io { .. }) => exit::STORAGE,
            FetchError::Repo(_) => exit::INTEGRITY,
        }
    }
}

/// What a successful call did, and what it leaves to a background refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub source: Source,
    /// When set, the spool runs low: the caller should start [`refill`] after this segment in
    /// the background (`pgpitr-restore --refill`), so that recovery replays while the next
    /// segments download.
    pub refill_after: Option<WalSegmentName>,
}

/// How long a call whose segment is being prefetched by a running refill waits for it before
/// fetching it itself.
const REFILL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Restores WAL file `wal_name` (`%f`) to `dest` (`%p`): from the spool when an earlier refill
/// fetched it ahead (a rename), else from the repository. Never fetches ahead itself: that is
/// [`refill`]'s work, started by the caller when [`Restored::refill_after`] says so.
///
/// # Errors
/// [`FetchError::NotFound`] only when the archive has no such file; anything else means the
/// file may exist but could not be delivered intact.
pub async fn run(config: &Config, wal_name: &str, dest: &Path) -> Result<Restored, FetchError> {
    let name: WalFileName = wal_name
        .parse()
        .map_err(|e| FetchError::Usage(format!("%f: {e}")))?;
    let system_identifier = data_directory_system_identifier()?;
    let spool_dir = spool::spool_dir(config, dest, "restore", system_identifier);
    let WalFileName::Segment(segment) = name else {
        fetch_direct(config, name, dest, system_identifier).await?;
        return Ok(Restored {
            source: Source::Repository,
            refill_after: None,
        });
    };
    let spooled = spool_dir.join(name.to_string());
    if std::fs::rename(&spooled, dest).is_ok() || wait_for_refill(&spool_dir, segment, dest).await {
        let ahead = spooled_ahead(&spool_dir, segment);
        let low = ahead.len() * 2 < config.restore_prefetch as usize;
        return Ok(Restored {
            source: Source::Spool,
            refill_after: low.then_some(segment),
        });
    }
    fetch_direct(config, name, dest, system_identifier).await?;
    Ok(Restored {
        source: Source::Repository,
        refill_after: (config.restore_prefetch > 0).then_some(segment),
    })
}

/// Fetches the `restore_prefetch` segments after `after` (`%f` of the call that asked for the
/// refill) into the spool of `dest` (`%p`), and removes spooled files outside that window.
/// Downloads run `restore_parallel` at a time from S3, one at a time from a local directory;
/// segments are verified and written one at a time, in order, and their writeback is started.
/// One refill runs at a time per spool (an flock on `<spool>.lock`, which also records the
/// window for [`run`] to wait on); a second one returns at once. Best effort: a segment that
/// fails here is fetched, and its error reported, by PostgreSQL's own call.
///
/// # Errors
/// A malformed `after`, a missing `pg_wal`, configuration and repository errors.
pub async fn refill(config: &Config, after: &str, dest: &Path) -> Result<(), FetchError> {
    let segment: WalSegmentName = after
        .parse()
        .map_err(|e| FetchError::Usage(format!("--refill {after}: {e}")))?;
    let wal_dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !wal_dir.is_dir() {
        // The data directory went away (recovery ended and it was removed): nothing to do,
        // and nothing to recreate.
        return Ok(());
    }
    let system_identifier = data_directory_system_identifier()?;
    let spool_dir = spool::spool_dir(config, dest, "restore", system_identifier);
    let io = |e| FetchError::Repo(RepoError::io(&spool_dir, e));
    spool::create_private_dir(&spool_dir).map_err(io)?;
    let mut lock = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(refill_lock(&spool_dir))
            .map_err(io)?
    };
    if lock.try_lock().is_err() {
        return Ok(());
    }
    let (storage, identity) = open(config, system_identifier, dest).await?;
    let window: Vec<WalSegmentName> =
        std::iter::successors(Some(segment.next(identity.wal_segment_size)), |s| {
            Some(s.next(identity.wal_segment_size))
        })
        .take(config.restore_prefetch as usize)
        .collect();
    if let (Some(first), Some(last)) = (window.first(), window.last()) {
        use std::io::Write;
        lock.set_len(0).map_err(io)?;
        writeln!(lock, "{first} {last}").map_err(io)?;
    }
    prefetch(config, storage.as_ref(), &window, &spool_dir).await
}

/// The refill lock beside the spool directory (not in it: the spool holds only segments).
fn refill_lock(spool_dir: &Path) -> PathBuf {
    spool_dir.with_extension("lock")
}

/// When a running refill's window holds `segment`, waits for it to land in the spool and moves
/// it to `dest`. False when no refill is fetching it, when the refill ends without it, or after
/// [`REFILL_WAIT`]: the caller then fetches it itself.
async fn wait_for_refill(spool_dir: &Path, segment: WalSegmentName, dest: &Path) -> bool {
    let spooled = spool_dir.join(segment.to_string());
    let deadline = std::time::Instant::now() + REFILL_WAIT;
    loop {
        match running_refill(&refill_lock(spool_dir)) {
            Some((first, last)) if first <= segment && segment <= last => {}
            _ => return std::fs::rename(&spooled, dest).is_ok(),
        }
        if std::fs::rename(&spooled, dest).is_ok() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The window of the refill holding the lock at `lock`, if one runs.
fn running_refill(lock: &Path) -> Option<(WalSegmentName, WalSegmentName)> {
    let file = std::fs::File::open(lock).ok()?;
    match file.try_lock() {
        // Nobody holds it; dropping the file releases it.
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => {
            let text = std::fs::read_to_string(lock).ok()?;
            let (first, last) = text.trim().split_once(' ')?;
            Some((first.parse().ok()?, last.parse().ok()?))
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Opens the repository and checks that it is the repository of the cluster with
/// `system_identifier` (the data directory's).
///
/// # Errors
/// [`RepoError::OtherCluster`] for another cluster's repository; configuration and storage
/// errors.
async fn open(
    config: &Config,
    system_identifier: u64,
    dest: &Path,
) -> Result<(std::sync::Arc<dyn Storage>, RepoIdentity), FetchError> {
    let storage = config
        .storage_with_key_cache(Some(&spool::key_cache_dir(config, dest)))
        .await?;
    let identity = RepoIdentity::load(storage.as_ref()).await?;
    if identity.system_identifier != system_identifier {
        return Err(RepoError::OtherCluster {
            location: storage.location(),
            repo: identity.system_identifier,
            found: system_identifier,
        }
        .into());
    }
    Ok((storage, identity))
}

/// The system identifier of the cluster being recovered, from `global/pg_control` in the
/// working directory: PostgreSQL runs `restore_command` in the data directory
/// (src/backend/access/transam/xlogarchive.c, `RestoreArchivedFile`). A read that races with
/// the server rewriting the file (a torn read, rejected by its CRC) is retried.
///
/// # Errors
/// [`FetchError::DataDirectory`] when there is no readable, valid `global/pg_control`.
fn data_directory_system_identifier() -> Result<u64, FetchError> {
    let path = Path::new("global/pg_control");
    let mut tries = 0;
    loop {
        let parsed = match std::fs::read(path) {
            Ok(bytes) => ControlFile::parse(&bytes),
            Err(e) => {
                let cwd = std::env::current_dir().unwrap_or_default();
                return Err(FetchError::DataDirectory(format!(
                    "cannot read global/pg_control in {}: {e}; pgpitr-restore must run in the data directory being recovered, as PostgreSQL runs restore_command",
                    cwd.display()
                )));
            }
        };
        match parsed {
            Ok(control) => return Ok(control.system_identifier),
            Err(ControlFileError::Crc) if tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(FetchError::DataDirectory(format!(
                    "global/pg_control in the working directory is not usable: {e}"
                )))
            }
        }
    }
}

async fn fetch_direct(
    config: &Config,
    name: WalFileName,
    dest: &Path,
    system_identifier: u64,
) -> Result<(), FetchError> {
    let (storage, _) = open(config, system_identifier, dest).await?;
    let listing = wal::find(storage.as_ref(), name).await?;
    let Some(found) = wal::pick(&listing, name)? else {
        return Err(FetchError::NotFound(name));
    };
    wal::fetch_to(storage.as_ref(), found, dest).await?;
    Ok(())
}

/// Segments after `current` on its timeline that are already in the spool.
fn spooled_ahead(spool_dir: &Path, current: WalSegmentName) -> Vec<WalSegmentName> {
    let Ok(entries) = std::fs::read_dir(spool_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<WalSegmentName>().ok())
        .filter(|s| s.timeline == current.timeline && *s > current)
        .collect()
}

/// Fetches the segments of `window` that are archived and not yet spooled, and removes
/// spooled files outside it.
async fn prefetch(
    config: &Config,
    storage: &dyn Storage,
    window: &[WalSegmentName],
    spool_dir: &Path,
) -> Result<(), FetchError> {
    remove_outside(spool_dir, window);
    let wanted: Vec<WalSegmentName> = window
        .iter()
        .copied()
        .filter(|s| !spool_dir.join(s.to_string()).exists())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let mut listing: Vec<ArchivedWal> = Vec::new();
    let dirs: HashSet<String> = wanted
        .iter()
        .map(|s| layout::wal_dir(WalFileName::Segment(*s)))
        .collect();
    for dir in dirs {
        listing.extend(wal::list(storage, &dir).await?);
    }
    let jobs: Vec<(ArchivedWal, PathBuf)> = wanted
        .iter()
        .filter_map(|s| {
            let w = wal::pick(&listing, WalFileName::Segment(*s))
                .ok()
                .flatten()?;
            Some((w.clone(), spool_dir.join(s.to_string())))
        })
        .collect();
    // Downloads from S3 run in parallel (each is a network round trip); a local repository is
    // read one segment at a time, since a second reader there only takes CPU from replay
    // (docs/benchmarks.md). Decompressing and hashing run one segment at a time, in window
    // order: the startup process asks for the segments in order, and on a small machine it
    // needs the other core.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let parallel = match config.repo_kind() {
        Ok(RepoKind::Local(_)) => 1,
        _ => config.restore_parallel as usize,
    };
    let download = async move {
        let mut done = futures::stream::iter(jobs)
            .map(|(w, path)| async move { (storage.get(&w.key).await, w, path) })
            .buffered(parallel);
        while let Some(d) = done.next().await {
            if tx.send(d).await.is_err() {
                break;
            }
        }
    };
    let write = async {
        while let Some((got, w, path)) = rx.recv().await {
            let written = match got {
                Ok(compressed) => {
                    wal::write_to(
                        compressed,
                        &w,
                        &path,
                        wal::Durability::WritebackStarted,
                        storage.content_ids(),
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = written {
                tracing::debug!(
                    "prefetching {} failed, left for PostgreSQL's own call: {e}",
                    w.name
                );
            }
        }
    };
    tokio::join!(download, write);
    Ok(())
}

/// Deletes spooled segments that are not in `window` (older ones, other timelines).
fn remove_outside(spool_dir: &Path, window: &[WalSegmentName]) {
    let Ok(entries) = std::fs::read_dir(spool_dir) else {
        return;
    };
    for e in entries.flatten() {
        let keep = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<WalSegmentName>().ok())
            .is_some_and(|s| window.contains(&s));
        if !keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
