//! Copies: second locations that `pgpitr copy` fills from the repository (docs/operations.md,
//! "A second location"). A copy is a complete repository of the same cluster: the same
//! `repo.json` and, when encrypted, the same key (its slots are copied), so that every object is
//! copied as stored, sealed bytes included (the AAD of a sealed object is its key, which is the
//! same in the copy).
//!
//! `select` decides what to send (pure); `target` prepares a copy's identity and sends and
//! verifies one object at a time (I/O); `commands::copy` orders the sending so that a copy
//! never claims what it does not hold: restore points, timeline histories and WAL (oldest
//! position first, one at a time, so that a kill leaves no gap), then packs (each pack before
//! its index), then, per backup, PostgreSQL's `backup_manifest` and last `manifest.json`, the
//! backup's commit point in the copy as in the repository.

pub mod read;
pub mod select;
pub mod target;
