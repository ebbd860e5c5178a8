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
//!
//! `global/pg_control` comes last: once every other file is written, checked and synced, it is
//! written under a temporary name, checked, and renamed into place. A materialisation killed
//! at any moment (`kill -9`, a crash of the machine) therefore leaves a directory without
//! `global/pg_control`, which PostgreSQL refuses to start from ("could not open file
//! global/pg_control"), never one with torn or missing files that would start.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::CHUNK_SIZE;
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
                check_chunk_refs(entry).map_err(corrupt)?;
                files.push((path, entry.clone()));
            }
        }
    }

    let control = files
        .iter()
        .position(|(_, entry)| entry.path == PG_CONTROL)
        .map(|i| files.remove(i));
    let mut stats = write_files(storage.clone(), files, opts.parallel.max(1)).await?;
    let mut roots = vec![dest.to_path_buf()];
    roots.extend(links.into_values());
    let sync_all = move || {
        let roots = roots.clone();
        async move {
            tokio::task::spawn_blocking(move || roots.iter().try_for_each(|r| sync_filesystem(r)))
                .await
                .expect("sync task")
        }
    };
    sync_all().await?;
    if let Some((path, entry)) = control {
        let partial = path.with_file_name(PG_CONTROL_PARTIAL);
        let written = write_files(storage, vec![(partial.clone(), entry)], 1).await?;
        std::fs::rename(&partial, &path).map_err(|e| RepoError::io(&path, e))?;
        sync_all().await?;
        stats.files += written.files;
        stats.bytes += written.bytes;
    }
    Ok(stats)
}

/// PostgreSQL's control file, written last (see the module documentation).
const PG_CONTROL: &str = "global/pg_control";
/// Its name while it is written.
const PG_CONTROL_PARTIAL: &str = "pg_control.pgpitr-partial";

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

/// Checks the chunk refs of a file of a manifest read from the repository before any is
/// fetched: each holds at most one chunk of plain bytes at a pack range that can exist, and
/// together they make up the file's size (so that no offset or sum overflows later).
fn check_chunk_refs(entry: &FileEntry) -> Result<(), String> {
    let mut size = 0u64;
    for c in &entry.chunks {
        if c.plain_length > CHUNK_SIZE as u64 || c.offset.checked_add(c.length).is_none() {
            return Err(format!(
                "chunk {} of '{}' lies out of range ({} plain bytes, {} bytes at {})",
                c.sha256, entry.path, c.plain_length, c.length, c.offset
            ));
        }
        size += c.plain_length;
    }
    if size != entry.size {
        return Err(format!(
            "the chunks of '{}' hold {size} bytes, its size is {}",
            entry.path, entry.size
        ));
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

/// Direct I/O needs buffers, offsets and lengths aligned to the device's logical block size;
/// this covers every common one. Chunk offsets are multiples of [`CHUNK_SIZE`].
const DIRECT_IO_ALIGN: usize = 4096;

/// One chunk to write: file `file` of the list, its `index`-th chunk, at `offset`.
struct ChunkJob {
    file: usize,
    index: usize,
    offset: u64,
}

/// Writes every file: creates them all (empty, 0600), then fetches, verifies and writes their
/// chunks, `parallel` at a time in any order, each at its offset. A chunk is decoded into a
/// reused, aligned buffer, checked against its SHA-256 and written with direct I/O where the
/// file system allows (page-cache copies cost more than the disk on virtual machines), else
/// through the page cache. Each file is then checked whole: its size, and the CRC-32C
/// combined from its chunks' (format 1: its SHA-256, read back).
async fn write_files(
    storage: Arc<dyn Storage>,
    files: Vec<(PathBuf, FileEntry)>,
    parallel: usize,
) -> Result<MaterializeStats, RepoError> {
    let files = Arc::new(files);
    {
        let files = files.clone();
        tokio::task::spawn_blocking(move || files.iter().try_for_each(|(path, _)| create(path)))
            .await
            .expect("file creation task")?;
    }
    let jobs: Vec<ChunkJob> = files
        .iter()
        .enumerate()
        .flat_map(|(file, (_, entry))| {
            let mut offset = 0;
            entry.chunks.iter().enumerate().map(move |(index, c)| {
                let job = ChunkJob {
                    file,
                    index,
                    offset,
                };
                offset += c.plain_length;
                job
            })
        })
        .collect();
    let pool: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let mut crcs: Vec<Vec<u32>> = files.iter().map(|(_, e)| vec![0; e.chunks.len()]).collect();
    let mut writes = futures::stream::iter(jobs)
        .map(|job| {
            let (storage, files, pool) = (storage.clone(), files.clone(), pool.clone());
            async move {
                let (file, index) = (job.file, job.index);
                let chunk = &files[file].1.chunks[index];
                let key = layout::pack_key(&chunk.pack);
                if !layout::is_pack_id(&chunk.pack) {
                    return Err(RepoError::Corrupt {
                        key,
                        message: format!(
                            "invalid pack id in the manifest of '{}'",
                            files[file].1.path
                        ),
                    });
                }
                let data = storage
                    .get_range(&key, chunk.offset..chunk.offset + chunk.length)
                    .await?;
                let crc = tokio::task::spawn_blocking(move || {
                    let (path, entry) = &files[job.file];
                    write_chunk(path, entry, &job, &data, &pool)
                })
                .await
                .expect("chunk task")?;
                Ok::<_, RepoError>((file, index, crc))
            }
        })
        .buffer_unordered(parallel);
    while let Some(done) = writes.next().await {
        let (file, index, crc) = done?;
        crcs[file][index] = crc;
    }
    drop(writes);
    tokio::task::spawn_blocking(move || {
        let mut stats = MaterializeStats::default();
        for ((path, entry), crcs) in files.iter().zip(crcs) {
            check_file(path, entry, &crcs)?;
            stats.files += 1;
            stats.bytes += entry.size;
        }
        Ok(stats)
    })
    .await
    .expect("file check task")
}

/// Creates `path` empty with mode 0600 (never an existing file).
fn create(path: &Path) -> Result<(), RepoError> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| RepoError::io(path, e))
}

/// Decodes, verifies and writes one chunk; returns the CRC-32C of its plain bytes.
fn write_chunk(
    path: &Path,
    entry: &FileEntry,
    job: &ChunkJob,
    compressed: &[u8],
    pool: &Mutex<Vec<Vec<u8>>>,
) -> Result<u32, RepoError> {
    let chunk = &entry.chunks[job.index];
    let len = usize::try_from(chunk.plain_length)
        .ok()
        .filter(|&n| n <= CHUNK_SIZE)
        .ok_or_else(|| RepoError::Corrupt {
            key: layout::pack_key(&chunk.pack),
            message: format!(
                "chunk {} of '{}' claims {} plain bytes",
                chunk.sha256, entry.path, chunk.plain_length
            ),
        })?;
    let mut buf = pool.lock().expect("buffer pool").pop().unwrap_or_default();
    buf.resize(CHUNK_SIZE + DIRECT_IO_ALIGN, 0);
    let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
    let plain = &mut buf[start..start + len];
    let result = codec::decode_chunk_verified(compressed, &chunk.sha256, plain)
        .map_err(|e| RepoError::Corrupt {
            key: layout::pack_key(&chunk.pack),
            message: format!("chunk {} of '{}': {e}", chunk.sha256, entry.path),
        })
        .and_then(|()| {
            write_at(path, plain, job.offset).map_err(|e| RepoError::io(path, e))?;
            Ok(crc32c::crc32c(plain))
        });
    pool.lock().expect("buffer pool").push(buf);
    result
}

/// Writes `data` at `offset` of the existing file `path`: with `O_DIRECT` when offset and
/// length are aligned and the file system takes it, through the page cache otherwise.
fn write_at(path: &Path, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let aligned =
        data.len().is_multiple_of(DIRECT_IO_ALIGN) && offset.is_multiple_of(DIRECT_IO_ALIGN as u64);
    if aligned && !data.is_empty() {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct.and_then(|f| f.write_all_at(data, offset)) {
            Ok(()) => return Ok(()),
            // Not supported here (tmpfs, some network file systems, a larger block size).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)
}

/// Checks a written file against its manifest entry: the size, and the CRC-32C combined from
/// `chunk_crcs` (format 2) or the SHA-256 of the file read back (format 1, more than one
/// chunk; a file of one chunk is its chunk, already checked).
fn check_file(path: &Path, entry: &FileEntry, chunk_crcs: &[u32]) -> Result<(), RepoError> {
    let size: u64 = entry.chunks.iter().map(|c| c.plain_length).sum();
    let crc = entry
        .chunks
        .iter()
        .zip(chunk_crcs)
        .fold(0u32, |acc, (c, &crc)| {
            crc32c::crc32c_combine(acc, crc, c.plain_length as usize)
        });
    let (actual, expected) = match (&entry.crc32c, &entry.sha256) {
        (Some(expected), _) => (format!("{crc:08x}"), expected.clone()),
        (None, Some(expected)) if entry.chunks.len() > 1 => {
            (sha256_of_file(path)?, expected.clone())
        }
        (None, Some(expected)) => (
            entry
                .chunks
                .first()
                .map_or_else(|| hex::encode(Sha256::digest(b"")), |c| c.sha256.clone()),
            expected.clone(),
        ),
        (None, None) => unreachable!("checked when the file list was made"),
    };
    if size != entry.size || actual != expected {
        return Err(RepoError::Corrupt {
            key: layout::pack_key(entry.chunks.first().map_or("", |c| c.pack.as_str())),
            message: format!(
                "'{}' came back as {size} bytes with checksum {actual}, expected {} bytes with {expected}",
                entry.path, entry.size,
            ),
        });
    }
    Ok(())
}

fn sha256_of_file(path: &Path) -> Result<String, RepoError> {
    let mut f = std::fs::File::open(path).map_err(|e| RepoError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| RepoError::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(plain_length: u64) -> crate::repo::manifest::ChunkRef {
        crate::repo::manifest::ChunkRef {
            sha256: "00".repeat(32),
            pack: "p".into(),
            offset: 0,
            length: 0,
            plain_length,
            crc32c: None,
        }
    }

    /// A damaged or hostile `manifest.json`: a chunk at an offset near 2^64 overflowed the end
    /// of its pack range (a panic in debug builds, a wrong range in release builds).
    #[test]
    fn chunk_refs_out_of_range_are_refused_before_any_fetch() {
        let entry = |chunks: Vec<crate::repo::manifest::ChunkRef>, size| FileEntry {
            path: "base/1/2".into(),
            size,
            mode: 0o600,
            mtime: 0,
            sha256: None,
            crc32c: Some("00000000".into()),
            kind: FileKind::File,
            link_target: None,
            chunks,
        };
        assert!(check_chunk_refs(&entry(vec![chunk(10), chunk(20)], 30)).is_ok());
        assert!(check_chunk_refs(&entry(vec![], 0)).is_ok());
        let far = crate::repo::manifest::ChunkRef {
            offset: u64::MAX - 5,
            length: 10,
            ..chunk(10)
        };
        for bad in [
            entry(vec![far], 10),
            entry(vec![chunk(CHUNK_SIZE as u64 + 1)], CHUNK_SIZE as u64 + 1),
            entry(vec![chunk(10)], 11),
        ] {
            assert!(check_chunk_refs(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn files_are_checked_whole_from_their_chunks_crcs() {
        let (a, b) = (vec![1u8; 3000], vec![2u8; 5000]);
        let whole = [a.clone(), b.clone()].concat();
        let entry = FileEntry {
            path: "base/1/2".into(),
            size: 8000,
            mode: 0o600,
            mtime: 0,
            sha256: None,
            crc32c: Some(format!("{:08x}", crc32c::crc32c(&whole))),
            kind: FileKind::File,
            link_target: None,
            chunks: vec![chunk(3000), chunk(5000)],
        };
        let crcs = [crc32c::crc32c(&a), crc32c::crc32c(&b)];
        check_file(Path::new("/nonexistent"), &entry, &crcs).unwrap();
        // Chunks in the wrong order, a wrong size: refused.
        let swapped = [crcs[1], crcs[0]];
        assert!(check_file(Path::new("/nonexistent"), &entry, &swapped).is_err());
        let short = FileEntry {
            size: 8001,
            ..entry.clone()
        };
        assert!(check_file(Path::new("/nonexistent"), &short, &crcs).is_err());
    }

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        assert!(safe_relative("base/1/1234").is_some());
        for bad in ["", "/etc", "../x", "a/../b", "./a", "a/\0"] {
            assert!(safe_relative(bad).is_none(), "{bad:?}");
        }
    }
}
