//! What the planner reads, loaded from a repository: the identity (`repo.json`), every committed
//! backup manifest (`backups/<id>/manifest.json`), the archived WAL listing and the parsed
//! timeline histories (`.history` objects, fetched and checked against their SHA-256). This is
//! the I/O in front of the pure [`super::plan`]; nothing here writes. Also the restore point
//! index (`repo::restore_points`), which tells the planner where a `--target-name` lies.

use std::collections::{BTreeMap, HashMap};

use super::plan::{BackupSummary, PlanInput, RestorePoint};
use super::target::RecoveryTargetSpec;
use crate::pg::{RestorePointRecord, TimelineHistory, TimelineId, WalFileName, WalSegSize};
use crate::repo::manifest::{BackupId, BackupManifest};
use crate::repo::wal::{self, ArchivedWal};
use crate::repo::{codec, json_objects, layout, restore_points, RepoError, RepoIdentity};
use crate::storage::Storage;

/// A snapshot of what the repository holds, as far as recovery is concerned.
#[derive(Debug, Clone)]
pub struct RepoState {
    pub identity: RepoIdentity,
    /// Every committed backup, oldest first (by id).
    pub manifests: Vec<BackupManifest>,
    pub wal: Vec<ArchivedWal>,
    pub histories: Vec<TimelineHistory>,
    /// Indexed restore points, in (timeline, LSN) order; some may lie in WAL no longer archived.
    pub restore_points: Vec<RestorePointRecord>,
}

impl RepoState {
    /// Reads the repository.
    ///
    /// # Errors
    /// Storage errors; [`RepoError::NotInitialized`] without `repo.json`; [`RepoError::Corrupt`]
    /// for a manifest that is not valid JSON or a history file whose checksum does not match.
    pub async fn load(storage: &dyn Storage) -> Result<RepoState, RepoError> {
        let identity = RepoIdentity::load(storage).await?;
        let manifests = load_manifests(storage).await?;
        let wal = wal::list(storage, layout::WAL_ROOT).await?;
        let histories = load_histories(storage, &wal).await?;
        let restore_points = restore_points::load(storage).await?;
        Ok(RepoState {
            identity,
            manifests,
            wal,
            histories,
            restore_points,
        })
    }

    /// The planner's input for `spec`, optionally forcing a backup.
    pub fn plan_input(&self, spec: RecoveryTargetSpec, forced: Option<BackupId>) -> PlanInput {
        let mut input = PlanInput::new(
            self.manifests.iter().map(BackupSummary::from).collect(),
            self.wal.clone(),
            self.histories.clone(),
            self.identity.wal_segment_size,
            spec,
        );
        input.forced_backup = forced;
        input.restore_points = known_restore_points(
            &self.restore_points,
            &self.wal,
            self.identity.wal_segment_size,
        );
        input
    }

    /// The manifest of backup `id`.
    pub fn manifest(&self, id: &BackupId) -> Option<&BackupManifest> {
        self.manifests.iter().find(|m| &m.id == id)
    }
}

/// The restore points whose WAL is archived, by name. A name used more than once maps to its
/// last use (highest timeline, then LSN): PostgreSQL stops at the first record of that name it
/// replays, so the planner's choice of a backup that ends before the last use is what aims at
/// it.
pub fn known_restore_points(
    points: &[RestorePointRecord],
    wal: &[ArchivedWal],
    seg_size: WalSegSize,
) -> BTreeMap<String, RestorePoint> {
    let (held, _) = partition_by_wal(points, wal, seg_size);
    held.into_iter()
        .map(|p| {
            let rp = RestorePoint {
                lsn: p.lsn,
                timeline: p.timeline,
                time: Some(p.time),
            };
            (p.name.clone(), rp)
        })
        .collect()
}

/// Splits `points` (in their order) into those whose WAL file is in `wal` and those whose WAL
/// file is not (expired). A record may also sit in the copy of its segment that begins a later
/// timeline.
pub fn partition_by_wal<'a>(
    points: &'a [RestorePointRecord],
    wal: &[ArchivedWal],
    seg_size: WalSegSize,
) -> (Vec<&'a RestorePointRecord>, Vec<&'a RestorePointRecord>) {
    // The highest timeline holding each archived segment number.
    let mut newest: HashMap<u64, TimelineId> = HashMap::new();
    for w in wal {
        if let WalFileName::Segment(s) | WalFileName::Partial(s) = w.name {
            let tli = newest.entry(s.segno(seg_size)).or_insert(s.timeline);
            *tli = (*tli).max(s.timeline);
        }
    }
    points.iter().partition(|p| {
        newest
            .get(&p.lsn.segno(seg_size))
            .is_some_and(|&tli| tli >= p.timeline)
    })
}

/// Every committed backup (those whose `manifest.json` exists), oldest first.
///
/// # Errors
/// Storage errors; [`RepoError::Corrupt`] for a manifest that cannot be decoded.
pub async fn load_manifests(storage: &dyn Storage) -> Result<Vec<BackupManifest>, RepoError> {
    let keys: Vec<String> = storage
        .list(layout::BACKUPS_ROOT)
        .await?
        .into_iter()
        .filter(|o| layout::parse_backup_manifest_key(&o.key).is_some())
        .map(|o| o.key)
        .collect();
    let mut out: Vec<BackupManifest> = json_objects::load(storage, keys)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The parsed `.history` files of `listing`, each verified against its SHA-256. A history that
/// PostgreSQL would not accept either is skipped with a warning; the planner then reports its
/// timeline as unknown if it is needed.
///
/// # Errors
/// Storage errors; [`RepoError::Corrupt`] for a checksum mismatch.
pub async fn load_histories(
    storage: &dyn Storage,
    listing: &[ArchivedWal],
) -> Result<Vec<TimelineHistory>, RepoError> {
    let mut out = Vec::new();
    for w in listing {
        let WalFileName::History(tli) = w.name else {
            continue;
        };
        let compressed = storage.get(&w.key).await?;
        let mut plain = Vec::new();
        let expected = codec::Expected {
            ids: &storage.content_ids(),
            id: &w.content_id,
        };
        codec::decompress_verified(&compressed, expected, &mut plain).map_err(|e| {
            RepoError::Corrupt {
                key: w.key.clone(),
                message: e.to_string(),
            }
        })?;
        match TimelineHistory::parse(tli, &String::from_utf8_lossy(&plain)) {
            Ok(h) => out.push(h),
            Err(e) => tracing::warn!("ignoring {}: {e}", w.key),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Lsn;
    use crate::recovery::plan::tests::file as archived;

    fn point(name: &str, tli: u32, lsn: u64) -> RestorePointRecord {
        RestorePointRecord {
            name: name.into(),
            lsn: Lsn(lsn),
            timeline: TimelineId(tli),
            time: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn restore_points_count_only_while_their_wal_is_archived() {
        let wal = [
            archived("000000010000000000000003"),
            archived("000000010000000000000005.partial"),
            // Timeline 2 begins in segment 6: its first segment holds a copy of timeline 1's.
            archived("000000020000000000000006"),
            archived("00000002.history"),
        ];
        let points = [
            point("in_3", 1, 0x0300_0028),
            point("expired_4", 1, 0x0400_0028),
            point("in_partial_5", 1, 0x0500_0028),
            point("copied_into_tl2", 1, 0x0600_0028),
            point("tl2_not_tl3", 3, 0x0600_1000),
        ];
        let (held, gone) = partition_by_wal(&points, &wal, WalSegSize::DEFAULT);
        let names = |v: Vec<&RestorePointRecord>| -> Vec<String> {
            v.into_iter().map(|p| p.name.clone()).collect()
        };
        assert_eq!(names(held), ["in_3", "in_partial_5", "copied_into_tl2"]);
        assert_eq!(names(gone), ["expired_4", "tl2_not_tl3"]);
    }

    #[test]
    fn a_name_used_twice_means_its_last_use() {
        let wal = [archived("000000010000000000000003")];
        let points = [
            point("nightly", 1, 0x0300_0028),
            point("nightly", 1, 0x0300_1028),
        ];
        let known = known_restore_points(&points, &wal, WalSegSize::DEFAULT);
        assert_eq!(known.len(), 1);
        assert_eq!(known["nightly"].lsn, Lsn(0x0300_1028));
        assert_eq!(known["nightly"].time, Some(jiff::Timestamp::UNIX_EPOCH));
    }
}
