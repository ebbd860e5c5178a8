//! Errors of the repository layer. Each names the object, WAL file or value concerned, and says
//! what the user can do where there is something to do.

use crate::pg::WalFileName;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{location} is not a pgpitr repository: it holds objects but no repo.json; use an empty directory or prefix")]
    NotARepository { location: String },
    #[error("{location} holds no pgpitr repository yet (no repo.json): archive a WAL segment into it first, or check `repo`")]
    NotInitialized { location: String },
    #[error("repository {location} belongs to the cluster with system identifier {repo}, not {found}; give each cluster its own repository")]
    OtherCluster {
        location: String,
        repo: u64,
        found: u64,
    },
    #[error("repository {location} holds PostgreSQL {repo} WAL, this is PostgreSQL {found}; after a major upgrade use a new repository")]
    OtherMajor {
        location: String,
        repo: u32,
        found: u32,
    },
    #[error("repository {location} holds WAL segments of {repo} bytes, this cluster uses {found}")]
    OtherSegmentSize {
        location: String,
        repo: u32,
        found: u32,
    },
    #[error("repository {location}: its encryption does not match the configuration (`encryption_passphrase_file`); see `pgpitr key list`")]
    EncryptionMismatch { location: String },
    #[error("corrupt repository object '{key}': {message}")]
    Corrupt { key: String, message: String },
    #[error("WAL file '{name}' already exists in the archive with a different checksum (archived {existing}, this one {new}); the archived copy was left untouched")]
    DifferentContent {
        name: WalFileName,
        existing: String,
        new: String,
    },
    #[error("WAL file '{name}' is stored {count} times with different contents; remove the wrong copy (see `pgpitr verify`)")]
    Ambiguous { name: WalFileName, count: usize },
    #[error("'{path}' is not the WAL segment {name}: {message}")]
    NotThatSegment {
        path: String,
        name: WalFileName,
        message: String,
    },
    #[error("{path}: {}", crate::storage::io_message(.source))]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl RepoError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        RepoError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
