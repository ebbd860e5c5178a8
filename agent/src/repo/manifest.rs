//! `backups/<id>/manifest.json`: everything known about one base backup. Written last — its
//! presence is the backup's commit point — and never modified afterwards, except that `keep`
//! may be changed by `pgpitr expire --keep` through a whole-object overwrite.

use serde::{Deserialize, Serialize};

use crate::pg::{Lsn, TimelineId, WalSegSize};

/// The manifest format this build writes. Format 2 added [`FileEntry::crc32c`] and dropped
/// the whole-file SHA-256 of files longer than one chunk; this build reads both.
pub const MANIFEST_VERSION: u32 = 2;

/// A backup id: the UTC start time, `YYYYMMDDTHHMMSSZ`, unique per repository (a backup
/// started in the same second waits a second). Sorts chronologically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackupId(pub String);

impl BackupId {
    /// Validates the form, so that an id read from the command line or a key never becomes an
    /// arbitrary path.
    pub fn parse(s: &str) -> Result<BackupId, crate::pg::ParseError> {
        let ok = s.len() == 16
            && s.as_bytes()[8] == b'T'
            && s.as_bytes()[15] == b'Z'
            && s[..8]
                .bytes()
                .chain(s[9..15].bytes())
                .all(|b| b.is_ascii_digit());
        if ok {
            Ok(BackupId(s.to_string()))
        } else {
            Err(crate::pg::ParseError::new(
                "backup id",
                s,
                "YYYYMMDDTHHMMSSZ",
            ))
        }
    }

    pub fn from_time(t: jiff::Timestamp) -> BackupId {
        BackupId(t.strftime("%Y%m%dT%H%M%SZ").to_string())
    }
}

impl std::fmt::Display for BackupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub manifest_version: u32,
    pub id: BackupId,
    pub label: String,
    /// Never expired by retention.
    #[serde(default)]
    pub keep: bool,
    /// Where WAL replay must start (the checkpoint's redo point, as in `backup_label`).
    pub start_lsn: Lsn,
    pub start_timeline: TimelineId,
    /// The end of the backup: recovery is consistent once replay passes this LSN.
    pub stop_lsn: Lsn,
    pub stop_timeline: TimelineId,
    /// Wall-clock times (UTC, RFC 3339) when the backup started and when it ended.
    pub start_time: jiff::Timestamp,
    pub stop_time: jiff::Timestamp,
    /// `pg_current_xact_id()` read just after the backup stopped, when it could be read: every
    /// transaction id below it began before the backup ended (used to choose a backup for
    /// `--target-xid`).
    #[serde(default)]
    pub stop_next_xid: Option<u64>,
    #[serde(with = "super::u64_string")]
    pub system_identifier: u64,
    /// `server_version_num`, e.g. 150018.
    pub pg_version_num: u32,
    pub wal_segment_size: WalSegSize,
    pub tablespaces: Vec<TablespaceEntry>,
    pub files: Vec<FileEntry>,
    /// Sum of the plain sizes of all files, in bytes.
    pub size_bytes: u64,
    /// Compressed bytes this backup added to the repository (chunks no earlier backup stored).
    pub new_bytes: u64,
    /// The backup this one was taken against with `--incremental` (PostgreSQL 17+). For
    /// information only: the backup is stored complete and restores without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<BackupId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceEntry {
    pub oid: u32,
    /// The tablespace's location on the backed-up server.
    pub location: String,
}

/// One file of the backup. `path` is relative to the data directory, or to the tablespace
/// directory (`pg_tblspc/<oid>/...` for tablespace files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    /// SHA-256 of the file's plain bytes, 64 hex digits: in format 1 for every regular
    /// file; from format 2 only for files of at most one chunk (it is then the chunk's own).
    /// `None` for directories and symlinks.
    #[serde(default)]
    pub sha256: Option<String>,
    /// CRC-32C (Castagnoli) of the file's plain bytes, 8 hex digits of its value; every
    /// regular file from format 2 on. The per-chunk SHA-256 protects the content; this
    /// checks that the chunks make up the file, cheaply, and is what PostgreSQL's
    /// `backup_manifest` is cross-checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
    #[serde(default)]
    pub kind: FileKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    #[serde(default)]
    pub chunks: Vec<ChunkRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    #[default]
    File,
    Directory,
    Symlink,
}

/// Where a chunk's bytes live: `length` compressed bytes at `offset` in pack `pack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// SHA-256 of the chunk's plain bytes, hex.
    pub sha256: String,
    pub pack: String,
    pub offset: u64,
    pub length: u64,
    pub plain_length: u64,
    /// CRC-32C of the chunk's plain bytes, 8 hex digits of its value (backups taken since
    /// incremental backups exist): an incremental backup that keeps this chunk of its parent
    /// combines the file's CRC-32C from it without reading the chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_ids_are_validated() {
        assert!(BackupId::parse("20261123T101459Z").is_ok());
        for bad in [
            "",
            "../x",
            "20261123T101459",
            "2026112xT101459Z",
            "20261123T101459Z/",
        ] {
            assert!(BackupId::parse(bad).is_err(), "{bad}");
        }
        let t: jiff::Timestamp = "2026-11-23T10:14:59Z".parse().unwrap();
        assert_eq!(BackupId::from_time(t).0, "20261123T101459Z");
    }
}

/// Hostile `manifest.json`: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn timestamp() -> impl Strategy<Value = jiff::Timestamp> {
        (0i64..4_000_000_000, 0i32..1_000_000_000)
            .prop_map(|(s, ns)| jiff::Timestamp::new(s, ns).unwrap())
    }

    fn chunk() -> impl Strategy<Value = ChunkRef> {
        (
            "[0-9a-f]{64}",
            "\\PC{0,20}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(sha256, pack, offset, length, plain_length)| ChunkRef {
                sha256,
                pack,
                offset,
                length,
                plain_length,
                crc32c: None,
            })
    }

    fn file() -> impl Strategy<Value = FileEntry> {
        (
            ("\\PC{1,60}", any::<u64>(), any::<u32>(), any::<i64>()),
            proptest::option::of("[0-9a-f]{64}"),
            proptest::option::of("[0-9a-f]{8}"),
            prop::sample::select(vec![FileKind::File, FileKind::Directory, FileKind::Symlink]),
            proptest::option::of("\\PC{0,40}"),
            proptest::collection::vec(chunk(), 0..3),
        )
            .prop_map(
                |((path, size, mode, mtime), sha256, crc32c, kind, link_target, chunks)| {
                    FileEntry {
                        path,
                        size,
                        mode,
                        mtime,
                        sha256,
                        crc32c,
                        kind,
                        link_target,
                        chunks,
                    }
                },
            )
    }

    fn manifest() -> impl Strategy<Value = BackupManifest> {
        (
            (timestamp(), timestamp(), "\\PC{0,40}", any::<bool>()),
            (any::<u64>(), 1u32.., any::<u64>(), 1u32..),
            (
                proptest::option::of(any::<u64>()),
                any::<u64>(),
                any::<u32>(),
                20u32..=30,
            ),
            proptest::collection::vec((any::<u32>(), "\\PC{0,40}"), 0..3),
            proptest::collection::vec(file(), 0..6),
            (any::<u64>(), any::<u64>()),
        )
            .prop_map(
                |(
                    (start_time, stop_time, label, keep),
                    (start_lsn, start_tli, stop_lsn, stop_tli),
                    (stop_next_xid, system_identifier, pg_version_num, seg_shift),
                    tablespaces,
                    files,
                    (size_bytes, new_bytes),
                )| BackupManifest {
                    manifest_version: MANIFEST_VERSION,
                    id: BackupId::from_time(start_time),
                    label,
                    keep,
                    start_lsn: Lsn(start_lsn),
                    start_timeline: TimelineId(start_tli),
                    stop_lsn: Lsn(stop_lsn),
                    stop_timeline: TimelineId(stop_tli),
                    start_time,
                    stop_time,
                    stop_next_xid,
                    system_identifier,
                    pg_version_num,
                    wal_segment_size: WalSegSize::new(1 << seg_shift).unwrap(),
                    tablespaces: tablespaces
                        .into_iter()
                        .map(|(oid, location)| TablespaceEntry { oid, location })
                        .collect(),
                    files,
                    size_bytes,
                    new_bytes,
                    incremental_from: None,
                },
            )
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn every_manifest_round_trips_through_json(m in manifest()) {
            let json = serde_json::to_vec(&m).unwrap();
            prop_assert_eq!(serde_json::from_slice::<BackupManifest>(&json).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_are_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(serde_json::from_slice::<BackupManifest>(&bytes).is_err());
        }

        #[test]
        fn mutated_manifests_never_panic(
            m in manifest(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut json = serde_json::to_vec(&m).unwrap();
            for (at, b) in edits {
                let at = at.index(json.len());
                json[at] = b;
            }
            let _ = serde_json::from_slice::<BackupManifest>(&json);
        }

        #[test]
        fn backup_ids_are_accepted_only_in_their_form(s in "\\PC{0,20}|[0-9]{8}T[0-9]{6}Z|[0-9T/.Z]{16}") {
            if let Ok(id) = BackupId::parse(&s) {
                prop_assert_eq!(&id.0, &s);
                prop_assert!(s.len() == 16 && s.bytes().all(|b| b.is_ascii_alphanumeric()));
            }
        }

        #[test]
        fn ids_made_from_a_time_parse_back(t in timestamp()) {
            let id = BackupId::from_time(t);
            prop_assert_eq!(BackupId::parse(&id.0).unwrap(), id);
        }
    }
}
