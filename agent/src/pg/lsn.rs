//! `Lsn`: a position in the WAL, a byte offset in PostgreSQL's 64-bit WAL address space, written
//! `X/X` (upper and lower 32 bits in hex), as in `pg_lsn` (src/backend/utils/adt/pg_lsn.c).

use std::fmt;
use std::str::FromStr;

use super::ParseError;

/// A WAL location. Ordered; `Lsn(0)` is PostgreSQL's `InvalidXLogRecPtr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The segment number holding this LSN for segments of `seg_size` bytes (`XLByteToSeg`).
    pub fn segno(self, seg_size: super::WalSegSize) -> u64 {
        self.0 / u64::from(seg_size.bytes())
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;

    /// Parses `X/X` where each side is 1–8 hex digits, as `pg_lsn_in` does.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::new("LSN", s, "two hex numbers of 1-8 digits like 0/16B3748");
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(p, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for (text, value) in [
            ("0/0", 0u64),
            ("0/16B3748", 0x16B3748),
            ("1A/FF000028", 0x1A_FF00_0028),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn, Lsn(value));
            assert_eq!(lsn.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in ["", "0", "/0", "0/", "0/123456789", "g/0", "0/0/0", " 0/0"] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains("invalid LSN"), "{bad}: {err}");
        }
    }

    #[test]
    fn segment_number_uses_segment_size() {
        let lsn: Lsn = "1/2000000".parse().unwrap();
        assert_eq!(lsn.segno(super::super::WalSegSize::DEFAULT), 0x102);
    }
}

/// Hostile LSN text: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::proptest_config::config(4000))]

        #[test]
        fn every_lsn_round_trips_through_text(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>().unwrap(), Lsn(v));
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,24}|[0-9a-fA-F/+ -]{0,20}") {
            if let Err(e) = s.parse::<Lsn>() {
                prop_assert_eq!(e.what, "LSN");
            }
        }
    }
}
