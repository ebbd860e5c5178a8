//! Pack objects and their indexes: how chunks are stored, found again and deduplicated.
//!
//! A pack (`packs/<xx>/<pack-id>.pack`) is the concatenation of lz4-framed chunks; nothing in
//! it describes itself. Its index (`packs/<xx>/<pack-id>.idx`, JSON, [`PackIndex`]) lists every
//! chunk in it: SHA-256 of the plain bytes, offset and length in the pack, plain length. The
//! index is uploaded only after the pack, so an index always describes a complete pack; a pack
//! without index (an interrupted upload) is ignored and left for `expire`.
//!
//! [`ChunkSet`] is the set of chunks known from all indexes, loaded once when a backup starts;
//! [`Packer`] appends new chunks (compressed by [`super::chunk_workers`]) to the current pack
//! and hands sealed packs to [`upload`] through a bounded channel, so at most a couple of packs
//! are in memory at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::PACK_TARGET_SIZE;
use crate::repo::layout::{self, PackObject};
use crate::repo::manifest::ChunkRef;
use crate::repo::RepoError;
use crate::storage::{PutMode, Storage, StorageError};

/// The pack index format this build writes and reads.
pub const PACK_INDEX_VERSION: u32 = 1;

/// Index objects fetched at once when loading the chunk set.
const INDEX_FETCH_PARALLEL: usize = 16;

/// `packs/<xx>/<pack-id>.idx`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    pub format_version: u32,
    /// The pack id (32 lowercase hex digits).
    pub pack: String,
    /// The pack's chunks in pack order.
    pub chunks: Vec<PackIndexEntry>,
}

/// One chunk of a pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndexEntry {
    /// SHA-256 of the chunk's plain bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// Byte offset of the chunk's lz4 frame in the pack.
    pub offset: u64,
    /// Length of the lz4 frame in bytes.
    pub length: u64,
    /// Length of the plain bytes.
    pub plain_length: u64,
}

/// Where a known chunk lives (compact: the pack is an index into [`ChunkSet::packs`]).
#[derive(Debug, Clone, Copy)]
struct Location {
    pack: u32,
    offset: u64,
    length: u64,
    plain_length: u64,
}

/// The chunks already stored in the repository, by SHA-256 of their plain bytes.
#[derive(Debug, Default)]
pub struct ChunkSet {
    packs: Vec<String>,
    chunks: HashMap<[u8; 32], Location>,
}

impl ChunkSet {
    /// Loads every pack index whose pack exists. An unreadable or malformed index is skipped
    /// with a warning: its chunks are then simply stored again.
    ///
    /// # Errors
    /// Storage errors while listing or fetching.
    pub async fn load(storage: &dyn Storage) -> Result<ChunkSet, RepoError> {
        let objects = storage.list(layout::PACKS_ROOT).await?;
        let mut packs = HashSet::new();
        let mut indexes = Vec::new();
        for o in objects {
            match layout::parse_pack_key(&o.key) {
                Some(PackObject::Pack(id)) => {
                    packs.insert(id);
                }
                Some(PackObject::Index(id)) => indexes.push(id),
                None => {}
            }
        }
        indexes.retain(|id| packs.contains(id));
        let mut fetched = futures::stream::iter(indexes)
            .map(|id| async move {
                let key = layout::pack_index_key(&id);
                (id, key.clone(), storage.get(&key).await)
            })
            .buffer_unordered(INDEX_FETCH_PARALLEL);
        let mut set = ChunkSet::default();
        while let Some((id, key, body)) = fetched.next().await {
            let body = match body {
                Ok(b) => b,
                // Deleted between list and get (expire running): its chunks are gone too.
                Err(StorageError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            match decode_index(&body, &id) {
                Ok(index) => set.add_index(&index),
                Err(message) => {
                    tracing::warn!("ignoring pack index {key}: {message}");
                }
            }
        }
        Ok(set)
    }

    fn add_index(&mut self, index: &PackIndex) {
        let pack = self.pack_number(&index.pack);
        for c in &index.chunks {
            if let Some(sha) = parse_sha(&c.sha256) {
                self.chunks.entry(sha).or_insert(Location {
                    pack,
                    offset: c.offset,
                    length: c.length,
                    plain_length: c.plain_length,
                });
            }
        }
    }

    fn pack_number(&mut self, id: &str) -> u32 {
        if self.packs.last().map(String::as_str) != Some(id) {
            self.packs.push(id.to_string());
        }
        (self.packs.len() - 1) as u32
    }

    /// The stored chunk with this SHA-256, if any.
    pub fn get(&self, sha256: &[u8; 32]) -> Option<ChunkRef> {
        self.chunks.get(sha256).map(|l| ChunkRef {
            sha256: hex::encode(sha256),
            pack: self.packs[l.pack as usize].clone(),
            offset: l.offset,
            length: l.length,
            plain_length: l.plain_length,
            crc32c: None,
        })
    }

    fn insert(&mut self, sha256: [u8; 32], r: &ChunkRef) {
        let pack = self.pack_number(&r.pack);
        self.chunks.insert(
            sha256,
            Location {
                pack,
                offset: r.offset,
                length: r.length,
                plain_length: r.plain_length,
            },
        );
    }

    /// Whether a chunk with this SHA-256 is stored.
    pub fn contains(&self, sha256: &[u8; 32]) -> bool {
        self.chunks.contains_key(sha256)
    }

    /// Number of known chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

fn parse_sha(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    (s.len() == 64 && hex::decode_to_slice(s, &mut out).is_ok()).then_some(out)
}

fn decode_index(body: &[u8], id: &str) -> Result<PackIndex, String> {
    let index: PackIndex = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if index.format_version != PACK_INDEX_VERSION {
        return Err(format!(
            "format version {} is not {PACK_INDEX_VERSION}",
            index.format_version
        ));
    }
    if index.pack != id {
        return Err(format!("describes pack {} instead", index.pack));
    }
    if let Some(bad) = index.chunks.iter().find(|c| parse_sha(&c.sha256).is_none()) {
        return Err(format!("invalid chunk hash '{}'", bad.sha256));
    }
    Ok(index)
}

/// A new, random pack id: 32 lowercase hex digits (128 bits; hashed from the time, the process
/// and a counter, so that concurrent writers never pick the same one).
pub fn new_pack_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(now.as_nanos().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(format!("{:?}", std::thread::current().id()).as_bytes());
    // Stack address: differs between processes started in the same nanosecond.
    let local = 0u8;
    h.update((&local as *const u8 as usize).to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Pack buffers given back by the uploader, for the packer to fill again: each is
/// [`PACK_TARGET_SIZE`] and more, and a new one would be mapped and faulted in afresh for every
/// pack (gigabytes of page faults per backup). At most [`PackBuffers::KEPT`] are kept: one
/// pack is filled while one waits in the channel and one is uploaded.
#[derive(Debug, Clone, Default)]
pub struct PackBuffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl PackBuffers {
    const KEPT: usize = 2;

    /// An empty buffer: a returned one if any.
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .expect("pack buffers")
            .pop()
            .unwrap_or_default()
    }

    /// Keeps the buffer of an uploaded pack if nothing else holds it any more.
    pub fn give_back(&self, data: Bytes) {
        let Ok(data) = data.try_into_mut() else {
            return;
        };
        let mut buf = Vec::from(data);
        buf.clear();
        let mut kept = self.0.lock().expect("pack buffers");
        if kept.len() < Self::KEPT {
            kept.push(buf);
        }
    }
}

/// A full pack on its way to storage.
#[derive(Debug)]
pub struct SealedPack {
    pub id: String,
    pub data: Bytes,
    pub index: PackIndex,
}

/// Why a chunk could not be packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// The upload pipeline was closed because the uploader failed; its error says why.
    #[error("the pack uploader stopped")]
    UploaderGone,
    /// A chunk the repository does not hold came without its compressed frame.
    #[error("a new chunk came without its compressed frame")]
    MissingFrame,
}

/// What the packer stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Compressed bytes newly stored.
    pub new_bytes: u64,
    /// Chunks referenced from earlier packs (or earlier in this backup).
    pub reused_chunks: u64,
    /// Packs sealed.
    pub packs: u64,
}

/// Deduplicates and packs compressed chunks (synchronous: runs on the tar reader's thread).
#[derive(Debug)]
pub struct Packer {
    /// The chunks stored before this backup.
    existing: Arc<ChunkSet>,
    /// The chunks this backup stored.
    added: ChunkSet,
    id: String,
    buf: Vec<u8>,
    buffers: PackBuffers,
    entries: Vec<PackIndexEntry>,
    tx: mpsc::Sender<SealedPack>,
    target: usize,
    stats: PackStats,
}

impl Packer {
    pub fn new(existing: Arc<ChunkSet>, tx: mpsc::Sender<SealedPack>) -> Packer {
        Self::with_target(existing, tx, PACK_TARGET_SIZE)
    }

    /// A packer sealing packs at `target` compressed bytes.
    pub fn with_target(
        existing: Arc<ChunkSet>,
        tx: mpsc::Sender<SealedPack>,
        target: usize,
    ) -> Packer {
        Packer {
            existing,
            added: ChunkSet::default(),
            id: new_pack_id(),
            buf: Vec::new(),
            buffers: PackBuffers::default(),
            entries: Vec::new(),
            tx,
            target,
            stats: PackStats::default(),
        }
    }

    /// The chunks stored before this backup.
    pub fn existing(&self) -> Arc<ChunkSet> {
        self.existing.clone()
    }

    /// Stores the chunk whose plain bytes (`plain_length` of them) have SHA-256 `sha256`, and
    /// returns where it lives: a chunk already stored, before or by this backup, is
    /// referenced; otherwise `frame` (its lz4 frame, see [`crate::repo::codec::append_frame`])
    /// is appended to the current pack. Blocks while the upload channel is full.
    ///
    /// # Errors
    /// [`PackError::UploaderGone`] when the uploader stopped (its own error is the real
    /// cause); [`PackError::MissingFrame`] for a new chunk given without its frame.
    pub fn add(
        &mut self,
        sha256: [u8; 32],
        plain_length: u64,
        frame: Option<&[u8]>,
    ) -> Result<ChunkRef, PackError> {
        if let Some(r) = self
            .existing
            .get(&sha256)
            .or_else(|| self.added.get(&sha256))
        {
            self.stats.reused_chunks += 1;
            return Ok(r);
        }
        let frame = frame.ok_or(PackError::MissingFrame)?;
        if self.buf.capacity() == 0 {
            self.buf = self.buffers.take();
            self.buf.reserve_exact(self.target + frame.len());
        }
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(frame);
        let length = frame.len() as u64;
        let r = ChunkRef {
            sha256: hex::encode(sha256),
            pack: self.id.clone(),
            offset,
            length,
            plain_length,
            crc32c: None,
        };
        self.entries.push(PackIndexEntry {
            sha256: r.sha256.clone(),
            offset,
            length,
            plain_length,
        });
        self.added.insert(sha256, &r);
        self.stats.new_chunks += 1;
        self.stats.new_bytes += length;
        if self.buf.len() >= self.target {
            self.seal()?;
        }
        Ok(r)
    }

    /// Sends the current pack (if it holds anything) to the uploader and starts a new one.
    fn seal(&mut self) -> Result<(), PackError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let id = std::mem::replace(&mut self.id, new_pack_id());
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let chunks = std::mem::take(&mut self.entries);
        self.stats.packs += 1;
        self.tx
            .blocking_send(SealedPack {
                index: PackIndex {
                    format_version: PACK_INDEX_VERSION,
                    pack: id.clone(),
                    chunks,
                },
                id,
                data,
            })
            .map_err(|_| PackError::UploaderGone)
    }

    /// The pool the uploader gives pack buffers back to.
    pub fn buffers(&self) -> PackBuffers {
        self.buffers.clone()
    }

    /// Seals the last pack and closes the pipeline.
    ///
    /// # Errors
    /// [`PackError::UploaderGone`] as for [`Packer::add`].
    pub fn finish(mut self) -> Result<PackStats, PackError> {
        self.seal()?;
        Ok(self.stats)
    }
}

/// Uploads sealed packs as they arrive: the pack, then its index, and gives each pack's buffer
/// back to `buffers`. Returns the number of packs uploaded once the channel is closed.
///
/// # Errors
/// The first storage error; the channel is then closed, which stops the packer.
pub async fn upload(
    storage: &dyn Storage,
    mut rx: mpsc::Receiver<SealedPack>,
    buffers: PackBuffers,
) -> Result<u64, StorageError> {
    let mut n = 0;
    while let Some(pack) = rx.recv().await {
        storage
            .put(
                &layout::pack_key(&pack.id),
                pack.data.clone(),
                PutMode::Create,
            )
            .await?;
        buffers.give_back(pack.data);
        let index = serde_json::to_vec(&pack.index).expect("serialisable");
        storage
            .put(
                &layout::pack_index_key(&pack.id),
                Bytes::from(index),
                PutMode::Create,
            )
            .await?;
        tracing::debug!("uploaded pack {}", pack.id);
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::codec;

    #[test]
    fn uploaded_pack_buffers_are_filled_again() {
        let buffers = PackBuffers::default();
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(b"pack bytes");
        let (ptr, capacity) = (buf.as_ptr(), buf.capacity());
        let data = Bytes::from(buf);
        // Still held elsewhere (a retrying upload, say): not kept.
        let elsewhere = data.clone();
        buffers.give_back(data);
        assert!(buffers.take().capacity() == 0);
        // The only handle: kept, emptied, the same memory.
        buffers.give_back(elsewhere);
        let again = buffers.take();
        assert_eq!(
            (again.as_ptr(), again.capacity(), again.len()),
            (ptr, capacity, 0)
        );
        for _ in 0..5 {
            buffers.give_back(Bytes::from(vec![0u8; 10]));
        }
        assert_eq!(buffers.0.lock().unwrap().len(), PackBuffers::KEPT);
    }

    #[test]
    fn pack_ids_are_unique_and_valid() {
        let a = new_pack_id();
        let b = new_pack_id();
        assert_ne!(a, b);
        assert!(layout::is_pack_id(&a), "{a}");
    }

    #[test]
    fn packer_dedupes_and_seals_readable_packs() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut p = Packer::with_target(Arc::new(ChunkSet::default()), tx, 1000);
        let chunk = |n: u8| vec![n; 700];
        let sha = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
        let frame = |b: &[u8]| {
            let mut f = Vec::new();
            codec::append_frame(b, &mut Vec::new(), &mut f);
            f
        };
        let a = p.add(sha(&chunk(1)), 700, Some(&frame(&chunk(1)))).unwrap();
        let b = p.add(sha(&chunk(2)), 700, Some(&frame(&chunk(2)))).unwrap();
        let a2 = p.add(sha(&chunk(1)), 700, None).unwrap();
        assert_eq!(a, a2);
        assert_eq!(
            p.add(sha(&chunk(3)), 700, None),
            Err(PackError::MissingFrame)
        );
        let stats = p.finish().unwrap();
        assert_eq!(stats.new_chunks, 2);
        assert_eq!(stats.reused_chunks, 1);
        let mut packs = Vec::new();
        while let Ok(p) = rx.try_recv() {
            packs.push(p);
        }
        assert!(!packs.is_empty());
        let mut set = ChunkSet::default();
        for pack in &packs {
            set.add_index(&pack.index);
        }
        for r in [&a, &b] {
            let pack = packs.iter().find(|p| p.id == r.pack).unwrap();
            let frame = &pack.data[r.offset as usize..(r.offset + r.length) as usize];
            let mut out = Vec::new();
            codec::decompress_verified(frame, codec::Expected::sha256(&r.sha256), &mut out)
                .unwrap();
            assert_eq!(out.len() as u64, r.plain_length);
            assert_eq!(set.get(&parse_sha(&r.sha256).unwrap()).as_ref(), Some(r));
        }
        assert!(decode_index(&serde_json::to_vec(&packs[0].index).unwrap(), "x").is_err());
    }
}
