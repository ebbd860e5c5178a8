//! `pgpitr-restore %f %p`: PostgreSQL's `restore_command`. Fetches one WAL file, verifies its
//! SHA-256 and renames it into `%p`; for a segment it also keeps the next `restore_prefetch`
//! segments fetched ahead in the spool, so that most calls are a rename.
//!
//! The exit-code contract (PostgreSQL docs, "Recovering Using a Continuous Archive Backup", and
//! src/backend/access/transam/xlogarchive.c): 1–125 means "not found", which during archive
//! recovery can end recovery and promote; above 125 means fatal, and recovery stops. So only a
//! file that is truly absent returns [`FetchError::NotFound`]; everything else is fatal.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::spool;
use crate::config::{Config, ConfigError};
use crate::pg::{WalFileName, WalSegSize, WalSegmentName};
use crate::repo::wal::{self, ArchivedWal};
use crate::repo::{layout, RepoError, RepoIdentity};
use crate::storage::Storage;

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
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl FetchError {
    pub fn exit_code(&self) -> i32 {
        match self {
            FetchError::NotFound(_) => exit::NOT_FOUND,
            FetchError::Usage(_) | FetchError::Config(_) => exit::USAGE,
            FetchError::Repo(RepoError::Storage(_) | RepoError::Io { .. }) => exit::STORAGE,
            FetchError::Repo(_) => exit::INTEGRITY,
        }
    }
}

/// Restores WAL file `wal_name` (`%f`) to `dest` (`%p`).
///
/// # Errors
/// [`FetchError::NotFound`] only when the archive has no such file; anything else means the
/// file may exist but could not be delivered intact.
pub async fn run(config: &Config, wal_name: &str, dest: &Path) -> Result<Source, FetchError> {
    let name: WalFileName = wal_name
        .parse()
        .map_err(|e| FetchError::Usage(format!("%f: {e}")))?;
    let spool_dir = spool::spool_dir(config, dest, "restore");
    let spooled = spool_dir.join(name.to_string());
    let WalFileName::Segment(segment) = name else {
        return fetch_direct(config, name, dest)
            .await
            .map(|()| Source::Repository);
    };
    if std::fs::rename(&spooled, dest).is_ok() {
        let ahead = spooled_ahead(&spool_dir, segment);
        if ahead.len() * 2 >= config.restore_prefetch as usize {
            return Ok(Source::Spool);
        }
        // Refill in the background of nothing: this call pays for the next batch, and a failure
        // here is not this file's failure.
        if let Ok((storage, identity)) = open(config).await {
            let _ = prefetch(
                config,
                storage.as_ref(),
                identity.wal_segment_size,
                segment,
                &spool_dir,
                &ahead,
            )
            .await;
        }
        return Ok(Source::Spool);
    }
    let (storage, identity) = open(config).await?;
    let seg_size = identity.wal_segment_size;
    let listing = wal::list(storage.as_ref(), &layout::wal_dir(name)).await?;
    let Some(found) = wal::pick(&listing, name)?.cloned() else {
        return Err(FetchError::NotFound(name));
    };
    let ahead = spooled_ahead(&spool_dir, segment);
    let (this, _) = tokio::join!(
        wal::fetch_to(storage.as_ref(), &found, dest),
        prefetch(
            config,
            storage.as_ref(),
            seg_size,
            segment,
            &spool_dir,
            &ahead
        )
    );
    this?;
    Ok(Source::Repository)
}

async fn open(config: &Config) -> Result<(std::sync::Arc<dyn Storage>, RepoIdentity), FetchError> {
    let storage = config.storage().await?;
    let identity = RepoIdentity::load(storage.as_ref()).await?;
    Ok((storage, identity))
}

async fn fetch_direct(config: &Config, name: WalFileName, dest: &Path) -> Result<(), FetchError> {
    let (storage, _) = open(config).await?;
    let listing = wal::find(storage.as_ref(), name).await?;
    let found = wal::pick(&listing, name)?.ok_or(FetchError::NotFound(name))?;
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

/// Fetches the next `restore_prefetch` segments after `current` that are archived and not yet
/// spooled, and removes spooled files outside that window. Best effort: a segment that fails here
/// is fetched (and its error reported) by PostgreSQL's own call.
async fn prefetch(
    config: &Config,
    storage: &dyn Storage,
    seg_size: WalSegSize,
    current: WalSegmentName,
    spool_dir: &Path,
    already: &[WalSegmentName],
) -> Result<(), FetchError> {
    let window: Vec<WalSegmentName> =
        std::iter::successors(Some(current.next(seg_size)), |s| Some(s.next(seg_size)))
            .take(config.restore_prefetch as usize)
            .collect();
    remove_outside(spool_dir, &window);
    let wanted: Vec<WalSegmentName> = window
        .iter()
        .copied()
        .filter(|s| !already.contains(s))
        .collect();
    if wanted.is_empty() || spool::create_private_dir(spool_dir).is_err() {
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
    futures::stream::iter(jobs)
        .map(|(w, path)| async move {
            if let Err(e) = wal::fetch_to(storage, &w, &path).await {
                tracing::debug!(
                    "prefetching {} failed, left for PostgreSQL's own call: {e}",
                    w.name
                );
            }
        })
        .buffer_unordered(config.restore_parallel as usize)
        .collect::<Vec<()>>()
        .await;
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
