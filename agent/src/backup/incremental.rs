//! PostgreSQL 17+ incremental backups, made complete again as they arrive.
//!
//! With `BASE_BACKUP ( INCREMENTAL )` the server sends, for a relation segment of which few
//! blocks changed since the uploaded manifest's backup, `INCREMENTAL.<name>` instead of
//! `<name>`. Its layout (src/include/backup/basebackup_incremental.h; written by `sendFile()`
//! in src/backend/backup/basebackup.c, read by src/bin/pg_combinebackup/reconstruct.c), every
//! integer a `uint32` in the server's byte order:
//!
//! ```text
//! magic 0xd3ae1f0d | number of blocks n | truncation_block_length | n block numbers
//! | zero padding up to a multiple of BLCKSZ (only when n > 0) | n blocks of BLCKSZ bytes
//! ```
//!
//! The block numbers are relative to the segment and ascending (the server takes them from
//! its block reference table in order). The complete file is `max(truncation_block_length,
//! last block + 1)` blocks long; block `b` is the sent one if `b` was sent, else the parent's
//! block `b` if `b < truncation_block_length` and the parent has it, else zeros — the rule of
//! `reconstruct_from_incremental_file()`, with the parent being complete (pgpitr stores every
//! backup complete, so there is never a chain).
//!
//! pgpitr never stores the incremental file: [`super::tar_reader`] reconstructs the complete
//! file chunk by chunk while it reads ([`Parent`] gives it the parent's files and a way to read
//! a parent chunk). A chunk in which nothing changed is the parent's chunk, referenced without
//! being read when the parent recorded its CRC-32C. `backup_label` loses its `INCREMENTAL FROM`
//! lines (PostgreSQL refuses to start from a label that has them: "this is an incremental
//! backup, not a data directory"), as pg_combinebackup does; and PostgreSQL's `backup_manifest`
//! is rewritten to describe the complete files ([`rewrite_manifest`]).

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::repo::manifest::{ChunkRef, FileEntry};

/// `INCREMENTAL_MAGIC` (basebackup_incremental.h).
pub const MAGIC: u32 = 0xd3ae_1f0d;
/// The name prefix of an incremental file.
pub const PREFIX: &str = "INCREMENTAL.";
/// More blocks than a relation segment can have with any build option (RELSEG_SIZE at most
/// 2^31 / BLCKSZ … in practice 131072): a header claiming more is corrupt.
const MAX_BLOCKS: u32 = 1 << 22;

/// Reads the plain bytes of one of the parent's chunks into a buffer of its `plain_length`,
/// verified against its SHA-256. Called on the tar reader's thread (blocking).
pub type FetchChunk = dyn Fn(&ChunkRef, &mut [u8]) -> Result<(), String> + Send + Sync;

/// The backup an incremental backup is taken against, as stored (complete).
pub struct Parent {
    /// Its id, for messages.
    pub id: String,
    /// Its regular files by path.
    pub files: HashMap<String, FileEntry>,
    /// The server's `block_size` (BLCKSZ), in bytes.
    pub block_size: u32,
    pub fetch: Arc<FetchChunk>,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("id", &self.id)
            .field("files", &self.files.len())
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

/// The path of the complete file an incremental member stands for (`base/5/INCREMENTAL.16384`
/// → `base/5/16384`), or `None` for an ordinary member.
pub fn complete_path(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let rest = name.strip_prefix(PREFIX).filter(|r| !r.is_empty())?;
    Some(match dir {
        Some(d) => format!("{d}/{rest}"),
        None => rest.to_string(),
    })
}

/// The header of an incremental file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The blocks sent, ascending.
    pub blocks: Vec<u32>,
    pub truncation_block_length: u32,
}

impl Header {
    /// Blocks in the complete file.
    pub fn block_length(&self) -> u64 {
        let last = self.blocks.last().map_or(0, |&b| u64::from(b) + 1);
        u64::from(self.truncation_block_length).max(last)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads an incremental file's header, and its padding, from `input`, which holds `declared`
/// bytes in all (from the tar header); afterwards `input` is at the first block.
///
/// The padding rule is checked against `declared`: a file of `n` blocks is `12 + 4n` bytes of
/// header, padded to a multiple of `block_size` when `n > 0` (PostgreSQL 17 and 18), then the
/// blocks; a header without padding is accepted too, so that the length decides.
///
/// # Errors
/// A wrong magic number, block numbers that are not ascending or out of range, a length that
/// does not fit the header, a short read.
pub fn read_header(input: &mut impl Read, declared: u64, block_size: u32) -> io::Result<Header> {
    let mut fixed = [0u8; 12];
    input.read_exact(&mut fixed)?;
    let word = |i: usize, le: bool| {
        let b = [fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let le = match (word(0, true), word(0, false)) {
        (MAGIC, _) => true,
        (_, MAGIC) => false,
        (m, _) => {
            return Err(invalid(format!(
                "bad incremental magic number 0x{m:08x} (expected 0x{MAGIC:08x})"
            )))
        }
    };
    let (n, truncation_block_length) = (word(4, le), word(8, le));
    if n > MAX_BLOCKS || truncation_block_length > MAX_BLOCKS {
        return Err(invalid(format!(
            "incremental header claims {n} blocks, truncation length {truncation_block_length}"
        )));
    }
    let bs = u64::from(block_size);
    let plain_header = 12 + 4 * u64::from(n);
    let padded = if n > 0 {
        plain_header.div_ceil(bs) * bs
    } else {
        plain_header
    };
    let data = u64::from(n) * bs;
    let padding = if declared == padded + data {
        padded - plain_header
    } else if declared == plain_header + data {
        0
    } else {
        return Err(invalid(format!(
            "incremental file of {n} blocks is {declared} bytes long (expected {})",
            padded + data
        )));
    };
    let mut raw = vec![0u8; 4 * n as usize];
    input.read_exact(&mut raw)?;
    let blocks: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| {
            let b = [c[0], c[1], c[2], c[3]];
            if le {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        })
        .collect();
    if let Some(w) = blocks.windows(2).find(|w| w[0] >= w[1]) {
        return Err(invalid(format!(
            "incremental block numbers not ascending ({} then {})",
            w[0], w[1]
        )));
    }
    if blocks.last().is_some_and(|&b| b >= MAX_BLOCKS) {
        return Err(invalid("incremental block number out of range".into()));
    }
    io::copy(&mut input.take(padding), &mut io::sink()).and_then(|copied| {
        if copied == padding {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "incremental file ends in its header",
            ))
        }
    })?;
    Ok(Header {
        blocks,
        truncation_block_length,
    })
}

/// `backup_label` of an incremental backup without its `INCREMENTAL FROM LSN:` and
/// `INCREMENTAL FROM TLI:` lines (what pg_combinebackup writes for the combined backup,
/// src/bin/pg_combinebackup/backup_label.c), or `None` when it has none.
pub fn complete_backup_label(label: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(label.len());
    let mut dropped = false;
    for line in label.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"INCREMENTAL FROM LSN:") || line.starts_with(b"INCREMENTAL FROM TLI:")
        {
            dropped = true;
        } else {
            out.extend_from_slice(line);
        }
    }
    dropped.then_some(out)
}

/// A file of PostgreSQL's manifest that pgpitr stores differently: an incremental file
/// stored complete, or `backup_label` without its incremental lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// The path in PostgreSQL's manifest, as sent (`base/5/INCREMENTAL.16384`).
    pub sent_path: String,
    /// Size and CRC-32C of the member as sent.
    pub sent_size: u64,
    pub sent_crc32c: u32,
    /// The path, size and CRC-32C stored.
    pub path: String,
    pub size: u64,
    pub crc32c: u32,
}

/// PostgreSQL's `backup_manifest` of an incremental backup rewritten to describe the files
/// pgpitr stores: the entry of each [`Replaced`] member becomes one of its stored file (path,
/// size, CRC-32C; its `Last-Modified` kept), and the `Manifest-Checksum` is computed again.
///
/// The manifest's layout is PostgreSQL's (src/backend/backup/backup_manifest.c): one file per
/// line, the checksum on the last line over every byte before it (pg_verifybackup's
/// `verify_manifest_checksum()` hashes up to the second-to-last newline). CRC-32C values are
/// written as PostgreSQL writes them on a little-endian server: the bytes of the value, lowest
/// first, in hex.
///
/// # Errors
/// A manifest that is not in that layout, or without an entry for a replaced file.
pub fn rewrite_manifest(manifest: &[u8], replaced: &[Replaced]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(manifest).map_err(|_| "not UTF-8".to_string())?;
    let body = manifest_body(text)?;
    let by_path: HashMap<&str, &Replaced> =
        replaced.iter().map(|r| (r.sent_path.as_str(), r)).collect();
    let mut out = String::with_capacity(body.len());
    let mut done = 0;
    for line in body.split_inclusive('\n') {
        let content = line.trim_end_matches('\n');
        let (entry, comma) = match content.strip_suffix(',') {
            Some(e) => (e, ","),
            None => (content, ""),
        };
        if !entry.trim_start().starts_with("{ \"Path\":") {
            out.push_str(line);
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(entry).map_err(|e| format!("a file entry: {e}"))?;
        let Some(r) = value["Path"].as_str().and_then(|p| by_path.get(p)) else {
            out.push_str(line);
            continue;
        };
        let modified = value["Last-Modified"].as_str().unwrap_or("");
        out.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": {}, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}{comma}\n",
            serde_json::Value::from(r.path.as_str()),
            r.size,
            serde_json::Value::from(modified),
            hex::encode(r.crc32c.to_le_bytes()),
        ));
        done += 1;
    }
    if done != replaced.len() {
        return Err(format!(
            "{} of {} replaced files found in it",
            done,
            replaced.len()
        ));
    }
    Ok(seal_manifest(&out))
}

/// Everything of a manifest before its `"Manifest-Checksum"` line.
///
/// # Errors
/// A manifest without that line.
pub fn manifest_body(text: &str) -> Result<&str, String> {
    let at = text
        .rfind("\n\"Manifest-Checksum\"")
        .ok_or_else(|| "no Manifest-Checksum line".to_string())?;
    Ok(&text[..=at])
}

/// `body` (a manifest up to its last file or WAL range line, newline included) with its
/// `Manifest-Checksum` line: SHA-256 of `body`.
pub fn seal_manifest(body: &str) -> Vec<u8> {
    let sum = hex::encode(Sha256::digest(body.as_bytes()));
    format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incremental(blocks: &[u32], trunc: u32, bs: u32, pad: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [MAGIC, blocks.len() as u32, trunc] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for b in blocks {
            out.extend_from_slice(&b.to_le_bytes());
        }
        if pad && !blocks.is_empty() {
            while out.len() % bs as usize != 0 {
                out.push(0);
            }
        }
        for b in blocks {
            out.extend(std::iter::repeat_n(*b as u8, bs as usize));
        }
        out
    }

    #[test]
    fn headers_with_and_without_padding() {
        for pad in [true, false] {
            let file = incremental(&[1, 5, 9], 8, 1024, pad);
            let mut input = &file[..];
            let h = read_header(&mut input, file.len() as u64, 1024).unwrap();
            assert_eq!(h.blocks, vec![1, 5, 9]);
            assert_eq!(h.truncation_block_length, 8);
            assert_eq!(h.block_length(), 10);
            assert_eq!(input.len(), 3 * 1024, "at the first block");
            assert_eq!(input[0], 1);
        }
        let empty = incremental(&[], 7, 8192, true);
        assert_eq!(empty.len(), 12);
        let h = read_header(&mut &empty[..], 12, 8192).unwrap();
        assert_eq!((h.block_length(), h.blocks.len()), (7, 0));
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = incremental(&[1, 2], 3, 1024, true);
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(read_header(&mut &bad_magic[..], good.len() as u64, 1024).is_err());
        assert!(read_header(&mut &good[..], good.len() as u64 + 1, 1024).is_err());
        let unsorted = incremental(&[2, 1], 3, 1024, true);
        assert!(read_header(&mut &unsorted[..], unsorted.len() as u64, 1024).is_err());
        assert!(read_header(&mut &good[..10], good.len() as u64, 1024).is_err());
    }

    #[test]
    fn incremental_names() {
        assert_eq!(
            complete_path("base/5/INCREMENTAL.16384").as_deref(),
            Some("base/5/16384")
        );
        assert_eq!(
            complete_path("pg_tblspc/1/PG_17_1/5/INCREMENTAL.16384.1").as_deref(),
            Some("pg_tblspc/1/PG_17_1/5/16384.1")
        );
        assert_eq!(complete_path("base/5/16384"), None);
        assert_eq!(complete_path("base/5/INCREMENTAL."), None);
    }

    #[test]
    fn backup_label_loses_its_incremental_lines() {
        let label = b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nCHECKPOINT LOCATION: 0/4000080\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\nSTART TIMELINE: 1\n";
        let out = complete_backup_label(label).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nCHECKPOINT LOCATION: 0/4000080\nSTART TIMELINE: 1\n"
        );
        assert_eq!(complete_backup_label(b"START TIMELINE: 1\n"), None);
    }

    #[test]
    fn manifests_are_rewritten_and_sealed() {
        let body = "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7,\n\"Files\": [\n{ \"Path\": \"backup_label\", \"Size\": 9, \"Last-Modified\": \"2026-12-04 05:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"00000000\" },\n{ \"Path\": \"base/5/INCREMENTAL.16384\", \"Size\": 8204, \"Last-Modified\": \"2026-12-04 05:00:01 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"11111111\" }\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000138\" }\n],\n";
        let manifest = seal_manifest(body);
        let replaced = vec![Replaced {
            sent_path: "base/5/INCREMENTAL.16384".into(),
            sent_size: 8204,
            sent_crc32c: 0x1111_1111,
            path: "base/5/16384".into(),
            size: 81920,
            crc32c: 0x0a0b_0c0d,
        }];
        let out = String::from_utf8(rewrite_manifest(&manifest, &replaced).unwrap()).unwrap();
        assert!(out.contains("{ \"Path\": \"base/5/16384\", \"Size\": 81920, \"Last-Modified\": \"2026-12-04 05:00:01 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"0d0c0b0a\" }\n],"), "{out}");
        assert!(!out.contains("INCREMENTAL."));
        assert!(out.contains("\"Path\": \"backup_label\", \"Size\": 9"));
        // The checksum covers everything before its line.
        let new_body = manifest_body(&out).unwrap();
        assert_eq!(out.as_bytes(), seal_manifest(new_body).as_slice());
        assert_ne!(new_body, body);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["Files"][1]["Size"], 81920);
        // A replaced file the manifest does not list is an error.
        let missing = vec![Replaced {
            sent_path: "base/5/INCREMENTAL.1".into(),
            ..replaced[0].clone()
        }];
        assert!(rewrite_manifest(&manifest, &missing).is_err());
        assert!(rewrite_manifest(b"{}", &[]).is_err());
    }
}

/// Hostile incremental files and manifests from the server: property-based (see
/// `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// An incremental file of ascending `blocks` (block size 1024), with or without padding.
    fn file(blocks: &[u32], trunc: u32, pad: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [MAGIC, blocks.len() as u32, trunc] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for b in blocks {
            out.extend_from_slice(&b.to_le_bytes());
        }
        if pad && !blocks.is_empty() {
            out.resize(out.len().div_ceil(1024) * 1024, 0);
        }
        out.resize(out.len() + blocks.len() * 1024, 7);
        out
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn well_formed_headers_read_back(
            blocks in proptest::collection::btree_set(0u32..5000, 0..40),
            trunc in 0u32..6000,
            pad in any::<bool>(),
        ) {
            let blocks: Vec<u32> = blocks.into_iter().collect();
            let bytes = file(&blocks, trunc, pad);
            let mut input = &bytes[..];
            let h = read_header(&mut input, bytes.len() as u64, 1024).unwrap();
            prop_assert_eq!(&h.blocks, &blocks);
            prop_assert_eq!(h.truncation_block_length, trunc);
            prop_assert_eq!(input.len(), blocks.len() * 1024);
        }

        #[test]
        fn arbitrary_or_mutated_headers_give_a_typed_error_or_a_consistent_header(
            blocks in proptest::collection::btree_set(0u32..5000, 0..20),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            declared_delta in -3i64..3,
            raw in proptest::collection::vec(any::<u8>(), 0..64),
            use_raw in any::<bool>(),
        ) {
            let mut bytes = if use_raw {
                raw
            } else {
                file(&blocks.into_iter().collect::<Vec<_>>(), 9, true)
            };
            for (at, b) in edits {
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] = b;
                }
            }
            let declared = (bytes.len() as i64 + declared_delta).max(0) as u64;
            if let Ok(h) = read_header(&mut &bytes[..], declared, 1024) {
                prop_assert!(h.blocks.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(h.blocks.len() as u64 * 1024 <= declared);
            }
        }

        #[test]
        fn mutated_manifests_are_rewritten_or_refused(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        ) {
            let body = "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"Files\": [\n{ \"Path\": \"base/5/INCREMENTAL.1\", \"Size\": 12, \"Last-Modified\": \"x\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"00000000\" }\n],\n";
            let mut bytes = seal_manifest(body);
            for (at, b) in edits {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            let replaced = [Replaced {
                sent_path: "base/5/INCREMENTAL.1".into(),
                sent_size: 12,
                sent_crc32c: 0,
                path: "base/5/1".into(),
                size: 8192,
                crc32c: 1,
            }];
            if let Ok(out) = rewrite_manifest(&bytes, &replaced) {
                let text = String::from_utf8(out).unwrap();
                prop_assert!(text.contains("\"Path\": \"base/5/1\""));
                let sealed = seal_manifest(manifest_body(&text).unwrap());
                prop_assert_eq!(text.as_bytes(), sealed.as_slice());
            }
        }
    }
}
