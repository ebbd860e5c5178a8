//! pgpitr: PostgreSQL physical backup and WAL archiving for point-in-time recovery.
//!
//! The library owns everything real; the three binaries (`pgpitr`, `pgpitr-archive`,
//! `pgpitr-restore`) parse arguments and map errors to exit codes.

pub mod backup;
pub mod commands;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod heap;
pub mod logging;
pub mod monitor;
pub mod pg;
pub mod pgsql;
#[cfg(test)]
pub(crate) mod proptest_config;
pub mod recovery;
pub mod repo;
pub mod retention;
pub mod storage;
pub mod walsender;
