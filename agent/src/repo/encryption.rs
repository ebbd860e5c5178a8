//! Opening an encrypted repository: its key slots (`keys/<id>.json`), the record in
//! `repo.json`, and the passphrase the configuration names. Whether a repository is encrypted is
//! decided once, when its key is created, and never silently: a configured passphrase with an
//! unencrypted repository, or an encrypted repository without one, is an error.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::identity::RepoIdentity;
use super::layout::REPO_JSON;
use crate::crypto::envelope::Cipher;
use crate::crypto::keys::RepoKey;
use crate::crypto::slots::{self, KeySlot, Passphrase, KEYS_PREFIX};
use crate::crypto::EncryptionRecord;
use crate::storage::encrypted::EncryptedStorage;
use crate::storage::{DynStorage, PutMode, Storage, StorageError};

/// The setting that names the passphrase file, for messages.
const SETTING: &str = "`encryption_passphrase_file` (or PGPITR_ENCRYPTION_PASSPHRASE_FILE)";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("repository {location} is encrypted: set {SETTING} to a file holding one of its passphrases")]
    Required { location: String },
    #[error("repository {location} is not encrypted, but {SETTING} is set; encryption is chosen when a repository is created: remove the setting, or start a new repository with `pgpitr init --encrypt`")]
    NotEncrypted { location: String },
    #[error("repository {location} has no key yet: create it with `pgpitr key create` (or `pgpitr init --encrypt`) before archiving into it")]
    NoKey { location: String },
    #[error("the passphrase of {SETTING} opens none of the {slots} key slot(s) of repository {location}; check the file (`pgpitr key list` shows the slots)")]
    WrongPassphrase { location: String, slots: usize },
    #[error(
        "key slot {slot} of repository {location} wraps another repository's key; remove that slot"
    )]
    OtherRepository { location: String, slot: String },
    #[error(
        "repository {location} is encrypted in a way this pgpitr does not read; use a newer pgpitr"
    )]
    Unsupported { location: String },
    #[error("repository {location}: {message}")]
    Slot { location: String, message: String },
    #[error("repository {location} {what}")]
    Exists { location: String, what: String },
    #[error("repository {location} has no key slot {slot} (`pgpitr key list` shows them)")]
    NoSuchSlot { location: String, slot: String },
    #[error("key slot {slot} is the one the configured passphrase opens: removing it would lock this configuration out; point {SETTING} at another slot's passphrase first")]
    InUse { slot: String },
    #[error("key slot {slot} is the repository's last: removing it would make every backup unreadable; add another first (`pgpitr key add`)")]
    LastSlot { slot: String },
}

/// What [`unlock`] found.
#[derive(Debug)]
pub struct Unlocked {
    pub key: RepoKey,
    /// The slot the passphrase opened.
    pub slot: KeySlot,
    /// Every slot, sorted by id.
    pub slots: Vec<KeySlot>,
}

/// The storage to use for a repository on `raw`: `raw` itself for an unencrypted repository
/// (and an empty location when no passphrase is set), an [`EncryptedStorage`] for an encrypted
/// one. `kek_cache` is a private directory where stretched passphrases are kept between
/// processes (`pgpitr-archive` and `pgpitr-restore` pass their spool).
///
/// # Errors
/// [`KeyError`]: a passphrase without an encrypted repository or the reverse, a wrong
/// passphrase, a slot of another repository, storage errors.
pub async fn open(
    raw: DynStorage,
    passphrase: Option<&Passphrase>,
    kek_cache: Option<&Path>,
) -> Result<DynStorage, KeyError> {
    let location = raw.location();
    let Some(passphrase) = passphrase else {
        return match load_record(raw.as_ref()).await {
            Ok(Some(Some(_))) => Err(KeyError::Required { location }),
            // An empty location, or one with only key slots: `RepoIdentity::ensure` refuses to
            // create an unencrypted repository beside key slots. Unreachable storage: the
            // command's own first request reports it, and every write checks `repo.json`'s
            // record against the storage again (`RepoIdentity::check`).
            Ok(_) | Err(KeyError::Storage(_)) => Ok(raw),
            Err(e) => Err(e),
        };
    };
    let record = load_record(raw.as_ref()).await?;
    if let Some(None) = record {
        return Err(KeyError::NotEncrypted { location });
    }
    let unlocked = unlock(raw.as_ref(), passphrase, kek_cache).await?;
    let mut cipher = Cipher::NEW;
    if let Some(Some(record)) = &record {
        cipher = record.cipher().ok_or_else(|| KeyError::Unsupported {
            location: location.clone(),
        })?;
        if record.key != unlocked.key.fingerprint() {
            return Err(KeyError::OtherRepository {
                location,
                slot: unlocked.slot.id,
            });
        }
    }
    Ok(Arc::new(EncryptedStorage::new(raw, &unlocked.key, cipher)))
}

/// `repo.json`'s encryption record: `None` when there is no `repo.json`, `Some(None)` for an
/// unencrypted repository.
async fn load_record(raw: &dyn Storage) -> Result<Option<Option<EncryptionRecord>>, KeyError> {
    match raw.get(REPO_JSON).await {
        Ok(bytes) => {
            let id: RepoIdentity = serde_json::from_slice(&bytes).map_err(|e| KeyError::Slot {
                location: raw.location(),
                message: format!("repo.json is malformed: {e}"),
            })?;
            Ok(Some(id.encryption))
        }
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every key slot of the repository, sorted by id.
///
/// # Errors
/// Storage errors; a malformed slot.
pub async fn load_slots(raw: &dyn Storage) -> Result<Vec<KeySlot>, KeyError> {
    let mut slots = Vec::new();
    for o in raw.list(KEYS_PREFIX).await? {
        let Some(id) = slots::parse_slot_key(&o.key) else {
            continue;
        };
        let bytes = raw.get(&o.key).await?;
        let slot = KeySlot::parse(&bytes).map_err(|message| KeyError::Slot {
            location: raw.location(),
            message,
        })?;
        if slot.id != id {
            return Err(KeyError::Slot {
                location: raw.location(),
                message: format!("key slot {id} names itself {}", slot.id),
            });
        }
        slots.push(slot);
    }
    slots.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(slots)
}

/// The repository key, opened with `passphrase` from the first slot it opens.
///
/// # Errors
/// [`KeyError::NoKey`] without slots, [`KeyError::WrongPassphrase`], malformed slots, storage.
pub async fn unlock(
    raw: &dyn Storage,
    passphrase: &Passphrase,
    kek_cache: Option<&Path>,
) -> Result<Unlocked, KeyError> {
    let location = raw.location();
    let slots = load_slots(raw).await?;
    if slots.is_empty() {
        return Err(KeyError::NoKey { location });
    }
    let (p, cache) = (passphrase.clone(), kek_cache.map(Path::to_path_buf));
    let all = slots.clone();
    // Argon2id takes a fraction of a second per slot: off the async threads.
    let opened = tokio::task::spawn_blocking(move || {
        for slot in all {
            if let Some(key) = slot.unlock(&p, cache.as_deref())? {
                return Ok(Some((key, slot)));
            }
        }
        Ok(None)
    })
    .await
    .expect("unlocking")
    .map_err(|message| KeyError::Slot {
        location: location.clone(),
        message,
    })?;
    let Some((key, slot)) = opened else {
        return Err(KeyError::WrongPassphrase {
            location,
            slots: slots.len(),
        });
    };
    Ok(Unlocked { key, slot, slots })
}

/// Creates the key of a new encrypted repository at `raw` and its first slot.
///
/// # Errors
/// [`KeyError::Exists`] when the location already holds a repository, key slots or any other
/// object; storage errors.
pub async fn create(raw: &dyn Storage, passphrase: &Passphrase) -> Result<KeySlot, KeyError> {
    let location = raw.location();
    raw.check_writable().await?;
    if let Some(record) = load_record(raw).await? {
        let what = match record {
            Some(_) => "is already encrypted: add a passphrase with `pgpitr key add`",
            None => "already holds an unencrypted repository: encryption is chosen at creation; start a new repository",
        };
        return Err(KeyError::Exists {
            location,
            what: what.into(),
        });
    }
    if !raw.list("").await?.is_empty() {
        return Err(KeyError::Exists {
            location,
            what: "is not empty: create an encrypted repository in an empty directory or prefix"
                .into(),
        });
    }
    let p = passphrase.clone();
    let slot = tokio::task::spawn_blocking(move || KeySlot::create(&RepoKey::generate(), &p))
        .await
        .expect("creating a key");
    put_slot(raw, &slot).await?;
    Ok(slot)
}

/// Adds a slot for `passphrase` wrapping the key `unlocked` holds.
///
/// # Errors
/// Storage errors.
pub async fn add(
    raw: &dyn Storage,
    unlocked: &Unlocked,
    passphrase: &Passphrase,
) -> Result<KeySlot, KeyError> {
    let (key, p) = (unlocked.key.clone(), passphrase.clone());
    let slot = tokio::task::spawn_blocking(move || KeySlot::create(&key, &p))
        .await
        .expect("creating a slot");
    put_slot(raw, &slot).await?;
    Ok(slot)
}

/// Removes slot `id`, never the last one nor the one the configured passphrase opened.
///
/// # Errors
/// [`KeyError::NoSuchSlot`], [`KeyError::LastSlot`], [`KeyError::InUse`]; storage errors.
pub async fn remove(raw: &dyn Storage, unlocked: &Unlocked, id: &str) -> Result<(), KeyError> {
    if !unlocked.slots.iter().any(|s| s.id == id) {
        return Err(KeyError::NoSuchSlot {
            location: raw.location(),
            slot: id.to_string(),
        });
    }
    if unlocked.slots.len() == 1 {
        return Err(KeyError::LastSlot { slot: id.into() });
    }
    if unlocked.slot.id == id {
        return Err(KeyError::InUse { slot: id.into() });
    }
    raw.delete(&slots::slot_key(id)).await?;
    Ok(())
}

async fn put_slot(raw: &dyn Storage, slot: &KeySlot) -> Result<(), KeyError> {
    raw.put(
        &slot.object_key(),
        Bytes::from(slot.to_json()),
        PutMode::Create,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::WalSegSize;
    use crate::storage::local::LocalStorage;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.as_bytes().to_vec()).unwrap()
    }

    fn raw(dir: &Path) -> DynStorage {
        Arc::new(LocalStorage::new(dir.to_path_buf()))
    }

    fn identity() -> RepoIdentity {
        RepoIdentity::new(42, 15, WalSegSize::new(16 << 20).unwrap())
    }

    #[tokio::test]
    async fn create_open_rotate_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let raw = raw(dir.path());
        // No key yet: a passphrase is refused, no passphrase opens the raw storage.
        assert!(matches!(
            open(raw.clone(), Some(&pass("a")), None).await,
            Err(KeyError::NoKey { .. })
        ));
        let first = create(raw.as_ref(), &pass("a")).await.unwrap();
        assert!(matches!(
            create(raw.as_ref(), &pass("b")).await,
            Err(KeyError::Exists { .. })
        ));
        let enc = open(raw.clone(), Some(&pass("a")), None).await.unwrap();
        assert!(enc.encryption().is_some());
        assert!(matches!(
            open(raw.clone(), Some(&pass("b")), None).await,
            Err(KeyError::WrongPassphrase { slots: 1, .. })
        ));
        // The first push records the encryption in repo.json; from then on it is required.
        RepoIdentity::ensure(enc.as_ref(), &identity())
            .await
            .unwrap();
        assert!(matches!(
            open(raw.clone(), None, None).await,
            Err(KeyError::Required { .. })
        ));
        // Rotation: add b, remove a (not while a is the configured one), a is refused.
        let a = unlock(raw.as_ref(), &pass("a"), None).await.unwrap();
        let second = add(raw.as_ref(), &a, &pass("b")).await.unwrap();
        let a = unlock(raw.as_ref(), &pass("a"), None).await.unwrap();
        assert_eq!(a.slots.len(), 2);
        assert!(matches!(
            remove(raw.as_ref(), &a, &first.id).await,
            Err(KeyError::InUse { .. })
        ));
        let b = unlock(raw.as_ref(), &pass("b"), None).await.unwrap();
        assert_eq!(b.key.bytes(), a.key.bytes());
        remove(raw.as_ref(), &b, &first.id).await.unwrap();
        assert!(matches!(
            open(raw.clone(), Some(&pass("a")), None).await,
            Err(KeyError::WrongPassphrase { .. })
        ));
        let b = unlock(raw.as_ref(), &pass("b"), None).await.unwrap();
        assert!(matches!(
            remove(raw.as_ref(), &b, &second.id).await,
            Err(KeyError::LastSlot { .. })
        ));
        assert!(open(raw.clone(), Some(&pass("b")), None).await.is_ok());
    }

    /// New repositories seal in format 2; one whose `repo.json` records format 1 (created by an
    /// earlier release) keeps sealing in format 1, so that its record stays true; a cipher this
    /// build does not know is refused before anything is written.
    #[tokio::test]
    async fn each_repository_keeps_the_cipher_it_was_created_with() {
        use crate::crypto::envelope;
        // The format of an object stored through `enc`, read back raw from `raw`.
        async fn format_of_a_new_object(enc: &DynStorage, raw: &DynStorage) -> Cipher {
            enc.put("locks/x", Bytes::from_static(b"x"), PutMode::Create)
                .await
                .unwrap();
            assert_eq!(enc.get("locks/x").await.unwrap(), &b"x"[..]);
            envelope::header(&raw.get("locks/x").await.unwrap())
                .unwrap()
                .cipher
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = raw(dir.path());
        create(raw.as_ref(), &pass("a")).await.unwrap();
        let enc = open(raw.clone(), Some(&pass("a")), None).await.unwrap();
        RepoIdentity::ensure(enc.as_ref(), &identity())
            .await
            .unwrap();
        let record = RepoIdentity::load(raw.as_ref()).await.unwrap().encryption;
        assert_eq!(record.unwrap().cipher, "aes256gcm-hkdf-stream-64k");
        assert_eq!(format_of_a_new_object(&enc, &raw).await, Cipher::Aes256Gcm);

        // The repo.json of a repository of an earlier release.
        let old = tempfile::tempdir().unwrap();
        let old_raw = self::raw(old.path());
        create(old_raw.as_ref(), &pass("a")).await.unwrap();
        let key = unlock(old_raw.as_ref(), &pass("a"), None)
            .await
            .unwrap()
            .key;
        let write_record = |cipher: &str| {
            let mut id = identity();
            let mut record = EncryptionRecord::new(&key, Cipher::XChaCha20Poly1305);
            record.cipher = cipher.into();
            id.encryption = Some(record);
            Bytes::from(serde_json::to_vec(&id).unwrap())
        };
        old_raw
            .put(
                REPO_JSON,
                write_record("xchacha20poly1305-stream-64k"),
                PutMode::Create,
            )
            .await
            .unwrap();
        let enc = open(old_raw.clone(), Some(&pass("a")), None).await.unwrap();
        RepoIdentity::ensure(enc.as_ref(), &identity())
            .await
            .unwrap();
        assert_eq!(
            format_of_a_new_object(&enc, &old_raw).await,
            Cipher::XChaCha20Poly1305
        );

        old_raw
            .put(REPO_JSON, write_record("rot13-stream"), PutMode::Overwrite)
            .await
            .unwrap();
        assert!(matches!(
            open(old_raw.clone(), Some(&pass("a")), None).await,
            Err(KeyError::Unsupported { .. })
        ));
    }

    #[tokio::test]
    async fn plaintext_and_encrypted_never_mix() {
        let dir = tempfile::tempdir().unwrap();
        let raw = raw(dir.path());
        RepoIdentity::ensure(raw.as_ref(), &identity())
            .await
            .unwrap();
        assert!(matches!(
            open(raw.clone(), Some(&pass("a")), None).await,
            Err(KeyError::NotEncrypted { .. })
        ));
        assert!(matches!(
            create(raw.as_ref(), &pass("a")).await,
            Err(KeyError::Exists { .. })
        ));
        // Key slots without repo.json: an unencrypted first push is refused.
        let dir = tempfile::tempdir().unwrap();
        let raw = super::tests::raw(dir.path());
        create(raw.as_ref(), &pass("a")).await.unwrap();
        let plain = open(raw.clone(), None, None).await.unwrap();
        let err = RepoIdentity::ensure(plain.as_ref(), &identity())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("encrypt"), "{err}");
    }

    #[tokio::test]
    async fn a_slot_of_another_repository_is_named() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (r1, r2) = (raw(d1.path()), raw(d2.path()));
        create(r1.as_ref(), &pass("a")).await.unwrap();
        let s2 = create(r2.as_ref(), &pass("z")).await.unwrap();
        let e1 = open(r1.clone(), Some(&pass("a")), None).await.unwrap();
        RepoIdentity::ensure(e1.as_ref(), &identity())
            .await
            .unwrap();
        // An attacker copies repository 2's slot, with a passphrase they know, into 1.
        r1.put(&s2.object_key(), Bytes::from(s2.to_json()), PutMode::Create)
            .await
            .unwrap();
        match open(r1.clone(), Some(&pass("z")), None).await {
            Err(KeyError::OtherRepository { slot, .. }) => assert_eq!(slot, s2.id),
            other => panic!("{other:?}"),
        }
    }
}
