//! The envelope of every stored file: lz4 frames (the standard frame format, so `lz4 -d` reads
//! it) with the SHA-256 of the plain bytes kept beside it. Large inputs are cut into parts that are
//! compressed in parallel, each as its own frame; concatenated frames are valid lz4. A WAL object
//! ends with a [`PartIndex`], so that its parts are also verified and decoded in parallel.

use std::io::{BufRead, Write};

use sha2::{Digest, Sha256};

use super::part_index::PartIndex;
use crate::crypto::keys::ContentIds;

/// Inputs are cut into parts of this size, each compressed as its own frame: small enough that
/// the parts in flight stay a few MiB, large enough that the frame overhead is negligible.
pub const PART_SIZE: usize = 1024 * 1024;
/// Compressed inputs from this size on are decoded and hashed on two threads.
const PIPELINE_MIN: usize = 256 * 1024;

/// What [`compress_into`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// SHA-256 of the plain bytes.
    pub sha256: [u8; 32],
    pub plain_len: u64,
    /// Bytes written to the output: the stored object's size.
    pub stored_len: u64,
}

/// Compresses `plain` into `out` and hashes it, on every core. `plain` is cut into parts of
/// 1 MiB ([`PART_SIZE`]), each compressed as its own frame by worker threads (one per core but
/// one, at most 4) and written to `out` in order, one `write_all` per frame, while the calling
/// thread computes the SHA-256 and then compresses parts too. The object ends with its
/// [`PartIndex`] (the XXH3-128 of each part, computed beside its compression), written last.
/// Each thread encodes its frames in one buffer of its own, allocated once: besides `out`, a
/// call needs only a few MiB of fresh memory, which is slow to fault in on a virtual machine.
///
/// `in_order` sees each plain part after its frame was written, in order (for the restore-point
/// scan). `released` is told each part's byte range once it has been both hashed and
/// compressed and is never read again: a caller reading `plain` from a mapped file can then
/// drop those pages from its mapping, so that its resident memory stays a few parts.
///
/// # Errors
/// The first error of `out`; nothing more is written after it.
pub fn compress_into(
    plain: &[u8],
    out: &mut (dyn Write + Send),
    in_order: &mut (dyn FnMut(&[u8]) + Send),
    released: &(dyn Fn(std::ops::Range<usize>) + Sync),
) -> std::io::Result<Written> {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let parts: Vec<&[u8]> = if plain.is_empty() {
        vec![plain]
    } else {
        plain.chunks(PART_SIZE).collect()
    };
    let range = |i: usize| i * PART_SIZE..(i * PART_SIZE + parts[i].len());
    // The calling thread hashes, usually the longest task: leave it a core of its own.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, 4)
        .min(parts.len() - 1);
    let next = AtomicUsize::new(0);
    // Parts hashed and parts written, each a count from the first part. A part is released by
    // whichever of the two threads finishes with it last; both may (SeqCst: never neither).
    // Atomics rather than the turnstile's `next`, so that the hashing thread never waits for
    // the lock a write holds.
    let hashed = AtomicUsize::new(0);
    let written = AtomicUsize::new(0);
    let order = std::sync::Mutex::new(InOrder {
        next: 0,
        out,
        in_order,
        stored: 0,
        part_hashes: Vec::with_capacity(parts.len()),
        failed: None,
    });
    let turn = std::sync::Condvar::new();
    let compress_parts = || {
        let mut buf = Vec::new();
        loop {
            let i = next.fetch_add(1, SeqCst);
            let Some(part) = parts.get(i) else {
                return;
            };
            let n = encode_frame(part, &mut buf);
            let part_hash = PartIndex::hash(part);
            let mut o = turn
                .wait_while(order.lock().expect("no panics"), |o| {
                    o.next != i && o.failed.is_none()
                })
                .expect("no panics");
            if o.failed.is_some() {
                return;
            }
            match o.out.write_all(&buf[..n]) {
                Ok(()) => {
                    (o.in_order)(part);
                    o.part_hashes.push(part_hash);
                    o.stored += n as u64;
                    o.next += 1;
                    written.store(i + 1, SeqCst);
                }
                Err(e) => o.failed = Some(e),
            }
            drop(o);
            turn.notify_all();
            if hashed.load(SeqCst) > i {
                released(range(i));
            }
        }
    };
    let hash_parts = || -> [u8; 32] {
        let mut hasher = Sha256::new();
        for (i, part) in parts.iter().enumerate() {
            hasher.update(part);
            hashed.store(i + 1, SeqCst);
            if written.load(SeqCst) > i {
                released(range(i));
            }
        }
        hasher.finalize().into()
    };
    let sha256 = std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(compress_parts);
        }
        let sha256 = hash_parts();
        // Then help with the parts left: on poorly compressible WAL (full-page images), lz4
        // takes longer than SHA-256.
        compress_parts();
        sha256
    });
    let o = order.into_inner().expect("no panics");
    if let Some(e) = o.failed {
        return Err(e);
    }
    let index = PartIndex {
        plain_len: plain.len() as u64,
        part_size: PART_SIZE as u32,
        sha256,
        parts: o.part_hashes,
    };
    let encoded = index.encode();
    o.out.write_all(&encoded)?;
    Ok(Written {
        sha256: index.sha256,
        plain_len: index.plain_len,
        stored_len: o.stored + encoded.len() as u64,
    })
}

/// The output side of [`compress_into`], taken in part order.
struct InOrder<'a> {
    /// The part whose frame is written next.
    next: usize,
    out: &'a mut (dyn Write + Send),
    in_order: &'a mut (dyn FnMut(&[u8]) + Send),
    stored: u64,
    /// XXH3-128 of the parts written, in order.
    part_hashes: Vec<u128>,
    failed: Option<std::io::Error>,
}

/// The largest plain input of one frame: one block of the lz4 frame format's largest size.
pub const MAX_FRAME_PLAIN: usize = 4 * 1024 * 1024;

/// The seven header bytes of the frames we write: magic number, FLG (version 1, independent
/// blocks, no block or content checksum, no content size), BD (the largest block size) and the
/// header checksum. Taken from lz4_flex's own encoder, so they follow the lz4 frame format
/// (lz4/doc/lz4_Frame_format.md) by construction.
fn frame_header(block_size: lz4_flex::frame::BlockSize) -> [u8; 7] {
    let info = lz4_flex::frame::FrameInfo::new()
        .block_size(block_size)
        .block_mode(lz4_flex::frame::BlockMode::Independent);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
    enc.write_all(b"x").expect("writing to a Vec");
    let frame = enc.finish().expect("writing to a Vec");
    frame[..7].try_into().expect("a frame header is 7 bytes")
}

/// Frame headers for blocks of at most 1 MiB and at most 4 MiB.
static FRAME_HEADERS: std::sync::LazyLock<[[u8; 7]; 2]> = std::sync::LazyLock::new(|| {
    [
        frame_header(lz4_flex::frame::BlockSize::Max1MB),
        frame_header(lz4_flex::frame::BlockSize::Max4MB),
    ]
});
/// Marks a block stored uncompressed (its size word's high bit).
const UNCOMPRESSED_BLOCK: u32 = 0x8000_0000;

/// Appends `plain` (at most [`MAX_FRAME_PLAIN`] bytes) to `out` as one lz4 frame (see
/// [`encode_frame`]), encoded in `scratch`, the caller's reusable buffer.
pub fn append_frame(plain: &[u8], scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    let n = encode_frame(plain, scratch);
    out.extend_from_slice(&scratch[..n]);
}

/// Encodes `plain` (at most [`MAX_FRAME_PLAIN`] bytes) as one lz4 frame holding one block at
/// the start of `buf`, and returns the frame's length: the header, the block's size word, the
/// block (stored plain when lz4 does not make it smaller), the end mark. No lz4 content
/// checksum: the SHA-256 of the plain bytes, checked on every read, covers the content. `buf`
/// is grown when too small, never refilled: allocated zeroed (fresh pages, left untouched), so
/// only the pages a frame reaches are ever faulted in, and repeated calls fault none.
pub fn encode_frame(plain: &[u8], buf: &mut Vec<u8>) -> usize {
    assert!(plain.len() <= MAX_FRAME_PLAIN, "one frame holds one block");
    let header = &FRAME_HEADERS[usize::from(plain.len() > PART_SIZE)];
    let at = header.len() + 4;
    let max = at + lz4_flex::block::get_maximum_output_size(plain.len()).max(plain.len()) + 4;
    if buf.len() < max {
        *buf = vec![0; max];
    }
    buf[..header.len()].copy_from_slice(header);
    if plain.is_empty() {
        buf[header.len()..at].copy_from_slice(&0u32.to_le_bytes());
        return at;
    }
    let compressed = lz4_flex::block::compress_into(plain, &mut buf[at..])
        .expect("the buffer has room for the maximum compressed size");
    let (size_word, len) = if compressed < plain.len() {
        (compressed as u32, compressed)
    } else {
        buf[at..at + plain.len()].copy_from_slice(plain);
        (plain.len() as u32 | UNCOMPRESSED_BLOCK, plain.len())
    };
    buf[header.len()..at].copy_from_slice(&size_word.to_le_bytes());
    buf[at + len..at + len + 4].copy_from_slice(&0u32.to_le_bytes());
    at + len + 4
}

/// Why a stored object could not be turned back into its plain bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a valid lz4 stream: {0}")]
    Lz4(std::io::Error),
    #[error("SHA-256 mismatch: expected {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    #[error("part {part} of {parts}: XXH3-128 mismatch")]
    PartChecksum { part: usize, parts: usize },
    #[error("malformed part index: {0}")]
    PartIndex(String),
    #[error("writing the plain bytes: {0}")]
    Write(std::io::Error),
}

/// Decompresses `compressed` into `out`, streaming, and checks the SHA-256 of what was written
/// against `expected`, and that of a [`PartIndex`] at its end (whose part hashes
/// [`decode_parts`] checks). Decoding and writing run on this thread while another hashes
/// the blocks already written (inputs under 256 KiB are done on this thread alone). Frames as
/// [`append_frame`] writes them are decoded straight into a pool of two block buffers, which
/// then go to the hashing thread, so each plain byte is written once by lz4 and never copied;
/// stored blocks are written and hashed where they lie in `compressed`. Any other lz4 frame
/// goes through lz4_flex's frame decoder and one copy. On error `out` may hold a prefix: write
/// to a temporary file.
///
/// # Errors
/// Corrupt lz4 data, a checksum mismatch, or a failing writer.
pub fn decompress_verified(
    compressed: &[u8],
    expected: Expected<'_>,
    out: &mut impl Write,
) -> Result<u64, DecodeError> {
    let compressed = match PartIndex::split(compressed) {
        None => compressed,
        Some(Err(e)) => return Err(DecodeError::PartIndex(e)),
        Some(Ok((frames, index))) => {
            check_sha256(index.sha256, expected)?;
            frames
        }
    };
    if compressed.len() < PIPELINE_MIN {
        let mut hasher = Sha256::new();
        let written = decode_frames(compressed, |block| {
            hasher.update(block);
            out.write_all(block).map_err(DecodeError::Write)
        })?;
        return check(hasher, expected).map(|()| written);
    }
    let (block_tx, block_rx) = std::sync::mpsc::sync_channel::<Block>(2);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        free_tx.send(Vec::new()).expect("receiver alive");
    }
    let (written, actual) = std::thread::scope(|s| {
        let hashing = s.spawn(move || {
            let mut hasher = Sha256::new();
            for block in block_rx {
                match block {
                    Block::Pooled(buf, n) => {
                        hasher.update(&buf[..n]);
                        let _ = free_tx.send(buf);
                    }
                    Block::Borrowed(b) => hasher.update(b),
                }
            }
            hasher
        });
        let mut written = 0u64;
        let mut rest = compressed;
        let decoded = loop {
            let Some((frame, tail)) = split_own_frame(rest) else {
                break decode_frames(rest, |plain| {
                    let mut buf = free_rx.recv().expect("the hashing thread returns buffers");
                    buf.clear();
                    buf.extend_from_slice(plain);
                    let n = buf.len();
                    emit(out, &block_tx, Block::Pooled(buf, n))
                })
                .map(|n| written + n);
            };
            rest = tail;
            let block = match frame {
                OwnFrame::Empty => continue,
                OwnFrame::Stored(plain) => Block::Borrowed(plain),
                OwnFrame::Compressed { block, max_plain } => {
                    let mut buf = free_rx.recv().expect("the hashing thread returns buffers");
                    if buf.len() < max_plain {
                        buf = vec![0; max_plain];
                    }
                    match lz4_flex::block::decompress_into(block, &mut buf) {
                        Ok(n) => Block::Pooled(buf, n),
                        Err(e) => break Err(invalid_lz4(e.to_string())),
                    }
                }
            };
            written += block.bytes().len() as u64;
            if let Err(e) = emit(out, &block_tx, block) {
                break Err(e);
            }
            if rest.is_empty() {
                break Ok(written);
            }
        };
        drop(block_tx);
        let actual = hashing.join().expect("hashing thread");
        (decoded, actual)
    });
    let written = written?;
    check(actual, expected).map(|()| written)
}

/// Decodes an object that ends with a [`PartIndex`] on every core and hands each part to
/// `write_at(offset, plain)`, from any thread and in any order, once its XXH3-128 matches the
/// index's. The index's SHA-256 must give `expected` (the content id in the object's key), so an
/// object stored under another file's key is refused. `Ok(None)` for an object without a part
/// index, which only [`decompress_verified`] can check. On error some parts may have been
/// written: write to a temporary file.
///
/// Checking the parts instead of the whole file's SHA-256 is what lets a restore run on more
/// than one core (one SHA-256 cannot be split): a 128-bit hash of each MiB catches any
/// corruption in storage or transit as surely, and the index is bound to the key by its
/// SHA-256.
///
/// # Errors
/// A malformed index, frames other than those [`compress_into`] writes, corrupt lz4 data, a
/// part of the wrong length or hash, a SHA-256 other than expected, a failing `write_at`.
pub fn decode_parts(
    compressed: &[u8],
    expected: Expected<'_>,
    write_at: &(dyn Fn(u64, &[u8]) -> std::io::Result<()> + Sync),
) -> Result<Option<u64>, DecodeError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let (mut rest, index) = match PartIndex::split(compressed) {
        None => return Ok(None),
        Some(Err(e)) => return Err(DecodeError::PartIndex(e)),
        Some(Ok(split)) => split,
    };
    check_sha256(index.sha256, expected)?;
    let mut frames = Vec::with_capacity(index.parts.len());
    while !rest.is_empty() {
        let (frame, tail) = split_own_frame(rest).ok_or_else(|| {
            invalid_lz4("a frame pgpitr does not write, before a part index".into())
        })?;
        frames.push(frame);
        rest = tail;
    }
    if frames.len() != index.parts.len() {
        return Err(DecodeError::PartIndex(format!(
            "{} parts, {} frames",
            index.parts.len(),
            frames.len()
        )));
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let decode = || -> Result<(), DecodeError> {
        let mut buf = Vec::new();
        while !failed.load(Relaxed) {
            let i = next.fetch_add(1, Relaxed);
            let Some(frame) = frames.get(i) else {
                return Ok(());
            };
            let plain = match *frame {
                OwnFrame::Empty => &[][..],
                OwnFrame::Stored(block) => block,
                OwnFrame::Compressed { block, max_plain } => {
                    if buf.len() < max_plain {
                        buf = vec![0; max_plain];
                    }
                    let n = lz4_flex::block::decompress_into(block, &mut buf)
                        .map_err(|e| invalid_lz4(e.to_string()))?;
                    &buf[..n]
                }
            };
            let parts = index.parts.len();
            if plain.len() != index.part_len(i) || PartIndex::hash(plain) != index.parts[i] {
                return Err(DecodeError::PartChecksum { part: i, parts });
            }
            write_at(i as u64 * u64::from(index.part_size), plain).map_err(DecodeError::Write)?;
        }
        Ok(())
    };
    let stop_on_error = || {
        let result = decode();
        if result.is_err() {
            failed.store(true, Relaxed);
        }
        result
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(frames.len());
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(stop_on_error)).collect();
        let mut result = stop_on_error();
        for h in helpers {
            let other = h.join().expect("decoding thread");
            result = result.and(other);
        }
        result
    })?;
    Ok(Some(index.plain_len))
}

/// Writes `block` to `out`, then hands it to the hashing thread.
fn emit<'a>(
    out: &mut impl Write,
    hashing: &std::sync::mpsc::SyncSender<Block<'a>>,
    block: Block<'a>,
) -> Result<(), DecodeError> {
    out.write_all(block.bytes()).map_err(DecodeError::Write)?;
    hashing.send(block).expect("the hashing thread runs");
    Ok(())
}

/// Plain bytes on their way to the hashing thread of [`decompress_verified`].
enum Block<'a> {
    /// A pool buffer holding that many plain bytes.
    Pooled(Vec<u8>, usize),
    /// A stored block, in the compressed input.
    Borrowed(&'a [u8]),
}

impl Block<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Block::Pooled(buf, n) => &buf[..*n],
            Block::Borrowed(b) => b,
        }
    }
}

fn invalid_lz4(message: String) -> DecodeError {
    DecodeError::Lz4(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        message,
    ))
}

/// Decodes `compressed` (lz4 frames holding exactly `out.len()` plain bytes) into `out` and
/// checks their SHA-256 against `expected_sha256_hex`. A frame as [`append_frame`] writes it
/// (one block) is decoded straight into `out`, with no buffer of its own; anything else goes
/// through lz4_flex's frame decoder. For base backup chunks, which a restore decodes into
/// reused, aligned buffers.
///
/// # Errors
/// Corrupt lz4 data, a plain length other than `out.len()`, a checksum mismatch.
pub fn decode_chunk_verified(
    compressed: &[u8],
    expected_sha256_hex: &str,
    out: &mut [u8],
) -> Result<(), DecodeError> {
    let invalid = invalid_lz4;
    let n = match split_own_frame(compressed) {
        Some((OwnFrame::Empty, [])) => 0,
        Some((OwnFrame::Stored(block), [])) => {
            let dst = out
                .get_mut(..block.len())
                .ok_or_else(|| invalid("more plain bytes than expected".into()))?;
            dst.copy_from_slice(block);
            block.len()
        }
        Some((OwnFrame::Compressed { block, .. }, [])) => {
            lz4_flex::block::decompress_into(block, out).map_err(|e| invalid(e.to_string()))?
        }
        _ => {
            let mut at = 0;
            decode_frames(compressed, |block| {
                let dst = out
                    .get_mut(at..at + block.len())
                    .ok_or_else(|| invalid("more plain bytes than expected".into()))?;
                dst.copy_from_slice(block);
                at += block.len();
                Ok(())
            })?;
            at
        }
    };
    if n != out.len() {
        return Err(invalid(format!("{n} plain bytes, expected {}", out.len())));
    }
    check(
        Sha256::new_with_prefix(&out[..]),
        Expected::sha256(expected_sha256_hex),
    )
}

/// One frame as [`append_frame`] writes it.
#[derive(Clone, Copy)]
enum OwnFrame<'a> {
    /// No block: empty input.
    Empty,
    /// A block stored as plain bytes.
    Stored(&'a [u8]),
    /// An lz4 block of at most `max_plain` plain bytes (the header's block size).
    Compressed { block: &'a [u8], max_plain: usize },
}

/// The first frame of `data` and what follows it, if that frame is laid out as
/// [`append_frame`] writes it: a header of ours, at most one block, the end mark. `None` for
/// any other frame (lz4 checksums, linked blocks, several blocks, a truncated one).
fn split_own_frame(data: &[u8]) -> Option<(OwnFrame<'_>, &[u8])> {
    let i = FRAME_HEADERS
        .iter()
        .position(|h| data.starts_with(&h[..]))?;
    let max_plain = if i == 0 { PART_SIZE } else { MAX_FRAME_PLAIN };
    let rest = &data[FRAME_HEADERS[i].len()..];
    let word = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    if word == 0 {
        return Some((OwnFrame::Empty, &rest[4..]));
    }
    let len = (word & !UNCOMPRESSED_BLOCK) as usize;
    let block = rest.get(4..4 + len)?;
    if len > max_plain || rest.get(4 + len..8 + len)? != [0; 4] {
        return None;
    }
    let frame = if word & UNCOMPRESSED_BLOCK != 0 {
        OwnFrame::Stored(block)
    } else {
        OwnFrame::Compressed { block, max_plain }
    };
    Some((frame, &rest[8 + len..]))
}

/// Checks `hasher`'s digest against `expected` (see [`check_sha256`]).
fn check(hasher: Sha256, expected: Expected<'_>) -> Result<(), DecodeError> {
    check_sha256(hasher.finalize().into(), expected)
}

/// The content id an object's key holds, and how ids are made from SHA-256 digests: what a
/// decoded object is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub ids: &'a ContentIds,
    /// The id from the key (64 lowercase hex digits).
    pub id: &'a str,
}

impl<'a> Expected<'a> {
    /// A plain SHA-256 in hex (chunks, whose hashes are kept in manifests, and tests).
    pub fn sha256(hex: &'a str) -> Expected<'a> {
        Expected {
            ids: &ContentIds::Sha256,
            id: hex,
        }
    }
}

/// Checks a SHA-256 against the one an object's key holds: the digest of its plain bytes, or
/// the one its [`PartIndex`] carries (which ties the index to the key).
fn check_sha256(actual: [u8; 32], expected: Expected<'_>) -> Result<(), DecodeError> {
    let actual = expected.ids.id(&actual);
    if actual != expected.id {
        return Err(DecodeError::Checksum {
            expected: expected.id.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Hands every decoded block of the concatenated frames in `compressed` to `each`, in order;
/// returns the plain length. One decoder serves all the frames, so that its buffers are
/// allocated once: it reads the next frame's header when the previous frame has ended.
fn decode_frames(
    compressed: &[u8],
    mut each: impl FnMut(&[u8]) -> Result<(), DecodeError>,
) -> Result<u64, DecodeError> {
    let mut total = 0u64;
    let mut dec = lz4_flex::frame::FrameDecoder::new(compressed);
    while !dec.get_ref().is_empty() {
        let unread = dec.get_ref().len();
        loop {
            let block = dec.fill_buf().map_err(DecodeError::Lz4)?;
            if block.is_empty() {
                break;
            }
            each(block)?;
            let n = block.len();
            total += n as u64;
            dec.consume(n);
        }
        if dec.get_ref().len() == unread {
            // A frame that ends without reading anything: trailing garbage.
            return Err(DecodeError::Lz4(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "trailing bytes that are not an lz4 frame",
            )));
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// An object as [`compress_into`] writes it: its frames, its part index, and the SHA-256
    /// of `plain`.
    struct Compressed {
        frames: Vec<Vec<u8>>,
        index: Vec<u8>,
        sha256: [u8; 32],
    }

    impl Compressed {
        fn sha256_hex(&self) -> String {
            hex::encode(self.sha256)
        }

        /// The whole object.
        fn to_bytes(&self) -> Vec<u8> {
            [self.frames.concat(), self.index.clone()].concat()
        }

        fn len(&self) -> usize {
            self.to_bytes().len()
        }
    }

    fn compress(plain: &[u8]) -> Compressed {
        /// Keeps each write as one frame.
        struct Frames(Vec<Vec<u8>>);
        impl Write for Frames {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut frames = Frames(Vec::new());
        let digest = compress_into(plain, &mut frames, &mut |_| {}, &|_| {}).unwrap();
        let index = frames.0.pop().expect("the part index is written last");
        Compressed {
            frames: frames.0,
            index,
            sha256: digest.sha256,
        }
    }

    /// `len` bytes of a xorshift64 sequence from `seed`: incompressible.
    fn xorshift(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Random bytes with every third one zero: compressible, but not trivially.
    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut bytes = xorshift(0x9E37_79B9_7F4A_7C15, len);
        bytes.iter_mut().step_by(3).for_each(|b| *b = 0);
        bytes
    }

    #[test]
    fn chunks_decode_in_place_from_our_frames_and_from_any_other() {
        for len in [0, 1, 5000, MAX_FRAME_PLAIN] {
            let plain = pseudo_random(len);
            let sha = hex::encode(Sha256::digest(&plain));
            let mut ours = Vec::new();
            append_frame(&plain, &mut Vec::new(), &mut ours);
            let incompressible = xorshift(0x2545_F491_4F6C_DD1D, len);
            let standard = {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                e.write_all(&plain).unwrap();
                e.finish().unwrap()
            };
            for frame in [&ours, &standard] {
                let mut out = vec![0u8; len];
                decode_chunk_verified(frame, &sha, &mut out).unwrap();
                assert!(out == plain);
                let mut short = vec![0u8; len + 1];
                assert!(decode_chunk_verified(frame, &sha, &mut short).is_err());
                if len > 0 {
                    let mut long = vec![0u8; len - 1];
                    assert!(decode_chunk_verified(frame, &sha, &mut long).is_err());
                }
            }
            let mut stored = Vec::new();
            append_frame(&incompressible, &mut Vec::new(), &mut stored);
            let mut out = vec![0u8; len];
            let sha2 = hex::encode(Sha256::digest(&incompressible));
            decode_chunk_verified(&stored, &sha2, &mut out).unwrap();
            assert!(out == incompressible);
            if len > 0 {
                assert_eq!(stored.len(), 7 + 4 + len + 4, "stored plain");
                assert!(matches!(
                    decode_chunk_verified(&stored, &sha, &mut out),
                    Err(DecodeError::Checksum { .. })
                ));
            }
        }
    }

    #[test]
    fn round_trips_multi_part_inputs_and_empty_ones() {
        for len in [0, 1, PART_SIZE - 1, PART_SIZE, 3 * PART_SIZE + 17] {
            let plain = pseudo_random(len);
            let c = compress(&plain);
            assert_eq!(c.sha256_hex(), hex::encode(Sha256::digest(&plain)));
            let mut out = Vec::new();
            assert_eq!(
                decompress_verified(&c.to_bytes(), Expected::sha256(&c.sha256_hex()), &mut out)
                    .unwrap(),
                len as u64
            );
            assert!(out == plain, "round trip of {len} bytes");
        }
    }

    #[test]
    fn frames_are_standard_lz4_with_stored_blocks_for_incompressible_parts() {
        for (header, bd) in FRAME_HEADERS.iter().zip([6 << 4, 7 << 4]) {
            // FLG: version 01, independent blocks, no checksums, no content size, no dictionary.
            assert_eq!(header[4], 0b0110_0000);
            // BD: blocks of at most 1 MiB, 4 MiB.
            assert_eq!(header[5], bd);
        }
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..PART_SIZE + 5)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let c = compress(&noise);
        assert_eq!(c.frames.len(), 2);
        let size_word = u32::from_le_bytes(c.frames[0][7..11].try_into().unwrap());
        assert_eq!(size_word, PART_SIZE as u32 | UNCOMPRESSED_BLOCK);
        // lz4_flex's own frame decoder reads the frames back, one after the other (it does not
        // skip the part index's skippable frame, as `lz4 -d` does).
        let (stored, mut plain) = (c.frames.concat(), Vec::new());
        let mut rest = &stored[..];
        while !rest.is_empty() {
            lz4_flex::frame::FrameDecoder::new(&mut rest)
                .read_to_end(&mut plain)
                .unwrap();
        }
        assert!(plain == noise);
    }

    #[test]
    fn whole_objects_decode_from_our_frames_stored_blocks_and_any_other_frames() {
        let compressible = pseudo_random(PART_SIZE);
        let incompressible = xorshift(0x9E37_79B9_7F4A_7C15, PART_SIZE);
        let standard = |plain: &[u8]| {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        };
        let ours = |plain: &[u8]| {
            let mut out = Vec::new();
            append_frame(plain, &mut Vec::new(), &mut out);
            out
        };
        // (plain parts, how each is framed): ours compressed, ours stored, an empty frame of
        // ours, lz4_flex's own frames (linked blocks, content checksum), and a mix where the
        // standard frames come after ours.
        let cases: Vec<Vec<(&[u8], bool)>> = vec![
            vec![
                (&compressible, true),
                (&incompressible, true),
                (&compressible, true),
            ],
            vec![
                (&incompressible, true),
                (b"", true),
                (&compressible[..1000], true),
            ],
            vec![(&compressible, false), (&incompressible, false)],
            vec![
                (&compressible, true),
                (&incompressible, false),
                (&compressible, false),
            ],
        ];
        for parts in cases {
            let (mut plain, mut object) = (Vec::new(), Vec::new());
            for (part, own) in &parts {
                plain.extend_from_slice(part);
                object.extend(if *own { ours(part) } else { standard(part) });
            }
            let sha = hex::encode(Sha256::digest(&plain));
            let mut out = Vec::new();
            let n = decompress_verified(&object, Expected::sha256(&sha), &mut out).unwrap();
            assert_eq!(n, plain.len() as u64);
            assert!(out == plain);
            let wrong = hex::encode(Sha256::digest(b"other"));
            assert!(matches!(
                decompress_verified(&object, Expected::sha256(&wrong), &mut Vec::new()),
                Err(DecodeError::Checksum { .. })
            ));
        }
    }

    #[test]
    fn frames_are_written_in_order_and_every_part_is_released() {
        for len in [0, 1, PART_SIZE, 5 * PART_SIZE + 123] {
            let plain = pseudo_random(len);
            let mut object = Vec::new();
            let mut seen = Vec::new();
            let released =
                std::sync::Mutex::new(vec![0u32; plain.len().div_ceil(PART_SIZE).max(1)]);
            let digest = compress_into(
                &plain,
                &mut object,
                &mut |part| seen.extend_from_slice(part),
                &|r| {
                    assert_eq!(r.start % PART_SIZE, 0);
                    assert_eq!(r.end, (r.start + PART_SIZE).min(len));
                    released.lock().unwrap()[r.start / PART_SIZE] += 1;
                },
            )
            .unwrap();
            // One frame per part, in order, as a single thread encodes them, then the index.
            let mut expected = Vec::new();
            let mut parts: Vec<&[u8]> = plain.chunks(PART_SIZE).collect();
            if plain.is_empty() {
                parts.push(&[]);
            }
            for part in &parts {
                append_frame(part, &mut Vec::new(), &mut expected);
            }
            let index = PartIndex {
                plain_len: len as u64,
                part_size: PART_SIZE as u32,
                sha256: Sha256::digest(&plain).into(),
                parts: parts.iter().map(|p| PartIndex::hash(p)).collect(),
            };
            expected.extend_from_slice(&index.encode());
            assert!(object == expected, "{len} bytes");
            assert!(seen == plain);
            assert!(released.into_inner().unwrap().iter().all(|&n| n >= 1));
            assert_eq!(digest.sha256, <[u8; 32]>::from(Sha256::digest(&plain)));
            assert_eq!(
                (digest.plain_len, digest.stored_len),
                (len as u64, object.len() as u64)
            );
        }
    }

    /// `decode_parts` of `object` into a buffer (also used by `proptests`).
    pub(super) fn decode_parts_to_vec(
        object: &[u8],
        sha: &str,
    ) -> Result<Option<Vec<u8>>, DecodeError> {
        let out = std::sync::Mutex::new(Vec::new());
        let n = decode_parts(object, Expected::sha256(sha), &|offset, plain| {
            let mut out = out.lock().unwrap();
            let end = offset as usize + plain.len();
            if out.len() < end {
                out.resize(end, 0);
            }
            out[offset as usize..end].copy_from_slice(plain);
            Ok(())
        })?;
        let out = out.into_inner().unwrap();
        Ok(n.map(|n| {
            assert_eq!(n, out.len() as u64);
            out
        }))
    }

    #[test]
    fn parts_decode_on_every_core_and_each_is_checked() {
        let mut mixed = pseudo_random(3 * PART_SIZE + 77);
        mixed[PART_SIZE..2 * PART_SIZE].copy_from_slice(&xorshift(5, PART_SIZE));
        for plain in [vec![], vec![1], pseudo_random(PART_SIZE), mixed] {
            let c = compress(&plain);
            let object = c.to_bytes();
            let back = decode_parts_to_vec(&object, &c.sha256_hex()).unwrap();
            assert!(back.unwrap() == plain, "{} bytes", plain.len());
            // Objects from before the part index are left to decompress_verified.
            let frames = c.frames.concat();
            assert!(decode_parts_to_vec(&frames, &c.sha256_hex())
                .unwrap()
                .is_none());
        }

        let plain = pseudo_random(3 * PART_SIZE + 77);
        let c = compress(&plain);
        let (object, sha) = (c.to_bytes(), c.sha256_hex());
        let frames_len = c.frames.concat().len();
        // A damaged byte in a part, in a part hash of the index, a lost part.
        let mut damaged = object.clone();
        damaged[frames_len / 2] ^= 0x10;
        assert!(decode_parts_to_vec(&damaged, &sha).is_err());
        let mut damaged = object.clone();
        damaged[frames_len + 60] ^= 0x01;
        assert!(matches!(
            decode_parts_to_vec(&damaged, &sha),
            Err(DecodeError::PartChecksum { part: 0, parts: 4 })
        ));
        let lost = [&c.frames[0][..], &c.frames[2], &c.frames[3], &c.index].concat();
        assert!(matches!(
            decode_parts_to_vec(&lost, &sha),
            Err(DecodeError::PartIndex(_))
        ));
        // A sound object of other bytes, stored under this file's key: refused by both readers.
        let other = compress(&pseudo_random(PART_SIZE + 1)).to_bytes();
        assert!(matches!(
            decode_parts_to_vec(&other, &sha),
            Err(DecodeError::Checksum { .. })
        ));
        assert!(matches!(
            decompress_verified(&other, Expected::sha256(&sha), &mut Vec::new()),
            Err(DecodeError::Checksum { .. })
        ));
        // A frame of another writer before the index.
        let mut foreign = lz4_flex::frame::FrameEncoder::new(Vec::new());
        foreign.write_all(&plain).unwrap();
        let foreign = [foreign.finish().unwrap(), c.index.clone()].concat();
        assert!(decode_parts_to_vec(&foreign, &sha).is_err());
        // A failing writer.
        let err = decode_parts(&object, Expected::sha256(&sha), &|_, _| {
            Err(std::io::Error::other("full"))
        });
        assert!(matches!(err, Err(DecodeError::Write(_))));
    }

    #[test]
    fn a_failing_output_stops_the_compression() {
        /// Takes `left` writes, then fails.
        struct FailAfter {
            left: usize,
            calls: usize,
        }
        impl Write for FailAfter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.calls += 1;
                if self.left == 0 {
                    return Err(std::io::Error::other("disk full"));
                }
                self.left -= 1;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let plain = pseudo_random(8 * PART_SIZE);
        let mut out = FailAfter { left: 2, calls: 0 };
        let err = compress_into(&plain, &mut out, &mut |_| {}, &|_| {}).unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(out.calls, 3, "nothing is written after the failure");
    }

    #[test]
    fn detects_corruption_and_wrong_checksum() {
        let plain = pseudo_random(PART_SIZE + 1000);
        let c = compress(&plain);
        let err = decompress_verified(
            &c.to_bytes(),
            Expected::sha256(&"00".repeat(32)),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Checksum { .. }));
        let mut flipped = c.to_bytes().to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(
            decompress_verified(&flipped, Expected::sha256(&c.sha256_hex()), &mut Vec::new())
                .is_err()
        );
        assert!(decompress_verified(
            // Into the last block (a lost end mark alone loses no data: the SHA-256 matches).
            &c.to_bytes()[..c.len() - 5],
            Expected::sha256(&c.sha256_hex()),
            &mut Vec::new()
        )
        .is_err());
    }
}

/// Hostile stored objects: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::tests::decode_parts_to_vec;
    use super::*;
    use proptest::prelude::*;

    /// Plain bytes with runs (compressible) and noise (stored blocks).
    fn plain() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                (any::<u8>(), 0usize..3000).prop_map(|(b, n)| vec![b; n]),
                proptest::collection::vec(any::<u8>(), 0..3000),
            ],
            0..6,
        )
        .prop_map(|runs| runs.concat())
    }

    fn sha256_hex(plain: &[u8]) -> String {
        hex::encode(Sha256::digest(plain))
    }

    /// An object as the archiver stores it: frames, then its part index.
    fn object_of(plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        compress_into(plain, &mut out, &mut |_| {}, &|_| {}).unwrap();
        out
    }

    fn decompress(object: &[u8], sha: &str) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        decompress_verified(object, Expected::sha256(sha), &mut out).map(|n| {
            assert_eq!(n, out.len() as u64);
            out
        })
    }

    /// A standard lz4 frame header (magic, then arbitrary FLG / BD / descriptor bytes) and
    /// arbitrary bytes: what lz4_flex's frame decoder is given for frames pgpitr does not write.
    fn hostile_lz4() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u8>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..16),
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(flg, bd, descriptor, rest)| {
                let mut b = 0x184D_2204u32.to_le_bytes().to_vec();
                b.push(flg);
                b.push(bd);
                b.extend_from_slice(&descriptor);
                b.extend_from_slice(&rest);
                b
            })
    }

    /// Our own frame header, then arbitrary block size words and bytes.
    fn hostile_own_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            0usize..2,
            prop_oneof![
                any::<u32>(),
                0u32..600,
                (0u32..600).prop_map(|n| n | UNCOMPRESSED_BLOCK)
            ],
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(header, word, rest)| {
                let mut b = FRAME_HEADERS[header].to_vec();
                b.extend_from_slice(&word.to_le_bytes());
                b.extend_from_slice(&rest);
                b
            })
    }

    fn hostile() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            hostile_lz4(),
            hostile_own_frame(),
            proptest::collection::vec(hostile_own_frame(), 1..4).prop_map(|f| f.concat()),
        ]
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn every_object_round_trips_both_ways(plain in plain()) {
            let object = object_of(&plain);
            let sha = sha256_hex(&plain);
            prop_assert!(decompress(&object, &sha).unwrap() == plain);
            prop_assert!(decode_parts_to_vec(&object, &sha).unwrap().unwrap() == plain);
        }

        #[test]
        fn every_chunk_frame_round_trips(plain in plain()) {
            let mut frame = Vec::new();
            append_frame(&plain, &mut Vec::new(), &mut frame);
            let mut out = vec![0u8; plain.len()];
            decode_chunk_verified(&frame, &sha256_hex(&plain), &mut out).unwrap();
            prop_assert!(out == plain);
        }

        #[test]
        fn hostile_bytes_give_a_typed_error(
            bytes in hostile(),
            out_len in 0usize..5000,
            with_index in any::<bool>(),
        ) {
            let mut object = bytes;
            if with_index {
                let len = object.len() as u64;
                let index = PartIndex {
                    plain_len: len,
                    part_size: 1 << 20,
                    sha256: Sha256::digest(b"anything").into(),
                    parts: vec![0; PartIndex::part_count(len, 1 << 20)],
                };
                object.extend_from_slice(&index.encode());
            }
            let sha = sha256_hex(b"anything");
            prop_assert!(decompress(&object, &sha).is_err());
            prop_assert!(!matches!(decode_parts_to_vec(&object, &sha), Ok(Some(_))));
            let mut out = vec![0u8; out_len];
            prop_assert!(decode_chunk_verified(&object, &sha, &mut out).is_err());
        }

        #[test]
        fn mutated_objects_decode_exactly_or_give_a_typed_error(
            plain in plain(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let sha = sha256_hex(&plain);
            let mut object = object_of(&plain);
            for (at, b) in edits {
                let at = at.index(object.len());
                object[at] = b;
            }
            if cut.index(4) == 0 {
                object.truncate(cut.index(object.len()));
            }
            if let Ok(got) = decompress(&object, &sha) {
                prop_assert!(got == plain);
            }
            if let Ok(Some(got)) = decode_parts_to_vec(&object, &sha) {
                prop_assert!(got == plain);
            }
            let mut out = vec![0u8; plain.len()];
            if decode_chunk_verified(&object, &sha, &mut out).is_ok() {
                prop_assert!(out == plain);
            }
        }
    }
}
