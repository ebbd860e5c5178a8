//! `pgpitr expire`: applies the retention policy (`--keep-*` options over the `keep_*`
//! configuration keys) to the repository, holding the repository lock.
//!
//! Decisions come from pure functions: [`crate::retention::decide`] for backups (with the
//! newest backup restorable on the latest timeline, [`crate::retention::live_timeline`], always
//! kept), [`crate::retention::expirable_wal`] for WAL; packs go when no remaining manifest
//! references them and they are older than the newest backup's start and than
//! `--pack-min-age` (an interrupted backup's packs are reused by the next backup; the lock keeps
//! a running backup out, the age rule also protects from one that does not take it).
//!
//! Deletion order keeps the repository consistent at every instant, so a crash (or `kill -9`)
//! anywhere leaves a repository that `pgpitr verify` passes and the next `expire` finishes:
//! 1. the expired backups' `manifest.json` (their commit points), then their `backup_manifest`;
//! 2. WAL no kept backup needs, oldest position first;
//! 3. unreferenced packs: the index first (a pack without index is ignored by backups), then
//!    the pack.
//!
//! Deletions go in batches of `--delete-batch` (64). Before each batch `expire` checks that it
//! still holds the repository lock ([`RepoLock::check`]) and that no restore took a lease since
//! it planned ([`lease::new_lease`]); otherwise it stops (issue 15, items 4 and 6). Active leases
//! ([`crate::repo::lease`]) hold back what a restore reads: a leased backup is kept with its
//! packs and every WAL file from its start; an unscoped lease makes `expire` delete no backup,
//! WAL file or pack.
//!
//! With `s3_object_lock` ([`crate::storage::Storage::object_lock`]), before deleting anything
//! `expire` extends the Object Lock of what the policy keeps to what it promises
//! ([`crate::retention::promise::kept_backup_lock`]: the backups' manifests, the packs they
//! reference and their own WAL, never shortened), and leaves every object still locked for a
//! later run, reported as retained: an expired backup whose `manifest.json` or
//! `backup_manifest` is locked is kept whole, with its packs and WAL, as if the policy kept it
//! (so no backup is ever left half-deleted); a locked WAL file, restore point, pack or pack
//! index stays (a pack goes only with its index). Deleting removes every version of a key by
//! its id, which frees the space in a versioned bucket.
//!
//! Last, still under the lock, leftover staging objects of killed writers
//! ([`crate::repo::staging`]) older than `--staging-grace` (24h) by the storage's clock are
//! removed (local: unlinked; S3: the multipart upload aborted). Younger ones may be a live
//! writer's (`pgpitr-archive` and `pgpitr backup` do not take the lock) and are never touched.
//! No restore reads them, so leases do not hold them back.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::pg::{RestorePointRecord, TimelineId};
use crate::recovery::plan::BackupSummary;
use crate::recovery::source::{partition_by_wal, RepoState};
use crate::repo::layout::{self, PackObject};
use crate::repo::lease;
use crate::repo::lock::{self, LockError, RepoLock};
use crate::repo::manifest::{BackupId, BackupManifest};
use crate::repo::staging::{self, Leftover};
use crate::repo::wal::ArchivedWal;
use crate::repo::RepoError;
use crate::retention::{self, KeepWithin, PolicyError, RetentionPolicy, Verdict, WalWindow};
use crate::storage::{PutMode, Storage, StorageError};

use super::backup::human_bytes;

#[derive(clap::Args, Debug, Clone)]
pub struct ExpireArgs {
    /// Expire the copy NAME (a `[[copy]]` table's `name`) by its own `keep_*` keys, under its
    /// own lock, instead of the repository.
    #[arg(long, value_name = "NAME")]
    pub copy: Option<String>,
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep backups that stopped within this long: 30d, 12h, 2w.
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<KeepWithin>,
    /// Keep the newest backup of each of the N newest UTC days.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the N newest ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the N newest months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep continuous WAL (recovery to any moment) for this long: 14d, 36h. Older kept backups
    /// keep only their own WAL and restore to their consistent end (--backup ID --target
    /// immediate). Unset: all WAL from the oldest kept backup.
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub keep_wal_within: Option<KeepWithin>,
    /// Mark backup ID as never expiring (stored in its manifest); repeatable. Alone, only marks.
    #[arg(long = "keep", value_name = "ID", value_parser = parse_id)]
    pub keep: Vec<BackupId>,
    /// Print what would be deleted and the space it would free; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Unreferenced packs younger than this stay (they may belong to a backup in progress).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub pack_min_age: KeepWithin,
    /// Leftover staging objects of killed writers (`.tmp.*` files, incomplete S3 multipart
    /// uploads) older than this are removed; younger ones may be a live writer's.
    #[arg(long, value_name = "DURATION", default_value = staging::DEFAULT_GRACE)]
    pub staging_grace: KeepWithin,
    /// Pause between deletions (milliseconds), to spare a busy object store.
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pub delete_delay_ms: u64,
    /// Deletions between two checks of the lock and of the leases.
    #[arg(long, value_name = "N", default_value_t = DELETE_BATCH, hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub delete_batch: u32,
}

/// Deletions between two checks of the lock and of the leases (issue 15, items 4 and 6).
pub const DELETE_BATCH: u32 = 64;

fn parse_id(s: &str) -> Result<BackupId, String> {
    BackupId::parse(s).map_err(|e| e.to_string())
}

fn parse_window(s: &str) -> Result<KeepWithin, String> {
    KeepWithin::parse_window(s).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("backup {0} does not exist (see `pgpitr list`)")]
    UnknownBackup(BackupId),
    #[error("a restore took the lease {0} while expire was deleting: expire stopped, what it deleted leaves the repository consistent; hint: run it again after the restore (the lease holds what the restore needs)")]
    NewLease(String),
}

impl From<StorageError> for ExpireError {
    fn from(e: StorageError) -> Self {
        ExpireError::Repo(e.into())
    }
}

/// What `expire` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub policy: String,
    /// Backups newly marked `keep`.
    pub marked_keep: Vec<BackupId>,
    /// Every backup, newest first, with the verdict.
    pub backups: Vec<Verdict>,
    /// The latest timeline (the one `recovery_target_timeline = 'latest'` follows).
    pub latest_timeline: Option<TimelineId>,
    /// The newest backup restorable on the latest timeline's history: always kept, with the WAL
    /// it needs. `None` when there is none.
    pub latest_timeline_backup: Option<BackupId>,
    /// With `keep_wal_within`: which kept backups keep continuous WAL and which only their own
    /// ([`retention::window`]). `None` without a WAL window.
    pub wal_window: Option<WalWindow>,
    pub expired_backups: Vec<BackupId>,
    pub wal_files: usize,
    pub wal_bytes: u64,
    pub packs: usize,
    pub pack_bytes: u64,
    /// Unreferenced packs left because they are too young.
    pub young_packs_kept: usize,
    /// Bytes freed (or that would be).
    pub freed_bytes: u64,
    /// The active leases of restores, which hold things back (see `repo::lease`).
    pub leases: Vec<String>,
    /// An unscoped lease is active: no backup, WAL file or pack was (or would be) deleted.
    pub held_by_lease: bool,
    /// Leftover staging objects older than `--staging-grace`, removed (or that would be).
    pub staging_removed: Vec<Leftover>,
    pub staging_bytes: u64,
    /// Leftover staging objects kept: not older than `--staging-grace`.
    pub staging_young_kept: usize,
    /// Object Lock (`s3_object_lock`): expired backups kept whole because their manifests are
    /// still locked; a later `expire` deletes them once the locks end.
    pub locked_backups: usize,
    /// WAL files and restore points no backup needs, kept because still locked.
    pub locked_wal_files: usize,
    /// Unreferenced packs kept because the pack or its index is still locked.
    pub locked_packs: usize,
    /// Objects whose lock was extended to what the policy now promises (not with `--dry-run`).
    pub locks_extended: usize,
}

/// The policy from `args` over `config`.
///
/// # Errors
/// A `keep_within` or `keep_wal_within` in the configuration that does not parse.
pub fn policy(config: &Config, args: &ExpireArgs) -> Result<RetentionPolicy, ConfigError> {
    let configured = config.retention_policy()?;
    Ok(RetentionPolicy {
        keep_last: args.keep_last.or(configured.keep_last),
        keep_within: args.keep_within.or(configured.keep_within),
        keep_daily: args.keep_daily.or(configured.keep_daily),
        keep_weekly: args.keep_weekly.or(configured.keep_weekly),
        keep_monthly: args.keep_monthly.or(configured.keep_monthly),
        keep_wal_within: args.keep_wal_within.or(configured.keep_wal_within),
    })
}

/// Runs `expire`.
///
/// # Errors
/// See [`ExpireError`]. Nothing is deleted when the policy is missing or the lock is held.
pub async fn run(config: &Config, args: &ExpireArgs) -> Result<ExpireReport, ExpireError> {
    let policy = policy(config, args)?;
    if policy.is_empty() && args.keep.is_empty() {
        return Err(PolicyError::NoPolicy.into());
    }
    let storage = config.storage().await?;
    // Fails early, before the lock, on a missing or foreign repository.
    crate::repo::RepoIdentity::load(storage.as_ref()).await?;
    let lock = if args.dry_run {
        None
    } else {
        Some(RepoLock::acquire(storage.clone(), "expire").await?)
    };
    let mut result = run_locked(&storage, &policy, args, lock.as_ref()).await;
    if let Ok(report) = &mut result {
        if let Err(e) = remove_staging(storage.as_ref(), args, lock.as_ref(), report).await {
            result = Err(e);
        }
    }
    if let Some(lock) = lock {
        lock.release().await;
    }
    result
}

async fn run_locked(
    storage: &crate::storage::DynStorage,
    policy: &RetentionPolicy,
    args: &ExpireArgs,
    lock: Option<&RepoLock>,
) -> Result<ExpireReport, ExpireError> {
    let storage = storage.as_ref();
    let mut state = RepoState::load(storage).await?;
    let seg_size = state.identity.wal_segment_size;
    let mut report = ExpireReport {
        dry_run: args.dry_run,
        policy: policy.describe(),
        marked_keep: Vec::new(),
        backups: Vec::new(),
        latest_timeline: None,
        latest_timeline_backup: None,
        wal_window: None,
        expired_backups: Vec::new(),
        wal_files: 0,
        wal_bytes: 0,
        packs: 0,
        pack_bytes: 0,
        young_packs_kept: 0,
        freed_bytes: 0,
        leases: Vec::new(),
        held_by_lease: false,
        staging_removed: Vec::new(),
        staging_bytes: 0,
        staging_young_kept: 0,
        locked_backups: 0,
        locked_wal_files: 0,
        locked_packs: 0,
        locks_extended: 0,
    };

    // --keep ID: mark first (an overwrite of the whole manifest object).
    for id in &args.keep {
        let Some(m) = state.manifests.iter_mut().find(|m| &m.id == id) else {
            return Err(ExpireError::UnknownBackup(id.clone()));
        };
        if !m.keep {
            m.keep = true;
            report.marked_keep.push(id.clone());
            if !args.dry_run {
                let body = serde_json::to_vec(&*m).expect("serialisable");
                storage
                    .put(
                        &layout::backup_manifest_key(id),
                        Bytes::from(body),
                        PutMode::Overwrite,
                    )
                    .await?;
                tracing::info!("backup {id} marked keep");
            }
        }
    }
    if policy.is_empty() {
        return Ok(report);
    }

    // Backups.
    let (facts, live) =
        retention::backup_facts(&state.manifests, &state.wal, &state.histories, seg_size);
    report.latest_timeline = Some(live.timeline);
    report.latest_timeline_backup = live.backup.clone();
    let now = jiff::Timestamp::now();
    let mut verdicts = retention::decide(&facts, policy, now)?;
    // What the policy itself promises each backup it keeps (leases and locks promise nothing).
    let locked = storage.object_lock().is_some();
    let lock_targets: HashMap<BackupId, jiff::Timestamp> = verdicts
        .iter()
        .filter(|_| locked)
        .filter_map(|v| {
            retention::promise::kept_backup_lock(policy, v, now).map(|t| (v.id.clone(), t))
        })
        .collect();

    // Leases of restores, judged by the storage's clock (a dry run writes nothing, so it uses
    // this host's). Listed again before every batch of deletions.
    let leases = lease::list(storage).await?;
    let known_leases: HashSet<String> = leases.iter().map(|l| l.key.clone()).collect();
    let storage_now = if args.dry_run {
        jiff::Timestamp::now()
    } else {
        lock::storage_now(storage).await?
    };
    let hold = lease::hold(&leases, storage_now);
    report.leases = hold.leases.clone();
    report.held_by_lease = hold.everything;
    for v in verdicts.iter_mut() {
        if hold.everything || hold.backups.contains(&v.id) {
            v.keep = true;
            v.reasons.push("leased by a restore".into());
        }
    }
    if locked {
        // An expired backup whose manifests cannot be deleted yet stays whole.
        for v in verdicts.iter_mut().filter(|v| !v.keep) {
            let mut until = None;
            for key in [
                layout::backup_manifest_key(&v.id),
                layout::pg_backup_manifest_key(&v.id),
            ] {
                until = until.max(storage.locked_until(&key).await?);
            }
            if let Some(t) = until {
                v.keep = true;
                v.reasons.push(format!("under Object Lock until {t}"));
                report.locked_backups += 1;
            }
        }
    }
    let kept_ids: HashSet<&BackupId> = verdicts.iter().filter(|v| v.keep).map(|v| &v.id).collect();
    let (kept, expired): (Vec<&BackupManifest>, Vec<&BackupManifest>) = state
        .manifests
        .iter()
        .partition(|m| kept_ids.contains(&m.id));
    report.expired_backups = expired.iter().map(|m| m.id.clone()).collect();
    let backup_objects = storage.list(layout::BACKUPS_ROOT).await?;
    let size_of: HashMap<&str, u64> = backup_objects
        .iter()
        .map(|o| (o.key.as_str(), o.size))
        .collect();
    for m in &expired {
        for key in [
            layout::backup_manifest_key(&m.id),
            layout::pg_backup_manifest_key(&m.id),
        ] {
            report.freed_bytes += size_of.get(key.as_str()).copied().unwrap_or(0);
        }
    }

    // WAL: continuous from the start of each kept backup, or, under a WAL window, from those
    // of the window's bases on and only their own for older ones.
    let kept_summaries: Vec<BackupSummary> = kept.iter().map(|m| BackupSummary::from(*m)).collect();
    let (mut wal, window) = retention::expirable_under(
        &kept_summaries,
        &state.wal,
        &state.histories,
        seg_size,
        policy.keep_wal_within,
        now,
    );
    report.wal_window = window;
    wal.retain(|w| {
        w.name
            .segment()
            .is_some_and(|s| !hold.holds_wal(s.segno(seg_size), seg_size))
    });
    if locked {
        let mut unlocked = Vec::with_capacity(wal.len());
        for w in wal {
            if storage.locked_until(&w.key).await?.is_some() {
                report.locked_wal_files += 1;
            } else {
                unlocked.push(w);
            }
        }
        wal = unlocked;
    }
    report.wal_files = wal.len();
    report.wal_bytes = wal.iter().map(|w| w.size).sum();
    report.freed_bytes += report.wal_bytes;

    // Packs: referenced by a kept manifest, or too young, stay.
    let referenced: HashSet<&str> = kept
        .iter()
        .flat_map(|m| m.files.iter())
        .flat_map(|f| f.chunks.iter())
        .map(|c| c.pack.as_str())
        .collect();
    let newest_start = kept.iter().map(|m| m.start_time).max();
    let min_age = args.pack_min_age.seconds;
    let mut by_pack: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for o in storage.list(layout::PACKS_ROOT).await? {
        let id = match layout::parse_pack_key(&o.key) {
            Some(PackObject::Pack(id)) | Some(PackObject::Index(id)) => id,
            None => continue,
        };
        by_pack.entry(id).or_default().push((o.key, o.size));
    }
    let mut packs: Vec<(String, Vec<(String, u64)>)> = Vec::new();
    if let (Some(newest_start), false) = (newest_start, hold.everything) {
        let mut ids: Vec<&String> = by_pack
            .keys()
            .filter(|id| !referenced.contains(id.as_str()))
            .collect();
        ids.sort();
        for id in ids {
            let objects = &by_pack[id];
            // The youngest of the pack and its index decides.
            let mut youngest: Option<jiff::Timestamp> = None;
            let mut unknown = false;
            for (key, _) in objects {
                match storage.modified(key).await? {
                    Some(t) => youngest = Some(youngest.map_or(t, |y| y.max(t))),
                    None => unknown = true,
                }
            }
            let old_enough = !unknown
                && youngest.is_some_and(|t| {
                    t < newest_start && now.duration_since(t).as_secs() >= min_age as i64
                });
            if !old_enough {
                report.young_packs_kept += 1;
                continue;
            }
            if locked && any_locked(storage, objects.iter().map(|(k, _)| k.as_str())).await? {
                report.locked_packs += 1;
                continue;
            }
            let mut objects = objects.clone();
            // The index before the pack.
            objects.sort_by_key(|(k, _)| !k.ends_with(".idx"));
            report.packs += 1;
            report.pack_bytes += objects.iter().map(|(_, s)| s).sum::<u64>();
            packs.push((id.clone(), objects));
        }
    }
    report.freed_bytes += report.pack_bytes;
    report.backups = verdicts;
    if args.dry_run {
        return Ok(report);
    }

    // Delete, in the crash-safe order, in batches; before each batch the lock and the leases
    // are checked again.
    let mut steps: Vec<(String, Option<String>)> = Vec::new();
    let mut expired_sorted = expired.clone();
    expired_sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for m in &expired_sorted {
        steps.push((layout::backup_manifest_key(&m.id), None));
        steps.push((
            layout::pg_backup_manifest_key(&m.id),
            Some(format!("expired backup {}", m.id)),
        ));
    }
    wal.sort_by_key(|w| {
        (
            w.name.segment().map(|s| s.segno(seg_size)).unwrap_or(0),
            w.name,
        )
    });
    steps.extend(wal.iter().map(|w| (w.key.clone(), None)));
    // Restore points in WAL no longer archived: a name target could not reach them.
    let gone: HashSet<&str> = wal.iter().map(|w| w.key.as_str()).collect();
    let remaining: Vec<ArchivedWal> = state
        .wal
        .iter()
        .filter(|w| !gone.contains(w.key.as_str()))
        .cloned()
        .collect();
    let (_, orphaned) = partition_by_wal(&state.restore_points, &remaining, seg_size);
    let mut unlocked = Vec::with_capacity(orphaned.len());
    for p in orphaned {
        let key = layout::restore_point_key(p.timeline, p.lsn);
        if locked && storage.locked_until(&key).await?.is_some() {
            report.locked_wal_files += 1;
        } else {
            unlocked.push(p.clone());
        }
    }
    let orphaned: Vec<RestorePointRecord> = unlocked;
    steps.extend(
        orphaned
            .iter()
            .map(|p| (layout::restore_point_key(p.timeline, p.lsn), None)),
    );
    for (_, objects) in &packs {
        steps.extend(objects.iter().map(|(key, _)| (key.clone(), None)));
    }

    if !lock_targets.is_empty() {
        if let Some(lock) = lock {
            lock.check().await?;
        }
        report.locks_extended = extend_locks(
            storage,
            &state.manifests,
            &state.wal,
            &lock_targets,
            seg_size,
        )
        .await?;
    }

    let pause = Duration::from_millis(args.delete_delay_ms);
    for batch in steps.chunks(args.delete_batch.max(1) as usize) {
        if let Some(lock) = lock {
            lock.check().await?;
        }
        if let Some(key) = lease::new_lease(storage, &known_leases).await? {
            return Err(ExpireError::NewLease(key));
        }
        for (key, done) in batch {
            storage.delete(key).await?;
            tracing::debug!("deleted {key}");
            if let Some(done) = done {
                tracing::info!("{done}");
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
    if !wal.is_empty() {
        tracing::info!(
            "deleted {} WAL file(s), {}",
            wal.len(),
            human_bytes(report.wal_bytes)
        );
    }
    if !packs.is_empty() {
        tracing::info!(
            "deleted {} pack(s), {}",
            packs.len(),
            human_bytes(report.pack_bytes)
        );
    }
    Ok(report)
}

/// Whether any of `keys` is still under Object Lock.
///
/// # Errors
/// Storage errors of the HEAD requests.
async fn any_locked(
    storage: &dyn Storage,
    keys: impl Iterator<Item = &str>,
) -> Result<bool, ExpireError> {
    for key in keys {
        if storage.locked_until(key).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Extends the Object Lock of every object of the backups in `targets` (their two manifests,
/// the packs and indexes they reference, and their own WAL: every archived file from the
/// start segment through the stop segment on their timelines) to the latest target of the
/// backups holding it; returns how many locks were extended.
///
/// # Errors
/// Storage errors.
async fn extend_locks(
    storage: &dyn Storage,
    manifests: &[BackupManifest],
    wal: &[ArchivedWal],
    targets: &HashMap<BackupId, jiff::Timestamp>,
    seg_size: crate::pg::WalSegSize,
) -> Result<usize, ExpireError> {
    let mut until: HashMap<String, jiff::Timestamp> = HashMap::new();
    let mut need = |key: String, t: jiff::Timestamp| {
        let e = until.entry(key).or_insert(t);
        *e = (*e).max(t);
    };
    for m in manifests {
        let Some(&t) = targets.get(&m.id) else {
            continue;
        };
        need(layout::backup_manifest_key(&m.id), t);
        need(layout::pg_backup_manifest_key(&m.id), t);
        let packs: HashSet<&str> = m
            .files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .map(|c| c.pack.as_str())
            .collect();
        for p in packs {
            need(layout::pack_key(p), t);
            need(layout::pack_index_key(p), t);
        }
        let timelines = [m.start_timeline, m.stop_timeline];
        let segments = m.start_lsn.segno(seg_size)..=m.stop_lsn.segno(seg_size);
        for w in wal {
            if w.name.segment().is_some_and(|s| {
                timelines.contains(&s.timeline) && segments.contains(&s.segno(seg_size))
            }) {
                need(w.key.clone(), t);
            }
        }
    }
    Ok(crate::storage::extend_locks(storage, until.into_iter().collect()).await?)
}

/// Removes the leftover staging objects older than `--staging-grace` by the storage's clock
/// (with `--dry-run`, by this host's, and only reports), checking the lock before each batch.
///
/// # Errors
/// Storage errors, a lost lock.
async fn remove_staging(
    storage: &dyn crate::storage::Storage,
    args: &ExpireArgs,
    lock: Option<&RepoLock>,
    report: &mut ExpireReport,
) -> Result<(), ExpireError> {
    let now = if args.dry_run {
        jiff::Timestamp::now()
    } else {
        lock::storage_now(storage).await?
    };
    let (old, young) = staging::abandoned(
        staging::survey(storage, now).await?,
        args.staging_grace.seconds,
    );
    report.staging_young_kept = young.len();
    report.staging_bytes = old.iter().map(|l| l.size).sum();
    report.freed_bytes += report.staging_bytes;
    if !args.dry_run {
        for batch in old.chunks(args.delete_batch.max(1) as usize) {
            if let Some(lock) = lock {
                lock.check().await?;
            }
            for l in batch {
                storage.remove_staging(l.object()).await?;
                tracing::debug!(
                    "removed leftover staging object {} ({} old)",
                    l.key,
                    staging::human_age(l.age_seconds)
                );
            }
        }
        if !old.is_empty() {
            tracing::info!(
                "removed {} leftover staging object(s), {}",
                old.len(),
                human_bytes(report.staging_bytes)
            );
        }
    }
    report.staging_removed = old;
    Ok(())
}

/// The report as text.
pub fn render(r: &ExpireReport) -> String {
    let mut out = String::new();
    for id in &r.marked_keep {
        out.push_str(&format!(
            "{} backup {id} as keep\n",
            if r.dry_run { "would mark" } else { "marked" }
        ));
    }
    if r.policy.is_empty() {
        render_staging(r, &mut out);
        return out;
    }
    out.push_str(&format!("policy: {}\n", r.policy));
    match (r.latest_timeline, &r.latest_timeline_backup) {
        (Some(t), Some(id)) => out.push_str(&format!(
            "latest timeline {t}: backup {id} is the newest that restores it; kept with the WAL it needs\n"
        )),
        (Some(t), None) => out.push_str(&format!(
            "latest timeline {t}: no backup restores it (none on its history has all its own WAL archived)\n"
        )),
        (None, _) => {}
    }
    if let Some(w) = &r.wal_window {
        render_wal_window(w, &mut out);
    }
    for l in &r.leases {
        out.push_str(&format!("held back by lease {l}\n"));
    }
    if r.held_by_lease {
        out.push_str(
            "nothing deleted: a restore has not chosen its backup yet (unscoped lease); run expire again later\n",
        );
    }
    for v in &r.backups {
        if v.keep {
            out.push_str(&format!("keep    {}  ({})\n", v.id, v.reasons.join(", ")));
        } else {
            out.push_str(&format!(
                "{}  {}\n",
                if r.dry_run { "would expire" } else { "expired" },
                v.id
            ));
        }
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    out.push_str(&format!(
        "{verb} {} backup(s), {} WAL file(s) ({}), {} pack(s) ({}); {} {}\n",
        r.expired_backups.len(),
        r.wal_files,
        human_bytes(r.wal_bytes),
        r.packs,
        human_bytes(r.pack_bytes),
        if r.dry_run { "would free" } else { "freed" },
        human_bytes(r.freed_bytes)
    ));
    if r.locked_backups + r.locked_wal_files + r.locked_packs > 0 {
        out.push_str(&format!(
            "retained by Object Lock: {} backup(s), {} WAL file(s), {} pack(s); a later expire deletes them once their locks end\n",
            r.locked_backups, r.locked_wal_files, r.locked_packs
        ));
    }
    if r.locks_extended > 0 {
        out.push_str(&format!(
            "extended the Object Lock of {} object(s) to what the policy now promises\n",
            r.locks_extended
        ));
    }
    if r.young_packs_kept > 0 {
        out.push_str(&format!(
            "{} unreferenced pack(s) kept for now: younger than the newest backup or --pack-min-age\n",
            r.young_packs_kept
        ));
    }
    render_staging(r, &mut out);
    out
}

/// The lines about the WAL window.
fn render_wal_window(w: &WalWindow, out: &mut String) {
    out.push_str(&format!(
        "WAL window {}: every moment since {} stays recoverable",
        w.keep_wal_within,
        w.since.strftime("%Y-%m-%d %H:%M:%S UTC")
    ));
    if w.bases.is_empty() {
        out.push_str("; no kept backup is older, so all WAL from the oldest kept backup stays\n");
    } else {
        let bases: Vec<String> = w
            .bases
            .iter()
            .map(|b| format!("{} on timeline {}", b.backup, b.timeline))
            .collect();
        out.push_str(&format!(
            "; continuous WAL from the start of backup {}\n",
            bases.join(", ")
        ));
    }
    if !w.own_wal_only.is_empty() {
        let ids: Vec<String> = w.own_wal_only.iter().map(|b| b.to_string()).collect();
        out.push_str(&format!(
            "older kept backup(s) keep only their own WAL and restore to their consistent end (pgpitr restore --backup ID --target immediate): {}\n",
            ids.join(", ")
        ));
    }
}

/// The lines about leftover staging objects, when there are any.
fn render_staging(r: &ExpireReport, out: &mut String) {
    if !r.staging_removed.is_empty() {
        out.push_str(&format!(
            "{} {} leftover staging object(s) of killed writers ({}), older than --staging-grace\n",
            if r.dry_run { "would remove" } else { "removed" },
            r.staging_removed.len(),
            human_bytes(r.staging_bytes)
        ));
    }
    if r.staging_young_kept > 0 {
        out.push_str(&format!(
            "{} leftover staging object(s) kept for now: not older than --staging-grace (a writer may still use them)\n",
            r.staging_young_kept
        ));
    }
}
