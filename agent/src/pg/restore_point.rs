//! Restore points in WAL: a walk over the records of one WAL file (a segment or a `.partial`
//! file), fed as it is read, that reports every `XLOG_RESTORE_POINT` record — what
//! `pg_create_restore_point()` writes — with its LSN, timeline, time and name. This is how
//! pgpitr learns where `recovery_target_name` stops before recovery runs.
//!
//! Formats: the page headers `XLogPageHeaderData` / `XLogLongPageHeaderData`
//! (src/include/access/xlog_internal.h), the record header `XLogRecord` and its block ids
//! (src/include/access/xlogrecord.h), `xl_restore_point` (src/include/catalog/pg_control.h).
//! The walk follows src/backend/access/transam/xlogreader.c: records are 8-byte aligned, may
//! span pages (each continuation page starts with `XLP_FIRST_IS_CONTRECORD` and the bytes still
//! to come), and the first record of a file may be the tail of one begun in the file before.
//! The walk ends at the first record length of zero (the end of the WAL written, or the rest of
//! a segment after `pg_switch_wal()`) and at any page that is not the next page of this file.
//! A restore point record whose CRC-32C does not match is not reported (PostgreSQL would not
//! replay it either).

use super::{Lsn, TimelineId, WalLongPageHeader};

/// `XLP_FIRST_IS_CONTRECORD`: the page begins with the rest of a record.
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `XLP_LONG_HEADER`.
const XLP_LONG_HEADER: u16 = 0x0002;
/// `SizeOfXLogShortPHD` and `SizeOfXLogLongPHD`.
const SHORT_PAGE_HEADER_LEN: usize = 24;
const LONG_PAGE_HEADER_LEN: usize = 40;
/// `SizeOfXLogRecord`; the CRC (`xl_crc`) is its last four bytes.
const RECORD_HEADER_LEN: usize = 24;
const RECORD_CRC_OFFSET: usize = 20;
/// `RM_XLOG_ID` and `XLOG_RESTORE_POINT` (src/include/catalog/pg_control.h); the low four bits
/// of `xl_info` are `XLR_INFO_MASK`, reserved for the WAL machinery.
const RM_XLOG_ID: u8 = 0;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLR_INFO_MASK: u8 = 0x0F;
/// Block ids that may precede the main data of a record without block references.
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
/// `sizeof(xl_restore_point)`: an 8-byte `TimestampTz` and a 64-byte name (`MAXFNAMELEN`).
const RESTORE_POINT_LEN: usize = 72;
/// Larger records are not restore points: the header, block ids and the main data fit in this.
const MAX_RESTORE_POINT_RECORD: usize = 256;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A restore point found in WAL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestorePointRecord {
    /// The name given to `pg_create_restore_point()`, at most 63 bytes (lossily decoded as
    /// UTF-8).
    pub name: String,
    /// Where the record begins.
    pub lsn: Lsn,
    /// The timeline of the page it was written on.
    pub timeline: TimelineId,
    /// `rp_time`: when it was created.
    pub time: jiff::Timestamp,
}

/// Finds restore points in one WAL file fed in pieces of any size, in order from its start.
#[derive(Debug, Default)]
pub struct RestorePointScanner {
    /// `XLOG_BLCKSZ`, from the file's long page header; 0 until it has been read.
    page_size: usize,
    magic: u16,
    /// The address the next page must carry.
    next_page: u64,
    /// An incomplete page, while the input is not page-aligned.
    pending: Vec<u8>,
    /// Bytes of the current record still to come on later pages; 0 between records.
    remaining: u32,
    record_len: u32,
    record_lsn: u64,
    record_timeline: u32,
    /// The current record's bytes so far, while it may be a restore point.
    record: Vec<u8>,
    collecting: bool,
    done: bool,
    found: Vec<RestorePointRecord>,
}

impl RestorePointScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.done {
            if self.page_size == 0 {
                let take = (LONG_PAGE_HEADER_LEN - self.pending.len()).min(bytes.len());
                self.pending.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.pending.len() < LONG_PAGE_HEADER_LEN {
                    return;
                }
                match WalLongPageHeader::parse(&self.pending) {
                    Ok(h) if valid_page_size(h.block_size) => {
                        self.page_size = h.block_size as usize;
                        self.magic = h.magic;
                        self.next_page = h.page_address.0;
                    }
                    _ => {
                        self.done = true;
                        return;
                    }
                }
                continue;
            }
            if self.pending.is_empty() && bytes.len() >= self.page_size {
                let (page, rest) = bytes.split_at(self.page_size);
                self.page(page);
                bytes = rest;
                continue;
            }
            let take = (self.page_size - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == self.page_size {
                let page = std::mem::take(&mut self.pending);
                self.page(&page);
                self.pending = page;
                self.pending.clear();
            }
        }
    }

    /// The restore points found, in WAL order.
    pub fn finish(self) -> Vec<RestorePointRecord> {
        self.found
    }

    fn page(&mut self, page: &[u8]) {
        let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
        let info = u16_at(2);
        let timeline = u32_at(4);
        let address = u64::from_le_bytes(page[8..16].try_into().expect("8 bytes"));
        let rem_len = u32_at(16);
        // A page that would end past the 64-bit WAL address space is not WAL (and every
        // address within it, `address + pos`, must fit).
        let next_page = address.checked_add(self.page_size as u64);
        if u16_at(0) != self.magic || address != self.next_page || next_page.is_none() {
            self.done = true;
            return;
        }
        self.next_page = next_page.expect("checked above");
        let mut pos = if info & XLP_LONG_HEADER != 0 {
            LONG_PAGE_HEADER_LEN
        } else {
            SHORT_PAGE_HEADER_LEN
        };
        if self.remaining > 0 {
            if info & XLP_FIRST_IS_CONTRECORD == 0 || rem_len != self.remaining {
                // The record was never completed (PostgreSQL 15+ overwrites such a record's
                // continuation after a crash): what follows starts afresh.
                self.remaining = 0;
                self.collecting = false;
            } else {
                pos = self.consume(page, pos);
                if self.remaining > 0 {
                    return;
                }
                self.finish_record();
                pos = max_align(pos);
            }
        } else if info & XLP_FIRST_IS_CONTRECORD != 0 {
            // The tail of a record begun before this file: skipped.
            let here = (rem_len as usize).min(page.len() - pos);
            pos += here;
            if rem_len as usize > here {
                self.remaining = rem_len - here as u32;
                self.collecting = false;
                return;
            }
            pos = max_align(pos);
        }
        while pos < page.len() {
            let total = u32_at(pos);
            if (total as usize) < RECORD_HEADER_LEN {
                self.done = true;
                return;
            }
            self.record_lsn = address + pos as u64;
            self.record_timeline = timeline;
            self.record_len = total;
            self.remaining = total;
            self.record.clear();
            self.collecting = true;
            pos = self.consume(page, pos);
            if self.remaining > 0 {
                return;
            }
            self.finish_record();
            pos = max_align(pos);
        }
    }

    /// Takes the current record's bytes from `page[pos..]`; returns the position after them.
    fn consume(&mut self, page: &[u8], pos: usize) -> usize {
        let n = (self.remaining as usize).min(page.len() - pos);
        if self.collecting {
            let head = n.min(RECORD_HEADER_LEN.saturating_sub(self.record.len()));
            self.record.extend_from_slice(&page[pos..pos + head]);
            if self.record.len() >= RECORD_HEADER_LEN && !self.may_be_restore_point() {
                self.collecting = false;
                self.record.clear();
            } else {
                self.record.extend_from_slice(&page[pos + head..pos + n]);
            }
        }
        self.remaining -= n as u32;
        pos + n
    }

    fn may_be_restore_point(&self) -> bool {
        let (info, rmid) = (self.record[16], self.record[17]);
        rmid == RM_XLOG_ID
            && info & !XLR_INFO_MASK == XLOG_RESTORE_POINT
            && self.record_len as usize <= MAX_RESTORE_POINT_RECORD
    }

    fn finish_record(&mut self) {
        if self.collecting && self.record.len() == self.record_len as usize {
            if let Some((time, name)) = parse_restore_point(&self.record) {
                self.found.push(RestorePointRecord {
                    name,
                    lsn: Lsn(self.record_lsn),
                    timeline: TimelineId(self.record_timeline),
                    time,
                });
            }
        }
        self.collecting = false;
        self.record.clear();
    }
}

/// `XLOG_BLCKSZ` may be a power of two from 1 to 32 kB (configure --with-wal-blocksize).
fn valid_page_size(size: u32) -> bool {
    size.is_power_of_two() && (1024..=32768).contains(&size)
}

fn max_align(pos: usize) -> usize {
    (pos + 7) & !7
}

/// The time and name of a whole restore point record, if its CRC-32C matches (computed as
/// `XLogRecordAssemble` does: the data after the header, then the header before `xl_crc`).
fn parse_restore_point(record: &[u8]) -> Option<(jiff::Timestamp, String)> {
    let stored = u32::from_le_bytes(
        record[RECORD_CRC_OFFSET..RECORD_HEADER_LEN]
            .try_into()
            .ok()?,
    );
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&record[RECORD_HEADER_LEN..]),
        &record[..RECORD_CRC_OFFSET],
    );
    if crc != stored {
        return None;
    }
    let mut pos = RECORD_HEADER_LEN;
    let data_len = loop {
        let id = *record.get(pos)?;
        pos += 1;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                pos += 1;
                break usize::from(*record.get(pos - 1)?);
            }
            XLR_BLOCK_ID_DATA_LONG => {
                pos += 4;
                break u32::from_le_bytes(record.get(pos - 4..pos)?.try_into().ok()?) as usize;
            }
            XLR_BLOCK_ID_ORIGIN => pos += 2,
            XLR_BLOCK_ID_TOPLEVEL_XID => pos += 4,
            // A block reference: not a restore point.
            _ => return None,
        }
    };
    let data = record.get(pos..pos + data_len)?;
    if data_len < RESTORE_POINT_LEN {
        return None;
    }
    let pg_micros = i64::from_le_bytes(data[..8].try_into().ok()?);
    let time =
        jiff::Timestamp::from_microsecond(pg_micros.checked_add(PG_EPOCH_UNIX_MICROS)?).ok()?;
    let name = &data[8..RESTORE_POINT_LEN];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    Some((time, String::from_utf8_lossy(name).into_owned()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const PAGE: usize = 8192;
    const MAGIC: u16 = 0xD110;
    const SEG_START: u64 = 0x0300_0000;

    /// Writes WAL the way PostgreSQL lays it out: page headers, 8-byte aligned records that
    /// continue across pages with `XLP_FIRST_IS_CONTRECORD` and the bytes still to come.
    pub(crate) struct WalWriter {
        pages: Vec<Vec<u8>>,
        pos: usize,
    }

    impl WalWriter {
        pub(crate) fn new(pages: usize) -> Self {
            let mut w = WalWriter {
                pages: Vec::new(),
                pos: 0,
            };
            for i in 0..pages {
                let mut p = vec![0u8; PAGE];
                p[0..2].copy_from_slice(&MAGIC.to_le_bytes());
                p[4..8].copy_from_slice(&1u32.to_le_bytes());
                p[8..16].copy_from_slice(&(SEG_START + (i * PAGE) as u64).to_le_bytes());
                if i == 0 {
                    p[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
                    p[24..32].copy_from_slice(&42u64.to_le_bytes());
                    p[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
                    p[36..40].copy_from_slice(&(PAGE as u32).to_le_bytes());
                }
                w.pages.push(p);
            }
            w.pos = LONG_PAGE_HEADER_LEN;
            w
        }

        /// Starts the file with the last `len` bytes of a record begun in the file before.
        fn continuation(mut self, len: usize) -> Self {
            let mut left = len;
            let mut page = 0;
            loop {
                let p = &mut self.pages[page];
                let flags = u16::from_le_bytes([p[2], p[3]]) | XLP_FIRST_IS_CONTRECORD;
                p[2..4].copy_from_slice(&flags.to_le_bytes());
                p[16..20].copy_from_slice(&(left as u32).to_le_bytes());
                let header = if page == 0 {
                    LONG_PAGE_HEADER_LEN
                } else {
                    SHORT_PAGE_HEADER_LEN
                };
                let here = left.min(PAGE - header);
                p[header..header + here].fill(0xAB);
                left -= here;
                if left == 0 {
                    self.pos = page * PAGE + max_align(header + here);
                    if self.pos.is_multiple_of(PAGE) {
                        self.pos += SHORT_PAGE_HEADER_LEN;
                    }
                    return self;
                }
                page += 1;
            }
        }

        /// Appends a record; returns its LSN.
        pub(crate) fn record(&mut self, record: &[u8]) -> u64 {
            let lsn = SEG_START + self.pos as u64;
            let mut left = record;
            while !left.is_empty() {
                let (page, off) = (self.pos / PAGE, self.pos % PAGE);
                if off == 0 {
                    let p = &mut self.pages[page];
                    let flags = u16::from_le_bytes([p[2], p[3]]) | XLP_FIRST_IS_CONTRECORD;
                    p[2..4].copy_from_slice(&flags.to_le_bytes());
                    p[16..20].copy_from_slice(&(left.len() as u32).to_le_bytes());
                    self.pos += SHORT_PAGE_HEADER_LEN;
                    continue;
                }
                let here = left.len().min(PAGE - off);
                self.pages[page][off..off + here].copy_from_slice(&left[..here]);
                left = &left[here..];
                self.pos += here;
            }
            self.pos = max_align(self.pos);
            if self.pos.is_multiple_of(PAGE) && self.pos / PAGE < self.pages.len() {
                // The next record starts on a new page: its header comes first.
                self.pos += SHORT_PAGE_HEADER_LEN;
            }
            lsn
        }

        /// Pads with a record so that the next one starts `left` bytes before a page's end.
        fn pad_to_page_end(&mut self, left: usize) {
            let off = self.pos % PAGE;
            let fill = PAGE - off - left;
            assert!(fill >= RECORD_HEADER_LEN + 8 && fill.is_multiple_of(8));
            // The main data's header is 2 bytes up to 255 bytes of data, 5 above.
            let short = fill - RECORD_HEADER_LEN - 2;
            let data = if short < 256 { short } else { short - 3 };
            self.record(&record(9, 0x00, &vec![0x55; data]));
        }

        pub(crate) fn bytes(&self) -> Vec<u8> {
            self.pages.concat()
        }
    }

    /// An `XLogRecord` of resource manager `rmid` with main data `data` and a valid CRC.
    pub(super) fn record(rmid: u8, info: u8, data: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER_LEN];
        if data.len() < 256 {
            r.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, data.len() as u8]);
        } else {
            r.push(XLR_BLOCK_ID_DATA_LONG);
            r.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        r.extend_from_slice(data);
        let total = r.len() as u32;
        r[0..4].copy_from_slice(&total.to_le_bytes());
        r[4..8].copy_from_slice(&777u32.to_le_bytes());
        r[16] = info;
        r[17] = rmid;
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&r[RECORD_HEADER_LEN..]),
            &r[..RECORD_CRC_OFFSET],
        );
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    pub(crate) fn restore_point(name: &str, pg_micros: i64) -> Vec<u8> {
        let mut data = vec![0u8; RESTORE_POINT_LEN];
        data[..8].copy_from_slice(&pg_micros.to_le_bytes());
        data[8..8 + name.len()].copy_from_slice(name.as_bytes());
        record(RM_XLOG_ID, XLOG_RESTORE_POINT, &data)
    }

    fn scan(bytes: &[u8], piece: usize) -> Vec<RestorePointRecord> {
        let mut s = RestorePointScanner::new();
        for p in bytes.chunks(piece) {
            s.feed(p);
        }
        s.finish()
    }

    #[test]
    fn finds_restore_points_between_other_records_in_any_feed_size() {
        let mut w = WalWriter::new(4);
        w.record(&record(10, 0x00, &[1; 100]));
        let first = w.record(&restore_point("before_upgrade", 0));
        w.record(&record(RM_XLOG_ID, 0x30, &[2; 3000]));
        w.record(&record(10, 0x00, &vec![3; 9000]));
        let second = w.record(&restore_point("after", 1_000_000));
        let bytes = w.bytes();
        for piece in [bytes.len(), PAGE, 1 << 20, 4096, 1000, 7] {
            let found = scan(&bytes, piece);
            assert_eq!(found.len(), 2, "feeding {piece} bytes at a time");
            assert_eq!(found[0].name, "before_upgrade");
            assert_eq!(found[0].lsn, Lsn(first));
            assert_eq!(found[0].timeline, TimelineId(1));
            assert_eq!(found[0].time.to_string(), "2000-01-01T00:00:00Z");
            assert_eq!(found[1].name, "after");
            assert_eq!(found[1].lsn, Lsn(second));
            assert_eq!(found[1].time.to_string(), "2000-01-01T00:00:01Z");
        }
    }

    #[test]
    fn follows_a_restore_point_split_across_pages_even_inside_its_header() {
        for left in [8, 16, 40, 64] {
            let mut w = WalWriter::new(3);
            w.record(&record(10, 0x00, &[1; 100]));
            w.pad_to_page_end(left);
            let lsn = w.record(&restore_point("split", 5));
            let found = scan(&w.bytes(), PAGE);
            assert_eq!(found.len(), 1, "{left} bytes before the page end");
            assert_eq!((found[0].name.as_str(), found[0].lsn), ("split", Lsn(lsn)));
        }
    }

    #[test]
    fn skips_the_tail_of_a_record_from_the_previous_file() {
        for tail in [100, PAGE - 40, PAGE + 500] {
            let mut w = WalWriter::new(4).continuation(tail);
            let lsn = w.record(&restore_point("x", 0));
            let found = scan(&w.bytes(), PAGE);
            assert_eq!(found.len(), 1, "a tail of {tail} bytes");
            assert_eq!(found[0].lsn, Lsn(lsn));
        }
    }

    #[test]
    fn ignores_a_restore_point_with_a_bad_crc_or_other_records_of_its_size() {
        let mut w = WalWriter::new(2);
        let mut bad = restore_point("torn", 0);
        bad[40] ^= 1;
        w.record(&bad);
        // The same size and info, another resource manager.
        let mut other = restore_point("heap", 0);
        other[17] = 10;
        w.record(&other);
        assert!(scan(&w.bytes(), PAGE).is_empty());
    }

    #[test]
    fn stops_at_the_end_of_the_wal_written_and_at_a_foreign_page() {
        let names = |found: Vec<RestorePointRecord>| -> Vec<String> {
            found.into_iter().map(|r| r.name).collect()
        };
        let file = |foreign: bool| {
            let mut w = WalWriter::new(3);
            w.record(&restore_point("kept", 0));
            w.pad_to_page_end(0);
            w.record(&restore_point("next_page", 0));
            if foreign {
                w.pages[1][8..16].copy_from_slice(&0x0900_0000u64.to_le_bytes());
            }
            w.bytes()
        };
        assert_eq!(names(scan(&file(false), PAGE)), ["kept", "next_page"]);
        assert_eq!(names(scan(&file(true), PAGE)), ["kept"]);
        // Zeros after a record: the rest is not looked at, even a valid-looking record.
        let mut w = WalWriter::new(2);
        w.record(&restore_point("a", 0));
        w.pos += 64;
        w.record(&restore_point("after_zeros", 0));
        assert_eq!(names(scan(&w.bytes(), PAGE)), ["a"]);
    }

    /// Found by the property tests: a page address within a page of 2^64 overflowed the
    /// address of the next page.
    #[test]
    fn a_page_at_the_end_of_the_address_space_ends_the_walk() {
        let mut w = WalWriter::new(2);
        w.record(&restore_point("x", 0));
        let mut bytes = w.bytes();
        bytes[8..16].copy_from_slice(&(u64::MAX - 100).to_le_bytes());
        assert!(scan(&bytes, PAGE).is_empty());
    }

    #[test]
    fn reads_nothing_from_what_is_not_wal() {
        assert!(scan(&[0u8; 3 * PAGE], PAGE).is_empty());
        assert!(scan(b"not a WAL segment at all, just text.......", 5).is_empty());
        assert!(scan(&[], 1).is_empty());
    }
}

/// Hostile WAL for the restore-point scanner: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::tests::{record, restore_point, WalWriter};
    use super::*;
    use proptest::prelude::*;

    fn scan_in(bytes: &[u8], pieces: &[usize]) -> Vec<RestorePointRecord> {
        let mut s = RestorePointScanner::new();
        let mut rest = bytes;
        let mut sizes = pieces.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
            s.feed(&rest[..n]);
            rest = &rest[n..];
        }
        s.finish()
    }

    /// A long page header of any page size PostgreSQL allows and any page address, then
    /// arbitrary bytes.
    fn hostile_wal() -> impl Strategy<Value = Vec<u8>> {
        (
            0u32..=5,
            prop_oneof![any::<u64>(), (u64::MAX - (1 << 16))..=u64::MAX],
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..8192),
        )
            .prop_map(|(shift, address, info, tail)| {
                let mut b = vec![0u8; LONG_PAGE_HEADER_LEN];
                b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
                b[2..4].copy_from_slice(&(info | XLP_LONG_HEADER).to_le_bytes());
                b[4..8].copy_from_slice(&1u32.to_le_bytes());
                b[8..16].copy_from_slice(&address.to_le_bytes());
                b[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
                b[36..40].copy_from_slice(&(1024u32 << shift).to_le_bytes());
                b.extend_from_slice(&tail);
                b
            })
    }

    /// A record to write: a restore point (name, time) or another with that many data bytes.
    #[derive(Debug, Clone)]
    enum Rec {
        RestorePoint(String, i64),
        Other(usize),
    }

    fn records() -> impl Strategy<Value = Vec<Rec>> {
        proptest::collection::vec(
            prop_oneof![
                ("[a-zA-Z0-9_.-]{1,63}", -(1i64 << 50)..(1i64 << 50))
                    .prop_map(|(name, micros)| Rec::RestorePoint(name, micros)),
                (0usize..20_000).prop_map(Rec::Other),
            ],
            0..12,
        )
    }

    /// The WAL of `records`, and the name and LSN of each restore point in it.
    fn write(records: &[Rec]) -> (Vec<u8>, Vec<(String, u64)>) {
        let encoded: Vec<(Option<&str>, Vec<u8>)> = records
            .iter()
            .map(|r| match r {
                Rec::RestorePoint(name, micros) => {
                    (Some(name.as_str()), restore_point(name, *micros))
                }
                Rec::Other(len) => (None, record(10, 0x00, &vec![0x5A; *len])),
            })
            .collect();
        let total: usize = encoded.iter().map(|(_, b)| b.len() + 64).sum();
        let mut w = WalWriter::new(total / 8000 + 2);
        let mut expected = Vec::new();
        for (name, bytes) in &encoded {
            let lsn = w.record(bytes);
            if let Some(name) = name {
                expected.push((name.to_string(), lsn));
            }
        }
        (w.bytes(), expected)
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn written_restore_points_are_found_whatever_the_feed_sizes(
            records in records(),
            pieces in proptest::collection::vec(1usize..20_000, 1..4),
        ) {
            let (bytes, expected) = write(&records);
            let found: Vec<(String, u64)> = scan_in(&bytes, &pieces)
                .into_iter()
                .map(|r| (r.name, r.lsn.0))
                .collect();
            prop_assert_eq!(found, expected);
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_header_never_panic(
            bytes in hostile_wal(),
            pieces in proptest::collection::vec(1usize..3000, 1..4),
        ) {
            let found = scan_in(&bytes, &pieces);
            prop_assert!(found.len() <= bytes.len() / RECORD_HEADER_LEN);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            piece in 1usize..100,
        ) {
            let _ = scan_in(&bytes, &[piece]);
        }

        #[test]
        fn mutated_wal_never_panics_and_is_read_alike_in_any_feed_size(
            records in records(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
            piece in 1usize..10_000,
        ) {
            let (mut bytes, _) = write(&records);
            for (at, b) in edits {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            prop_assert_eq!(scan_in(&bytes, &[piece]), scan_in(&bytes, &[bytes.len()]));
        }
    }
}
