//! The long page header at the start of every WAL segment (`XLogLongPageHeaderData`,
//! src/include/access/xlog_internal.h). It carries the cluster's system identifier and the WAL
//! segment size, which is how pgpitr learns both from the WAL itself instead of assuming them.

use super::{Lsn, ParseError, TimelineId, WalSegSize};

/// `XLP_LONG_HEADER`: the page header has the long form.
const XLP_LONG_HEADER: u16 = 0x0002;
/// `SizeOfXLogLongPHD`: 40 bytes on every supported platform (MAXALIGN 8).
pub const LONG_PAGE_HEADER_LEN: usize = 40;

/// The fields of a segment's first page header that identify the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalLongPageHeader {
    pub magic: u16,
    pub timeline: TimelineId,
    pub page_address: Lsn,
    pub system_identifier: u64,
    pub seg_size: WalSegSize,
    pub block_size: u32,
}

impl WalLongPageHeader {
    /// Decodes the first bytes of a WAL segment (little-endian, as written on x86-64 and arm64).
    ///
    /// # Errors
    /// Fewer than 40 bytes, a page without the long-header flag, an unknown magic, or a segment
    /// size that PostgreSQL would not accept.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let bad = |why: &'static str| ParseError::new("WAL segment header", "first page", why);
        if bytes.len() < LONG_PAGE_HEADER_LEN {
            return Err(bad("at least 40 bytes of a WAL long page header"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let magic = u16_at(0);
        if pg_major_for_magic(magic).is_none() {
            return Err(bad("a WAL page magic of PostgreSQL 13 to 18"));
        }
        if u16_at(2) & XLP_LONG_HEADER == 0 {
            return Err(bad("the long page header that starts every WAL segment"));
        }
        let seg_size = WalSegSize::new(u32_at(32)).map_err(|_| bad("a valid WAL segment size"))?;
        Ok(WalLongPageHeader {
            magic,
            timeline: TimelineId(u32_at(4)),
            page_address: Lsn(u64_at(8)),
            system_identifier: u64_at(24),
            seg_size,
            block_size: u32_at(36),
        })
    }

    /// The PostgreSQL major version that writes this header's magic.
    pub fn pg_major(&self) -> u32 {
        pg_major_for_magic(self.magic).expect("checked in parse")
    }
}

/// `XLOG_PAGE_MAGIC` per major version (src/include/access/xlog_internal.h of each branch).
pub fn pg_major_for_magic(magic: u16) -> Option<u32> {
    match magic {
        0xD106 => Some(13),
        0xD10D => Some(14),
        0xD110 => Some(15),
        0xD113 => Some(16),
        0xD116 => Some(17),
        0xD118 => Some(18),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header(magic: u16, sysid: u64, seg_size: u32, pageaddr: u64) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..2].copy_from_slice(&magic.to_le_bytes());
        b[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..16].copy_from_slice(&pageaddr.to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&seg_size.to_le_bytes());
        b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        b
    }

    #[test]
    fn reads_identity_fields() {
        let h = WalLongPageHeader::parse(&header(
            0xD110,
            7_300_000_000_000_000_001,
            16 << 20,
            0x3000000,
        ))
        .unwrap();
        assert_eq!(h.system_identifier, 7_300_000_000_000_000_001);
        assert_eq!(h.seg_size, WalSegSize::DEFAULT);
        assert_eq!(h.page_address, Lsn(0x3000000));
        assert_eq!(h.pg_major(), 15);
    }

    #[test]
    fn rejects_short_unknown_or_short_header_pages() {
        assert!(WalLongPageHeader::parse(&[0u8; 39]).is_err());
        assert!(WalLongPageHeader::parse(&header(0x1234, 1, 16 << 20, 0)).is_err());
        let mut short = header(0xD110, 1, 16 << 20, 0);
        short[2] = 0;
        assert!(WalLongPageHeader::parse(&short).is_err());
        assert!(WalLongPageHeader::parse(&header(0xD110, 1, 12345, 0)).is_err());
    }
}

/// Hostile WAL page headers: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::tests::header;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::proptest_config::config(4000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(h) = WalLongPageHeader::parse(&bytes) {
                prop_assert!(bytes.len() >= LONG_PAGE_HEADER_LEN);
                prop_assert!((13..=18).contains(&h.pg_major()));
            }
        }

        #[test]
        fn mutated_headers_parse_or_give_a_typed_error(
            magic in prop::sample::select(vec![0xD106u16, 0xD10D, 0xD110, 0xD113, 0xD116, 0xD118]),
            sysid in any::<u64>(),
            shift in 20u32..=30,
            pageaddr in any::<u64>(),
            at in 0usize..LONG_PAGE_HEADER_LEN,
            xor in any::<u8>(),
            cut in 0usize..=64,
        ) {
            let good = header(magic, sysid, 1 << shift, pageaddr);
            let h = WalLongPageHeader::parse(&good).unwrap();
            prop_assert_eq!((h.system_identifier, h.seg_size.bytes(), h.page_address),
                (sysid, 1 << shift, Lsn(pageaddr)));
            let mut bad = good.clone();
            bad[at] ^= xor;
            bad.truncate(cut);
            match WalLongPageHeader::parse(&bad) {
                Ok(h) => prop_assert!(h.pg_major() >= 13),
                Err(e) => prop_assert_eq!(e.what, "WAL segment header"),
            }
        }
    }
}
