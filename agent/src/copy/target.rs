//! A copy's side of `pgpitr copy`: binding an empty location to the repository's identity (and
//! key slots), refusing a location that belongs to something else, and sending one object as
//! stored, verified on arrival.
//!
//! An object is read from the repository's storage as stored (sealed, for an encrypted
//! repository), written to the copy under the same key with [`PutMode::Create`], then read back
//! through the copy's opened storage and checked: a plain copy must return exactly the bytes
//! sent; an encrypted one must open them (authentication under the same key, bound to the
//! object's key); and what it returns must pass the object's own check (a WAL file's SHA-256 and
//! part index, every chunk of a pack, a pack index or manifest that decodes and names itself).
//! An object that fails is deleted from the copy again.

use bytes::Bytes;

use crate::backup::pack::{PackIndex, PACK_INDEX_VERSION};
use crate::crypto::slots::{self, KEYS_PREFIX};
use crate::repo::layout::REPO_JSON;
use crate::repo::manifest::{BackupId, BackupManifest};
use crate::repo::wal::ArchivedWal;
use crate::repo::{codec, RepoError, RepoIdentity};
use crate::storage::{PutMode, Storage, StorageError};

/// Why a copy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("copy {location} is the repository itself; give the copy another bucket, prefix or directory")]
    SameLocation { location: String },
    #[error("copy {location} is {copy} but the repository is {repo}; a copy must be encrypted exactly as its repository (same key): use an empty location for the copy")]
    Encryption {
        location: String,
        copy: &'static str,
        repo: &'static str,
    },
    #[error("copy {location} holds objects but no repo.json (or key slots of another repository); use an empty bucket, prefix or directory for the copy")]
    NotEmpty { location: String },
}

impl From<StorageError> for TargetError {
    fn from(e: StorageError) -> Self {
        TargetError::Repo(e.into())
    }
}

fn describe(encrypted: bool) -> &'static str {
    if encrypted {
        "encrypted"
    } else {
        "not encrypted"
    }
}

/// Makes `copy_raw` (a copy's storage as it is) a repository of the same cluster as the
/// repository whose storage is `source_raw` and whose identity is `source`: an empty location
/// gets the key slots, then `repo.json` (the same bytes); a location with a `repo.json` must
/// name the same system identifier, major version, segment size and encryption, and then only
/// gets the key slots it lacks. Returns whether `repo.json` was created.
///
/// # Errors
/// [`TargetError`]: the same location, another cluster's or another key's repository, objects
/// without `repo.json`; storage errors. Nothing is written to a copy that is refused.
pub async fn prepare(
    source_raw: &dyn Storage,
    source: &RepoIdentity,
    copy_raw: &dyn Storage,
) -> Result<bool, TargetError> {
    let location = copy_raw.location();
    if location.trim_end_matches('/') == source_raw.location().trim_end_matches('/') {
        return Err(TargetError::SameLocation { location });
    }
    let source_slots = source_raw.list(KEYS_PREFIX).await?;
    let created = match RepoIdentity::load(copy_raw).await {
        Ok(theirs) => {
            if theirs.encryption.is_some() != source.encryption.is_some() {
                return Err(TargetError::Encryption {
                    location,
                    copy: describe(theirs.encryption.is_some()),
                    repo: describe(source.encryption.is_some()),
                });
            }
            if theirs.system_identifier != source.system_identifier {
                return Err(RepoError::OtherCluster {
                    location,
                    repo: theirs.system_identifier,
                    found: source.system_identifier,
                }
                .into());
            }
            if theirs.pg_major != source.pg_major {
                return Err(RepoError::OtherMajor {
                    location,
                    repo: theirs.pg_major,
                    found: source.pg_major,
                }
                .into());
            }
            if theirs.wal_segment_size != source.wal_segment_size {
                return Err(RepoError::OtherSegmentSize {
                    location,
                    repo: theirs.wal_segment_size.bytes(),
                    found: source.wal_segment_size.bytes(),
                }
                .into());
            }
            // Both encrypted, with another key.
            if theirs.encryption != source.encryption {
                return Err(TargetError::Repo(RepoError::EncryptionMismatch {
                    location,
                }));
            }
            false
        }
        Err(RepoError::NotInitialized { .. }) => {
            copy_raw.check_writable().await?;
            let theirs = copy_raw.list("").await?;
            let ours: std::collections::HashSet<&str> =
                source_slots.iter().map(|o| o.key.as_str()).collect();
            // Only the repository's own key slots, left by a copy killed before repo.json.
            if theirs.iter().any(|o| !ours.contains(o.key.as_str())) {
                if !theirs.iter().any(|o| o.key.starts_with(KEYS_PREFIX))
                    || source.encryption.is_some()
                {
                    return Err(TargetError::NotEmpty { location });
                }
                return Err(TargetError::Encryption {
                    location,
                    copy: "encrypted",
                    repo: "not encrypted",
                });
            }
            true
        }
        Err(e) => return Err(e.into()),
    };
    // Key slots the copy lacks (a passphrase added to the repository opens the copy too); a
    // slot removed from the repository stays in the copy until removed there.
    let have: std::collections::HashSet<String> = copy_raw
        .list(KEYS_PREFIX)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    for o in source_slots
        .iter()
        .filter(|o| slots::parse_slot_key(&o.key).is_some() && !have.contains(&o.key))
    {
        let body = source_raw.get(&o.key).await?;
        put_once(copy_raw, &o.key, body).await?;
    }
    if created {
        let body = source_raw.get(REPO_JSON).await?;
        put_once(copy_raw, REPO_JSON, body).await?;
    }
    Ok(created)
}

/// Writes `body` under `key` unless an object is there already (a killed run's, or a racing
/// writer's: the same key holds the same content in a repository).
async fn put_once(storage: &dyn Storage, key: &str, body: Bytes) -> Result<(), StorageError> {
    match storage.put(key, body, PutMode::Create).await {
        Ok(()) | Err(StorageError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// How an object that arrived is checked, besides being the bytes sent (or opening).
#[derive(Debug, Clone, Copy)]
pub enum Check<'a> {
    /// Decompresses to the SHA-256 of its key, part index included.
    Wal(&'a ArchivedWal),
    /// Every chunk the index lists decompresses to its SHA-256.
    Pack(&'a PackIndex),
    /// Decodes to this index.
    Index(&'a PackIndex),
    /// Decodes to a manifest of this backup.
    Manifest(&'a BackupId),
    /// Nothing more (PostgreSQL's `backup_manifest`, restore points).
    Opaque,
}

/// What [`send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Bytes as stored.
    pub bytes: u64,
}

/// Sends `key` from `source_raw` to `copy_raw` as stored and verifies it through `copy`
/// (the copy's opened storage) with `check`; an object that fails is deleted from the copy.
///
/// # Errors
/// Storage errors of either side; [`RepoError::Corrupt`] for an object that does not verify
/// (the message says whether it was sent wrong or is wrong in the repository).
pub async fn send(
    source_raw: &dyn Storage,
    copy_raw: &dyn Storage,
    copy: &dyn Storage,
    key: &str,
    check: Check<'_>,
) -> Result<Sent, RepoError> {
    let body = source_raw.get(key).await?;
    let bytes = body.len() as u64;
    put_once(copy_raw, key, body.clone()).await?;
    if let Err(message) = verify(copy, key, &body, check).await? {
        let _ = copy_raw.delete(key).await;
        return Err(RepoError::Corrupt {
            key: format!("{} in copy {}", key, copy.location()),
            message: format!(
                "{message}; removed from the copy (`pgpitr verify` checks the repository)"
            ),
        });
    }
    Ok(Sent { bytes })
}

/// Reads `key` back from `copy` and checks it; `Ok(Err(message))` when it does not verify.
async fn verify(
    copy: &dyn Storage,
    key: &str,
    sent: &Bytes,
    check: Check<'_>,
) -> Result<Result<(), String>, RepoError> {
    let back = match copy.get(key).await {
        Ok(b) => b,
        Err(StorageError::Unauthentic { message, .. }) => {
            return Ok(Err(format!(
                "does not open with the repository's key: {message}"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if copy.encryption().is_none() && back != *sent {
        return Ok(Err("read back different bytes than were sent".into()));
    }
    Ok(match check {
        Check::Wal(w) => check_wal(copy, &back, w),
        Check::Pack(index) => check_pack(&back, index),
        Check::Index(index) => match serde_json::from_slice::<PackIndex>(&back) {
            Ok(i) if &i == index && i.format_version == PACK_INDEX_VERSION => Ok(()),
            Ok(_) => Err("is not the repository's pack index".into()),
            Err(e) => Err(format!("not a valid pack index: {e}")),
        },
        Check::Manifest(id) => match serde_json::from_slice::<BackupManifest>(&back) {
            Ok(m) if &m.id == id => Ok(()),
            Ok(m) => Err(format!("describes backup {} instead", m.id)),
            Err(e) => Err(format!("not a valid manifest: {e}")),
        },
        Check::Opaque => Ok(()),
    })
}

fn check_wal(copy: &dyn Storage, plain: &[u8], w: &ArchivedWal) -> Result<(), String> {
    let ids = copy.content_ids();
    let expected = codec::Expected {
        ids: &ids,
        id: &w.content_id,
    };
    codec::decompress_verified(plain, expected, &mut std::io::sink()).map_err(|e| e.to_string())?;
    codec::decode_parts(plain, expected, &|_, _| Ok(())).map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether every chunk `index` lists decompresses from `pack` to its SHA-256; the message
/// names the first that does not.
pub fn check_pack(pack: &[u8], index: &PackIndex) -> Result<(), String> {
    for c in &index.chunks {
        let frame = usize::try_from(c.offset)
            .ok()
            .zip(usize::try_from(c.offset + c.length).ok())
            .and_then(|(a, b)| pack.get(a..b))
            .ok_or_else(|| {
                format!(
                    "chunk {} lies beyond the pack's {} bytes",
                    c.sha256,
                    pack.len()
                )
            })?;
        codec::decompress_verified(
            frame,
            codec::Expected::sha256(&c.sha256),
            &mut std::io::sink(),
        )
        .map_err(|e| format!("chunk {} at offset {}: {e}", c.sha256, c.offset))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::slots::Passphrase;
    use crate::pg::WalSegSize;
    use crate::storage::local::LocalStorage;
    use crate::storage::DynStorage;
    use std::sync::Arc;

    fn raw(dir: &std::path::Path) -> DynStorage {
        Arc::new(LocalStorage::new(dir.to_path_buf()))
    }

    fn identity(system_identifier: u64) -> RepoIdentity {
        RepoIdentity::new(system_identifier, 15, WalSegSize::DEFAULT)
    }

    async fn repository(dir: &std::path::Path, system_identifier: u64) -> DynStorage {
        let s = raw(dir);
        RepoIdentity::ensure(s.as_ref(), &identity(system_identifier))
            .await
            .unwrap();
        s
    }

    fn keys(dir: &std::path::Path) -> Vec<String> {
        let mut out: Vec<String> = walkdir::WalkDir::new(dir)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().strip_prefix(dir).unwrap().display().to_string())
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn an_empty_location_becomes_a_copy_once() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = repository(a.path(), 42).await;
        let copy = raw(b.path());
        assert!(prepare(source.as_ref(), &identity(42), copy.as_ref())
            .await
            .unwrap());
        assert!(!prepare(source.as_ref(), &identity(42), copy.as_ref())
            .await
            .unwrap());
        assert_eq!(
            std::fs::read(b.path().join(REPO_JSON)).unwrap(),
            std::fs::read(a.path().join(REPO_JSON)).unwrap()
        );
    }

    #[tokio::test]
    async fn another_clusters_repository_or_a_foreign_location_is_refused_untouched() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let source = repository(a.path(), 42).await;
        repository(b.path(), 7).await;
        let before = keys(b.path());
        let e = prepare(source.as_ref(), &identity(42), raw(b.path()).as_ref())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("system identifier 7, not 42"), "{e}");
        assert_eq!(keys(b.path()), before);
        std::fs::write(c.path().join("notes.txt"), "x").unwrap();
        let e = prepare(source.as_ref(), &identity(42), raw(c.path()).as_ref())
            .await
            .unwrap_err();
        assert!(matches!(e, TargetError::NotEmpty { .. }), "{e}");
        assert_eq!(keys(c.path()), ["notes.txt"]);
        let e = prepare(source.as_ref(), &identity(42), source.as_ref())
            .await
            .unwrap_err();
        assert!(matches!(e, TargetError::SameLocation { .. }), "{e}");
    }

    #[tokio::test]
    async fn encrypted_and_plain_never_mix_and_slots_travel() {
        let pass = Passphrase::new(b"correct horse".to_vec()).unwrap();
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        // An encrypted repository.
        let source_raw = raw(a.path());
        crate::repo::encryption::create(source_raw.as_ref(), &pass)
            .await
            .unwrap();
        let source = crate::repo::encryption::open(source_raw.clone(), Some(&pass), None)
            .await
            .unwrap();
        let id = RepoIdentity::ensure(source.as_ref(), &identity(42))
            .await
            .unwrap();
        // Into a plain repository of the same cluster: refused, untouched.
        repository(b.path(), 42).await;
        let before = keys(b.path());
        let e = prepare(source_raw.as_ref(), &id, raw(b.path()).as_ref())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("is not encrypted but the repository is encrypted"),
            "{e}"
        );
        assert_eq!(keys(b.path()), before);
        // Into an empty location: slots and repo.json; the same passphrase opens it.
        let copy_raw = raw(c.path());
        assert!(prepare(source_raw.as_ref(), &id, copy_raw.as_ref())
            .await
            .unwrap());
        let copy = crate::repo::encryption::open(copy_raw.clone(), Some(&pass), None)
            .await
            .unwrap();
        assert_eq!(copy.encryption(), source.encryption());
        // A sealed object copied as stored opens in the copy and is checked.
        let key = "backups/20260101T000000Z/backup_manifest";
        source
            .put(key, Bytes::from_static(b"{}"), PutMode::Create)
            .await
            .unwrap();
        let sent = send(
            source_raw.as_ref(),
            copy_raw.as_ref(),
            copy.as_ref(),
            key,
            Check::Opaque,
        )
        .await
        .unwrap();
        assert!(sent.bytes > 2);
        assert_eq!(copy.get(key).await.unwrap(), Bytes::from_static(b"{}"));
        // A plain repository into an encrypted copy: refused.
        let d = tempfile::tempdir().unwrap();
        let plain = repository(d.path(), 42).await;
        let e = prepare(plain.as_ref(), &identity(42), copy_raw.as_ref())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("is encrypted but the repository is not encrypted"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_object_that_does_not_verify_is_removed_from_the_copy() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = repository(a.path(), 42).await;
        let copy = raw(b.path());
        prepare(source.as_ref(), &identity(42), copy.as_ref())
            .await
            .unwrap();
        let id = crate::repo::manifest::BackupId::parse("20260101T000000Z").unwrap();
        let key = crate::repo::layout::backup_manifest_key(&id);
        source
            .put(&key, Bytes::from_static(b"not json"), PutMode::Create)
            .await
            .unwrap();
        let e = send(
            source.as_ref(),
            copy.as_ref(),
            copy.as_ref(),
            &key,
            Check::Manifest(&id),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not a valid manifest"), "{e}");
        assert!(copy.head(&key).await.unwrap().is_none());
    }
}
