//! What the repository can recover, for `pgpitr list`: per timeline, the archived WAL segments
//! (first, last, gaps) and the recoverable window — from the end of the oldest restorable backup
//! to the end of the WAL archived without a gap after the newest one — and, inside it, the
//! ranges that are recoverable without a gap ([`RecoverableRange`]): with a WAL window
//! (`keep_wal_within`, [`crate::retention::window`]) or after lost WAL, a continuous range plus
//! isolated points (backups whose own WAL alone is kept, restorable to their consistent end).
//! Pure: computed from the same inputs as the planner, with the same rules (a backup counts
//! only on the histories that hold it, segments are read as PostgreSQL reads them across
//! timeline switches, `.partial` files never count).

use jiff::Timestamp;
use serde::Serialize;

use super::input::BackupSummary;
use super::timelines::{Branch, Timelines};
use super::wal_index::{walk, WalIndex};
use crate::pg::{Lsn, TimelineHistory, TimelineId, WalFileName, WalSegSize, WalSegmentName};
use crate::recovery::display_serde;
use crate::repo::manifest::BackupId;
use crate::repo::wal::ArchivedWal;

/// The archived segments of one timeline, by file name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineWal {
    pub timeline: TimelineId,
    #[serde(serialize_with = "display_serde::one")]
    pub first: WalSegmentName,
    /// The last segment of the run that starts at `first`.
    #[serde(serialize_with = "display_serde::one")]
    pub last_contiguous: WalSegmentName,
    #[serde(serialize_with = "display_serde::one")]
    pub last: WalSegmentName,
    /// Number of archived segments (each name once).
    pub segments: u64,
    /// Compressed bytes of those segments in the repository.
    pub bytes: u64,
    /// Runs of missing segments between `first` and `last`, in order.
    pub gaps: Vec<WalGap>,
}

/// Segments `first_missing..=last_missing` of one timeline are not archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalGap {
    #[serde(serialize_with = "display_serde::one")]
    pub first_missing: WalSegmentName,
    #[serde(serialize_with = "display_serde::one")]
    pub last_missing: WalSegmentName,
    pub count: u64,
}

/// The archived WAL per timeline (complete segments only; `.partial`, `.history` and `.backup`
/// files are ignored), ordered by timeline.
pub fn archived_wal_ranges(wal: &[ArchivedWal], seg_size: WalSegSize) -> Vec<TimelineWal> {
    let mut segs: Vec<(WalSegmentName, u64)> = wal
        .iter()
        .filter_map(|w| match w.name {
            WalFileName::Segment(s) => Some((s, w.size)),
            _ => None,
        })
        .collect();
    segs.sort_by_key(|(s, _)| (s.timeline, s.segno(seg_size)));
    let mut out: Vec<TimelineWal> = Vec::new();
    for (s, size) in segs {
        match out.last_mut() {
            Some(t) if t.timeline == s.timeline => {
                t.bytes += size;
                let (prev, cur) = (t.last.segno(seg_size), s.segno(seg_size));
                if cur == prev {
                    continue; // another stored version of the same segment
                }
                if cur > prev + 1 {
                    t.gaps.push(WalGap {
                        first_missing: t.last.next(seg_size),
                        last_missing: WalSegmentName::from_segno(s.timeline, cur - 1, seg_size),
                        count: cur - prev - 1,
                    });
                }
                if t.gaps.is_empty() {
                    t.last_contiguous = s;
                }
                t.last = s;
                t.segments += 1;
            }
            _ => out.push(TimelineWal {
                timeline: s.timeline,
                first: s,
                last_contiguous: s,
                last: s,
                segments: 1,
                bytes: size,
                gaps: Vec::new(),
            }),
        }
    }
    out
}

/// What can be recovered on the history of one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoverableWindow {
    pub timeline: TimelineId,
    /// The earliest reachable point: the end of the oldest restorable backup. `None` when no
    /// backup on this history is restorable.
    pub earliest: Option<WindowStart>,
    /// The latest reachable point: the end of the WAL archived without a gap from the newest
    /// restorable backup's start.
    pub latest: Option<WindowEnd>,
    /// Backups on this history whose own WAL (start through stop segment) is archived, oldest
    /// first.
    pub restorable: Vec<BackupId>,
    /// Backups on this history whose own WAL is not all archived (yet), oldest first.
    pub incomplete: Vec<IncompleteBackup>,
    /// The stretches recoverable without a gap, by position along the history (oldest first);
    /// between two of them nothing is recoverable. Empty when no backup is restorable.
    pub ranges: Vec<RecoverableRange>,
}

/// A stretch of one history recoverable without a gap: from the end of its oldest restorable
/// backup (by position) to the end of the WAL archived without a gap from that backup's start.
/// Every moment in it is reachable from one of its backups; nothing between it and the next
/// range is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoverableRange {
    /// The earliest reachable moment: the end of the range's oldest backup.
    pub from: WindowStart,
    /// The end of the range's newest backup (the same as `from` for one backup): everything up
    /// to it is reachable, by time as well as by LSN.
    pub last_backup_end: WindowStart,
    /// The restorable backups that end in the range, by position.
    pub backups: Vec<BackupId>,
    /// The last segment of the range's WAL.
    #[serde(serialize_with = "display_serde::one")]
    pub last_segment: WalSegmentName,
    /// The first LSN after `last_segment`: replay cannot go beyond it.
    pub end_lsn: Lsn,
    /// The segment after `last_segment`, which the archive lacks.
    #[serde(serialize_with = "display_serde::one")]
    pub first_missing: WalSegmentName,
    /// The WAL ends in the stop segment of the newest backup: nothing after `last_backup_end`
    /// is reachable (its time is the range's end).
    pub ends_at_backup: bool,
    /// One backup and only its own WAL: the range is its consistent end alone, reachable with
    /// `--backup ID --target immediate`.
    pub point: bool,
}

impl RecoverableRange {
    /// The earliest reachable moment, for messages: `<time> (lsn <lsn>, the end of backup <id>)`.
    pub fn describe_from(&self) -> String {
        describe_end_of(&self.from)
    }

    /// The latest reachable moment, for messages: the newest backup's end when the WAL stops
    /// there, else the end of the archived WAL (by LSN: the archive keeps no commit times).
    pub fn describe_to(&self) -> String {
        if self.ends_at_backup {
            describe_end_of(&self.last_backup_end)
        } else {
            format!(
                "lsn {} (the end of WAL segment {}, the last archived without a gap)",
                self.end_lsn, self.last_segment
            )
        }
    }
}

fn describe_end_of(w: &WindowStart) -> String {
    format!(
        "{} (lsn {}, the end of backup {})",
        w.time.strftime("%Y-%m-%d %H:%M:%S UTC"),
        w.lsn,
        w.backup
    )
}

/// Where a target lies between two ranges of a window: the range before it and the one after.
#[derive(Debug, Clone, Copy)]
pub struct Between<'a> {
    pub before: &'a RecoverableRange,
    pub after: &'a RecoverableRange,
}

impl RecoverableWindow {
    /// Where the continuous window starts: the first reachable moment of the newest range (the
    /// end of the oldest restorable backup when there are no ranges, or one).
    pub fn continuous_from(&self) -> Option<&WindowStart> {
        match self.ranges.split_last() {
            Some((newest, older)) if !older.is_empty() => Some(&newest.from),
            _ => self.earliest.as_ref(),
        }
    }

    /// The ranges before the newest one, oldest first: isolated points and older stretches,
    /// each followed by a gap.
    pub fn older_ranges(&self) -> &[RecoverableRange] {
        self.ranges.split_last().map_or(&[], |(_, older)| older)
    }

    /// The ranges around `lsn` when it lies after the WAL of one range and before the first
    /// reachable point of the next; `None` when it lies inside a range, before the first or
    /// after the last.
    pub fn between_at_lsn(&self, lsn: Lsn) -> Option<Between<'_>> {
        self.ranges.windows(2).find_map(|pair| {
            (pair[0].end_lsn <= lsn && lsn < pair[1].from.lsn).then_some(Between {
                before: &pair[0],
                after: &pair[1],
            })
        })
    }

    /// The ranges around time `t` when it lies after the end of a range whose WAL ends at its
    /// newest backup (so its last moment is known by time) and before the first reachable
    /// point of the next. A backup taken on a primary ends its stop segment with a WAL switch
    /// right after its stop (`do_pg_backup_stop`, xlog.c), so nothing later lies in that
    /// segment; after a backup taken on a standby the rest of the segment is reachable by LSN
    /// (`--target-lsn`) only. A range that ends elsewhere ends at an LSN whose time the archive
    /// does not know: `None` then, as inside a range, before the first or after the last.
    pub fn between_at_time(&self, t: Timestamp) -> Option<Between<'_>> {
        self.ranges.windows(2).find_map(|pair| {
            (pair[0].ends_at_backup && pair[0].last_backup_end.time < t && t < pair[1].from.time)
                .then_some(Between {
                    before: &pair[0],
                    after: &pair[1],
                })
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowStart {
    pub backup: BackupId,
    pub time: Timestamp,
    pub lsn: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowEnd {
    /// The backup the WAL was followed from.
    pub backup: BackupId,
    #[serde(serialize_with = "display_serde::one")]
    pub last_segment: WalSegmentName,
    /// The first LSN after `last_segment` (replay ends somewhere before it).
    pub end_lsn: Lsn,
    /// The segment after `last_segment`, which the archive lacks.
    #[serde(serialize_with = "display_serde::one")]
    pub first_missing: WalSegmentName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IncompleteBackup {
    pub backup: BackupId,
    /// The first segment of the backup's own WAL that is not archived.
    #[serde(serialize_with = "display_serde::one")]
    pub missing: WalSegmentName,
}

/// The recoverable window of every timeline whose history is known (timeline 1 and each parsed
/// `.history`), ordered by timeline. Backups with another WAL segment size are ignored.
pub fn recoverable_windows(
    backups: &[BackupSummary],
    wal: &[ArchivedWal],
    histories: &[TimelineHistory],
    seg_size: WalSegSize,
) -> Vec<RecoverableWindow> {
    let index = WalIndex::new(wal);
    Timelines::new(histories)
        .all()
        .map(|branch| window_on(branch, backups, &index, seg_size))
        .collect()
}

pub(crate) fn window_on(
    branch: &Branch,
    backups: &[BackupSummary],
    index: &WalIndex<'_>,
    seg_size: WalSegSize,
) -> RecoverableWindow {
    let mut on: Vec<&BackupSummary> = backups
        .iter()
        .filter(|b| b.wal_segment_size == seg_size && branch.holds_backup(b).is_ok())
        .collect();
    on.sort_by_key(|b| (b.stop_time, b.stop_lsn, b.id.clone()));
    let mut restorable: Vec<&BackupSummary> = Vec::new();
    let mut incomplete = Vec::new();
    for b in on {
        let own = walk(
            branch,
            index,
            seg_size,
            b.start_lsn.segno(seg_size),
            Some(b.stop_lsn.segno(seg_size)),
        );
        match own.first_missing {
            None => restorable.push(b),
            Some(missing) => incomplete.push(IncompleteBackup {
                backup: b.id.clone(),
                missing,
            }),
        }
    }
    let earliest = restorable.first().map(|b| WindowStart {
        backup: b.id.clone(),
        time: b.stop_time,
        lsn: b.stop_lsn,
    });
    let latest = restorable.last().and_then(|b| {
        let all = walk(branch, index, seg_size, b.start_lsn.segno(seg_size), None);
        let last = *all.segments.last()?;
        Some(WindowEnd {
            backup: b.id.clone(),
            last_segment: last,
            end_lsn: last.next(seg_size).start_lsn(seg_size),
            first_missing: all.first_missing?,
        })
    });
    RecoverableWindow {
        timeline: branch.timeline(),
        earliest,
        latest,
        ranges: ranges(branch, &restorable, index, seg_size),
        restorable: restorable.iter().map(|b| b.id.clone()).collect(),
        incomplete,
    }
}

/// The ranges of `restorable` (backups on `branch` whose own WAL is archived along it): by
/// position, a backup joins the range before it when it ends inside that range's WAL (its WAL
/// then ends where the range's does), else it opens a new range.
fn ranges(
    branch: &Branch,
    restorable: &[&BackupSummary],
    index: &WalIndex<'_>,
    seg_size: WalSegSize,
) -> Vec<RecoverableRange> {
    let mut by_position = restorable.to_vec();
    by_position.sort_by_key(|b| (b.stop_lsn, b.stop_time, b.id.clone()));
    let end_of = |b: &BackupSummary| WindowStart {
        backup: b.id.clone(),
        time: b.stop_time,
        lsn: b.stop_lsn,
    };
    let mut out: Vec<RecoverableRange> = Vec::new();
    for b in by_position {
        let stop = b.stop_lsn.segno(seg_size);
        if let Some(r) = out
            .last_mut()
            .filter(|r| stop < r.first_missing.segno(seg_size))
        {
            r.backups.push(b.id.clone());
            r.last_backup_end = end_of(b);
            r.ends_at_backup = r.last_segment.segno(seg_size) == stop;
            r.point = false;
            continue;
        }
        let all = walk(branch, index, seg_size, b.start_lsn.segno(seg_size), None);
        let last = all
            .segments
            .last()
            .expect("a restorable backup's own WAL is archived");
        let first_missing = all
            .first_missing
            .expect("a walk without a bound ends at a missing segment");
        let ends_at_backup = last.segno(seg_size) == stop;
        out.push(RecoverableRange {
            from: end_of(b),
            last_backup_end: end_of(b),
            backups: vec![b.id.clone()],
            last_segment: *last,
            end_lsn: last.next(seg_size).start_lsn(seg_size),
            first_missing,
            ends_at_backup,
            point: ends_at_backup,
        });
    }
    out
}

#[cfg(test)]
// The test tables spell out their column types in place.
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    const SEG: WalSegSize = WalSegSize::DEFAULT;

    fn file(name: &str, sha: char) -> ArchivedWal {
        ArchivedWal {
            name: name.parse().unwrap(),
            content_id: sha.to_string().repeat(64),
            key: format!("wal/{name}"),
            size: 100,
        }
    }

    fn segs(tli: u32, from: u64, to: u64) -> Vec<ArchivedWal> {
        (from..=to)
            .map(|n| {
                let s = WalSegmentName::from_segno(TimelineId(tli), n, SEG);
                file(&s.to_string(), 'a')
            })
            .collect()
    }

    fn seg(tli: u32, n: u64) -> WalSegmentName {
        WalSegmentName::from_segno(TimelineId(tli), n, SEG)
    }

    fn backup(id: &str, start: &str, stop: &str, stop_time: &str) -> BackupSummary {
        let stop_time: Timestamp = format!("2026-11-01T{stop_time}:00Z").parse().unwrap();
        BackupSummary {
            id: BackupId(id.to_string()),
            label: String::new(),
            start_lsn: start.parse().unwrap(),
            start_timeline: TimelineId(1),
            stop_lsn: stop.parse().unwrap(),
            stop_timeline: TimelineId(1),
            start_time: stop_time,
            stop_time,
            stop_next_xid: None,
            wal_segment_size: SEG,
            size_bytes: 0,
        }
    }

    #[test]
    fn archived_ranges_per_timeline_with_gaps() {
        let wal: Vec<ArchivedWal> = [
            segs(1, 1, 3),
            segs(1, 5, 5),
            segs(1, 8, 9),
            segs(2, 5, 6),
            vec![
                file("000000010000000000000002", 'b'), // a second version: counted once
                file("000000010000000000000004.partial", 'a'),
                file("00000002.history", 'a'),
                file("000000010000000000000002.00000028.backup", 'a'),
            ],
        ]
        .concat();
        let gap = |tli, a, b, count| WalGap {
            first_missing: seg(tli, a),
            last_missing: seg(tli, b),
            count,
        };
        #[rustfmt::skip]
        let want = vec![
            TimelineWal { timeline: TimelineId(1), first: seg(1, 1), last_contiguous: seg(1, 3), last: seg(1, 9),
                          segments: 6, bytes: 700, gaps: vec![gap(1, 4, 4, 1), gap(1, 6, 7, 2)] },
            TimelineWal { timeline: TimelineId(2), first: seg(2, 5), last_contiguous: seg(2, 6), last: seg(2, 6),
                          segments: 2, bytes: 200, gaps: vec![] },
        ];
        assert_eq!(archived_wal_ranges(&wal, SEG), want);
        assert!(archived_wal_ranges(&[], SEG).is_empty());
    }

    #[test]
    fn recoverable_window_per_timeline() {
        // Timeline 2 left timeline 1 at 0/5000028; timeline 3 left it at 0/1800000, before any
        // backup. B2 was taken on timeline 1 after the switch, and its segment 6 is missing.
        let backups = vec![
            backup("20261101T000000Z", "0/2000028", "0/3000100", "01:00"),
            backup("20261102T000000Z", "0/6000028", "0/7000100", "02:00"),
        ];
        let wal = [segs(1, 2, 5), segs(1, 7, 8), segs(2, 5, 9)].concat();
        let histories = vec![
            TimelineHistory::parse(TimelineId(2), "1\t0/5000028\tx\n").unwrap(),
            TimelineHistory::parse(TimelineId(3), "1\t0/1800000\tx\n").unwrap(),
        ];
        let windows = recoverable_windows(&backups, &wal, &histories, SEG);
        #[rustfmt::skip]
        let want: Vec<(u32, Option<&str>, Option<(&str, &str, &str)>, Vec<&str>, Vec<(&str, &str)>)> = vec![
            // timeline, earliest end,          latest (last segment, end lsn, first missing),                                       restorable,              incomplete (backup, missing)
            (1, Some("2026-11-01T01:00:00Z"), Some(("000000010000000000000005", "0/6000000", "000000010000000000000006")), vec!["20261101T000000Z"], vec![("20261102T000000Z", "000000010000000000000006")]),
            (2, Some("2026-11-01T01:00:00Z"), Some(("000000020000000000000009", "0/A000000", "00000002000000000000000A")), vec!["20261101T000000Z"], vec![]),
            (3, None,                         None,                                                                        vec![],                   vec![]),
        ];
        assert_eq!(windows.len(), want.len());
        for (w, (tli, earliest, latest, restorable, incomplete)) in windows.iter().zip(want) {
            assert_eq!(w.timeline, TimelineId(tli));
            assert_eq!(
                w.earliest.as_ref().map(|e| e.time.to_string()).as_deref(),
                earliest,
                "timeline {tli}"
            );
            let got_latest = w.latest.as_ref().map(|l| {
                (
                    l.last_segment.to_string(),
                    l.end_lsn.to_string(),
                    l.first_missing.to_string(),
                )
            });
            let want_latest = latest.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
            assert_eq!(got_latest, want_latest, "timeline {tli}");
            let ids: Vec<&str> = w.restorable.iter().map(|b| b.0.as_str()).collect();
            assert_eq!(ids, restorable, "timeline {tli}");
            let inc: Vec<(String, String)> = w
                .incomplete
                .iter()
                .map(|i| (i.backup.0.clone(), i.missing.to_string()))
                .collect();
            let want_inc: Vec<(String, String)> = incomplete
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(inc, want_inc, "timeline {tli}");
        }
    }
}
