//! `pgpitr-archive %p %f`: PostgreSQL's `archive_command`. Stores one WAL file durably, then —
//! for a segment — pushes the other segments waiting as `.ready` in `pg_wal/archive_status`,
//! in parallel, and leaves a marker for each in the spool so that PostgreSQL's next calls for
//! them return at once. PostgreSQL alone renames `.ready` to `.done`.
//!
//! A marker records the pushed file's size, inode, mtime and SHA-256, and lives in the spool of
//! one repository and cluster (`spool::spool_dir`). A later call trusts it only if the file in
//! `pg_wal` still matches and the repository it is configured with holds that SHA-256 under the
//! name, and no other: a marker never vouches for different bytes, nor for a repository the
//! file was not pushed to (two `archive_command`s into two repositories, a changed `repo`, a
//! repository emptied and recreated).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use futures::StreamExt;

use super::spool;
use crate::config::{Config, ConfigError};
use crate::pg::{WalFileName, WalLongPageHeader};
use crate::repo::wal::{self, PushOutcome};
use crate::repo::{RepoError, RepoIdentity};
use crate::storage::Storage;

/// What one call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveReport {
    pub name: WalFileName,
    pub outcome: Outcome,
    /// Other `.ready` files pushed ahead by this call.
    pub pushed_ahead: Vec<WalFileName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    AlreadyArchived,
    /// Pushed by an earlier call's batch; nothing to do now.
    PushedAhead,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// `archive_to_copies`: the repository holds the file, copy `name` does not.
    #[error("copy {name}: {source}")]
    Copy {
        name: String,
        source: Box<ArchiveError>,
    },
    #[error("copy {name}: {source}")]
    CopyTarget {
        name: String,
        source: crate::copy::target::TargetError,
    },
}

impl ArchiveError {
    /// PostgreSQL retries any non-zero exit; 2 marks errors the DBA must fix (arguments,
    /// configuration), 1 everything else. Never above 125: that would make the archiver exit.
    pub fn exit_code(&self) -> i32 {
        match self {
            ArchiveError::Config(e) if e.storage_error().is_some() => 1,
            ArchiveError::Usage(_) | ArchiveError::Config(_) => 2,
            ArchiveError::Repo(_) | ArchiveError::CopyTarget { .. } => 1,
            ArchiveError::Copy { source, .. } => source.exit_code(),
        }
    }
}

/// Archives `wal_path` (`%p`, relative to the data directory, which is the working directory)
/// under the name `wal_name` (`%f`); with `archive_to_copies`, then into every copy too
/// (an empty copy is first bound to the repository: `repo.json` and key slots,
/// [`crate::copy::target::prepare`]). Success only when every location holds the file.
///
/// # Errors
/// A `%f` that is not a WAL file name, an unreadable `%p`, a file that is not the segment it is
/// named after, a repository of another cluster, a different archived copy, storage failures;
/// [`ArchiveError::Copy`] for the first copy that does not hold the file.
pub async fn run(
    config: &Config,
    wal_path: &Path,
    wal_name: &str,
) -> Result<ArchiveReport, ArchiveError> {
    let report = run_one(config, wal_path, wal_name).await?;
    if !config.archive_to_copies || config.copies.is_empty() {
        return Ok(report);
    }
    let main_raw = config.raw_storage().await?;
    let identity = RepoIdentity::load(
        config
            .storage_with_key_cache(Some(&spool::key_cache_dir(config, wal_path)))
            .await?
            .as_ref(),
    )
    .await?;
    for copy in &config.copies {
        let location = config.location(&copy.name)?;
        let copy_raw = location.raw_storage().await?;
        crate::copy::target::prepare(main_raw.as_ref(), &identity, copy_raw.as_ref())
            .await
            .map_err(|source| ArchiveError::CopyTarget {
                name: copy.name.clone(),
                source,
            })?;
        run_one(&location, wal_path, wal_name)
            .await
            .map_err(|source| ArchiveError::Copy {
                name: copy.name.clone(),
                source: Box::new(source),
            })?;
    }
    Ok(report)
}

/// [`run`] for one location.
async fn run_one(
    config: &Config,
    wal_path: &Path,
    wal_name: &str,
) -> Result<ArchiveReport, ArchiveError> {
    let name: WalFileName = wal_name
        .parse()
        .map_err(|e| ArchiveError::Usage(format!("%f: {e}")))?;
    let unreadable =
        |e| ArchiveError::Usage(format!("cannot read %p '{}': {e}", wal_path.display()));
    let meta = std::fs::metadata(wal_path).map_err(unreadable)?;
    let head = read_head(wal_path).map_err(unreadable)?;
    let observed = match name {
        WalFileName::Segment(_) | WalFileName::Partial(_) => {
            Some(segment_identity(wal_path, name, &head, meta.len())?)
        }
        _ => None,
    };
    let storage = config
        .storage_with_key_cache(Some(&spool::key_cache_dir(config, wal_path)))
        .await?;
    // A segment pushed ahead by an earlier call, to this very repository, unchanged since.
    let spool_dir = observed
        .as_ref()
        .filter(|_| matches!(name, WalFileName::Segment(_)))
        .map(|o| spool::spool_dir(config, wal_path, "archive", o.system_identifier));
    if let Some(dir) = &spool_dir {
        if Marker::of(&meta)
            .take(&dir.join(format!("{name}.ok")), storage.as_ref(), name)
            .await
        {
            return Ok(ArchiveReport {
                name,
                outcome: Outcome::PushedAhead,
                pushed_ahead: Vec::new(),
            });
        }
    }
    let identity = match observed {
        Some(observed) => RepoIdentity::ensure(storage.as_ref(), &observed).await?,
        None => match RepoIdentity::load(storage.as_ref()).await {
            Err(RepoError::NotInitialized { .. }) => {
                let observed = identity_from_wal_dir(wal_path)?;
                RepoIdentity::ensure(storage.as_ref(), &observed).await?
            }
            other => other?,
        },
    };
    // The waiting segments are pushed while this one is: its compression overlaps theirs.
    let (pushed, pushed_ahead) = tokio::join!(wal::push(storage.as_ref(), name, wal_path), async {
        match &spool_dir {
            Some(dir) if config.archive_batch > 0 => {
                push_ahead(config, storage.as_ref(), &identity, wal_path, name, dir).await
            }
            _ => Vec::new(),
        }
    });
    let outcome = match pushed? {
        PushOutcome::Stored => Outcome::Stored,
        PushOutcome::AlreadyArchived => {
            tracing::warn!("WAL file {name} was already archived with the same content");
            Outcome::AlreadyArchived
        }
    };
    Ok(ArchiveReport {
        name,
        outcome,
        pushed_ahead,
    })
}

/// The repository identity a segment implies, after checking that it is the segment its name
/// says (its first page address is the segment's start LSN).
fn segment_identity(
    path: &Path,
    name: WalFileName,
    head: &[u8],
    len: u64,
) -> Result<RepoIdentity, RepoError> {
    let not_that = |message: String| RepoError::NotThatSegment {
        path: path.display().to_string(),
        name,
        message,
    };
    let header = WalLongPageHeader::parse(head).map_err(|e| not_that(e.to_string()))?;
    let seg = name.segment().expect("segment kinds");
    if len != u64::from(header.seg_size.bytes()) {
        return Err(not_that(format!(
            "{len} bytes, but its header says segments are {} bytes",
            header.seg_size.bytes()
        )));
    }
    let expected = seg.start_lsn(header.seg_size);
    if header.page_address != expected {
        return Err(not_that(format!(
            "its first page is at {}, the segment starts at {expected}",
            header.page_address
        )));
    }
    Ok(RepoIdentity::new(
        header.system_identifier,
        header.pg_major(),
        header.seg_size,
    ))
}

/// For a history or backup-history file arriving before any segment: the identity of the
/// cluster read from a segment beside it in `pg_wal`.
fn identity_from_wal_dir(wal_path: &Path) -> Result<RepoIdentity, RepoError> {
    let dir = wal_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|e| RepoError::io(dir, e))?;
    for entry in entries.flatten() {
        if let Some(WalFileName::Segment(_)) =
            entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            let mut head = [0u8; crate::pg::wal_page::LONG_PAGE_HEADER_LEN];
            let read = std::fs::File::open(entry.path())
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
            if read.is_ok() {
                if let Ok(h) = WalLongPageHeader::parse(&head) {
                    return Ok(RepoIdentity::new(
                        h.system_identifier,
                        h.pg_major(),
                        h.seg_size,
                    ));
                }
            }
        }
    }
    Err(RepoError::NotThatSegment {
        path: dir.display().to_string(),
        name: WalFileName::History(crate::pg::TimelineId::FIRST),
        message: "no WAL segment found beside it to identify the cluster".into(),
    })
}

/// Pushes up to `archive_batch` other `.ready` segments, `archive_parallel` at a time, leaving a
/// marker for each in `spool_dir` (this repository's and cluster's). Failures are left for
/// PostgreSQL's own call, which reports them; so are history and backup-history files, which are
/// small and rare.
async fn push_ahead(
    config: &Config,
    storage: &dyn Storage,
    identity: &RepoIdentity,
    wal_path: &Path,
    current: WalFileName,
    spool_dir: &Path,
) -> Vec<WalFileName> {
    let wal_dir = wal_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let Ok(entries) = std::fs::read_dir(wal_dir.join("archive_status")) else {
        return Vec::new();
    };
    let spooled: HashSet<String> = std::fs::read_dir(spool_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut ready: Vec<WalFileName> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ready")?.parse().ok())
        .filter(|n: &WalFileName| {
            matches!(n, WalFileName::Segment(_))
                && *n != current
                && !spooled.contains(&format!("{n}.ok"))
        })
        .collect();
    ready.sort();
    ready.truncate(config.archive_batch as usize);
    if ready.is_empty() || spool::create_private_dir(spool_dir).is_err() {
        return Vec::new();
    }
    futures::stream::iter(ready)
        .map(|name| {
            let path = wal_dir.join(name.to_string());
            async move {
                match push_one(storage, identity, &path, name, spool_dir).await {
                    Ok(()) => Some(name),
                    Err(e) => {
                        tracing::debug!(
                            "pushing {name} ahead failed, left for PostgreSQL's own call: {e}"
                        );
                        None
                    }
                }
            }
        })
        .buffer_unordered(config.archive_parallel as usize)
        .filter_map(|n| async move { n })
        .collect()
        .await
}

async fn push_one(
    storage: &dyn Storage,
    identity: &RepoIdentity,
    path: &Path,
    name: WalFileName,
    spool_dir: &Path,
) -> Result<(), RepoError> {
    let meta = std::fs::metadata(path).map_err(|e| RepoError::io(path, e))?;
    let head = read_head(path).map_err(|e| RepoError::io(path, e))?;
    let observed = segment_identity(path, name, &head, meta.len())?;
    identity.check(storage, &observed)?;
    let pushed = wal::store(storage, name, path).await?;
    Marker::of(&meta)
        .write(&spool_dir.join(format!("{name}.ok")), &pushed.content_id)
        .map_err(|e| RepoError::io(spool_dir, e))
}

/// The first bytes of a file: enough for a WAL segment's long page header, or all of a small
/// history or backup-history file.
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(crate::pg::wal_page::LONG_PAGE_HEADER_LEN);
    std::fs::File::open(path)?
        .take(crate::pg::wal_page::LONG_PAGE_HEADER_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// What a marker remembers of the file it vouches for: its size, inode and modification time.
/// The marker itself (`<name>.ok` in the spool of one repository and cluster) adds the SHA-256
/// of the bytes pushed.
#[derive(Debug, PartialEq, Eq)]
struct Marker(String);

impl Marker {
    fn of(meta: &std::fs::Metadata) -> Marker {
        Marker(format!(
            "{} {} {} {}",
            meta.len(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec()
        ))
    }

    /// Consumes the marker at `marker` and says whether it vouches that `name` is archived in
    /// `storage` with exactly the bytes of the file this marker was made of: the file is
    /// unchanged, and every archived version of the name has the SHA-256 the marker recorded.
    /// Anything else (no marker, another file, a repository emptied or replaced since, an
    /// unreachable one) is `false`, and the caller pushes the file itself.
    async fn take(&self, marker: &Path, storage: &dyn Storage, name: WalFileName) -> bool {
        let Ok(text) = std::fs::read_to_string(marker) else {
            return false;
        };
        let _ = std::fs::remove_file(marker);
        let Some(sha) = text
            .strip_suffix('\n')
            .and_then(|t| t.strip_prefix(self.0.as_str()))
            .and_then(|t| t.strip_prefix(' '))
        else {
            return false;
        };
        match wal::find(storage, name).await {
            Ok(versions) => !versions.is_empty() && versions.iter().all(|v| v.content_id == sha),
            Err(_) => false,
        }
    }

    /// Writes the marker; on failure (a full spool disk) removes what was written, so that no
    /// partial marker is left (one would never be trusted, but it is clutter).
    fn write(&self, marker: &Path, content_id: &str) -> std::io::Result<()> {
        let written = std::fs::write(marker, format!("{} {content_id}\n", self.0));
        if written.is_err() {
            let _ = std::fs::remove_file(marker);
        }
        written
    }
}
