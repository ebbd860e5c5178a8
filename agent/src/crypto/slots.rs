//! Key slots: the repository key wrapped under a passphrase, one `keys/<slot-id>.json` object
//! per passphrase. A passphrase is stretched with Argon2id (RFC 9106) into a key-encryption key,
//! which seals the repository key with XChaCha20-Poly1305. Adding or removing a passphrase
//! writes or deletes one slot and touches no data.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::RepoKey;

/// Where slots live; nothing else is under this prefix.
pub const KEYS_PREFIX: &str = "keys/";
const SLOT_SUFFIX: &str = ".json";

/// Argon2id cost of new slots: 64 MiB, 3 passes, one lane (RFC 9106, section 4, second
/// recommended option, with one lane). About 0.2 s on one core of a current server.
pub const MEMORY_KIB: u32 = 64 * 1024;
pub const ITERATIONS: u32 = 3;
pub const PARALLELISM: u32 = 1;

/// A passphrase, zeroed when dropped; never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// # Errors
    /// An empty passphrase.
    pub fn new(bytes: Vec<u8>) -> Result<Passphrase, String> {
        let bytes = Zeroizing::new(bytes);
        if bytes.is_empty() {
            return Err("the passphrase is empty".into());
        }
        Ok(Passphrase(bytes))
    }

    /// A passphrase file's contents: everything but one trailing newline (`\n` or `\r\n`).
    ///
    /// # Errors
    /// An empty passphrase.
    pub fn from_file_contents(mut bytes: Vec<u8>) -> Result<Passphrase, String> {
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Passphrase::new(bytes)
    }
}

impl Passphrase {
    /// The passphrase's bytes, for writing the file that holds it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// Argon2id parameters and salt of one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    /// Always `argon2id`.
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// 16 random bytes, hex.
    pub salt: String,
}

/// One `keys/<id>.json` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    /// 16 hex digits, random; the object's name.
    pub id: String,
    pub created: jiff::Timestamp,
    /// The fingerprint of the key this slot wraps ([`RepoKey::fingerprint`]).
    pub repository_key: String,
    pub kdf: Kdf,
    /// Always `xchacha20poly1305`.
    pub cipher: String,
    /// 24 random bytes, hex.
    pub nonce: String,
    /// The repository key sealed under the key-encryption key, with the slot id and the key's
    /// fingerprint as associated data; hex.
    pub wrapped_key: String,
}

/// The key-encryption key of a slot, zeroed when dropped.
type Kek = Zeroizing<[u8; 32]>;

impl KeySlot {
    /// A new slot wrapping `key` under `passphrase`, with a random id, salt and nonce.
    pub fn create(key: &RepoKey, passphrase: &Passphrase) -> KeySlot {
        let kdf = Kdf {
            algorithm: "argon2id".into(),
            memory_kib: MEMORY_KIB,
            iterations: ITERATIONS,
            parallelism: PARALLELISM,
            salt: hex::encode(random::<16>()),
        };
        let kek = stretch(&kdf, passphrase).expect("valid Argon2id parameters");
        let mut slot = KeySlot {
            id: hex::encode(random::<8>()),
            created: jiff::Timestamp::now(),
            repository_key: key.fingerprint(),
            kdf,
            cipher: "xchacha20poly1305".into(),
            nonce: hex::encode(random::<24>()),
            wrapped_key: String::new(),
        };
        let nonce = hex::decode(&slot.nonce).expect("hex");
        let wrapped = XChaCha20Poly1305::new((&*kek).into())
            .encrypt(
                nonce.as_slice().into(),
                Payload {
                    msg: key.bytes(),
                    aad: slot.aad().as_bytes(),
                },
            )
            .expect("sealing 32 bytes");
        slot.wrapped_key = hex::encode(wrapped);
        slot
    }

    fn aad(&self) -> String {
        format!("pgpitr key slot {} {}", self.id, self.repository_key)
    }

    /// The object key of this slot.
    pub fn object_key(&self) -> String {
        slot_key(&self.id)
    }

    /// The repository key, if `passphrase` is this slot's. `kek_cache` is a private directory
    /// where stretched passphrases are kept between processes (see [`kek_cache_file`]).
    ///
    /// # Errors
    /// A slot that is malformed or of an unknown algorithm (the message says which field).
    pub fn unlock(
        &self,
        passphrase: &Passphrase,
        kek_cache: Option<&Path>,
    ) -> Result<Option<RepoKey>, String> {
        self.validate()?;
        let cache = kek_cache.map(|dir| dir.join(kek_cache_file(&self.kdf, passphrase)));
        if let Some(kek) = cache.as_deref().and_then(read_cached) {
            if let Some(key) = self.unwrap_with(&kek)? {
                return Ok(Some(key));
            }
        }
        let kek = stretch(&self.kdf, passphrase)?;
        let key = self.unwrap_with(&kek)?;
        if let (Some(_), Some(path)) = (&key, &cache) {
            write_cached(path, &kek);
        }
        Ok(key)
    }

    fn unwrap_with(&self, kek: &Kek) -> Result<Option<RepoKey>, String> {
        let nonce = hex::decode(&self.nonce).map_err(|_| "bad nonce".to_string())?;
        let wrapped = hex::decode(&self.wrapped_key).map_err(|_| "bad wrapped_key".to_string())?;
        let Ok(plain) = XChaCha20Poly1305::new((&**kek).into()).decrypt(
            nonce.as_slice().into(),
            Payload {
                msg: &wrapped,
                aad: self.aad().as_bytes(),
            },
        ) else {
            return Ok(None);
        };
        let plain = Zeroizing::new(plain);
        let bytes: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| "wrapped key of the wrong length".to_string())?;
        let key = RepoKey::from_bytes(bytes);
        // The fingerprint is authenticated as associated data; a mismatch is a bug or a forgery.
        (key.fingerprint() == self.repository_key)
            .then_some(Some(key))
            .ok_or_else(|| "the unwrapped key does not match the slot's fingerprint".to_string())
    }

    fn validate(&self) -> Result<(), String> {
        let ok = is_slot_id(&self.id)
            && self.kdf.algorithm == "argon2id"
            && self.cipher == "xchacha20poly1305"
            && hex::decode(&self.nonce).is_ok_and(|n| n.len() == 24)
            && hex::decode(&self.kdf.salt).is_ok_and(|s| s.len() >= 16)
            // Bounds that keep a forged slot from exhausting memory or time.
            && (8..=4 * 1024 * 1024).contains(&self.kdf.memory_kib)
            && (1..=64).contains(&self.kdf.iterations)
            && (1..=16).contains(&self.kdf.parallelism);
        ok.then_some(())
            .ok_or_else(|| format!("key slot {} is malformed or of an unknown kind", self.id))
    }

    /// Parses a slot object.
    ///
    /// # Errors
    /// Malformed JSON or fields.
    pub fn parse(bytes: &[u8]) -> Result<KeySlot, String> {
        let slot: KeySlot =
            serde_json::from_slice(bytes).map_err(|e| format!("malformed key slot: {e}"))?;
        slot.validate()?;
        Ok(slot)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("serialisable")
    }
}

/// `keys/<id>.json`.
pub fn slot_key(id: &str) -> String {
    format!("{KEYS_PREFIX}{id}{SLOT_SUFFIX}")
}

/// The slot id of a `keys/<id>.json` key; `None` for anything else.
pub fn parse_slot_key(key: &str) -> Option<String> {
    let id = key.strip_prefix(KEYS_PREFIX)?.strip_suffix(SLOT_SUFFIX)?;
    is_slot_id(id).then(|| id.to_string())
}

/// 16 lowercase hex digits.
pub fn is_slot_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the operating system's random source");
    b
}

/// Argon2id of `passphrase` with the slot's parameters.
fn stretch(kdf: &Kdf, passphrase: &Passphrase) -> Result<Kek, String> {
    let salt = hex::decode(&kdf.salt).map_err(|_| "bad salt".to_string())?;
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(&passphrase.0, &salt, &mut *kek)
        .map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(kek)
}

/// The name under which a stretched passphrase is cached: the first 32 hex digits of the
/// SHA-256 of the slot's KDF parameters, its salt and the passphrase. A cache file vouches for
/// nothing: a key-encryption key read from it must still open the slot.
///
/// `pgpitr-archive` and `pgpitr-restore` run once per WAL file; stretching the passphrase each
/// time would cost more than the upload. The cache lives in their spool (`pg_wal/pgpitr_spool`
/// by default, mode 0700, outside what base backups copy) and holds no more than the passphrase
/// file on the same host already gives.
fn kek_cache_file(kdf: &Kdf, passphrase: &Passphrase) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"pgpitr v1 kek cache\0");
    h.update(serde_json::to_vec(kdf).expect("serialisable"));
    h.update([0]);
    h.update(&*passphrase.0);
    hex::encode(&h.finalize()[..16])
}

fn read_cached(path: &Path) -> Option<Kek> {
    let bytes = Zeroizing::new(std::fs::read(path).ok()?);
    let arr: [u8; 32] = bytes.as_slice().try_into().ok()?;
    Some(Zeroizing::new(arr))
}

/// Best effort: a cache that cannot be written costs time, never correctness.
fn write_cached(path: &Path, kek: &Kek) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(dir) = path.parent() else { return };
    if crate::commands::spool::create_private_dir(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".tmp.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&**kek));
    if written.and_then(|()| std::fs::rename(&tmp, path)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn a_slot_opens_with_its_passphrase_only() {
        let key = RepoKey::generate();
        let slot = KeySlot::create(&key, &pass("correct horse"));
        let back = KeySlot::parse(&slot.to_json()).unwrap();
        assert_eq!(back, slot);
        let opened = back.unlock(&pass("correct horse"), None).unwrap().unwrap();
        assert_eq!(opened.bytes(), key.bytes());
        assert!(back.unlock(&pass("correct horsf"), None).unwrap().is_none());
        // The wrapped key is bound to the slot's id and fingerprint.
        let mut moved = slot.clone();
        moved.id = "0123456789abcdef".into();
        assert!(moved
            .unlock(&pass("correct horse"), None)
            .unwrap()
            .is_none());
        let json = String::from_utf8(slot.to_json()).unwrap();
        assert!(!json.contains(&hex::encode(key.bytes())));
    }

    #[test]
    fn the_cache_saves_the_stretch_and_vouches_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("kek");
        let key = RepoKey::generate();
        let slot = KeySlot::create(&key, &pass("p"));
        assert!(slot.unlock(&pass("p"), Some(&cache)).unwrap().is_some());
        let files: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            files[0].metadata().unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A wrong passphrase is not cached; a corrupted cache entry is stretched again.
        assert!(slot.unlock(&pass("q"), Some(&cache)).unwrap().is_none());
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
        std::fs::write(files[0].path(), [0u8; 32]).unwrap();
        assert!(slot.unlock(&pass("p"), Some(&cache)).unwrap().is_some());
        assert_ne!(std::fs::read(files[0].path()).unwrap(), vec![0u8; 32]);
    }

    #[test]
    fn malformed_slots_and_passphrases_are_refused() {
        let slot = KeySlot::create(&RepoKey::generate(), &pass("p"));
        let mut huge = slot.clone();
        huge.kdf.memory_kib = u32::MAX;
        assert!(huge.unlock(&pass("p"), None).is_err());
        assert!(KeySlot::parse(b"{}").is_err());
        assert!(Passphrase::new(Vec::new()).is_err());
        assert!(Passphrase::from_file_contents(b"\n".to_vec()).is_err());
        let p = Passphrase::from_file_contents(b"secret\r\n".to_vec()).unwrap();
        assert_eq!(&*p.0, b"secret");
        assert_eq!(format!("{p:?}"), "Passphrase(..)");
        assert_eq!(parse_slot_key(&slot.object_key()), Some(slot.id.clone()));
        assert_eq!(parse_slot_key("keys/x.json"), None);
    }
}
