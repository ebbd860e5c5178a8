//! A repository in a local directory (or a mounted file system such as NFS). Writes go to a
//! temporary file in the target directory, are fsynced, then linked (create) or renamed
//! (overwrite) into place, and the directory is fsynced so that the name survives a crash —
//! the sequence PostgreSQL itself uses (`durable_rename`, src/backend/storage/file/fd.c).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{
    validate_key, ObjectMeta, PutMode, Staged, StagingObject, Storage, StorageError, StorageResult,
};

/// Temporary files start with this; `list` never shows them, `list_staging` shows only them.
pub const TEMP_PREFIX: &str = ".tmp.";

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// A storage rooted at `root`, which must be an absolute path. The directory is not created:
    /// a missing repository is reported by [`Storage::check_writable`] and by every operation.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStorage { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> StorageResult<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn io_error(&self, key: &str, e: io::Error) -> StorageError {
        match e.kind() {
            io::ErrorKind::NotFound if !self.root.is_dir() => StorageError::Permanent {
                key: key.to_string(),
                message: format!(
                    "repository directory {} does not exist",
                    self.root.display()
                ),
            },
            io::ErrorKind::NotFound => StorageError::NotFound {
                key: key.to_string(),
            },
            io::ErrorKind::AlreadyExists => StorageError::AlreadyExists {
                key: key.to_string(),
            },
            _ if super::is_disk_full(&e) => StorageError::Permanent {
                key: key.to_string(),
                message: format!(
                    "repository {}: {}",
                    self.root.display(),
                    super::io_message(&e)
                ),
            },
            _ => StorageError::Permanent {
                key: key.to_string(),
                message: format!("{} ({})", e, self.root.display()),
            },
        }
    }

    fn put_blocking(&self, key: &str, parts: &[Bytes], mode: PutMode) -> StorageResult<()> {
        let dir = key.rfind('/').map_or("", |i| &key[..=i]);
        let mut temp = self.stage_blocking(dir)?;
        // Whole buffers at once: the fsync of the commit starts their writeback.
        for part in parts {
            temp.file
                .write_all(part)
                .map_err(|e| self.io_error(key, e))?;
        }
        self.commit_blocking(key, temp, mode)
    }

    /// A new temporary file in directory `dir` (a key prefix ending in `/`, or `""` for the
    /// root), created with its missing parents.
    fn stage_blocking(&self, dir: &str) -> StorageResult<TempFile> {
        let dir_path = match dir.strip_suffix('/') {
            Some(d) => self.path(d)?,
            None => self.root.clone(),
        };
        if !self.root.is_dir() {
            return Err(self.io_error(dir, io::ErrorKind::NotFound.into()));
        }
        create_dir_durable(&self.root, &dir_path).map_err(|e| self.io_error(dir, e))?;
        let path = dir_path.join(format!("{TEMP_PREFIX}{}.{}", std::process::id(), unique()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| self.io_error(dir, e))?;
        Ok(TempFile { file, path })
    }

    /// Makes `temp` the object `key`: fsync, then link (create) or rename (overwrite) into place,
    /// then fsync of the directory, so that the name survives a crash.
    fn commit_blocking(&self, key: &str, temp: TempFile, mode: PutMode) -> StorageResult<()> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent");
        if temp.path.parent() != Some(dir) {
            return Err(StorageError::Permanent {
                key: key.to_string(),
                message: format!("staged in another directory ({})", temp.path.display()),
            });
        }
        let result = (|| -> io::Result<()> {
            temp.file.sync_all()?;
            match mode {
                // link(2) fails with EEXIST instead of replacing: an atomic create-if-absent.
                PutMode::Create => fs::hard_link(&temp.path, &path)?,
                PutMode::Overwrite => fs::rename(&temp.path, &path)?,
            }
            fsync_dir(dir)
        })();
        drop(temp);
        result.map_err(|e| self.io_error(key, e))
    }

    fn list_blocking(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        if !self.root.is_dir() {
            return Err(self.io_error(prefix, io::ErrorKind::NotFound.into()));
        }
        // Walk only the directory part of the prefix; the rest filters file names.
        let dir_part = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        if !start.is_dir() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(&start).follow_links(false) {
            let entry = entry.map_err(|e| StorageError::Permanent {
                key: prefix.into(),
                message: e.to_string(),
            })?;
            if !entry.file_type().is_file()
                || entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
            {
                continue;
            }
            let rel = entry.path().strip_prefix(&self.root).expect("under root");
            let Some(key) = rel
                .to_str()
                .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
            else {
                continue;
            };
            if key.starts_with(prefix) {
                let meta = entry.metadata().ok();
                out.push(ObjectMeta {
                    key,
                    size: meta.as_ref().map_or(0, std::fs::Metadata::len),
                    modified: meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| jiff::Timestamp::try_from(t).ok()),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The `.tmp.*` files anywhere under the root, with their size and mtime. A file or
    /// directory removed during the walk (a writer committing) is skipped.
    fn list_staging_blocking(&self) -> StorageResult<Vec<StagingObject>> {
        if !self.root.is_dir() {
            return Err(self.io_error("", io::ErrorKind::NotFound.into()));
        }
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(&self.root).follow_links(false) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) => {
                    continue
                }
                Err(e) => {
                    return Err(StorageError::Permanent {
                        key: String::new(),
                        message: e.to_string(),
                    })
                }
            };
            if !entry.file_type().is_file()
                || !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
            {
                continue;
            }
            let rel = entry.path().strip_prefix(&self.root).expect("under root");
            let Some(key) = rel
                .to_str()
                .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
            else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) => {
                    continue
                }
                Err(e) => {
                    return Err(StorageError::Permanent {
                        key,
                        message: e.to_string(),
                    })
                }
            };
            // An mtime that cannot be read counts as "now": never judged abandoned.
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| jiff::Timestamp::try_from(t).ok())
                .unwrap_or_else(jiff::Timestamp::now);
            out.push(StagingObject {
                key,
                upload_id: None,
                size: meta.len(),
                modified,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Unlinks the temporary file `staging.key` (refused unless its name starts with
    /// [`TEMP_PREFIX`]) and fsyncs its directory.
    fn remove_staging_blocking(&self, staging: &StagingObject) -> StorageResult<()> {
        let key = staging.key.as_str();
        let name = key.rsplit('/').next().unwrap_or(key);
        if !name.starts_with(TEMP_PREFIX) || staging.upload_id.is_some() {
            return Err(StorageError::Permanent {
                key: key.to_string(),
                message: "not a temporary file of a local repository".into(),
            });
        }
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                fsync_dir(path.parent().expect("has parent")).map_err(|e| self.io_error(key, e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_error(key, e)),
        }
    }
}

/// A temporary file of the repository (its name starts with `.tmp.`, so `list` never shows it),
/// removed when dropped: after it was linked into place, or when it is not wanted.
#[derive(Debug)]
pub struct TempFile {
    file: File,
    path: PathBuf,
}

/// Each write of a staged object also starts the writeback of what was written
/// ([`start_writeback`]): the object's bytes come while they are being compressed, and the fsync
/// of the commit then finds most of them on their way to disk already.
impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf).map_err(|e| self.located(e))?;
        start_writeback(&self.file);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TempFile {
    /// A full disk, named: "repository <dir>: no space left on device: …" (the writer of a
    /// staged object reports the error without knowing where the file is).
    fn located(&self, e: io::Error) -> io::Error {
        if !super::is_disk_full(&e) {
            return e;
        }
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let message = format!("repository {}: {}", dir.display(), super::io_message(&e));
        io::Error::new(e.kind(), message)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Creates `dir` (under `root`) and any missing parents, fsyncing each new directory's parent so
/// that the new entries are durable.
fn create_dir_durable(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent != root && parent.starts_with(root) {
            create_dir_durable(root, parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(dir.parent().unwrap_or(root)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Asks the kernel to start writing `file`'s dirty pages now (`SYNC_FILE_RANGE_WRITE`: no
/// wait, no guarantee). A failure only means writeback happens later, as it would anyway.
pub(crate) fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; the call only reads its
    // arguments.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        tracing::debug!("sync_file_range: {}", io::Error::last_os_error());
    }
}

/// fsync(2) on a directory makes the entries created or renamed in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (u64::from(nanos) << 16) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Objects from this size on are mapped rather than read (see [`read_or_map`]).
const MAP_MIN: u64 = 256 * 1024;

/// The contents of `path`: read into memory when small or on a network file system, else
/// mapped read-only with the page table filled at once (`MAP_POPULATE`), which costs no copy
/// and no fresh memory (a WAL object is about 1 MiB, read once).
fn read_or_map(path: &Path) -> io::Result<Bytes> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < MAP_MIN || on_network_fs(&file) {
        let mut buf = Vec::with_capacity(len as usize);
        (&file).read_to_end(&mut buf)?;
        return Ok(Bytes::from(buf));
    }
    // SAFETY: the mapping is undefined behaviour only if the file changes while mapped. A
    // repository object never does: every write goes to a new temporary file that is renamed
    // into place, and a removal leaves a mapped file intact until it is unmapped.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file)? };
    Ok(Bytes::from_owner(map))
}

/// Whether `file` is on NFS, SMB/CIFS or FUSE, or on a file system that cannot be told: there
/// another host may remove a file while it is mapped here, and a page read again after that
/// faults with `SIGBUS` instead of returning an error. Magic numbers from statfs(2).
fn on_network_fs(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const NFS: i64 = 0x6969;
    const SMB: i64 = 0x517B;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB2: i64 = 0xFE53_4D42;
    const FUSE: i64 = 0x6573_5546;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call, and `st` is writable.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return true;
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 here, another width elsewhere
    let kind = st.f_type as i64;
    matches!(kind, NFS | SMB | CIFS | SMB2 | FUSE)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("storage task panicked")
}

#[async_trait::async_trait]
impl Storage for LocalStorage {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn check_writable(&self) -> StorageResult<()> {
        let this = self.clone();
        blocking(move || {
            let root = &this.root;
            let fail = |message: String| Err(StorageError::Permanent { key: String::new(), message });
            match fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return fail(format!("repository {} is not a directory", root.display())),
                Err(_) => {
                    return fail(format!(
                        "repository directory {} does not exist; create it, owned by the user PostgreSQL runs as",
                        root.display()
                    ))
                }
            }
            let probe = root.join(format!("{TEMP_PREFIX}probe.{}.{}", std::process::id(), unique()));
            match File::create(&probe) {
                Ok(_) => {
                    let _ = fs::remove_file(&probe);
                    Ok(())
                }
                Err(e) => fail(format!(
                    "repository directory {} is not writable by this user ({e}); fix its owner or mode",
                    root.display()
                )),
            }
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StorageResult<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_blocking(&key, &[data], mode)).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StorageResult<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_blocking(&key, &parts, mode)).await
    }

    async fn stage(&self, dir: &str) -> StorageResult<Staged> {
        let (this, dir) = (self.clone(), dir.to_string());
        blocking(move || this.stage_blocking(&dir).map(Staged::File)).await
    }

    async fn put_staged(&self, key: &str, staged: Staged, mode: PutMode) -> StorageResult<()> {
        let (this, key) = (self.clone(), key.to_string());
        match staged {
            Staged::File(temp) => blocking(move || this.commit_blocking(&key, temp, mode)).await,
            Staged::Memory(parts) => blocking(move || this.put_blocking(&key, &parts, mode)).await,
            Staged::Sealing(_) => Err(StorageError::Permanent {
                key,
                message: "an object staged by an encrypted repository".into(),
            }),
        }
    }

    async fn get(&self, key: &str) -> StorageResult<Bytes> {
        let path = self.path(key)?;
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || read_or_map(&path).map_err(|e| this.io_error(&key, e))).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StorageResult<Bytes> {
        let path = self.path(key)?;
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || {
            let read = || -> io::Result<Vec<u8>> {
                let mut f = File::open(&path)?;
                f.seek(SeekFrom::Start(range.start))?;
                let mut buf = vec![0u8; (range.end - range.start) as usize];
                f.read_exact(&mut buf)?;
                Ok(buf)
            };
            read().map(Bytes::from).map_err(|e| this.io_error(&key, e))
        })
        .await
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        let path = self.path(key)?;
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key,
                size: m.len(),
                modified: m
                    .modified()
                    .ok()
                    .and_then(|t| jiff::Timestamp::try_from(t).ok()),
            })),
            Ok(_) => Ok(None),
            Err(e) => match this.io_error(&key, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        })
        .await
    }

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn modified(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        let path = self.path(key)?;
        let (this, key) = (self.clone(), key.to_string());
        blocking(
            move || match fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) => Ok(jiff::Timestamp::try_from(t).ok()),
                Err(e) => match this.io_error(&key, e) {
                    StorageError::NotFound { .. } => Ok(None),
                    other => Err(other),
                },
            },
        )
        .await
    }

    async fn list_staging(&self) -> StorageResult<Vec<StagingObject>> {
        let this = self.clone();
        blocking(move || this.list_staging_blocking()).await
    }

    async fn remove_staging(&self, staging: &StagingObject) -> StorageResult<()> {
        let (this, staging) = (self.clone(), staging.clone());
        blocking(move || this.remove_staging_blocking(&staging)).await
    }

    async fn delete(&self, key: &str) -> StorageResult<()> {
        let path = self.path(key)?;
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => {
                fsync_dir(path.parent().expect("has parent")).map_err(|e| this.io_error(&key, e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(this.io_error(&key, e)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets `path`'s mtime to `secs_ago` seconds before now.
    fn age(path: &Path, secs_ago: u64) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[tokio::test]
    async fn leftover_temporary_files_are_listed_anywhere_with_size_and_mtime_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path());
        s.put(
            "wal/0000000100000000/seg-ab.lz4",
            Bytes::from_static(b"x"),
            PutMode::Create,
        )
        .await
        .unwrap();
        assert!(s.list_staging().await.unwrap().is_empty());
        // A writer killed mid-write: its staged file is never dropped.
        let mut staged = s.stage("wal/0000000100000000/").await.unwrap();
        std::io::Write::write_all(&mut staged, b"partial wal").unwrap();
        std::mem::forget(staged);
        fs::create_dir_all(dir.path().join("packs/ab")).unwrap();
        let pack = dir.path().join("packs/ab/.tmp.77.1");
        fs::write(&pack, vec![0u8; 4096]).unwrap();
        age(&pack, 3 * 86_400);
        fs::write(dir.path().join(".tmp.probe.9.9"), b"").unwrap();

        let found = s.list_staging().await.unwrap();
        let keys: Vec<&str> = found.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!(keys[0], ".tmp.probe.9.9");
        assert_eq!(keys[1], "packs/ab/.tmp.77.1");
        assert!(
            keys[2].starts_with("wal/0000000100000000/.tmp."),
            "{keys:?}"
        );
        assert_eq!(found[1].size, 4096);
        assert_eq!(found[2].size, 11);
        assert!(found.iter().all(|o| o.upload_id.is_none()));
        let now = jiff::Timestamp::now();
        let old = now.duration_since(found[1].modified).as_secs();
        assert!((3 * 86_400 - 60..=3 * 86_400 + 60).contains(&old), "{old}");
        assert!(now.duration_since(found[2].modified).as_secs() < 3600);
        // `list` still never shows them.
        assert_eq!(s.list("").await.unwrap().len(), 1);

        s.remove_staging(&found[1]).await.unwrap();
        assert!(!pack.exists());
        s.remove_staging(&found[1]).await.unwrap(); // already gone
        assert_eq!(s.list_staging().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn only_temporary_files_can_be_removed_as_staging_objects() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path());
        s.put("repo.json", Bytes::from_static(b"{}"), PutMode::Create)
            .await
            .unwrap();
        for key in ["repo.json", "../.tmp.x", "a/.tmp./../repo.json"] {
            let not_staging = StagingObject {
                key: key.into(),
                upload_id: None,
                size: 2,
                modified: jiff::Timestamp::UNIX_EPOCH,
            };
            assert!(s.remove_staging(&not_staging).await.is_err(), "{key}");
        }
        assert!(dir.path().join("repo.json").exists());
    }

    #[test]
    fn small_objects_are_read_and_large_ones_mapped_and_both_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!on_network_fs(&File::open(dir.path()).unwrap()));
        for len in [0, 100, MAP_MIN as usize - 1, MAP_MIN as usize, 3 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let path = dir.path().join(format!("object-{len}"));
            fs::write(&path, &data).unwrap();
            assert!(read_or_map(&path).unwrap() == data, "{len} bytes");
        }
    }
}
