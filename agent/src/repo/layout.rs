//! Every repository key is built here, and nowhere else; `docs/repository-format.md` mirrors it.
//!
//! ```text
//! repo.json                                         identity (format, system identifier, …)
//! wal/<TLI><LOG>/<segment>-<sha256>.lz4             WAL segments, .partial and .backup files
//! wal/history/<TLI>.history-<sha256>.lz4            timeline history files
//! ```
//!
//! The SHA-256 (of the plain bytes, 64 hex digits) is part of a WAL object's key, so two
//! different contents for one WAL file name can never overwrite each other, even on S3 servers
//! that ignore conditional PUTs.

use crate::pg::WalFileName;

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

/// The key of `name` with content hash `sha256_hex`.
pub fn wal_object_key(name: WalFileName, sha256_hex: &str) -> String {
    format!("{}{sha256_hex}{WAL_SUFFIX}", wal_object_prefix(name))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
