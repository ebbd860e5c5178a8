//! Every repository key is built here, and nowhere else; `docs/repository-format.md` mirrors it.
//!
//! ```text
//! repo.json                                         identity (format, system identifier, …)
//! wal/<TLI><LOG>/<segment>-<sha256>.lz4             WAL segments, .partial and .backup files
//! wal/history/<TLI>.history-<sha256>.lz4            timeline history files
//! packs/<xx>/<pack-id>.pack                         lz4 chunks of base backups, appended
//! packs/<xx>/<pack-id>.idx                          the chunks in that pack (JSON)
//! backups/<backup-id>/backup_manifest               PostgreSQL's own backup manifest
//! backups/<backup-id>/manifest.json                 the backup's manifest: its commit point
//! locks/<token>.lock                                the repository lock of a running backup/expire
//! locks/<token>.beat                                that lock's heartbeat (rewritten, never the lock)
//! locks/<token>.clock                               written, read and removed to learn storage time
//! leases/<token>.lease                              a restore's claim on a backup and its WAL
//! restore-points/<TLI>/<LSN>.json                   a restore point found in archived WAL
//! ```
//!
//! With `s3_object_lock` every object is written locked except the mutable ones
//! ([`is_mutable`]), which pgpitr rewrites or removes in normal operation.
//!
//! The SHA-256 (of the plain bytes, 64 hex digits) is part of a WAL object's key, so two
//! different contents for one WAL file name can never overwrite each other, even on S3 servers
//! that ignore conditional PUTs.

use crate::pg::{Lsn, TimelineId, WalFileName};
use crate::repo::manifest::BackupId;

pub const REPO_JSON: &str = "repo.json";
pub const WAL_ROOT: &str = "wal/";
const HISTORY_DIR: &str = "wal/history/";
const WAL_SUFFIX: &str = ".lz4";

/// The directory (key prefix ending in `/`) that holds objects for `name`.
pub fn wal_dir(name: WalFileName) -> String {
    match name.segment() {
        Some(seg) => format!("{WAL_ROOT}{}/", seg.timeline_log_prefix()),
        None => HISTORY_DIR.to_string(),
    }
}

/// The prefix shared by every stored version of `name`: `<dir><name>-`.
pub fn wal_object_prefix(name: WalFileName) -> String {
    format!("{}{name}-", wal_dir(name))
}

/// The key of `name` with content hash `content_id`.
pub fn wal_object_key(name: WalFileName, content_id: &str) -> String {
    format!("{}{content_id}{WAL_SUFFIX}", wal_object_prefix(name))
}

/// Parses a WAL object key back into its file name and hash; `None` for anything else
/// (temporary files, objects of other kinds, names that fail validation).
pub fn parse_wal_object_key(key: &str) -> Option<(WalFileName, String)> {
    let rest = key.strip_prefix(WAL_ROOT)?;
    let (dir, file) = rest.split_once('/')?;
    let stem = file.strip_suffix(WAL_SUFFIX)?;
    let (name, sha) = stem.rsplit_once('-')?;
    let name: WalFileName = name.parse().ok()?;
    if sha.len() != 64
        || !sha
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    (format!("{WAL_ROOT}{dir}/") == wal_dir(name)).then(|| (name, sha.to_string()))
}

pub const BACKUPS_ROOT: &str = "backups/";
pub const PACKS_ROOT: &str = "packs/";
const MANIFEST_JSON: &str = "manifest.json";
const PACK_SUFFIX: &str = ".pack";
const PACK_INDEX_SUFFIX: &str = ".idx";

/// `backups/<id>/manifest.json`: written last, its presence is the backup's commit point.
pub fn backup_manifest_key(id: &BackupId) -> String {
    format!("{BACKUPS_ROOT}{id}/{MANIFEST_JSON}")
}

/// `backups/<id>/backup_manifest`: PostgreSQL's own manifest of the backup, as sent.
pub fn pg_backup_manifest_key(id: &BackupId) -> String {
    format!("{BACKUPS_ROOT}{id}/backup_manifest")
}

/// The backup id of a `backups/<id>/manifest.json` key; `None` for any other key.
pub fn parse_backup_manifest_key(key: &str) -> Option<BackupId> {
    let rest = key.strip_prefix(BACKUPS_ROOT)?;
    let (id, file) = rest.split_once('/')?;
    (file == MANIFEST_JSON).then(|| BackupId::parse(id).ok())?
}

/// Whether `id` is a valid pack id: 32 lowercase hex digits.
pub fn is_pack_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn pack_dir(pack_id: &str) -> String {
    format!("{PACKS_ROOT}{}/", &pack_id[..pack_id.len().min(2)])
}

/// `packs/<xx>/<pack-id>.pack`, `xx` being the id's first two hex digits.
pub fn pack_key(pack_id: &str) -> String {
    format!("{}{pack_id}{PACK_SUFFIX}", pack_dir(pack_id))
}

/// `packs/<xx>/<pack-id>.idx`: the index of the pack's chunks, written after the pack.
pub fn pack_index_key(pack_id: &str) -> String {
    format!("{}{pack_id}{PACK_INDEX_SUFFIX}", pack_dir(pack_id))
}

/// What a key under [`PACKS_ROOT`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackObject {
    Pack(String),
    Index(String),
}

/// Parses a pack or pack-index key back into its pack id; `None` for anything else.
pub fn parse_pack_key(key: &str) -> Option<PackObject> {
    let rest = key.strip_prefix(PACKS_ROOT)?;
    let (dir, file) = rest.split_once('/')?;
    let (id, object) = if let Some(id) = file.strip_suffix(PACK_SUFFIX) {
        (id, PackObject::Pack(id.to_string()))
    } else {
        let id = file.strip_suffix(PACK_INDEX_SUFFIX)?;
        (id, PackObject::Index(id.to_string()))
    };
    (is_pack_id(id) && dir == &id[..2]).then_some(object)
}

pub const LOCKS_ROOT: &str = "locks/";
const LOCK_SUFFIX: &str = ".lock";

/// Whether `token` is a valid lock token: 1 to 100 characters of `[0-9a-z-]`.
pub fn is_lock_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 100
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

/// `locks/<token>.lock`: one contender for the repository lock (see `repo::lock`).
pub fn lock_key(token: &str) -> String {
    format!("{LOCKS_ROOT}{token}{LOCK_SUFFIX}")
}

/// The token of a `locks/<token>.lock` key; `None` for any other key.
pub fn parse_lock_key(key: &str) -> Option<String> {
    let token = key.strip_prefix(LOCKS_ROOT)?.strip_suffix(LOCK_SUFFIX)?;
    is_lock_token(token).then(|| token.to_string())
}

const BEAT_SUFFIX: &str = ".beat";

/// `locks/<token>.beat`: the heartbeat of lock `token`, rewritten by its holder while the lock
/// object exists (the lock object itself is written once; see `repo::lock`).
pub fn beat_key(token: &str) -> String {
    format!("{LOCKS_ROOT}{token}{BEAT_SUFFIX}")
}

/// The token of a `locks/<token>.beat` key; `None` for any other key.
pub fn parse_beat_key(key: &str) -> Option<String> {
    let token = key.strip_prefix(LOCKS_ROOT)?.strip_suffix(BEAT_SUFFIX)?;
    is_lock_token(token).then(|| token.to_string())
}

const CLOCK_SUFFIX: &str = ".clock";

/// `locks/<token>.clock`: written, read back and removed to learn the storage's time (its
/// Last-Modified or mtime), so that ages are never judged by comparing two hosts' clocks. One
/// per reader, so that concurrent readers never remove each other's.
pub fn clock_key(token: &str) -> String {
    format!("{LOCKS_ROOT}{token}{CLOCK_SUFFIX}")
}

/// The token of a `locks/<token>.clock` key; `None` for any other key.
pub fn parse_clock_key(key: &str) -> Option<String> {
    let token = key.strip_prefix(LOCKS_ROOT)?.strip_suffix(CLOCK_SUFFIX)?;
    is_lock_token(token).then(|| token.to_string())
}

pub const LEASES_ROOT: &str = "leases/";
const LEASE_SUFFIX: &str = ".lease";

/// `leases/<token>.lease`: one restore's claim on what it reads (see `repo::lease`). Tokens
/// are built like lock tokens.
pub fn lease_key(token: &str) -> String {
    format!("{LEASES_ROOT}{token}{LEASE_SUFFIX}")
}

/// The token of a `leases/<token>.lease` key; `None` for any other key.
pub fn parse_lease_key(key: &str) -> Option<String> {
    let token = key.strip_prefix(LEASES_ROOT)?.strip_suffix(LEASE_SUFFIX)?;
    is_lock_token(token).then(|| token.to_string())
}

pub const RESTORE_POINTS_ROOT: &str = "restore-points/";

/// `restore-points/<TLI>/<LSN>.json`: the restore point whose record begins at `lsn` on
/// `timeline` (8 and 16 uppercase hex digits, so that keys sort in WAL order).
pub fn restore_point_key(timeline: TimelineId, lsn: Lsn) -> String {
    format!(
        "{RESTORE_POINTS_ROOT}{}/{:016X}.json",
        timeline.hex(),
        lsn.0
    )
}

/// The timeline and LSN of a restore point key; `None` for any other key.
pub fn parse_restore_point_key(key: &str) -> Option<(TimelineId, Lsn)> {
    let rest = key.strip_prefix(RESTORE_POINTS_ROOT)?;
    let (tli, file) = rest.split_once('/')?;
    let lsn = file.strip_suffix(".json")?;
    let hex = |s: &str, len: usize| {
        (s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
    };
    Some((TimelineId(hex(tli, 8)? as u32), Lsn(hex(lsn, 16)?)))
}

/// Whether pgpitr rewrites or removes the object under `key` in normal operation, so that it
/// must never be under Object Lock: `repo.json` (it lives as long as the repository, which a
/// lock could only follow by being renewed for ever), the repository
/// lock's objects (`locks/`), restores' leases (`leases/`), run records (`runs/`) and key slots
/// (`keys/`, removed by `pgpitr key remove`). Everything else — WAL, packs and their indexes,
/// backup manifests, restore points — is written once and only ever deleted by `expire`.
pub fn is_mutable(key: &str) -> bool {
    key == REPO_JSON
        || [
            LOCKS_ROOT,
            LEASES_ROOT,
            crate::repo::runs::RUNS_ROOT,
            crate::crypto::slots::KEYS_PREFIX,
        ]
        .iter()
        .any(|p| key.starts_with(p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_objects_pgpitr_rewrites_or_removes_are_mutable() {
        use super::*;
        let sha = "ab".repeat(32);
        let id = BackupId("20261123T130000Z".into());
        for key in [
            REPO_JSON.to_string(),
            lock_key("1-2-3"),
            beat_key("1-2-3"),
            clock_key("1-2-3"),
            lease_key("1-2-3"),
            "runs/verify/1-2-3.json".to_string(),
            crate::crypto::slots::slot_key("0123456789abcdef"),
        ] {
            assert!(is_mutable(&key), "{key}");
        }
        for key in [
            wal_object_key("000000010000000000000001".parse().unwrap(), &sha),
            wal_object_key("00000002.history".parse().unwrap(), &sha),
            pack_key(&"c".repeat(32)),
            pack_index_key(&"c".repeat(32)),
            backup_manifest_key(&id),
            pg_backup_manifest_key(&id),
            restore_point_key(TimelineId(1), Lsn(0x100)),
        ] {
            assert!(!is_mutable(&key), "{key}");
        }
    }

    use super::*;

    #[test]
    fn restore_point_keys_round_trip_and_reject_other_keys() {
        let key = restore_point_key(TimelineId(2), Lsn(0x1_0300_0028));
        assert_eq!(key, "restore-points/00000002/0000000103000028.json");
        assert_eq!(
            parse_restore_point_key(&key),
            Some((TimelineId(2), Lsn(0x1_0300_0028)))
        );
        for bad in [
            "restore-points/00000002/0000000103000028",
            "restore-points/2/0000000103000028.json",
            "restore-points/00000002/00000001030000zz.json",
            "restore-points/00000002/../0000000103000028.json",
            "wal/00000002/0000000103000028.json",
        ] {
            assert_eq!(parse_restore_point_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn wal_keys_round_trip_and_group_by_timeline_and_log() {
        let sha = "ab".repeat(32);
        for (name, key) in [
            (
                "000000010000000200000003",
                format!("wal/0000000100000002/000000010000000200000003-{sha}.lz4"),
            ),
            (
                "000000020000000000000005.partial",
                format!("wal/0000000200000000/000000020000000000000005.partial-{sha}.lz4"),
            ),
            (
                "00000002.history",
                format!("wal/history/00000002.history-{sha}.lz4"),
            ),
        ] {
            let parsed: WalFileName = name.parse().unwrap();
            assert_eq!(wal_object_key(parsed, &sha), key);
            assert_eq!(parse_wal_object_key(&key), Some((parsed, sha.clone())));
        }
    }

    #[test]
    fn foreign_keys_are_not_wal_objects() {
        let sha = "ab".repeat(32);
        for key in [
            "repo.json".to_string(),
            format!("wal/0000000100000009/000000010000000200000003-{sha}.lz4"), // wrong directory
            format!("wal/history/00000002.history-{}.lz4", "AB".repeat(32)),
            format!("wal/0000000100000002/000000010000000200000003-{sha}"),
            "wal/0000000100000002/.tmp.x".to_string(),
        ] {
            assert_eq!(parse_wal_object_key(&key), None, "{key}");
        }
    }

    #[test]
    fn backup_and_pack_keys_round_trip() {
        let id = BackupId::parse("20261123T101459Z").unwrap();
        assert_eq!(
            backup_manifest_key(&id),
            "backups/20261123T101459Z/manifest.json"
        );
        assert_eq!(
            parse_backup_manifest_key(&backup_manifest_key(&id)),
            Some(id.clone())
        );
        assert_eq!(
            parse_backup_manifest_key(&pg_backup_manifest_key(&id)),
            None
        );
        assert_eq!(parse_backup_manifest_key("backups/../manifest.json"), None);
        let pack = "0123456789abcdef0123456789abcdef";
        assert_eq!(pack_key(pack), format!("packs/01/{pack}.pack"));
        assert_eq!(
            parse_pack_key(&pack_key(pack)),
            Some(PackObject::Pack(pack.into()))
        );
        assert_eq!(
            parse_pack_key(&pack_index_key(pack)),
            Some(PackObject::Index(pack.into()))
        );
        assert_eq!(parse_pack_key(&format!("packs/02/{pack}.pack")), None);
        assert_eq!(parse_pack_key("packs/01/0123.pack"), None);
    }

    #[test]
    fn lock_keys_round_trip() {
        let t = "00001763892899000000000-42-ab12";
        assert_eq!(lock_key(t), format!("locks/{t}.lock"));
        assert_eq!(parse_lock_key(&lock_key(t)).as_deref(), Some(t));
        assert_eq!(parse_lock_key("locks/a/b.lock"), None);
        assert_eq!(parse_lock_key("locks/.tmp.lock"), None);
        assert_eq!(parse_beat_key(&beat_key(t)).as_deref(), Some(t));
        assert_eq!(parse_lock_key(&beat_key(t)), None);
        assert_eq!(parse_beat_key(&lock_key(t)), None);
        assert_eq!(parse_clock_key(&clock_key(t)).as_deref(), Some(t));
        assert_eq!(parse_lock_key(&clock_key(t)), None);
        assert_eq!(parse_beat_key(&clock_key(t)), None);
        assert_eq!(parse_lease_key(&lease_key(t)).as_deref(), Some(t));
        assert_eq!(parse_lease_key(&lock_key(t)), None);
    }
}
