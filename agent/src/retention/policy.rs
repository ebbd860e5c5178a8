//! Which backups a retention policy keeps: a pure function of the backups (id, stop time, `keep`
//! flag, whether their own WAL is archived), the policy and the current time.
//!
//! Rules, in this order; a backup is kept when any of them keeps it (the union):
//! - `keep: true` in its manifest (`pgpitr backup --keep`, `pgpitr expire --keep ID`);
//! - the newest backup, always, and the newest restorable one (so that a policy like
//!   `--keep-last 1` never trades the last restorable backup for one whose WAL is missing);
//! - the newest backup restorable on the history of the latest timeline, always (found by
//!   `retention::facts`): after a point-in-time restore that replaced its source, the newest
//!   backups by time can lie on the abandoned timeline, and only an older one, taken before
//!   the fork, restores the live cluster;
//! - `keep_last N`: the N newest;
//! - `keep_within D`: stopped within D before now;
//! - grandfather-father-son: `keep_daily N` keeps the newest backup of each of the N newest UTC
//!   days that have a backup, `keep_weekly N` the same per ISO week, `keep_monthly N` per month
//!   (all by stop time).
//!
//! "Newest" means by stop time, then id — never by LSN or WAL file name, which go backwards
//! across timeline resets and cluster upgrades.

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::Serialize;

use crate::pg::TimelineId;
use crate::repo::manifest::BackupId;

/// A retention policy; every field `None` means "this rule keeps nothing".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_within: Option<KeepWithin>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    /// The WAL window ([`super::window`]): continuous WAL for this long, only their own WAL for
    /// older kept backups. `None`: all WAL from the oldest kept backup on. Keeps no backup by
    /// itself, so it is not a rule of [`RetentionPolicy::is_empty`].
    pub keep_wal_within: Option<KeepWithin>,
}

impl RetentionPolicy {
    /// Whether any rule that keeps backups is set.
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_within.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }

    /// `keep-last 4, keep-within 30d, …` for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.keep_last {
            parts.push(format!("keep-last {n}"));
        }
        if let Some(w) = &self.keep_within {
            parts.push(format!("keep-within {w}"));
        }
        for (name, v) in [
            ("keep-daily", self.keep_daily),
            ("keep-weekly", self.keep_weekly),
            ("keep-monthly", self.keep_monthly),
        ] {
            if let Some(n) = v {
                parts.push(format!("{name} {n}"));
            }
        }
        if let Some(w) = &self.keep_wal_within {
            parts.push(format!("keep-wal-within {w}"));
        }
        parts.join(", ")
    }
}

/// A duration (0 or more) written `<n><unit>`, unit `s`, `m`, `h`, `d` or `w` (`30d`, `12h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepWithin {
    pub seconds: u64,
    text_n: u64,
    text_unit: char,
}

impl KeepWithin {
    /// # Errors
    /// The text, when it is not a positive number followed by one of the units.
    pub fn parse(s: &str) -> Result<KeepWithin, crate::pg::ParseError> {
        let bad = || {
            crate::pg::ParseError::new("duration", s, "a number and a unit: 30d, 12h, 2w, 90m, 45s")
        };
        let s = s.trim();
        let unit = s.chars().last().ok_or_else(bad)?;
        let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
        let mult = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let seconds = n
            .checked_mul(mult)
            .filter(|&v| v < i64::MAX as u64 / 2)
            .ok_or_else(bad)?;
        Ok(KeepWithin {
            seconds,
            text_n: n,
            text_unit: unit,
        })
    }

    /// [`KeepWithin::parse`] for a WAL window (`keep_wal_within`), which cannot be empty: a
    /// window of zero would keep no continuous WAL at all, not even the live timeline's.
    ///
    /// # Errors
    /// The text, when it does not parse or is zero.
    pub fn parse_window(s: &str) -> Result<KeepWithin, crate::pg::ParseError> {
        let w = KeepWithin::parse(s)?;
        if w.seconds == 0 {
            return Err(crate::pg::ParseError::new(
                "WAL window",
                s,
                "more than zero: 14d, 36h, 2w (leave it unset to keep all WAL from the oldest kept backup)",
            ));
        }
        Ok(w)
    }
}

impl std::fmt::Display for KeepWithin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.text_n, self.text_unit)
    }
}

impl std::str::FromStr for KeepWithin {
    type Err = crate::pg::ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeepWithin::parse(s)
    }
}

impl Serialize for KeepWithin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the policy needs to know about one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFacts {
    pub id: BackupId,
    pub stop_time: Timestamp,
    /// `keep: true` in the manifest.
    pub keep: bool,
    /// Its own WAL (start through stop segment) is archived on some timeline.
    pub restorable: bool,
    /// `Some(T)` for the newest backup restorable on the history of the latest timeline `T`
    /// ([`super::facts::live_timeline`]); `None` for every other.
    pub restores_latest_timeline: Option<TimelineId>,
}

/// The verdict on one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub id: BackupId,
    pub stop_time: Timestamp,
    pub keep: bool,
    /// Why it is kept (empty when it expires): `keep flag`, `newest`, `last 3`, `daily
    /// 2026-11-23`, …
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no retention policy given: pass --keep-last, --keep-within, --keep-daily, --keep-weekly or --keep-monthly (or set keep_* in the configuration); nothing was deleted")]
    NoPolicy,
}

/// Decides which backups `policy` keeps, newest first.
///
/// # Errors
/// [`PolicyError::NoPolicy`] when no rule is set: expiring everything but the newest backup
/// is never a default.
pub fn decide(
    backups: &[BackupFacts],
    policy: &RetentionPolicy,
    now: Timestamp,
) -> Result<Vec<Verdict>, PolicyError> {
    if policy.is_empty() {
        return Err(PolicyError::NoPolicy);
    }
    let mut sorted: Vec<&BackupFacts> = backups.iter().collect();
    sorted.sort_by(|a, b| (b.stop_time, &b.id).cmp(&(a.stop_time, &a.id)));
    let mut out: Vec<Verdict> = sorted
        .iter()
        .map(|b| Verdict {
            id: b.id.clone(),
            stop_time: b.stop_time,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    let mut keep = |i: usize, why: String| {
        out[i].keep = true;
        out[i].reasons.push(why);
    };
    for (i, b) in sorted.iter().enumerate() {
        if b.keep {
            keep(i, "keep flag".into());
        }
    }
    if !sorted.is_empty() {
        keep(0, "newest".into());
    }
    let newest_restorable = sorted.iter().position(|b| b.restorable);
    if let Some(i) = newest_restorable.filter(|&i| i != 0) {
        keep(i, "newest restorable".into());
    }
    // Said only where it adds to the two rules above (on one timeline they keep it already).
    for (i, b) in sorted.iter().enumerate() {
        if let Some(t) = b.restores_latest_timeline {
            if i != 0 && Some(i) != newest_restorable {
                keep(i, format!("restores the latest timeline {t}"));
            }
        }
    }
    if let Some(n) = policy.keep_last {
        for i in 0..sorted.len().min(n as usize) {
            keep(i, format!("last {n}"));
        }
    }
    if let Some(w) = policy.keep_within {
        for (i, b) in sorted.iter().enumerate() {
            let age = now.duration_since(b.stop_time).as_secs();
            if age <= w.seconds as i64 {
                keep(i, format!("within {w}"));
            }
        }
    }
    let gfs: [(&str, Option<u32>, BucketOf); 3] = [
        ("daily", policy.keep_daily, |t| utc(t).to_string()),
        ("weekly", policy.keep_weekly, |t| {
            let w = utc(t).iso_week_date();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        ("monthly", policy.keep_monthly, |t| {
            let d = utc(t);
            format!("{}-{:02}", d.year(), d.month())
        }),
    ];
    for (name, n, bucket) in gfs {
        let Some(n) = n else { continue };
        let mut seen = BTreeSet::new();
        for (i, b) in sorted.iter().enumerate() {
            if seen.len() >= n as usize {
                break;
            }
            let key = bucket(b.stop_time);
            if seen.insert(key.clone()) {
                keep(i, format!("{name} {key}"));
            }
        }
    }
    Ok(out)
}

/// The GFS bucket (UTC day, ISO week or month) of a stop time.
type BucketOf = fn(Timestamp) -> String;

/// The UTC calendar date of `t` (GFS buckets are by UTC day, ISO week and month).
fn utc(t: Timestamp) -> jiff::civil::Date {
    t.to_zoned(jiff::tz::TimeZone::UTC).date()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, stop: &str) -> BackupFacts {
        BackupFacts {
            id: BackupId(id.into()),
            stop_time: stop.parse().unwrap(),
            keep: false,
            restorable: true,
            restores_latest_timeline: None,
        }
    }

    fn kept(v: &[Verdict]) -> Vec<&str> {
        let mut k: Vec<&str> = v
            .iter()
            .filter(|v| v.keep)
            .map(|v| v.id.0.as_str())
            .collect();
        k.sort();
        k
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    /// Backups at 01:00 and 13:00 every day from Mon 2026-10-26 through Mon 2026-11-23.
    fn twice_daily() -> Vec<BackupFacts> {
        let start: jiff::civil::Date = "2026-10-26".parse().unwrap();
        let mut out = Vec::new();
        for d in 0..29 {
            let date = start.checked_add(jiff::Span::new().days(d)).unwrap();
            for h in [1, 13] {
                let t = date
                    .at(h, 0, 0, 0)
                    .to_zoned(jiff::tz::TimeZone::UTC)
                    .unwrap()
                    .timestamp();
                out.push(BackupFacts {
                    id: crate::repo::manifest::BackupId::from_time(t),
                    stop_time: t,
                    keep: false,
                    restorable: true,
                    restores_latest_timeline: None,
                });
            }
        }
        out
    }

    #[test]
    fn no_policy_is_refused() {
        assert_eq!(
            decide(
                &[b("20261101T000000Z", "2026-11-01T00:00:00Z")],
                &RetentionPolicy::default(),
                Timestamp::now()
            ),
            Err(PolicyError::NoPolicy)
        );
    }

    #[test]
    fn policies_table() {
        let now: Timestamp = "2026-11-23T14:00:00Z".parse().unwrap();
        let all = twice_daily();
        #[rustfmt::skip]
        let table: Vec<(&str, RetentionPolicy, Vec<&str>)> = vec![
            ("last 3", policy(|p| p.keep_last = Some(3)),
             vec!["20261122T130000Z", "20261123T010000Z", "20261123T130000Z"]),
            ("last 0 still keeps the newest", policy(|p| p.keep_last = Some(0)),
             vec!["20261123T130000Z"]),
            ("within 1d", policy(|p| p.keep_within = Some(KeepWithin::parse("1d").unwrap())),
             vec!["20261123T010000Z", "20261123T130000Z"]),
            ("within 2d", policy(|p| p.keep_within = Some(KeepWithin::parse("2d").unwrap())),
             vec!["20261122T010000Z", "20261122T130000Z", "20261123T010000Z", "20261123T130000Z"]),
            ("daily 3: newest of each of the 3 newest days", policy(|p| p.keep_daily = Some(3)),
             vec!["20261121T130000Z", "20261122T130000Z", "20261123T130000Z"]),
            // ISO weeks start on Monday: 2026-11-23 is a Monday (week 48 holds only its two).
            ("weekly 3", policy(|p| p.keep_weekly = Some(3)),
             vec!["20261115T130000Z", "20261122T130000Z", "20261123T130000Z"]),
            ("monthly 2", policy(|p| p.keep_monthly = Some(2)),
             vec!["20261031T130000Z", "20261123T130000Z"]),
            ("monthly 5 with only 2 months", policy(|p| p.keep_monthly = Some(5)),
             vec!["20261031T130000Z", "20261123T130000Z"]),
            ("union of daily 2 and weekly 2", policy(|p| { p.keep_daily = Some(2); p.keep_weekly = Some(2) }),
             vec!["20261122T130000Z", "20261123T130000Z"]),
            ("union of last 1 and monthly 2", policy(|p| { p.keep_last = Some(1); p.keep_monthly = Some(2) }),
             vec!["20261031T130000Z", "20261123T130000Z"]),
        ];
        for (name, p, want) in table {
            let v = decide(&all, &p, now).unwrap();
            assert_eq!(kept(&v), want, "{name}");
            assert_eq!(v.len(), all.len());
        }
    }

    #[test]
    fn keep_flag_newest_and_newest_restorable_always_stay() {
        let now: Timestamp = "2026-11-23T14:00:00Z".parse().unwrap();
        let mut all = vec![
            b("20261101T000000Z", "2026-11-01T00:10:00Z"),
            b("20261102T000000Z", "2026-11-02T00:10:00Z"),
            b("20261103T000000Z", "2026-11-03T00:10:00Z"),
            b("20261104T000000Z", "2026-11-04T00:10:00Z"),
        ];
        all[0].keep = true;
        all[3].restorable = false; // the newest lacks WAL: the newest restorable stays too
        let v = decide(&all, &policy(|p| p.keep_last = Some(1)), now).unwrap();
        assert_eq!(
            kept(&v),
            vec!["20261101T000000Z", "20261103T000000Z", "20261104T000000Z"]
        );
        let reasons = |id: &str| v.iter().find(|v| v.id.0 == id).unwrap().reasons.clone();
        assert_eq!(reasons("20261101T000000Z"), vec!["keep flag"]);
        assert_eq!(reasons("20261103T000000Z"), vec!["newest restorable"]);
        assert_eq!(reasons("20261104T000000Z"), vec!["newest", "last 1"]);
    }

    #[test]
    fn the_backup_that_restores_the_latest_timeline_always_stays() {
        // Issue 15, item 5: timeline 2 forked before b1 and b2 of timeline 1; b0 is the only
        // backup on its history. `--keep-last 1` keeps b2 by age and b0 for timeline 2.
        let now: Timestamp = "2026-11-23T14:00:00Z".parse().unwrap();
        let mut all = vec![
            b("20261101T000000Z", "2026-11-01T00:10:00Z"),
            b("20261102T000000Z", "2026-11-02T00:10:00Z"),
            b("20261103T000000Z", "2026-11-03T00:10:00Z"),
        ];
        all[0].restores_latest_timeline = Some(TimelineId(2));
        let v = decide(&all, &policy(|p| p.keep_last = Some(1)), now).unwrap();
        assert_eq!(kept(&v), vec!["20261101T000000Z", "20261103T000000Z"]);
        let reasons = |id: &str| v.iter().find(|v| v.id.0 == id).unwrap().reasons.clone();
        assert_eq!(
            reasons("20261101T000000Z"),
            vec!["restores the latest timeline 2"]
        );
        // The newest restoring the latest timeline is kept as the newest: no second reason.
        all[0].restores_latest_timeline = None;
        all[2].restores_latest_timeline = Some(TimelineId(1));
        let v = decide(&all, &policy(|p| p.keep_last = Some(1)), now).unwrap();
        assert_eq!(kept(&v), vec!["20261103T000000Z"]);
        assert_eq!(v[0].reasons, vec!["newest", "last 1"]);
        // Without it the policy alone decides.
        all[2].restores_latest_timeline = None;
        let v = decide(&all, &policy(|p| p.keep_last = Some(1)), now).unwrap();
        assert_eq!(kept(&v), vec!["20261103T000000Z"]);
    }

    #[test]
    fn newest_is_by_stop_time_not_by_id_or_lsn() {
        // After a timeline reset the newest backup can have the lowest LSN; ids could even go
        // backwards after a clock fix. Stop time decides.
        let now: Timestamp = "2026-11-23T14:00:00Z".parse().unwrap();
        let all = vec![
            b("20261110T000000Z", "2026-11-10T00:10:00Z"),
            b("20261101T000000Z", "2026-11-20T00:10:00Z"),
        ];
        let v = decide(&all, &policy(|p| p.keep_last = Some(1)), now).unwrap();
        assert_eq!(kept(&v), vec!["20261101T000000Z"]);
    }

    #[test]
    fn keep_within_parses() {
        assert_eq!(KeepWithin::parse("30d").unwrap().seconds, 30 * 86_400);
        assert_eq!(KeepWithin::parse("2w").unwrap().to_string(), "2w");
        for bad in ["", "d", "30", "30y", "-1d", "1.5d", "99999999999999999w"] {
            assert!(KeepWithin::parse(bad).is_err(), "{bad}");
        }
    }
}
