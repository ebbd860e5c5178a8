//! `repo.json`: the repository's format version and the one cluster it belongs to. Created by the
//! first push into an empty location; every later push and backup is checked against it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout::REPO_JSON;
use super::RepoError;
use crate::crypto::slots::KEYS_PREFIX;
use crate::crypto::EncryptionRecord;
use crate::pg::WalSegSize;
use crate::storage::{PutMode, Storage, StorageError};

/// The repository format this build writes and reads (`docs/repository-format.md`).
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoIdentity {
    pub format_version: u32,
    /// `pg_control`'s system identifier, as a decimal string (JSON numbers lose u64 precision).
    #[serde(with = "super::u64_string")]
    pub system_identifier: u64,
    pub pg_major: u32,
    pub wal_segment_size: WalSegSize,
    /// How the repository is encrypted; absent when it is not (`repo::encryption`). Set when
    /// `repo.json` is created, from the storage that creates it, and never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionRecord>,
}

impl RepoIdentity {
    pub fn new(system_identifier: u64, pg_major: u32, wal_segment_size: WalSegSize) -> Self {
        RepoIdentity {
            format_version: FORMAT_VERSION,
            system_identifier,
            pg_major,
            wal_segment_size,
            encryption: None,
        }
    }

    /// Reads `repo.json`.
    ///
    /// # Errors
    /// [`RepoError::NotInitialized`] when absent, [`RepoError::Corrupt`] when unreadable or of a
    /// newer format, storage errors otherwise.
    pub async fn load(storage: &dyn Storage) -> Result<RepoIdentity, RepoError> {
        match storage.get(REPO_JSON).await {
            Ok(bytes) => Self::decode(&bytes),
            Err(StorageError::NotFound { .. }) => Err(RepoError::NotInitialized {
                location: storage.location(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn decode(bytes: &[u8]) -> Result<RepoIdentity, RepoError> {
        let id: RepoIdentity = serde_json::from_slice(bytes).map_err(|e| RepoError::Corrupt {
            key: REPO_JSON.into(),
            message: e.to_string(),
        })?;
        if id.format_version != FORMAT_VERSION {
            return Err(RepoError::Corrupt {
                key: REPO_JSON.into(),
                message: format!(
                    "format version {} is not {FORMAT_VERSION}; use a pgpitr that reads it",
                    id.format_version
                ),
            });
        }
        Ok(id)
    }

    /// Checks that `observed` (read from WAL or the server) matches the repository, creating
    /// `repo.json` when the location is empty.
    ///
    /// # Errors
    /// A different system identifier, major version or segment size; a non-empty location
    /// without `repo.json`; storage errors.
    pub async fn ensure(
        storage: &dyn Storage,
        observed: &RepoIdentity,
    ) -> Result<RepoIdentity, RepoError> {
        let existing = match Self::load(storage).await {
            Ok(id) => id,
            Err(RepoError::NotInitialized { .. }) => {
                storage.check_writable().await?;
                let objects = storage.list("").await?;
                let has_slots = objects.iter().any(|o| o.key.starts_with(KEYS_PREFIX));
                if has_slots && storage.encryption().is_none() {
                    return Err(RepoError::EncryptionMismatch {
                        location: storage.location(),
                    });
                }
                if objects.iter().any(|o| !o.key.starts_with(KEYS_PREFIX)) {
                    return Err(RepoError::NotARepository {
                        location: storage.location(),
                    });
                }
                let created = RepoIdentity {
                    encryption: storage.encryption(),
                    ..observed.clone()
                };
                let body = serde_json::to_vec_pretty(&created).expect("serialisable");
                match storage
                    .put(REPO_JSON, Bytes::from(body), PutMode::Create)
                    .await
                {
                    Ok(()) => return Ok(created),
                    // Another process created it first: check against theirs.
                    Err(StorageError::AlreadyExists { .. }) => Self::load(storage).await?,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e),
        };
        existing.check(storage, observed)?;
        Ok(existing)
    }

    /// Compares two identities, naming the first difference.
    pub fn check(&self, storage: &dyn Storage, observed: &RepoIdentity) -> Result<(), RepoError> {
        let location = storage.location();
        // `repo::encryption::open` refuses these first; checked again before any write.
        if self.encryption != storage.encryption() {
            return Err(RepoError::EncryptionMismatch { location });
        }
        if self.system_identifier != observed.system_identifier {
            return Err(RepoError::OtherCluster {
                location,
                repo: self.system_identifier,
                found: observed.system_identifier,
            });
        }
        if self.pg_major != observed.pg_major {
            return Err(RepoError::OtherMajor {
                location,
                repo: self.pg_major,
                found: observed.pg_major,
            });
        }
        if self.wal_segment_size != observed.wal_segment_size {
            return Err(RepoError::OtherSegmentSize {
                location,
                repo: self.wal_segment_size.bytes(),
                found: observed.wal_segment_size.bytes(),
            });
        }
        Ok(())
    }
}
