//! What the retention policy promises, as S3 Object Lock retention (`s3_object_lock`): how long
//! a new object is locked, and until when the objects of a backup the policy keeps must stay
//! locked. Pure functions of the policy, a backup's verdict and the current time; the I/O (the
//! headers of each write, PutObjectRetention) lives in `storage::s3`, `commands::backup` and
//! `commands::expire`. docs/operations.md ("Immutable backups") states the same rules.
//!
//! - **A new object** (a WAL file, a pack and its index, a manifest, a restore point) is locked
//!   for [`new_object_retention`]: the longest of `keep_within D` (a new backup is kept at least
//!   D) and the finest of `keep_daily N`, `keep_weekly N`, `keep_monthly N` (N days, N weeks or
//!   N × 31 days: a new backup is the newest of its day, and stays its day's backup unless
//!   another follows the same day). `keep_last` promises no duration and locks nothing.
//! - **A backup the policy keeps** gets, at each `expire`, the latest of what each rule that
//!   keeps it promises ([`kept_backup_lock`]): `within D`, its stop time + D; a daily, weekly or
//!   monthly slot whose day, week or month has ended, the start of that period + N periods
//!   (the earliest moment the rule can let it go, when backups keep coming); every rule that
//!   does not count time (keep flag, newest, newest restorable, the latest timeline's, last N),
//!   now + [`new_object_retention`]. Objects shared between backups (packs, pack indexes) take
//!   the latest of their backups'. A lock is only ever extended, never shortened.
//! - **WAL** is promised what a new backup is, or the WAL window (`keep_wal_within`) when that
//!   is longer ([`wal_retention`]); the WAL a kept backup needs to be consistent (its start through its stop
//!   segment) takes the backup's lock.

use std::time::Duration;

use jiff::civil::Date;
use jiff::{Span, Timestamp};

use super::{RetentionPolicy, Verdict};

/// One month of a `keep_monthly` promise as a fixed duration: the longest month.
const MONTH_DAYS: u64 = 31;

/// How long a new object is locked; `None` when no rule of `policy` counts time (only
/// `keep_last`, or none, or durations of 0), so that nothing can be promised.
pub fn new_object_retention(policy: &RetentionPolicy) -> Option<Duration> {
    let finest = [
        (policy.keep_daily, 1),
        (policy.keep_weekly, 7),
        (policy.keep_monthly, MONTH_DAYS),
    ]
    .into_iter()
    .find_map(|(n, days)| n.map(|n| u64::from(n) * days * 86_400));
    let within = policy.keep_within.map(|w| w.seconds);
    within
        .into_iter()
        .chain(finest)
        .max()
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
}

/// How long a new WAL file is locked: what a new backup is promised ([`new_object_retention`])
/// or, when longer, the WAL window (`keep_wal_within`): point-in-time recovery to any moment of
/// the window needs every WAL file archived in it.
pub fn wal_retention(policy: &RetentionPolicy) -> Option<Duration> {
    let window = policy
        .keep_wal_within
        .map(|w| Duration::from_secs(w.seconds));
    new_object_retention(policy).map(|r| window.map_or(r, |w| w.max(r)))
}

/// A period of the grandfather-father-son rules (UTC days, ISO weeks, months).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    /// The first day of the period holding `date`.
    fn start(self, date: Date) -> Date {
        match self {
            Period::Day => date,
            Period::Week => date
                .checked_sub(Span::new().days(i64::from(date.weekday().to_monday_zero_offset())))
                .unwrap_or(date),
            Period::Month => date.first_of_month(),
        }
    }

    /// `n` periods after `date`.
    fn add(self, date: Date, n: u32) -> Date {
        let n = i64::from(n);
        let span = match self {
            Period::Day => Span::new().days(n),
            Period::Week => Span::new().weeks(n),
            Period::Month => Span::new().months(n),
        };
        date.checked_add(span).unwrap_or(Date::MAX)
    }
}

/// Midnight UTC of `date`.
fn midnight(date: Date) -> Timestamp {
    date.to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::MAX)
}

/// Until when the objects of the backup judged by `verdict` must stay locked at `now`; see the
/// module documentation. `None` when the policy does not keep it (its lock then simply runs
/// out) or no rule that keeps it promises anything.
pub fn kept_backup_lock(
    policy: &RetentionPolicy,
    verdict: &Verdict,
    now: Timestamp,
) -> Option<Timestamp> {
    if !verdict.keep {
        return None;
    }
    let fresh = new_object_retention(policy)
        .and_then(|d| jiff::SignedDuration::try_from(d).ok())
        .and_then(|d| now.checked_add(d).ok());
    let stop_date = verdict.stop_time.to_zoned(jiff::tz::TimeZone::UTC).date();
    let gfs = |period: Period, n: Option<u32>| -> Option<Timestamp> {
        let (n, start) = (n?, period.start(stop_date));
        let ended = midnight(period.add(start, 1)) <= now;
        ended.then(|| midnight(period.add(start, n)))
    };
    verdict
        .reasons
        .iter()
        .filter_map(|reason| {
            let rule = reason.split(' ').next().unwrap_or_default();
            match rule {
                "within" => policy.keep_within.and_then(|w| {
                    verdict
                        .stop_time
                        .checked_add(jiff::SignedDuration::from_secs(w.seconds as i64))
                        .ok()
                }),
                "daily" => gfs(Period::Day, policy.keep_daily),
                "weekly" => gfs(Period::Week, policy.keep_weekly),
                "monthly" => gfs(Period::Month, policy.keep_monthly),
                _ => fresh,
            }
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::BackupId;
    use crate::retention::{decide, BackupFacts, KeepWithin};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    const DAY: u64 = 86_400;

    #[test]
    fn a_new_object_is_locked_for_keep_within_or_the_finest_period() {
        #[rustfmt::skip]
        let table: Vec<(&str, RetentionPolicy, Option<u64>)> = vec![
            ("no rule", RetentionPolicy::default(), None),
            ("within 0d", policy(|p| p.keep_within = Some(KeepWithin::parse("0d").unwrap())), None),
            ("keep_last promises no time", policy(|p| p.keep_last = Some(7)), None),
            ("within 30d", policy(|p| p.keep_within = Some(KeepWithin::parse("30d").unwrap())), Some(30 * DAY)),
            ("daily 7", policy(|p| p.keep_daily = Some(7)), Some(7 * DAY)),
            ("daily 7 is finer than monthly 12", policy(|p| { p.keep_daily = Some(7); p.keep_monthly = Some(12) }), Some(7 * DAY)),
            ("weekly 4", policy(|p| p.keep_weekly = Some(4)), Some(28 * DAY)),
            ("monthly 2: 31-day months", policy(|p| p.keep_monthly = Some(2)), Some(62 * DAY)),
            ("within longer than daily", policy(|p| { p.keep_within = Some(KeepWithin::parse("2w").unwrap()); p.keep_daily = Some(7) }), Some(14 * DAY)),
            ("daily longer than within", policy(|p| { p.keep_within = Some(KeepWithin::parse("1d").unwrap()); p.keep_daily = Some(3); p.keep_last = Some(9) }), Some(3 * DAY)),
        ];
        for (name, p, want) in table {
            assert_eq!(
                new_object_retention(&p),
                want.map(Duration::from_secs),
                "{name}"
            );
            assert_eq!(wal_retention(&p), new_object_retention(&p), "{name}");
        }
        // A WAL window longer than what a backup is promised locks WAL for the window; a
        // shorter one changes nothing; alone it promises nothing (it is not a policy).
        let window = |w: &str, daily: Option<u32>| {
            policy(|p| {
                p.keep_wal_within = Some(KeepWithin::parse_window(w).unwrap());
                p.keep_daily = daily;
            })
        };
        assert_eq!(
            wal_retention(&window("14d", Some(7))),
            Some(Duration::from_secs(14 * DAY))
        );
        assert_eq!(
            new_object_retention(&window("14d", Some(7))),
            Some(Duration::from_secs(7 * DAY))
        );
        assert_eq!(
            wal_retention(&window("2d", Some(7))),
            Some(Duration::from_secs(7 * DAY))
        );
        assert_eq!(wal_retention(&window("14d", None)), None);
    }

    /// Daily backups at 01:00 UTC from 2026-09-01 through 2026-11-23.
    fn daily_backups() -> Vec<BackupFacts> {
        let start: Date = "2026-09-01".parse().unwrap();
        (0..84)
            .map(|d| {
                let t = midnight(start.checked_add(Span::new().days(d)).unwrap())
                    .checked_add(Span::new().hours(1))
                    .unwrap();
                BackupFacts {
                    id: BackupId::from_time(t),
                    stop_time: t,
                    keep: false,
                    restorable: true,
                    restores_latest_timeline: None,
                }
            })
            .collect()
    }

    fn lock_of(
        p: &RetentionPolicy,
        backups: &[BackupFacts],
        id: &str,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let v = decide(backups, p, now).unwrap();
        let v = v.iter().find(|v| v.id.0 == id).unwrap();
        kept_backup_lock(p, v, now)
    }

    #[test]
    fn kept_backups_are_locked_as_long_as_the_rules_that_keep_them_promise() {
        let now = ts("2026-11-23T12:00:00Z");
        let all = daily_backups();
        let p = policy(|p| {
            p.keep_daily = Some(7);
            p.keep_monthly = Some(3);
        });
        // The newest: kept as the newest (no time counted), now + 7 days; its day has not
        // ended, so the daily slot adds nothing yet.
        assert_eq!(
            lock_of(&p, &all, "20261123T010000Z", now),
            Some(ts("2026-11-30T12:00:00Z"))
        );
        // Yesterday's, daily: its day ended, the start of its day + 7 days.
        assert_eq!(
            lock_of(&p, &all, "20261122T010000Z", now),
            Some(ts("2026-11-29T00:00:00Z"))
        );
        // October's last backup is the monthly one: start of October + 3 months.
        assert_eq!(
            lock_of(&p, &all, "20261031T010000Z", now),
            Some(ts("2027-01-01T00:00:00Z"))
        );
        // Not kept: its lock runs out as it was set.
        assert_eq!(lock_of(&p, &all, "20261030T010000Z", now), None);
        // keep_within D: stop + D.
        let p = policy(|p| p.keep_within = Some(KeepWithin::parse("10d").unwrap()));
        assert_eq!(
            lock_of(&p, &all, "20261115T010000Z", now),
            Some(ts("2026-11-25T01:00:00Z"))
        );
        // A backup marked keep is renewed to now + what a new object gets, at every expire.
        let mut marked = all.clone();
        marked[0].keep = true;
        assert_eq!(
            lock_of(&p, &marked, "20260901T010000Z", now),
            Some(ts("2026-12-03T12:00:00Z"))
        );
    }

    #[test]
    fn a_backup_that_became_the_monthly_one_is_extended_when_its_month_ends() {
        let p = policy(|p| {
            p.keep_daily = Some(7);
            p.keep_monthly = Some(12);
        });
        let all: Vec<BackupFacts> = daily_backups()
            .into_iter()
            .filter(|b| b.stop_time < ts("2026-11-01T00:00:00Z"))
            .collect();
        // On 2026-10-31 at noon October has not ended: the newest gets a new object's lock.
        let noon = ts("2026-10-31T12:00:00Z");
        assert_eq!(
            lock_of(&p, &all, "20261031T010000Z", noon),
            Some(ts("2026-11-07T12:00:00Z"))
        );
        // The next day October has ended: start of October + 12 months.
        let next = ts("2026-11-01T12:00:00Z");
        assert_eq!(
            lock_of(&p, &all, "20261031T010000Z", next),
            Some(ts("2027-10-01T00:00:00Z"))
        );
    }

    #[test]
    fn iso_weeks_start_on_monday() {
        // 2026-11-22 is a Sunday: its week began on Monday 2026-11-16.
        let date: Date = "2026-11-22".parse().unwrap();
        assert_eq!(Period::Week.start(date), "2026-11-16".parse().unwrap());
        assert_eq!(
            Period::Week.start("2026-11-16".parse().unwrap()),
            "2026-11-16".parse::<Date>().unwrap()
        );
        let p = policy(|p| p.keep_weekly = Some(2));
        let all = daily_backups();
        let now = ts("2026-11-23T12:00:00Z");
        assert_eq!(
            lock_of(&p, &all, "20261122T010000Z", now),
            Some(ts("2026-11-30T00:00:00Z"))
        );
    }
}
