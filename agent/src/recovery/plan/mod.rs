//! The recovery planner: a pure function from what the repository holds (backup summaries, the
//! archived WAL listing, the parsed timeline histories) and a [`RecoveryTargetSpec`] to a
//! [`RecoveryPlan`] — which base backup, which timeline, and exactly which WAL files replay will
//! read — or to a [`PlanError`] that names the backup, segment, LSN or time at fault. A plan with
//! a gap is refused here, before anything is written.
//!
//! Invariants of a plan:
//! - the backup lies on the history of the target timeline through its whole start–stop range,
//!   so PostgreSQL accepts the timeline ("requested timeline %u is not a child of this server's
//!   history", `InitWalRecovery` in src/backend/access/transam/xlogrecovery.c) and reaches the
//!   backup's end on it;
//! - the backup ends at or before the target: recovery is consistent only once replay passes the
//!   backup's stop LSN, and a target met earlier fails with "requested recovery stop point is
//!   before consistent recovery point" (`PerformWalRecovery`);
//! - `segments` is contiguous from the segment holding the backup's start LSN, in replay order;
//!   for each segment number it names the file PostgreSQL asks `restore_command` for first
//!   (`XLogFileReadAnyTLI`): the newest timeline of the target's history that had begun by that
//!   segment. So at a switch point the segment holding it is read from the NEW timeline (which
//!   holds a copy of the old timeline's WAL up to the switch); the old timeline's copy of that
//!   segment is usually only archived as `.partial`, and `.partial` files are never used.
//!
//! Sizes are bytes; LSNs are [`Lsn`]; times are UTC [`Timestamp`]s.
//!
//! The planner's modules, each using only those listed before it: [`error`] (why no plan),
//! [`input`] (what it reads), [`timelines`] (timeline histories as replay follows them),
//! [`wal_index`] (the archived WAL by name, and the walk along a history), [`window`] (what the
//! archive can recover at all, for `pgpitr list` and for messages), [`choice`] (which backup),
//! and this module, the plan itself.

mod choice;
mod error;
mod input;
mod timelines;
mod wal_index;
pub mod window;

use serde::Serialize;

pub use error::PlanError;
pub use input::{BackupSummary, PlanInput, RestorePoint};
pub(crate) use timelines::Timelines;
pub use timelines::{Branch, BranchStep};
pub(crate) use wal_index::{walk, WalIndex};

use super::display_serde;
use super::target::{RecoveryTargetSpec, TargetTimeline};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegmentName};
use choice::{choose, choose_forced, Choice, Goal};
use window::RecoverableWindow;

/// The result of [`plan`]: what a restore fetches and what it tells PostgreSQL.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryPlan {
    pub backup: BackupSummary,
    /// Why this backup, for people: lowercase, no final period.
    pub reason: String,
    /// The request as given.
    pub spec: RecoveryTargetSpec,
    /// The timeline recovery follows, resolved (`latest` and `current` made concrete).
    pub target_timeline: TimelineId,
    /// The stretch of each timeline replay passes through, from the one holding the backup's
    /// start to the target timeline.
    pub timeline_path: Vec<BranchStep>,
    /// The WAL segments replay reads, in replay order: from the segment holding the backup's
    /// start LSN to the segment holding an LSN (or known restore point) target, the backup's
    /// stop segment for `immediate`, else the last segment archived without a gap.
    #[serde(serialize_with = "display_serde::seq")]
    pub segments: Vec<WalFileName>,
    /// Timeline history files PostgreSQL reads: the target timeline's (required when it is not
    /// timeline 1) and those of the timelines passed on the way, when archived.
    #[serde(serialize_with = "display_serde::seq")]
    pub history_files: Vec<WalFileName>,
    /// Compressed bytes of `segments` and `history_files` in the repository. The backup's own
    /// files are not included; `backup.size_bytes` is their plain size.
    pub bytes_to_fetch: u64,
    pub end: WalEnd,
    /// What the archive can recover on the target timeline, for messages.
    pub window: RecoverableWindow,
    /// Warnings for the user (lowercase sentences), e.g. that PostgreSQL will check a time target.
    pub notes: Vec<String>,
}

impl RecoveryPlan {
    /// The `postgresql.auto.conf` settings for this plan: [`RecoveryTargetSpec::recovery_settings`]
    /// with `recovery_target_timeline` set to the resolved number. A number rather than `latest`
    /// because PostgreSQL's `latest` is the highest timeline with a history file
    /// (`findNewestTimeLine`, timeline.c) even when it does not descend from the backup, and
    /// because recovery should follow exactly the timelines this plan checked.
    pub fn recovery_settings(&self) -> Vec<(String, String)> {
        RecoveryTargetSpec {
            timeline: TargetTimeline::Id(self.target_timeline),
            ..self.spec.clone()
        }
        .recovery_settings()
    }
}

/// Where the planned WAL ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalEnd {
    /// The last planned segment.
    #[serde(serialize_with = "display_serde::one")]
    pub last_segment: WalSegmentName,
    /// The first LSN after `last_segment`: replay cannot go beyond it.
    pub end_lsn: Lsn,
    /// For targets without a known end (latest, time, xid, unknown restore point): the segment
    /// after `last_segment` that the archive lacks, where the reachable WAL ends. `None` when
    /// the plan stops at a known segment.
    #[serde(serialize_with = "display_serde::option")]
    pub first_missing: Option<WalSegmentName>,
}

/// Plans a point-in-time recovery; see the module documentation for the invariants.
///
/// Backup choice (each rule restricted to backups on the target timeline's history, see
/// [`Branch::holds_backup`]):
/// - latest, immediate: the newest backup;
/// - LSN, known restore point: the newest whose stop LSN is at or before the target;
/// - time: the newest whose stop time is at or before the target;
/// - xid: the newest whose `stop_next_xid` is at or below the target xid (the transaction began
///   after the backup ended); if none, the oldest backup;
/// - unknown restore point (not in the archived WAL): refused, unless a backup is forced;
/// - `forced_backup`: that backup, if it lies on the timeline's history and ends at or before
///   the target.
///
/// Target timeline: `Id(n)` is `n`; `Current` is the backup's timeline; `Latest` is the highest
/// timeline whose history holds a backup (the forced backup, when there is one).
///
/// WAL: contiguous from the backup's start segment through its stop segment always; through the
/// target segment for LSN and known restore point targets; for latest, also into the target
/// timeline (its first segment); beyond that, for targets without a known end, as far as the
/// archive has no gap.
///
/// # Errors
/// [`PlanError`]: no backups, an unknown backup or timeline, no backup on the timeline's
/// history, a target before the earliest backup's end, a forced backup that cannot reach the
/// target, a target between two recoverable ranges (the WAL between them not archived, e.g.
/// outside a WAL window: [`window::RecoverableWindow::between_at_lsn`] and
/// [`window::RecoverableWindow::between_at_time`]), a missing segment or history file, a WAL
/// file stored twice with different contents.
pub fn plan(input: &PlanInput) -> Result<RecoveryPlan, PlanError> {
    if input.backups.is_empty() {
        return Err(PlanError::NoBackups);
    }
    if let Some(b) = input
        .backups
        .iter()
        .find(|b| b.wal_segment_size != input.seg_size)
    {
        return Err(PlanError::SegmentSizeMismatch {
            backup: b.id.clone(),
            backup_size: b.wal_segment_size.bytes(),
            repo_size: input.seg_size.bytes(),
        });
    }
    let seg_size = input.seg_size;
    let timelines = Timelines::new(&input.histories);
    let index = WalIndex::new(&input.wal);
    let goal = Goal::of(&input.spec.target, &input.restore_points);
    let target = &input.spec.target;

    let choice = match &input.forced_backup {
        Some(id) => choose_forced(input, id, &goal, &timelines)?,
        None => choose(input, &goal, &timelines)?,
    };
    let Choice {
        backup: b,
        branch,
        reason,
        mut notes,
    } = choice;
    let tt = branch.timeline();
    let seg = |l: Lsn| l.segno(seg_size);
    let (start, stop) = (seg(b.start_lsn), seg(b.stop_lsn));

    // What must be archived without a gap, as (through segment number, what for).
    let mut needs: Vec<(u64, String)> = vec![(
        stop,
        format!(
            "replaying backup {} from its start ({}) to its end ({}), where recovery becomes consistent; wait until it is archived or choose an older backup with --backup",
            b.id, b.start_lsn, b.stop_lsn
        ),
    )];
    let through = match &goal {
        Goal::Consistency => Some(stop),
        Goal::Lsn(l) => {
            needs.push((seg(*l), format!("reaching the target lsn {l}")));
            Some(seg(*l))
        }
        Goal::RestorePoint(name, rp) => {
            let l = rp.lsn;
            needs.push((
                seg(l),
                format!("reaching the target restore point '{name}' at lsn {l}"),
            ));
            Some(seg(l))
        }
        Goal::Everything => {
            let begin = branch.steps().last().map(|s| s.begin).unwrap_or_default();
            if seg(begin) > stop {
                needs.push((
                    seg(begin),
                    format!(
                        "entering the target timeline {tt}, which begins at {begin}; wait until it is archived or choose an older timeline with --target-timeline"
                    ),
                ));
            }
            None
        }
        Goal::Time(_) | Goal::Xid(_) | Goal::UnknownName(_) => None,
    };
    let window = window::window_on(branch, &input.backups, &index, seg_size);
    let between = |b: window::Between<'_>| PlanError::TargetBetweenRanges {
        target: target.to_string(),
        timeline: tt,
        before: b.before.describe_to(),
        after: b.after.describe_from(),
    };
    let walked = walk(branch, &index, seg_size, start, through);
    if let Some(missing) = walked.first_missing {
        let m = missing.segno(seg_size);
        if let Some((_, why)) = needs
            .iter()
            .filter(|(t, _)| *t >= m)
            .min_by_key(|(t, _)| *t)
        {
            // Past the backup's own WAL, a target between two ranges is named as such.
            let target_lsn = match &goal {
                Goal::Lsn(l) => Some(*l),
                Goal::RestorePoint(_, rp) => Some(rp.lsn),
                _ => None,
            };
            if let Some(b) = target_lsn
                .filter(|_| m > stop)
                .and_then(|l| window.between_at_lsn(l))
            {
                return Err(between(b));
            }
            return Err(PlanError::MissingSegment {
                segment: missing,
                needed_for: why.clone(),
            });
        }
    }
    let last = *walked
        .segments
        .last()
        .expect("the walk covers at least the backup's own segments");
    // A time target after a range that ends at its newest backup, before the next range: the
    // planned WAL ends before the next range begins, so recovery could never reach it.
    if let Goal::Time(t) = &goal {
        let end = last.next(seg_size).start_lsn(seg_size);
        if let Some(b) = window
            .between_at_time(*t)
            .filter(|b| end <= b.after.from.lsn)
        {
            return Err(between(b));
        }
    }

    // Sizes, refusing WAL stored twice with different contents.
    let mut bytes_to_fetch = 0;
    for s in &walked.segments {
        if let Some(w) = index.get(WalFileName::Segment(*s))? {
            bytes_to_fetch += w.size;
        }
    }

    // History files: the target timeline's is required, the others on the way are fetched when
    // archived.
    let first_tli = branch.timeline_of_segment(start, seg_size);
    let timeline_path: Vec<BranchStep> = branch
        .steps()
        .iter()
        .filter(|s| s.timeline >= first_tli)
        .copied()
        .collect();
    let mut history_files = Vec::new();
    for s in timeline_path
        .iter()
        .filter(|s| s.timeline > TimelineId::FIRST)
    {
        let name = WalFileName::History(s.timeline);
        match index.get(name)? {
            Some(w) => {
                bytes_to_fetch += w.size;
                history_files.push(name);
            }
            None if s.timeline == tt => {
                return Err(PlanError::MissingHistory {
                    timeline: tt,
                    history: name,
                })
            }
            None => {}
        }
    }

    let open = through.is_none();
    if let (true, Some(missing)) = (open, walked.first_missing) {
        if let Some(later) = index
            .last_on_branch(branch, seg_size)
            .filter(|l| l.segno(seg_size) > missing.segno(seg_size))
        {
            notes.push(format!(
                "the archive holds later WAL (up to {later}) after the missing segment {missing}; it cannot be replayed past the gap"
            ));
        }
    }
    if matches!(goal, Goal::Time(_) | Goal::Xid(_) | Goal::UnknownName(_)) {
        if last.timeline != tt {
            let begin = branch.steps().last().map(|s| s.begin).unwrap_or_default();
            notes.push(format!(
                "the archived WAL ends on timeline {} at segment {last}, before the target timeline {tt} begins at {begin}: the target must lie before that",
                last.timeline
            ));
        }
        notes.push(format!(
            "pgpitr cannot tell whether the WAL through segment {last} reaches the target {target}; if it does not, PostgreSQL stops with \"recovery ended before configured recovery target was reached\""
        ));
    }

    Ok(RecoveryPlan {
        backup: b.clone(),
        reason,
        spec: input.spec.clone(),
        target_timeline: tt,
        timeline_path,
        segments: walked
            .segments
            .iter()
            .map(|s| WalFileName::Segment(*s))
            .collect(),
        history_files,
        bytes_to_fetch,
        end: WalEnd {
            last_segment: last,
            end_lsn: last.next(seg_size).start_lsn(seg_size),
            first_missing: if open { walked.first_missing } else { None },
        },
        window,
        notes,
    })
}

#[cfg(test)]
pub(crate) mod tests;
