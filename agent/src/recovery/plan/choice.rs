//! Backup choice: which backup a plan starts from and which timeline history recovery follows
//! from it, for each kind of target (see [`super::plan`] for the rules), or the backup given
//! with `--backup` when it can reach the target.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::error::PlanError;
use super::input::{BackupSummary, PlanInput, RestorePoint};
use super::timelines::{Branch, Timelines};
use crate::pg::{Lsn, TimelineId};
use crate::recovery::target::{RecoveryTarget, TargetTimeline};
use crate::repo::manifest::BackupId;

/// The target with a restore point resolved when it is known.
pub(super) enum Goal<'a> {
    Everything,
    Consistency,
    Lsn(Lsn),
    Time(Timestamp),
    Xid(u64),
    RestorePoint(&'a str, &'a RestorePoint),
    UnknownName(&'a str),
}

impl<'a> Goal<'a> {
    pub(super) fn of(
        target: &'a RecoveryTarget,
        known: &'a BTreeMap<String, RestorePoint>,
    ) -> Self {
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
    pub(super) fn reached_after(&self, b: &BackupSummary) -> Option<bool> {
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
pub(super) struct Choice<'a> {
    pub(super) backup: &'a BackupSummary,
    pub(super) branch: &'a Branch,
    pub(super) reason: String,
    pub(super) notes: Vec<String>,
}

/// Oldest first: by stop time, then stop LSN, then id.
fn by_age(a: &&BackupSummary, b: &&BackupSummary) -> std::cmp::Ordering {
    (a.stop_time, a.stop_lsn, &a.id).cmp(&(b.stop_time, b.stop_lsn, &b.id))
}

/// Chooses among all backups.
pub(super) fn choose<'a>(
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
pub(super) fn choose_forced<'a>(
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
