//! The planner, table-driven: backup choice per target kind, WAL across timeline switches and
//! gaps, refusals, and what a plan reports.

// The test tables spell out their column types in place.
#![allow(clippy::type_complexity)]

use jiff::Timestamp;

use super::*;
use crate::pg::{TimelineHistory, WalFileName, WalSegSize};
use crate::recovery::target::{RecoveryTarget as T, TargetTimeline as TL};
use crate::repo::manifest::BackupId;
use crate::repo::wal::ArchivedWal;

pub(crate) const SEG: WalSegSize = WalSegSize::DEFAULT;
pub(crate) const B1: &str = "20261101T000000Z";
const B2: &str = "20261102T000000Z";
const B3: &str = "20261103T000000Z";

pub(crate) fn lsn(s: &str) -> Lsn {
    s.parse().unwrap()
}

/// A time on 2026-11-01, `hh:mm` UTC.
pub(crate) fn at(hhmm: &str) -> Timestamp {
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

/// Issue 19: a WAL window. B1 (segments 2-3) kept only its own WAL; WAL from B2's start (6)
/// through 0xA is continuous, with B3 (8-9) inside it.
fn windowed() -> PlanInput {
    input(
        vec![
            backup(B1, 1, "0/2000028", "0/3000100", "01:00"),
            backup(B2, 1, "0/6000028", "0/6000100", "02:00"),
            backup(B3, 1, "0/8000028", "0/9000100", "03:00"),
        ],
        vec![segs(1, 2, 3), segs(1, 6, 0xA)],
    )
}

fn spec(target: T) -> RecoveryTargetSpec {
    RecoveryTargetSpec {
        target,
        ..RecoveryTargetSpec::default()
    }
}

#[test]
fn a_window_is_a_list_of_ranges_with_isolated_points() {
    let i = windowed();
    let w = window::recoverable_windows(&i.backups, &i.wal, &i.histories, SEG);
    let r = &w[0].ranges;
    assert_eq!(r.len(), 2, "{r:#?}");
    assert!(r[0].point && r[0].ends_at_backup, "{:#?}", r[0]);
    assert_eq!(
        (r[0].from.backup.0.as_str(), r[0].end_lsn),
        (B1, lsn("0/4000000"))
    );
    assert!(!r[1].point && !r[1].ends_at_backup, "{:#?}", r[1]);
    let ids: Vec<&str> = r[1].backups.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(ids, vec![B2, B3]);
    assert_eq!(
        (r[1].last_backup_end.backup.0.as_str(), r[1].end_lsn),
        (B3, lsn("0/B000000"))
    );
    assert_eq!(w[0].continuous_from().unwrap().backup.0, B2);
    assert_eq!(w[0].older_ranges().len(), 1);
    // Without the gap, one range from B1.
    let full = input(i.backups.clone(), vec![segs(1, 2, 0xA)]);
    let w = window::recoverable_windows(&full.backups, &full.wal, &full.histories, SEG);
    assert_eq!(w[0].ranges.len(), 1);
    assert_eq!(w[0].continuous_from().unwrap().backup.0, B1);
    assert!(w[0].older_ranges().is_empty());
}

#[test]
fn a_target_between_two_ranges_is_refused_naming_the_nearest_moments() {
    let mut i = windowed();
    for target in [T::Lsn(lsn("0/5000000")), T::Time(at("01:30"))] {
        i.spec = spec(target.clone());
        let e = plan(&i).unwrap_err();
        let PlanError::TargetBetweenRanges { before, after, .. } = &e else {
            panic!("{target}: {e}");
        };
        assert!(before.contains(B1) && before.contains("0/3000100"), "{e}");
        assert!(after.contains(B2) && after.contains("0/6000100"), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("2026-11-01 01:00:00 UTC") && text.contains("2026-11-01 02:00:00 UTC"),
            "{text}"
        );
    }
    // The old backup's own consistent end stays reachable.
    i.spec = spec(T::Immediate);
    i.forced_backup = Some(BackupId(B1.into()));
    let p = plan(&i).unwrap();
    assert_eq!(
        (p.backup.id.0.as_str(), compact(&p.segments).as_str()),
        (B1, "1:2..3")
    );
    // Targets inside the continuous range plan as before.
    i.forced_backup = None;
    for (target, from) in [
        (T::Lsn(lsn("0/7000000")), B2),
        (T::Time(at("02:30")), B2),
        (T::Lsn(lsn("0/A000000")), B3),
        (T::Latest, B3),
    ] {
        i.spec = spec(target.clone());
        assert_eq!(plan(&i).unwrap().backup.id.0, from, "{target}");
    }
    // The end of the isolated point itself is reachable by time.
    i.spec = spec(T::Time(at("01:00")));
    assert_eq!(plan(&i).unwrap().backup.id.0, B1);
}

#[test]
fn a_gap_after_a_stretch_that_does_not_end_at_a_backup_is_named_by_lsn() {
    // B1's WAL runs on to segment 4 (its end time is not known): an LSN target in the gap is
    // refused naming lsn 0/5000000; a time target cannot be judged and plans, with the note.
    let mut i = windowed();
    i.wal.extend(segs(1, 4, 4));
    i.spec = spec(T::Lsn(lsn("0/5800000")));
    let e = plan(&i).unwrap_err();
    assert!(
        e.to_string()
            .contains("lsn 0/5000000 (the end of WAL segment 000000010000000000000004"),
        "{e}"
    );
    i.spec = spec(T::Time(at("01:30")));
    let p = plan(&i).unwrap();
    assert_eq!(p.backup.id.0, B1);
}
