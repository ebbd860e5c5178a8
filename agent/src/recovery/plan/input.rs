//! The planner's input: what it needs of each backup ([`BackupSummary`], from its manifest), the
//! restore points found in the archived WAL, and [`PlanInput`], everything [`super::plan`] reads.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use crate::pg::{Lsn, TimelineHistory, TimelineId, WalSegSize};
use crate::recovery::target::RecoveryTargetSpec;
use crate::repo::manifest::{BackupId, BackupManifest};
use crate::repo::wal::ArchivedWal;

/// What the planner needs of one backup: the fields of its manifest without the file list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupSummary {
    pub id: BackupId,
    pub label: String,
    /// Where WAL replay starts (the checkpoint's redo point, as in `backup_label`).
    pub start_lsn: Lsn,
    pub start_timeline: TimelineId,
    /// Where recovery becomes consistent.
    pub stop_lsn: Lsn,
    pub stop_timeline: TimelineId,
    pub start_time: Timestamp,
    pub stop_time: Timestamp,
    /// The next full (64-bit) transaction id just after the backup stopped, when known: every
    /// transaction id at or above it began after the backup ended.
    pub stop_next_xid: Option<u64>,
    pub wal_segment_size: WalSegSize,
    /// Plain size of the backup's files in bytes (what a restore writes; the compressed bytes it
    /// reads are not in the summary).
    pub size_bytes: u64,
}

impl From<&BackupManifest> for BackupSummary {
    fn from(m: &BackupManifest) -> Self {
        BackupSummary {
            id: m.id.clone(),
            label: m.label.clone(),
            start_lsn: m.start_lsn,
            start_timeline: m.start_timeline,
            stop_lsn: m.stop_lsn,
            stop_timeline: m.stop_timeline,
            start_time: m.start_time,
            stop_time: m.stop_time,
            stop_next_xid: m.stop_next_xid,
            wal_segment_size: m.wal_segment_size,
            size_bytes: m.size_bytes,
        }
    }
}

/// A restore point whose position is known (e.g. recorded by pgpitr when it created it, or
/// found in the WAL): `lsn` is what `pg_create_restore_point()` returned, on `timeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestorePoint {
    pub lsn: Lsn,
    pub timeline: TimelineId,
    pub time: Option<Timestamp>,
}

/// Everything [`plan`] looks at.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// Every complete backup of the repository, in any order.
    pub backups: Vec<BackupSummary>,
    /// The archived WAL listing (`repo::wal::list` of the WAL root): segments, `.partial`,
    /// `.history` and `.backup` files, in any order.
    pub wal: Vec<ArchivedWal>,
    /// The parsed content of the archived `.history` files (timeline 1 has none).
    pub histories: Vec<TimelineHistory>,
    /// The repository's WAL segment size.
    pub seg_size: WalSegSize,
    pub spec: RecoveryTargetSpec,
    /// `--backup ID`: use this backup, or fail saying why it cannot reach the target.
    pub forced_backup: Option<BackupId>,
    /// Known restore points by name; used for [`RecoveryTarget::Name`] when the name is here.
    pub restore_points: BTreeMap<String, RestorePoint>,
}

impl PlanInput {
    /// An input without a forced backup or known restore points.
    pub fn new(
        backups: Vec<BackupSummary>,
        wal: Vec<ArchivedWal>,
        histories: Vec<TimelineHistory>,
        seg_size: WalSegSize,
        spec: RecoveryTargetSpec,
    ) -> Self {
        PlanInput {
            backups,
            wal,
            histories,
            seg_size,
            spec,
            forced_backup: None,
            restore_points: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::plan::tests::{at, lsn, B1, SEG};

    #[test]
    fn summary_comes_from_the_manifest() {
        let m = BackupManifest {
            manifest_version: 1,
            id: BackupId(B1.into()),
            label: "weekly".into(),
            keep: false,
            start_lsn: lsn("0/2000028"),
            start_timeline: TimelineId(1),
            stop_lsn: lsn("0/3000100"),
            stop_timeline: TimelineId(1),
            start_time: at("00:50"),
            stop_time: at("01:00"),
            stop_next_xid: Some(42),
            system_identifier: 7,
            pg_version_num: 150018,
            wal_segment_size: SEG,
            tablespaces: vec![],
            files: vec![],
            size_bytes: 12345,
            new_bytes: 99,
            incremental_from: None,
        };
        let s = BackupSummary::from(&m);
        assert_eq!(
            (s.stop_lsn, s.stop_next_xid, s.size_bytes),
            (m.stop_lsn, Some(42), 12345)
        );
        assert_eq!(s.label, "weekly");
    }
}
