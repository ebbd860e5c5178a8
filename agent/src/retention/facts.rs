//! The live timeline, for retention: the latest timeline of the repository and the newest backup
//! that restores it. A pure function of the backups, the archived WAL listing and the timeline
//! histories.
//!
//! After a point-in-time restore that replaces the source (promoted with `--archive-mode
//! preserve`), the cluster lives on a new timeline that left its parent before the parent's
//! newest backups were taken: those backups are on an abandoned history, and the newest backup
//! by time is not the one that restores the live cluster. Retention must keep both.
//!
//! Rules:
//! - the latest timeline is the highest one whose history is known (timeline 1, or an archived
//!   `.history` file): the timeline `recovery_target_timeline = 'latest'` follows
//!   (`findNewestTimeLine`, src/backend/access/transam/timeline.c);
//! - a backup is on the history of timeline T when its start and stop both lie on T's history:
//!   its timeline is T or an ancestor of T, and T's history left that timeline only after the
//!   backup stopped ([`Branch::holds_backup`]; PostgreSQL refuses otherwise, "requested timeline
//!   %u is not a child of this server's history", `InitWalRecovery` in xlogrecovery.c);
//! - it restores T when its own WAL (start through stop segment) is archived along T's history,
//!   as the planner reads it ([`window_on`]);
//! - the newest is by stop time, as for every retention rule.

use crate::pg::{TimelineHistory, TimelineId, WalSegSize};
use crate::recovery::plan::{BackupSummary, Branch, WalIndex};
use crate::recovery::window::window_on;
use crate::repo::manifest::BackupId;
use crate::repo::wal::ArchivedWal;

/// The latest timeline and the newest backup restorable on its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTimeline {
    pub timeline: TimelineId,
    /// `None` when no backup on its history is restorable.
    pub backup: Option<BackupId>,
}

/// The highest timeline whose history is known: timeline 1 when no `.history` file is archived.
pub fn latest_timeline(histories: &[TimelineHistory]) -> TimelineId {
    histories
        .iter()
        .map(|h| h.timeline)
        .max()
        .unwrap_or(TimelineId::FIRST)
        .max(TimelineId::FIRST)
}

/// The latest timeline and the newest backup of `backups` restorable on its history; see the
/// module documentation for the rules.
pub fn live_timeline(
    backups: &[BackupSummary],
    wal: &[ArchivedWal],
    histories: &[TimelineHistory],
    seg_size: WalSegSize,
) -> LiveTimeline {
    let timeline = latest_timeline(histories);
    let backup = Branch::of(timeline, histories).and_then(|branch| {
        let window = window_on(&branch, backups, &WalIndex::new(wal), seg_size);
        // Oldest first, by stop time.
        window.restorable.last().cloned()
    });
    LiveTimeline { timeline, backup }
}

/// What [`super::decide`] needs about each of `manifests` (in their order), and the live
/// timeline: whether each is restorable on some timeline and which one restores the latest.
/// `expire` and `copy` judge backups with it.
pub fn backup_facts(
    manifests: &[crate::repo::manifest::BackupManifest],
    wal: &[ArchivedWal],
    histories: &[TimelineHistory],
    seg_size: WalSegSize,
) -> (Vec<super::BackupFacts>, LiveTimeline) {
    let summaries: Vec<BackupSummary> = manifests.iter().map(BackupSummary::from).collect();
    let restorable: std::collections::HashSet<BackupId> =
        crate::recovery::recoverable_windows(&summaries, wal, histories, seg_size)
            .into_iter()
            .flat_map(|w| w.restorable)
            .collect();
    let live = live_timeline(&summaries, wal, histories, seg_size);
    let facts = manifests
        .iter()
        .map(|m| super::BackupFacts {
            id: m.id.clone(),
            stop_time: m.stop_time,
            keep: m.keep,
            restorable: restorable.contains(&m.id),
            restores_latest_timeline: (live.backup.as_ref() == Some(&m.id))
                .then_some(live.timeline),
        })
        .collect();
    (facts, live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::fixtures::{segs, SEG};

    /// A backup of timeline `tli` from `start` to `stop`, stopped at `2026-11-<day>`.
    fn backup(id: &str, tli: u32, start: &str, stop: &str, day: u32) -> BackupSummary {
        let t: jiff::Timestamp = format!("2026-11-{day:02}T00:00:00Z").parse().unwrap();
        BackupSummary {
            id: BackupId(id.into()),
            label: String::new(),
            start_lsn: start.parse().unwrap(),
            start_timeline: TimelineId(tli),
            stop_lsn: stop.parse().unwrap(),
            stop_timeline: TimelineId(tli),
            start_time: t,
            stop_time: t,
            stop_next_xid: None,
            wal_segment_size: SEG,
            size_bytes: 0,
        }
    }

    fn history(tli: u32, text: &str) -> TimelineHistory {
        TimelineHistory::parse(TimelineId(tli), text).unwrap()
    }

    fn live(
        backups: &[BackupSummary],
        wal: &[ArchivedWal],
        histories: &[TimelineHistory],
    ) -> (u32, Option<String>) {
        let l = live_timeline(backups, wal, histories, SEG);
        (l.timeline.0, l.backup.map(|b| b.0))
    }

    #[test]
    fn latest_timeline_is_the_highest_known_history() {
        assert_eq!(latest_timeline(&[]), TimelineId::FIRST);
        let histories = vec![
            history(3, "1\t0/3000000\tx\n"),
            history(2, "1\t0/2000000\tx\n"),
        ];
        assert_eq!(latest_timeline(&histories), TimelineId(3));
    }

    #[test]
    fn a_restore_that_replaced_the_source_is_restored_from_the_backup_before_its_fork() {
        // Issue 15, item 5: timeline 2 left timeline 1 at 0/5000028, after b0 and before b1 and
        // b2, the newest backups by time. Only b0 restores timeline 2.
        let backups = vec![
            backup("b0", 1, "0/2000028", "0/2000100", 1),
            backup("b1", 1, "0/7000028", "0/7000100", 2),
            backup("b2", 1, "0/9000028", "0/9000100", 3),
        ];
        let wal = [segs(1, 2, 10), segs(2, 5, 6)].concat();
        let histories = vec![history(2, "1\t0/5000028\tpoint-in-time restore\n")];
        assert_eq!(live(&backups, &wal, &histories), (2, Some("b0".into())));
        // Without timeline 2 the newest backup of timeline 1 is the live one.
        assert_eq!(live(&backups, &wal, &[]), (1, Some("b2".into())));
    }

    #[test]
    fn a_backup_counts_only_when_it_stops_before_the_fork_and_its_wal_is_archived() {
        let histories = vec![history(2, "1\t0/5000028\tx\n")];
        // Started before the fork, stopped after it: not on timeline 2's history.
        let across = backup("across", 1, "0/4000028", "0/6000100", 2);
        let before = backup("before", 1, "0/2000028", "0/2000100", 1);
        let wal = [segs(1, 2, 7), segs(2, 5, 6)].concat();
        assert_eq!(
            live(&[before.clone(), across.clone()], &wal, &histories),
            (2, Some("before".into()))
        );
        // Its own WAL missing (segment 2 of timeline 1): not restorable, so none.
        let gap = [segs(1, 3, 7), segs(2, 5, 6)].concat();
        assert_eq!(live(&[before, across], &gap, &histories), (2, None));
        // A backup taken on timeline 2 itself is newer than any before the fork.
        let on_two = backup("on-two", 2, "0/6000028", "0/6000100", 4);
        let older = backup("older", 1, "0/2000028", "0/2000100", 1);
        assert_eq!(
            live(&[older, on_two], &wal, &histories),
            (2, Some("on-two".into()))
        );
    }

    #[test]
    fn timelines_two_levels_deep() {
        // 1 -> 2 at segment 5 -> 3 at segment 8: a backup of timeline 2 at segment 6 restores
        // timeline 3; one of timeline 2 after the second fork does not.
        let histories = vec![
            history(2, "1\t0/5000028\tx\n"),
            history(3, "1\t0/5000028\tx\n2\t0/8000028\ty\n"),
        ];
        let backups = vec![
            backup("b1", 1, "0/2000028", "0/2000100", 1),
            backup("b2", 2, "0/6000028", "0/6000100", 2),
            backup("b2-late", 2, "0/9000028", "0/9000100", 3),
        ];
        let wal = [segs(1, 2, 5), segs(2, 5, 10), segs(3, 8, 9)].concat();
        assert_eq!(live(&backups, &wal, &histories), (3, Some("b2".into())));
    }
}
