//! The WAL window (`keep_wal_within`, issue 19): which kept backups keep continuous WAL from
//! their start on, and which keep only their own WAL. A pure function of the kept backups, the
//! archived WAL listing, the timeline histories, the window and the current time.
//!
//! "Recoverable" means what the planner can plan: a moment `t` (or an LSN) on the history of a
//! timeline is recoverable from a backup `b` when `b` lies on that history, ended at or before
//! `t`, its own WAL (start through stop segment) is archived along the history, and so is every
//! segment from `b`'s start through the one holding `t`, without a gap
//! ([`crate::recovery::plan`]).
//!
//! The window is defined by time but WAL is kept by position, so the window's start is turned
//! into a backup, per known history (timeline 1 and each archived `.history` file):
//! - `since = now − keep_wal_within`: every moment from `since` on must stay recoverable;
//! - the *base* of a history is the newest kept backup on it (by stop time, then stop LSN, then
//!   id, as [`crate::recovery::window`] orders them) that is restorable along it and stopped at
//!   or before `since`: every moment from `since` on is then recoverable from the base or from
//!   a newer backup, whose WAL is kept too. A history with no such backup (every kept backup on
//!   it is younger than `since`, or the window is longer than the archive) has no base: all
//!   its kept backups keep continuous WAL, as without a window;
//! - a kept backup keeps continuous WAL (its start is a lower bound of
//!   [`super::expirable_wal`]) when, on some history that holds it, it is not older than that
//!   history's base (or the history has none), or when no known history holds it (its
//!   timeline's history is unknown: kept as without a window). Every other kept backup keeps
//!   only its own WAL, from its start through its stop segment with its `.backup` file, on the
//!   timelines it was taken on, and so stays restorable to its consistent end
//!   (`--backup ID --target immediate`), not to any later moment.
//!
//! Consequences, by construction: the newest backup and the newest restorable backup on the
//! latest timeline's history (always kept, `retention::policy`) are never older than a base, so
//! they and the live timeline's WAL from their start on always stay. A backup whose stop time
//! lies in the future (a clock ahead) is younger than `since` and keeps continuous WAL; a clock
//! behind only moves `since` back and keeps more.

use std::collections::HashSet;

use jiff::Timestamp;
use serde::Serialize;

use super::policy::KeepWithin;
use crate::pg::{TimelineHistory, TimelineId, WalSegSize};
use crate::recovery::plan::{BackupSummary, Timelines, WalIndex};
use crate::recovery::window::window_on;
use crate::repo::manifest::BackupId;
use crate::repo::wal::ArchivedWal;

/// Which kept backups keep continuous WAL under a WAL window; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalWindow {
    /// The window as configured.
    pub keep_wal_within: KeepWithin,
    /// `now − keep_wal_within`: every moment from here on stays recoverable.
    pub since: Timestamp,
    /// The base of each history that has one, by timeline.
    pub bases: Vec<WindowBase>,
    /// Kept backups that keep continuous WAL from their start on, in the order given.
    pub continuous: Vec<BackupId>,
    /// Kept backups that keep only their own WAL (restorable to their consistent end), in the
    /// order given.
    pub own_wal_only: Vec<BackupId>,
}

/// The backup from whose start WAL is kept without a gap along one history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowBase {
    pub timeline: TimelineId,
    pub backup: BackupId,
    pub stop_time: Timestamp,
}

/// The WAL window of `kept` at `now`; see the module documentation for the rules.
pub fn wal_window(
    kept: &[BackupSummary],
    wal: &[ArchivedWal],
    histories: &[TimelineHistory],
    seg_size: WalSegSize,
    within: KeepWithin,
    now: Timestamp,
) -> WalWindow {
    let since = i64::try_from(within.seconds)
        .ok()
        .and_then(|s| now.checked_sub(jiff::SignedDuration::from_secs(s)).ok())
        .unwrap_or(Timestamp::MIN);
    let age = |b: &BackupSummary| (b.stop_time, b.stop_lsn, b.id.clone());
    let index = WalIndex::new(wal);
    let mut bases = Vec::new();
    let mut continuous: HashSet<&BackupId> = HashSet::new();
    let mut on_some_history: HashSet<&BackupId> = HashSet::new();
    for branch in Timelines::new(histories).all() {
        let on: Vec<&BackupSummary> = kept
            .iter()
            .filter(|b| branch.holds_backup(b).is_ok())
            .collect();
        on_some_history.extend(on.iter().map(|b| &b.id));
        let restorable = window_on(branch, kept, &index, seg_size).restorable;
        // Oldest first: the last one stopped at or before `since` is the base.
        let base = restorable
            .iter()
            .filter_map(|id| on.iter().find(|b| &b.id == id))
            .filter(|b| b.stop_time <= since)
            .max_by_key(|b| age(b));
        if let Some(base) = base {
            bases.push(WindowBase {
                timeline: branch.timeline(),
                backup: base.id.clone(),
                stop_time: base.stop_time,
            });
        }
        continuous.extend(
            on.iter()
                .filter(|b| base.is_none_or(|base| age(b) >= age(base)))
                .map(|b| &b.id),
        );
    }
    let (continuous, own_wal_only): (Vec<&BackupSummary>, Vec<&BackupSummary>) = kept
        .iter()
        .partition(|b| continuous.contains(&b.id) || !on_some_history.contains(&b.id));
    WalWindow {
        keep_wal_within: within,
        since,
        bases,
        continuous: continuous.iter().map(|b| b.id.clone()).collect(),
        own_wal_only: own_wal_only.iter().map(|b| b.id.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::fixtures::{file, segs, SEG};

    /// A backup of timeline `tli` in segment `seg`, stopped on 2026-11-`day`.
    fn backup(id: &str, tli: u32, seg: u64, day: u32) -> BackupSummary {
        let t: Timestamp = format!("2026-11-{day:02}T00:00:00Z").parse().unwrap();
        BackupSummary {
            id: BackupId(id.into()),
            label: String::new(),
            start_lsn: crate::pg::Lsn(seg * SEG.bytes() as u64 + 0x28),
            start_timeline: TimelineId(tli),
            stop_lsn: crate::pg::Lsn(seg * SEG.bytes() as u64 + 0x100),
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

    fn ids(v: &[BackupId]) -> Vec<&str> {
        v.iter().map(|b| b.0.as_str()).collect()
    }

    fn now() -> Timestamp {
        "2026-11-30T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn the_newest_backup_before_the_window_is_the_base() {
        // Backups on days 1, 10, 20, 25; a 14-day window from the 30th starts on the 16th: the
        // base is day 10; day 1 keeps only its own WAL.
        let kept = vec![
            backup("d01", 1, 2, 1),
            backup("d10", 1, 5, 10),
            backup("d20", 1, 8, 20),
            backup("d25", 1, 9, 25),
        ];
        let wal = segs(1, 2, 10);
        let w = wal_window(&kept, &wal, &[], SEG, "14d".parse().unwrap(), now());
        assert_eq!(w.since.to_string(), "2026-11-16T00:00:00Z");
        assert_eq!(ids(&w.continuous), vec!["d10", "d20", "d25"]);
        assert_eq!(ids(&w.own_wal_only), vec!["d01"]);
        assert_eq!(w.bases.len(), 1);
        assert_eq!(
            (w.bases[0].timeline, w.bases[0].backup.0.as_str()),
            (TimelineId(1), "d10")
        );
        // A backup that stopped exactly at `since` is the base.
        let w = wal_window(&kept, &wal, &[], SEG, "20d".parse().unwrap(), now());
        assert_eq!(ids(&w.own_wal_only), vec!["d01"]);
        assert_eq!(w.bases[0].backup.0, "d10");
    }

    #[test]
    fn a_window_longer_than_the_archive_keeps_everything_continuous() {
        let kept = vec![backup("d10", 1, 5, 10), backup("d20", 1, 8, 20)];
        let wal = segs(1, 5, 10);
        let w = wal_window(&kept, &wal, &[], SEG, "60d".parse().unwrap(), now());
        assert!(w.bases.is_empty());
        assert_eq!(ids(&w.continuous), vec!["d10", "d20"]);
        assert!(w.own_wal_only.is_empty());
        // Far beyond what a timestamp can hold: still everything.
        let w = wal_window(&kept, &wal, &[], SEG, "9999999999w".parse().unwrap(), now());
        assert!(w.own_wal_only.is_empty());
    }

    #[test]
    fn a_base_must_be_restorable() {
        // The newest backup before the window lacks its own WAL (segment 5): the older,
        // restorable one is the base, so that the window is reachable.
        let kept = vec![
            backup("d01", 1, 2, 1),
            backup("d10", 1, 5, 10),
            backup("d25", 1, 9, 25),
        ];
        let wal = [segs(1, 2, 4), segs(1, 6, 10)].concat();
        let w = wal_window(&kept, &wal, &[], SEG, "14d".parse().unwrap(), now());
        assert_eq!(w.bases[0].backup.0, "d01");
        assert!(w.own_wal_only.is_empty());
    }

    #[test]
    fn clocks_ahead_and_backups_in_the_future() {
        // The newest backup stopped "tomorrow" (the server's clock ahead): inside the window.
        let mut future = backup("future", 1, 5, 29);
        future.stop_time = "2026-12-24T00:00:00Z".parse().unwrap();
        let kept = vec![backup("d01", 1, 2, 1), future];
        let wal = segs(1, 2, 6);
        let w = wal_window(&kept, &wal, &[], SEG, "1d".parse().unwrap(), now());
        assert_eq!(w.bases[0].backup.0, "d01");
        assert_eq!(ids(&w.continuous), vec!["d01", "future"]);
    }

    /// Timeline 2 left timeline 1 at segment 6, after d01 and d05 and before d10 and d20
    /// (timeline 1, abandoned); d22, on timeline 2, is newer than both. Kept backups, archived
    /// WAL (segments and `00000002.history`) and histories.
    fn forked_history() -> (Vec<BackupSummary>, Vec<ArchivedWal>, Vec<TimelineHistory>) {
        let kept = vec![
            backup("d01", 1, 2, 1),
            backup("d05", 1, 4, 5),
            backup("d10", 1, 8, 10),
            backup("d20", 1, 10, 20),
            backup("d22", 2, 9, 22),
        ];
        let mut wal = [segs(1, 2, 11), segs(2, 6, 10)].concat();
        wal.push(file("00000002.history"));
        (kept, wal, vec![history(2, "1\t0/6000028\tx\n")])
    }

    #[test]
    fn each_history_has_its_own_base() {
        // On timeline 2's history the base is d05, on timeline 1's d10; d01 keeps only its own
        // WAL.
        let (kept, wal, histories) = forked_history();
        let w = wal_window(&kept, &wal, &histories, SEG, "14d".parse().unwrap(), now());
        let bases: Vec<(u32, &str)> = w
            .bases
            .iter()
            .map(|b| (b.timeline.0, b.backup.0.as_str()))
            .collect();
        assert_eq!(bases, vec![(1, "d10"), (2, "d05")]);
        assert_eq!(ids(&w.continuous), vec!["d05", "d10", "d20", "d22"]);
        assert_eq!(ids(&w.own_wal_only), vec!["d01"]);
    }

    #[test]
    fn after_a_fork_the_window_of_each_history_stays_reachable() {
        // `forked_history` through `expirable_wal`: only segment 3 of timeline 1 goes (below
        // d05's start, the older base, and not d01's own); d01 still restores to its end, and a
        // target on timeline 2 inside the window plans.
        use crate::recovery::{plan, PlanInput, RecoveryTarget, RecoveryTargetSpec};
        let (kept, wal, histories) = forked_history();
        let w = wal_window(&kept, &wal, &histories, SEG, "14d".parse().unwrap(), now());
        let (continuous, own): (Vec<BackupSummary>, Vec<BackupSummary>) = kept
            .iter()
            .cloned()
            .partition(|b| w.continuous.contains(&b.id));
        let gone = crate::retention::expirable_wal(&continuous, &own, &wal, &histories, SEG);
        let names: Vec<String> = gone.iter().map(|g| g.name.to_string()).collect();
        assert_eq!(names, vec!["000000010000000000000003"]);
        let left: Vec<ArchivedWal> = wal.into_iter().filter(|x| !gone.contains(x)).collect();
        let plan_of = |target: RecoveryTarget, forced: Option<&str>| {
            let mut input = PlanInput::new(
                kept.clone(),
                left.clone(),
                histories.clone(),
                SEG,
                RecoveryTargetSpec {
                    target,
                    ..RecoveryTargetSpec::default()
                },
            );
            input.forced_backup = forced.map(|id| BackupId(id.into()));
            plan(&input)
        };
        let p = plan_of(RecoveryTarget::Immediate, Some("d01")).unwrap();
        assert_eq!(p.backup.id.0, "d01");
        let p = plan_of(RecoveryTarget::Lsn("0/7000000".parse().unwrap()), None).unwrap();
        assert_eq!(
            (p.backup.id.0.as_str(), p.target_timeline),
            ("d05", TimelineId(2))
        );
        // A target between d01's end and d05's on timeline 2's history is refused.
        let e = plan_of(RecoveryTarget::Lsn("0/3800000".parse().unwrap()), None).unwrap_err();
        assert!(
            matches!(e, crate::recovery::PlanError::TargetBetweenRanges { .. }),
            "{e}"
        );
    }

    #[test]
    fn a_backup_on_an_unknown_history_keeps_its_wal() {
        // Timeline 3's history is not archived: no known history holds the backup.
        let kept = vec![backup("d01", 3, 2, 1), backup("d10", 1, 5, 10)];
        let wal = [segs(3, 2, 3), segs(1, 5, 6)].concat();
        let w = wal_window(&kept, &wal, &[], SEG, "1d".parse().unwrap(), now());
        assert_eq!(ids(&w.continuous), vec!["d01", "d10"]);
        assert!(w.own_wal_only.is_empty());
    }
}

/// Random backups, WAL and policies: every kept backup stays restorable to its consistent end
/// and every moment of the window stays reachable (see `crate::proptest_config`).
#[cfg(test)]
mod invariants {
    use proptest::prelude::*;

    use super::*;
    use crate::pg::{Lsn, WalSegmentName};
    use crate::recovery::{
        plan, recoverable_windows, PlanInput, RecoveryTarget, RecoveryTargetSpec,
    };
    use crate::retention::{decide, expirable_wal, live_timeline, BackupFacts, RetentionPolicy};

    const SEG: WalSegSize = WalSegSize::DEFAULT;
    /// Segment `n` is written from `T0 + n * HOURS` hours on.
    const HOURS: i64 = 7;

    fn t0() -> Timestamp {
        "2026-01-05T00:00:00Z".parse().unwrap()
    }

    fn at(hours: i64, minutes: i64) -> Timestamp {
        t0().checked_add(jiff::SignedDuration::from_mins(hours * 60 + minutes))
            .unwrap()
    }

    /// A backup from segment `start` to `stop`: stopped one minute into `stop`.
    fn backup(i: usize, start: u64, stop: u64) -> BackupSummary {
        let seg = SEG.bytes() as u64;
        BackupSummary {
            id: BackupId(format!("b{i:02}")),
            label: String::new(),
            start_lsn: Lsn(start * seg + 0x28),
            start_timeline: TimelineId::FIRST,
            stop_lsn: Lsn(stop * seg + 0x100),
            stop_timeline: TimelineId::FIRST,
            start_time: at(start as i64 * HOURS, 0),
            stop_time: at(stop as i64 * HOURS, 1),
            stop_next_xid: None,
            wal_segment_size: SEG,
            size_bytes: 0,
        }
    }

    /// A target in segment `k`, two minutes in: after any backup that stops in it.
    fn target_lsn(k: u64) -> Lsn {
        Lsn(k * SEG.bytes() as u64 + 0x200)
    }

    fn target_time(k: u64) -> Timestamp {
        at(k as i64 * HOURS, 2)
    }

    fn file(n: u64) -> ArchivedWal {
        let name = WalSegmentName::from_segno(TimelineId::FIRST, n, SEG);
        ArchivedWal {
            name: crate::pg::WalFileName::Segment(name),
            content_id: "a".repeat(64),
            key: format!("wal/{name}"),
            size: 1,
        }
    }

    fn planned(
        backups: &[BackupSummary],
        wal: &[ArchivedWal],
        target: RecoveryTarget,
        forced: Option<&BackupId>,
    ) -> Result<crate::recovery::RecoveryPlan, crate::recovery::PlanError> {
        let mut input = PlanInput::new(
            backups.to_vec(),
            wal.to_vec(),
            Vec::new(),
            SEG,
            RecoveryTargetSpec {
                target,
                ..RecoveryTargetSpec::default()
            },
        );
        input.forced_backup = forced.cloned();
        plan(&input)
    }

    /// Segments 1..=n, backups at distinct positions, missing segments, a policy, the window
    /// (hours) and `now` (hours after the last segment began).
    #[allow(clippy::type_complexity)]
    fn scenario() -> impl Strategy<
        Value = (
            u64,
            Vec<(u64, u64)>,
            Vec<u64>,
            (u32, Option<u32>, Option<u32>),
            u64,
            i64,
        ),
    > {
        (8u64..48).prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::btree_set(1..n, 1..8).prop_flat_map(move |starts| {
                    let starts: Vec<u64> = starts.into_iter().collect();
                    let lens = proptest::collection::vec(0u64..3, starts.len());
                    (Just(starts), lens).prop_map(move |(starts, lens)| {
                        let mut out: Vec<(u64, u64)> = Vec::new();
                        for (i, s) in starts.iter().enumerate() {
                            let next = starts.get(i + 1).copied().unwrap_or(n + 1);
                            out.push((*s, (*s + lens[i]).min(next - 1).min(n)));
                        }
                        out
                    })
                }),
                proptest::collection::vec(1..=n, 0..3),
                (
                    0u32..4,
                    proptest::option::of(0u32..4),
                    proptest::option::of(0u32..3),
                ),
                1u64..(n * HOURS as u64 + 24),
                0i64..48,
            )
        })
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(400))]

        #[test]
        fn kept_backups_stay_restorable_and_the_window_reachable(
            (n, positions, missing, (last, daily, weekly), window_hours, after) in scenario(),
        ) {
            let backups: Vec<BackupSummary> = positions
                .iter()
                .enumerate()
                .map(|(i, (s, e))| backup(i, *s, *e))
                .collect();
            let wal: Vec<ArchivedWal> = (1..=n).filter(|k| !missing.contains(k)).map(file).collect();
            let now = at(n as i64 * HOURS + after, 0);
            let within = KeepWithin::parse(&format!("{window_hours}h")).unwrap();

            // What expire decides (`commands::expire`, without the I/O).
            let restorable: HashSet<BackupId> = recoverable_windows(&backups, &wal, &[], SEG)
                .into_iter()
                .flat_map(|w| w.restorable)
                .collect();
            let live = live_timeline(&backups, &wal, &[], SEG);
            let facts: Vec<BackupFacts> = backups
                .iter()
                .map(|b| BackupFacts {
                    id: b.id.clone(),
                    stop_time: b.stop_time,
                    keep: false,
                    restorable: restorable.contains(&b.id),
                    restores_latest_timeline: (live.backup.as_ref() == Some(&b.id)).then_some(live.timeline),
                })
                .collect();
            let policy = RetentionPolicy {
                keep_last: Some(last),
                keep_daily: daily,
                keep_weekly: weekly,
                keep_wal_within: Some(within),
                ..RetentionPolicy::default()
            };
            let verdicts = decide(&facts, &policy, now).unwrap();
            let kept: Vec<BackupSummary> = backups
                .iter()
                .filter(|b| verdicts.iter().any(|v| v.keep && v.id == b.id))
                .cloned()
                .collect();
            let window = wal_window(&kept, &wal, &[], SEG, within, now);
            let (continuous, own): (Vec<BackupSummary>, Vec<BackupSummary>) =
                kept.iter().cloned().partition(|b| window.continuous.contains(&b.id));
            prop_assert_eq!(continuous.len() + own.len(), kept.len());
            let gone: HashSet<String> = expirable_wal(&continuous, &own, &wal, &[], SEG)
                .into_iter()
                .map(|w| w.key)
                .collect();
            let after_wal: Vec<ArchivedWal> =
                wal.iter().filter(|w| !gone.contains(&w.key)).cloned().collect();

            // Every kept backup restorable before stays restorable to its consistent end.
            for b in &kept {
                if planned(&backups, &wal, RecoveryTarget::Immediate, Some(&b.id)).is_ok() {
                    let p = planned(&kept, &after_wal, RecoveryTarget::Immediate, Some(&b.id));
                    prop_assert!(p.is_ok(), "backup {} no longer restorable: {:?}", b.id, p);
                }
            }
            // Every moment of the window reachable before (from a kept backup) stays reachable,
            // by LSN and by time.
            for k in 1..=n {
                // A backup on a primary ends its stop segment with a WAL switch right after the
                // stop (`do_pg_backup_stop`): no later moment lies in that segment.
                if target_time(k) < window.since || positions.iter().any(|(_, e)| *e == k) {
                    continue;
                }
                let before = planned(&kept, &wal, RecoveryTarget::Lsn(target_lsn(k)), None);
                if before.is_ok() {
                    let p = planned(&kept, &after_wal, RecoveryTarget::Lsn(target_lsn(k)), None);
                    prop_assert!(p.is_ok(), "segment {} of the window lost: {:?}", k, p);
                    let p = planned(&kept, &after_wal, RecoveryTarget::Time(target_time(k)), None);
                    prop_assert!(p.is_ok(), "time of segment {} of the window lost: {:?}", k, p);
                }
            }
            // The newest backup's WAL and the live timeline's never go: recovery to the latest
            // point ends where it did.
            let latest = |bs: &[BackupSummary], w: &[ArchivedWal]| {
                planned(bs, w, RecoveryTarget::Latest, None).map(|p| p.end.last_segment)
            };
            prop_assert_eq!(latest(&kept, &wal).ok(), latest(&kept, &after_wal).ok());
        }
    }
}
