//! `pgpitr verify [--backup ID]`: re-reads the repository and reports every problem with the key
//! of the object concerned.
//!
//! - every manifest decodes, and every file's chunks add up to its size;
//! - every pack index decodes, describes an existing pack, and its chunks lie within the pack; a
//!   pack a manifest references has an index that lists each referenced chunk where the
//!   manifest says it is;
//! - every chunk (of the selected backups; without `--backup`, also every chunk any index lists)
//!   is read back with a ranged GET, decompressed and checked against its SHA-256;
//! - every WAL file (all of them; with `--backup`, those the backup's replay reads) is
//!   decompressed and checked against the SHA-256 in its key; `.history` files also parse;
//! - WAL continuity, per history that holds each selected backup ([`crate::recovery::plan`]'s
//!   rules, as for `pgpitr plan`): the backup's own WAL, then everything up to the newest
//!   archived segment of that history, without a gap — except, under a WAL window
//!   (`keep_wal_within`), for the backups older than the window's base, which keep only their
//!   own WAL ([`crate::retention::window`], judged at the time `verify` starts, as `expire`
//!   judges it).
//!
//! Leftover staging objects (a killed writer's `.tmp.*` file, an incomplete S3 multipart
//! upload: [`crate::repo::staging`]) are reported as warnings with their size and age; they are
//! not part of any backup or WAL file, so they never fail `verify` (`pgpitr expire` removes
//! them once older than `--staging-grace`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use futures::StreamExt;
use serde::Serialize;

use crate::backup::pack::{PackIndex, PACK_INDEX_VERSION};
use crate::config::{Config, ConfigError};
use crate::pg::{TimelineHistory, WalFileName, WalSegmentName};
use crate::recovery::plan::{walk, BackupSummary, Timelines, WalIndex};
use crate::repo::layout::{self, PackObject};
use crate::repo::manifest::{BackupId, BackupManifest};
use crate::repo::staging::{self, Leftover};
use crate::repo::wal::{self, ArchivedWal};
use crate::repo::{codec, runs, RepoError, RepoIdentity};
use crate::storage::{Storage, StorageError};

use super::backup::human_bytes;

/// Objects read at once.
const PARALLEL: usize = 4;

#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Verify the copy NAME (a `[[copy]]` table's `name`) instead of the repository.
    #[arg(long, value_name = "NAME")]
    pub copy: Option<String>,
    /// Verify only this backup: its chunks, and the WAL its replay reads.
    #[arg(long, value_name = "ID", value_parser = parse_id)]
    pub backup: Option<BackupId>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_id(s: &str) -> Result<BackupId, String> {
    BackupId::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("backup {0} does not exist (see `pgpitr list`)")]
    UnknownBackup(BackupId),
}

impl From<StorageError> for VerifyError {
    fn from(e: StorageError) -> Self {
        VerifyError::Repo(e.into())
    }
}

/// One problem, with the key of the object concerned (for a missing WAL segment: the prefix
/// its key would start with).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backups: Vec<BackupId>,
    pub packs: usize,
    pub chunks: usize,
    pub wal_files: usize,
    pub problems: Vec<Problem>,
    /// Leftover staging objects, aged by this host's clock: warnings, not problems.
    pub staging: Vec<Leftover>,
    /// Why the staging objects could not be listed (a warning too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging_error: Option<String>,
}

impl VerifyReport {
    /// No problems; leftover staging objects do not count.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Default)]
struct Problems(BTreeSet<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.insert(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// A chunk to read back: pack, offset, length, SHA-256.
type ChunkKey = (String, u64, u64, String);

/// Runs `verify`.
///
/// # Errors
/// Configuration and storage errors that stop the check itself (a missing repository, an
/// unknown `--backup`); everything about the repository's content is a [`Problem`].
pub async fn run(config: &Config, args: &VerifyArgs) -> Result<VerifyReport, VerifyError> {
    let started_at = jiff::Timestamp::now();
    let storage = config.storage().await?;
    let storage = storage.as_ref();
    let identity = RepoIdentity::load(storage).await?;
    let seg_size = identity.wal_segment_size;
    let mut problems = Problems::default();

    // Manifests.
    let mut manifests: Vec<BackupManifest> = Vec::new();
    for o in storage.list(layout::BACKUPS_ROOT).await? {
        let Some(id) = layout::parse_backup_manifest_key(&o.key) else {
            continue;
        };
        let body = match storage.get(&o.key).await {
            Ok(b) => b,
            Err(e) => {
                problems.add(&o.key, format!("cannot read: {e}"));
                continue;
            }
        };
        match serde_json::from_slice::<BackupManifest>(&body) {
            Ok(m) if m.id == id => manifests.push(m),
            Ok(m) => problems.add(&o.key, format!("describes backup {} instead", m.id)),
            Err(e) => problems.add(&o.key, format!("not a valid manifest: {e}")),
        }
    }
    manifests.sort_by(|a, b| a.id.cmp(&b.id));
    let selected: Vec<&BackupManifest> = match &args.backup {
        Some(id) => vec![manifests
            .iter()
            .find(|m| &m.id == id)
            .ok_or_else(|| VerifyError::UnknownBackup(id.clone()))?],
        None => manifests.iter().collect(),
    };

    // Packs and their indexes.
    let mut pack_size: HashMap<String, u64> = HashMap::new();
    let mut index_keys: Vec<String> = Vec::new();
    for o in storage.list(layout::PACKS_ROOT).await? {
        match layout::parse_pack_key(&o.key) {
            Some(PackObject::Pack(id)) => {
                pack_size.insert(id, o.size);
            }
            Some(PackObject::Index(id)) => index_keys.push(id),
            None => {}
        }
    }
    let referenced: BTreeMap<&str, Vec<&BackupId>> = {
        let mut r: BTreeMap<&str, Vec<&BackupId>> = BTreeMap::new();
        for m in &selected {
            for c in m.files.iter().flat_map(|f| f.chunks.iter()) {
                let v = r.entry(c.pack.as_str()).or_default();
                if v.last() != Some(&&m.id) {
                    v.push(&m.id);
                }
            }
        }
        r
    };
    let wanted_indexes: Vec<String> = index_keys
        .into_iter()
        .filter(|id| args.backup.is_none() || referenced.contains_key(id.as_str()))
        .collect();
    let mut indexes: HashMap<String, PackIndex> = HashMap::new();
    for id in wanted_indexes {
        let key = layout::pack_index_key(&id);
        let body = match storage.get(&key).await {
            Ok(b) => b,
            Err(e) => {
                problems.add(&key, format!("cannot read: {e}"));
                continue;
            }
        };
        let index: PackIndex = match serde_json::from_slice(&body) {
            Ok(i) => i,
            Err(e) => {
                problems.add(&key, format!("not a valid pack index: {e}"));
                continue;
            }
        };
        if index.format_version != PACK_INDEX_VERSION || index.pack != id {
            problems.add(
                &key,
                format!(
                    "pack index version {} for pack {} (expected version {PACK_INDEX_VERSION} for {id})",
                    index.format_version, index.pack
                ),
            );
            continue;
        }
        match pack_size.get(&id) {
            None => problems.add(&key, "pack index without its pack"),
            Some(&size) => {
                if let Some(c) = index.chunks.iter().find(|c| c.offset + c.length > size) {
                    problems.add(
                        &key,
                        format!(
                            "chunk {} at offset {} (length {}) lies beyond the pack's {size} bytes",
                            c.sha256, c.offset, c.length
                        ),
                    );
                }
            }
        }
        indexes.insert(id, index);
    }

    // Chunks to read back.
    let mut chunks: BTreeSet<ChunkKey> = BTreeSet::new();
    for (pack, backups) in &referenced {
        let ids: Vec<String> = backups.iter().map(|b| b.to_string()).collect();
        if !pack_size.contains_key(*pack) {
            problems.add(
                layout::pack_key(pack),
                format!("pack missing, referenced by backup {}", ids.join(", ")),
            );
        } else if !indexes.contains_key(*pack) {
            problems.add(
                layout::pack_index_key(pack),
                format!(
                    "pack index missing, pack referenced by backup {}",
                    ids.join(", ")
                ),
            );
        }
    }
    for m in &selected {
        let manifest_key = layout::backup_manifest_key(&m.id);
        for f in &m.files {
            let sum: u64 = f.chunks.iter().map(|c| c.plain_length).sum();
            if !f.chunks.is_empty() && sum != f.size {
                problems.add(
                    &manifest_key,
                    format!(
                        "file {}: chunks hold {sum} bytes, the file {}",
                        f.path, f.size
                    ),
                );
            }
            for c in &f.chunks {
                if !pack_size.contains_key(&c.pack) {
                    continue;
                }
                if let Some(index) = indexes.get(&c.pack) {
                    let listed = index.chunks.iter().any(|e| {
                        e.sha256 == c.sha256 && e.offset == c.offset && e.length == c.length
                    });
                    if !listed {
                        problems.add(
                            layout::pack_index_key(&c.pack),
                            format!(
                                "does not list chunk {} at offset {} that backup {} references (file {})",
                                c.sha256, c.offset, m.id, f.path
                            ),
                        );
                    }
                }
                chunks.insert((c.pack.clone(), c.offset, c.length, c.sha256.clone()));
            }
        }
    }
    if args.backup.is_none() {
        for (id, index) in &indexes {
            if let Some(&size) = pack_size.get(id) {
                for c in index.chunks.iter().filter(|c| c.offset + c.length <= size) {
                    chunks.insert((id.clone(), c.offset, c.length, c.sha256.clone()));
                }
            }
        }
    }
    let chunk_count = chunks.len();
    let packs_read: BTreeSet<&str> = chunks.iter().map(|c| c.0.as_str()).collect();
    let packs_read = packs_read.len();
    let mut reads = futures::stream::iter(chunks)
        .map(|(pack, offset, length, sha)| async move {
            let key = layout::pack_key(&pack);
            let result = match storage.get_range(&key, offset..offset + length).await {
                Ok(frame) => codec::decompress_verified(
                    &frame,
                    codec::Expected::sha256(&sha),
                    &mut std::io::sink(),
                )
                .map(|_| ())
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (key, offset, length, sha, result)
        })
        .buffer_unordered(PARALLEL);
    while let Some((key, offset, length, sha, result)) = reads.next().await {
        if let Err(e) = result {
            problems.add(
                key,
                format!("chunk {sha} at offset {offset} (length {length}): {e}"),
            );
        }
    }

    // WAL.
    let listing = wal::list(storage, layout::WAL_ROOT).await?;
    let mut histories: Vec<TimelineHistory> = Vec::new();
    let index = WalIndex::new(&listing);
    let mut by_name: BTreeMap<WalFileName, usize> = BTreeMap::new();
    for w in &listing {
        *by_name.entry(w.name).or_default() += 1;
    }
    for (name, n) in &by_name {
        if *n > 1 {
            problems.add(
                layout::wal_object_prefix(*name),
                format!("{n} different contents are archived for {name}"),
            );
        }
    }
    // History files first (continuity needs them), checked whatever the selection.
    for w in listing
        .iter()
        .filter(|w| matches!(w.name, WalFileName::History(_)))
    {
        match read_wal(storage, w).await {
            Ok(plain) => {
                match TimelineHistory::parse(w.name.timeline(), &String::from_utf8_lossy(&plain)) {
                    Ok(h) => histories.push(h),
                    Err(e) => problems.add(&w.key, format!("not a valid history file: {e}")),
                }
            }
            Err(e) => problems.add(&w.key, e),
        }
    }
    let timelines = Timelines::new(&histories);
    let own_wal_only: HashSet<BackupId> = match config.keep_wal_within()? {
        Some(within) => {
            let all: Vec<BackupSummary> = manifests.iter().map(BackupSummary::from).collect();
            crate::retention::wal_window(&all, &listing, &histories, seg_size, within, started_at)
                .own_wal_only
                .into_iter()
                .collect()
        }
        None => HashSet::new(),
    };
    let mut wal_in_scope: BTreeSet<WalFileName> = BTreeSet::new();
    for m in &selected {
        let b = BackupSummary::from(*m);
        let manifest_key = layout::backup_manifest_key(&m.id);
        let start = b.start_lsn.segno(seg_size);
        let stop = b.stop_lsn.segno(seg_size);
        let branches: Vec<_> = timelines
            .all()
            .filter(|x| x.holds_backup(&b).is_ok())
            .collect();
        if branches.is_empty() {
            problems.add(
                &manifest_key,
                format!(
                    "no archived timeline history holds backup {} (timeline {}): its WAL cannot be followed",
                    m.id, b.stop_timeline
                ),
            );
        }
        for branch in branches {
            let own = walk(branch, &index, seg_size, start, Some(stop));
            wal_in_scope.extend(own.segments.iter().map(|s| WalFileName::Segment(*s)));
            if let Some(missing) = own.first_missing {
                problems.add(
                    missing_key(missing),
                    format!(
                        "WAL segment {missing} is missing: backup {} needs it to become consistent",
                        m.id
                    ),
                );
                continue;
            }
            if own_wal_only.contains(&m.id) {
                continue;
            }
            let last = listing
                .iter()
                .filter_map(|w| match w.name {
                    WalFileName::Segment(s) => Some(s),
                    _ => None,
                })
                .filter(|s| branch.timeline_of_segment(s.segno(seg_size), seg_size) == s.timeline)
                .map(|s| s.segno(seg_size))
                .max();
            if let Some(last) = last.filter(|&l| l > stop) {
                let all = walk(branch, &index, seg_size, start, Some(last));
                wal_in_scope.extend(all.segments.iter().map(|s| WalFileName::Segment(*s)));
                if let Some(missing) = all.first_missing {
                    let newest = WalSegmentName::from_segno(
                        branch.timeline_of_segment(last, seg_size),
                        last,
                        seg_size,
                    );
                    problems.add(
                        missing_key(missing),
                        format!(
                            "WAL segment {missing} is missing: a gap between backup {} and the newest archived segment {newest} on the history of timeline {}",
                            m.id,
                            branch.timeline()
                        ),
                    );
                }
            }
        }
    }
    let to_check: Vec<&ArchivedWal> = listing
        .iter()
        .filter(|w| !matches!(w.name, WalFileName::History(_)))
        .filter(|w| args.backup.is_none() || wal_in_scope.contains(&w.name))
        .collect();
    let wal_files = to_check.len() + histories.len();
    let mut reads = futures::stream::iter(to_check)
        .map(|w| async move { (w, read_wal(storage, w).await.map(|_| ())) })
        .buffer_unordered(PARALLEL);
    while let Some((w, result)) = reads.next().await {
        if let Err(e) = result {
            problems.add(&w.key, e);
        }
    }

    // Leftovers of killed writers: warnings only, as is a listing that fails (S3 credentials
    // without the right to list multipart uploads).
    let (leftovers, staging_error) = match staging::survey(storage, jiff::Timestamp::now()).await {
        Ok(l) => (l, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };

    let report = VerifyReport {
        backups: selected.iter().map(|m| m.id.clone()).collect(),
        packs: packs_read,
        chunks: chunk_count,
        wal_files,
        problems: problems.0.into_iter().collect(),
        staging: leftovers,
        staging_error,
    };
    if args.backup.is_none() {
        record_run(storage, &report, started_at).await;
    }
    Ok(report)
}

/// Leaves the result of a whole-repository verify in the repository for `status` and
/// `metrics` ([`runs`]). A repository this host may only read keeps no record: a warning.
async fn record_run(storage: &dyn Storage, report: &VerifyReport, started_at: jiff::Timestamp) {
    let run = runs::VerifyRun {
        started_at,
        finished_at: jiff::Timestamp::now(),
        ok: report.ok(),
        problems: report.problems.len() as u64,
        warnings: report.staging.len() as u64 + u64::from(report.staging_error.is_some()),
        backups: report.backups.len() as u64,
        host: crate::repo::lock::hostname(),
    };
    if let Err(e) = runs::record(storage, &run).await {
        tracing::warn!("could not record this verify's result in the repository: {e}");
    }
}

/// The prefix the key of a missing segment would start with.
fn missing_key(s: WalSegmentName) -> String {
    layout::wal_object_prefix(WalFileName::Segment(s))
}

/// Reads and checks one WAL object; the error is a message.
async fn read_wal(storage: &dyn Storage, w: &ArchivedWal) -> Result<Vec<u8>, String> {
    let compressed = storage
        .get(&w.key)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let ids = storage.content_ids();
    let expected = codec::Expected {
        ids: &ids,
        id: &w.content_id,
    };
    let mut plain = Vec::new();
    if matches!(w.name, WalFileName::History(_)) {
        codec::decompress_verified(&compressed, expected, &mut plain)
    } else {
        codec::decompress_verified(&compressed, expected, &mut std::io::sink())
    }
    .map_err(|e| e.to_string())?;
    // The part index a restore_command checks instead of the SHA-256.
    codec::decode_parts(&compressed, expected, &|_, _| Ok(())).map_err(|e| e.to_string())?;
    Ok(plain)
}

/// The report as text.
pub fn render(r: &VerifyReport) -> String {
    let mut out = String::new();
    for p in &r.problems {
        out.push_str(&format!("PROBLEM {}: {}\n", p.key, p.message));
    }
    for l in &r.staging {
        out.push_str(&format!(
            "WARNING {}{}: leftover staging object, {}, {} old\n",
            l.key,
            l.upload_id
                .as_deref()
                .map(|id| format!(" (upload {id})"))
                .unwrap_or_default(),
            human_bytes(l.size),
            staging::human_age(l.age_seconds)
        ));
    }
    if let Some(e) = &r.staging_error {
        out.push_str(&format!(
            "WARNING cannot list leftover staging objects: {e}\n"
        ));
    }
    if !r.staging.is_empty() {
        out.push_str(&format!(
            "warning: {} leftover staging object(s), {}, from writers that were killed; not part of any backup or WAL file, so verify does not fail on them; `pgpitr expire` removes those older than --staging-grace\n",
            r.staging.len(),
            human_bytes(r.staging.iter().map(|l| l.size).sum())
        ));
    }
    out.push_str(&format!(
        "checked {} backup(s), {} chunk(s) in {} pack(s), {} WAL file(s): {}\n",
        r.backups.len(),
        r.chunks,
        r.packs,
        r.wal_files,
        if r.ok() {
            "no problems".to_string()
        } else {
            format!("{} problem(s)", r.problems.len())
        }
    ));
    out
}
