//! The rules of `pgpitr status`: [`Facts`] and thresholds in, one [`Check`] per concern out.
//! Pure, so that every rule is tested here.
//!
//! - an age over its threshold is a warning, over twice its threshold critical;
//! - no backup at all, no WAL archived at all, or a last verify or drill that failed: critical;
//! - never verified, never drilled, or backups none of which is restorable yet: warning;
//! - the overall level is the worst check's; [`Level::exit_code`] maps it to Nagios' 0/1/2.

use jiff::Timestamp;
use serde::Serialize;

use super::facts::Facts;

/// How bad a check is; ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Critical,
}

impl Level {
    /// The Nagios plugin convention: 0 OK, 1 WARNING, 2 CRITICAL (3, UNKNOWN, is a
    /// configuration error, decided before any check runs).
    pub fn exit_code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Critical => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
        }
    }
}

/// The age limits, in seconds (from the configuration: `max_backup_age`, `max_wal_age`,
/// `max_verify_age`, `max_drill_age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Thresholds {
    pub backup: u64,
    pub wal: u64,
    pub verify: u64,
    pub drill: u64,
}

/// The result of one rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// `backup`, `wal`, `window`, `repository`, `verify`, `drill`.
    pub name: &'static str,
    pub level: Level,
    /// What was found, one line.
    pub message: String,
    /// The age judged, in seconds, when the check judges one.
    pub age_seconds: Option<i64>,
    /// The threshold it was judged against, in seconds.
    pub threshold_seconds: Option<u64>,
    /// What to do, when the level is not OK.
    pub fix: Option<String>,
}

/// The worst level of `checks` (OK when there are none).
pub fn overall(checks: &[Check]) -> Level {
    checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok)
}

/// Warning past `threshold`, critical past twice it.
pub fn age_level(age_seconds: i64, threshold: u64) -> Level {
    let age = u64::try_from(age_seconds).unwrap_or(0);
    if age > threshold.saturating_mul(2) {
        Level::Critical
    } else if age > threshold {
        Level::Warning
    } else {
        Level::Ok
    }
}

fn age(now: Timestamp, then: Timestamp) -> i64 {
    (now - then).get_seconds().max(0)
}

/// `93784` → `1d 2h`; `125` → `2m 5s`: the two largest units.
pub fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

struct Aged<'a> {
    name: &'static str,
    what: String,
    age: i64,
    threshold: u64,
    fix: &'a str,
}

impl Aged<'_> {
    fn check(self) -> Check {
        let level = age_level(self.age, self.threshold);
        Check {
            name: self.name,
            level,
            message: format!(
                "{} {} ago (limit {})",
                self.what,
                human_age(self.age),
                human_age(i64::try_from(self.threshold).unwrap_or(i64::MAX))
            ),
            age_seconds: Some(self.age),
            threshold_seconds: Some(self.threshold),
            fix: (level != Level::Ok).then(|| self.fix.to_string()),
        }
    }
}

fn plain(name: &'static str, level: Level, message: String, fix: Option<&str>) -> Check {
    Check {
        name,
        level,
        message,
        age_seconds: None,
        threshold_seconds: None,
        fix: fix.map(str::to_string),
    }
}

/// Every check of `facts`, judged at `now`, in a fixed order.
pub fn evaluate(facts: &Facts, t: &Thresholds, now: Timestamp) -> Vec<Check> {
    let mut out = Vec::new();

    out.push(match facts.newest_backup() {
        None => plain(
            "backup",
            Level::Critical,
            "no backup in the repository".into(),
            Some("run `pgpitr backup` (and schedule it: see docs/operations.md)"),
        ),
        Some(b) => Aged {
            name: "backup",
            what: format!("newest backup {} finished", b.id),
            age: age(now, b.stop_time),
            threshold: t.backup,
            fix: "run `pgpitr backup`, and check the timer that runs it",
        }
        .check(),
    });

    out.push(match facts.newest_wal() {
        None => plain(
            "wal",
            Level::Critical,
            "no WAL archived".into(),
            Some("set archive_mode and archive_command (see `pgpitr init`), then run `pgpitr check`"),
        ),
        Some(w) => Aged {
            name: "wal",
            what: format!(
                "newest archived WAL {} (timeline {}) stored",
                w.file, w.timeline
            ),
            age: age(now, w.stored_at),
            threshold: t.wal,
            fix: "archiving is failing or the server is idle: look at pg_stat_archiver and PostgreSQL's log, run `pgpitr check`; set archive_timeout below max_wal_age",
        }
        .check(),
    });

    if facts.windows.is_empty() {
        if !facts.backups.is_empty() {
            out.push(plain(
                "window",
                Level::Warning,
                "no backup is restorable yet: some of its WAL is not archived".into(),
                Some("check archiving (`pgpitr list` shows the missing segment)"),
            ));
        }
    } else {
        for w in &facts.windows {
            let end = match w.end {
                Some(e) => time(e),
                None => "its end".into(),
            };
            // With older stretches (a WAL window, `keep_wal_within`), the window is the newest
            // and the older ones are named after it.
            let (start, older) = match w.ranges.split_last() {
                Some((newest, older)) if !older.is_empty() => (newest.start, older),
                _ => (w.start, &[][..]),
            };
            let mut message = format!(
                "timeline {}: recoverable from {} to {}",
                w.timeline,
                time(start),
                end
            );
            if !older.is_empty() {
                let earlier: Vec<String> = older
                    .iter()
                    .map(|r| match (r.point, r.end) {
                        (true, _) | (false, None) => time(r.start),
                        (false, Some(e)) => format!("{} to {}", time(r.start), time(e)),
                    })
                    .collect();
                message.push_str(&format!(
                    "; before that only at {} earlier moment(s) or stretch(es): {}",
                    older.len(),
                    earlier.join(", ")
                ));
            }
            out.push(plain("window", Level::Ok, message, None));
        }
    }

    out.push(plain(
        "repository",
        Level::Ok,
        format!(
            "{} bytes stored, {} bytes written in the last 7 days",
            facts.repository_bytes, facts.written_last_7d_bytes
        ),
        None,
    ));

    out.push(match &facts.verify {
        None => plain(
            "verify",
            Level::Warning,
            "never verified".into(),
            Some("run `pgpitr verify` (weekly, from a timer)"),
        ),
        Some(v) if !v.last.ok => plain(
            "verify",
            Level::Critical,
            format!(
                "last verify, {} ago, found {} problem(s)",
                human_age(age(now, v.last.finished_at)),
                v.last.problems
            ),
            Some("run `pgpitr verify` and repair what it reports"),
        ),
        Some(v) => Aged {
            name: "verify",
            what: "last verify passed".into(),
            age: age(now, v.last.finished_at),
            threshold: t.verify,
            fix: "run `pgpitr verify`, and check the timer that runs it",
        }
        .check(),
    });

    out.push(match &facts.drill {
        None => plain(
            "drill",
            Level::Warning,
            "never drilled".into(),
            Some("run `pgpitr drill` (monthly, from a timer)"),
        ),
        Some(d) if !d.last.ok => plain(
            "drill",
            Level::Critical,
            format!(
                "last drill, {} ago, failed{}: {}",
                human_age(age(now, d.last.finished_at)),
                d.last
                    .failed_step
                    .as_deref()
                    .map(|s| format!(" at step {s}"))
                    .unwrap_or_default(),
                d.last.message
            ),
            Some("run `pgpitr drill` and fix what it reports"),
        ),
        Some(d) => Aged {
            name: "drill",
            what: format!(
                "last drill (recovery time {:.0}s) passed",
                d.last.rto_seconds
            ),
            age: age(now, d.last.finished_at),
            threshold: t.drill,
            fix: "run `pgpitr drill`, and check the timer that runs it",
        }
        .check(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::facts::tests::at;
    use crate::monitor::facts::{BackupFact, RunFact, WalFact, WindowFact};
    use crate::pg::TimelineId;
    use crate::repo::manifest::BackupId;
    use crate::repo::runs::{DrillRun, VerifyRun};

    const H: u64 = 3600;
    const D: u64 = 86_400;
    const T: Thresholds = Thresholds {
        backup: 8 * D,
        wal: H,
        verify: 8 * D,
        drill: 35 * D,
    };

    fn now() -> Timestamp {
        at("2026-11-30T12:00:00Z")
    }

    fn ago(seconds: u64) -> Timestamp {
        now() - jiff::SignedDuration::from_secs(seconds as i64)
    }

    fn verify(ok: bool, seconds_ago: u64) -> RunFact<VerifyRun> {
        RunFact {
            last: VerifyRun {
                started_at: ago(seconds_ago + 60),
                finished_at: ago(seconds_ago),
                ok,
                problems: u64::from(!ok) * 3,
                warnings: 0,
                backups: 1,
                host: "db1".into(),
            },
            last_success: ok.then(|| ago(seconds_ago)),
        }
    }

    fn drill(ok: bool, seconds_ago: u64) -> RunFact<DrillRun> {
        RunFact {
            last: DrillRun {
                started_at: ago(seconds_ago + 60),
                finished_at: ago(seconds_ago),
                ok,
                failed_step: (!ok).then(|| "recovery".to_string()),
                message: if ok {
                    "reached"
                } else {
                    "recovery ended early"
                }
                .into(),
                backup_id: None,
                target: "latest".into(),
                reached: None,
                restore_seconds: 10.0,
                recovery_seconds: 32.0,
                rto_seconds: 42.0,
                host: "db1".into(),
            },
            last_success: ok.then(|| ago(seconds_ago)),
        }
    }

    /// A healthy repository: backup 1 day old, WAL 1 minute, verify 1 day, drill 7 days.
    fn healthy() -> Facts {
        Facts {
            scanned_at: now(),
            scan_seconds: 0.2,
            backups: vec![BackupFact {
                id: BackupId("20261129T120000Z".into()),
                start_time: ago(D + 100),
                stop_time: ago(D),
                size_bytes: 1 << 30,
            }],
            wal: vec![WalFact {
                timeline: TimelineId(1),
                file: "000000010000000000000042".into(),
                stored_at: ago(60),
            }],
            windows: vec![WindowFact {
                timeline: TimelineId(1),
                start: ago(D),
                start_backup: BackupId("20261129T120000Z".into()),
                end: Some(ago(60)),
                end_lsn: None,
                ranges: Vec::new(),
            }],
            repository_bytes: 5 << 30,
            written_last_7d_bytes: 1 << 30,
            verify: Some(verify(true, D)),
            drill: Some(drill(true, 7 * D)),
        }
    }

    fn level_of(facts: &Facts, name: &str) -> Level {
        let checks = evaluate(facts, &T, now());
        checks
            .iter()
            .filter(|c| c.name == name)
            .map(|c| c.level)
            .max()
            .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
    }

    #[test]
    fn a_wal_window_names_the_isolated_points_before_it() {
        use crate::monitor::facts::RangeFact;
        let range = |start: u64, end: u64, point: bool| RangeFact {
            start: ago(start),
            start_backup: BackupId("20261101T000000Z".into()),
            end: Some(ago(end)),
            end_lsn: crate::pg::Lsn(0x3000000),
            point,
        };
        let mut f = healthy();
        f.windows[0].ranges = vec![
            range(40 * D, 40 * D, true),
            range(30 * D, 29 * D, false),
            range(20 * D, 60, false),
        ];
        let checks = evaluate(&f, &T, now());
        let w = checks.iter().find(|c| c.name == "window").unwrap();
        assert_eq!(w.level, Level::Ok);
        assert_eq!(
            w.message,
            "timeline 1: recoverable from 2026-11-10 12:00:00 UTC to 2026-11-30 11:59:00 UTC; before that only at 2 earlier moment(s) or stretch(es): 2026-10-21 12:00:00 UTC, 2026-10-31 12:00:00 UTC to 2026-11-01 12:00:00 UTC"
        );
        // One range: the line as without a WAL window.
        f.windows[0].ranges.truncate(1);
        let checks = evaluate(&f, &T, now());
        let w = checks.iter().find(|c| c.name == "window").unwrap();
        assert!(!w.message.contains("before that"), "{}", w.message);
    }

    #[test]
    fn a_healthy_repository_is_ok_everywhere() {
        let checks = evaluate(&healthy(), &T, now());
        assert_eq!(overall(&checks), Level::Ok, "{checks:#?}");
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["backup", "wal", "window", "repository", "verify", "drill"]
        );
        assert!(checks.iter().all(|c| c.fix.is_none()));
        assert_eq!(checks[0].age_seconds, Some(D as i64));
        assert!(checks[0].message.contains("1d 0h ago"), "{:?}", checks[0]);
    }

    #[test]
    fn ages_warn_past_their_threshold_and_are_critical_past_twice_it() {
        // (age, threshold, level): at the threshold still OK, one second over a warning.
        for (age, threshold, want) in [
            (0, H, Level::Ok),
            (H as i64, H, Level::Ok),
            (H as i64 + 1, H, Level::Warning),
            (2 * H as i64, H, Level::Warning),
            (2 * H as i64 + 1, H, Level::Critical),
            (-5, H, Level::Ok), // a clock ahead of the storage's
        ] {
            assert_eq!(age_level(age, threshold), want, "age {age}");
        }
        let mut f = healthy();
        f.backups[0].stop_time = ago(9 * D);
        assert_eq!(level_of(&f, "backup"), Level::Warning);
        f.backups[0].stop_time = ago(17 * D);
        assert_eq!(level_of(&f, "backup"), Level::Critical);

        let mut f = healthy();
        f.wal[0].stored_at = ago(H + 60);
        assert_eq!(level_of(&f, "wal"), Level::Warning);
        f.wal[0].stored_at = ago(3 * H);
        assert_eq!(level_of(&f, "wal"), Level::Critical);
        let wal = &evaluate(&f, &T, now())[1];
        assert!(wal.fix.as_deref().unwrap().contains("pg_stat_archiver"));

        let mut f = healthy();
        f.verify = Some(verify(true, 9 * D));
        assert_eq!(level_of(&f, "verify"), Level::Warning);
        f.verify = Some(verify(true, 20 * D));
        assert_eq!(level_of(&f, "verify"), Level::Critical);

        let mut f = healthy();
        f.drill = Some(drill(true, 36 * D));
        assert_eq!(level_of(&f, "drill"), Level::Warning);
        f.drill = Some(drill(true, 71 * D));
        assert_eq!(level_of(&f, "drill"), Level::Critical);
        assert_eq!(overall(&evaluate(&f, &T, now())), Level::Critical);
    }

    #[test]
    fn missing_backups_and_wal_are_critical() {
        let mut f = healthy();
        f.backups.clear();
        f.windows.clear();
        let checks = evaluate(&f, &T, now());
        assert_eq!(checks[0].level, Level::Critical);
        assert!(checks[0].fix.as_deref().unwrap().contains("pgpitr backup"));
        assert_eq!(overall(&checks), Level::Critical);
        assert!(
            !checks.iter().any(|c| c.name == "window"),
            "no backup: no window line: {checks:#?}"
        );

        let mut f = healthy();
        f.wal.clear();
        assert_eq!(level_of(&f, "wal"), Level::Critical);
    }

    #[test]
    fn backups_without_a_window_warn() {
        let mut f = healthy();
        f.windows.clear();
        assert_eq!(level_of(&f, "window"), Level::Warning);
        assert_eq!(overall(&evaluate(&f, &T, now())), Level::Warning);
    }

    #[test]
    fn failed_runs_are_critical_and_missing_ones_warn() {
        let mut f = healthy();
        f.verify = Some(verify(false, 60));
        assert_eq!(level_of(&f, "verify"), Level::Critical);
        let v = evaluate(&f, &T, now())
            .into_iter()
            .find(|c| c.name == "verify")
            .unwrap();
        assert!(v.message.contains("3 problem(s)"), "{v:?}");

        let mut f = healthy();
        f.drill = Some(drill(false, 60));
        assert_eq!(level_of(&f, "drill"), Level::Critical);
        let d = evaluate(&f, &T, now())
            .into_iter()
            .find(|c| c.name == "drill")
            .unwrap();
        assert!(d.message.contains("at step recovery"), "{d:?}");

        let mut f = healthy();
        f.verify = None;
        f.drill = None;
        let checks = evaluate(&f, &T, now());
        assert_eq!(overall(&checks), Level::Warning);
        let fixes: Vec<&str> = checks.iter().filter_map(|c| c.fix.as_deref()).collect();
        assert_eq!(fixes.len(), 2, "{checks:#?}");
        assert!(fixes[0].contains("pgpitr verify") && fixes[1].contains("pgpitr drill"));
    }

    #[test]
    fn exit_codes_follow_nagios() {
        assert_eq!(Level::Ok.exit_code(), 0);
        assert_eq!(Level::Warning.exit_code(), 1);
        assert_eq!(Level::Critical.exit_code(), 2);
        assert_eq!(overall(&[]), Level::Ok);
        assert_eq!(human_age(0), "0s");
        assert_eq!(human_age(125), "2m 5s");
        assert_eq!(human_age(3 * 3600 + 120), "3h 2m");
        assert_eq!(human_age(93_784), "1d 2h");
    }
}
