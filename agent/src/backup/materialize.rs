//! Writing a stored backup back out as a directory: the data directory of a restore, or a
//! directory for `pg_verifybackup`.
//!
//! Every path from the manifest is checked again (relative, no `..`): a manifest is data read
//! from storage, never trusted as a path. Directories are created with mode 0700, files with
//! 0600 (what PostgreSQL itself uses without group access), and each tablespace becomes a
//! symlink `pg_tblspc/<oid>` to its location — the original one unless remapped, which must
//! not exist or be empty. Every chunk is verified against its SHA-256 while it is written, and
//! every file against its size and its CRC-32C (format 2; format 1 manifests give a whole-file
//! SHA-256 instead). The destination must not exist or be empty. Once every file is written,
//! the file systems holding the data directory and its tablespaces are synced (`syncfs`), so
//! that a restore that returned survives a crash of the machine.
//!
//! `backup_label` and `tablespace_map` are written like any other file; a restore that
//! remaps tablespaces must rewrite `tablespace_map` itself (PostgreSQL recreates the
//! `pg_tblspc` links from it).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::repo::codec;
use crate::repo::layout;
use crate::repo::manifest::{BackupManifest, FileEntry, FileKind};
use crate::repo::RepoError;
use crate::storage::Storage;

/// How to materialise a backup.
#[derive(Debug, Clone)]
pub struct MaterializeOptions {
    /// Where to put each tablespace instead of its original location, by OID.
    pub tablespace_map: HashMap<u32, PathBuf>,
    /// Files fetched at once.
    pub parallel: usize,
}

impl Default for MaterializeOptions {
    fn default() -> Self {
        MaterializeOptions {
            tablespace_map: HashMap::new(),
            parallel: 8,
        }
    }
}

/// What [`materialize`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterializeStats {
    pub files: u64,
    pub bytes: u64,
}

/// Writes backup `manifest` into `dest`.
///
/// # Errors
/// [`RepoError::Corrupt`] for an unsafe path in the manifest or a chunk or file whose checksum
/// does not match; [`RepoError::Io`] for a non-empty destination or tablespace directory and
/// file-system failures; storage errors.
pub async fn materialize(
    storage: Arc<dyn Storage>,
    manifest: &BackupManifest,
    dest: &Path,
    opts: &MaterializeOptions,
) -> Result<MaterializeStats, RepoError> {
    let manifest_key = layout::backup_manifest_key(&manifest.id);
    let corrupt = |message: String| RepoError::Corrupt {
        key: manifest_key.clone(),
        message,
    };
    prepare_empty_dir(dest)?;

    // Tablespaces first, so that their files land behind the symlinks.
    let mut links = HashMap::new();
    for ts in &manifest.tablespaces {
        let target = opts
            .tablespace_map
            .get(&ts.oid)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        if !target.is_absolute() {
            return Err(corrupt(format!(
                "tablespace {} location '{}' is not absolute",
                ts.oid,
                target.display()
            )));
        }
        prepare_empty_dir(&target)?;
        let link = dest.join("pg_tblspc").join(ts.oid.to_string());
        mkdir_all(link.parent().expect("has a parent"))?;
        std::os::unix::fs::symlink(&target, &link).map_err(|e| RepoError::io(&link, e))?;
        links.insert(format!("pg_tblspc/{}", ts.oid), target);
    }

    let mut files: Vec<(PathBuf, FileEntry)> = Vec::new();
    for entry in &manifest.files {
        let rel = safe_relative(&entry.path)
            .ok_or_else(|| corrupt(format!("unsafe path '{}'", entry.path)))?;
        let path = dest.join(&rel);
        match entry.kind {
            FileKind::Directory => {
                if !links.contains_key(&entry.path) {
                    mkdir_all(&path)?;
                }
            }
            FileKind::Symlink => {
                // PostgreSQL only has symlinks for tablespaces, created above.
                if !links.contains_key(&entry.path) {
                    return Err(corrupt(format!(
                        "symlink '{}' is not a tablespace of the backup",
                        entry.path
                    )));
                }
            }
            FileKind::File => {
                if entry.crc32c.is_none() && entry.sha256.is_none() {
                    return Err(corrupt(format!("file '{}' has no checksum", entry.path)));
                }
                files.push((path, entry.clone()));
            }
        }
    }

    let mut stats = MaterializeStats::default();
    let mut writes = futures::stream::iter(files)
        .map(|(path, entry)| {
            let storage = storage.clone();
            async move { write_file(storage.as_ref(), &path, &entry).await }
        })
        .buffer_unordered(opts.parallel.max(1));
    while let Some(n) = writes.next().await {
        stats.files += 1;
        stats.bytes += n?;
    }
    drop(writes);
    let mut roots = vec![dest.to_path_buf()];
    roots.extend(links.into_values());
    tokio::task::spawn_blocking(move || roots.iter().try_for_each(|root| sync_filesystem(root)))
        .await
        .expect("sync task")?;
    Ok(stats)
}

/// Flushes everything written to the file system holding `dir` to stable storage
/// (`syncfs(2)`).
fn sync_filesystem(dir: &Path) -> Result<(), RepoError> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).map_err(|e| RepoError::io(dir, e))?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open for the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(RepoError::io(dir, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `path` as a relative path of normal components only.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && !path.contains('\0')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

/// Creates `dir` (mode 0700) if missing; fails unless it is then an empty directory.
fn prepare_empty_dir(dir: &Path) -> Result<(), RepoError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(RepoError::io(
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "directory is not empty; choose an empty or new directory",
                    ),
                ));
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| RepoError::io(dir, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => mkdir_all(dir),
        Err(e) => Err(RepoError::io(dir, e)),
    }
}

fn mkdir_all(dir: &Path) -> Result<(), RepoError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RepoError::io(dir, e))
}

/// A writer that checksums what it writes: CRC-32C, and SHA-256 for format 1 manifests.
struct CheckingWriter<W> {
    inner: W,
    crc: u32,
    sha: Option<Sha256>,
    len: u64,
}

impl<W: Write> Write for CheckingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        if let Some(sha) = &mut self.sha {
            sha.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one file from its chunks, verifying each chunk and the whole file.
async fn write_file(
    storage: &dyn Storage,
    path: &Path,
    entry: &FileEntry,
) -> Result<u64, RepoError> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| RepoError::io(path, e))?;
    // A file of one chunk is covered by the chunk's SHA-256; format 1 gives longer files a
    // whole-file SHA-256 and no CRC-32C.
    let whole_sha = entry.crc32c.is_none() && entry.chunks.len() > 1;
    let mut out = CheckingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        crc: 0,
        sha: whole_sha.then(Sha256::new),
        len: 0,
    };
    for chunk in &entry.chunks {
        let key = layout::pack_key(&chunk.pack);
        if !layout::is_pack_id(&chunk.pack) {
            return Err(RepoError::Corrupt {
                key,
                message: format!("invalid pack id in the manifest of '{}'", entry.path),
            });
        }
        let data = storage
            .get_range(&key, chunk.offset..chunk.offset + chunk.length)
            .await?;
        let sha = chunk.sha256.clone();
        let (back, result) = tokio::task::spawn_blocking(move || {
            let r = codec::decompress_verified(&data, &sha, &mut out);
            (out, r)
        })
        .await
        .expect("decompression task");
        out = back;
        let n = result.map_err(|e| RepoError::Corrupt {
            key: key.clone(),
            message: format!("chunk {} of '{}': {e}", chunk.sha256, entry.path),
        })?;
        if n != chunk.plain_length {
            return Err(RepoError::Corrupt {
                key,
                message: format!(
                    "chunk {} has {n} bytes, not {}",
                    chunk.sha256, chunk.plain_length
                ),
            });
        }
    }
    out.flush().map_err(|e| RepoError::io(path, e))?;
    let (actual, expected) = match (&entry.crc32c, out.sha.take()) {
        (Some(crc), _) => (format!("{:08x}", out.crc), crc.clone()),
        (None, Some(sha)) => (
            hex::encode(sha.finalize()),
            entry.sha256.clone().unwrap_or_default(),
        ),
        // One chunk or none, format 1: the chunk's SHA-256 is the file's.
        (None, None) => match entry.chunks.first() {
            Some(c) => (c.sha256.clone(), entry.sha256.clone().unwrap_or_default()),
            None => (
                hex::encode(Sha256::digest(b"")),
                entry.sha256.clone().unwrap_or_default(),
            ),
        },
    };
    if out.len != entry.size || actual != expected {
        return Err(RepoError::Corrupt {
            key: layout::pack_key(entry.chunks.first().map_or("", |c| c.pack.as_str())),
            message: format!(
                "'{}' came back as {} bytes with checksum {actual}, expected {} bytes with {expected}",
                entry.path, out.len, entry.size,
            ),
        });
    }
    Ok(out.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        assert!(safe_relative("base/1/1234").is_some());
        for bad in ["", "/etc", "../x", "a/../b", "./a", "a/\0"] {
            assert!(safe_relative(bad).is_none(), "{bad:?}");
        }
    }
}
