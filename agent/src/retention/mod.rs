//! Retention: which backups, WAL files and packs `pgpitr expire` may delete. `facts` finds the
//! latest timeline and the newest backup that restores it, `policy` decides which backups a
//! retention policy keeps (always that one among them), `window` which kept backups keep
//! continuous WAL under a WAL window (`keep_wal_within`), `wal` which archived WAL no kept
//! backup needs and `promise` how long Object Lock keeps what the policy promises — pure
//! functions with table-driven tests; the I/O (listing, locking, deleting in a crash-safe
//! order) lives in `commands::expire`.

pub mod facts;
#[cfg(test)]
mod fixtures;
pub mod policy;
pub mod promise;
pub mod wal;
pub mod window;

pub use facts::{backup_facts, live_timeline, LiveTimeline};
pub use policy::{decide, BackupFacts, KeepWithin, PolicyError, RetentionPolicy, Verdict};
pub use wal::{expirable_under, expirable_wal};
pub use window::{wal_window, WalWindow, WindowBase};
