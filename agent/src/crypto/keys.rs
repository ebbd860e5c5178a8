//! The repository key and the keys derived from it. The repository key is 256 random bits,
//! stored only wrapped by key slots ([`super::slots`]); everything else is derived from it with
//! HKDF-SHA256 (RFC 5869), one label per use, so that no key serves two purposes.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// HKDF labels ("info"); changing one changes every repository's derived keys.
const DATA_LABEL: &[u8] = b"pgpitr v1 object encryption";
const ID_LABEL: &[u8] = b"pgpitr v1 content ids";
const FINGERPRINT_LABEL: &[u8] = b"pgpitr v1 key fingerprint";
const OBJECT_LABEL: &[u8] = b"pgpitr v2 aes-256-gcm object key";

/// The repository key: 32 random bytes, zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct RepoKey([u8; 32]);

impl RepoKey {
    /// A new random key from the operating system's random source.
    pub fn generate() -> RepoKey {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).expect("the operating system's random source");
        RepoKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> RepoKey {
        RepoKey(bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, &self.0)
            .expand(label, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        out
    }

    /// The key objects are sealed with ([`super::envelope`]).
    pub fn data_key(&self) -> DataKey {
        DataKey(self.derive(DATA_LABEL))
    }

    /// The key of content ids ([`ContentIds::Keyed`]).
    pub fn id_key(&self) -> IdKey {
        IdKey(self.derive(ID_LABEL))
    }

    /// A public name of this key (16 hex digits), recorded in `repo.json` and in every key
    /// slot: it tells which repository a key belongs to and reveals nothing of the key.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive(FINGERPRINT_LABEL)[..8])
    }
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoKey(..)")
    }
}

/// The object encryption key, zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; 32]);

impl DataKey {
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key of one object sealed in format 2 ([`super::envelope::Cipher::Aes256Gcm`]):
    /// HKDF-SHA256 of this key with the object's random `nonce` as salt, 32 bytes of AES-256 key
    /// then 7 bytes of STREAM nonce prefix. A key per object keeps AES-GCM's 96-bit nonces far
    /// from reuse however many objects a repository holds, as Tink's AES-GCM-HKDF streaming
    /// AEAD does.
    pub fn object_key(&self, nonce: &[u8]) -> ObjectKey {
        let mut okm = ObjectKey([0u8; 39]);
        hkdf::Hkdf::<Sha256>::new(Some(nonce), &self.0)
            .expand(OBJECT_LABEL, &mut okm.0)
            .expect("39 bytes is a valid HKDF-SHA256 length");
        okm
    }
}

/// One object's AES-256 key and STREAM nonce prefix ([`DataKey::object_key`]), zeroed when
/// dropped.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ObjectKey([u8; 39]);

impl ObjectKey {
    pub fn key(&self) -> &[u8] {
        &self.0[..32]
    }

    pub fn nonce_prefix(&self) -> [u8; 7] {
        self.0[32..].try_into().expect("7 bytes")
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// The key of content ids, zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct IdKey([u8; 32]);

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdKey(..)")
    }
}

/// How a content hash becomes the id in an object's key (a WAL object is stored as
/// `<name>-<id>.lz4`). The id tells two contents apart, which the `archive_command` contract
/// needs, and identical contents share it, which deduplication needs.
#[derive(Debug, Clone)]
pub enum ContentIds {
    /// The SHA-256 itself, in hex: an unencrypted repository.
    Sha256,
    /// HMAC-SHA256 of the SHA-256 under the repository's id key, in hex: in an encrypted
    /// repository the keys name no content that anyone without the key could hash.
    Keyed(std::sync::Arc<IdKey>),
}

impl ContentIds {
    /// The id (64 lowercase hex digits) of content whose SHA-256 is `sha256`.
    pub fn id(&self, sha256: &[u8; 32]) -> String {
        match self {
            ContentIds::Sha256 => hex::encode(sha256),
            ContentIds::Keyed(key) => {
                let mut mac =
                    <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("any key length");
                mac.update(sha256);
                hex::encode(mac.finalize().into_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_purpose_and_repository() {
        let a = RepoKey::from_bytes([1; 32]);
        let b = RepoKey::from_bytes([2; 32]);
        assert_ne!(a.data_key().bytes(), &a.derive(ID_LABEL));
        assert_ne!(a.data_key().bytes(), b.data_key().bytes());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        // Stable: a repository's keys must derive the same way in every release.
        assert_eq!(a.fingerprint(), RepoKey::from_bytes([1; 32]).fingerprint());
    }

    #[test]
    fn object_keys_differ_per_object_and_are_stable() {
        let d = RepoKey::from_bytes([1; 32]).data_key();
        let (x, y) = (d.object_key(&[1; 19]), d.object_key(&[2; 19]));
        assert_ne!(x.key(), y.key());
        assert_ne!(x.nonce_prefix(), y.nonce_prefix());
        assert_ne!(x.key(), d.bytes());
        // Stable: objects sealed by one release open in every later one.
        assert_eq!(
            hex::encode(x.key()),
            "70242791274b6125a952b3eeab0d8834b384bd45c462750750f8acc4d1d7d30f"
        );
    }

    #[test]
    fn keyed_ids_hide_the_hash_but_keep_equality() {
        let sha = [7u8; 32];
        let plain = ContentIds::Sha256.id(&sha);
        assert_eq!(plain, "07".repeat(32));
        let keyed = ContentIds::Keyed(std::sync::Arc::new(RepoKey::from_bytes([1; 32]).id_key()));
        let other = ContentIds::Keyed(std::sync::Arc::new(RepoKey::from_bytes([2; 32]).id_key()));
        assert_ne!(keyed.id(&sha), plain);
        assert_eq!(keyed.id(&sha), keyed.id(&sha));
        assert_ne!(keyed.id(&sha), keyed.id(&[8; 32]));
        assert_ne!(keyed.id(&sha), other.id(&sha));
        assert_eq!(keyed.id(&sha).len(), 64);
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = RepoKey::from_bytes([0xab; 32]);
        assert!(!format!("{k:?}{:?}{:?}", k.data_key(), k.id_key()).contains("ab"));
    }
}
