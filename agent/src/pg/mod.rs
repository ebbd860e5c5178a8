//! PostgreSQL's own vocabulary and binary formats, as pure types: LSNs, timelines, WAL file names,
//! the WAL long page header, timeline history files and `global/pg_control`. Nothing here does I/O; every parser checks
//! lengths before it reads and reports the input it rejected.

pub mod control;
pub mod history;
pub mod lsn;
pub mod restore_point;
pub mod timeline;
pub mod wal_name;
pub mod wal_page;

pub use control::ControlFile;
pub use history::{TimelineHistory, TimelineHistoryEntry};
pub use lsn::Lsn;
pub use restore_point::{RestorePointRecord, RestorePointScanner};
pub use timeline::TimelineId;
pub use wal_name::{WalFileName, WalSegSize, WalSegmentName};
pub use wal_page::WalLongPageHeader;

/// A parse error for one of PostgreSQL's textual or binary formats; `input` is the rejected text
/// (truncated to 80 characters) and `expected` says what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} '{input}': expected {expected}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub expected: &'static str,
}

impl ParseError {
    pub(crate) fn new(what: &'static str, input: &str, expected: &'static str) -> Self {
        let input: String = input.chars().take(80).collect();
        ParseError {
            what,
            input,
            expected,
        }
    }
}
