//! [`PlanError`]: why there is no plan.

use jiff::Timestamp;

use crate::pg::{Lsn, TimelineId, WalFileName, WalSegmentName};
use crate::repo::manifest::BackupId;

/// Why no plan: each names what is missing or wrong; messages are lowercase, without a final
/// period, and say what to do where there is something to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("no backups in the repository; take one with `pgpitr backup`")]
    NoBackups,
    #[error("unknown backup '{0}'; `pgpitr list` shows the backups")]
    UnknownBackup(BackupId),
    #[error("timeline {timeline} is unknown: its history file {history} is not in the archive")]
    UnknownTimeline {
        timeline: TimelineId,
        history: WalFileName,
    },
    #[error("no backup lies on the history of timeline {timeline}: {detail}")]
    NoBackupOnTimeline {
        timeline: TimelineId,
        detail: String,
    },
    #[error("the target {target} lies before the end of the earliest backup on the history of timeline {timeline}: the earliest reachable point is {earliest_time} (lsn {earliest_lsn}), the end of backup {backup}; recovery becomes consistent only at a backup's end")]
    TargetBeforeFirstBackup {
        target: String,
        timeline: TimelineId,
        backup: BackupId,
        earliest_time: Timestamp,
        earliest_lsn: Lsn,
    },
    #[error("the target {target} lies between two recoverable ranges on the history of timeline {timeline}: the WAL between them is not archived (kept only within the WAL window, keep_wal_within, or lost); the nearest reachable moments are {before} before the target and {after} after it; choose a target in a range (`pgpitr list` shows them)")]
    TargetBetweenRanges {
        target: String,
        timeline: TimelineId,
        /// The latest reachable moment before the target, described.
        before: String,
        /// The earliest reachable moment after the target, described.
        after: String,
    },
    #[error("WAL segment {segment} is missing from the archive; it is needed for {needed_for}")]
    MissingSegment {
        segment: WalSegmentName,
        needed_for: String,
    },
    #[error("timeline history file {history} is missing from the archive; PostgreSQL needs it to follow timeline {timeline}")]
    MissingHistory {
        timeline: TimelineId,
        history: WalFileName,
    },
    #[error("backup {backup} cannot reach the target {target}: {why}")]
    BackupCannotReach {
        backup: BackupId,
        target: String,
        why: String,
    },
    #[error("restore point '{name}' (lsn {lsn} on timeline {timeline}) is not on the history of timeline {target_timeline}; choose its timeline with --target-timeline {timeline}")]
    RestorePointNotOnTimeline {
        name: String,
        lsn: Lsn,
        timeline: TimelineId,
        target_timeline: TimelineId,
    },
    #[error("restore point '{name}' is not in the archived WAL: pgpitr knows a restore point once the WAL segment holding it is archived (after pg_create_restore_point(), run SELECT pg_switch_wal() on the server); `pgpitr list` shows the known restore points; to try anyway, choose a backup with --backup")]
    UnknownRestorePoint { name: String },
    #[error("WAL file '{name}' is stored {count} times with different contents; remove the wrong copy (see `pgpitr verify`)")]
    AmbiguousWal { name: WalFileName, count: usize },
    #[error("backup {backup} uses WAL segments of {backup_size} bytes, the repository {repo_size} bytes")]
    SegmentSizeMismatch {
        backup: BackupId,
        backup_size: u32,
        repo_size: u32,
    },
}
