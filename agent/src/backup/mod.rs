//! Base backups: the repository side of `pgpitr backup`, and the way back out.
//!
//! - [`tar_reader`] turns the tar archives of BASE_BACKUP (fed as a stream of byte buffers)
//!   into [`FileEntry`](crate::repo::manifest::FileEntry)s, cutting every regular file into
//!   fixed [`CHUNK_SIZE`] chunks;
//! - [`chunk_workers`] hashes and compresses the chunks on worker threads;
//! - [`pack`] stores chunks: each chunk is addressed by the SHA-256 of its plain bytes,
//!   lz4-compressed, and appended to a pack object (`packs/<xx>/<id>.pack`, about
//!   [`PACK_TARGET_SIZE`]) followed by the pack's index (`.idx`). A chunk already listed in any
//!   pack index is referenced, not stored again;
//! - [`incremental`] makes the files of a PostgreSQL 17+ incremental backup complete again
//!   (against the parent backup's stored files), so that every stored backup is complete;
//! - [`materialize`] writes a backup back out as a directory, verifying every chunk.
//!
//! Invariants: a pack index is written only after its pack, so every chunk an index lists is
//! readable; a backup's `manifest.json` is written only after all its packs and indexes, so a
//! manifest never references a chunk that is not stored. An interrupted backup leaves packs
//! (and indexes) but no manifest; the next backup reuses their chunks.

pub mod chunk_workers;
pub mod incremental;
pub mod materialize;
pub mod pack;
pub mod tar_reader;

pub use materialize::{materialize, MaterializeOptions};

/// Files are cut into chunks of this many plain bytes (the last chunk of a file may be
/// shorter). PostgreSQL changes files in place, so fixed boundaries dedupe well.
pub const CHUNK_SIZE: usize = 4 * 1024 * 1024;

/// A pack is sealed and uploaded once it holds this many compressed bytes.
/// Up to three packs are in memory at once (being filled, queued, being uploaded).
pub const PACK_TARGET_SIZE: usize = 16 * 1024 * 1024;
