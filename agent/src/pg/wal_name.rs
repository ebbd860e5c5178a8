//! WAL file names as PostgreSQL writes them into `pg_wal` and hands to `archive_command` /
//! `restore_command` as `%f` (src/include/access/xlog_internal.h: `XLogFileName`,
//! `TLHistoryFileName`, `BackupHistoryFileName`, `IsPartialXLogFileName`).
//!
//! Parsing is strict — upper-case hex, exact lengths — so that a `%f` such as `../x` or
//! `/etc/passwd` can never become a path.

use std::fmt;
use std::str::FromStr;

use super::{Lsn, ParseError, TimelineId};

/// WAL segment size in bytes: a power of two from 1 MiB to 1 GiB (`IsValidWalSegSize`), chosen at
/// `initdb --wal-segsize` time and recorded in every segment's long page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct WalSegSize(u32);

impl WalSegSize {
    /// PostgreSQL's default, 16 MiB. Only for tests and examples: real sizes are read from WAL.
    pub const DEFAULT: WalSegSize = WalSegSize(16 * 1024 * 1024);

    /// # Errors
    /// A size that is not a power of two between 1 MiB and 1 GiB.
    pub fn new(bytes: u32) -> Result<Self, ParseError> {
        if bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes) {
            Ok(WalSegSize(bytes))
        } else {
            Err(ParseError::new(
                "WAL segment size",
                &bytes.to_string(),
                "a power of two between 1 MiB and 1 GiB",
            ))
        }
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    /// Segments per 4 GiB "xlogid" (`XLogSegmentsPerXLogId`).
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }
}

impl TryFrom<u32> for WalSegSize {
    type Error = ParseError;
    fn try_from(v: u32) -> Result<Self, ParseError> {
        WalSegSize::new(v)
    }
}

impl From<WalSegSize> for u32 {
    fn from(v: WalSegSize) -> u32 {
        v.0
    }
}

/// A WAL segment name, `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split into
/// the high 32 bits of the LSN (`log`) and the segment within that 4 GiB (`seg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegmentName {
    pub timeline: TimelineId,
    pub log: u32,
    pub seg: u32,
}

impl WalSegmentName {
    /// The segment of `timeline` numbered `segno` for segments of `seg_size`.
    pub fn from_segno(timeline: TimelineId, segno: u64, seg_size: WalSegSize) -> Self {
        let per = seg_size.segments_per_xlog_id();
        WalSegmentName {
            timeline,
            log: (segno / per) as u32,
            seg: (segno % per) as u32,
        }
    }

    /// The segment of `timeline` that holds `lsn`.
    pub fn containing(timeline: TimelineId, lsn: Lsn, seg_size: WalSegSize) -> Self {
        Self::from_segno(timeline, lsn.segno(seg_size), seg_size)
    }

    pub fn segno(self, seg_size: WalSegSize) -> u64 {
        u64::from(self.log) * seg_size.segments_per_xlog_id() + u64::from(self.seg)
    }

    /// The LSN of the segment's first byte.
    pub fn start_lsn(self, seg_size: WalSegSize) -> Lsn {
        Lsn(self.segno(seg_size) * u64::from(seg_size.bytes()))
    }

    /// The following segment on the same timeline.
    pub fn next(self, seg_size: WalSegSize) -> Self {
        Self::from_segno(self.timeline, self.segno(seg_size) + 1, seg_size)
    }

    /// The first 16 hex digits (timeline + log), the directory key pgBackRest and pgpitr group
    /// segments under.
    pub fn timeline_log_prefix(self) -> String {
        format!("{:08X}{:08X}", self.timeline.0, self.log)
    }

    fn parse_hex24(s: &str) -> Option<Self> {
        if s.len() != 24 || !s.bytes().all(is_upper_hex) {
            return None;
        }
        let part = |r: std::ops::Range<usize>| u32::from_str_radix(&s[r], 16).ok();
        let timeline = part(0..8)?;
        if timeline == 0 {
            return None;
        }
        Some(WalSegmentName {
            timeline: TimelineId(timeline),
            log: part(8..16)?,
            seg: part(16..24)?,
        })
    }
}

fn is_upper_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b)
}

impl fmt::Display for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline.0, self.log, self.seg)
    }
}

impl FromStr for WalSegmentName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Self::parse_hex24(s).ok_or_else(|| {
            ParseError::new(
                "WAL segment name",
                s,
                "24 upper-case hex digits like 000000010000000000000001",
            )
        })
    }
}

/// Any file that `archive_command` / `restore_command` can be asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    /// A complete WAL segment, `000000010000000000000001`.
    Segment(WalSegmentName),
    /// The incomplete last segment of a timeline that a promotion left, `<segment>.partial`.
    /// Archived under its own name and never served as a segment.
    Partial(WalSegmentName),
    /// A timeline history file, `00000002.history`.
    History(TimelineId),
    /// A backup history file, `<segment>.<offset 8 hex>.backup`.
    BackupHistory {
        segment: WalSegmentName,
        offset: u32,
    },
}

impl WalFileName {
    /// The segment this file belongs to, if any (not for history files).
    pub fn segment(self) -> Option<WalSegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(s),
            WalFileName::BackupHistory { segment, .. } => Some(segment),
            WalFileName::History(_) => None,
        }
    }

    /// The timeline the file belongs to.
    pub fn timeline(self) -> TimelineId {
        match self {
            WalFileName::History(t) => t,
            other => other
                .segment()
                .map(|s| s.timeline)
                .unwrap_or(TimelineId::FIRST),
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(t) => write!(f, "{:08X}.history", t.0),
            WalFileName::BackupHistory { segment, offset } => {
                write!(f, "{segment}.{offset:08X}.backup")
            }
        }
    }
}

impl FromStr for WalFileName {
    type Err = ParseError;

    /// # Errors
    /// Anything that is not exactly one of the four forms, with upper-case hex.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || {
            ParseError::new(
                "WAL file name",
                s,
                "a WAL segment (24 upper-case hex digits), <segment>.partial, <segment>.<8 hex>.backup or <8 hex>.history",
            )
        };
        if let Some(seg) = WalSegmentName::parse_hex24(s) {
            return Ok(WalFileName::Segment(seg));
        }
        if let Some(stem) = s.strip_suffix(".partial") {
            return WalSegmentName::parse_hex24(stem)
                .map(WalFileName::Partial)
                .ok_or_else(err);
        }
        if let Some(stem) = s.strip_suffix(".history") {
            if stem.len() == 8 && stem.bytes().all(is_upper_hex) {
                let tli = u32::from_str_radix(stem, 16).map_err(|_| err())?;
                if tli >= 1 {
                    return Ok(WalFileName::History(TimelineId(tli)));
                }
            }
            return Err(err());
        }
        if let Some(stem) = s.strip_suffix(".backup") {
            if let Some((seg, off)) = stem.split_once('.') {
                if off.len() == 8 && off.bytes().all(is_upper_hex) {
                    if let Some(segment) = WalSegmentName::parse_hex24(seg) {
                        let offset = u32::from_str_radix(off, 16).map_err(|_| err())?;
                        return Ok(WalFileName::BackupHistory { segment, offset });
                    }
                }
            }
        }
        Err(err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_prints_it_back() {
        for name in [
            "000000010000000000000001",
            "0000000A00000001000000FF",
            "000000020000000000000005.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            let parsed: WalFileName = name.parse().unwrap();
            assert_eq!(parsed.to_string(), name);
        }
    }

    #[test]
    fn rejects_names_that_could_be_paths_or_are_malformed() {
        for bad in [
            "../x",
            "/etc/passwd",
            "00000001000000000000001",   // 23 hex digits
            "0000000100000000000000011", // 25
            "000000010000000000000001/",
            "00000001000000000000000a", // lower case
            "000000000000000000000001", // timeline 0
            "00000000.history",
            "0000001.history",
            "000000010000000000000001.partial.partial",
            "000000010000000000000002.0000028.backup",
            "",
            "RECOVERYXLOG",
        ] {
            assert!(bad.parse::<WalFileName>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn segment_arithmetic_follows_segment_size() {
        let size = WalSegSize::DEFAULT;
        let s: WalSegmentName = "0000000100000000000000FF".parse().unwrap();
        assert_eq!(s.next(size).to_string(), "000000010000000100000000");
        assert_eq!(s.start_lsn(size).to_string(), "0/FF000000");
        let big = WalSegSize::new(1 << 30).unwrap();
        let s: WalSegmentName = "000000010000000000000003".parse().unwrap();
        assert_eq!(s.next(big).to_string(), "000000010000000100000000");
        assert_eq!(
            WalSegmentName::containing(TimelineId(2), Lsn(0x1_0400_0000), size).to_string(),
            "000000020000000100000004"
        );
    }

    #[test]
    fn segment_size_must_be_power_of_two_in_range() {
        assert!(WalSegSize::new(16 << 20).is_ok());
        for bad in [0, 1 << 19, (16 << 20) + 1, 1 << 31] {
            assert!(WalSegSize::new(bad).is_err(), "{bad}");
        }
    }
}

/// Hostile `%f` names: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = WalSegmentName> {
        (1u32.., any::<u32>(), any::<u32>()).prop_map(|(t, log, seg)| WalSegmentName {
            timeline: TimelineId(t),
            log,
            seg,
        })
    }

    fn wal_file_name() -> impl Strategy<Value = WalFileName> {
        prop_oneof![
            segment().prop_map(WalFileName::Segment),
            segment().prop_map(WalFileName::Partial),
            (1u32..).prop_map(|t| WalFileName::History(TimelineId(t))),
            (segment(), any::<u32>())
                .prop_map(|(segment, offset)| WalFileName::BackupHistory { segment, offset }),
        ]
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(4000))]

        #[test]
        fn every_name_round_trips_through_text(name in wal_file_name()) {
            prop_assert_eq!(name.to_string().parse::<WalFileName>().unwrap(), name);
        }

        #[test]
        fn arbitrary_text_is_rejected_or_prints_back_identically(s in "\\PC{0,48}") {
            if let Ok(name) = s.parse::<WalFileName>() {
                prop_assert_eq!(name.to_string(), s);
            }
        }

        #[test]
        fn near_miss_names_never_panic_and_accepted_ones_are_safe_file_names(
            s in "[0-9A-Fa-f./]{0,12}[0-9A-F]{8,24}(\\.partial|\\.history|\\.[0-9A-F]{7,9}\\.backup|/|\\.\\.)?",
        ) {
            match s.parse::<WalFileName>() {
                Ok(name) => {
                    prop_assert_eq!(name.to_string(), s.clone());
                    prop_assert!(!s.contains('/') && !s.starts_with('.'));
                }
                Err(e) => prop_assert_eq!(e.what, "WAL file name"),
            }
        }

        #[test]
        fn segment_size_is_accepted_only_when_postgresql_would(bytes in any::<u32>()) {
            let valid = bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes);
            prop_assert_eq!(WalSegSize::new(bytes).is_ok(), valid);
        }

        #[test]
        fn segment_numbers_round_trip_for_every_size(
            tli in 1u32..,
            segno in any::<u32>(),
            shift in 20u32..=30,
        ) {
            let size = WalSegSize::new(1 << shift).unwrap();
            let segno = u64::from(segno);
            let name = WalSegmentName::from_segno(TimelineId(tli), segno, size);
            prop_assert_eq!(name.segno(size), segno);
            prop_assert_eq!(name.to_string().parse::<WalSegmentName>().unwrap(), name);
        }
    }
}
