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

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use serde::Serialize;

use super::display_serde;
use super::target::{RecoveryTarget, RecoveryTargetSpec, TargetTimeline};
use super::window::{self, RecoverableWindow};
use crate::pg::{Lsn, TimelineHistory, TimelineId, WalFileName, WalSegSize, WalSegmentName};
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

/// One timeline's stretch of a history: its WAL is valid from `begin` up to `end` (the switch
/// point to the next timeline; `None` for the history's own, newest timeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BranchStep {
    pub timeline: TimelineId,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

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
    fn latest_for(&self, backup: &BackupSummary) -> Option<&Branch> {
        self.branches
            .values()
            .rev()
            .find(|b| b.holds_backup(backup).is_ok())
    }
}

/// The archived WAL listing by name.
pub(crate) struct WalIndex<'a> {
    by_name: HashMap<WalFileName, Vec<&'a ArchivedWal>>,
}

impl<'a> WalIndex<'a> {
    pub(crate) fn new(wal: &'a [ArchivedWal]) -> Self {
        let mut by_name: HashMap<WalFileName, Vec<&ArchivedWal>> = HashMap::new();
        for w in wal {
            let versions = by_name.entry(w.name).or_default();
            if !versions.iter().any(|v| v.content_id == w.content_id) {
                versions.push(w);
            }
        }
        WalIndex { by_name }
    }

    pub(crate) fn contains(&self, name: WalFileName) -> bool {
        self.by_name.contains_key(&name)
    }

    /// The one stored version of `name`.
    fn get(&self, name: WalFileName) -> Result<Option<&'a ArchivedWal>, PlanError> {
        match self.by_name.get(&name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => Ok(Some(*one)),
            Some(more) => Err(PlanError::AmbiguousWal {
                name,
                count: more.len(),
            }),
        }
    }

    /// The highest archived segment number that `branch` would read from its own file list,
    /// i.e. some segment `s` with `branch.timeline_of_segment(s) == s.timeline`.
    fn last_on_branch(&self, branch: &Branch, seg_size: WalSegSize) -> Option<WalSegmentName> {
        self.by_name
            .keys()
            .filter_map(|n| match n {
                WalFileName::Segment(s) => Some(*s),
                _ => None,
            })
            .filter(|s| branch.timeline_of_segment(s.segno(seg_size), seg_size) == s.timeline)
            .max_by_key(|s| s.segno(seg_size))
    }
}

/// The segments replay reads from segment number `from` on along `branch`, stopping after
/// `through` (when given) or before the first segment the archive lacks.
pub(crate) struct Walk {
    pub(crate) segments: Vec<WalSegmentName>,
    pub(crate) first_missing: Option<WalSegmentName>,
}

pub(crate) fn walk(
    branch: &Branch,
    index: &WalIndex<'_>,
    seg_size: WalSegSize,
    from: u64,
    through: Option<u64>,
) -> Walk {
    let mut segments = Vec::new();
    let mut segno = from;
    loop {
        if through.is_some_and(|t| segno > t) {
            return Walk {
                segments,
                first_missing: None,
            };
        }
        let tli = branch.timeline_of_segment(segno, seg_size);
        let name = WalSegmentName::from_segno(tli, segno, seg_size);
        // Only complete segments: a `.partial` is never a substitute.
        if !index.contains(WalFileName::Segment(name)) {
            return Walk {
                segments,
                first_missing: Some(name),
            };
        }
        segments.push(name);
        segno += 1;
    }
}

/// The target with a restore point resolved when it is known.
enum Goal<'a> {
    Everything,
    Consistency,
    Lsn(Lsn),
    Time(Timestamp),
    Xid(u64),
    RestorePoint(&'a str, &'a RestorePoint),
    UnknownName(&'a str),
}

impl<'a> Goal<'a> {
    fn of(target: &'a RecoveryTarget, known: &'a BTreeMap<String, RestorePoint>) -> Self {
        match target {
            RecoveryTarget::Latest => Goal::Everything,
            RecoveryTarget::Immediate => Goal::Consistency,
            RecoveryTarget::Time(t) => Goal::Time(*t),
            RecoveryTarget::Lsn(l) => Goal::Lsn(*l),
            RecoveryTarget::Xid(x) => Goal::Xid(*x),
            RecoveryTarget::Name(n) => match known.get(n) {
                Some(rp) => Goal::RestorePoint(n, rp),
                None => Goal::UnknownName(n),
            },
        }
    }

    /// Whether `b` ends at or before the target (`None`: cannot tell, xid and unknown names).
    fn reached_after(&self, b: &BackupSummary) -> Option<bool> {
        match self {
            Goal::Everything | Goal::Consistency => Some(true),
            Goal::Lsn(l) => Some(b.stop_lsn <= *l),
            Goal::RestorePoint(_, rp) => Some(b.stop_lsn <= rp.lsn),
            Goal::Time(t) => Some(b.stop_time <= *t),
            Goal::Xid(x) => b.stop_next_xid.map(|n| n <= *x),
            Goal::UnknownName(_) => None,
        }
    }
}

/// A chosen backup and the history recovery follows from it.
struct Choice<'a> {
    backup: &'a BackupSummary,
    branch: &'a Branch,
    reason: String,
    notes: Vec<String>,
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
/// target, a missing segment or history file, a WAL file stored twice with different contents.
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
    let walked = walk(branch, &index, seg_size, start, through);
    if let Some(missing) = walked.first_missing {
        let m = missing.segno(seg_size);
        if let Some((_, why)) = needs
            .iter()
            .filter(|(t, _)| *t >= m)
            .min_by_key(|(t, _)| *t)
        {
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

    let window = window::window_on(branch, &input.backups, &index, seg_size);
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

/// Oldest first: by stop time, then stop LSN, then id.
fn by_age(a: &&BackupSummary, b: &&BackupSummary) -> std::cmp::Ordering {
    (a.stop_time, a.stop_lsn, &a.id).cmp(&(b.stop_time, b.stop_lsn, &b.id))
}

/// Chooses among all backups.
fn choose<'a>(
    input: &'a PlanInput,
    goal: &Goal<'_>,
    timelines: &'a Timelines,
) -> Result<Choice<'a>, PlanError> {
    let target = &input.spec.target;
    // The history every candidate is checked against (`None`: each backup's own, for current).
    let common: Option<&Branch> = match input.spec.timeline {
        TargetTimeline::Id(t) => Some(timelines.get(t)?),
        TargetTimeline::Latest => match input
            .backups
            .iter()
            .filter_map(|b| timelines.latest_for(b))
            .max_by_key(|br| br.timeline())
        {
            Some(br) => Some(br),
            // No history holds any backup: report against the newest backup's own timeline.
            None => match input.backups.iter().max_by(by_age) {
                Some(newest) => Some(timelines.get(newest.stop_timeline)?),
                None => return Err(PlanError::NoBackups),
            },
        },
        TargetTimeline::Current => None,
    };
    let mut candidates: Vec<(&BackupSummary, &Branch)> = Vec::new();
    let mut first_unknown = None;
    let mut why_not = Vec::new();
    for b in &input.backups {
        let branch = match common {
            Some(br) => br,
            None => match timelines.get(b.stop_timeline) {
                Ok(br) => br,
                Err(e) => {
                    first_unknown.get_or_insert(e);
                    continue;
                }
            },
        };
        match branch.holds_backup(b) {
            Ok(()) => candidates.push((b, branch)),
            Err(why) => why_not.push(format!("backup {}: {why}", b.id)),
        }
    }
    candidates.sort_by(|x, y| by_age(&x.0, &y.0));
    if candidates.is_empty() {
        if let Some(e) = first_unknown {
            return Err(e);
        }
        let timeline = common.map(Branch::timeline).unwrap_or(TimelineId::FIRST);
        return Err(PlanError::NoBackupOnTimeline {
            timeline,
            detail: why_not.join("; "),
        });
    }
    if let Goal::RestorePoint(name, rp) = goal {
        let newest_tli = candidates
            .last()
            .map(|c| c.1.timeline())
            .unwrap_or(TimelineId::FIRST);
        candidates.retain(|(_, br)| br.holds(rp.timeline, rp.lsn));
        if candidates.is_empty() {
            return Err(PlanError::RestorePointNotOnTimeline {
                name: name.to_string(),
                lsn: rp.lsn,
                timeline: rp.timeline,
                target_timeline: newest_tli,
            });
        }
    }
    let on = |br: &Branch| format!("on the history of timeline {}", br.timeline());
    let newest_reaching = candidates
        .iter()
        .rposition(|(b, _)| goal.reached_after(b) == Some(true));
    let skipped = |i: usize| -> String {
        let newer: Vec<String> = candidates[i + 1..]
            .iter()
            .map(|(b, _)| b.id.to_string())
            .collect();
        match newer.len() {
            0 => String::new(),
            1 => format!(
                "; the newer backup {} ends after the target, so recovery from it could not stop there",
                newer[0]
            ),
            n => format!(
                "; {n} newer backups ({}) end after the target, so recovery from them could not stop there",
                newer.join(", ")
            ),
        }
    };
    let (i, reason) = match goal {
        Goal::Everything => {
            let i = candidates.len() - 1;
            (i, format!("the newest backup {}", on(candidates[i].1)))
        }
        Goal::Consistency => {
            let i = candidates.len() - 1;
            let b = candidates[i].0;
            (
                i,
                format!(
                    "the newest backup {}; recovery stops as soon as it is consistent, at the backup's end ({})",
                    on(candidates[i].1),
                    b.stop_lsn
                ),
            )
        }
        Goal::Lsn(_) | Goal::Time(_) | Goal::RestorePoint(..) => {
            let Some(i) = newest_reaching else {
                let (first, br) = candidates[0];
                return Err(PlanError::TargetBeforeFirstBackup {
                    target: target.to_string(),
                    timeline: br.timeline(),
                    backup: first.id.clone(),
                    earliest_time: first.stop_time,
                    earliest_lsn: first.stop_lsn,
                });
            };
            let (b, br) = candidates[i];
            let end = match goal {
                Goal::Time(_) => b.stop_time.to_string(),
                _ => format!("lsn {}", b.stop_lsn),
            };
            let at = match goal {
                Goal::RestorePoint(_, rp) => format!("{target} (lsn {})", rp.lsn),
                _ => target.to_string(),
            };
            (
                i,
                format!(
                    "the newest backup {} that ends ({end}) at or before the target {at}{}",
                    on(br),
                    skipped(i)
                ),
            )
        }
        Goal::Xid(x) => match newest_reaching {
            Some(i) => {
                let (b, br) = candidates[i];
                (
                    i,
                    format!(
                        "the newest backup {} whose next transaction id at its end ({}) is at or below the target xid {x}: transaction {x} began after the backup ended",
                        on(br),
                        b.stop_next_xid.unwrap_or_default(),
                    ),
                )
            }
            None => {
                let (b, br) = candidates[0];
                (
                    0,
                    format!(
                        "no backup {} records a next transaction id at or below the target xid {x}, so the oldest backup is used: it reaches transaction {x} if that committed after the backup ended ({})",
                        on(br),
                        b.stop_time
                    ),
                )
            }
        },
        Goal::UnknownName(n) => {
            return Err(PlanError::UnknownRestorePoint {
                name: n.to_string(),
            })
        }
    };
    let (backup, branch) = candidates[i];
    Ok(Choice {
        backup,
        branch,
        reason,
        notes: Vec::new(),
    })
}

/// Checks the backup the user chose with `--backup`.
fn choose_forced<'a>(
    input: &'a PlanInput,
    id: &BackupId,
    goal: &Goal<'_>,
    timelines: &'a Timelines,
) -> Result<Choice<'a>, PlanError> {
    let target = input.spec.target.to_string();
    let b = input
        .backups
        .iter()
        .find(|b| &b.id == id)
        .ok_or_else(|| PlanError::UnknownBackup(id.clone()))?;
    let cannot = |why: String| PlanError::BackupCannotReach {
        backup: b.id.clone(),
        target: target.clone(),
        why,
    };
    let branch = match input.spec.timeline {
        TargetTimeline::Id(t) => timelines.get(t)?,
        TargetTimeline::Current => timelines.get(b.stop_timeline)?,
        TargetTimeline::Latest => match timelines.latest_for(b) {
            Some(br) => br,
            None => timelines.get(b.stop_timeline)?,
        },
    };
    branch.holds_backup(b).map_err(cannot)?;
    if let Goal::RestorePoint(name, rp) = goal {
        if !branch.holds(rp.timeline, rp.lsn) {
            return Err(PlanError::RestorePointNotOnTimeline {
                name: name.to_string(),
                lsn: rp.lsn,
                timeline: rp.timeline,
                target_timeline: branch.timeline(),
            });
        }
    }
    let mut notes = Vec::new();
    match (goal, goal.reached_after(b)) {
        (_, Some(true)) => {}
        (Goal::Time(_), _) => {
            return Err(cannot(format!(
                "recovery becomes consistent only at the backup's end ({}), after the target; choose an older backup",
                b.stop_time
            )))
        }
        (Goal::Lsn(_) | Goal::RestorePoint(..), _) => {
            return Err(cannot(format!(
                "recovery becomes consistent only at the backup's end (lsn {}), after the target; choose an older backup",
                b.stop_lsn
            )))
        }
        (Goal::Xid(x), Some(false)) => notes.push(format!(
            "transaction {x} began before backup {} ended (its next transaction id was {}): if it committed before the backup ended, PostgreSQL will not reach it",
            b.id,
            b.stop_next_xid.unwrap_or_default()
        )),
        (Goal::Xid(x), None) => notes.push(format!(
            "backup {} does not record its next transaction id; pgpitr cannot tell whether it reaches transaction {x}",
            b.id
        )),
        (Goal::UnknownName(n), _) => notes.push(format!(
            "restore point '{n}' is not known to pgpitr; backup {} reaches it only if it was created after {}",
            b.id, b.stop_time
        )),
        (Goal::Everything | Goal::Consistency, _) => {}
    }
    Ok(Choice {
        backup: b,
        branch,
        reason: format!(
            "backup {} was chosen with --backup; it lies on the history of timeline {}",
            b.id,
            branch.timeline()
        ),
        notes,
    })
}

#[cfg(test)]
// The test tables spell out their column types in place.
#[allow(clippy::type_complexity)]
pub(crate) mod tests {
    use super::*;
    use crate::recovery::target::{RecoveryTarget as T, TargetTimeline as TL};

    const SEG: WalSegSize = WalSegSize::DEFAULT;
    const B1: &str = "20261101T000000Z";
    const B2: &str = "20261102T000000Z";
    const B3: &str = "20261103T000000Z";

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    /// A time on 2026-11-01, `hh:mm` UTC.
    fn at(hhmm: &str) -> Timestamp {
        format!("2026-11-01T{hhmm}:00Z").parse().unwrap()
    }

    fn backup(id: &str, tli: u32, start: &str, stop: &str, stop_time: &str) -> BackupSummary {
        let stop_time = at(stop_time);
        BackupSummary {
            id: BackupId(id.to_string()),
            label: format!("backup {id}"),
            start_lsn: lsn(start),
            start_timeline: TimelineId(tli),
            stop_lsn: lsn(stop),
            stop_timeline: TimelineId(tli),
            start_time: stop_time - jiff::SignedDuration::from_mins(10),
            stop_time,
            stop_next_xid: None,
            wal_segment_size: SEG,
            size_bytes: 1 << 30,
        }
    }

    fn with_xid(mut b: BackupSummary, xid: u64) -> BackupSummary {
        b.stop_next_xid = Some(xid);
        b
    }

    /// One archived file; segments are 100 bytes compressed, everything else 10.
    pub(crate) fn file(name: &str) -> ArchivedWal {
        let name: WalFileName = name.parse().unwrap();
        ArchivedWal {
            name,
            content_id: "a".repeat(64),
            key: format!("wal/{name}"),
            size: if matches!(name, WalFileName::Segment(_)) {
                100
            } else {
                10
            },
        }
    }

    /// Segments `from..=to` of timeline `tli`.
    fn segs(tli: u32, from: u64, to: u64) -> Vec<ArchivedWal> {
        (from..=to)
            .map(|n| file(&WalSegmentName::from_segno(TimelineId(tli), n, SEG).to_string()))
            .collect()
    }

    fn history(tli: u32, text: &str) -> TimelineHistory {
        TimelineHistory::parse(TimelineId(tli), text).unwrap()
    }

    fn input(backups: Vec<BackupSummary>, wal: Vec<Vec<ArchivedWal>>) -> PlanInput {
        PlanInput::new(
            backups,
            wal.into_iter().flatten().collect(),
            Vec::new(),
            SEG,
            RecoveryTargetSpec::default(),
        )
    }

    /// Segment runs as `tli:first..last` in hex segment numbers: `1:2..4 2:5..8`.
    fn compact(files: &[WalFileName]) -> String {
        let mut runs: Vec<(u32, u64, u64)> = Vec::new();
        for f in files {
            let WalFileName::Segment(s) = f else {
                panic!("not a segment: {f}")
            };
            let (t, n) = (s.timeline.0, s.segno(SEG));
            match runs.last_mut() {
                Some(r) if r.0 == t && r.2 + 1 == n => r.2 = n,
                _ => runs.push((t, n, n)),
            }
        }
        runs.iter()
            .map(|(t, a, b)| {
                if a == b {
                    format!("{t}:{a:X}")
                } else {
                    format!("{t}:{a:X}..{b:X}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn names(files: &[WalFileName]) -> Vec<String> {
        files.iter().map(|f| f.to_string()).collect()
    }

    /// Three backups on timeline 1 and its WAL from segment 2 to 0x10:
    ///
    /// | backup | start     | stop      | stop time | next xid |
    /// |--------|-----------|-----------|-----------|----------|
    /// | B1     | 0/2000028 | 0/3000100 | 01:00     | 100      |
    /// | B2     | 0/5000028 | 0/6000100 | 02:00     | 200      |
    /// | B3     | 0/9000028 | 0/A000100 | 03:00     | unknown  |
    fn three_backups() -> PlanInput {
        let mut i = input(
            vec![
                with_xid(backup(B2, 1, "0/5000028", "0/6000100", "02:00"), 200),
                backup(B3, 1, "0/9000028", "0/A000100", "03:00"),
                with_xid(backup(B1, 1, "0/2000028", "0/3000100", "01:00"), 100),
            ],
            vec![segs(1, 2, 0x10)],
        );
        for (name, l) in [("after-b2", "0/7000000"), ("before-b1-end", "0/2800000")] {
            i.restore_points.insert(
                name.to_string(),
                RestorePoint {
                    lsn: lsn(l),
                    timeline: TimelineId(1),
                    time: None,
                },
            );
        }
        i
    }

    #[test]
    fn chooses_the_newest_backup_that_ends_before_the_target() {
        let name = |n: &str| T::Name(n.to_string());
        #[rustfmt::skip]
        let cases: Vec<(&str, T, Result<&str, &str>, &str)> = vec![
            // what                          target                      backup or error            reason contains
            ("latest",                       T::Latest,                  Ok(B3), "the newest backup on the history of timeline 1"),
            ("immediate",                    T::Immediate,               Ok(B3), "as soon as it is consistent"),
            ("time after every backup",      T::Time(at("05:00")),       Ok(B3), "that ends (2026-11-01T03:00:00Z) at or before"),
            ("time between B1 and B2",       T::Time(at("01:30")),       Ok(B1), "newer backups (20261102T000000Z, 20261103T000000Z) end after the target"),
            ("time exactly at B2's end",     T::Time(at("02:00")),       Ok(B2), "the newer backup 20261103T000000Z ends after"),
            ("time inside B2 (01:50-02:00)", T::Time(at("01:55")),       Ok(B1), ""),
            ("time before B1's end",         T::Time(at("00:59")),       Err("the target time 2026-11-01T00:59:00Z lies before the end of the earliest backup on the history of timeline 1: the earliest reachable point is 2026-11-01T01:00:00Z (lsn 0/3000100), the end of backup 20261101T000000Z"), ""),
            ("lsn after every backup",       T::Lsn(lsn("0/F000000")),   Ok(B3), "that ends (lsn 0/A000100) at or before the target lsn 0/F000000"),
            ("lsn exactly at B2's stop",     T::Lsn(lsn("0/6000100")),   Ok(B2), ""),
            ("lsn inside B2",                T::Lsn(lsn("0/5800000")),   Ok(B1), ""),
            ("lsn inside B1",                T::Lsn(lsn("0/2800000")),   Err("the earliest reachable point is 2026-11-01T01:00:00Z (lsn 0/3000100)"), ""),
            ("xid after B2 (B3 unknown)",    T::Xid(250),                Ok(B2), "whose next transaction id at its end (200) is at or below the target xid 250"),
            ("xid between B1 and B2",        T::Xid(150),                Ok(B1), ""),
            ("xid equal to B1's next xid",   T::Xid(100),                Ok(B1), "transaction 100 began after the backup ended"),
            ("xid before every backup",      T::Xid(50),                 Ok(B1), "no backup on the history of timeline 1 records a next transaction id at or below the target xid 50, so the oldest backup is used"),
            ("unknown restore point",        name("nobody-knows"),       Err("restore point 'nobody-knows' is not in the archived WAL"), ""),
            ("known restore point",          name("after-b2"),           Ok(B2), "at or before the target restore point 'after-b2' (lsn 0/7000000)"),
            ("known restore point in B1",    name("before-b1-end"),      Err("the target restore point 'before-b1-end' lies before the end of the earliest backup"), ""),
        ];
        for (what, target, want, reason) in cases {
            let mut i = three_backups();
            i.spec.target = target;
            match (plan(&i), want) {
                (Ok(p), Ok(id)) => {
                    assert_eq!(p.backup.id.0, id, "{what}: {}", p.reason);
                    assert!(p.reason.contains(reason), "{what}: {}", p.reason);
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn plans_wal_from_backup_start_to_the_needed_end_and_refuses_gaps() {
        let b = || backup(B1, 1, "0/2000028", "0/3000100", "01:00");
        let gap8 = || vec![segs(1, 2, 7), segs(1, 9, 0xC)];
        #[rustfmt::skip]
        let cases: Vec<(&str, T, Vec<Vec<ArchivedWal>>, Result<(&str, Option<&str>), &str>)> = vec![
            // what                              target                     archive                      segments, first missing | error
            ("latest: everything",               T::Latest,                 vec![segs(1, 2, 0x10)],       Ok(("1:2..10", Some("000000010000000000000011")))),
            ("latest: a gap after the stop ends it", T::Latest,            gap8(),                       Ok(("1:2..7", Some("000000010000000000000008")))),
            ("latest: a gap before the stop",    T::Latest,                 vec![segs(1, 2, 2), segs(1, 4, 9)], Err("WAL segment 000000010000000000000003 is missing from the archive; it is needed for replaying backup 20261101T000000Z from its start (0/2000028) to its end (0/3000100)")),
            ("latest: the start segment missing", T::Latest,                vec![segs(1, 3, 9)],          Err("WAL segment 000000010000000000000002 is missing")),
            ("immediate: the backup's own WAL",  T::Immediate,              vec![segs(1, 2, 0x10)],       Ok(("1:2..3", None))),
            ("immediate: gap after the stop",    T::Immediate,              vec![segs(1, 2, 3)],          Ok(("1:2..3", None))),
            ("lsn: up to the target segment",    T::Lsn(lsn("0/7000000")),  gap8(),                       Ok(("1:2..7", None))),
            ("lsn: in the middle of a segment",  T::Lsn(lsn("0/6FFFFFF")),  gap8(),                       Ok(("1:2..6", None))),
            ("lsn: behind a gap",                T::Lsn(lsn("0/A000000")),  gap8(),                       Err("WAL segment 000000010000000000000008 is missing from the archive; it is needed for reaching the target lsn 0/A000000")),
            ("lsn: target segment not archived", T::Lsn(lsn("0/D000000")),  gap8(),                       Err("000000010000000000000008 is missing")),
            ("time: up to the last contiguous",  T::Time(at("09:00")),      gap8(),                       Ok(("1:2..7", Some("000000010000000000000008")))),
            ("xid: up to the last contiguous",   T::Xid(1000),              gap8(),                       Ok(("1:2..7", Some("000000010000000000000008")))),
            ("name: not in the archived WAL",    T::Name("x".into()),       gap8(),                       Err("restore point 'x' is not in the archived WAL")),
            ("time: a gap before the stop",      T::Time(at("09:00")),      vec![segs(1, 2, 2)],          Err("000000010000000000000003 is missing")),
            (".partial is never a segment",      T::Latest,                 vec![segs(1, 2, 2), vec![file("000000010000000000000003.partial")]], Err("000000010000000000000003 is missing")),
            ("other files are not segments",     T::Latest,                 vec![segs(1, 2, 3), vec![file("000000010000000000000004.00000028.backup")]], Ok(("1:2..3", Some("000000010000000000000004")))),
        ];
        for (what, target, wal, want) in cases {
            let mut i = input(vec![b()], wal);
            i.spec.target = target;
            match (plan(&i), want) {
                (Ok(p), Ok((segments, missing))) => {
                    assert_eq!(compact(&p.segments), segments, "{what}");
                    assert_eq!(
                        p.end.first_missing.map(|m| m.to_string()).as_deref(),
                        missing,
                        "{what}"
                    );
                    assert_eq!(
                        p.end.last_segment.to_string(),
                        p.segments.last().unwrap().to_string()
                    );
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Timeline 2 branched from timeline 1 at 0/5000028 (a promotion: timeline 1's segment 5 is
    /// archived only as `.partial`); timeline 3 branched from timeline 1 at 0/1800000, before
    /// the backup (an old point-in-time recovery). The backup is on timeline 1, before the
    /// switch to timeline 2.
    fn promoted() -> PlanInput {
        let mut i = input(
            vec![backup(B1, 1, "0/2000028", "0/3000100", "01:00")],
            vec![
                segs(1, 1, 4),
                vec![file("000000010000000000000005.partial")],
                segs(2, 5, 8),
                vec![file("00000002.history"), file("00000003.history")],
                segs(3, 1, 3),
            ],
        );
        i.histories = vec![
            history(2, "1\t0/5000028\tno recovery target specified\n"),
            history(3, "1\t0/1800000\tbefore 2026-10-31 23:00:00+00\n"),
        ];
        i
    }

    #[test]
    fn follows_timeline_switches_as_postgresql_reads_them() {
        #[rustfmt::skip]
        let cases: Vec<(&str, T, TL, Result<(u32, &str, &[&str]), &str>)> = vec![
            // what                                  target                     timeline             target tli, segments, history files | error
            ("latest: onto timeline 2, not 3",       T::Latest,                 TL::Latest,          Ok((2, "1:2..4 2:5..8", &["00000002.history"]))),
            ("latest on timeline 2 by number",       T::Latest,                 TL::Id(TimelineId(2)), Ok((2, "1:2..4 2:5..8", &["00000002.history"]))),
            ("current: stays on timeline 1",         T::Latest,                 TL::Current,         Ok((1, "1:2..4", &[]))),
            ("lsn on timeline 2 after the switch",   T::Lsn(lsn("0/7000000")),  TL::Latest,          Ok((2, "1:2..4 2:5..7", &["00000002.history"]))),
            ("lsn in the switch segment",            T::Lsn(lsn("0/5000100")),  TL::Latest,          Ok((2, "1:2..4 2:5", &["00000002.history"]))),
            ("lsn before the switch",                T::Lsn(lsn("0/4800000")),  TL::Id(TimelineId(2)), Ok((2, "1:2..4", &["00000002.history"]))),
            ("time on timeline 2",                   T::Time(at("09:00")),      TL::Latest,          Ok((2, "1:2..4 2:5..8", &["00000002.history"]))),
            ("timeline 3 left before the backup",    T::Latest,                 TL::Id(TimelineId(3)), Err("no backup lies on the history of timeline 3: backup 20261101T000000Z: timeline 3 left timeline 1 at 0/1800000, before the backup started at 0/2000028")),
            ("unknown timeline",                     T::Latest,                 TL::Id(TimelineId(4)), Err("timeline 4 is unknown: its history file 00000004.history is not in the archive")),
        ];
        for (what, target, timeline, want) in cases {
            let mut i = promoted();
            i.spec = RecoveryTargetSpec::new(target, true, timeline);
            match (plan(&i), want) {
                (Ok(p), Ok((tli, segments, histories))) => {
                    assert_eq!(p.target_timeline, TimelineId(tli), "{what}");
                    assert_eq!(compact(&p.segments), segments, "{what}");
                    assert_eq!(names(&p.history_files), histories, "{what}");
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn timeline_switch_layouts() {
        let b1 = || backup(B1, 1, "0/2000028", "0/3000100", "01:00");
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<TimelineHistory>, Vec<Vec<ArchivedWal>>, T, Result<(u32, &str), &str>)> = vec![
            ("switch in the middle of segment 5",
             vec![history(2, "1\t0/5000028\tx\n")],
             vec![segs(1, 2, 5), segs(2, 5, 6), vec![file("00000002.history")]],
             T::Latest, Ok((2, "1:2..4 2:5..6"))),
            ("switch exactly at the start of segment 5",
             vec![history(2, "1\t0/5000000\tx\n")],
             vec![segs(1, 2, 4), segs(2, 5, 6), vec![file("00000002.history")]],
             T::Latest, Ok((2, "1:2..4 2:5..6"))),
            ("switch inside the backup's last segment",
             vec![history(2, "1\t0/3000200\tx\n")],
             vec![segs(1, 2, 2), segs(2, 3, 4), vec![file("00000002.history")]],
             T::Latest, Ok((2, "1:2 2:3..4"))),
            ("two switches: 1 -> 2 -> 3",
             vec![history(2, "1\t0/5000028\tx\n"), history(3, "1\t0/5000028\tx\n2\t0/8000000\ty\n")],
             vec![segs(1, 2, 4), segs(2, 5, 7), segs(3, 8, 9), vec![file("00000002.history"), file("00000003.history")]],
             T::Latest, Ok((3, "1:2..4 2:5..7 3:8..9"))),
            ("target timeline's first segment not archived yet",
             vec![history(2, "1\t0/5000028\tx\n")],
             vec![segs(1, 2, 4), vec![file("000000010000000000000005.partial"), file("00000002.history")]],
             T::Latest, Err("WAL segment 000000020000000000000005 is missing from the archive; it is needed for entering the target timeline 2, which begins at 0/5000028")),
            ("time target: WAL ends before the target timeline",
             vec![history(2, "1\t0/5000028\tx\n")],
             vec![segs(1, 2, 4), vec![file("00000002.history")]],
             T::Time(at("09:00")), Ok((2, "1:2..4"))),
            ("target timeline's history not archived",
             vec![history(2, "1\t0/5000028\tx\n")],
             vec![segs(1, 2, 4), segs(2, 5, 6)],
             T::Latest, Err("timeline history file 00000002.history is missing from the archive")),
            ("switch before the backup's end: the backup is not on timeline 2",
             vec![history(2, "1\t0/3000000\tx\n")],
             vec![segs(1, 2, 5), segs(2, 3, 6), vec![file("00000002.history")]],
             T::Latest, Ok((1, "1:2..5"))),
        ];
        for (what, histories, wal, target, want) in cases {
            let mut i = input(vec![b1()], wal);
            i.histories = histories;
            i.spec.target = target;
            match (plan(&i), want) {
                (Ok(p), Ok((tli, segments))) => {
                    assert_eq!(p.target_timeline, TimelineId(tli), "{what}");
                    assert_eq!(compact(&p.segments), segments, "{what}");
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// After the promotion to timeline 2 at 0/5000028 the old primary kept running on timeline 1
    /// and B2 was taken there; B1 is before the switch.
    fn diverged() -> PlanInput {
        let mut i = input(
            vec![
                backup(B1, 1, "0/2000028", "0/3000100", "01:00"),
                backup(B2, 1, "0/6000028", "0/7000100", "02:00"),
                backup(B3, 1, "0/4000028", "0/6000000", "01:30"),
            ],
            vec![segs(1, 2, 8), segs(2, 5, 9), vec![file("00000002.history")]],
        );
        i.histories = vec![history(2, "1\t0/5000028\tx\n")];
        i
    }

    #[test]
    fn backups_count_only_on_histories_that_hold_them() {
        let id = |s: &str| Some(BackupId(s.to_string()));
        #[rustfmt::skip]
        let cases: Vec<(&str, T, TL, Option<BackupId>, Result<(&str, u32, &str), &str>)> = vec![
            // what                                 target               timeline               --backup  backup, target tli, segments | error
            ("latest: timeline 2 from B1",          T::Latest,           TL::Latest,            None,     Ok((B1, 2, "1:2..4 2:5..9"))),
            ("timeline 1: the newest there",        T::Latest,           TL::Id(TimelineId(1)), None,     Ok((B2, 1, "1:6..8"))),
            ("current: the newest backup's own",    T::Latest,           TL::Current,           None,     Ok((B2, 1, "1:6..8"))),
            ("time on timeline 2 skips B2 and B3",  T::Time(at("05:00")), TL::Latest,           None,     Ok((B1, 2, "1:2..4 2:5..9"))),
            ("forced B2 onto timeline 2",           T::Latest,           TL::Id(TimelineId(2)), id(B2),   Err("backup 20261102T000000Z cannot reach the target latest: timeline 2 left timeline 1 at 0/5000028, before the backup started at 0/6000028")),
            ("forced B3 spans the switch",          T::Latest,           TL::Id(TimelineId(2)), id(B3),   Err("timeline 2 left timeline 1 at 0/5000028, before the backup ended at 0/6000000")),
            ("forced B2, latest: its own timeline", T::Latest,           TL::Latest,            id(B2),   Ok((B2, 1, "1:6..8"))),
        ];
        for (what, target, timeline, forced, want) in cases {
            let mut i = diverged();
            i.spec = RecoveryTargetSpec::new(target, true, timeline);
            i.forced_backup = forced;
            match (plan(&i), want) {
                (Ok(p), Ok((backup, tli, segments))) => {
                    assert_eq!(p.backup.id.0, backup, "{what}: {}", p.reason);
                    assert_eq!(p.target_timeline, TimelineId(tli), "{what}");
                    assert_eq!(compact(&p.segments), segments, "{what}");
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_forced_backup_is_used_only_if_it_reaches_the_target() {
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, T, Result<(&str, &str), &str>)> = vec![
            // what                             --backup             target                    segments, note | error
            ("an older backup for a late time", B1,                  T::Time(at("05:00")),     Ok(("1:2..10", ""))),
            ("time before its end",             B3,                  T::Time(at("02:30")),     Err("backup 20261103T000000Z cannot reach the target time 2026-11-01T02:30:00Z: recovery becomes consistent only at the backup's end (2026-11-01T03:00:00Z), after the target; choose an older backup")),
            ("lsn inside it",                   B2,                  T::Lsn(lsn("0/5800000")), Err("recovery becomes consistent only at the backup's end (lsn 0/6000100), after the target")),
            ("immediate",                       B2,                  T::Immediate,             Ok(("1:5..6", ""))),
            ("xid that began before its end",   B2,                  T::Xid(150),              Ok(("1:5..10", "transaction 150 began before backup 20261102T000000Z ended (its next transaction id was 200)"))),
            ("xid, next xid unknown",           B3,                  T::Xid(150),              Ok(("1:9..10", "does not record its next transaction id"))),
            ("unknown restore point",           B3,                  T::Name("x".into()),      Ok(("1:9..10", "reaches it only if it was created after 2026-11-01T03:00:00Z"))),
            ("unknown backup",                  "20990101T000000Z",  T::Latest,                Err("unknown backup '20990101T000000Z'; `pgpitr list` shows the backups")),
        ];
        for (what, forced, target, want) in cases {
            let mut i = three_backups();
            i.spec.target = target;
            i.forced_backup = Some(BackupId(forced.to_string()));
            match (plan(&i), want) {
                (Ok(p), Ok((segments, note))) => {
                    assert_eq!(p.backup.id.0, forced, "{what}");
                    assert!(
                        p.reason.contains("chosen with --backup"),
                        "{what}: {}",
                        p.reason
                    );
                    assert_eq!(compact(&p.segments), segments, "{what}");
                    assert!(
                        p.notes.iter().any(|n| n.contains(note)) || note.is_empty(),
                        "{what}: {:?}",
                        p.notes
                    );
                }
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn restore_points_must_be_on_the_target_timeline() {
        let mut i = promoted();
        i.spec.target = T::Name("on-tl3".into());
        i.restore_points.insert(
            "on-tl3".into(),
            RestorePoint {
                lsn: lsn("0/2800000"),
                timeline: TimelineId(3),
                time: None,
            },
        );
        let e = plan(&i).unwrap_err().to_string();
        assert_eq!(e, "restore point 'on-tl3' (lsn 0/2800000 on timeline 3) is not on the history of timeline 2; choose its timeline with --target-timeline 3");
    }

    #[test]
    fn refuses_inputs_it_cannot_plan_from() {
        let b = || backup(B1, 1, "0/2000028", "0/3000100", "01:00");
        let mut other_size = b();
        other_size.wal_segment_size = WalSegSize::new(64 << 20).unwrap();
        let mut twice = file("000000010000000000000003");
        twice.content_id = "b".repeat(64);
        #[rustfmt::skip]
        let cases: Vec<(&str, PlanInput, &str)> = vec![
            ("no backups",           input(vec![], vec![segs(1, 1, 3)]),                   "no backups in the repository; take one with `pgpitr backup`"),
            ("other segment size",   input(vec![other_size], vec![segs(1, 1, 3)]),         "backup 20261101T000000Z uses WAL segments of 67108864 bytes, the repository 16777216 bytes"),
            ("two contents",         input(vec![b()], vec![segs(1, 2, 4), vec![twice]]),   "WAL file '000000010000000000000003' is stored 2 times with different contents"),
        ];
        for (what, i, msg) in cases {
            let e = plan(&i).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{what}: {e}");
        }
        // The same content listed twice is one file.
        let i = input(vec![b()], vec![segs(1, 2, 4), segs(1, 3, 3)]);
        assert_eq!(compact(&plan(&i).unwrap().segments), "1:2..4");
    }

    #[test]
    fn plan_reports_sizes_settings_notes_and_window() {
        let mut i = promoted();
        i.spec = RecoveryTargetSpec::new(T::Time(at("09:00")), false, TL::Latest);
        let p = plan(&i).unwrap();
        // 7 segments of 100 bytes and one history file of 10.
        assert_eq!(p.bytes_to_fetch, 7 * 100 + 10);
        assert_eq!(p.end.end_lsn, lsn("0/9000000"));
        let settings: Vec<String> = p
            .recovery_settings()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            settings,
            [
                "recovery_target_time=2026-11-01 09:00:00.000000+00",
                "recovery_target_inclusive=false",
                "recovery_target_timeline=2",
            ]
        );
        assert!(p.notes.iter().any(|n| n.contains(
            "pgpitr cannot tell whether the WAL through segment 000000020000000000000008 reaches the target time 2026-11-01T09:00:00Z"
        )));
        assert_eq!(
            p.timeline_path,
            [
                BranchStep {
                    timeline: TimelineId(1),
                    begin: Lsn(0),
                    end: Some(lsn("0/5000028"))
                },
                BranchStep {
                    timeline: TimelineId(2),
                    begin: lsn("0/5000028"),
                    end: None
                },
            ]
        );
        let w = &p.window;
        assert_eq!(w.timeline, TimelineId(2));
        assert_eq!(w.earliest.as_ref().unwrap().time, at("01:00"));
        assert_eq!(
            w.latest.as_ref().unwrap().last_segment.to_string(),
            "000000020000000000000008"
        );

        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["segments"][3], "000000020000000000000005");
        assert_eq!(json["history_files"][0], "00000002.history");
        assert_eq!(json["end"]["first_missing"], "000000020000000000000009");
        assert_eq!(json["spec"]["target"]["kind"], "time");
        assert_eq!(json["backup"]["stop_lsn"], "0/3000100");
    }

    #[test]
    fn a_gap_with_later_wal_is_reported() {
        let mut i = input(
            vec![backup(B1, 1, "0/2000028", "0/3000100", "01:00")],
            vec![segs(1, 2, 7), segs(1, 9, 0xC)],
        );
        i.spec.target = T::Latest;
        let p = plan(&i).unwrap();
        assert_eq!(
            p.notes,
            ["the archive holds later WAL (up to 00000001000000000000000C) after the missing segment 000000010000000000000008; it cannot be replayed past the gap"]
        );
    }

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
        };
        let s = BackupSummary::from(&m);
        assert_eq!(
            (s.stop_lsn, s.stop_next_xid, s.size_bytes),
            (m.stop_lsn, Some(42), 12345)
        );
        assert_eq!(s.label, "weekly");
    }
}
