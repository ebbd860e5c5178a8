//! The envelope of every stored file: lz4 frames (the standard frame format, so `lz4 -d` reads
//! it) with the SHA-256 of the plain bytes kept beside it. Large inputs are cut into parts that are
//! compressed in parallel, each as its own frame; concatenated frames are valid lz4.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

/// Inputs are cut into parts of this size for parallel compression.
const PART_SIZE: usize = 4 * 1024 * 1024;
/// Streaming buffer for decompression.
const READ_BUF: usize = 256 * 1024;

/// The compressed form of some plain bytes.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub data: Vec<u8>,
    pub sha256: [u8; 32],
    pub plain_len: u64,
}

impl Compressed {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Compresses and hashes `plain`, using every core for inputs above one part: one thread hashes
/// while the others compress.
pub fn compress(plain: &[u8]) -> Compressed {
    let parts: Vec<&[u8]> = if plain.is_empty() {
        vec![plain]
    } else {
        plain.chunks(PART_SIZE).collect()
    };
    let (sha256, frames) = std::thread::scope(|s| {
        let hasher = s.spawn(|| Sha256::digest(plain).into());
        let frames: Vec<Vec<u8>> = if parts.len() == 1 {
            vec![compress_frame(parts[0])]
        } else {
            let handles: Vec<_> = parts
                .iter()
                .map(|p| s.spawn(move || compress_frame(p)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("compression thread"))
                .collect()
        };
        (hasher.join().expect("hash thread"), frames)
    });
    let mut data = Vec::with_capacity(frames.iter().map(Vec::len).sum());
    for f in frames {
        data.extend_from_slice(&f);
    }
    Compressed {
        data,
        sha256,
        plain_len: plain.len() as u64,
    }
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
                decompress_verified(&c.data, &c.sha256_hex(), &mut out).unwrap(),
                len as u64
            );
            assert!(out == plain, "round trip of {len} bytes");
        }
    }

    #[test]
    fn detects_corruption_and_wrong_checksum() {
        let plain = pseudo_random(PART_SIZE + 1000);
        let c = compress(&plain);
        let err = decompress_verified(&c.data, &"00".repeat(32), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DecodeError::Checksum { .. }));
        let mut flipped = c.data.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(decompress_verified(&flipped, &c.sha256_hex(), &mut Vec::new()).is_err());
        assert!(decompress_verified(
            &c.data[..c.data.len() - 3],
            &c.sha256_hex(),
            &mut Vec::new()
        )
        .is_err());
    }
}
