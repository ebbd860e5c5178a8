//! Retention: which backups, WAL files and packs `pgpitr expire` may delete. `policy` decides
//! which backups a retention policy keeps and `wal` which archived WAL no kept backup needs —
//! both pure functions with table-driven tests; the I/O (listing, locking, deleting in a
//! crash-safe order) lives in `commands::expire`.

pub mod policy;
pub mod wal;

pub use policy::{decide, BackupFacts, KeepWithin, PolicyError, RetentionPolicy, Verdict};
pub use wal::expirable_wal;
