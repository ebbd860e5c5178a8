//! What a point-in-time recovery should stop at, and on which timeline: the `--target-*` and
//! `--target-timeline` options as types, the `--target-time` parser, and their rendering as the
//! `recovery_target_*` settings PostgreSQL reads from `postgresql.auto.conf`.
//!
//! The semantics are PostgreSQL's (docs, "Server Configuration" → "Write Ahead Log" → "Recovery
//! Target"; src/backend/access/transam/xlogrecovery.c, `recoveryStopsBefore` /
//! `recoveryStopsAfter` and the `check_recovery_target_*` GUC hooks):
//!
//! - at most one target; without one ([`RecoveryTarget::Latest`]) recovery replays all WAL it
//!   can get;
//! - `recovery_target_time` is compared with the timestamps of commit and abort records,
//!   `recovery_target_xid` with the committing transaction id, `recovery_target_lsn` with the
//!   start of each record, `recovery_target_name` with restore points
//!   (`pg_create_restore_point()`);
//! - `recovery_target_inclusive` (default on) says whether recovery stops just after (on) or
//!   just before (off) the target record; it applies to time, xid and LSN targets only;
//! - `recovery_target = 'immediate'` stops as soon as the backup is consistent (at its end).
//!
//! Nothing here does I/O, except that [`parse_target_time`] reads the system time zone for
//! timestamps written without an offset.

use std::fmt;
use std::str::FromStr;

use jiff::tz::TimeZone;
use jiff::{RoundMode, Timestamp, TimestampRound, Unit};

use crate::pg::{Lsn, ParseError, TimelineId};

/// The longest restore point name PostgreSQL accepts, in bytes (`MAXFNAMELEN - 1`,
/// `check_recovery_target_name`).
pub const MAX_RESTORE_POINT_NAME: usize = 63;

/// Where recovery stops. Exactly one kind, as PostgreSQL allows at most one `recovery_target_*`
/// setting ("multiple recovery targets specified").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum RecoveryTarget {
    /// No target: replay every WAL segment the archive holds on the target timeline's branch.
    Latest,
    /// `recovery_target = 'immediate'`: stop as soon as the backup is consistent, i.e. once
    /// replay passes the backup's stop LSN.
    Immediate,
    /// `recovery_target_time`: a point in time, compared with commit/abort record timestamps.
    /// Kept at microsecond precision, as PostgreSQL's `timestamptz`.
    Time(Timestamp),
    /// `recovery_target_lsn`: a WAL location.
    Lsn(Lsn),
    /// `recovery_target_xid`: a transaction id. pgpitr compares it with full 64-bit ids
    /// (`pg_current_xact_id()`, epoch in the high 32 bits); a plain 32-bit xid is the same number
    /// while the cluster has not wrapped around. PostgreSQL itself uses the low 32 bits.
    Xid(u64),
    /// `recovery_target_name`: a restore point created with `pg_create_restore_point()`;
    /// recovery stops at the first one with this name.
    Name(String),
}

impl RecoveryTarget {
    /// A time target from `--target-time` text; see [`parse_target_time`].
    ///
    /// # Errors
    /// Text that is not one of the accepted date-time forms; the error lists them.
    pub fn time(text: &str) -> Result<Self, ParseError> {
        parse_target_time(text).map(RecoveryTarget::Time)
    }

    /// An LSN target from `--target-lsn` text (`X/X`, as `pg_lsn`).
    ///
    /// # Errors
    /// Text that is not two hex numbers separated by `/`.
    pub fn lsn(text: &str) -> Result<Self, ParseError> {
        text.trim().parse().map(RecoveryTarget::Lsn)
    }

    /// An xid target from `--target-xid` text: a decimal transaction id, 32-bit or full 64-bit.
    ///
    /// # Errors
    /// Anything but a decimal number that fits in 64 bits.
    pub fn xid(text: &str) -> Result<Self, ParseError> {
        let t = text.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(xid_error(text));
        }
        t.parse()
            .map(RecoveryTarget::Xid)
            .map_err(|_| xid_error(text))
    }

    /// A restore point target from `--target-name`.
    ///
    /// # Errors
    /// An empty name, or one longer than [`MAX_RESTORE_POINT_NAME`] bytes (PostgreSQL refuses it).
    pub fn name(text: &str) -> Result<Self, ParseError> {
        if text.is_empty() || text.len() > MAX_RESTORE_POINT_NAME {
            return Err(ParseError::new(
                "restore point name",
                text,
                "a name of 1 to 63 bytes, as given to pg_create_restore_point()",
            ));
        }
        Ok(RecoveryTarget::Name(text.to_string()))
    }

    /// Whether `recovery_target_inclusive` means anything for this target (time, LSN, xid).
    pub fn takes_inclusive(&self) -> bool {
        matches!(
            self,
            RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_) | RecoveryTarget::Xid(_)
        )
    }
}

fn xid_error(text: &str) -> ParseError {
    ParseError::new(
        "transaction id",
        text,
        "a decimal transaction id such as 1234 (32-bit, or 64-bit as pg_current_xact_id() shows it)",
    )
}

impl fmt::Display for RecoveryTarget {
    /// Human form for messages: `latest`, `immediate`, `time 2026-11-23T09:14:59.123456Z`,
    /// `lsn 0/5000028`, `xid 1234`, `restore point 'before-upgrade'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::Latest => f.write_str("latest"),
            RecoveryTarget::Immediate => f.write_str("immediate"),
            RecoveryTarget::Time(t) => write!(f, "time {t}"),
            RecoveryTarget::Lsn(l) => write!(f, "lsn {l}"),
            RecoveryTarget::Xid(x) => write!(f, "xid {x}"),
            RecoveryTarget::Name(n) => write!(f, "restore point '{n}'"),
        }
    }
}

/// Which timeline recovery follows (`recovery_target_timeline`, docs "Recovery Target";
/// `recoveryTargetTimeLineGoal` in xlogrecovery.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetTimeline {
    /// The newest timeline that descends from the backup (PostgreSQL's default since 12).
    #[default]
    Latest,
    /// The timeline the backup was taken on.
    Current,
    /// This timeline; the backup must lie on its history.
    Id(TimelineId),
}

impl fmt::Display for TargetTimeline {
    /// The `recovery_target_timeline` value: `latest`, `current` or the decimal number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetTimeline::Latest => f.write_str("latest"),
            TargetTimeline::Current => f.write_str("current"),
            TargetTimeline::Id(t) => write!(f, "{t}"),
        }
    }
}

impl FromStr for TargetTimeline {
    type Err = ParseError;

    /// Parses `latest`, `current` or a decimal timeline number of 1 or more.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.trim() {
            "latest" => Ok(TargetTimeline::Latest),
            "current" => Ok(TargetTimeline::Current),
            n => n.parse().map(TargetTimeline::Id).map_err(|_| {
                ParseError::new(
                    "target timeline",
                    s,
                    "latest, current or a timeline number of 1 or more",
                )
            }),
        }
    }
}

/// A complete recovery request: the target, whether the target record itself is replayed, and
/// the timeline to follow.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryTargetSpec {
    pub target: RecoveryTarget,
    /// `recovery_target_inclusive`: stop just after the target record (`true`, PostgreSQL's
    /// default) or just before it (`false`, `--target-exclusive`). Only meaningful for time,
    /// LSN and xid targets.
    pub inclusive: bool,
    pub timeline: TargetTimeline,
}

impl Default for RecoveryTargetSpec {
    /// Everything there is, on the latest timeline.
    fn default() -> Self {
        RecoveryTargetSpec {
            target: RecoveryTarget::Latest,
            inclusive: true,
            timeline: TargetTimeline::Latest,
        }
    }
}

impl RecoveryTargetSpec {
    pub fn new(target: RecoveryTarget, inclusive: bool, timeline: TargetTimeline) -> Self {
        RecoveryTargetSpec {
            target,
            inclusive,
            timeline,
        }
    }

    /// The request as `postgresql.auto.conf` settings, `(name, value)` in a fixed order, values
    /// NOT quoted (quote them with [`quote_setting`] when writing the file):
    ///
    /// | target     | settings                                                            |
    /// |------------|---------------------------------------------------------------------|
    /// | latest     | (none)                                                              |
    /// | immediate  | `recovery_target = immediate`                                       |
    /// | time       | `recovery_target_time = 2026-11-23 09:14:59.123456+00` (always UTC) |
    /// | lsn        | `recovery_target_lsn = 0/5000028`                                   |
    /// | xid        | `recovery_target_xid = 1234`                                        |
    /// | name       | `recovery_target_name = <name>`                                     |
    ///
    /// followed, for time, LSN and xid targets, by `recovery_target_inclusive = true|false`, and
    /// always by `recovery_target_timeline = latest|current|<n>`. The time is written in UTC with
    /// an explicit `+00` because PostgreSQL would otherwise read it in the server's `timezone`
    /// setting (`check_recovery_target_time`). `recovery_target_action` is the caller's choice
    /// and is not included.
    pub fn recovery_settings(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| out.push((k.to_string(), v));
        match &self.target {
            RecoveryTarget::Latest => {}
            RecoveryTarget::Immediate => set("recovery_target", "immediate".to_string()),
            RecoveryTarget::Time(t) => set("recovery_target_time", format_target_time(*t)),
            RecoveryTarget::Lsn(l) => set("recovery_target_lsn", l.to_string()),
            RecoveryTarget::Xid(x) => set("recovery_target_xid", x.to_string()),
            RecoveryTarget::Name(n) => set("recovery_target_name", n.clone()),
        }
        if self.target.takes_inclusive() {
            set("recovery_target_inclusive", self.inclusive.to_string());
        }
        set("recovery_target_timeline", self.timeline.to_string());
        out
    }
}

/// What `--target-time` accepts, for error messages.
const TIME_FORMS: &str = "a date and time like 2026-11-23T10:14:59Z, 2026-11-23 10:14:59+01 or \
2026-11-23 10:14:59.123456+00 (ISO 8601 / RFC 3339: 'T' or a space between date and time, \
optional fractional seconds, offset Z, +01, +01:00 or +0100; without an offset the local time \
zone is used; time zone names and abbreviations are not accepted)";

/// Parses a `--target-time` value; a value without an offset is local time in the system time
/// zone ([`TimeZone::system`], i.e. `TZ` or `/etc/localtime`). See [`parse_target_time_in`].
///
/// # Errors
/// Text that is not one of the accepted forms; the message lists them.
pub fn parse_target_time(text: &str) -> Result<Timestamp, ParseError> {
    parse_target_time_in(text, &TimeZone::system())
}

/// Parses a `--target-time` value the way PostgreSQL's `recovery_target_time` is written in
/// practice, interpreting a value without an offset as local time in `local`.
///
/// Accepted (ISO 8601 / RFC 3339 and PostgreSQL's own `timestamptz` output):
/// - `2026-11-23T10:14:59Z`, `2026-11-23t10:14:59z`
/// - `2026-11-23 10:14:59+01`, `+01:00`, `+0100`, `-05:30`, with or without a space before the
///   offset
/// - fractional seconds `2026-11-23 10:14:59.123456+00` (rounded half-even to microseconds, as
///   PostgreSQL rounds them), minutes-only times `2026-11-23 10:14+01`
/// - no offset — `2026-11-23 10:14:59`, or a date alone, `2026-11-23` (midnight) — in `local`.
///   A local time that a daylight-saving change skips or repeats is resolved as PostgreSQL does
///   (src/backend/utils/adt/datetime.c, `DetermineTimeZoneOffsetInternal`): in a gap with the
///   offset from before the change, in a fold the later of the two instants.
///
/// Not accepted: zone names or abbreviations (`CET`, `UTC`, `[Europe/Paris]`), `now`, `today`,
/// `epoch`, `infinity`.
///
/// # Errors
/// Anything else, with a message listing the accepted forms.
pub fn parse_target_time_in(text: &str, local: &TimeZone) -> Result<Timestamp, ParseError> {
    let err = || ParseError::new("target time", text, TIME_FORMS);
    let s = join_offset(text.trim());
    if s.is_empty() || s.contains('[') {
        return Err(err());
    }
    let ts = match s.parse::<Timestamp>() {
        Ok(ts) => ts,
        Err(_) => {
            // No offset (jiff requires one for a `Timestamp`): civil time in `local`. A civil
            // parse also skips an offset it does not need, so only reach here without one.
            let dt: jiff::civil::DateTime = s.parse().map_err(|_| err())?;
            local
                .to_ambiguous_timestamp(dt)
                .later()
                .map_err(|_| err())?
        }
    };
    ts.round(
        TimestampRound::new()
            .smallest(Unit::Microsecond)
            .mode(RoundMode::HalfEven),
    )
    .map_err(|_| err())
}

/// Removes whitespace between the time and a trailing offset (`10:14:59 +01` → `10:14:59+01`).
fn join_offset(s: &str) -> String {
    if let Some(pos) = s.rfind(char::is_whitespace) {
        let (head, tail) = (s[..pos].trim_end(), s[pos..].trim_start());
        let is_offset = (tail.starts_with(['+', '-'])
            && tail[1..].starts_with(|c: char| c.is_ascii_digit()))
            || tail.eq_ignore_ascii_case("z");
        // Only after a time (`hh:mm`), never joining the date to the time.
        if is_offset && head.contains(':') {
            return format!("{head}{tail}");
        }
    }
    s.to_string()
}

/// `ts` as `recovery_target_time` is written: UTC, microseconds, `+00`, like PostgreSQL's own
/// `timestamptz` output with `TimeZone = UTC`: `2026-11-23 09:14:59.123456+00`. Sub-microsecond
/// digits are rounded half-even.
pub fn format_target_time(ts: Timestamp) -> String {
    let ts = ts
        .round(
            TimestampRound::new()
                .smallest(Unit::Microsecond)
                .mode(RoundMode::HalfEven),
        )
        .unwrap_or(ts);
    let dt = ts.to_zoned(TimeZone::UTC).datetime();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.subsec_nanosecond() / 1000
    )
}

/// `value` as a single-quoted string literal of PostgreSQL's configuration file syntax
/// (src/backend/utils/misc/guc-file.l: `''` for a quote, backslash escapes): `it's` →
/// `'it''s'`, `a\b` → `'a\\b'`.
pub fn quote_setting(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cet() -> TimeZone {
        // Central European Time with its daylight-saving rule, without reading tzdata.
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    #[test]
    fn target_time_accepts_what_postgresql_users_write() {
        let utc = TimeZone::UTC;
        #[rustfmt::skip]
        let cases: &[(&str, &TimeZone, &str)] = &[
            // input                                   local zone  instant (UTC)
            ("2026-11-23T10:14:59Z",                   &utc,       "2026-11-23T10:14:59Z"),
            ("2026-11-23t10:14:59z",                   &utc,       "2026-11-23T10:14:59Z"),
            ("2026-11-23 10:14:59+01",                 &utc,       "2026-11-23T09:14:59Z"),
            ("2026-11-23 10:14:59.123456+00",          &utc,       "2026-11-23T10:14:59.123456Z"),
            ("2026-11-23 10:14:59+01:00",              &utc,       "2026-11-23T09:14:59Z"),
            ("2026-11-23 10:14:59+0100",               &utc,       "2026-11-23T09:14:59Z"),
            ("2026-11-23 10:14:59 +01",                &utc,       "2026-11-23T09:14:59Z"),
            ("2026-11-23 10:14:59 Z",                  &utc,       "2026-11-23T10:14:59Z"),
            ("2026-11-23T10:14:59.5-05:30",            &utc,       "2026-11-23T15:44:59.5Z"),
            ("2026-11-23 10:14+01",                    &utc,       "2026-11-23T09:14:00Z"),
            ("  2026-11-23 10:14:59+01  ",             &utc,       "2026-11-23T09:14:59Z"),
            // nanoseconds round half-even to microseconds, as PostgreSQL's rint()
            ("2026-11-23 10:14:59.1234565+00",         &utc,       "2026-11-23T10:14:59.123456Z"),
            ("2026-11-23 10:14:59.1234575+00",         &utc,       "2026-11-23T10:14:59.123458Z"),
            // no offset: local time
            ("2026-11-23 10:14:59",                    &cet(),     "2026-11-23T09:14:59Z"),
            ("2026-07-01 10:00:00",                    &cet(),     "2026-07-01T08:00:00Z"),
            ("2026-11-23",                             &cet(),     "2026-11-22T23:00:00Z"),
            ("2026-11-23 10:14:59+00",                 &cet(),     "2026-11-23T10:14:59Z"),
            // spring forward: 02:30 does not exist; the offset before the change (+01) is used
            ("2026-03-29 02:30:00",                    &cet(),     "2026-03-29T01:30:00Z"),
            // fall back: 02:30 happens twice; the later instant (+01) is used
            ("2026-10-25 02:30:00",                    &cet(),     "2026-10-25T01:30:00Z"),
        ];
        for (input, tz, want) in cases {
            let got = parse_target_time_in(input, tz).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.to_string(), *want, "{input}");
        }
    }

    #[test]
    fn target_time_rejects_other_forms_and_says_what_is_accepted() {
        for bad in [
            "",
            "now",
            "today",
            "epoch",
            "infinity",
            "yesterday 10:00",
            "2026-11-23 10:14:59 CET",
            "2026-11-23 10:14:59 UTC",
            "2026-11-23 10:14:59[Europe/Paris]",
            "2026-11-23 10:14:59+01:00[Europe/Paris]",
            "23.11.2026 10:14",
            "2026-13-01 00:00:00+00",
            "2026-11-23 25:00:00+00",
            "1700000000",
        ] {
            let err = parse_target_time_in(bad, &TimeZone::UTC).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("invalid target time"), "{bad}: {msg}");
            assert!(msg.contains("2026-11-23 10:14:59+01"), "{bad}: {msg}");
        }
    }

    #[test]
    fn target_time_is_rendered_in_utc_with_microseconds() {
        #[rustfmt::skip]
        let cases = [
            ("2026-11-23 10:14:59.123456+01", "2026-11-23 09:14:59.123456+00"),
            ("2026-11-23T10:14:59Z",          "2026-11-23 10:14:59.000000+00"),
            ("1969-12-31 23:59:59.5+00",      "1969-12-31 23:59:59.500000+00"),
            ("2026-01-01 00:30:00+01",        "2025-12-31 23:30:00.000000+00"),
        ];
        for (input, want) in cases {
            let ts = parse_target_time_in(input, &TimeZone::UTC).unwrap();
            assert_eq!(format_target_time(ts), want, "{input}");
            // PostgreSQL's form reads back to the same instant.
            assert_eq!(parse_target_time_in(want, &cet()).unwrap(), ts, "{input}");
        }
    }

    #[test]
    fn recovery_settings_per_target() {
        let t = |s| parse_target_time_in(s, &TimeZone::UTC).unwrap();
        #[rustfmt::skip]
        let cases: Vec<(RecoveryTargetSpec, Vec<(&str, &str)>)> = vec![
            (RecoveryTargetSpec::default(),
             vec![("recovery_target_timeline", "latest")]),
            (RecoveryTargetSpec::new(RecoveryTarget::Immediate, true, TargetTimeline::Current),
             vec![("recovery_target", "immediate"), ("recovery_target_timeline", "current")]),
            (RecoveryTargetSpec::new(RecoveryTarget::Time(t("2026-11-23 10:14:59.123456+01")), true, TargetTimeline::Latest),
             vec![("recovery_target_time", "2026-11-23 09:14:59.123456+00"),
                  ("recovery_target_inclusive", "true"), ("recovery_target_timeline", "latest")]),
            (RecoveryTargetSpec::new(RecoveryTarget::Lsn(Lsn(0x5000028)), false, TargetTimeline::Id(TimelineId(2))),
             vec![("recovery_target_lsn", "0/5000028"),
                  ("recovery_target_inclusive", "false"), ("recovery_target_timeline", "2")]),
            (RecoveryTargetSpec::new(RecoveryTarget::Xid(1234), true, TargetTimeline::Latest),
             vec![("recovery_target_xid", "1234"),
                  ("recovery_target_inclusive", "true"), ("recovery_target_timeline", "latest")]),
            (RecoveryTargetSpec::new(RecoveryTarget::Name("before upgrade".into()), false, TargetTimeline::Latest),
             vec![("recovery_target_name", "before upgrade"), ("recovery_target_timeline", "latest")]),
        ];
        for (spec, want) in cases {
            let got = spec.recovery_settings();
            let got: Vec<(&str, &str)> =
                got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(got, want, "{}", spec.target);
        }
    }

    #[test]
    fn target_constructors_validate() {
        assert_eq!(
            RecoveryTarget::xid("1234").unwrap(),
            RecoveryTarget::Xid(1234)
        );
        assert_eq!(
            RecoveryTarget::xid("4294967297").unwrap(),
            RecoveryTarget::Xid(1 << 32 | 1)
        );
        assert_eq!(
            RecoveryTarget::lsn("0/5000028").unwrap(),
            RecoveryTarget::Lsn(Lsn(0x5000028))
        );
        assert_eq!(
            RecoveryTarget::name("x").unwrap(),
            RecoveryTarget::Name("x".into())
        );
        for bad in ["", "-1", "12a", "0x10", "99999999999999999999"] {
            let e = RecoveryTarget::xid(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid transaction id"), "{bad}: {e}");
        }
        assert!(RecoveryTarget::lsn("5000028").is_err());
        assert!(RecoveryTarget::name("").is_err());
        assert!(RecoveryTarget::name(&"n".repeat(63)).is_ok());
        assert!(RecoveryTarget::name(&"n".repeat(64)).is_err());
    }

    #[test]
    fn target_timeline_round_trips() {
        for (text, want) in [
            ("latest", TargetTimeline::Latest),
            ("current", TargetTimeline::Current),
            ("2", TargetTimeline::Id(TimelineId(2))),
        ] {
            let got: TargetTimeline = text.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), text);
        }
        for bad in ["", "0", "-1", "newest", "0x2"] {
            assert!(bad.parse::<TargetTimeline>().is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_are_quoted_for_the_configuration_file() {
        for (value, want) in [
            ("0/5000028", "'0/5000028'"),
            ("it's", "'it''s'"),
            ("a\\b", "'a\\\\b'"),
            ("two\nlines", "'two\\nlines'"),
        ] {
            assert_eq!(quote_setting(value), want);
        }
    }
}
