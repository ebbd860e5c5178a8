//! The sealed form of every object of an encrypted repository: XChaCha20-Poly1305 in the STREAM
//! construction (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
//! Nonce-Reuse Misuse-Resistance", 2015; `aead::stream::StreamBE32`), in segments of 64 KiB so
//! that any byte range can be read and authenticated on its own.
//!
//! ```text
//! offset 0   magic "PGPITRE" and format byte 1                    8 bytes
//! offset 8   nonce prefix, random per object                      19 bytes
//! offset 27  segment 0: ciphertext (64 KiB) + Poly1305 tag         65,552 bytes
//!            …
//!            last segment: ciphertext (0..=64 KiB) + tag, sealed with STREAM's last-segment flag
//! ```
//!
//! Segment `i`'s nonce is the prefix, `i` as 32-bit big-endian and the last-segment flag; its
//! associated data is the object's key, so an object moved to another key, reordered, cut
//! short or extended fails authentication. An empty object is one empty last segment.

use std::ops::Range;

use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::aead::Buffer;
use chacha20poly1305::XChaCha20Poly1305;

use super::keys::DataKey;

/// Magic and format version at the start of every sealed object.
pub const MAGIC: &[u8; 8] = b"PGPITRE\x01";
/// Bytes of the random nonce prefix (XChaCha20's 24-byte nonce less STREAM's 5).
pub const NONCE_PREFIX_LEN: usize = 19;
/// Bytes before the first segment.
pub const HEADER_LEN: usize = MAGIC.len() + NONCE_PREFIX_LEN;
/// Plain bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
/// Poly1305 tag after each segment.
pub const TAG: usize = 16;
/// Objects from this size on are sealed and opened on two threads.
const PARALLEL_MIN: usize = 1024 * 1024;

/// Why a sealed object could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not an encrypted object (no pgpitr encryption header)")]
    NotSealed,
    #[error("truncated: {0} bytes cannot be a sealed object")]
    BadLength(u64),
    #[error("authentication failed at segment {0}: the object was altered, moved, or sealed with another key")]
    Authentication(u64),
}

/// Segments of an object of `plain_len` bytes: at least one.
pub fn segments(plain_len: u64) -> u64 {
    plain_len.div_ceil(SEGMENT as u64).max(1)
}

/// Stored size of an object of `plain_len` plain bytes.
pub fn sealed_len(plain_len: u64) -> u64 {
    HEADER_LEN as u64 + plain_len + TAG as u64 * segments(plain_len)
}

/// Plain size of a sealed object of `sealed_len` stored bytes; `None` when no plain size seals
/// to it.
pub fn plain_len(stored: u64) -> Option<u64> {
    let body = stored.checked_sub(HEADER_LEN as u64)?;
    let n = body.div_ceil((SEGMENT + TAG) as u64).max(1);
    let plain = body.checked_sub(TAG as u64 * n)?;
    (sealed_len(plain) == stored).then_some(plain)
}

/// A fresh random nonce prefix.
pub fn random_prefix() -> [u8; NONCE_PREFIX_LEN] {
    let mut p = [0u8; NONCE_PREFIX_LEN];
    getrandom::getrandom(&mut p).expect("the operating system's random source");
    p
}

/// Seals the concatenation of `parts` for the object `aad` (its key) under `key`.
pub fn seal(key: &DataKey, aad: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    seal_with_prefix(key, aad, parts, &random_prefix())
}

fn seal_with_prefix(
    key: &DataKey,
    aad: &[u8],
    parts: &[&[u8]],
    prefix: &[u8; NONCE_PREFIX_LEN],
) -> Vec<u8> {
    let plain: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let mut out = vec![0u8; sealed_len(plain) as usize];
    out[..MAGIC.len()].copy_from_slice(MAGIC);
    out[MAGIC.len()..HEADER_LEN].copy_from_slice(prefix);
    // Plain bytes into their segments' places, leaving room for each tag.
    let mut at = 0usize;
    for part in parts {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            let seg = at / SEGMENT;
            let within = at % SEGMENT;
            let n = part.len().min(SEGMENT - within);
            let pos = HEADER_LEN + seg * (SEGMENT + TAG) + within;
            out[pos..pos + n].copy_from_slice(&part[..n]);
            part = &part[n..];
            at += n;
        }
    }
    let stream = stream(key, prefix);
    let count = segments(plain);
    for_segments(&mut out[HEADER_LEN..], plain, |i, slot, len| {
        let mut buf = Slot { buf: slot, len };
        stream
            .encrypt_in_place(i as u32, i + 1 == count, aad, &mut buf)
            .expect("a segment fits its slot");
    });
    out
}

/// Opens a whole sealed object stored under `aad`.
///
/// # Errors
/// [`EnvelopeError`]: not sealed, a length no object seals to, or a segment that fails
/// authentication (altered, truncated, extended, moved to another key, or another key).
pub fn open(key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let prefix = header(sealed)?;
    let plain =
        plain_len(sealed.len() as u64).ok_or(EnvelopeError::BadLength(sealed.len() as u64))?;
    let mut body = sealed[HEADER_LEN..].to_vec();
    let stream = stream(key, &prefix);
    let count = segments(plain);
    let failed = std::sync::atomic::AtomicU64::new(u64::MAX);
    for_segments(&mut body, plain, |i, slot, len| {
        let mut buf = Slot {
            buf: slot,
            len: len + TAG,
        };
        if stream
            .decrypt_in_place(i as u32, i + 1 == count, aad, &mut buf)
            .is_err()
        {
            failed.fetch_min(i, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let failed = failed.into_inner();
    if failed != u64::MAX {
        return Err(EnvelopeError::Authentication(failed));
    }
    // Close the gaps the tags leave.
    let mut w = 0usize;
    for i in 0..count as usize {
        let start = i * (SEGMENT + TAG);
        let len = segment_len(plain, i as u64);
        body.copy_within(start..start + len, w);
        w += len;
    }
    body.truncate(w);
    Ok(body)
}

/// The nonce prefix of a sealed object from its first [`HEADER_LEN`] bytes.
///
/// # Errors
/// [`EnvelopeError::NotSealed`] without the magic.
pub fn header(sealed: &[u8]) -> Result<[u8; NONCE_PREFIX_LEN], EnvelopeError> {
    if sealed.len() < HEADER_LEN || &sealed[..MAGIC.len()] != MAGIC {
        return Err(EnvelopeError::NotSealed);
    }
    Ok(sealed[MAGIC.len()..HEADER_LEN]
        .try_into()
        .expect("prefix length"))
}

/// The stored bytes that hold plain bytes `range` of an object of `plain_len` bytes: whole
/// segments, tags included.
pub fn sealed_range(range: &Range<u64>, plain_len: u64) -> Range<u64> {
    let (first, last) = segment_span(range, plain_len);
    let start = HEADER_LEN as u64 + first * (SEGMENT + TAG) as u64;
    let end = HEADER_LEN as u64
        + last * (SEGMENT + TAG) as u64
        + (segment_len(plain_len, last) + TAG) as u64;
    start..end
}

/// Opens the segments [`sealed_range`] named for plain bytes `range` and returns those bytes.
///
/// # Errors
/// [`EnvelopeError::BadLength`] when `stored` is not those segments; authentication failures.
pub fn open_range(
    key: &DataKey,
    aad: &[u8],
    prefix: &[u8; NONCE_PREFIX_LEN],
    plain_len: u64,
    range: &Range<u64>,
    stored: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let want = sealed_range(range, plain_len);
    if stored.len() as u64 != want.end - want.start {
        return Err(EnvelopeError::BadLength(stored.len() as u64));
    }
    let (first, last) = segment_span(range, plain_len);
    let stream = stream(key, prefix);
    let count = segments(plain_len);
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    let mut buf = Vec::with_capacity(SEGMENT + TAG);
    for (n, i) in (first..=last).enumerate() {
        let start = n * (SEGMENT + TAG);
        let len = segment_len(plain_len, i) + TAG;
        buf.clear();
        buf.extend_from_slice(&stored[start..start + len]);
        stream
            .decrypt_in_place(i as u32, i + 1 == count, aad, &mut buf)
            .map_err(|_| EnvelopeError::Authentication(i))?;
        let seg_start = i * SEGMENT as u64;
        let from = range.start.max(seg_start) - seg_start;
        let to = range.end.min(seg_start + buf.len() as u64) - seg_start;
        out.extend_from_slice(&buf[from as usize..to as usize]);
    }
    Ok(out)
}

/// First and last segment holding plain bytes `range` (an empty range: the segment at its start).
fn segment_span(range: &Range<u64>, plain_len: u64) -> (u64, u64) {
    let count = segments(plain_len);
    let first = (range.start / SEGMENT as u64).min(count - 1);
    let last = (range.end.saturating_sub(1) / SEGMENT as u64).clamp(first, count - 1);
    (first, last)
}

/// Plain bytes in segment `i` of an object of `plain_len` bytes.
fn segment_len(plain_len: u64, i: u64) -> usize {
    (plain_len - (i * SEGMENT as u64).min(plain_len)).min(SEGMENT as u64) as usize
}

fn stream(key: &DataKey, prefix: &[u8; NONCE_PREFIX_LEN]) -> StreamBE32<XChaCha20Poly1305> {
    StreamBE32::new(key.bytes().into(), prefix.into())
}

/// Calls `f(segment, slot, plain length)` for each segment of a body laid out as above (`slot`
/// is the segment's plain bytes and tag), on two threads for large bodies.
fn for_segments(body: &mut [u8], plain: u64, f: impl Fn(u64, &mut [u8], usize) + Sync) {
    let count = segments(plain);
    let run = |first: u64, slots: &mut [u8]| {
        for (n, slot) in slots.chunks_mut(SEGMENT + TAG).enumerate() {
            let i = first + n as u64;
            f(i, slot, segment_len(plain, i));
        }
    };
    let threads = if (plain as usize) < PARALLEL_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    };
    if threads <= 1 {
        return run(0, body);
    }
    let per = count.div_ceil(threads as u64);
    std::thread::scope(|s| {
        let mut rest = body;
        let mut first = 0;
        while !rest.is_empty() {
            let take = ((per as usize) * (SEGMENT + TAG)).min(rest.len());
            let (mine, tail) = rest.split_at_mut(take);
            rest = tail;
            let run = &run;
            s.spawn(move || run(first, mine));
            first += per;
        }
    });
}

/// A segment's place in a larger buffer, as the `aead` crate's in-place buffer: `len` bytes in
/// use, room for the tag after them.
struct Slot<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl AsRef<[u8]> for Slot<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsMut<[u8]> for Slot<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Buffer for Slot<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> chacha20poly1305::aead::Result<()> {
        let end = self.len + other.len();
        if end > self.buf.len() {
            return Err(chacha20poly1305::aead::Error);
        }
        self.buf[self.len..end].copy_from_slice(other);
        self.len = end;
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> DataKey {
        DataKey::from_bytes([b; 32])
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    const SIZES: &[usize] = &[
        0,
        1,
        SEGMENT - 1,
        SEGMENT,
        SEGMENT + 1,
        3 * SEGMENT,
        2_500_000,
    ];

    #[test]
    fn lengths_invert() {
        for n in SIZES.iter().map(|&n| n as u64).chain(0..300) {
            assert_eq!(plain_len(sealed_len(n)), Some(n), "{n}");
        }
        // Lengths no object seals to.
        for bad in [0, 10, HEADER_LEN as u64, HEADER_LEN as u64 + TAG as u64 - 1] {
            assert_eq!(plain_len(bad), None, "{bad}");
        }
        assert_eq!(
            plain_len(HEADER_LEN as u64 + (SEGMENT + TAG) as u64 + 5),
            None
        );
    }

    #[test]
    fn seals_and_opens_in_any_split() {
        for &n in SIZES {
            let plain = data(n);
            let (a, b) = plain.split_at(n / 3);
            let sealed = seal(&key(1), b"k", &[a, b]);
            assert_eq!(sealed.len() as u64, sealed_len(n as u64));
            assert_eq!(open(&key(1), b"k", &sealed).unwrap(), plain, "{n}");
            if n >= 64 {
                // The plain bytes appear nowhere in the sealed object.
                assert!(!sealed.windows(32).any(|w| w == &plain[16..48]));
            }
        }
    }

    #[test]
    fn any_range_opens_alone() {
        let n = 3 * SEGMENT + 100;
        let plain = data(n);
        let sealed = seal(&key(2), b"obj", &[&plain]);
        let prefix = header(&sealed).unwrap();
        for r in [
            0..0,
            0..1,
            5..SEGMENT as u64,
            SEGMENT as u64 - 3..SEGMENT as u64 + 3,
            100..n as u64,
            n as u64 - 1..n as u64,
            0..n as u64,
        ] {
            let s = sealed_range(&r, n as u64);
            let got = open_range(
                &key(2),
                b"obj",
                &prefix,
                n as u64,
                &r,
                &sealed[s.start as usize..s.end as usize],
            )
            .unwrap();
            assert_eq!(got, &plain[r.start as usize..r.end as usize], "{r:?}");
        }
    }

    #[test]
    fn tampering_moving_cutting_and_other_keys_fail() {
        let plain = data(2 * SEGMENT + 10);
        let sealed = seal(&key(3), b"wal/a", &[&plain]);
        assert_eq!(
            open(&key(4), b"wal/a", &sealed),
            Err(EnvelopeError::Authentication(0))
        );
        assert_eq!(
            open(&key(3), b"wal/b", &sealed),
            Err(EnvelopeError::Authentication(0))
        );
        let mut flipped = sealed.clone();
        flipped[HEADER_LEN + SEGMENT + TAG + 3] ^= 1;
        assert_eq!(
            open(&key(3), b"wal/a", &flipped),
            Err(EnvelopeError::Authentication(1))
        );
        // Cut at a segment boundary: the new last segment was not sealed as last.
        let cut = &sealed[..HEADER_LEN + 2 * (SEGMENT + TAG)];
        assert!(open(&key(3), b"wal/a", cut).is_err());
        // Segments swapped.
        let mut swapped = sealed.clone();
        let (a, b) = (HEADER_LEN, HEADER_LEN + SEGMENT + TAG);
        let first = swapped[a..b].to_vec();
        swapped.copy_within(b..b + SEGMENT + TAG, a);
        swapped[b..b + SEGMENT + TAG].copy_from_slice(&first);
        assert!(open(&key(3), b"wal/a", &swapped).is_err());
        assert_eq!(
            open(&key(3), b"wal/a", &plain),
            Err(EnvelopeError::NotSealed)
        );
    }

    #[test]
    fn each_object_has_its_own_nonces() {
        let plain = data(1000);
        let a = seal(&key(5), b"k", &[&plain]);
        let b = seal(&key(5), b"k", &[&plain]);
        assert_ne!(a, b);
        assert_eq!(
            seal_with_prefix(&key(5), b"k", &[&plain], &[9; NONCE_PREFIX_LEN]),
            seal_with_prefix(&key(5), b"k", &[&plain], &[9; NONCE_PREFIX_LEN])
        );
    }
}
