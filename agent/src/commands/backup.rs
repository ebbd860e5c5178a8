//! `pgpitr backup`: a base backup over the replication protocol into the repository.
//!
//! Order of work, so that nothing the server does is wasted on a backup that cannot succeed:
//!
//! 1. the repository: reachable, writable, with a `repo.json` (the WAL archive must exist —
//!    a backup is useless without its WAL);
//! 2. the server: a replication connection (authentication and the REPLICATION attribute),
//!    IDENTIFY_SYSTEM checked against `repo.json`, `wal_level`, `archive_mode` (an error when
//!    off) and `archive_command` (a warning when it does not call `pgpitr-archive`);
//! 3. BASE_BACKUP (checkpoint, `WAIT false`, manifest with CRC-32C checksums, tablespace map): the
//!    tar streams go to [`crate::backup::tar_reader::ingest`] on a blocking thread, which
//!    packs chunks and hands full packs to an uploader task — all through bounded channels,
//!    so memory stays bounded whatever the database size;
//! 4. after the server's end-of-backup: every pack uploaded, PostgreSQL's `backup_manifest`
//!    stored, `pg_snapshot_xmax(pg_current_snapshot())` read over an ordinary SQL connection
//!    (optional), every WAL segment from the start to the stop LSN found in the repository
//!    ([`wait_for_wal`]: pgpitr waits for its WAL itself, see there);
//! 5. with `s3_object_lock`, the lock of every pack (and index) the backup references extended
//!    to what a new object is promised ([`extend_pack_locks`]): packs reused from earlier
//!    backups must stay locked as long as this one;
//! 6. only then `backups/<id>/manifest.json`, written with [`PutMode::Create`]: the commit
//!    point. A backup that fails or is killed before leaves packs that the next backup reuses,
//!    and no manifest.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::backup::incremental::{self, Parent};
use crate::backup::pack::{self, ChunkSet, Packer};
use crate::backup::tar_reader::{self, ArchiveMsg, IngestError};
use crate::config::{Config, ConfigError};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegSize, WalSegmentName};
use crate::repo::layout;
use crate::repo::lock::{LockError, RepoLock};
use crate::repo::manifest::{BackupId, BackupManifest, TablespaceEntry, MANIFEST_VERSION};
use crate::repo::wal;
use crate::repo::{RepoError, RepoIdentity};
use crate::storage::{PutMode, Storage, StorageError};
use crate::walsender::{
    BackupEvent, BaseBackupOptions, ConnectParams, ReplicationConnection, WalsenderError,
};

/// Archive messages buffered between the network and the tar reader (each a batch of about
/// [`ARCHIVE_BATCH`] bytes).
const ARCHIVE_CHANNEL: usize = 8;
/// CopyData payloads (typically 32 KiB each) are handed to the tar reader in batches of this
/// many bytes: one wake-up of the reader thread per batch.
const ARCHIVE_BATCH: usize = 512 * 1024;
/// The first pause of [`wait_for_wal`]: archiving a segment takes pgpitr-archive ~20-50 ms.
const WAL_POLL_FIRST: Duration = Duration::from_millis(20);
/// The longest pause of [`wait_for_wal`].
const WAL_POLL_MAX: Duration = Duration::from_secs(1);

/// Sealed packs waiting for the uploader (each up to [`crate::backup::PACK_TARGET_SIZE`]).
const PACK_CHANNEL: usize = 1;
/// Threads hashing and compressing chunks: one per core, up to this many.
const MAX_CHUNK_WORKERS: usize = 8;
/// Plain progress lines are logged this often when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How the server's starting checkpoint is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Checkpoint {
    /// As fast as possible (more I/O at once).
    Fast,
    /// Spread over `checkpoint_completion_target` (the default, like `pg_basebackup`).
    Spread,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BackupArgs {
    /// A label for the backup (shown by `pgpitr list`; default `pgpitr <backup id>`).
    #[arg(long)]
    pub label: Option<String>,
    /// The checkpoint that starts the backup.
    #[arg(long, value_enum, default_value_t = Checkpoint::Spread)]
    pub checkpoint: Checkpoint,
    /// Never remove this backup by retention.
    #[arg(long)]
    pub keep: bool,
    /// How long to wait, after the server finished, for the backup's WAL to appear in the
    /// repository; past it the backup fails (and leaves no manifest). From a standby, keep it
    /// above the primary's `archive_timeout`: the last segment arrives once the primary switches.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub wal_timeout: u64,
    /// PostgreSQL 17+: the server sends only the blocks changed since the newest backup of
    /// this timeline (it needs `summarize_wal = on`). pgpitr still stores a complete backup,
    /// made of the changed blocks and that backup's unchanged chunks: a restore never needs
    /// a chain. Without a backup to build on (none, or its `backup_manifest` gone), a full
    /// backup is taken with a warning.
    #[arg(long)]
    pub incremental: bool,
    /// Pause before the commit point (milliseconds; tests of a lock lost mid-run).
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pub commit_delay_ms: u64,
}

/// Why a backup failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The server's error with its hint (kept out of the `source` chain: its message already
    /// includes everything, and error reporters would print it twice).
    #[error("{error}{}", hint(.error))]
    Server { error: WalsenderError },
    #[error("no connection configured: set `conninfo` (or PGPITR_CONNINFO), or the libpq variables PGHOST, PGUSER, …")]
    NoConnInfo,
    #[error("server wal_level is '{0}': a backup needs wal_level = replica (or logical); set it and restart the server")]
    WalLevel(String),
    #[error("server archive_mode is '{0}': the backup's WAL would never reach the repository; set archive_mode = on and archive_command = 'pgpitr-archive %p %f', then restart the server")]
    ArchiveOff(String),
    #[error("the server's WAL segment size '{0}' cannot be read")]
    SegmentSize(String),
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("the backup's WAL is not in the repository after {waited}s: {missing} segment(s) missing, first {first}; check that archive_command succeeds (pg_stat_archiver) or raise --wal-timeout")]
    WalMissing {
        waited: u64,
        missing: usize,
        first: WalSegmentName,
    },
    /// On a standby the segment holding the stop point is complete only once the primary has
    /// switched to the next one (a standby cannot switch: no `pg_switch_wal()` in recovery).
    #[error("the backup's WAL is not in the repository after {waited}s: {missing} segment(s) missing, first {first}; a backup from a standby needs the primary to switch past its stop point and the segment archived (by the primary, or by the standby with archive_mode = always): set archive_timeout on the primary (e.g. '60s') below --wal-timeout, and check pg_stat_archiver on the archiving server")]
    StandbyWalMissing {
        waited: u64,
        missing: usize,
        first: WalSegmentName,
    },
    #[error("PostgreSQL's backup_manifest does not match the stored files: {0}")]
    ManifestMismatch(String),
    #[error("unexpected output from the server: {0}")]
    Protocol(String),
    #[error("--incremental needs PostgreSQL 17 or later and the server runs {0}: take a full backup (without --incremental)")]
    IncrementalUnsupported(String),
    #[error("--incremental needs summarize_wal = on and the server has '{0}': set summarize_wal = on (a reload is enough), take a full backup, then incremental ones")]
    SummarizeWalOff(String),
    #[error("the server refused an incremental backup against backup {parent}: {error}; take a full backup (without --incremental)")]
    IncrementalRefused {
        parent: BackupId,
        error: Box<WalsenderError>,
    },
    /// The tar reader stopped early; its own error is the one to report.
    #[error("the tar reader stopped")]
    ReaderStopped,
}

fn hint(e: &WalsenderError) -> String {
    e.hint().map(|h| format!("; hint: {h}")).unwrap_or_default()
}

impl From<WalsenderError> for BackupError {
    fn from(error: WalsenderError) -> Self {
        BackupError::Server { error }
    }
}

impl From<StorageError> for BackupError {
    fn from(e: StorageError) -> Self {
        BackupError::Repo(e.into())
    }
}

/// Takes a base backup into the repository of `config` and returns its manifest once the
/// manifest — the commit point — is stored. Holds the repository lock (`repo::lock`) while it
/// runs, so that `expire` never deletes packs this backup may reference; a repository without
/// `repo.json` is refused below, before anything is written.
///
/// # Errors
/// See [`BackupError`]; nothing that looks like a complete backup is left on error.
pub async fn run(config: &Config, args: &BackupArgs) -> Result<BackupManifest, BackupError> {
    let storage = config.storage().await?;
    let lock = match storage.head(layout::REPO_JSON).await? {
        Some(_) => Some(RepoLock::acquire(storage, "backup").await?),
        None => None,
    };
    let result = run_locked(config, args, lock.as_ref()).await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    result
}

/// The backup, under `lock` (`None` only for a repository created by this backup, which no
/// other process knows yet).
async fn run_locked(
    config: &Config,
    args: &BackupArgs,
    lock: Option<&RepoLock>,
) -> Result<BackupManifest, BackupError> {
    // 1. The repository.
    let storage = config.storage().await?;
    storage.check_writable().await?;
    // A repository without repo.json is created below, once the server's settings are known to
    // archive into it: on a new cluster the backup may come before the first archived segment.
    let identity = match RepoIdentity::load(storage.as_ref()).await {
        Ok(id) => Some(id),
        Err(RepoError::NotInitialized { .. }) => None,
        Err(e) => return Err(e.into()),
    };

    // 2. The server.
    let params = ConnectParams::from_conninfo(&config.conninfo)?;
    let mut conn = match ReplicationConnection::connect(&params).await {
        Ok(c) => c,
        Err(e @ WalsenderError::TooManyWalSenders { .. }) => {
            // wal_level = minimal forces max_wal_senders = 0: name the real cause if we can.
            if let Some(level) = sql_show(&params, "wal_level").await {
                if level == "minimal" {
                    return Err(BackupError::WalLevel(level));
                }
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let system = conn.identify_system().await?;
    let seg_text = conn.show("wal_segment_size").await?;
    let seg_size =
        parse_segment_size(&seg_text).ok_or_else(|| BackupError::SegmentSize(seg_text.clone()))?;
    let version_num = conn.server_version_num();
    let observed = RepoIdentity::new(system.system_identifier, version_num / 10000, seg_size);
    if let Some(identity) = &identity {
        identity.check(storage.as_ref(), &observed)?;
    }
    let wal_level = conn.show("wal_level").await?;
    if wal_level == "minimal" {
        return Err(BackupError::WalLevel(wal_level));
    }
    let archive_mode = conn.show("archive_mode").await?;
    // A hot standby archives only with archive_mode = always; otherwise its WAL reaches the
    // repository from the primary, which this backup never connects to (issue 20).
    let standby =
        crate::pgsql::is_standby(conn.parameter("in_hot_standby").map(str::to_owned), &params)
            .await
            .unwrap_or(false);
    if standby {
        tracing::info!(
            "the server is a standby (archive_mode = {archive_mode}): the backup's WAL must reach \
             the repository from {}",
            if archive_mode == "always" {
                "this standby (archive_mode = always) or the primary"
            } else {
                "the primary (archive_mode = on there)"
            }
        );
    } else if archive_mode != "on" && archive_mode != "always" {
        return Err(BackupError::ArchiveOff(archive_mode));
    }
    // A standby's archive_command runs only with archive_mode = always.
    if !standby || archive_mode == "always" {
        check_archive_command(&mut conn).await;
    }
    if identity.is_none() {
        RepoIdentity::ensure(storage.as_ref(), &observed).await?;
    }
    let parent = if args.incremental {
        incremental_parent(&mut conn, storage.clone(), &system, version_num).await?
    } else {
        None
    };

    // 3. The backup.
    let (id, start_time) = new_backup_id(storage.as_ref()).await?;
    let label = args.label.clone().unwrap_or_else(|| format!("pgpitr {id}"));
    tracing::info!(
        "backup {id} of cluster {} (PostgreSQL {}) starting with a {} checkpoint",
        system.system_identifier,
        conn.server_version(),
        match args.checkpoint {
            Checkpoint::Fast => "fast",
            Checkpoint::Spread => "spread",
        }
    );
    let known = ChunkSet::load(storage.as_ref()).await?;
    tracing::debug!("{} chunks already in the repository", known.len());

    let (pack_tx, pack_rx) = mpsc::channel(PACK_CHANNEL);
    let packer = Packer::new(Arc::new(known), pack_tx);
    let uploader = {
        let (storage, buffers) = (storage.clone(), packer.buffers());
        tokio::spawn(async move { pack::upload(storage.as_ref(), pack_rx, buffers).await })
    };
    let (archive_tx, archive_rx) = mpsc::channel(ARCHIVE_CHANNEL);
    let workers =
        std::thread::available_parallelism().map_or(2, |n| n.get().min(MAX_CHUNK_WORKERS));
    let parent_id = parent.as_ref().map(|p| BackupId(p.id.clone()));
    let reader = tokio::task::spawn_blocking(move || {
        tar_reader::ingest(archive_rx, packer, workers, parent)
    });

    let opts = BaseBackupOptions {
        fast_checkpoint: args.checkpoint == Checkpoint::Fast,
        // pgpitr waits for the WAL in the repository itself (wait_for_wal below).
        wait_for_wal: false,
        manifest: true,
        progress: true,
        tablespace_map: true,
        incremental: parent_id.is_some(),
        ..BaseBackupOptions::new(label.clone())
    };
    let streamed = stream_backup(&mut conn, opts, archive_tx).await;
    // Whatever happened, collect the reader and the uploader, and report the root cause: a
    // storage failure stops the reader, which stops the stream; a server error truncates the
    // archive the reader is in.
    let ingested = reader.await.expect("tar reader thread");
    let uploaded = uploader.await.expect("uploader task");
    uploaded?;
    let streamed = match streamed {
        Err(BackupError::ReaderStopped) => None,
        // E.g. "WAL summaries are required on timeline 1 from 0/2000028 to 0/4000060, but no
        // summaries for that timeline and LSN range exist" (summarize_wal turned on after
        // the parent backup): the server's words, with what to do.
        Err(BackupError::Server {
            error: error @ WalsenderError::Server { .. },
        }) if parent_id.is_some() && incremental_error(&error) => {
            return Err(BackupError::IncrementalRefused {
                parent: parent_id.expect("checked"),
                error: Box::new(error),
            })
        }
        other => Some(other?),
    };
    let ingested = ingested?;
    let Some(streamed) = streamed else {
        return Err(BackupError::ReaderStopped);
    };
    conn.close().await;

    let received = streamed.received;
    let start_lsn: Lsn = parse_lsn(&streamed.start_lsn)?;
    let stop_lsn: Lsn = parse_lsn(&streamed.stop_lsn)?;
    let start_timeline = TimelineId(streamed.start_timeline);
    let stop_timeline = TimelineId(streamed.stop_timeline);
    let pg_manifest = if ingested.replaced.is_empty() {
        cross_check(&streamed.pg_manifest, &ingested.files)?;
        streamed.pg_manifest
    } else {
        // The server's manifest describes what it sent; the one stored describes the complete
        // files (see backup::incremental), and both are checked.
        cross_check(&streamed.pg_manifest, &as_sent(&ingested))?;
        let rewritten = incremental::rewrite_manifest(&streamed.pg_manifest, &ingested.replaced)
            .map_err(BackupError::ManifestMismatch)?;
        cross_check(&rewritten, &ingested.files)?;
        rewritten
    };
    if let Some(p) = &parent_id {
        tracing::info!(
            "incremental against backup {p}: {} files made complete from its chunks",
            ingested.replaced.len().saturating_sub(1)
        );
    }

    // 4. What the manifest needs besides the files.
    storage
        .put(
            &layout::pg_backup_manifest_key(&id),
            Bytes::from(pg_manifest),
            PutMode::Overwrite,
        )
        .await?;
    let stop_next_xid = next_xid(&params).await;
    wait_for_wal(
        storage.as_ref(),
        seg_size,
        (start_lsn, start_timeline),
        (stop_lsn, stop_timeline),
        Duration::from_secs(args.wal_timeout),
    )
    .await
    .map_err(|e| match e {
        BackupError::WalMissing {
            waited,
            missing,
            first,
        } if standby => BackupError::StandbyWalMissing {
            waited,
            missing,
            first,
        },
        e => e,
    })?;

    // 5. Reused packs stay locked as long as this backup.
    extend_pack_locks(storage.as_ref(), &ingested.files).await?;

    // 6. The commit point.
    let size_bytes = ingested.files.iter().map(|f| f.size).sum();
    let manifest = BackupManifest {
        manifest_version: MANIFEST_VERSION,
        id: id.clone(),
        label,
        keep: args.keep,
        start_lsn,
        start_timeline,
        stop_lsn,
        stop_timeline,
        start_time,
        stop_time: jiff::Timestamp::now(),
        stop_next_xid,
        system_identifier: system.system_identifier,
        pg_version_num: version_num,
        wal_segment_size: seg_size,
        tablespaces: streamed.tablespaces,
        files: ingested.files,
        size_bytes,
        new_bytes: ingested.stats.new_bytes,
        incremental_from: parent_id,
    };
    let body = serde_json::to_vec(&manifest).expect("serialisable");
    // The lock is checked on both sides of the commit point (issue 15, item 4): an `expire`
    // after `pgpitr unlock` may have deleted packs this backup references; a manifest written
    // after the lock was lost is taken back.
    if args.commit_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.commit_delay_ms)).await;
    }
    if let Some(lock) = lock {
        lock.check().await?;
    }
    let manifest_key = layout::backup_manifest_key(&id);
    storage
        .put(&manifest_key, Bytes::from(body), PutMode::Create)
        .await?;
    if let Some(lock) = lock {
        if let Err(e) = lock.check().await {
            if let Err(d) = storage.delete(&manifest_key).await {
                tracing::error!(
                    "cannot remove {manifest_key} after losing the repository lock: {d}; remove \
                     it by hand, its packs may be gone"
                );
            }
            return Err(e.into());
        }
    }
    tracing::info!(
        "backup {id} complete: {} files, {} ({} received from the server, {} new in {} packs, {} chunks reused), WAL {start_lsn} to {stop_lsn} on timeline {stop_timeline}",
        manifest.files.len(),
        human_bytes(size_bytes),
        human_bytes(received),
        human_bytes(manifest.new_bytes),
        ingested.stats.packs,
        ingested.stats.reused_chunks,
    );
    Ok(manifest)
}

/// Warns when the server's `archive_command` is not pgpitr-archive: the backup waits for its WAL
/// in the repository anyway.
/// With Object Lock, extends the lock of every pack and pack index that `files` reference to
/// now + the retention of a new object (never shortening one), so that packs reused from
/// earlier backups stay locked at least as long as the backup being committed.
///
/// # Errors
/// Storage errors.
async fn extend_pack_locks(
    storage: &dyn Storage,
    files: &[crate::repo::manifest::FileEntry],
) -> Result<(), StorageError> {
    let Some(lock) = storage.object_lock() else {
        return Ok(());
    };
    let until = jiff::SignedDuration::try_from(lock.retain)
        .ok()
        .and_then(|d| jiff::Timestamp::now().checked_add(d).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    let packs: HashSet<&str> = files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .map(|c| c.pack.as_str())
        .collect();
    let keys: Vec<(String, jiff::Timestamp)> = packs
        .into_iter()
        .flat_map(|p| [layout::pack_key(p), layout::pack_index_key(p)])
        .map(|k| (k, until))
        .collect();
    let extended = crate::storage::extend_locks(storage, keys).await?;
    tracing::debug!("extended the Object Lock of {extended} pack object(s)");
    Ok(())
}

async fn check_archive_command(conn: &mut ReplicationConnection) {
    match conn.show("archive_command").await {
        Ok(cmd) if cmd.contains("pgpitr-archive") => {}
        Ok(cmd) => tracing::warn!(
            "archive_command is '{cmd}', not pgpitr-archive: the backup will wait for its WAL to \
             appear in the repository anyway"
        ),
        Err(e) => tracing::warn!("cannot read archive_command: {e}"),
    }
}

/// What the server sent besides the archives.
#[derive(Debug, Default)]
struct Streamed {
    start_lsn: String,
    start_timeline: u32,
    stop_lsn: String,
    stop_timeline: u32,
    tablespaces: Vec<TablespaceEntry>,
    pg_manifest: Vec<u8>,
    /// Tar bytes the server sent (archives, not the manifest).
    received: u64,
}

/// Runs BASE_BACKUP and feeds its archives to the tar reader.
async fn stream_backup(
    conn: &mut ReplicationConnection,
    opts: BaseBackupOptions,
    archive_tx: mpsc::Sender<ArchiveMsg>,
) -> Result<Streamed, BackupError> {
    let mut out = Streamed::default();
    let mut progress = Progress::new();
    let mut stream = conn.base_backup(opts).await?;
    // A send fails only when the reader stopped; its own error is reported by the caller.
    let reader_gone = || BackupError::ReaderStopped;
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(event) = stream.next_event().await? {
        if !matches!(event, BackupEvent::ArchiveData(_)) && !batch.is_empty() {
            send_batch(&archive_tx, &mut batch).await?;
        }
        match event {
            BackupEvent::Started {
                start_lsn,
                timeline,
            } => {
                tracing::info!(
                    "checkpoint done, backup starts at {start_lsn} on timeline {timeline}"
                );
                out.start_lsn = start_lsn;
                out.start_timeline = timeline;
            }
            BackupEvent::Tablespaces(list) => {
                let total: Option<u64> = list.iter().map(|t| t.size_estimate_bytes).sum();
                progress.set_total(total);
                for t in list {
                    if let (Some(oid), Some(location)) = (t.oid, t.location) {
                        out.tablespaces.push(TablespaceEntry { oid, location });
                    }
                }
            }
            BackupEvent::ArchiveStart { name, .. } => {
                let tablespace = match name.strip_suffix(".tar") {
                    Some("base") => None,
                    Some(oid) => Some(
                        oid.parse::<u32>()
                            .map_err(|_| BackupError::Protocol(format!("archive name {name}")))?,
                    ),
                    None => return Err(BackupError::Protocol(format!("archive name {name}"))),
                };
                archive_tx
                    .send(ArchiveMsg::Start { tablespace })
                    .await
                    .map_err(|_| reader_gone())?;
            }
            BackupEvent::ArchiveData(data) => {
                progress.add(data.len() as u64);
                out.received += data.len() as u64;
                batch.push(data);
                if batch.iter().map(Bytes::len).sum::<usize>() >= ARCHIVE_BATCH {
                    send_batch(&archive_tx, &mut batch).await?;
                }
            }
            BackupEvent::ArchiveEnd => {
                archive_tx
                    .send(ArchiveMsg::End)
                    .await
                    .map_err(|_| reader_gone())?;
            }
            BackupEvent::ManifestData(data) => out.pg_manifest.extend_from_slice(&data),
            BackupEvent::Progress { .. } => {}
            BackupEvent::Finished { stop_lsn, timeline } => {
                out.stop_lsn = stop_lsn;
                out.stop_timeline = timeline;
            }
        }
    }
    progress.finish();
    if out.stop_lsn.is_empty() || out.start_lsn.is_empty() {
        return Err(BackupError::Protocol(
            "backup ended without its positions".into(),
        ));
    }
    Ok(out)
}

fn parse_lsn(s: &str) -> Result<Lsn, BackupError> {
    s.parse()
        .map_err(|e: crate::pg::ParseError| BackupError::Protocol(e.to_string()))
}

/// Hands the batched CopyData payloads to the tar reader, leaving `batch` empty.
async fn send_batch(
    archive_tx: &mpsc::Sender<ArchiveMsg>,
    batch: &mut Vec<Bytes>,
) -> Result<(), BackupError> {
    archive_tx
        .send(ArchiveMsg::Data(std::mem::take(batch)))
        .await
        .map_err(|_| BackupError::ReaderStopped)
}

/// Checks every file of PostgreSQL's `backup_manifest` against what was stored: same size,
/// same CRC-32C (the checksum we ask for). An independent check that the tar stream was read
/// correctly.
fn cross_check(
    pg_manifest: &[u8],
    files: &[crate::repo::manifest::FileEntry],
) -> Result<(), BackupError> {
    #[derive(serde::Deserialize)]
    struct PgManifest {
        #[serde(rename = "Files")]
        files: Vec<PgFile>,
    }
    #[derive(serde::Deserialize)]
    struct PgFile {
        #[serde(rename = "Path")]
        path: Option<String>,
        #[serde(rename = "Size")]
        size: u64,
        #[serde(rename = "Checksum-Algorithm")]
        algorithm: Option<String>,
        #[serde(rename = "Checksum")]
        checksum: Option<String>,
    }
    let parsed: PgManifest = serde_json::from_slice(pg_manifest)
        .map_err(|e| BackupError::ManifestMismatch(format!("unreadable: {e}")))?;
    let ours: std::collections::HashMap<&str, &crate::repo::manifest::FileEntry> =
        files.iter().map(|f| (f.path.as_str(), f)).collect();
    for f in parsed.files {
        // Paths that are not valid UTF-8 come as "Encoded-Path"; our tar reader refuses them.
        let Some(path) = f.path else {
            return Err(BackupError::ManifestMismatch(
                "a file name is not UTF-8".into(),
            ));
        };
        let Some(ours) = ours.get(path.as_str()) else {
            return Err(BackupError::ManifestMismatch(format!(
                "'{path}' was not received"
            )));
        };
        if ours.size != f.size {
            return Err(BackupError::ManifestMismatch(format!(
                "'{path}' has {} bytes, the server says {}",
                ours.size, f.size
            )));
        }
        if f.algorithm.as_deref() == Some("CRC32C")
            && !same_crc32c(f.checksum.as_deref(), ours.crc32c.as_deref())
        {
            return Err(BackupError::ManifestMismatch(format!(
                "'{path}' has a different CRC-32C"
            )));
        }
    }
    Ok(())
}

/// The files of `ingested` as the server sent them (incremental files and `backup_label`
/// under their sent names, sizes and CRC-32C), for [`cross_check`] with its manifest.
fn as_sent(ingested: &tar_reader::Ingested) -> Vec<crate::repo::manifest::FileEntry> {
    let replaced: std::collections::HashMap<&str, &incremental::Replaced> = ingested
        .replaced
        .iter()
        .map(|r| (r.path.as_str(), r))
        .collect();
    ingested
        .files
        .iter()
        .map(|f| {
            let mut f = f.clone();
            if let Some(r) = replaced.get(f.path.as_str()) {
                f.path = r.sent_path.clone();
                f.size = r.sent_size;
                f.crc32c = Some(format!("{:08x}", r.sent_crc32c));
            }
            f
        })
        .collect()
}

/// Whether a server error during an incremental BASE_BACKUP is about the incremental backup
/// itself (WAL summaries, the uploaded manifest), rather than, say, a data checksum failure.
fn incremental_error(e: &WalsenderError) -> bool {
    match e {
        WalsenderError::Server { message, .. } => {
            let m = message.to_lowercase();
            ["summar", "manifest", "incremental"]
                .iter()
                .any(|w| m.contains(w))
        }
        _ => false,
    }
}

/// The backup an incremental backup builds on: the newest of this system and timeline whose
/// `backup_manifest` is stored, uploaded to the server (UPLOAD_MANIFEST), with what the tar
/// reader needs to make the incremental files complete. `None` (with a warning: a full backup
/// follows) when there is no such backup.
///
/// # Errors
/// A server older than 17 or with `summarize_wal` off; the server refusing the manifest;
/// storage errors.
async fn incremental_parent(
    conn: &mut ReplicationConnection,
    storage: Arc<dyn Storage>,
    system: &crate::walsender::SystemIdentity,
    version_num: u32,
) -> Result<Option<Arc<Parent>>, BackupError> {
    if version_num < 170000 {
        return Err(BackupError::IncrementalUnsupported(
            conn.server_version().to_string(),
        ));
    }
    let summarize = conn.show("summarize_wal").await?;
    if summarize != "on" {
        return Err(BackupError::SummarizeWalOff(summarize));
    }
    let block_text = conn.show("block_size").await?;
    let block_size: u32 = block_text
        .parse()
        .ok()
        .filter(|b: &u32| b.is_power_of_two() && (1024..=32768).contains(b))
        .ok_or_else(|| BackupError::Protocol(format!("block_size '{block_text}'")))?;
    let candidates: Vec<BackupManifest> = crate::recovery::source::load_manifests(storage.as_ref())
        .await?
        .into_iter()
        .filter(|m| {
            m.system_identifier == system.system_identifier
                && m.pg_version_num / 10000 == version_num / 10000
                && m.stop_timeline == TimelineId(system.timeline)
        })
        .collect();
    let Some(m) = candidates.into_iter().max_by(|a, b| a.id.cmp(&b.id)) else {
        tracing::warn!(
            "no earlier backup of this cluster on timeline {} to build an incremental backup on:              taking a full backup",
            system.timeline
        );
        return Ok(None);
    };
    let pg_manifest = match storage.get(&layout::pg_backup_manifest_key(&m.id)).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => {
            tracing::warn!(
                "backup {} has no backup_manifest in the repository to build an incremental                  backup on: taking a full backup",
                m.id
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    conn.upload_manifest(&pg_manifest)
        .await
        .map_err(|error| match error {
            WalsenderError::Server { .. } => BackupError::IncrementalRefused {
                parent: m.id.clone(),
                error: Box::new(error),
            },
            e => e.into(),
        })?;
    let handle = tokio::runtime::Handle::current();
    let fetch = move |c: &crate::repo::manifest::ChunkRef, out: &mut [u8]| {
        if !layout::is_pack_id(&c.pack) {
            return Err(format!("invalid pack id '{}'", c.pack));
        }
        let key = layout::pack_key(&c.pack);
        let end = c
            .offset
            .checked_add(c.length)
            .ok_or_else(|| format!("chunk {} out of range", c.sha256))?;
        let data = handle
            .block_on(storage.get_range(&key, c.offset..end))
            .map_err(|e| format!("reading the parent's chunk {}: {e}", c.sha256))?;
        crate::repo::codec::decode_chunk_verified(&data, &c.sha256, out)
            .map_err(|e| format!("the parent's chunk {} in {key}: {e}", c.sha256))
    };
    tracing::info!("incremental backup against backup {}", m.id);
    Ok(Some(Arc::new(Parent {
        id: m.id.0.clone(),
        files: m
            .files
            .into_iter()
            .filter(|f| f.kind == crate::repo::manifest::FileKind::File)
            .map(|f| (f.path.clone(), f))
            .collect(),
        block_size,
        fetch: Arc::new(fetch),
    })))
}

/// Whether `manifest`, a CRC-32C as PostgreSQL's `backup_manifest` writes it (the bytes of the
/// server's `uint32` in its own byte order, hex; src/common/checksum_helper.c), is `ours` (the
/// value as 8 hex digits).
fn same_crc32c(manifest: Option<&str>, ours: Option<&str>) -> bool {
    let (Some(theirs), Some(ours)) = (manifest, ours) else {
        return false;
    };
    let (Ok(theirs), Ok(ours)) = (
        u32::from_str_radix(theirs, 16),
        u32::from_str_radix(ours, 16),
    ) else {
        return false;
    };
    theirs.swap_bytes() == ours || theirs == ours
}

/// A backup id for now, unique in the repository: waits a second while the id is taken.
async fn new_backup_id(storage: &dyn Storage) -> Result<(BackupId, jiff::Timestamp), BackupError> {
    loop {
        let now = jiff::Timestamp::now();
        let id = BackupId::from_time(now);
        let taken = storage
            .head(&layout::backup_manifest_key(&id))
            .await?
            .is_some()
            || storage
                .head(&layout::pg_backup_manifest_key(&id))
                .await?
                .is_some();
        if !taken {
            return Ok((id, now));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// `SHOW wal_segment_size` output (`16MB`, `1GB`, `1024kB`) in bytes.
pub(crate) fn parse_segment_size(s: &str) -> Option<WalSegSize> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit = match s[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    WalSegSize::new(u32::try_from(n.checked_mul(unit)?).ok()?).ok()
}

/// An ordinary SQL connection with the same parameters, for optional information only: `None`
/// (logged at debug level) when it cannot be opened.
async fn sql_connect(params: &ConnectParams) -> Option<tokio_postgres::Client> {
    crate::pgsql::connect(params, "pgpitr backup")
        .await
        .map_err(|e| tracing::debug!("SQL connection failed: {e}"))
        .ok()
}

async fn sql_show(params: &ConnectParams, name: &str) -> Option<String> {
    let client = sql_connect(params).await?;
    let row = client
        .query_one(&format!("SELECT current_setting('{name}')"), &[])
        .await
        .ok()?;
    row.try_get(0).ok()
}

/// The next transaction id to be assigned, read after the backup: every xid below it began
/// before the backup ended. `pg_snapshot_xmax(pg_current_snapshot())` rather than
/// `pg_current_xact_id()`, which would assign (and burn) an xid and fails on a standby.
async fn next_xid(params: &ConnectParams) -> Option<u64> {
    let client = sql_connect(params).await?;
    let row = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(|e| tracing::warn!("cannot read the next transaction id: {e}"))
        .ok()?;
    let text: String = row.try_get(0).ok()?;
    text.parse().ok()
}

/// Waits until every WAL segment from `start`'s to `stop`'s is in the repository (on the start
/// or the stop timeline), polling for up to `limit`: first after [`WAL_POLL_FIRST`], then at
/// doubling intervals up to [`WAL_POLL_MAX`].
///
/// This is the wait that BASE_BACKUP's `WAIT true` would do on the server, done here instead,
/// as pgBackRest does with `pg_backup_stop(wait_for_archive => false)`:
/// - the server's wait (`do_pg_backup_stop()`, xlog.c) re-checks `archive_status` once a
///   second, so it adds up to a second to every backup after its WAL is archived; here the
///   check follows the archiver within [`WAL_POLL_MAX`] at worst, ~50 ms typically;
/// - it checks what matters: the segments in *this* repository, not that `archive_command`
///   returned 0 somewhere;
/// - it ends: the server waits for ever (with a warning every minute) when archiving fails;
///   here `--wal-timeout` ends the backup with an error that says what to check.
async fn wait_for_wal(
    storage: &dyn Storage,
    seg_size: WalSegSize,
    start: (Lsn, TimelineId),
    stop: (Lsn, TimelineId),
    limit: Duration,
) -> Result<(), BackupError> {
    let first = start.0.segno(seg_size);
    // The segment holding the last byte before the stop LSN (XLByteToPrevSeg in
    // do_pg_backup_stop()).
    let last = Lsn(stop.0 .0.saturating_sub(1)).segno(seg_size).max(first);
    let timelines = [start.1, stop.1];
    let wanted = |segno: u64| {
        timelines
            .iter()
            .map(move |&tli| WalSegmentName::from_segno(tli, segno, seg_size))
    };
    let dirs: HashSet<String> = (first..=last)
        .flat_map(wanted)
        .map(|n| layout::wal_dir(WalFileName::Segment(n)))
        .collect();
    let began = Instant::now();
    let mut pause = WAL_POLL_FIRST;
    let mut reported = false;
    loop {
        let mut present = HashSet::new();
        for dir in &dirs {
            for w in wal::list(storage, dir).await? {
                if let WalFileName::Segment(s) = w.name {
                    present.insert(s);
                }
            }
        }
        let missing: Vec<WalSegmentName> = (first..=last)
            .filter(|&n| !wanted(n).any(|s| present.contains(&s)))
            .map(|n| WalSegmentName::from_segno(stop.1, n, seg_size))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if began.elapsed() >= limit {
            return Err(BackupError::WalMissing {
                waited: limit.as_secs(),
                missing: missing.len(),
                first: missing[0],
            });
        }
        if !reported && began.elapsed() >= WAL_POLL_MAX {
            tracing::info!(
                "waiting for {} WAL segment(s) to reach the repository, first {}",
                missing.len(),
                missing[0]
            );
            reported = true;
        }
        tokio::time::sleep(pause.min(limit.saturating_sub(began.elapsed()))).await;
        pause = (pause * 2).min(WAL_POLL_MAX);
    }
}

/// A progress bar on a terminal, log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: Option<u64>,
    done: u64,
    began: Instant,
    last_log: Instant,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            bar
        });
        Progress {
            bar,
            total: None,
            done: 0,
            began: Instant::now(),
            last_log: Instant::now(),
        }
    }

    fn set_total(&mut self, total: Option<u64>) {
        self.total = total;
        if let (Some(bar), Some(t)) = (&self.bar, total) {
            bar.set_length(t);
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            // The estimate can be short (files grow during the backup).
            if self.total.is_some_and(|t| self.done > t) {
                bar.set_length(self.done);
            }
            bar.set_position(self.done);
        } else if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let rate = self.done as f64 / self.began.elapsed().as_secs_f64().max(0.001);
            match self.total {
                Some(t) if t > 0 => tracing::info!(
                    "backup: {} of ~{} ({}%), {}/s",
                    human_bytes(self.done),
                    human_bytes(t),
                    (self.done * 100 / t).min(100),
                    human_bytes(rate as u64)
                ),
                _ => tracing::info!(
                    "backup: {}, {}/s",
                    human_bytes(self.done),
                    human_bytes(rate as u64)
                ),
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `1.5 GiB`-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_sizes_as_shown_by_the_server() {
        assert_eq!(parse_segment_size("16MB").unwrap().bytes(), 16 << 20);
        assert_eq!(parse_segment_size("1GB").unwrap().bytes(), 1 << 30);
        assert_eq!(parse_segment_size("1024kB").unwrap().bytes(), 1 << 20);
        assert!(parse_segment_size("3MB").is_none());
        assert!(parse_segment_size("MB").is_none());
    }

    #[test]
    fn sizes_for_humans() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn backup_manifest_cross_check() {
        let file = crate::repo::manifest::FileEntry {
            path: "PG_VERSION".into(),
            size: 3,
            mode: 0o600,
            mtime: 0,
            sha256: Some("ab".repeat(32)),
            crc32c: Some("0a0b0c0d".into()),
            kind: Default::default(),
            link_target: None,
            chunks: Vec::new(),
        };
        let m = |size: u64, sum: &str| {
            format!(
                r#"{{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [{{"Path": "PG_VERSION", "Size": {size}, "Last-Modified": "x", "Checksum-Algorithm": "CRC32C", "Checksum": "{sum}"}}]}}"#
            )
        };
        // Little-endian servers write the bytes of the value in reverse.
        cross_check(m(3, "0d0c0b0a").as_bytes(), std::slice::from_ref(&file)).unwrap();
        cross_check(m(3, "0a0b0c0d").as_bytes(), std::slice::from_ref(&file)).unwrap();
        assert!(cross_check(m(4, "0d0c0b0a").as_bytes(), std::slice::from_ref(&file)).is_err());
        assert!(cross_check(m(3, "0d0c0b0b").as_bytes(), std::slice::from_ref(&file)).is_err());
        assert!(cross_check(m(3, "x").as_bytes(), &[]).is_err());
    }
}

/// Hostile `backup_manifest` from the server: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::repo::manifest::FileEntry;
    use proptest::prelude::*;

    fn files() -> impl Strategy<Value = Vec<FileEntry>> {
        proptest::collection::btree_map("[a-zA-Z0-9_/]{1,30}", (any::<u64>(), any::<u32>()), 0..6)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(path, (size, crc))| FileEntry {
                        path,
                        size,
                        mode: 0o600,
                        mtime: 0,
                        sha256: None,
                        crc32c: Some(format!("{crc:08x}")),
                        kind: Default::default(),
                        link_target: None,
                        chunks: Vec::new(),
                    })
                    .collect()
            })
    }

    /// The manifest a little-endian server writes for `files`.
    fn render(files: &[FileEntry]) -> String {
        let entries: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                let crc = u32::from_str_radix(f.crc32c.as_deref().unwrap(), 16).unwrap();
                serde_json::json!({
                    "Path": f.path,
                    "Size": f.size,
                    "Last-Modified": "2026-12-03 20:00:00 GMT",
                    "Checksum-Algorithm": "CRC32C",
                    "Checksum": format!("{:08x}", crc.swap_bytes()),
                })
            })
            .collect();
        serde_json::json!({"PostgreSQL-Backup-Manifest-Version": 1, "Files": entries}).to_string()
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn the_servers_manifest_of_the_stored_files_matches(files in files()) {
            prop_assert!(cross_check(render(&files).as_bytes(), &files).is_ok());
        }

        #[test]
        fn arbitrary_bytes_are_a_mismatch(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(matches!(
                cross_check(&bytes, &[]),
                Err(BackupError::ManifestMismatch(_))
            ));
        }

        #[test]
        fn mutated_manifests_match_or_are_a_mismatch(
            files in files(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut bytes = render(&files).into_bytes();
            for (at, b) in edits {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            match cross_check(&bytes, &files) {
                Ok(()) | Err(BackupError::ManifestMismatch(_)) => {}
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
    }
}
