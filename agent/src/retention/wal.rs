//! Which archived WAL files retention may delete: a pure function of the kept backups, the WAL
//! listing and the timeline histories.
//!
//! WAL is compared by position (segment number, i.e. LSN), per timeline, along the timeline
//! histories — never by file name across timelines: after a point-in-time restore the new
//! timeline's names sort after every name of the old one although its LSNs are lower, and a
//! cluster upgrade starts again at timeline 1.
//!
//! Kept backups come in two kinds ([`super::window`]): those that keep continuous WAL from their
//! start on (all of them without a WAL window) and those that keep only their own WAL.
//!
//! A file of timeline T at segment n (segments, `.partial` and `.backup` files alike) goes only
//! when:
//! - T's history is known (timeline 1, or its `.history` file is archived) — otherwise kept;
//! - when some continuous backup is "related" to T — T is on a known history that holds the
//!   backup (T is the backup's timeline, one of its ancestors, or a descendant forked after it),
//!   or T is the backup's own start or stop timeline — n is below the start segment of every
//!   such backup;
//! - when no continuous backup is related to T, n is below the start segment of every
//!   continuous backup;
//! - it is not a segment that replay from a continuous backup reads on any history that holds
//!   it (checked explicitly, as a safety net);
//! - and it is not a backup's own WAL, for every own-WAL-only backup: T is the backup's start or
//!   stop timeline and n lies from its start through its stop segment (the `.backup` file is
//!   named after the start segment), or it is a segment replay reads from the backup's start
//!   through its stop segment on a history that holds it.
//!
//! `.history` files are never deleted; with no continuous backup nothing is deleted.
//!
//! The live timeline's WAL is kept through its backup: the newest backup restorable on the
//! latest timeline is always among the kept ones (`retention::policy`) and always continuous
//! ([`super::window`]), and the latest timeline is related to it, so nothing of that timeline
//! from the backup's start on goes.

use std::collections::HashSet;

use crate::pg::{TimelineHistory, TimelineId, WalFileName, WalSegSize, WalSegmentName};
use crate::recovery::plan::{walk, BackupSummary, Timelines, WalIndex};
use crate::repo::wal::ArchivedWal;

/// The WAL objects of `wal` that the `kept` backups do not need under an optional WAL window
/// (`keep_wal_within`, judged at `now`): without one, every kept backup keeps continuous WAL
/// from its start on; with one, [`super::wal_window`] says which keep only their own. Returns
/// the expirable objects and the window, for reports. The one rule of `expire` and `copy`.
pub fn expirable_under(
    kept: &[BackupSummary],
    wal: &[ArchivedWal],
    histories: &[TimelineHistory],
    seg_size: WalSegSize,
    keep_wal_within: Option<super::KeepWithin>,
    now: jiff::Timestamp,
) -> (Vec<ArchivedWal>, Option<super::WalWindow>) {
    let Some(within) = keep_wal_within else {
        return (expirable_wal(kept, &[], wal, histories, seg_size), None);
    };
    let window = super::wal_window(kept, wal, histories, seg_size, within, now);
    let own: HashSet<&crate::repo::manifest::BackupId> = window.own_wal_only.iter().collect();
    let (continuous, own_wal_only): (Vec<BackupSummary>, Vec<BackupSummary>) =
        kept.iter().cloned().partition(|b| !own.contains(&b.id));
    let expirable = expirable_wal(&continuous, &own_wal_only, wal, histories, seg_size);
    (expirable, Some(window))
}

/// The WAL objects of `wal` that no kept backup needs, in name order: `kept` keep continuous
/// WAL from their start on, `own_wal_only` only their own (see the module documentation).
pub fn expirable_wal(
    kept: &[BackupSummary],
    own_wal_only: &[BackupSummary],
    wal: &[ArchivedWal],
    histories: &[TimelineHistory],
    seg_size: WalSegSize,
) -> Vec<ArchivedWal> {
    if kept.is_empty() {
        return Vec::new();
    }
    let timelines = Timelines::new(histories);
    let known = |t: TimelineId| t == TimelineId::FIRST || histories.iter().any(|h| h.timeline == t);
    let start_of = |b: &BackupSummary| b.start_lsn.segno(seg_size);
    let global_min = kept.iter().map(start_of).min().expect("non-empty");

    // Segments replay reads from each kept backup, on every history that holds it.
    let index = WalIndex::new(wal);
    let mut needed: HashSet<WalSegmentName> = HashSet::new();
    for b in kept {
        for branch in timelines.all().filter(|x| x.holds_backup(b).is_ok()) {
            needed.extend(walk(branch, &index, seg_size, start_of(b), None).segments);
        }
    }
    let stop_of = |b: &BackupSummary| b.stop_lsn.segno(seg_size);
    for b in own_wal_only {
        for branch in timelines.all().filter(|x| x.holds_backup(b).is_ok()) {
            needed.extend(walk(branch, &index, seg_size, start_of(b), Some(stop_of(b))).segments);
        }
    }
    let own_wal_of_some = |seg: WalSegmentName| {
        own_wal_only.iter().any(|b| {
            (seg.timeline == b.start_timeline || seg.timeline == b.stop_timeline)
                && (start_of(b)..=stop_of(b)).contains(&seg.segno(seg_size))
        })
    };

    // The lowest start segment among the kept backups related to each timeline.
    let related_min = |t: TimelineId| -> Option<u64> {
        kept.iter()
            .filter(|b| {
                b.start_timeline == t
                    || b.stop_timeline == t
                    || timelines.all().any(|x| {
                        x.holds_backup(b).is_ok() && x.steps().iter().any(|s| s.timeline == t)
                    })
            })
            .map(start_of)
            .min()
    };
    let mut limits: std::collections::HashMap<TimelineId, u64> = Default::default();

    let mut out: Vec<ArchivedWal> = wal
        .iter()
        .filter(|w| {
            let seg = match w.name {
                WalFileName::History(_) => return false,
                WalFileName::Segment(s)
                | WalFileName::Partial(s)
                | WalFileName::BackupHistory { segment: s, .. } => s,
            };
            if !known(seg.timeline) {
                return false;
            }
            if matches!(w.name, WalFileName::Segment(_)) && needed.contains(&seg) {
                return false;
            }
            if own_wal_of_some(seg) {
                return false;
            }
            let limit = *limits
                .entry(seg.timeline)
                .or_insert_with(|| related_min(seg.timeline).unwrap_or(global_min));
            seg.segno(seg_size) < limit
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.key.cmp(&b.key)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::BackupId;
    use crate::retention::fixtures::{file, seg, segs, SEG};

    fn backup(id: &str, tli: (u32, u32), start: &str, stop: &str) -> BackupSummary {
        let t: jiff::Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
        BackupSummary {
            id: BackupId(id.into()),
            label: String::new(),
            start_lsn: start.parse().unwrap(),
            start_timeline: TimelineId(tli.0),
            stop_lsn: stop.parse().unwrap(),
            stop_timeline: TimelineId(tli.1),
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

    fn names(v: &[ArchivedWal]) -> Vec<String> {
        v.iter().map(|w| w.name.to_string()).collect()
    }

    #[test]
    fn older_than_the_oldest_kept_start_goes_history_stays() {
        let mut wal = segs(1, 1, 10);
        wal.push(file("00000002.history"));
        wal.push(file(&format!("{}.00000028.backup", seg(1, 2))));
        wal.push(file(&format!("{}.00000028.backup", seg(1, 5))));
        let histories = vec![history(2, "1\t0/F000000\tx\n")];
        let kept = vec![backup("k", (1, 1), "0/5000028", "0/6000100")];
        let got = names(&expirable_wal(&kept, &[], &wal, &histories, SEG));
        let mut want: Vec<String> = (1..=4).map(|n| seg(1, n)).collect();
        want.push(format!("{}.00000028.backup", seg(1, 2)));
        assert_eq!(got, want);
        // Nothing kept, nothing deleted.
        assert!(expirable_wal(&[], &[], &wal, &histories, SEG).is_empty());
    }

    #[test]
    fn timeline_reset_compares_positions_not_names() {
        // Timeline 2 left timeline 1 at segment 6 (a point-in-time restore); timeline 1 went on
        // to segment 12 meanwhile. Kept: a backup on timeline 1 at segment 10 and the newest
        // backup, on timeline 2 at segment 8. By name every timeline-1 file sorts before
        // "000000020000000000000008"; by position segments 8–12 of timeline 1 are not older.
        let wal = [
            segs(1, 1, 12),
            segs(2, 6, 9),
            vec![file("00000002.history")],
        ]
        .concat();
        let histories = vec![history(2, "1\t0/6000028\tx\n")];
        let kept = vec![
            backup("a", (1, 1), "0/A000028", "0/A000100"),
            backup("b", (2, 2), "0/8000028", "0/8000100"),
        ];
        let got = names(&expirable_wal(&kept, &[], &wal, &histories, SEG));
        let want: Vec<String> = [
            (1..=7).map(|n| seg(1, n)).collect::<Vec<_>>(),
            vec![seg(2, 6), seg(2, 7)],
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn a_backup_needs_the_newer_timelines_forked_after_it() {
        // Kept: backup at segment 5 on timeline 1, and a newer one on timeline 2 at segment 10.
        // Timeline 2 forked at 7: its segments 7..9 are replayed from the first backup.
        let wal = [segs(1, 1, 8), segs(2, 7, 11)].concat();
        let histories = vec![history(2, "1\t0/7000028\tx\n")];
        let kept = vec![
            backup("a", (1, 1), "0/5000028", "0/5000100"),
            backup("b", (2, 2), "0/A000028", "0/A000100"),
        ];
        let got = names(&expirable_wal(&kept, &[], &wal, &histories, SEG));
        assert_eq!(got, (1..=4).map(|n| seg(1, n)).collect::<Vec<_>>());
    }

    #[test]
    fn the_live_timeline_keeps_its_wal_through_the_backup_before_its_fork() {
        // Issue 15, item 5: timeline 2 left timeline 1 at segment 5, after backup b0 (segment 2)
        // and before b2 (segment 9), the newest by time. Kept with b2 alone, all of timeline
        // 2 sits below b2's start and goes; kept with b0 too, timeline 2 stays and so does
        // timeline 1 from b0's start.
        let wal = [
            segs(1, 1, 10),
            segs(2, 5, 7),
            vec![file("00000002.history")],
        ]
        .concat();
        let histories = vec![history(2, "1\t0/5000028\tx\n")];
        let b0 = backup("b0", (1, 1), "0/2000028", "0/2000100");
        let b2 = backup("b2", (1, 1), "0/9000028", "0/9000100");
        let alone = names(&expirable_wal(
            std::slice::from_ref(&b2),
            &[],
            &wal,
            &histories,
            SEG,
        ));
        assert!(alone.contains(&seg(2, 7)), "{alone:?}");
        let got = names(&expirable_wal(&[b0, b2], &[], &wal, &histories, SEG));
        assert_eq!(got, vec![seg(1, 1)]);
    }

    #[test]
    fn unrelated_and_unknown_timelines() {
        // Timeline 3 left timeline 1 at segment 3, before the kept backup (segment 8): no kept
        // backup is on it, and all of it is older than every kept start, so it goes. Timeline 4
        // has no history file: kept whatever its position. Timeline 5 forked from 1 at 9, after
        // the backup started: related, and not older, so kept.
        let wal = [segs(1, 1, 10), segs(3, 3, 5), segs(4, 1, 2), segs(5, 9, 10)].concat();
        let histories = vec![
            history(3, "1\t0/3000028\tx\n"),
            history(5, "1\t0/9000028\tx\n"),
        ];
        let kept = vec![backup("k", (1, 1), "0/8000028", "0/8000100")];
        let got = names(&expirable_wal(&kept, &[], &wal, &histories, SEG));
        let want: Vec<String> = [
            (1..=7).map(|n| seg(1, n)).collect::<Vec<_>>(),
            (3..=5).map(|n| seg(3, n)).collect(),
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn upgrade_restarting_at_timeline_one_keeps_the_new_lineage() {
        // An old lineage on timeline 3 (history 1 -> 2 -> 3) and, after an upgrade into the
        // same repository, a new timeline 1 at higher positions. The kept backup is on the new
        // timeline 1 at segment 40; old timeline-3 WAL below 40 goes, the new WAL stays.
        let wal = [segs(1, 40, 42), segs(3, 20, 22)].concat();
        let histories = vec![
            history(2, "1\t0/5000000\tx\n"),
            history(3, "1\t0/5000000\tx\n2\t0/9000000\ty\n"),
        ];
        let kept = vec![backup("new", (1, 1), "0/28000028", "0/28000100")];
        let got = names(&expirable_wal(&kept, &[], &wal, &histories, SEG));
        assert_eq!(got, (20..=22).map(|n| seg(3, n)).collect::<Vec<_>>());
    }

    #[test]
    fn an_own_wal_only_backup_keeps_its_start_through_stop_and_its_backup_file() {
        // Kept: "old" (segments 3-4, own WAL only) and "base" (segment 8, continuous). Segments
        // 1-2 and 5-7 go, 3-4 and the `.backup` file of "old" stay, 8 on stays.
        let mut wal = segs(1, 1, 10);
        wal.push(file(&format!("{}.00000028.backup", seg(1, 3))));
        wal.push(file(&format!("{}.00000028.backup", seg(1, 6))));
        let old = backup("old", (1, 1), "0/3000028", "0/4000100");
        let base = backup("base", (1, 1), "0/8000028", "0/8000100");
        let got = names(&expirable_wal(
            std::slice::from_ref(&base),
            std::slice::from_ref(&old),
            &wal,
            &[],
            SEG,
        ));
        let want: Vec<String> = vec![
            seg(1, 1),
            seg(1, 2),
            seg(1, 5),
            seg(1, 6),
            seg(1, 7),
            format!("{}.00000028.backup", seg(1, 6)),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn an_own_wal_only_backup_keeps_the_segment_a_later_timeline_holds_its_end_in() {
        // Timeline 2 left timeline 1 inside the stop segment (4) of "old": replay along
        // timeline 2's history reads segment 4 from timeline 2, so both copies stay.
        let wal = [segs(1, 1, 6), segs(2, 4, 9), vec![file("00000002.history")]].concat();
        let histories = vec![history(2, "1\t0/4000200\tx\n")];
        let old = backup("old", (1, 1), "0/3000028", "0/4000100");
        let base = backup("base", (2, 2), "0/8000028", "0/8000100");
        let got = names(&expirable_wal(&[base], &[old], &wal, &histories, SEG));
        let want: Vec<String> = vec![
            seg(1, 1),
            seg(1, 2),
            seg(1, 5),
            seg(1, 6),
            seg(2, 5),
            seg(2, 6),
            seg(2, 7),
        ];
        assert_eq!(got, want);
    }
}
