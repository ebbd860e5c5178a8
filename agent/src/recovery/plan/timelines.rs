//! Timeline histories as replay follows them: a [`Branch`] is one timeline's history as the
//! stretches of WAL replay passes through (from its `.history` file); [`Timelines`] holds every
//! known branch. Answers which timeline's file PostgreSQL reads for a segment, and whether a
//! backup lies on a history.

use std::collections::BTreeMap;

use serde::Serialize;

use super::error::PlanError;
use super::input::BackupSummary;
use crate::pg::{Lsn, TimelineHistory, TimelineId, WalFileName, WalSegSize};

/// One timeline's stretch of a history: its WAL is valid from `begin` up to `end` (the switch
/// point to the next timeline; `None` for the history's own, newest timeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BranchStep {
    pub timeline: TimelineId,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

/// The history of one timeline as the stretches of WAL replay passes through, oldest first
/// (from the timeline's `.history` file, src/backend/access/transam/timeline.c). Timeline 1's
/// branch is timeline 1 alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    steps: Vec<BranchStep>,
}

impl Branch {
    /// The branch of `timeline`, or `None` when it is not timeline 1 and `histories` lacks its
    /// history.
    pub fn of(timeline: TimelineId, histories: &[TimelineHistory]) -> Option<Branch> {
        let ancestors = match histories.iter().find(|h| h.timeline == timeline) {
            Some(h) => h.ancestors.as_slice(),
            None if timeline == TimelineId::FIRST => &[],
            None => return None,
        };
        let mut steps = Vec::with_capacity(ancestors.len() + 1);
        let mut begin = Lsn(0);
        for a in ancestors {
            steps.push(BranchStep {
                timeline: a.timeline,
                begin,
                end: Some(a.switch_point),
            });
            begin = a.switch_point;
        }
        steps.push(BranchStep {
            timeline,
            begin,
            end: None,
        });
        Some(Branch { steps })
    }

    /// The timeline this is the history of (the newest on it).
    pub fn timeline(&self) -> TimelineId {
        self.steps
            .last()
            .map(|s| s.timeline)
            .unwrap_or(TimelineId::FIRST)
    }

    pub fn steps(&self) -> &[BranchStep] {
        &self.steps
    }

    fn step(&self, tli: TimelineId) -> Option<&BranchStep> {
        self.steps.iter().find(|s| s.timeline == tli)
    }

    /// Whether `lsn` of timeline `tli` is on this history: `tli` is on it and `lsn` lies in its
    /// stretch (`begin <= lsn <= end`; WAL up to the switch point is shared with the successor).
    pub fn holds(&self, tli: TimelineId, lsn: Lsn) -> bool {
        self.step(tli)
            .is_some_and(|s| s.begin <= lsn && s.end.is_none_or(|e| lsn <= e))
    }

    /// Whether `backup` can be restored onto this history: its start and its stop both lie on
    /// it. A timeline that left the backup's timeline before the backup STOPPED does not hold
    /// it — replay would follow the new timeline and never see the backup's end.
    ///
    /// # Errors
    /// Why not, as a lowercase phrase naming the timelines and LSNs.
    pub fn holds_backup(&self, backup: &BackupSummary) -> Result<(), String> {
        let me = self.timeline();
        let Some(step) = self.step(backup.stop_timeline) else {
            return Err(format!(
                "timeline {me} does not descend from timeline {} (the history of timeline {me} is {})",
                backup.stop_timeline,
                self.describe()
            ));
        };
        if let Some(end) = step.end.filter(|e| *e < backup.stop_lsn) {
            let (what, lsn) = if end < backup.start_lsn {
                ("started", backup.start_lsn)
            } else {
                ("ended", backup.stop_lsn)
            };
            return Err(format!(
                "timeline {me} left timeline {} at {end}, before the backup {what} at {lsn}",
                backup.stop_timeline
            ));
        }
        if !self.holds(backup.start_timeline, backup.start_lsn) {
            return Err(format!(
                "the backup started at {} on timeline {}, which is not on the history of timeline {me} ({})",
                backup.start_lsn,
                backup.start_timeline,
                self.describe()
            ));
        }
        Ok(())
    }

    /// The timeline whose file PostgreSQL reads for segment number `segno`: the newest timeline
    /// on this history that had begun by that segment (`XLogFileReadAnyTLI`, xlogrecovery.c).
    pub fn timeline_of_segment(&self, segno: u64, seg_size: WalSegSize) -> TimelineId {
        self.steps
            .iter()
            .rev()
            .find(|s| s.begin.segno(seg_size) <= segno)
            .map(|s| s.timeline)
            .unwrap_or(TimelineId::FIRST)
    }

    /// `1 -> 2 (at 0/5000028) -> 3 (at 0/8000000)`.
    fn describe(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.steps.iter().enumerate() {
            if i == 0 {
                out.push_str(&s.timeline.to_string());
            } else {
                out.push_str(&format!(" -> {} (at {})", s.timeline, s.begin));
            }
        }
        out
    }
}

/// Every timeline whose history is known: timeline 1 and each parsed `.history`.
pub(crate) struct Timelines {
    branches: BTreeMap<TimelineId, Branch>,
}

impl Timelines {
    pub(crate) fn new(histories: &[TimelineHistory]) -> Self {
        let mut branches = BTreeMap::new();
        branches.insert(
            TimelineId::FIRST,
            Branch::of(TimelineId::FIRST, &[]).expect("timeline 1 needs no history"),
        );
        for h in histories {
            if let Some(b) = Branch::of(h.timeline, histories) {
                branches.entry(h.timeline).or_insert(b);
            }
        }
        Timelines { branches }
    }

    pub(crate) fn get(&self, tli: TimelineId) -> Result<&Branch, PlanError> {
        self.branches.get(&tli).ok_or(PlanError::UnknownTimeline {
            timeline: tli,
            history: WalFileName::History(tli),
        })
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Branch> {
        self.branches.values()
    }

    /// The highest timeline whose history holds `backup`.
    pub(super) fn latest_for(&self, backup: &BackupSummary) -> Option<&Branch> {
        self.branches
            .values()
            .rev()
            .find(|b| b.holds_backup(backup).is_ok())
    }
}
