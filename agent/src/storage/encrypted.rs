//! The storage of an encrypted repository: every object but `repo.json` and the key slots
//! (`keys/`) is sealed on its way in and opened on its way out ([`crate::crypto::envelope`]),
//! bound to its key, and content ids in keys are keyed hashes ([`ContentIds::Keyed`]). Callers
//! see plain bytes and plain sizes; the backend sees neither.
//!
//! Nothing written through this storage reaches the backend in the clear, and nothing read
//! through it is returned unless it authenticates: a plaintext object, an object of another
//! repository, or one moved to another key is an error ([`StorageError::Unauthentic`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::StorageResult;
use super::{DynStorage, ObjectMeta, PutMode, Staged, StagingObject, Storage, StorageError};
use crate::crypto::envelope::{self, Cipher, Header};
use crate::crypto::keys::{ContentIds, DataKey, RepoKey};
use crate::crypto::EncryptionRecord;

/// Objects stored in the clear: what a reader needs before it has the key.
pub fn is_clear_key(key: &str) -> bool {
    key == crate::repo::layout::REPO_JSON || key.starts_with(crate::crypto::slots::KEYS_PREFIX)
}

/// Headers (cipher and nonce, plain size) of objects read by range, kept so that a pack read chunk
/// by chunk costs one extra request, not one per chunk. Objects are immutable under their key.
const HEADER_CACHE_MAX: usize = 4096;

pub struct EncryptedStorage {
    inner: DynStorage,
    key: DataKey,
    cipher: Cipher,
    ids: ContentIds,
    record: EncryptionRecord,
    headers: Mutex<HashMap<String, (Header, u64)>>,
}

impl std::fmt::Debug for EncryptedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedStorage")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl EncryptedStorage {
    /// `inner` under repository key `key`, sealing new objects with `cipher` (every cipher
    /// this build knows is read).
    pub fn new(inner: DynStorage, key: &RepoKey, cipher: Cipher) -> EncryptedStorage {
        EncryptedStorage {
            inner,
            key: key.data_key(),
            cipher,
            ids: ContentIds::Keyed(Arc::new(key.id_key())),
            record: EncryptionRecord::new(key, cipher),
            headers: Mutex::new(HashMap::new()),
        }
    }

    fn unauthentic(key: &str, e: envelope::EnvelopeError) -> StorageError {
        StorageError::Unauthentic {
            key: key.to_string(),
            message: e.to_string(),
        }
    }

    async fn seal(&self, key: &str, parts: Vec<Bytes>) -> Bytes {
        let (data_key, aad, cipher) = (self.key.clone(), key.as_bytes().to_vec(), self.cipher);
        let seal = move || {
            let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
            Bytes::from(envelope::seal(&data_key, cipher, &aad, &slices))
        };
        tokio::task::spawn_blocking(seal).await.expect("sealing")
    }

    /// Header and plain size of `key`, from the cache (unless `fresh`) or the backend.
    async fn header_of(&self, key: &str, fresh: bool) -> StorageResult<(Header, u64)> {
        if !fresh {
            if let Some(h) = self.headers.lock().expect("no panics").get(key) {
                return Ok(*h);
            }
        }
        let (meta, head) = tokio::join!(
            self.inner.head(key),
            self.inner.get_range(key, 0..envelope::HEADER_LEN as u64)
        );
        let meta = meta?.ok_or_else(|| StorageError::NotFound {
            key: key.to_string(),
        })?;
        let prefix = envelope::header(&head?).map_err(|e| Self::unauthentic(key, e))?;
        let plain = envelope::plain_len(meta.size)
            .ok_or_else(|| Self::unauthentic(key, envelope::EnvelopeError::BadLength(meta.size)))?;
        let mut cache = self.headers.lock().expect("no panics");
        if cache.len() >= HEADER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key.to_string(), (prefix, plain));
        Ok((prefix, plain))
    }

    fn plain_meta(&self, mut meta: ObjectMeta) -> ObjectMeta {
        if !is_clear_key(&meta.key) {
            // A size no object seals to is reported as 0; reading the object says why.
            meta.size = envelope::plain_len(meta.size).unwrap_or(0);
        }
        meta
    }
}

/// An error of writing a staged object: a full disk says so (see `super::io_message`).
fn staged_error(key: &str, e: &std::io::Error) -> StorageError {
    StorageError::Permanent {
        key: key.to_string(),
        message: super::io_message(e),
    }
}

#[async_trait::async_trait]
impl Storage for EncryptedStorage {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn content_ids(&self) -> ContentIds {
        self.ids.clone()
    }

    fn encryption(&self) -> Option<EncryptionRecord> {
        Some(self.record.clone())
    }

    async fn check_writable(&self) -> StorageResult<()> {
        self.inner.check_writable().await
    }

    fn object_lock(&self) -> Option<&super::ObjectLock> {
        self.inner.object_lock()
    }

    async fn locked_until(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        self.inner.locked_until(key).await
    }

    async fn extend_lock(&self, key: &str, until: jiff::Timestamp) -> StorageResult<bool> {
        self.inner.extend_lock(key, until).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StorageResult<()> {
        self.put_parts(key, vec![data], mode).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StorageResult<()> {
        if is_clear_key(key) {
            return self.inner.put_parts(key, parts, mode).await;
        }
        super::validate_key(key)?;
        let sealed = self.seal(key, parts).await;
        let put = self.inner.put(key, sealed, mode).await;
        // An overwritten object has a new nonce prefix and perhaps a new size.
        self.headers.lock().expect("no panics").remove(key);
        put
    }

    /// Sealed as it is written into what the storage underneath stages (a temporary file of a
    /// local repository, memory for S3), segment by segment in the cipher's late-bound format
    /// (`envelope::Sealer`): the object's key, which [`Storage::put_staged`] names, is bound in
    /// its last segment.
    async fn stage(&self, dir: &str) -> StorageResult<Staged> {
        let inner = self.inner.stage(dir).await?;
        let sealer = envelope::Sealer::new(&self.key, self.cipher, inner);
        Ok(Staged::Sealing(Box::new(sealer)))
    }

    async fn put_staged(&self, key: &str, staged: Staged, mode: PutMode) -> StorageResult<()> {
        match staged {
            Staged::Memory(parts) => self.put_parts(key, parts, mode).await,
            Staged::Sealing(sealer) if !is_clear_key(key) => {
                super::validate_key(key)?;
                let aad = key.as_bytes().to_vec();
                let inner = tokio::task::spawn_blocking(move || sealer.finish(&aad))
                    .await
                    .expect("sealing")
                    .map_err(|e| staged_error(key, &e))?;
                let put = self.inner.put_staged(key, inner, mode).await;
                self.headers.lock().expect("no panics").remove(key);
                put
            }
            Staged::Sealing(_) | Staged::File(_) => Err(StorageError::Permanent {
                key: key.to_string(),
                message: "an object staged by another storage".into(),
            }),
        }
    }

    async fn get(&self, key: &str) -> StorageResult<Bytes> {
        let stored = self.inner.get(key).await?;
        if is_clear_key(key) {
            return Ok(stored);
        }
        let (data_key, aad) = (self.key.clone(), key.to_string());
        tokio::task::spawn_blocking(move || {
            envelope::open(&data_key, aad.as_bytes(), &stored)
                .map(Bytes::from)
                .map_err(|e| Self::unauthentic(&aad, e))
        })
        .await
        .expect("opening")
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StorageResult<Bytes> {
        if is_clear_key(key) {
            return self.inner.get_range(key, range).await;
        }
        match self.get_range_sealed(key, &range, false).await {
            // The cached header may be of an object another process has since replaced (only
            // objects rewritten in place: heartbeats, leases): once more, read afresh.
            Err(StorageError::Unauthentic { .. } | StorageError::Permanent { .. }) => {
                self.get_range_sealed(key, &range, true).await
            }
            other => other,
        }
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        Ok(self.inner.head(key).await?.map(|m| self.plain_meta(m)))
    }

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        Ok(self
            .inner
            .list(prefix)
            .await?
            .into_iter()
            .map(|m| self.plain_meta(m))
            .collect())
    }

    async fn delete(&self, key: &str) -> StorageResult<()> {
        self.headers.lock().expect("no panics").remove(key);
        self.inner.delete(key).await
    }

    async fn modified(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        self.inner.modified(key).await
    }

    async fn list_staging(&self) -> StorageResult<Vec<StagingObject>> {
        self.inner.list_staging().await
    }

    async fn remove_staging(&self, staging: &StagingObject) -> StorageResult<()> {
        self.inner.remove_staging(staging).await
    }
}

impl EncryptedStorage {
    /// Plain bytes `range` of sealed object `key`, with its header from the cache unless
    /// `fresh`.
    async fn get_range_sealed(
        &self,
        key: &str,
        range: &Range<u64>,
        fresh: bool,
    ) -> StorageResult<Bytes> {
        let range = range.clone();
        let (prefix, plain) = self.header_of(key, fresh).await?;
        if range.end > plain || range.start > range.end {
            return Err(StorageError::Permanent {
                key: key.to_string(),
                message: format!("range {range:?} is outside the object's {plain} bytes"),
            });
        }
        let sealed = envelope::sealed_range(&range, plain);
        let stored = self.inner.get_range(key, sealed).await?;
        let (data_key, aad) = (self.key.clone(), key.to_string());
        tokio::task::spawn_blocking(move || {
            envelope::open_range(&data_key, aad.as_bytes(), &prefix, plain, &range, &stored)
                .map(Bytes::from)
                .map_err(|e| Self::unauthentic(&aad, e))
        })
        .await
        .expect("opening")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;

    fn pair(dir: &std::path::Path) -> (DynStorage, EncryptedStorage) {
        let raw: DynStorage = Arc::new(LocalStorage::new(dir.to_path_buf()));
        let enc = EncryptedStorage::new(raw.clone(), &RepoKey::from_bytes([9; 32]), Cipher::NEW);
        (raw, enc)
    }

    /// A staged object is sealed into the temporary file as it is written, before its key is
    /// known, and reads back whole; moved to another key, or read by range, it is refused.
    #[tokio::test]
    async fn staged_objects_are_sealed_as_written_and_read_whole_at_their_key() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (raw, enc) = pair(dir.path());
        let plain: Vec<u8> = (0..600_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut staged = enc.stage("wal/a/").await.unwrap();
        for part in plain.chunks(100_000) {
            staged.write_all(part).unwrap();
        }
        // Everything but the last segment is already in the temporary file.
        fn bytes_under(p: &std::path::Path) -> u64 {
            std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .map(|p| {
                    if p.is_dir() {
                        bytes_under(&p)
                    } else {
                        p.metadata().unwrap().len()
                    }
                })
                .sum()
        }
        let temp = bytes_under(dir.path());
        assert!(
            temp >= plain.len() as u64 - envelope::SEGMENT as u64,
            "{temp}"
        );
        enc.put_staged("wal/a/one", staged, PutMode::Create)
            .await
            .unwrap();
        assert_eq!(enc.get("wal/a/one").await.unwrap(), plain);
        let stored = raw.get("wal/a/one").await.unwrap();
        assert!(stored.len() > plain.len());
        assert!(!stored.windows(16).any(|w| w == &plain[400..416]));
        assert!(matches!(
            enc.get_range("wal/a/one", 0..10).await,
            Err(StorageError::Unauthentic { .. })
        ));
        raw.put("wal/a/two", stored, PutMode::Create).await.unwrap();
        assert!(matches!(
            enc.get("wal/a/two").await,
            Err(StorageError::Unauthentic { .. })
        ));
    }

    #[tokio::test]
    async fn objects_are_sealed_and_read_back_whole_or_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, enc) = pair(dir.path());
        let plain: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        enc.put(
            "packs/ab/x.pack",
            Bytes::from(plain.clone()),
            PutMode::Create,
        )
        .await
        .unwrap();
        let stored = raw.get("packs/ab/x.pack").await.unwrap();
        assert!(!stored.windows(16).any(|w| w == &plain[400..416]));
        assert_eq!(envelope::header(&stored).unwrap().cipher, Cipher::Aes256Gcm);
        assert_eq!(enc.get("packs/ab/x.pack").await.unwrap(), plain);
        assert_eq!(
            enc.get_range("packs/ab/x.pack", 70_000..70_100)
                .await
                .unwrap(),
            &plain[70_000..70_100]
        );
        let listed = enc.list("packs/").await.unwrap();
        assert_eq!(listed[0].size, plain.len() as u64);
        assert_eq!(
            enc.head("packs/ab/x.pack").await.unwrap().unwrap().size,
            plain.len() as u64
        );
        assert!(enc
            .get_range("packs/ab/x.pack", 0..plain.len() as u64 + 1)
            .await
            .is_err());
        // An object replaced in place (a heartbeat), here or by another process: ranges still
        // read the new one.
        enc.put(
            "locks/t.beat",
            Bytes::from_static(b"one"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        assert_eq!(
            enc.get_range("locks/t.beat", 0..3).await.unwrap(),
            &b"one"[..]
        );
        enc.put(
            "locks/t.beat",
            Bytes::from_static(b"twotwo"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        assert_eq!(
            enc.get_range("locks/t.beat", 0..6).await.unwrap(),
            &b"twotwo"[..]
        );
        // Another process, of a repository still in format 1: ranges read its objects too.
        let other = EncryptedStorage::new(
            raw.clone(),
            &RepoKey::from_bytes([9; 32]),
            Cipher::XChaCha20Poly1305,
        );
        other
            .put("locks/t.beat", Bytes::from_static(b"3"), PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(
            enc.get_range("locks/t.beat", 0..1).await.unwrap(),
            &b"3"[..]
        );
    }

    #[tokio::test]
    async fn plaintext_moved_and_foreign_objects_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, enc) = pair(dir.path());
        raw.put(
            "locks/a.lock",
            Bytes::from_static(b"plain"),
            PutMode::Create,
        )
        .await
        .unwrap();
        let err = enc.get("locks/a.lock").await.unwrap_err();
        assert!(matches!(err, StorageError::Unauthentic { .. }), "{err}");
        enc.put("locks/b.lock", Bytes::from_static(b"x"), PutMode::Create)
            .await
            .unwrap();
        let sealed = raw.get("locks/b.lock").await.unwrap();
        raw.put("locks/c.lock", sealed.clone(), PutMode::Create)
            .await
            .unwrap();
        assert!(matches!(
            enc.get("locks/c.lock").await,
            Err(StorageError::Unauthentic { .. })
        ));
        let other = EncryptedStorage::new(raw.clone(), &RepoKey::from_bytes([8; 32]), Cipher::NEW);
        assert!(matches!(
            other.get("locks/b.lock").await,
            Err(StorageError::Unauthentic { .. })
        ));
        // repo.json and key slots stay readable without the key.
        enc.put("repo.json", Bytes::from_static(b"{}"), PutMode::Create)
            .await
            .unwrap();
        assert_eq!(raw.get("repo.json").await.unwrap(), &b"{}"[..]);
    }
}
