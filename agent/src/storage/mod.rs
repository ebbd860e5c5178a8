//! The object store under a repository: one small trait, [`Storage`], with a local-directory
//! implementation ([`local::LocalStorage`]) and an S3 one ([`s3::S3Storage`]). Keys are
//! `/`-separated relative paths built only by `repo::layout`; the contracts below hold on every
//! backend and are checked by one conformance suite (`agent/tests/storage_conformance.rs`).

pub mod encrypted;
pub mod local;
pub mod s3;

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

/// How [`Storage::put`] treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with [`StorageError::AlreadyExists`] if the key exists. Local directories guarantee
    /// this atomically (hard link); S3 sends `If-None-Match: *` after a HEAD, so a server that
    /// ignores the header (Garage) leaves a window in which a racing writer wins — repository keys
    /// that must never be overwritten therefore carry their content's hash.
    Create,
    /// Replace any existing object atomically.
    Overwrite,
}

/// The S3 Object Lock retention mode of the objects pgpitr locks (`s3_object_lock`).
///
/// Both refuse every deletion of a locked object version and every shortening of its lock
/// until the lock ends; they differ only for a user with `s3:BypassGovernanceRetention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// `GOVERNANCE`: a user with `s3:BypassGovernanceRetention` (and the bypass header) can
    /// still delete a locked object or shorten its lock.
    Governance,
    /// `COMPLIANCE`: nobody, not even the account's root user, can delete a locked object or
    /// shorten its lock before it ends.
    Compliance,
}

impl LockMode {
    /// `governance` or `compliance` (any case); `None` for anything else.
    pub fn parse(s: &str) -> Option<LockMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "governance" => Some(LockMode::Governance),
            "compliance" => Some(LockMode::Compliance),
            _ => None,
        }
    }

    /// `governance` or `compliance`, as configured and reported.
    pub fn name(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

/// The Object Lock a storage puts on what it writes: every object whose key `is_mutable` does
/// not claim is written locked in `mode` until `retain` after the write (by this host's
/// clock). Mutable objects (pgpitr rewrites or removes them in normal operation: the
/// repository lock, leases, run records, `repo.json`, key slots) are never locked.
#[derive(Clone)]
pub struct ObjectLock {
    pub mode: LockMode,
    /// How long a new object stays locked ([`crate::retention::promise`]).
    pub retain: std::time::Duration,
    /// How long a new WAL file (`wal/…`) stays locked: at least `retain`, longer under a WAL
    /// window ([`crate::retention::promise::wal_retention`]).
    pub retain_wal: std::time::Duration,
    /// Keys never locked.
    pub is_mutable: fn(&str) -> bool,
}

impl std::fmt::Debug for ObjectLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLock")
            .field("mode", &self.mode)
            .field("retain", &self.retain)
            .field("retain_wal", &self.retain_wal)
            .finish_non_exhaustive()
    }
}

/// An object's key, size in bytes and storage time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was written, by the storage's clock (local: the file's mtime; S3:
    /// `Last-Modified`); `None` when the backend does not say. `status` and `metrics` read
    /// the age of the newest WAL and the bytes written lately from it, with no extra request.
    pub modified: Option<jiff::Timestamp>,
}

/// An object a writer started and never finished: a local repository's temporary file
/// (`.tmp.*`) or an incomplete S3 multipart upload. A writer killed before its commit leaves one
/// for good; none is ever part of a backup or of the WAL archive, and no reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingObject {
    /// Local: the temporary file's own path under the root (`wal/0000000100000000/.tmp.<pid>.<n>`);
    /// S3: the key the upload was for, under the prefix.
    pub key: String,
    /// The S3 upload id; `None` for a local temporary file.
    pub upload_id: Option<String>,
    /// Bytes written so far (local: the file's size; S3: the sum of the uploaded parts).
    pub size: u64,
    /// By the storage's clock: local, the file's mtime (its last write); S3, the upload's
    /// `Initiated` time. This host's "now" when the backend cannot tell, so that such an object
    /// never looks abandoned.
    pub modified: jiff::Timestamp,
}

/// Storage errors, split by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object '{key}' does not exist")]
    NotFound { key: String },
    #[error("object '{key}' already exists")]
    AlreadyExists { key: String },
    /// Network failures, timeouts, 5xx and throttling that persisted through the retries.
    #[error("storage unavailable for '{key}': {message}")]
    Transient { key: String, message: String },
    /// Anything a retry cannot fix: permissions, a missing bucket or directory, bad credentials.
    #[error("storage error for '{key}': {message}")]
    Permanent { key: String, message: String },
    /// An object of an encrypted repository that failed authentication: altered, moved to
    /// another key, stored in the clear, or sealed with another repository's key.
    #[error("object '{key}' of the encrypted repository failed authentication: {message}")]
    Unauthentic { key: String, message: String },
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// A flat key space of immutable-by-convention objects.
///
/// Contracts, on every implementation:
/// - `put` is atomic (no reader ever sees part of an object) and durable once it returns `Ok`
///   (local: file and directory fsynced; S3: the PUT or multipart completion was acknowledged).
/// - `get`/`get_range` return exactly the bytes last put, or [`StorageError::NotFound`].
/// - `list` returns every object whose key starts with `prefix` (a prefix of any string, not only
///   of directories), sorted by key, never a partially written object, each with its size and,
///   where the backend lists it, its storage time.
/// - `delete` of a missing key succeeds. With Object Lock ([`Storage::object_lock`]) it removes
///   every version of the key by its id, and fails with [`StorageError::Permanent`] on a
///   version that is still locked (callers ask [`Storage::locked_until`] first).
#[async_trait::async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Where the objects live, for messages: `/var/lib/pgpitr/repo` or `s3://bucket/prefix`.
    fn location(&self) -> String;

    /// How content hashes appear in object keys: the SHA-256 itself, or in an encrypted
    /// repository a keyed hash of it ([`crate::crypto::keys::ContentIds`]).
    fn content_ids(&self) -> crate::crypto::keys::ContentIds {
        crate::crypto::keys::ContentIds::Sha256
    }

    /// The encryption this storage applies, as `repo.json` records it; `None` when objects are
    /// stored as written.
    fn encryption(&self) -> Option<crate::crypto::EncryptionRecord> {
        None
    }

    /// Checks that the location exists and can be written, with an error that says what to fix
    /// (with Object Lock configured: also that the bucket has Object Lock enabled and no
    /// default retention).
    async fn check_writable(&self) -> StorageResult<()>;

    /// The Object Lock this storage puts on what it writes; `None` when it locks nothing (a
    /// local directory, or `s3_object_lock` unset). With a lock, objects are versioned and
    /// [`Storage::delete`] removes every version by its id.
    fn object_lock(&self) -> Option<&ObjectLock> {
        None
    }

    /// When the lock on the current version of `key` ends, if it has not ended yet; `None`
    /// when the object is not locked, does not exist, or the storage locks nothing. `expire`
    /// asks before deleting and reports a locked object as retained.
    ///
    /// # Errors
    /// Storage errors of the HEAD request.
    async fn locked_until(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        let _ = key;
        Ok(None)
    }

    /// Makes the current version of `key` stay locked at least until `until` (PutObjectRetention
    /// in the object's own mode, else the configured one); a lock that already lasts longer is
    /// left alone, never shortened. A no-op on a storage without Object Lock and for a mutable
    /// key; a missing object succeeds. Returns whether the lock was extended.
    ///
    /// # Errors
    /// Storage errors.
    async fn extend_lock(&self, key: &str, until: jiff::Timestamp) -> StorageResult<bool> {
        let _ = (key, until);
        Ok(false)
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StorageResult<()>;

    /// `put` of the concatenation of `parts`, with the same guarantees. Backends that can write
    /// the parts one after another (local files) avoid the copy that the default makes.
    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StorageResult<()> {
        let mut all = Vec::with_capacity(parts.iter().map(Bytes::len).sum());
        for p in &parts {
            all.extend_from_slice(p);
        }
        drop(parts);
        self.put(key, Bytes::from(all), mode).await
    }

    /// Starts an object whose key is known only once its bytes are written (a WAL file's key
    /// holds the SHA-256 of its plain bytes), to be stored under a key in `dir` (a prefix
    /// ending in `/`) by [`Storage::put_staged`]. The default keeps the bytes in memory until
    /// then; local storage writes them to a temporary file in that directory as they come.
    async fn stage(&self, dir: &str) -> StorageResult<Staged> {
        let _ = dir;
        Ok(Staged::Memory(Vec::new()))
    }

    /// `put` of the bytes written to `staged`, with the same guarantees. `key` must be in the
    /// directory `staged` was started for. Dropping a [`Staged`] instead stores nothing.
    async fn put_staged(&self, key: &str, staged: Staged, mode: PutMode) -> StorageResult<()> {
        match staged {
            Staged::Memory(parts) => self.put_parts(key, parts, mode).await,
            Staged::File(_) | Staged::Sealing(_) => Err(StorageError::Permanent {
                key: key.to_string(),
                message: "an object staged by another storage".into(),
            }),
        }
    }

    async fn get(&self, key: &str) -> StorageResult<Bytes>;

    /// Bytes `range` of the object (`range.end` exclusive, within the object's size).
    async fn get_range(&self, key: &str, range: Range<u64>) -> StorageResult<Bytes>;

    /// The object's metadata, or `None` if it does not exist.
    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>>;

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>>;

    async fn delete(&self, key: &str) -> StorageResult<()>;

    /// When the object was last written (local: the file's mtime; S3: `Last-Modified`), or
    /// `None` when it does not exist or the backend cannot tell. Used by `expire` to leave young
    /// objects alone.
    async fn modified(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        let _ = key;
        Ok(None)
    }

    /// Every staging object under the repository ([`StagingObject`]), sorted by key: local, the
    /// `.tmp.*` files anywhere under the root; S3, the incomplete multipart uploads under the
    /// prefix. A live writer's staging object is listed too: callers judge by
    /// [`StagingObject::modified`]. The default (a backend that stages nothing) lists none.
    ///
    /// # Errors
    /// Storage errors of the listing (a missing repository directory or bucket, access denied).
    async fn list_staging(&self) -> StorageResult<Vec<StagingObject>> {
        Ok(Vec::new())
    }

    /// Removes a staging object that [`Storage::list_staging`] returned (local: unlink; S3:
    /// AbortMultipartUpload). One already gone succeeds. A writer still using it fails at its
    /// commit and stores nothing: no object is ever left partial.
    ///
    /// # Errors
    /// Storage errors; [`StorageError::Permanent`] for an object that is not a staging object
    /// of this backend (a local name without the `.tmp.` prefix, an S3 one without upload id).
    async fn remove_staging(&self, staging: &StagingObject) -> StorageResult<()> {
        Err(StorageError::Permanent {
            key: staging.key.clone(),
            message: "this storage has no staging objects".into(),
        })
    }
}

/// The bytes of an object being written by [`Storage::stage`]. Written to from a blocking thread
/// (`std::io::Write`; every write call is kept whole, as one part of the object).
#[derive(Debug)]
pub enum Staged {
    /// Kept in memory until stored (object stores, which upload a whole object).
    Memory(Vec<Bytes>),
    /// A temporary file in the object's directory, removed when dropped (local storage).
    File(local::TempFile),
    /// Sealed as it is written, into what the storage under an encrypted repository staged
    /// (`encrypted::EncryptedStorage`).
    Sealing(Box<crate::crypto::envelope::Sealer<Staged>>),
}

impl std::io::Write for Staged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Staged::Memory(parts) => {
                parts.push(Bytes::copy_from_slice(buf));
                Ok(buf.len())
            }
            Staged::File(f) => f.write(buf),
            Staged::Sealing(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `e` means that the file system is out of space (`ENOSPC`) or that the user's disk
/// quota is spent (`EDQUOT`): no retry within the call helps, freeing space does.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// `e` for a one-line message: a full disk (see [`is_disk_full`]) says so in words and what to
/// do; anything else is the system's own text.
pub fn io_message(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            "no space left on device: the disk is full; free space there".to_string()
        }
        std::io::ErrorKind::QuotaExceeded => {
            "disk quota exceeded: free space there or raise the quota".to_string()
        }
        _ => e.to_string(),
    }
}

/// [`Storage::extend_lock`] of every `(key, until)`, a few at a time; returns how many locks
/// were extended.
///
/// # Errors
/// The first storage error; some of the other locks may be extended by then.
pub async fn extend_locks(
    storage: &dyn Storage,
    keys: Vec<(String, jiff::Timestamp)>,
) -> StorageResult<usize> {
    /// Extensions in flight at once.
    const CONCURRENCY: usize = 8;
    let mut extended = 0;
    for batch in keys.chunks(CONCURRENCY) {
        let done =
            futures::future::join_all(batch.iter().map(|(k, t)| storage.extend_lock(k, *t))).await;
        for d in done {
            extended += usize::from(d?);
        }
    }
    Ok(extended)
}

/// A shared handle to a repository's storage.
pub type DynStorage = Arc<dyn Storage>;

/// Rejects keys that could escape the repository: empty, absolute, `.`/`..` components, empty
/// components, backslashes or control characters.
pub fn validate_key(key: &str) -> StorageResult<()> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && !key.contains('\\')
        && !key.chars().any(|c| c.is_control())
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(StorageError::Permanent {
            key: key.to_string(),
            message: "invalid object key".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_repository() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "a/./b",
            "a\\b",
            "a\nb",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_key("wal/0000000100000000/000000010000000000000001-ab.lz4").is_ok());
    }
}
