//! What `pgpitr status` and `pgpitr metrics` know about a repository: [`Facts`], derived purely
//! from one listing of the whole repository (every object's key, size and storage time), the
//! backups' manifests, the timeline histories and the last run records. No I/O here:
//! [`super::scan`] gathers the inputs, [`Facts::derive`] turns them into facts, and
//! [`super::checks`] and [`super::metrics`] read them.
//!
//! Times of WAL come from the storage (a local file's mtime, S3's `Last-Modified`): the moment
//! an object was stored is what the repository can prove about archiving, whatever the clocks
//! of the database hosts say.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use crate::pg::{Lsn, TimelineHistory, TimelineId, WalFileName, WalSegSize, WalSegmentName};
use crate::recovery::{recoverable_windows, BackupSummary};
use crate::repo::layout;
use crate::repo::manifest::BackupId;
use crate::repo::runs::{DrillRun, LastRuns, VerifyRun};
use crate::repo::wal::ArchivedWal;
use crate::storage::ObjectMeta;

/// Seconds in the "written lately" period of [`Facts::written_last_7d_bytes`].
pub const WRITTEN_PERIOD_SECONDS: i64 = 7 * 86_400;

/// Everything `status` judges and `metrics` exports, as of [`Facts::scanned_at`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Facts {
    /// When the scan started (this host's clock).
    pub scanned_at: Timestamp,
    /// How long the scan took, in seconds.
    pub scan_seconds: f64,
    /// Committed backups, oldest first (by stop time).
    pub backups: Vec<BackupFact>,
    /// The newest archived WAL object of each timeline, by timeline.
    pub wal: Vec<WalFact>,
    /// The recoverable window of each timeline that has one, by timeline.
    pub windows: Vec<WindowFact>,
    /// The sum of the sizes of every object in the repository, in bytes.
    pub repository_bytes: u64,
    /// The sum of the sizes of the objects stored within the last 7 days, in bytes.
    pub written_last_7d_bytes: u64,
    /// The last `pgpitr verify` of the whole repository; `None` when none was recorded.
    pub verify: Option<RunFact<VerifyRun>>,
    /// The last `pgpitr drill`; `None` when none was recorded.
    pub drill: Option<RunFact<DrillRun>>,
}

/// One committed backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupFact {
    pub id: BackupId,
    pub start_time: Timestamp,
    pub stop_time: Timestamp,
    /// Total plain size of the backup's files, in bytes.
    pub size_bytes: u64,
}

impl BackupFact {
    /// Seconds from start to stop.
    pub fn duration_seconds(&self) -> f64 {
        (self.stop_time - self.start_time)
            .total(jiff::Unit::Second)
            .unwrap_or(0.0)
            .max(0.0)
    }
}

/// The newest WAL object of one timeline (segments, `.partial` and `.backup` files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalFact {
    pub timeline: TimelineId,
    /// Its WAL file name.
    pub file: String,
    /// When the storage stored it.
    pub stored_at: Timestamp,
}

/// What can be recovered on one timeline's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowFact {
    pub timeline: TimelineId,
    /// The earliest reachable moment: the stop time of the oldest restorable backup.
    pub start: Timestamp,
    /// That backup.
    pub start_backup: BackupId,
    /// The storage time of the last segment archived without a gap after the newest
    /// restorable backup (replay reaches everything committed before that segment was
    /// stored), and never before `start`. `None` when the backend lists no storage times.
    pub end: Option<Timestamp>,
    /// The first LSN after that segment.
    pub end_lsn: Option<Lsn>,
    /// The stretches recoverable without a gap, oldest first ([`crate::recovery::window`]):
    /// one for a continuous window; with a WAL window (`keep_wal_within`) or lost WAL, the
    /// window (last) after isolated points and older stretches.
    pub ranges: Vec<RangeFact>,
}

/// One stretch of a history recoverable without a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RangeFact {
    /// Its earliest moment: the stop time of its oldest backup.
    pub start: Timestamp,
    pub start_backup: BackupId,
    /// Its latest moment: the newest backup's stop time when its WAL ends there, else the
    /// storage time of its last segment (never before `start`); `None` when the backend lists
    /// no storage times.
    pub end: Option<Timestamp>,
    /// The first LSN after its last segment.
    pub end_lsn: Lsn,
    /// Only a backup's consistent end (its own WAL alone is archived).
    pub point: bool,
}

/// The last recorded run of a kind and when one last passed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunFact<T> {
    pub last: T,
    /// When the last run that passed ended; `None` when none passed (of those kept).
    pub last_success: Option<Timestamp>,
}

/// What [`Facts::derive`] reads.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Every object of the repository.
    pub objects: Vec<ObjectMeta>,
    /// The committed backups.
    pub backups: Vec<BackupSummary>,
    /// The parsed `.history` files.
    pub histories: Vec<TimelineHistory>,
    pub wal_segment_size: WalSegSize,
    pub verify: Option<LastRuns<VerifyRun>>,
    pub drill: Option<LastRuns<DrillRun>>,
}

impl Facts {
    /// The facts of a repository scanned at `scanned_at` in `scan_seconds`.
    pub fn derive(inputs: &Inputs, scanned_at: Timestamp, scan_seconds: f64) -> Facts {
        let wal = archived(&inputs.objects);
        let stored: BTreeMap<&str, Timestamp> = inputs
            .objects
            .iter()
            .filter_map(|o| Some((o.key.as_str(), o.modified?)))
            .collect();

        let mut backups: Vec<BackupFact> = inputs
            .backups
            .iter()
            .map(|b| BackupFact {
                id: b.id.clone(),
                start_time: b.start_time,
                stop_time: b.stop_time,
                size_bytes: b.size_bytes,
            })
            .collect();
        backups.sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));

        let mut newest: BTreeMap<TimelineId, WalFact> = BTreeMap::new();
        for w in &wal {
            let (Some(seg), Some(&at)) = (w.name.segment(), stored.get(w.key.as_str())) else {
                continue;
            };
            let fact = WalFact {
                timeline: seg.timeline,
                file: w.name.to_string(),
                stored_at: at,
            };
            match newest.get(&seg.timeline) {
                Some(old) if (old.stored_at, &old.file) >= (at, &fact.file) => {}
                _ => {
                    newest.insert(seg.timeline, fact);
                }
            }
        }

        let seg_size = inputs.wal_segment_size;
        let segment_stored = |s: WalSegmentName| -> Option<Timestamp> {
            wal.iter()
                .filter(|w| w.name == WalFileName::Segment(s))
                .filter_map(|w| stored.get(w.key.as_str()).copied())
                .max()
        };
        let windows = recoverable_windows(&inputs.backups, &wal, &inputs.histories, seg_size)
            .into_iter()
            .filter_map(|w| {
                let start = w.earliest?;
                Some(WindowFact {
                    timeline: w.timeline,
                    start: start.time,
                    start_backup: start.backup,
                    // Never before the start: the backup's own end is reachable, even when its
                    // last segment was stored before the backup wrote its stop time.
                    end: w
                        .latest
                        .as_ref()
                        .and_then(|l| segment_stored(l.last_segment))
                        .map(|e| e.max(start.time)),
                    end_lsn: w.latest.as_ref().map(|l| l.end_lsn),
                    ranges: w
                        .ranges
                        .iter()
                        .map(|r| RangeFact {
                            start: r.from.time,
                            start_backup: r.from.backup.clone(),
                            end: if r.ends_at_backup {
                                Some(r.last_backup_end.time)
                            } else {
                                segment_stored(r.last_segment).map(|e| e.max(r.from.time))
                            },
                            end_lsn: r.end_lsn,
                            point: r.point,
                        })
                        .collect(),
                })
            })
            .collect();

        let since = scanned_at
            .checked_sub(jiff::SignedDuration::from_secs(WRITTEN_PERIOD_SECONDS))
            .unwrap_or(Timestamp::MIN);
        let written_last_7d_bytes = inputs
            .objects
            .iter()
            .filter(|o| o.modified.is_some_and(|m| m >= since))
            .map(|o| o.size)
            .sum();

        Facts {
            scanned_at,
            scan_seconds,
            backups,
            wal: newest.into_values().collect(),
            windows,
            repository_bytes: inputs.objects.iter().map(|o| o.size).sum(),
            written_last_7d_bytes,
            verify: inputs.verify.clone().and_then(run_fact),
            drill: inputs.drill.clone().and_then(run_fact),
        }
    }

    /// The newest backup (by stop time).
    pub fn newest_backup(&self) -> Option<&BackupFact> {
        self.backups.last()
    }

    /// The newest WAL object of any timeline.
    pub fn newest_wal(&self) -> Option<&WalFact> {
        self.wal
            .iter()
            .max_by(|a, b| (a.stored_at, a.timeline).cmp(&(b.stored_at, b.timeline)))
    }
}

fn run_fact<T: crate::repo::runs::RunRecord>(runs: LastRuns<T>) -> Option<RunFact<T>> {
    let last_success = runs.last_ok.as_ref().map(|r| r.finished_at());
    Some(RunFact {
        last: runs.last?,
        last_success,
    })
}

/// The WAL objects among `objects`, sorted like `repo::wal::list` sorts them.
pub fn archived(objects: &[ObjectMeta]) -> Vec<ArchivedWal> {
    let mut out: Vec<ArchivedWal> = objects
        .iter()
        .filter_map(|o| {
            layout::parse_wal_object_key(&o.key).map(|(name, content_id)| ArchivedWal {
                name,
                content_id,
                key: o.key.clone(),
                size: o.size,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.key.cmp(&b.key)));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SEG: WalSegSize = WalSegSize::DEFAULT;

    pub(crate) fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    pub(crate) fn wal_object(name: &str, size: u64, stored: &str) -> ObjectMeta {
        let name: WalFileName = name.parse().unwrap();
        ObjectMeta {
            key: layout::wal_object_key(name, &"a".repeat(64)),
            size,
            modified: Some(at(stored)),
        }
    }

    pub(crate) fn backup(id: &str, start: &str, stop: &str, stop_time: &str) -> BackupSummary {
        BackupSummary {
            id: BackupId(id.to_string()),
            label: String::new(),
            start_lsn: start.parse().unwrap(),
            start_timeline: TimelineId(1),
            stop_lsn: stop.parse().unwrap(),
            stop_timeline: TimelineId(1),
            start_time: at(stop_time) - jiff::SignedDuration::from_secs(90),
            stop_time: at(stop_time),
            stop_next_xid: None,
            wal_segment_size: SEG,
            size_bytes: 1000,
        }
    }

    #[test]
    fn facts_from_a_listing() {
        let objects = vec![
            ObjectMeta {
                key: "repo.json".into(),
                size: 10,
                modified: Some(at("2026-10-01T00:00:00Z")),
            },
            wal_object("000000010000000000000002", 100, "2026-11-01T00:10:00Z"),
            wal_object("000000010000000000000003", 100, "2026-11-09T00:20:00Z"),
            wal_object("000000010000000000000004", 100, "2026-11-09T00:30:00Z"),
            // Not a segment: counts for the newest WAL, never for the window.
            wal_object(
                "000000010000000000000005.partial",
                7,
                "2026-11-09T00:40:00Z",
            ),
            wal_object("000000020000000000000004", 50, "2026-11-09T00:35:00Z"),
            wal_object("00000002.history", 1, "2026-11-09T00:33:00Z"),
        ];
        let inputs = Inputs {
            objects,
            backups: vec![backup(
                "20261101T000000Z",
                "0/2000028",
                "0/3000100",
                "2026-11-01T01:00:00Z",
            )],
            histories: vec![TimelineHistory::parse(TimelineId(2), "1\t0/4000028\tx\n").unwrap()],
            wal_segment_size: SEG,
            verify: Some(LastRuns {
                last: None,
                last_ok: None,
            }),
            drill: None,
        };
        let now = at("2026-11-10T00:00:00Z");
        let f = Facts::derive(&inputs, now, 0.5);
        assert_eq!(f.repository_bytes, 10 + 300 + 7 + 50 + 1);
        // Everything but repo.json and segment 2 (stored 9 days before).
        assert_eq!(f.written_last_7d_bytes, 200 + 7 + 50 + 1);
        assert_eq!(f.backups.len(), 1);
        assert_eq!(f.backups[0].duration_seconds(), 90.0);
        let wal: Vec<(u32, &str, Timestamp)> = f
            .wal
            .iter()
            .map(|w| (w.timeline.0, w.file.as_str(), w.stored_at))
            .collect();
        assert_eq!(
            wal,
            vec![
                (
                    1,
                    "000000010000000000000005.partial",
                    at("2026-11-09T00:40:00Z")
                ),
                (2, "000000020000000000000004", at("2026-11-09T00:35:00Z")),
            ]
        );
        assert_eq!(f.newest_wal().unwrap().timeline, TimelineId(1));
        let windows: Vec<(u32, Option<Timestamp>, Option<String>)> = f
            .windows
            .iter()
            .map(|w| (w.timeline.0, w.end, w.end_lsn.map(|l| l.to_string())))
            .collect();
        assert_eq!(
            windows,
            vec![
                (
                    1,
                    Some(at("2026-11-09T00:30:00Z")),
                    Some("0/5000000".into())
                ),
                (
                    2,
                    Some(at("2026-11-09T00:35:00Z")),
                    Some("0/5000000".into())
                ),
            ]
        );
        assert!(f
            .windows
            .iter()
            .all(|w| w.start == at("2026-11-01T01:00:00Z")));
        assert_eq!(f.verify, None, "no record: no fact");

        // A backup whose last segment was stored before its stop time: the window is that one
        // point, never an end before its start.
        let mut early = inputs.clone();
        early.histories.clear();
        early.objects.truncate(3); // repo.json, segments 2 and 3
        early.backups[0].stop_time = at("2026-11-09T00:21:00Z");
        let f = Facts::derive(&early, now, 0.5);
        assert_eq!(f.windows.len(), 1);
        assert_eq!(f.windows[0].end, Some(f.windows[0].start));
        assert_eq!(f.drill, None);
    }

    #[test]
    fn an_empty_repository_has_no_facts_but_its_size() {
        let inputs = Inputs {
            objects: vec![ObjectMeta {
                key: "repo.json".into(),
                size: 10,
                modified: None,
            }],
            backups: Vec::new(),
            histories: Vec::new(),
            wal_segment_size: SEG,
            verify: None,
            drill: None,
        };
        let f = Facts::derive(&inputs, at("2026-11-10T00:00:00Z"), 0.1);
        assert_eq!((f.repository_bytes, f.written_last_7d_bytes), (10, 0));
        assert!(f.backups.is_empty() && f.wal.is_empty() && f.windows.is_empty());
        assert!(f.newest_backup().is_none() && f.newest_wal().is_none());
    }
}
