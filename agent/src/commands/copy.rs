//! `pgpitr copy [--to NAME]`: brings every backup and WAL file a copy's retention keeps from
//! the repository to the copy (`[[copy]]` in the configuration; `crate::copy` for the rules),
//! sending only what the copy lacks, each object verified on arrival, under the copy's own
//! lock. Copies are filled one after the other; one that fails does not stop the next.
//!
//! Order, so that a copy never claims what it does not hold, whenever the process is killed:
//! `repo.json` and key slots; restore points; `.history` files; WAL by position, one file at a
//! time (a kill leaves the copy's WAL without a gap); packs, each before its index (the index
//! is the pack's commit point: a pack without index is sent again); then per backup, oldest
//! first, PostgreSQL's `backup_manifest` and last `manifest.json`, only when all of its packs
//! arrived and the WAL went without error. The next run lists the copy and sends the rest.

use std::collections::HashSet;
use std::io::IsTerminal;

use futures::StreamExt;
use serde::Serialize;

use crate::backup::pack::PackIndex;
use crate::config::{Config, ConfigError};
use crate::copy::select;
use crate::copy::target::{self, Check, TargetError};
use crate::recovery::source::RepoState;
use crate::repo::layout;
use crate::repo::lock::{LockError, RepoLock};
use crate::repo::manifest::BackupId;
use crate::repo::{RepoError, RepoIdentity};
use crate::retention::{PolicyError, RetentionPolicy};
use crate::storage::{DynStorage, Storage, StorageError};

use super::backup::human_bytes;

/// WAL files sent between two checks that the copy's lock is still held.
const LOCK_CHECK_EVERY: usize = 64;

/// Packs sent at once.
const PACKS_PARALLEL: usize = 4;

#[derive(clap::Args, Debug, Clone)]
pub struct CopyArgs {
    /// Only the copy named NAME (a `[[copy]]` table's `name`); default: every copy, in the
    /// order of the configuration file.
    #[arg(long, value_name = "NAME")]
    pub to: Option<String>,
    /// Print one JSON document (an array, one object per copy) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("no copy is configured: add a [[copy]] table with `name` and `repo` (docs/configuration.md)")]
    NoCopies,
}

impl From<StorageError> for CopyError {
    fn from(e: StorageError) -> Self {
        CopyError::Repo(e.into())
    }
}

impl CopyError {
    /// Whether the configuration is at fault (exit 2) rather than storage or content (1).
    pub fn is_usage(&self) -> bool {
        matches!(self, CopyError::NoCopies | CopyError::Policy(_))
            || matches!(self, CopyError::Config(e) if e.storage_error().is_none())
    }
}

/// What `copy` did for one copy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// The copy's name.
    pub name: String,
    pub location: String,
    /// The copy's retention policy, empty when it has none (every backup is copied).
    pub policy: String,
    /// `repo.json` was created: the location was empty.
    pub initialized: bool,
    pub backups_sent: Vec<BackupId>,
    /// Kept by the copy's policy and already in the copy.
    pub backups_present: Vec<BackupId>,
    /// Backups of the repository the copy's policy does not keep (not sent).
    pub backups_not_kept: Vec<BackupId>,
    pub objects_sent: u64,
    /// Bytes sent, as stored.
    pub bytes_sent: u64,
    /// Objects read back from the copy and checked: every object sent.
    pub objects_verified: u64,
    /// Objects the kept backups and their WAL need that the copy held already.
    pub objects_skipped: u64,
    pub wal_files_sent: u64,
    pub packs_sent: u64,
    /// What failed; empty when the copy is complete.
    pub errors: Vec<String>,
}

impl CopyReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Runs `copy` for `--to NAME` or every copy. A copy that cannot be used (unreachable,
/// another cluster's, locked) is reported with its error and the next one is tried.
///
/// # Errors
/// No copy configured, an unknown `--to`, the repository itself unreadable.
pub async fn run(config: &Config, args: &CopyArgs) -> Result<Vec<CopyReport>, CopyError> {
    if config.copies.is_empty() {
        return Err(CopyError::NoCopies);
    }
    let names: Vec<String> = match &args.to {
        Some(name) => {
            config.location(name)?;
            vec![name.clone()]
        }
        None => config.copies.iter().map(|c| c.name.clone()).collect(),
    };
    let source_raw = config.raw_storage().await?;
    let source = config.storage().await?;
    let identity = RepoIdentity::load(source.as_ref()).await?;
    let mut reports = Vec::new();
    for name in names {
        let location = config.location(&name)?;
        let mut report = CopyReport {
            name: name.clone(),
            location: location.repo.clone(),
            ..Default::default()
        };
        if let Err(e) = copy_to(&location, &source_raw, &source, &identity, &mut report).await {
            if e.is_usage() {
                return Err(e);
            }
            report.errors.push(e.to_string());
        }
        reports.push(report);
    }
    Ok(reports)
}

/// The retention policy of a location's configuration (its `keep_*` keys); `None` without one.
///
/// # Errors
/// A `keep_within` that does not parse.
pub fn retention_of(location: &Config) -> Result<Option<RetentionPolicy>, ConfigError> {
    let policy = location.retention_policy()?;
    Ok((!policy.is_empty()).then_some(policy))
}

async fn copy_to(
    location: &Config,
    source_raw: &DynStorage,
    source: &DynStorage,
    identity: &RepoIdentity,
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    let policy = retention_of(location)?;
    report.policy = policy
        .as_ref()
        .map(RetentionPolicy::describe)
        .unwrap_or_default();
    let copy_raw = location.raw_storage().await?;
    report.location = copy_raw.location();
    report.initialized = target::prepare(source_raw.as_ref(), identity, copy_raw.as_ref()).await?;
    let copy = location.storage().await?;
    let lock = RepoLock::acquire(copy.clone(), "copy").await?;
    let result = copy_locked(
        source_raw,
        source,
        &copy_raw,
        &copy,
        policy.as_ref(),
        &lock,
        report,
    )
    .await;
    lock.release().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn copy_locked(
    source_raw: &DynStorage,
    source: &DynStorage,
    copy_raw: &DynStorage,
    copy: &DynStorage,
    policy: Option<&RetentionPolicy>,
    lock: &RepoLock,
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    let (theirs, ours) = tokio::join!(
        RepoState::load(source.as_ref()),
        RepoState::load(copy.as_ref())
    );
    let (theirs, ours) = (theirs?, ours?);
    let mut keys: HashSet<String> = HashSet::new();
    for prefix in [layout::PACKS_ROOT, layout::BACKUPS_ROOT] {
        keys.extend(copy.list(prefix).await?.into_iter().map(|o| o.key));
    }
    let sel = select::select(&theirs, &ours, &keys, policy, jiff::Timestamp::now())?;
    report.backups_present = sel.present.clone();
    report.backups_not_kept = sel.not_kept.clone();
    report.objects_skipped = sel.skipped;
    for name in &sel.conflicts {
        report.errors.push(format!(
            "WAL file {name} is stored in the copy with other content than in the repository; not sent (compare them with `pgpitr verify` on each)"
        ));
    }
    let source_backup_keys: HashSet<String> = source
        .list(layout::BACKUPS_ROOT)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut progress = Progress::new();
    let sender = Sender {
        source_raw: source_raw.as_ref(),
        source: source.as_ref(),
        copy_raw: copy_raw.as_ref(),
        copy: copy.as_ref(),
    };

    // Restore points, histories, WAL: one at a time, in order.
    let mut wal_ok = sel.conflicts.is_empty();
    for p in &sel.restore_points {
        let key = layout::restore_point_key(p.timeline, p.lsn);
        if let Err(e) = sender
            .send(&key, Check::Opaque, report, &mut progress)
            .await
        {
            report.errors.push(e.to_string());
            wal_ok = false;
        }
    }
    for (i, w) in sel.histories.iter().chain(sel.wal.iter()).enumerate() {
        if !wal_ok {
            break;
        }
        if i % LOCK_CHECK_EVERY == 0 {
            lock.check().await?;
        }
        match sender
            .send(&w.key, Check::Wal(w), report, &mut progress)
            .await
        {
            Ok(()) => report.wal_files_sent += 1,
            Err(e) => {
                report.errors.push(format!(
                    "{e}; WAL after {} was not sent, so that the copy has no gap",
                    w.name
                ));
                wal_ok = false;
            }
        }
    }

    // Packs, a few at a time; each pack's index after it.
    let mut failed_packs: HashSet<String> = HashSet::new();
    let (sender_ref, keys_ref) = (&sender, &keys);
    let mut results = futures::stream::iter(sel.packs.iter())
        .map(|id| async move { (id, send_pack(sender_ref, id, keys_ref).await) })
        .buffer_unordered(PACKS_PARALLEL);
    while let Some((id, result)) = results.next().await {
        match result {
            Ok(sent) => {
                for bytes in sent {
                    progress.add(bytes);
                    report.objects_sent += 1;
                    report.objects_verified += 1;
                    report.bytes_sent += bytes;
                }
                report.packs_sent += 1;
            }
            Err(e) => {
                report.errors.push(e.to_string());
                failed_packs.insert(id.clone());
            }
        }
    }
    drop(results);

    // Manifests: a backup's commit point in the copy.
    for b in &sel.backups {
        if !wal_ok {
            report.errors.push(format!(
                "backup {} was not committed in the copy: its WAL did not all arrive",
                b.id
            ));
            continue;
        }
        if let Some(p) = b.packs.iter().find(|p| failed_packs.contains(*p)) {
            report.errors.push(format!(
                "backup {} was not committed in the copy: pack {p} did not arrive",
                b.id
            ));
            continue;
        }
        lock.check().await?;
        let pg = layout::pg_backup_manifest_key(&b.id);
        if source_backup_keys.contains(&pg) && !keys.contains(&pg) {
            if let Err(e) = sender.send(&pg, Check::Opaque, report, &mut progress).await {
                report.errors.push(e.to_string());
                continue;
            }
        }
        let key = layout::backup_manifest_key(&b.id);
        match sender
            .send(&key, Check::Manifest(&b.id), report, &mut progress)
            .await
        {
            Ok(()) => {
                tracing::info!("backup {} copied to {}", b.id, copy.location());
                report.backups_sent.push(b.id.clone());
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    progress.finish();
    Ok(())
}

/// Sends a pack and its index (those the copy lacks); returns the bytes of each object sent.
async fn send_pack(
    sender: &Sender<'_>,
    id: &str,
    copy_keys: &HashSet<String>,
) -> Result<Vec<u64>, RepoError> {
    let (pack_key, index_key) = (layout::pack_key(id), layout::pack_index_key(id));
    let body = sender.source.get(&index_key).await?;
    let index: PackIndex = serde_json::from_slice(&body).map_err(|e| RepoError::Corrupt {
        key: index_key.clone(),
        message: format!("not a valid pack index: {e}"),
    })?;
    let mut sent = Vec::new();
    if copy_keys.contains(&pack_key) {
        // A pack without its index: a killed run's, perhaps never checked. Check it now.
        let back = sender.copy.get(&pack_key).await?;
        if let Err(message) = target::check_pack(&back, &index) {
            sender.copy_raw.delete(&pack_key).await?;
            return Err(RepoError::Corrupt {
                key: format!("{pack_key} in copy {}", sender.copy.location()),
                message: format!("{message}; removed, the next `pgpitr copy` sends it again"),
            });
        }
    } else {
        sent.push(
            target::send(
                sender.source_raw,
                sender.copy_raw,
                sender.copy,
                &pack_key,
                Check::Pack(&index),
            )
            .await?
            .bytes,
        );
    }
    sent.push(
        target::send(
            sender.source_raw,
            sender.copy_raw,
            sender.copy,
            &index_key,
            Check::Index(&index),
        )
        .await?
        .bytes,
    );
    Ok(sent)
}

/// The storages of one copy run: the repository's as stored and opened, the copy's as stored
/// and opened.
struct Sender<'a> {
    source_raw: &'a dyn Storage,
    source: &'a dyn Storage,
    copy_raw: &'a dyn Storage,
    copy: &'a dyn Storage,
}

impl Sender<'_> {
    async fn send(
        &self,
        key: &str,
        check: Check<'_>,
        report: &mut CopyReport,
        progress: &mut Progress,
    ) -> Result<(), RepoError> {
        let sent = target::send(self.source_raw, self.copy_raw, self.copy, key, check).await?;
        report.objects_sent += 1;
        report.objects_verified += 1;
        report.bytes_sent += sent.bytes;
        progress.add(sent.bytes);
        Ok(())
    }
}

/// A running count of the bytes sent and the rate, on a terminal only.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new() -> Progress {
        Progress(std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bytes} sent, {binary_bytes_per_sec}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        }))
    }

    fn add(&mut self, n: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// The reports as text.
pub fn render(reports: &[CopyReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!("copy {} ({})", r.name, r.location));
        if !r.policy.is_empty() {
            out.push_str(&format!(", policy: {}", r.policy));
        }
        out.push('\n');
        if r.initialized {
            out.push_str("  initialized: repo.json and key slots written\n");
        }
        for id in &r.backups_sent {
            out.push_str(&format!("  sent backup {id}\n"));
        }
        out.push_str(&format!(
            "  sent {} object(s), {} ({} WAL file(s), {} pack(s)), all verified; {} already there; {} backup(s) already there, {} not kept by its policy\n",
            r.objects_sent,
            human_bytes(r.bytes_sent),
            r.wal_files_sent,
            r.packs_sent,
            r.objects_skipped,
            r.backups_present.len(),
            r.backups_not_kept.len()
        ));
        for e in &r.errors {
            out.push_str(&format!("  ERROR {e}\n"));
        }
    }
    out
}
