//! The envelope of every stored file: lz4 frames (the standard frame format, so `lz4 -d` reads
//! it) with the SHA-256 of the plain bytes kept beside it. Large inputs are cut into parts that are
//! compressed in parallel, each as its own frame; concatenated frames are valid lz4.

use std::io::{Read, Write};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Inputs are cut into parts of this size, each compressed as its own frame: small enough that
/// the parts in flight stay a few MiB, large enough that the frame overhead is negligible.
const PART_SIZE: usize = 1024 * 1024;
/// Streaming buffer for decompression.
const READ_BUF: usize = 256 * 1024;

/// The compressed form of some plain bytes: the frames in order (their concatenation is the
/// stored object) and the SHA-256 of the plain bytes.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub frames: Vec<Bytes>,
    pub sha256: [u8; 32],
    pub plain_len: u64,
}

impl Compressed {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Compressed size in bytes.
    pub fn len(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored object as one buffer (a copy; prefer handing `frames` to storage).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.len());
        for f in &self.frames {
            out.extend_from_slice(f);
        }
        Bytes::from(out)
    }
}

/// Compresses and hashes `plain` (see [`compress_reader`]).
pub fn compress(plain: &[u8]) -> Compressed {
    compress_reader(plain).expect("reading from a slice cannot fail")
}

/// Reads `input` to its end in parts of 1 MiB, hashing each part on this thread while worker
/// threads (one per core, at most 4) compress earlier parts. Memory stays bounded: at most two
/// parts per worker are in flight, plus the compressed output.
///
/// # Errors
/// A failing read.
pub fn compress_reader(mut input: impl Read) -> std::io::Result<Compressed> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(workers);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, Bytes)>();
    let mut hasher = Sha256::new();
    let mut plain_len = 0u64;
    let mut parts = 0usize;
    std::thread::scope(|s| -> std::io::Result<()> {
        for _ in 0..workers {
            let (job_rx, done_tx) = (&job_rx, done_tx.clone());
            s.spawn(move || loop {
                let job = job_rx.lock().expect("job queue").recv();
                let Ok((index, part)) = job else { break };
                let _ = done_tx.send((index, Bytes::from(compress_frame(&part))));
            });
        }
        let result = (|| loop {
            let part = read_part(&mut input)?;
            if part.is_empty() && parts > 0 {
                return Ok(());
            }
            hasher.update(&part);
            plain_len += part.len() as u64;
            let last = part.len() < PART_SIZE;
            job_tx.send((parts, part)).expect("workers alive");
            parts += 1;
            if last {
                return Ok(());
            }
        })();
        drop(job_tx);
        result
    })?;
    drop(done_tx);
    let mut frames: Vec<Option<Bytes>> = vec![None; parts];
    for (index, frame) in done_rx {
        frames[index] = Some(frame);
    }
    let frames = frames
        .into_iter()
        .map(|f| f.expect("every part compressed"))
        .collect();
    Ok(Compressed {
        frames,
        sha256: hasher.finalize().into(),
        plain_len,
    })
}

/// Reads up to one part, fewer bytes only at the end of the input.
fn read_part(input: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut part = Vec::with_capacity(PART_SIZE);
    input.take(PART_SIZE as u64).read_to_end(&mut part)?;
    Ok(part)
}

fn compress_frame(part: &[u8]) -> Vec<u8> {
    let info = lz4_flex::frame::FrameInfo::new()
        .block_size(lz4_flex::frame::BlockSize::Max4MB)
        .content_checksum(true);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(
        info,
        Vec::with_capacity(part.len() / 2 + 64),
    );
    enc.write_all(part).expect("writing to a Vec");
    enc.finish().expect("writing to a Vec")
}

/// Why a stored object could not be turned back into its plain bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a valid lz4 stream: {0}")]
    Lz4(std::io::Error),
    #[error("SHA-256 mismatch: expected {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    #[error("writing the plain bytes: {0}")]
    Write(std::io::Error),
}

/// Decompresses `compressed` into `out`, streaming, and checks the SHA-256 of what was written
/// against `expected_sha256_hex`. On error `out` may hold a prefix: write to a temporary file.
///
/// # Errors
/// Corrupt lz4 data, a checksum mismatch, or a failing writer.
pub fn decompress_verified(
    compressed: &[u8],
    expected_sha256_hex: &str,
    out: &mut impl Write,
) -> Result<u64, DecodeError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut total = 0u64;
    // FrameDecoder ends at the end of one frame; start a new one on the bytes that follow.
    let mut rest: &[u8] = compressed;
    while !rest.is_empty() {
        let mut dec = lz4_flex::frame::FrameDecoder::new(&mut rest);
        loop {
            let n = dec.read(&mut buf).map_err(DecodeError::Lz4)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(DecodeError::Write)?;
            total += n as u64;
        }
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected_sha256_hex {
        return Err(DecodeError::Checksum {
            expected: expected_sha256_hex.to_string(),
            actual,
        });
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    0
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trips_multi_part_inputs_and_empty_ones() {
        for len in [0, 1, PART_SIZE - 1, PART_SIZE, 3 * PART_SIZE + 17] {
            let plain = pseudo_random(len);
            let c = compress(&plain);
            assert_eq!(c.sha256_hex(), hex::encode(Sha256::digest(&plain)));
            let mut out = Vec::new();
            assert_eq!(
                decompress_verified(&c.to_bytes(), &c.sha256_hex(), &mut out).unwrap(),
                len as u64
            );
            assert!(out == plain, "round trip of {len} bytes");
        }
    }

    #[test]
    fn detects_corruption_and_wrong_checksum() {
        let plain = pseudo_random(PART_SIZE + 1000);
        let c = compress(&plain);
        let err =
            decompress_verified(&c.to_bytes(), &"00".repeat(32), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DecodeError::Checksum { .. }));
        let mut flipped = c.to_bytes().to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(decompress_verified(&flipped, &c.sha256_hex(), &mut Vec::new()).is_err());
        assert!(decompress_verified(
            &c.to_bytes()[..c.len() - 3],
            &c.sha256_hex(),
            &mut Vec::new()
        )
        .is_err());
    }
}
