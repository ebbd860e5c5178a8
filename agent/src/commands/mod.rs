//! One module per command. Each takes a loaded [`crate::config::Config`] and its own arguments
//! and returns a typed result; the binaries map results to output and exit codes.

pub mod archive_get;
pub mod archive_push;
pub mod backup;
pub mod check;
pub mod copy;
pub mod drill;
pub mod expire;
pub mod init;
pub mod key;
pub mod list;
pub mod metrics;
pub mod plan;
pub mod restore;
pub mod spool;
pub mod status;
pub mod unlock;
pub mod verify;
