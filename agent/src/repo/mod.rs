//! The repository: what pgpitr keeps in storage and how it is laid out. `layout` builds every
//! key; `identity` owns `repo.json` (which cluster the repository belongs to); `codec` is the
//! lz4 + SHA-256 envelope of stored files; `wal` is the WAL archive; `staging` the
//! objects killed writers leave behind.

pub mod codec;
pub mod encryption;
pub mod error;
pub mod identity;
pub mod json_objects;
pub mod layout;
pub mod lease;
pub mod lock;
pub mod manifest;
pub mod part_index;
pub mod restore_points;
pub mod runs;
pub mod staging;
mod u64_string;
pub mod wal;

pub use error::RepoError;
pub use identity::RepoIdentity;
