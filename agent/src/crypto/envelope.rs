//! The sealed form of every object of an encrypted repository: an AEAD in the STREAM
//! construction (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
//! Nonce-Reuse Misuse-Resistance", 2015; `aead::stream::StreamBE32`), in segments of 64 KiB so
//! that any byte range can be read and authenticated on its own.
//!
//! ```text
//! offset 0   magic "PGPITRE" and format byte (1 or 2)             8 bytes
//! offset 8   nonce, random per object                             19 bytes
//! offset 27  segment 0: ciphertext (64 KiB) + 16-byte tag          65,552 bytes
//!            …
//!            last segment: ciphertext (0..=64 KiB) + tag, sealed with STREAM's last-segment flag
//! ```
//!
//! The format byte names the cipher ([`Cipher`]):
//! - format 1, XChaCha20-Poly1305 under the data key; the nonce is STREAM's 19-byte prefix;
//! - format 2, AES-256-GCM under a key derived for the object from the data key and its nonce
//!   ([`DataKey::object_key`]), which also gives STREAM's 7-byte prefix.
//!
//! Segment `i`'s AEAD nonce is the prefix, `i` as 32-bit big-endian and the last-segment flag
//! (1 on the last segment, else 0); its associated data is the object's key, so an object moved
//! to another key, reordered, cut short or extended fails authentication. An empty object is
//! one empty last segment. Format 2 is format 1's layout with a cipher that runs about six
//! times as fast on CPUs with AES instructions (docs/benchmarks.md); both are read.

use std::ops::Range;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::aead::Buffer;
use chacha20poly1305::XChaCha20Poly1305;

use super::keys::DataKey;

/// The magic at the start of every sealed object, before the format byte.
pub const MAGIC: &[u8; 7] = b"PGPITRE";
/// Bytes of the random nonce after the format byte.
pub const NONCE_LEN: usize = 19;
/// Bytes before the first segment.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + NONCE_LEN;
/// Plain bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
/// The authentication tag after each segment (Poly1305's or GCM's).
pub const TAG: usize = 16;
/// Sealed bytes a [`Sealer`] gathers before it writes them: few writes, and a buffer that stays
/// in the cache instead of growing to a whole compressed part in fresh memory.
const WRITE_MAX: usize = 4 * (SEGMENT + TAG);
/// Objects from this size on are sealed and opened on two threads.
const PARALLEL_MIN: usize = 1024 * 1024;

/// The cipher of a sealed object, named by its format byte and, in `repo.json`, by
/// [`Cipher::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// Format 1: XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`). Repositories created
    /// before format 2 keep writing it.
    XChaCha20Poly1305,
    /// Format 2: AES-256-GCM (AWS-LC through `aws-lc-rs`), a key per object. New repositories.
    Aes256Gcm,
}

impl Cipher {
    /// The cipher of new repositories.
    pub const NEW: Cipher = Cipher::Aes256Gcm;
    /// Every cipher this build reads.
    pub const ALL: [Cipher; 2] = [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm];

    fn format(self) -> u8 {
        match self {
            Cipher::XChaCha20Poly1305 => 1,
            Cipher::Aes256Gcm => 2,
        }
    }

    fn from_format(byte: u8) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.format() == byte)
    }

    /// The name `repo.json` records.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::XChaCha20Poly1305 => "xchacha20poly1305-stream-64k",
            Cipher::Aes256Gcm => "aes256gcm-hkdf-stream-64k",
        }
    }

    /// The cipher `repo.json` names; `None` for one this build does not know.
    pub fn from_name(name: &str) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What precedes a sealed object's first segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cipher: Cipher,
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// A header with a fresh random nonce.
    pub fn random(cipher: Cipher) -> Header {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the operating system's random source");
        Header { cipher, nonce }
    }

    fn write_to(&self, out: &mut [u8]) {
        out[..MAGIC.len()].copy_from_slice(MAGIC);
        out[MAGIC.len()] = self.cipher.format();
        out[MAGIC.len() + 1..HEADER_LEN].copy_from_slice(&self.nonce);
    }
}

/// Why a sealed object could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not an encrypted object (no pgpitr encryption header)")]
    NotSealed,
    #[error("sealed in format {0}, which this version of pgpitr cannot read: upgrade pgpitr")]
    UnknownFormat(u8),
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

/// The segment cipher of one object: its AEAD keyed, and STREAM's nonce prefix.
enum Segments {
    XChaCha(StreamBE32<XChaCha20Poly1305>),
    Aes { key: LessSafeKey, prefix: [u8; 7] },
}

impl Segments {
    fn new(key: &DataKey, header: &Header) -> Segments {
        match header.cipher {
            Cipher::XChaCha20Poly1305 => {
                Segments::XChaCha(StreamBE32::new(key.bytes().into(), (&header.nonce).into()))
            }
            Cipher::Aes256Gcm => {
                let object = key.object_key(&header.nonce);
                let aes = UnboundKey::new(&AES_256_GCM, object.key()).expect("a 32-byte key");
                Segments::Aes {
                    key: LessSafeKey::new(aes),
                    prefix: object.nonce_prefix(),
                }
            }
        }
    }

    /// STREAM's nonce of segment `i` (`aead::stream::StreamBE32`): the prefix, `i` big-endian,
    /// and the last-segment flag.
    fn aes_nonce(prefix: &[u8; 7], i: u32, last: bool) -> Nonce {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(prefix);
        n[7..11].copy_from_slice(&i.to_be_bytes());
        n[11] = u8::from(last);
        Nonce::assume_unique_for_key(n)
    }

    /// Seals segment `i` in place: `slot` is its plain bytes followed by [`TAG`] bytes of room.
    fn seal(&self, i: u32, last: bool, aad: &[u8], slot: &mut [u8]) -> Result<(), ()> {
        let len = slot.len().checked_sub(TAG).ok_or(())?;
        match self {
            Segments::XChaCha(stream) => stream
                .encrypt_in_place(i, last, aad, &mut Slot { buf: slot, len })
                .map_err(|_| ()),
            Segments::Aes { key, prefix } => {
                let (plain, tag) = slot.split_at_mut(len);
                let t = key
                    .seal_in_place_separate_tag(
                        Self::aes_nonce(prefix, i, last),
                        Aad::from(aad),
                        plain,
                    )
                    .map_err(|_| ())?;
                tag.copy_from_slice(t.as_ref());
                Ok(())
            }
        }
    }

    /// Opens segment `i` in place: `sealed` is its ciphertext and tag; the plain bytes are then
    /// its first `sealed.len() - TAG` bytes.
    fn open(&self, i: u32, last: bool, aad: &[u8], sealed: &mut [u8]) -> Result<(), ()> {
        if sealed.len() < TAG {
            return Err(());
        }
        match self {
            Segments::XChaCha(stream) => {
                let len = sealed.len();
                stream
                    .decrypt_in_place(i, last, aad, &mut Slot { buf: sealed, len })
                    .map_err(|_| ())
            }
            Segments::Aes { key, prefix } => key
                .open_in_place(Self::aes_nonce(prefix, i, last), Aad::from(aad), sealed)
                .map(|_| ())
                .map_err(|_| ()),
        }
    }
}

/// Seals the concatenation of `parts` for the object `aad` (its key) under `key`.
pub fn seal(key: &DataKey, cipher: Cipher, aad: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    seal_with(key, aad, parts, &Header::random(cipher))
}

fn seal_with(key: &DataKey, aad: &[u8], parts: &[&[u8]], header: &Header) -> Vec<u8> {
    let plain: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let mut out = vec![0u8; sealed_len(plain) as usize];
    header.write_to(&mut out);
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
    let segs = Segments::new(key, header);
    let count = segments(plain);
    for_segments(
        &mut out[HEADER_LEN..],
        plain,
        SEGMENT + TAG,
        |i, slot, len| {
            segs.seal(i as u32, i + 1 == count, aad, &mut slot[..len + TAG])
                .expect("a segment fits its slot");
        },
    );
    out
}

/// The associated data a [`Sealer`] seals its segments with, set once, possibly from another
/// thread than the one writing: the object's key, often known only once its content is hashed.
#[derive(Clone, Default)]
pub struct Binding(std::sync::Arc<std::sync::OnceLock<Vec<u8>>>);

impl Binding {
    /// Binds the object to `aad`; a later call changes nothing (and [`Sealer::finish`] then
    /// refuses any other key).
    pub fn bind(&self, aad: &[u8]) {
        let _ = self.0.set(aad.to_vec());
    }

    fn get(&self) -> Option<&[u8]> {
        self.0.get().map(Vec::as_slice)
    }
}

/// Seals an object while its plain bytes arrive, into the very bytes [`seal`] makes of them
/// (the header, then each segment once a later byte shows it is not the last one). Segments
/// are sealed from the moment the object's key is bound ([`Sealer::binding`]); plain bytes
/// written before wait in memory. Sealing as the bytes arrive, rather than after the last one,
/// lets a caller that learns the key early (a WAL object's key carries the keyed hash of the
/// segment, known before its compression ends) overlap sealing and writing with compressing.
pub struct Sealer<W: std::io::Write> {
    out: W,
    segs: Segments,
    binding: Binding,
    /// Plain bytes not sealed yet; always less than a segment after a drain, once bound.
    pending: Vec<u8>,
    /// The next segment's number.
    next: u32,
    /// Sealed bytes not written yet (the header, then the segments one drain seals), written to
    /// `out` at once: one write per write of the caller, not one per segment.
    sealed: Vec<u8>,
}

impl<W: std::io::Write> Sealer<W> {
    /// Starts an object in `out` under `key` in `cipher`, with a fresh nonce; the header is
    /// written with the first segments.
    pub fn new(key: &DataKey, cipher: Cipher, out: W) -> Sealer<W> {
        Sealer::with_header(key, out, &Header::random(cipher))
    }

    fn with_header(key: &DataKey, out: W, header: &Header) -> Sealer<W> {
        let mut sealed = vec![0; HEADER_LEN];
        sealed.reserve(SEGMENT + TAG);
        header.write_to(&mut sealed);
        Sealer {
            out,
            segs: Segments::new(key, header),
            binding: Binding::default(),
            pending: Vec::new(),
            next: 0,
            sealed,
        }
    }

    /// Where to bind the object's key (its associated data).
    pub fn binding(&self) -> Binding {
        self.binding.clone()
    }

    /// Seals what is left as the last segment and returns the output.
    ///
    /// # Errors
    /// `out`'s error; `InvalidInput` when the object was bound to another key than `aad`.
    pub fn finish(mut self, aad: &[u8]) -> std::io::Result<W> {
        self.binding.bind(aad);
        if self.binding.get() != Some(aad) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an object sealed for one key was stored under another",
            ));
        }
        self.drain(true)?;
        Ok(self.out)
    }

    /// Seals and writes every pending segment that is not the last (all of them when `last`),
    /// on two threads when they add up to [`PARALLEL_MIN`] or more: the backlog of an object
    /// whose key was bound only after its last byte arrived is sealed as fast as `seal` would.
    fn drain(&mut self, last: bool) -> std::io::Result<()> {
        let Some(aad) = self.binding.get() else {
            return Ok(());
        };
        let take = if last {
            self.pending.len()
        } else {
            self.pending.len().saturating_sub(1) / SEGMENT * SEGMENT
        };
        if take == 0 && !last {
            return Ok(());
        }
        let count = segments(take as u64);
        let start = self.sealed.len();
        self.sealed.reserve(take + count as usize * TAG);
        for k in 0..count as usize {
            let plain = &self.pending[(k * SEGMENT).min(take)..((k + 1) * SEGMENT).min(take)];
            self.sealed.extend_from_slice(plain);
            self.sealed.extend_from_slice(&[0; TAG]);
        }
        let (segs, first) = (&self.segs, self.next);
        let failed = std::sync::atomic::AtomicBool::new(false);
        for_segments(
            &mut self.sealed[start..],
            take as u64,
            SEGMENT + TAG,
            |i, slot, len| {
                let is_last = last && i + 1 == count;
                if segs
                    .seal(first + i as u32, is_last, aad, &mut slot[..len + TAG])
                    .is_err()
                {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
        );
        if failed.into_inner() {
            return Err(std::io::Error::other("a segment too long to seal"));
        }
        self.next += count as u32;
        Self::write_sealed(&mut self.out, &mut self.sealed)?;
        self.pending.drain(..take);
        Ok(())
    }

    /// Writes the sealed bytes gathered so far to `out` (fields, not `self`, so that a caller
    /// may hold the binding's associated data meanwhile).
    fn write_sealed(out: &mut W, sealed: &mut Vec<u8>) -> std::io::Result<()> {
        out.write_all(sealed)?;
        sealed.clear();
        Ok(())
    }

    /// Seals `buf`, coming after everything sealed so far (bound, with less than a segment
    /// pending), one segment at a time: each is copied into its place and sealed while it is in
    /// the cache. Whatever might be the last segment stays pending.
    fn stream_in(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        let aad = self.binding.get().expect("bound");
        let first = self.next;
        if !self.pending.is_empty() {
            let fill = (SEGMENT - self.pending.len()).min(buf.len());
            self.pending.extend_from_slice(&buf[..fill]);
            buf = &buf[fill..];
            if buf.is_empty() {
                return Ok(());
            }
            // A whole segment with more after it.
            Self::seal_one(
                &self.segs,
                &mut self.next,
                aad,
                &mut self.sealed,
                &self.pending,
            )?;
            self.pending.clear();
        }
        while buf.len() > SEGMENT {
            Self::seal_one(
                &self.segs,
                &mut self.next,
                aad,
                &mut self.sealed,
                &buf[..SEGMENT],
            )?;
            buf = &buf[SEGMENT..];
            if self.sealed.len() >= WRITE_MAX {
                Self::write_sealed(&mut self.out, &mut self.sealed)?;
            }
        }
        self.pending.extend_from_slice(buf);
        if self.next != first && !self.sealed.is_empty() {
            Self::write_sealed(&mut self.out, &mut self.sealed)?;
        }
        Ok(())
    }

    /// Appends segment `next` (not the last), `plain` sealed, to `sealed`.
    fn seal_one(
        segs: &Segments,
        next: &mut u32,
        aad: &[u8],
        sealed: &mut Vec<u8>,
        plain: &[u8],
    ) -> std::io::Result<()> {
        let start = sealed.len();
        sealed.extend_from_slice(plain);
        sealed.extend_from_slice(&[0; TAG]);
        segs.seal(*next, false, aad, &mut sealed[start..])
            .map_err(|_| std::io::Error::other("a segment too long to seal"))?;
        *next += 1;
        Ok(())
    }
}

impl<W: std::io::Write> std::fmt::Debug for Sealer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("next", &self.next)
            .field("pending", &self.pending.len())
            .field("bound", &self.binding.get().is_some())
            .finish_non_exhaustive()
    }
}

impl<W: std::io::Write> std::io::Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.binding.get().is_none() || self.pending.len() > SEGMENT {
            // Not bound yet, or a backlog from before: kept, then sealed all at once.
            self.pending.extend_from_slice(buf);
            self.drain(false)?;
        } else {
            self.stream_in(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens a whole sealed object stored under `aad`.
///
/// # Errors
/// [`EnvelopeError`]: not sealed, a length no object seals to, or a segment that fails
/// authentication (altered, truncated, extended, moved to another key, or another key).
pub fn open(key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let header = header(sealed)?;
    let plain =
        plain_len(sealed.len() as u64).ok_or(EnvelopeError::BadLength(sealed.len() as u64))?;
    let body = &sealed[HEADER_LEN..];
    let segs = Segments::new(key, &header);
    let count = segments(plain);
    let failed = std::sync::atomic::AtomicU64::new(u64::MAX);
    // Each segment is opened in a buffer of its own, which stays in the cache, and only its plain
    // bytes go to their place in the output: one pass over the object's memory.
    let mut out = vec![0u8; plain as usize];
    for_segments(&mut out, plain, SEGMENT, |i, slot, len| {
        let start = i as usize * (SEGMENT + TAG);
        let mut buf = body[start..start + len + TAG].to_vec();
        match segs.open(i as u32, i + 1 == count, aad, &mut buf) {
            Ok(()) => slot.copy_from_slice(&buf[..len]),
            Err(_) => {
                failed.fetch_min(i, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    match failed.into_inner() {
        u64::MAX => Ok(out),
        failed => Err(EnvelopeError::Authentication(failed)),
    }
}

/// The header of a sealed object from its first [`HEADER_LEN`] bytes.
///
/// # Errors
/// [`EnvelopeError::NotSealed`] without the magic; [`EnvelopeError::UnknownFormat`] for a
/// format byte this build does not know.
pub fn header(sealed: &[u8]) -> Result<Header, EnvelopeError> {
    if sealed.len() < HEADER_LEN || &sealed[..MAGIC.len()] != MAGIC {
        return Err(EnvelopeError::NotSealed);
    }
    let format = sealed[MAGIC.len()];
    Ok(Header {
        cipher: Cipher::from_format(format).ok_or(EnvelopeError::UnknownFormat(format))?,
        nonce: sealed[MAGIC.len() + 1..HEADER_LEN]
            .try_into()
            .expect("nonce length"),
    })
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
    header: &Header,
    plain_len: u64,
    range: &Range<u64>,
    stored: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let want = sealed_range(range, plain_len);
    if stored.len() as u64 != want.end - want.start {
        return Err(EnvelopeError::BadLength(stored.len() as u64));
    }
    let (first, last) = segment_span(range, plain_len);
    let segs = Segments::new(key, header);
    let count = segments(plain_len);
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    let mut buf = Vec::with_capacity(SEGMENT + TAG);
    for (n, i) in (first..=last).enumerate() {
        let start = n * (SEGMENT + TAG);
        let len = segment_len(plain_len, i);
        buf.clear();
        buf.extend_from_slice(&stored[start..start + len + TAG]);
        segs.open(i as u32, i + 1 == count, aad, &mut buf)
            .map_err(|_| EnvelopeError::Authentication(i))?;
        let seg_start = i * SEGMENT as u64;
        let from = range.start.max(seg_start) - seg_start;
        let to = range.end.min(seg_start + len as u64) - seg_start;
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

/// Calls `f(segment, slot, plain length)` for each segment of a body of consecutive slots of
/// `stride` bytes (the last one shorter), on two threads for large bodies: a sealed body's slots
/// are a segment's plain bytes and its tag (`SEGMENT + TAG`), a plain body's its plain bytes
/// (`SEGMENT`).
fn for_segments(
    body: &mut [u8],
    plain: u64,
    stride: usize,
    f: impl Fn(u64, &mut [u8], usize) + Sync,
) {
    let count = segments(plain);
    let run = |first: u64, slots: &mut [u8]| {
        for (n, slot) in slots.chunks_mut(stride).enumerate() {
            let i = first + n as u64;
            f(i, slot, segment_len(plain, i));
        }
    };
    let threads = if (plain as usize) < PARALLEL_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    };
    if body.is_empty() {
        // An empty object is one empty segment, which still authenticates.
        return f(0, body, 0);
    }
    if threads <= 1 {
        return run(0, body);
    }
    let per = count.div_ceil(threads as u64);
    std::thread::scope(|s| {
        let mut rest = body;
        let mut first = 0;
        while !rest.is_empty() {
            let take = ((per as usize) * stride).min(rest.len());
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

    fn fixed(cipher: Cipher) -> Header {
        Header {
            cipher,
            nonce: [9; NONCE_LEN],
        }
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

    /// Sealing as the bytes arrive, bound before, during or after them, makes exactly the
    /// bytes of sealing them at once.
    #[test]
    fn a_sealer_makes_the_bytes_seal_makes() {
        for (&n, cipher) in SIZES
            .iter()
            .chain(&[2 * SEGMENT, 2 * SEGMENT + 17])
            .flat_map(|n| Cipher::ALL.map(|c| (n, c)))
        {
            let plain = data(n);
            let want = seal_with(&key(1), b"wal/x-1", &[&plain], &fixed(cipher));
            for write in [1usize, 1000, SEGMENT, SEGMENT + 3, 1 << 20] {
                for bind_after in [0usize, n / 2, n] {
                    let mut s = Sealer::with_header(&key(1), Vec::new(), &fixed(cipher));
                    let binding = s.binding();
                    let mut written = 0;
                    for part in plain.chunks(write) {
                        if written >= bind_after {
                            binding.bind(b"wal/x-1");
                        }
                        std::io::Write::write_all(&mut s, part).unwrap();
                        written += part.len();
                    }
                    let got = s.finish(b"wal/x-1").unwrap();
                    assert!(
                        got == want,
                        "{n} bytes, writes of {write}, bound after {bind_after}, {cipher:?}"
                    );
                    assert_eq!(open(&key(1), b"wal/x-1", &got).unwrap(), plain);
                }
            }
        }
    }

    #[test]
    fn a_sealer_bound_to_one_key_refuses_another() {
        let mut s = Sealer::new(&key(1), Cipher::NEW, Vec::new());
        s.binding().bind(b"wal/a-1");
        std::io::Write::write_all(&mut s, &data(3 * SEGMENT)).unwrap();
        let e = s.finish(b"wal/b-1").expect_err("another key");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }

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
        for (&n, cipher) in SIZES.iter().flat_map(|n| Cipher::ALL.map(|c| (n, c))) {
            let plain = data(n);
            let (a, b) = plain.split_at(n / 3);
            let sealed = seal(&key(1), cipher, b"k", &[a, b]);
            assert_eq!(header(&sealed).unwrap().cipher, cipher);
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
        for cipher in Cipher::ALL {
            let sealed = seal(&key(2), cipher, b"obj", &[&plain]);
            let head = header(&sealed).unwrap();
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
                    &head,
                    n as u64,
                    &r,
                    &sealed[s.start as usize..s.end as usize],
                )
                .unwrap();
                assert_eq!(got, &plain[r.start as usize..r.end as usize], "{r:?}");
            }
        }
    }

    #[test]
    fn tampering_moving_cutting_and_other_keys_fail() {
        for cipher in Cipher::ALL {
            tampering_fails(cipher);
        }
    }

    fn tampering_fails(cipher: Cipher) {
        let plain = data(2 * SEGMENT + 10);
        let sealed = seal(&key(3), cipher, b"wal/a", &[&plain]);
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
        // An empty object is one empty segment, and it authenticates too.
        let empty = seal(&key(3), cipher, b"wal/e", &[]);
        assert_eq!(open(&key(3), b"wal/e", &empty), Ok(Vec::new()));
        assert_eq!(
            open(&key(3), b"wal/f", &empty),
            Err(EnvelopeError::Authentication(0))
        );
        let mut flipped = empty.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(
            open(&key(3), b"wal/e", &flipped),
            Err(EnvelopeError::Authentication(0))
        );
        // An object opened on several threads names its first failing segment.
        let large = data(40 * SEGMENT + 5);
        let mut sealed = seal(&key(3), cipher, b"wal/l", &[&large]);
        for i in [33usize, 21] {
            sealed[HEADER_LEN + i * (SEGMENT + TAG) + 7] ^= 1;
        }
        assert_eq!(
            open(&key(3), b"wal/l", &sealed),
            Err(EnvelopeError::Authentication(21))
        );
    }

    #[test]
    fn each_object_has_its_own_nonces() {
        let plain = data(1000);
        for cipher in Cipher::ALL {
            let a = seal(&key(5), cipher, b"k", &[&plain]);
            let b = seal(&key(5), cipher, b"k", &[&plain]);
            assert_ne!(a, b);
            assert_eq!(
                seal_with(&key(5), b"k", &[&plain], &fixed(cipher)),
                seal_with(&key(5), b"k", &[&plain], &fixed(cipher))
            );
        }
    }

    /// Both formats are frozen: objects sealed by any release open in every later one. The
    /// digests of format 1 were taken from the release before format 2 existed.
    #[test]
    fn formats_are_frozen() {
        use sha2::Digest;
        let digest = |cipher, plain: &[u8]| {
            let sealed = seal_with(&key(1), b"wal/x", &[plain], &fixed(cipher));
            hex::encode(sha2::Sha256::digest(sealed))
        };
        let plain = data(200_000);
        assert_eq!(
            digest(Cipher::XChaCha20Poly1305, &plain),
            "d98745d825d8cadbd0c5d3de5f313cf7e0208939726019377e1275ceb71abae9"
        );
        assert_eq!(
            digest(Cipher::XChaCha20Poly1305, &[]),
            "aba994b153fd0ef574e3b227a49f86c3c3c9b98895e0891d335414bb64a34112"
        );
        assert_eq!(
            digest(Cipher::Aes256Gcm, &plain),
            "d64c8aae91380556130593ec80d84082c40c240913fedb45816ca0c72dc6ef05"
        );
        assert_eq!(
            digest(Cipher::Aes256Gcm, &[]),
            "0267c4a1892655b9cc2c57ed30dbf33ef5147faa32b4c126570e06d2c329e69b"
        );
    }

    /// Format 2 is STREAM over AES-256-GCM exactly as RustCrypto's `aead::stream` builds it,
    /// under the object's derived key and prefix: the nonce schedule is theirs, not ours.
    #[test]
    fn format_2_is_rustcrypto_stream_over_aes_256_gcm() {
        use aes_gcm::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
        let head = fixed(Cipher::Aes256Gcm);
        let object = key(1).object_key(&head.nonce);
        let stream: StreamBE32<aes_gcm::Aes256Gcm> =
            StreamBE32::new(object.key().into(), (&object.nonce_prefix()).into());
        for n in [0, 1, SEGMENT, 2 * SEGMENT + 17] {
            let plain = data(n);
            let sealed = seal_with(&key(1), b"wal/x", &[&plain], &head);
            let count = segments(n as u64);
            let mut want = sealed[..HEADER_LEN].to_vec();
            for i in 0..count {
                let seg =
                    &plain[(i as usize * SEGMENT).min(n)..((i as usize + 1) * SEGMENT).min(n)];
                let mut buf = seg.to_vec();
                stream
                    .encrypt_in_place(i as u32, i + 1 == count, b"wal/x", &mut buf)
                    .unwrap();
                want.extend_from_slice(&buf);
            }
            assert!(sealed == want, "{n} bytes");
        }
    }

    #[test]
    fn an_unknown_format_is_named() {
        let mut sealed = seal(&key(1), Cipher::NEW, b"k", &[b"x"]);
        sealed[MAGIC.len()] = 7;
        assert_eq!(
            open(&key(1), b"k", &sealed),
            Err(EnvelopeError::UnknownFormat(7))
        );
        // A format-1 object under the same key opens whatever new objects are sealed with.
        let old = seal(&key(1), Cipher::XChaCha20Poly1305, b"k", &[b"x"]);
        assert_eq!(open(&key(1), b"k", &old).unwrap(), b"x");
    }
}
