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
