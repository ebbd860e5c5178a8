//! Reading the tar archives of BASE_BACKUP into manifest entries and stored chunks.
//!
//! The replication stream is async; the `tar` crate reads synchronously. The backup command
//! therefore sends [`ArchiveMsg`]s through a bounded channel to [`ingest`], which runs on a
//! blocking thread: a [`ChannelReader`] turns the messages of one archive into a `Read` for
//! `tar::Archive`. Every member path is sanitised ([`member_path`]): relative, no `..`, no
//! absolute paths, UTF-8; tablespace archives (`<oid>.tar`) are stored under
//! `pg_tblspc/<oid>/`, the path PostgreSQL's `backup_manifest` uses for them.

use std::io::{self, Read};
use std::path::{Component, Path};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use std::sync::Arc;

use super::chunk_workers::{ChunkWorkers, Hashed, Tag};
use super::incremental::{self, Parent, Replaced};
use super::pack::{PackError, PackStats, Packer};
use super::CHUNK_SIZE;
use crate::repo::manifest::{ChunkRef, FileEntry, FileKind};

/// One message of the archive stream, in server order.
#[derive(Debug)]
pub enum ArchiveMsg {
    /// A new archive: `None` for the data directory (`base.tar`), else a tablespace's OID.
    Start { tablespace: Option<u32> },
    /// Next bytes of the current archive: CopyData payloads in order, several per message so
    /// that the reader thread is woken once per batch rather than once per 32 KiB.
    Data(Vec<Bytes>),
    /// The current archive ended.
    End,
}

/// Why the archive stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("reading the backup's tar stream: {0}")]
    Tar(io::Error),
    #[error("refusing unsafe path in the backup's tar stream: {0:?}")]
    UnsafePath(String),
    #[error("unexpected tar member type {kind} at '{path}'")]
    MemberType { kind: String, path: String },
    #[error("the archive stream ended inside an archive")]
    Truncated,
    /// An incremental file that cannot be made complete.
    #[error("incremental backup: {0}")]
    Incremental(String),
    #[error("archive stream out of order: {0}")]
    Order(&'static str),
    /// The uploader stopped (its error is the cause), or a chunk could not be packed.
    #[error(transparent)]
    Pack(#[from] PackError),
}

/// What [`ingest`] produced.
#[derive(Debug, Default)]
pub struct Ingested {
    /// Every member of every archive, in stream order.
    pub files: Vec<FileEntry>,
    pub stats: PackStats,
    /// The members stored under another name or content than sent (incremental backups).
    pub replaced: Vec<Replaced>,
}

/// A `Read` over the data messages of one archive; EOF at [`ArchiveMsg::End`].
pub struct ChannelReader<'a> {
    rx: &'a mut mpsc::Receiver<ArchiveMsg>,
    current: Bytes,
    /// The rest of the current batch, in reverse order.
    batch: Vec<Bytes>,
    ended: bool,
    /// Time spent waiting for the network.
    waited: &'a mut Duration,
}

impl<'a> ChannelReader<'a> {
    pub fn new(rx: &'a mut mpsc::Receiver<ArchiveMsg>, waited: &'a mut Duration) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            batch: Vec::new(),
            ended: false,
            waited,
        }
    }

    /// Reads and drops whatever is left of the archive (after the tar end-of-archive blocks).
    fn drain(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 8192];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if let Some(b) = self.batch.pop() {
                self.current = b;
                continue;
            }
            if self.ended {
                return Ok(0);
            }
            let t = Instant::now();
            let msg = self.rx.blocking_recv();
            *self.waited += t.elapsed();
            match msg {
                Some(ArchiveMsg::Data(mut batch)) => {
                    batch.reverse();
                    self.batch = batch;
                }
                Some(ArchiveMsg::End) => self.ended = true,
                Some(ArchiveMsg::Start { .. }) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "new archive before the end of the current one",
                    ))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "archive stream aborted",
                    ))
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// The repository path of a tar member: `path` made relative and checked, prefixed with
/// `pg_tblspc/<oid>/` for a tablespace archive. `Ok(None)` for the archive root (`./`).
///
/// # Errors
/// [`IngestError::UnsafePath`] for absolute paths, `..` components and non-UTF-8 names.
pub fn member_path(path: &Path, tablespace: Option<u32>) -> Result<Option<String>, IngestError> {
    let unsafe_path = || IngestError::UnsafePath(path.to_string_lossy().into_owned());
    let mut parts: Vec<&str> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => {
                let s = s.to_str().ok_or_else(unsafe_path)?;
                if s.chars().any(char::is_control) {
                    return Err(unsafe_path());
                }
                parts.push(s);
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_path())
            }
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let rel = parts.join("/");
    Ok(Some(match tablespace {
        Some(oid) => format!("pg_tblspc/{oid}/{rel}"),
        None => rel,
    }))
}

/// Reads archives from `rx` until the channel closes, storing file contents through
/// `workers` hashing and compressing threads and a [`Packer`] (which hands full packs to the
/// uploader). Blocking: run it on its own thread.
///
/// With `parent` (an incremental backup), every `INCREMENTAL.<name>` member is stored as the
/// complete `<name>`, built from the parent's file and the blocks sent, and `backup_label`
/// without its incremental lines (see [`incremental`]).
///
/// # Errors
/// Malformed tar data, unsafe paths, a stream that ends inside an archive, a stopped uploader,
/// an incremental file that cannot be made complete.
pub fn ingest(
    mut rx: mpsc::Receiver<ArchiveMsg>,
    packer: Packer,
    workers: usize,
    parent: Option<Arc<Parent>>,
) -> Result<Ingested, IngestError> {
    let mut store = Store::new(packer, workers);
    store.parent = parent;
    let mut network_wait = Duration::ZERO;
    while let Some(msg) = rx.blocking_recv() {
        let tablespace = match msg {
            ArchiveMsg::Start { tablespace } => tablespace,
            ArchiveMsg::Data(_) => return Err(IngestError::Order("data before an archive")),
            ArchiveMsg::End => return Err(IngestError::Order("end before an archive")),
        };
        let mut reader = ChannelReader::new(&mut rx, &mut network_wait);
        read_archive(&mut reader, tablespace, &mut store)?;
        reader.drain().map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => IngestError::Truncated,
            _ => IngestError::Tar(e),
        })?;
    }
    tracing::debug!(
        "tar reader waited {:.2} s for the server and {:.2} s for the chunk workers",
        network_wait.as_secs_f64(),
        store.worker_wait.as_secs_f64()
    );
    store.finish()
}

fn read_archive(
    reader: &mut ChannelReader<'_>,
    tablespace: Option<u32>,
    store: &mut Store,
) -> Result<(), IngestError> {
    let tar_err = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => IngestError::Truncated,
        _ => IngestError::Tar(e),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let raw_path = entry.path().map_err(tar_err)?.into_owned();
        let Some(path) = member_path(&raw_path, tablespace)? else {
            continue;
        };
        let header = entry.header();
        let mode = header.mode().map_err(tar_err)? & 0o7777;
        let mtime = header.mtime().map_err(tar_err)? as i64;
        let kind = header.entry_type();
        let declared = entry.size();
        let mut file = FileEntry {
            path,
            size: 0,
            mode,
            mtime,
            sha256: None,
            crc32c: None,
            kind: FileKind::File,
            link_target: None,
            chunks: Vec::new(),
        };
        if kind.is_dir() {
            file.kind = FileKind::Directory;
            store.files.push(file);
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(tar_err)?
                .ok_or_else(|| IngestError::UnsafePath(file.path.clone()))?;
            let target = target
                .to_str()
                .ok_or_else(|| IngestError::UnsafePath(file.path.clone()))?;
            file.kind = FileKind::Symlink;
            file.link_target = Some(target.to_string());
            store.files.push(file);
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let store_err = |e| match e {
                StoreError::Read(e) => tar_err(e),
                StoreError::Pack(e) => e.into(),
                StoreError::Incremental(m) => IngestError::Incremental(m),
            };
            if let Some(parent) = store.parent.clone() {
                if let Some(complete) = incremental::complete_path(&file.path) {
                    let sent_path = std::mem::replace(&mut file.path, complete);
                    store.files.push(file);
                    store
                        .store_incremental(&mut entry, declared, &parent, sent_path)
                        .map_err(store_err)?;
                    continue;
                }
                if file.path == "backup_label" {
                    let mut label = Vec::new();
                    entry.read_to_end(&mut label).map_err(tar_err)?;
                    let sent = (label.len() as u64, crc32c::crc32c(&label));
                    let label = incremental::complete_backup_label(&label).unwrap_or(label);
                    store.files.push(file);
                    store
                        .store_file(&mut &label[..], label.len() as u64)
                        .map_err(store_err)?;
                    let stored = store.files.last().expect("just pushed");
                    store.replaced.push(Replaced {
                        sent_path: stored.path.clone(),
                        sent_size: sent.0,
                        sent_crc32c: sent.1,
                        path: stored.path.clone(),
                        size: stored.size,
                        crc32c: crc32c::crc32c(&label),
                    });
                    continue;
                }
            }
            store.files.push(file);
            store.store_file(&mut entry, declared).map_err(store_err)?;
        } else {
            return Err(IngestError::MemberType {
                kind: format!("{kind:?}"),
                path: file.path,
            });
        }
    }
    Ok(())
}

enum StoreError {
    Read(io::Error),
    Pack(PackError),
    Incremental(String),
}

impl From<PackError> for StoreError {
    fn from(e: PackError) -> Self {
        StoreError::Pack(e)
    }
}

/// The files read so far, and the chunks of theirs that are still with the workers.
struct Store {
    files: Vec<FileEntry>,
    packer: Packer,
    workers: ChunkWorkers,
    /// Chunk buffers not in flight, each `CHUNK_SIZE` bytes long.
    free: Vec<Vec<u8>>,
    /// Buffers allocated so far, at most `max_buffers`.
    buffers: usize,
    max_buffers: usize,
    /// Time spent waiting for a buffer to come back from the workers.
    worker_wait: Duration,
    /// The backup an incremental backup is taken against.
    parent: Option<Arc<Parent>>,
    replaced: Vec<Replaced>,
}

/// Stands for a chunk ref until the workers are done with the chunk.
fn pending_chunk(crc: u32) -> ChunkRef {
    ChunkRef {
        sha256: String::new(),
        pack: String::new(),
        offset: 0,
        length: 0,
        plain_length: 0,
        crc32c: Some(format!("{crc:08x}")),
    }
}

impl Store {
    fn new(packer: Packer, workers: usize) -> Store {
        let workers = workers.max(1);
        Store {
            files: Vec::new(),
            workers: ChunkWorkers::start(workers, packer.existing()),
            packer,
            free: Vec::new(),
            buffers: 0,
            // Every worker busy with one chunk and another queued, and one being read.
            max_buffers: 2 * workers + 1,
            worker_wait: Duration::ZERO,
            parent: None,
            replaced: Vec::new(),
        }
    }

    /// Cuts the last file of `files` (`declared` bytes long, from its tar header) into chunks
    /// for the workers, computing its CRC-32C on the way.
    fn store_file(&mut self, entry: &mut impl Read, declared: u64) -> Result<(), StoreError> {
        let index = self.files.len() - 1;
        let mut crc = 0u32;
        let mut size = 0u64;
        loop {
            let mut buf = self.buffer()?;
            let n = read_full(entry, &mut buf).map_err(StoreError::Read)?;
            if n == 0 {
                self.free.push(buf);
                break;
            }
            let chunk_crc = crc32c::crc32c(&buf[..n]);
            crc = crc32c::crc32c_combine(crc, chunk_crc, n);
            size += n as u64;
            let file = &mut self.files[index];
            let tag = Tag {
                file: index,
                chunk: file.chunks.len(),
            };
            file.chunks.push(pending_chunk(chunk_crc));
            self.workers.submit(tag, buf, n);
            if n < CHUNK_SIZE {
                break;
            }
        }
        let file = &mut self.files[index];
        if size != declared {
            return Err(StoreError::Read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("'{}' is shorter than its header says", file.path),
            )));
        }
        file.size = size;
        file.crc32c = Some(format!("{crc:08x}"));
        if size == 0 {
            file.sha256 = Some(hex::encode(Sha256::digest(b"")));
        }
        Ok(())
    }

    /// Stores the last file of `files` complete from the incremental file `entry` (`declared`
    /// bytes long, sent as `sent_path`) and the parent's file of the same path (see
    /// [`incremental`]): chunk by chunk, each either the parent's own chunk (nothing in it
    /// changed) or a new one made of the parent's bytes, the blocks sent, and zeros.
    fn store_incremental(
        &mut self,
        entry: &mut impl Read,
        declared: u64,
        parent: &Parent,
        sent_path: String,
    ) -> Result<(), StoreError> {
        let index = self.files.len() - 1;
        let path = self.files[index].path.clone();
        let fail = |m: String| StoreError::Incremental(format!("'{sent_path}': {m}"));
        let mut input = CrcReader {
            inner: entry,
            crc: 0,
            count: 0,
        };
        let header = incremental::read_header(&mut input, declared, parent.block_size).map_err(
            |e| match e.kind() {
                io::ErrorKind::InvalidData => fail(e.to_string()),
                _ => StoreError::Read(e),
            },
        )?;
        let prior = parent.files.get(&path).ok_or_else(|| {
            fail(format!(
                "no '{path}' in backup {} to build the complete file from",
                parent.id
            ))
        })?;
        let bs = u64::from(parent.block_size);
        let size = header.block_length() * bs;
        // Bytes of the complete file that are the parent's where no block was sent.
        let from_parent = u64::from(header.truncation_block_length).min(prior.size / bs) * bs;
        let mut prior_offsets = Vec::with_capacity(prior.chunks.len());
        let mut at = 0u64;
        for c in &prior.chunks {
            prior_offsets.push(at);
            at += c.plain_length;
        }
        let mut sent = header.blocks.iter().map(|&b| u64::from(b) * bs).peekable();
        let (mut crc, mut start, mut k) = (0u32, 0u64, 0usize);
        while start < size {
            let end = (start + CHUNK_SIZE as u64).min(size);
            let len = (end - start) as usize;
            let changed = sent.peek().is_some_and(|&b| b < end);
            let prior_chunk = prior
                .chunks
                .get(k)
                .filter(|_| prior_offsets[k] == start)
                .cloned();
            if let Some(mut c) = prior_chunk
                .clone()
                .filter(|c| !changed && end <= from_parent && c.plain_length == len as u64)
            {
                // Unchanged: the parent's chunk itself.
                let chunk_crc = match c
                    .crc32c
                    .as_deref()
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                {
                    Some(v) => v,
                    None => {
                        let mut buf = self.buffer()?;
                        (parent.fetch)(&c, &mut buf[..len]).map_err(&fail)?;
                        let v = crc32c::crc32c(&buf[..len]);
                        self.free.push(buf);
                        v
                    }
                };
                c.crc32c = Some(format!("{chunk_crc:08x}"));
                crc = crc32c::crc32c_combine(crc, chunk_crc, len);
                self.files[index].chunks.push(c);
            } else {
                let mut buf = self.buffer()?;
                let mut filled = 0;
                if start < from_parent {
                    let c = prior_chunk.ok_or_else(|| {
                        fail(format!("the parent's '{path}' is not cut at byte {start}"))
                    })?;
                    let n = c.plain_length as usize;
                    if n > CHUNK_SIZE {
                        return Err(fail(format!("the parent's chunk {} is too long", c.sha256)));
                    }
                    (parent.fetch)(&c, &mut buf[..n]).map_err(&fail)?;
                    filled = ((from_parent.min(end) - start) as usize).min(n);
                }
                buf[filled..len].fill(0);
                while let Some(b) = sent.next_if(|&b| b < end) {
                    let at = (b - start) as usize;
                    input
                        .read_exact(&mut buf[at..at + bs as usize])
                        .map_err(StoreError::Read)?;
                }
                let chunk_crc = crc32c::crc32c(&buf[..len]);
                crc = crc32c::crc32c_combine(crc, chunk_crc, len);
                let file = &mut self.files[index];
                let tag = Tag {
                    file: index,
                    chunk: file.chunks.len(),
                };
                file.chunks.push(pending_chunk(chunk_crc));
                self.workers.submit(tag, buf, len);
            }
            start = end;
            k += 1;
        }
        if input.count != declared {
            return Err(fail(format!("{} bytes of {declared} used", input.count)));
        }
        let file = &mut self.files[index];
        file.size = size;
        file.crc32c = Some(format!("{crc:08x}"));
        if size == 0 {
            file.sha256 = Some(hex::encode(Sha256::digest(b"")));
        }
        self.replaced.push(Replaced {
            sent_path,
            sent_size: declared,
            sent_crc32c: input.crc,
            path,
            size,
            crc32c: crc,
        });
        Ok(())
    }

    /// A chunk buffer, `CHUNK_SIZE` bytes long: a free one, a new one while fewer than
    /// `max_buffers` exist, or the next one the workers give back.
    fn buffer(&mut self) -> Result<Vec<u8>, PackError> {
        while let Some(h) = self.workers.try_next() {
            self.apply(h)?;
        }
        if self.free.is_empty() {
            if self.buffers < self.max_buffers {
                self.buffers += 1;
                return Ok(vec![0; CHUNK_SIZE]);
            }
            let t = Instant::now();
            let h = self.workers.wait_next().expect("all buffers are in flight");
            self.worker_wait += t.elapsed();
            self.apply(h)?;
        }
        Ok(self.free.pop().expect("a buffer came back"))
    }

    /// Packs a finished chunk and puts its ref in place.
    fn apply(&mut self, h: Hashed) -> Result<(), PackError> {
        let mut r = self
            .packer
            .add(h.sha256, h.len as u64, h.frame.as_deref())?;
        if let Some(frame) = h.frame {
            self.workers.recycle_frame(frame);
        }
        let slot = &mut self.files[h.tag.file].chunks[h.tag.chunk];
        r.crc32c = slot.crc32c.take();
        *slot = r;
        self.free.push(h.plain);
        Ok(())
    }

    /// Waits for the workers, seals the last pack, and gives every file of one chunk its
    /// chunk's SHA-256 as its own.
    fn finish(mut self) -> Result<Ingested, IngestError> {
        while let Some(h) = self.workers.wait_next() {
            self.apply(h)?;
        }
        let stats = self.packer.finish()?;
        for f in &mut self.files {
            debug_assert!(f.chunks.iter().all(|c| !c.sha256.is_empty()));
            if let [only] = f.chunks.as_slice() {
                f.sha256 = Some(only.sha256.clone());
            }
        }
        Ok(Ingested {
            files: self.files,
            stats,
            replaced: self.replaced,
        })
    }
}

/// A reader that counts and checksums (CRC-32C) what passes through.
struct CrcReader<'a, R> {
    inner: &'a mut R,
    crc: u32,
    count: u64,
}

impl<R: Read> Read for CrcReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads until `buf` is full or `input` ends, retrying interrupted reads; returns the bytes
/// read (less than `buf.len()` only at the end of `input`).
///
/// # Errors
/// The first failing read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::pack::ChunkSet;
    use super::*;
    use std::sync::Arc;

    /// A reader handing out at most `step` bytes per call, as a tar entry over the network may.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_reads_fill_whole_buffers() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut input = Trickle {
            data: &data,
            step: 333,
        };
        let mut buf = vec![0u8; 4096];
        assert_eq!(read_full(&mut input, &mut buf).unwrap(), 4096);
        assert_eq!(buf[..], data[..4096]);
        assert_eq!(read_full(&mut input, &mut buf).unwrap(), 4096);
        assert_eq!(buf[..], data[4096..8192]);
        assert_eq!(read_full(&mut input, &mut buf).unwrap(), 10_000 - 8192);
        assert_eq!(buf[..10_000 - 8192], data[8192..]);
        assert_eq!(read_full(&mut input, &mut buf).unwrap(), 0);
    }

    #[test]
    fn member_paths_are_sanitised() {
        let p = |s: &str, ts| member_path(Path::new(s), ts);
        assert_eq!(p("base/1/1234", None).unwrap().unwrap(), "base/1/1234");
        assert_eq!(
            p("./global/pg_control", None).unwrap().unwrap(),
            "global/pg_control"
        );
        assert_eq!(
            p("PG_15_202209061/5/16390", Some(16384)).unwrap().unwrap(),
            "pg_tblspc/16384/PG_15_202209061/5/16390"
        );
        assert_eq!(p("./", None).unwrap(), None);
        assert_eq!(p("pg_wal/", None).unwrap().unwrap(), "pg_wal");
        for bad in ["/etc/passwd", "../x", "base/../../x", "a/\nb"] {
            assert!(p(bad, None).is_err(), "{bad}");
        }
    }

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o700);
        b.append_data(&mut h, "base", &[][..]).unwrap();
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn ingests_files_of_every_size_and_dedupes() {
        let big: Vec<u8> = (0..CHUNK_SIZE * 2 + 5).map(|i| (i % 251) as u8).collect();
        let tar = tar_of(&[
            ("base/empty", Vec::new()),
            ("base/small", b"hello".to_vec()),
            ("base/big", big.clone()),
            ("base/small2", b"hello".to_vec()),
        ]);
        let (pack_tx, mut pack_rx) = mpsc::channel(64);
        let packer = Packer::new(Arc::new(ChunkSet::default()), pack_tx);
        let (tx, rx) = mpsc::channel(4);
        let worker = std::thread::spawn(move || ingest(rx, packer, 2, None));
        tx.blocking_send(ArchiveMsg::Start { tablespace: None })
            .unwrap();
        for piece in tar.chunks(10_000) {
            let (a, b) = piece.split_at(piece.len() / 3);
            let batch = vec![Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)];
            tx.blocking_send(ArchiveMsg::Data(batch)).unwrap();
        }
        tx.blocking_send(ArchiveMsg::End).unwrap();
        tx.blocking_send(ArchiveMsg::Start {
            tablespace: Some(16384),
        })
        .unwrap();
        tx.blocking_send(ArchiveMsg::Data(vec![Bytes::from(tar_of(&[]))]))
            .unwrap();
        tx.blocking_send(ArchiveMsg::End).unwrap();
        drop(tx);
        let out = worker.join().unwrap().unwrap();
        let by = |p: &str| out.files.iter().find(|f| f.path == p).unwrap();
        assert_eq!(by("base").kind, FileKind::Directory);
        assert_eq!(by("pg_tblspc/16384/base").kind, FileKind::Directory);
        assert_eq!(by("base/empty").size, 0);
        assert!(by("base/empty").chunks.is_empty());
        assert_eq!(
            by("base/empty").sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"")).as_str())
        );
        assert_eq!(by("base/big").chunks.len(), 3);
        assert_eq!(by("base/big").sha256, None);
        assert_eq!(
            by("base/big").crc32c.as_deref(),
            Some(format!("{:08x}", crc32c::crc32c(&big)).as_str())
        );
        assert_eq!(
            by("base/small").sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"hello")).as_str())
        );
        assert_eq!(by("base/small").crc32c.as_deref(), Some("9a71bb4c"));
        assert_eq!(by("base/small").chunks, by("base/small2").chunks);
        assert_eq!(out.stats.new_chunks, 4);
        assert_eq!(out.stats.reused_chunks, 1);
        assert!(pack_rx.try_recv().is_ok());
    }

    /// A parent file of `blocks` blocks of 8 KiB (block `b` filled with `b`), cut into chunks
    /// as a backup stores it, and a fetch that serves those chunks (counting its calls).
    fn parent_of(
        blocks: u32,
        crcs: bool,
    ) -> (Parent, Vec<u8>, Arc<std::sync::atomic::AtomicUsize>) {
        let bs = 8192usize;
        let data: Vec<u8> = (0..blocks as usize * bs).map(|i| (i / bs) as u8).collect();
        let mut chunks = Vec::new();
        let mut by_sha = std::collections::HashMap::new();
        for piece in data.chunks(CHUNK_SIZE) {
            let sha = hex::encode(Sha256::digest(piece));
            by_sha.insert(sha.clone(), piece.to_vec());
            chunks.push(ChunkRef {
                sha256: sha,
                pack: "0".repeat(32),
                offset: 0,
                length: 0,
                plain_length: piece.len() as u64,
                crc32c: crcs.then(|| format!("{:08x}", crc32c::crc32c(piece))),
            });
        }
        let file = FileEntry {
            path: "base/5/16384".into(),
            size: data.len() as u64,
            mode: 0o600,
            mtime: 0,
            sha256: None,
            crc32c: Some(format!("{:08x}", crc32c::crc32c(&data))),
            kind: FileKind::File,
            link_target: None,
            chunks,
        };
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = calls.clone();
        let fetch = move |c: &ChunkRef, out: &mut [u8]| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            out.copy_from_slice(&by_sha[&c.sha256]);
            Ok(())
        };
        let parent = Parent {
            id: "20261204T050000Z".into(),
            files: [(file.path.clone(), file)].into_iter().collect(),
            block_size: 8192,
            fetch: Arc::new(fetch),
        };
        (parent, data, calls)
    }

    /// An incremental file as PostgreSQL 17/18 sends it: block `b` filled with `200 + b`.
    fn incremental_file(blocks: &[u32], trunc: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [incremental::MAGIC, blocks.len() as u32, trunc] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for b in blocks {
            out.extend_from_slice(&b.to_le_bytes());
        }
        if !blocks.is_empty() {
            out.resize(out.len().div_ceil(8192) * 8192, 0);
        }
        for b in blocks {
            out.extend(std::iter::repeat_n((200 + b) as u8, 8192));
        }
        out
    }

    fn ingest_incremental(parent: Parent, incr: Vec<u8>) -> Ingested {
        let tar = tar_of(&[
            ("base/5/INCREMENTAL.16384", incr),
            (
                "backup_label",
                b"START TIMELINE: 1\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\n"
                    .to_vec(),
            ),
        ]);
        let (pack_tx, _pack_rx) = mpsc::channel(64);
        let packer = Packer::new(Arc::new(ChunkSet::default()), pack_tx);
        let (tx, rx) = mpsc::channel(4);
        let parent = Some(Arc::new(parent));
        let worker = std::thread::spawn(move || ingest(rx, packer, 2, parent));
        tx.blocking_send(ArchiveMsg::Start { tablespace: None })
            .unwrap();
        for piece in tar.chunks(100_000) {
            tx.blocking_send(ArchiveMsg::Data(vec![Bytes::copy_from_slice(piece)]))
                .unwrap();
        }
        tx.blocking_send(ArchiveMsg::End).unwrap();
        drop(tx);
        worker.join().unwrap().unwrap()
    }

    #[test]
    fn incremental_files_are_stored_complete() {
        // 1100 blocks: chunks of 512, 512 and 76 blocks. Blocks 3 and 520 changed, the file
        // grew by two blocks (1101 new, 1100 never written: zeros) — then a truncated one.
        for crcs in [true, false] {
            let (parent, data, calls) = parent_of(1100, crcs);
            let prior = parent.files["base/5/16384"].clone();
            let out = ingest_incremental(parent, incremental_file(&[3, 520, 1101], 1100));
            let mut expected = data.clone();
            for b in [3usize, 520] {
                expected[b * 8192..(b + 1) * 8192].fill((200 + b) as u8);
            }
            expected.extend(std::iter::repeat_n(0u8, 8192));
            expected.extend(std::iter::repeat_n((200 + 1101u32) as u8, 8192));
            let f = out.files.iter().find(|f| f.path == "base/5/16384").unwrap();
            assert_eq!(f.size, expected.len() as u64);
            assert_eq!(
                f.crc32c.as_deref(),
                Some(format!("{:08x}", crc32c::crc32c(&expected)).as_str())
            );
            assert_eq!(f.chunks.len(), 3);
            assert_ne!(f.chunks[0].sha256, prior.chunks[0].sha256);
            for (c, piece) in f.chunks.iter().zip(expected.chunks(CHUNK_SIZE)) {
                assert_eq!(c.sha256, hex::encode(Sha256::digest(piece)));
                assert_eq!(c.plain_length, piece.len() as u64);
            }
            // Chunks 0 and 1 changed (fetched); chunk 2 grew (fetched).
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
            let label = out.files.iter().find(|f| f.path == "backup_label").unwrap();
            assert_eq!(label.size, b"START TIMELINE: 1\n".len() as u64);
            assert_eq!(out.replaced.len(), 2);
            let r = out
                .replaced
                .iter()
                .find(|r| r.path == "base/5/16384")
                .unwrap();
            assert_eq!(r.sent_path, "base/5/INCREMENTAL.16384");
            assert_eq!(r.size, expected.len() as u64);
        }

        // Only the last chunk changed: the first two are the parent's own, read only when
        // their CRC-32C is not recorded.
        for crcs in [true, false] {
            let (parent, data, calls) = parent_of(1100, crcs);
            let prior = parent.files["base/5/16384"].clone();
            let out = ingest_incremental(parent, incremental_file(&[1050], 1100));
            let mut expected = data.clone();
            expected[1050 * 8192..1051 * 8192].fill((200 + 1050u32) as u8);
            let f = out.files.iter().find(|f| f.path == "base/5/16384").unwrap();
            assert_eq!(f.chunks[0].sha256, prior.chunks[0].sha256);
            assert_eq!(f.chunks[1].sha256, prior.chunks[1].sha256);
            assert_eq!(
                f.crc32c.as_deref(),
                Some(format!("{:08x}", crc32c::crc32c(&expected)).as_str())
            );
            let fetched = calls.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(fetched, if crcs { 1 } else { 3 });
        }

        // Truncated to 10 blocks, none sent: the parent's first 10 blocks.
        let (parent, data, _) = parent_of(1100, true);
        let out = ingest_incremental(parent, incremental_file(&[], 10));
        let f = out.files.iter().find(|f| f.path == "base/5/16384").unwrap();
        assert_eq!(f.size, 10 * 8192);
        assert_eq!(
            f.crc32c.as_deref(),
            Some(format!("{:08x}", crc32c::crc32c(&data[..10 * 8192])).as_str())
        );
    }

    #[test]
    fn truncated_archives_fail() {
        let tar = tar_of(&[("base/x", vec![1; 5000])]);
        let (pack_tx, _pack_rx) = mpsc::channel(64);
        let packer = Packer::new(Arc::new(ChunkSet::default()), pack_tx);
        let (tx, rx) = mpsc::channel(4);
        let worker = std::thread::spawn(move || ingest(rx, packer, 2, None));
        tx.blocking_send(ArchiveMsg::Start { tablespace: None })
            .unwrap();
        tx.blocking_send(ArchiveMsg::Data(vec![Bytes::copy_from_slice(&tar[..2000])]))
            .unwrap();
        drop(tx);
        assert!(worker.join().unwrap().is_err());
    }
}

/// A hostile BASE_BACKUP tar stream: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::super::pack::ChunkSet;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// Runs [`ingest`] over `archives` (tablespace, tar bytes), sent `piece` bytes per message.
    /// A panic of the reader thread fails the test.
    fn ingest_all(
        archives: &[(Option<u32>, Vec<u8>)],
        piece: usize,
    ) -> Result<Ingested, IngestError> {
        let (pack_tx, pack_rx) = mpsc::channel(64);
        let packer = Packer::new(Arc::new(ChunkSet::default()), pack_tx);
        let (tx, rx) = mpsc::channel(4);
        let reader = std::thread::spawn(move || ingest(rx, packer, 1, None));
        // A send fails once the reader has stopped with an error: the rest is not needed.
        'send: for (tablespace, bytes) in archives {
            let start = ArchiveMsg::Start {
                tablespace: *tablespace,
            };
            if tx.blocking_send(start).is_err() {
                break;
            }
            for p in bytes.chunks(piece.max(1)) {
                if tx
                    .blocking_send(ArchiveMsg::Data(vec![Bytes::copy_from_slice(p)]))
                    .is_err()
                {
                    break 'send;
                }
            }
            if tx.blocking_send(ArchiveMsg::End).is_err() {
                break;
            }
        }
        drop(tx);
        let out = reader.join().expect("the tar reader panicked");
        drop(pack_rx);
        out
    }

    fn assert_safe(files: &[FileEntry]) -> Result<(), TestCaseError> {
        for f in files {
            prop_assert!(
                !f.path.is_empty() && !f.path.starts_with('/'),
                "{:?}",
                f.path
            );
            prop_assert!(
                f.path
                    .split('/')
                    .all(|c| !c.is_empty() && c != ".." && c != "."),
                "{:?}",
                f.path
            );
            prop_assert!(!f.path.chars().any(char::is_control), "{:?}", f.path);
        }
        Ok(())
    }

    /// Files of a data directory: relative names (some over tar's 100 bytes) and contents.
    fn members() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
        proptest::collection::btree_map(
            "[a-zA-Z0-9_]{1,40}(/[a-zA-Z0-9_][a-zA-Z0-9_.]{0,39}){0,3}",
            proptest::collection::vec(any::<u8>(), 0..3000),
            0..8,
        )
    }

    fn tar_of(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// One tar header block with arbitrary name, type, size and mode fields (a valid header
    /// checksum, so that the reader goes past it), then arbitrary bytes.
    fn hostile_member() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(any::<u8>(), 0..100),
            prop::sample::select(b"0 1 2 3 4 5 6 7 x g L K S D V M N".to_vec()),
            prop_oneof![
                any::<u64>(),
                0u64..4096,
                Just(u64::MAX),
                Just(1u64 << 32),
                Just(8u64 << 30),
            ],
            proptest::collection::vec(any::<u8>(), 0..8),
            proptest::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(name, kind, size, mode, data)| {
                let mut h = tar::Header::new_gnu();
                h.as_old_mut().name[..name.len()].copy_from_slice(&name);
                h.set_entry_type(tar::EntryType::new(kind));
                h.set_size(size);
                h.as_old_mut().mode[..mode.len()].copy_from_slice(&mode);
                h.set_cksum();
                let mut out = h.as_bytes().to_vec();
                out.extend_from_slice(&data);
                out
            })
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(1000))]

        #[test]
        fn every_member_comes_back_with_its_size_and_crc(
            files in members(),
            tablespace in proptest::option::of(1u32..),
            piece in 1usize..5000,
        ) {
            let out = ingest_all(&[(tablespace, tar_of(&files))], piece).unwrap();
            let prefix = tablespace.map(|oid| format!("pg_tblspc/{oid}/")).unwrap_or_default();
            let got: BTreeMap<String, (u64, Option<String>)> = out
                .files
                .into_iter()
                .map(|f| (f.path, (f.size, f.crc32c)))
                .collect();
            let want: BTreeMap<String, (u64, Option<String>)> = files
                .iter()
                .map(|(name, data)| {
                    let crc = format!("{:08x}", crc32c::crc32c(data));
                    (format!("{prefix}{name}"), (data.len() as u64, Some(crc)))
                })
                .collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn arbitrary_bytes_give_a_typed_error_or_safe_members(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            piece in 1usize..2000,
        ) {
            if let Ok(out) = ingest_all(&[(None, bytes)], piece) {
                assert_safe(&out.files)?;
            }
        }

        #[test]
        fn hostile_headers_give_a_typed_error_or_safe_members(
            members in proptest::collection::vec(hostile_member(), 1..4),
            piece in 1usize..3000,
        ) {
            if let Ok(out) = ingest_all(&[(None, members.concat())], piece) {
                assert_safe(&out.files)?;
            }
        }

        #[test]
        fn mutated_archives_give_a_typed_error_or_safe_members(
            files in members(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = tar_of(&files);
            for (at, b) in edits {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            if let Ok(out) = ingest_all(&[(None, bytes)], 4096) {
                assert_safe(&out.files)?;
            }
        }

        #[test]
        fn member_paths_are_relative_and_without_dot_dot_or_control_characters(
            path in "(/|\\./|\\.\\./)?([a-zA-Z0-9_.\n\t -]{0,12}/){0,4}[a-zA-Z0-9_.\n -]{0,12}",
            tablespace in proptest::option::of(any::<u32>()),
        ) {
            if let Ok(Some(p)) = member_path(Path::new(&path), tablespace) {
                let entry = FileEntry {
                    path: p,
                    size: 0,
                    mode: 0,
                    mtime: 0,
                    sha256: None,
                    crc32c: None,
                    kind: FileKind::File,
                    link_target: None,
                    chunks: Vec::new(),
                };
                assert_safe(&[entry])?;
            }
        }
    }
}
