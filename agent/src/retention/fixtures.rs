//! Archived WAL lists for the retention modules' tests.

use crate::pg::{TimelineId, WalSegSize, WalSegmentName};
use crate::repo::wal::ArchivedWal;

pub const SEG: WalSegSize = WalSegSize::DEFAULT;

/// An archived WAL file named `name` (a segment, `.history` or `.partial`), 100 bytes.
pub fn file(name: &str) -> ArchivedWal {
    ArchivedWal {
        name: name.parse().unwrap(),
        content_id: "a".repeat(64),
        key: format!("wal/{name}"),
        size: 100,
    }
}

/// The name of segment `n` of timeline `tli`.
pub fn seg(tli: u32, n: u64) -> String {
    WalSegmentName::from_segno(TimelineId(tli), n, SEG).to_string()
}

/// Segments `from..=to` of timeline `tli`, archived.
pub fn segs(tli: u32, from: u64, to: u64) -> Vec<ArchivedWal> {
    (from..=to).map(|n| file(&seg(tli, n))).collect()
}
