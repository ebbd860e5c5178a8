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

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::pack::{PackStats, Packer, UploaderGone};
use super::CHUNK_SIZE;
use crate::repo::manifest::{FileEntry, FileKind};

/// One message of the archive stream, in server order.
#[derive(Debug)]
pub enum ArchiveMsg {
    /// A new archive: `None` for the data directory (`base.tar`), else a tablespace's OID.
    Start { tablespace: Option<u32> },
    /// Next bytes of the current archive.
    Data(Bytes),
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
    #[error("archive stream out of order: {0}")]
    Order(&'static str),
    /// The uploader stopped; its error is the cause.
    #[error("the pack uploader stopped")]
    UploaderGone,
}

impl From<UploaderGone> for IngestError {
    fn from(_: UploaderGone) -> Self {
        IngestError::UploaderGone
    }
}

/// What [`ingest`] produced.
#[derive(Debug, Default)]
pub struct Ingested {
    /// Every member of every archive, in stream order.
    pub files: Vec<FileEntry>,
    pub stats: PackStats,
}

/// A `Read` over the data messages of one archive; EOF at [`ArchiveMsg::End`].
pub struct ChannelReader<'a> {
    rx: &'a mut mpsc::Receiver<ArchiveMsg>,
    current: Bytes,
    ended: bool,
}

impl<'a> ChannelReader<'a> {
    pub fn new(rx: &'a mut mpsc::Receiver<ArchiveMsg>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            ended: false,
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
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(ArchiveMsg::Data(b)) => self.current = b,
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

/// Reads archives from `rx` until the channel closes, storing file contents through a
/// [`Packer`] (which hands full packs to the uploader). Blocking: run it on its own thread.
///
/// # Errors
/// Malformed tar data, unsafe paths, a stream that ends inside an archive, a stopped uploader.
pub fn ingest(
    mut rx: mpsc::Receiver<ArchiveMsg>,
    mut packer: Packer,
) -> Result<Ingested, IngestError> {
    let mut files = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    while let Some(msg) = rx.blocking_recv() {
        let tablespace = match msg {
            ArchiveMsg::Start { tablespace } => tablespace,
            ArchiveMsg::Data(_) => return Err(IngestError::Order("data before an archive")),
            ArchiveMsg::End => return Err(IngestError::Order("end before an archive")),
        };
        let mut reader = ChannelReader::new(&mut rx);
        read_archive(&mut reader, tablespace, &mut packer, &mut buf, &mut files)?;
        reader.drain().map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => IngestError::Truncated,
            _ => IngestError::Tar(e),
        })?;
    }
    let stats = packer.finish()?;
    Ok(Ingested { files, stats })
}

fn read_archive(
    reader: &mut ChannelReader<'_>,
    tablespace: Option<u32>,
    packer: &mut Packer,
    buf: &mut [u8],
    files: &mut Vec<FileEntry>,
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
            kind: FileKind::File,
            link_target: None,
            chunks: Vec::new(),
        };
        if kind.is_dir() {
            file.kind = FileKind::Directory;
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
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            store_file(&mut entry, declared, &mut file, packer, buf).map_err(|e| match e {
                StoreError::Read(e) => tar_err(e),
                StoreError::Uploader => IngestError::UploaderGone,
            })?;
        } else {
            return Err(IngestError::MemberType {
                kind: format!("{kind:?}"),
                path: file.path,
            });
        }
        files.push(file);
    }
    Ok(())
}

enum StoreError {
    Read(io::Error),
    Uploader,
}

/// Cuts one file (`declared` bytes long, from its tar header) into chunks, hashing every
/// chunk and the whole file, and packs the chunks. A file of at most one chunk has its
/// chunk's hash; longer files are hashed a second time as a whole.
fn store_file(
    entry: &mut impl Read,
    declared: u64,
    file: &mut FileEntry,
    packer: &mut Packer,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let multi = declared > buf.len() as u64;
    let mut file_hash = Sha256::new();
    let mut only_chunk: Option<[u8; 32]> = None;
    loop {
        let n = read_full(entry, buf).map_err(StoreError::Read)?;
        if n == 0 {
            break;
        }
        let plain = &buf[..n];
        let sha: [u8; 32] = Sha256::digest(plain).into();
        if multi {
            file_hash.update(plain);
        } else {
            only_chunk = Some(sha);
        }
        let r = packer.add(sha, plain).map_err(|_| StoreError::Uploader)?;
        file.size += n as u64;
        file.chunks.push(r);
        if n < buf.len() {
            break;
        }
    }
    if file.size != declared {
        return Err(StoreError::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("'{}' is shorter than its header says", file.path),
        )));
    }
    file.sha256 = Some(match only_chunk {
        Some(sha) if !multi => hex::encode(sha),
        _ => hex::encode(file_hash.finalize()),
    });
    Ok(())
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::pack::ChunkSet;
    use super::*;

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
        let packer = Packer::new(ChunkSet::default(), pack_tx);
        let (tx, rx) = mpsc::channel(4);
        let worker = std::thread::spawn(move || ingest(rx, packer));
        tx.blocking_send(ArchiveMsg::Start { tablespace: None })
            .unwrap();
        for piece in tar.chunks(10_000) {
            tx.blocking_send(ArchiveMsg::Data(Bytes::copy_from_slice(piece)))
                .unwrap();
        }
        tx.blocking_send(ArchiveMsg::End).unwrap();
        tx.blocking_send(ArchiveMsg::Start {
            tablespace: Some(16384),
        })
        .unwrap();
        tx.blocking_send(ArchiveMsg::Data(Bytes::from(tar_of(&[]))))
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
        assert_eq!(
            by("base/big").sha256.as_deref(),
            Some(hex::encode(Sha256::digest(&big)).as_str())
        );
        assert_eq!(by("base/small").chunks, by("base/small2").chunks);
        assert_eq!(out.stats.new_chunks, 4);
        assert_eq!(out.stats.reused_chunks, 1);
        assert!(pack_rx.try_recv().is_ok());
    }

    #[test]
    fn truncated_archives_fail() {
        let tar = tar_of(&[("base/x", vec![1; 5000])]);
        let (pack_tx, _pack_rx) = mpsc::channel(64);
        let packer = Packer::new(ChunkSet::default(), pack_tx);
        let (tx, rx) = mpsc::channel(4);
        let worker = std::thread::spawn(move || ingest(rx, packer));
        tx.blocking_send(ArchiveMsg::Start { tablespace: None })
            .unwrap();
        tx.blocking_send(ArchiveMsg::Data(Bytes::copy_from_slice(&tar[..2000])))
            .unwrap();
        drop(tx);
        assert!(worker.join().unwrap().is_err());
    }
}
