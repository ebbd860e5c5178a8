//! Encryption at rest: the sealed object format ([`envelope`]), the repository key and the keys
//! derived from it ([`keys`]), and the key slots that wrap it under passphrases ([`slots`]).
//! Pure: opening a repository's storage with them is `repo::encryption`'s work. The format and
//! the threat model are in docs/repository-format.md, "Encryption".

pub mod envelope;
pub mod keys;
pub mod slots;

use serde::{Deserialize, Serialize};

/// What `repo.json` records about an encrypted repository; absent in an unencrypted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionRecord {
    /// The cipher objects are sealed with ([`envelope::Cipher::name`]):
    /// `aes256gcm-hkdf-stream-64k`, or `xchacha20poly1305-stream-64k` in repositories created
    /// before it.
    pub cipher: String,
    /// How content ids in keys are made: `hmac-sha256` ([`keys::ContentIds::Keyed`]).
    pub content_ids: String,
    /// The repository key's fingerprint ([`keys::RepoKey::fingerprint`]).
    pub key: String,
}

pub const CONTENT_IDS: &str = "hmac-sha256";

impl EncryptionRecord {
    pub fn new(key: &keys::RepoKey, cipher: envelope::Cipher) -> EncryptionRecord {
        EncryptionRecord {
            cipher: cipher.name().into(),
            content_ids: CONTENT_IDS.into(),
            key: key.fingerprint(),
        }
    }

    /// The cipher of the repository's objects; `None` when this build cannot read or write
    /// repositories with this record.
    pub fn cipher(&self) -> Option<envelope::Cipher> {
        envelope::Cipher::from_name(&self.cipher).filter(|_| self.content_ids == CONTENT_IDS)
    }
}
