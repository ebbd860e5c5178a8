//! The sealed form of every object of an encrypted repository: an AEAD in the STREAM
//! construction (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
//! Nonce-Reuse Misuse-Resistance", 2015; `aead::stream::StreamBE32`), in segments of 64 KiB so
//! that any byte range can be read and authenticated on its own (formats 1 and 2).
//!
//! ```text
//! offset 0   magic "PGPITRE" and format byte (1 to 4)             8 bytes
//! offset 8   nonce, random per object                             19 bytes
//! offset 27  segment 0: ciphertext (64 KiB) + 16-byte tag          65,552 bytes
//!            …
//!            last segment: ciphertext (0..=64 KiB) + tag, sealed with STREAM's last-segment flag
//! ```
//!
//! The format byte names the cipher ([`Cipher`]) and which segments carry the object's key
//! ([`KeyBinding`]):
//! - format 1, XChaCha20-Poly1305 under the data key; the nonce is STREAM's 19-byte prefix;
//! - format 2, AES-256-GCM under a key derived for the object from the data key and its nonce
//!   ([`DataKey::object_key`]), which also gives STREAM's 7-byte prefix;
//! - formats 3 and 4, formats 2 and 1 with the object's key in the last segment only
//!   ([`KeyBinding::LastSegment`]), for objects sealed as their bytes arrive, before their key
//!   is known (a WAL object's key holds the keyed hash of its content). They are read whole.
//!
//! Segment `i`'s AEAD nonce is the prefix, `i` as 32-bit big-endian and the last-segment flag
//! (1 on the last segment, else 0). Its associated data is the object's key (formats 1 and 2;
//! the last segment of formats 3 and 4) or empty (the other segments of formats 3 and 4). An
//! object moved to another key, reordered, mixed with another, cut short or extended fails
//! authentication: each segment belongs to one object by its nonce (a key of its own in formats
//! 2 and 3, a prefix of its own in formats 1 and 4) and to its place by its counter, and the
//! last segment binds the object to its key. An empty object is one empty last segment. Format
//! 2 is format 1's layout with a cipher that runs about six times as fast on CPUs with AES
//! instructions (docs/benchmarks.md); every format is read.

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

/// Which of an object's segments carry its key as associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBinding {
    /// Every segment (formats 1 and 2): any byte range opens alone, bound to the key.
    EverySegment,
    /// The last segment only (formats 3 and 4): the object can be sealed and written as its
    /// bytes arrive, before its key is known, and is read whole.
    LastSegment,
}

impl KeyBinding {
    /// The associated data of a segment of the object stored under `key`.
    fn aad(self, key: &[u8], last: bool) -> &[u8] {
        match self {
            KeyBinding::LastSegment if !last => &[],
            _ => key,
        }
    }
}

/// Every format this build reads: its byte, cipher and key binding.
const FORMATS: [(u8, Cipher, KeyBinding); 4] = [
    (1, Cipher::XChaCha20Poly1305, KeyBinding::EverySegment),
    (2, Cipher::Aes256Gcm, KeyBinding::EverySegment),
    (3, Cipher::Aes256Gcm, KeyBinding::LastSegment),
    (4, Cipher::XChaCha20Poly1305, KeyBinding::LastSegment),
];

/// What precedes a sealed object's first segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cipher: Cipher,
    pub binding: KeyBinding,
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// A header with a fresh random nonce.
    pub fn random(cipher: Cipher, binding: KeyBinding) -> Header {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the operating system's random source");
        Header {
            cipher,
            binding,
            nonce,
        }
    }

    /// The header of format `byte` with `nonce`; `None` for a format this build does not know.
    fn of_format(byte: u8, nonce: [u8; NONCE_LEN]) -> Option<Header> {
        let &(_, cipher, binding) = FORMATS.iter().find(|f| f.0 == byte)?;
        Some(Header {
            cipher,
            binding,
            nonce,
        })
    }

    fn format(&self) -> u8 {
        FORMATS
            .iter()
            .find(|f| f.1 == self.cipher && f.2 == self.binding)
            .expect("every cipher has a format for either binding")
            .0
    }

    fn write_to(&self, out: &mut [u8]) {
        out[..MAGIC.len()].copy_from_slice(MAGIC);
        out[MAGIC.len()] = self.format();
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
    #[error("a byte range was asked of an object sealed to be read whole (format {0}): it was moved here from another key")]
    WholeOnly(u8),
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

    /// Opens segment `i`, `sealed` (its ciphertext and tag), into `out`, which is
    /// `sealed.len() - TAG` bytes long. AES-GCM decrypts straight from `sealed` (often a mapped
    /// file) into `out`; XChaCha20-Poly1305 through a copy.
    fn open(
        &self,
        i: u32,
        last: bool,
        aad: &[u8],
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<(), ()> {
        let Some(len) = sealed
            .len()
            .checked_sub(TAG)
            .filter(|&len| len == out.len())
        else {
            return Err(());
        };
        match self {
            Segments::XChaCha(stream) => {
                let mut buf = sealed.to_vec();
                stream
                    .decrypt_in_place(
                        i,
                        last,
                        aad,
                        &mut Slot {
                            buf: &mut buf,
                            len: len + TAG,
                        },
                    )
                    .map_err(|_| ())?;
                out.copy_from_slice(&buf[..len]);
                Ok(())
            }
            Segments::Aes { key, prefix } => {
                let (ciphertext, tag) = sealed.split_at(len);
                key.open_separate_gather(
                    Self::aes_nonce(prefix, i, last),
                    Aad::from(aad),
                    ciphertext,
                    tag,
                    out,
                )
                .map_err(|_| ())
            }
        }
    }
}

/// Seals the concatenation of `parts` for the object `aad` (its key) under `key`, every
/// segment bound to the key (formats 1 and 2).
pub fn seal(key: &DataKey, cipher: Cipher, aad: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    seal_with(
        key,
        aad,
        parts,
        &Header::random(cipher, KeyBinding::EverySegment),
    )
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
            let last = i + 1 == count;
            let aad = header.binding.aad(aad, last);
            segs.seal(i as u32, last, aad, &mut slot[..len + TAG])
                .expect("a segment fits its slot");
        },
    );
    out
}

/// Seals an object while its plain bytes arrive, in its cipher's late-bound format
/// ([`KeyBinding::LastSegment`]): each segment is sealed and written once a later byte shows it
/// is not the last one, so that sealing and writing overlap with whatever produces the bytes
/// (compression), and the object's key is needed only by [`Sealer::finish`], for the last
/// segment. A WAL object's key holds the keyed hash of its content, known only once all of it
/// has been read. The output is the very bytes sealing them at once makes with the same header.
pub struct Sealer<W: std::io::Write> {
    out: W,
    segs: Segments,
    /// Plain bytes not sealed yet: at most a segment, which may be the last.
    pending: Vec<u8>,
    /// The next segment's number.
    next: u32,
    /// Sealed bytes not written yet (the header, then sealed segments), written to `out` every
    /// few segments ([`WRITE_MAX`]) and at the end of each write of the caller.
    sealed: Vec<u8>,
}

impl<W: std::io::Write> Sealer<W> {
    /// Starts an object in `out` under `key` in `cipher`, with a fresh nonce; the header is
    /// written with the first segments.
    pub fn new(key: &DataKey, cipher: Cipher, out: W) -> Sealer<W> {
        Sealer::with_header(key, out, &Header::random(cipher, KeyBinding::LastSegment))
    }

    fn with_header(key: &DataKey, out: W, header: &Header) -> Sealer<W> {
        assert_eq!(
            header.binding,
            KeyBinding::LastSegment,
            "a late-bound format"
        );
        let mut sealed = vec![0; HEADER_LEN];
        sealed.reserve(SEGMENT + TAG);
        header.write_to(&mut sealed);
        Sealer {
            out,
            segs: Segments::new(key, header),
            pending: Vec::new(),
            next: 0,
            sealed,
        }
    }

    /// Seals what is left as the last segment, bound to the object's key `aad`, and returns
    /// the output.
    ///
    /// # Errors
    /// `out`'s error.
    pub fn finish(mut self, aad: &[u8]) -> std::io::Result<W> {
        Self::seal_one(
            &self.segs,
            &mut self.next,
            Some(aad),
            &mut self.sealed,
            &self.pending,
        )?;
        Self::write_sealed(&mut self.out, &mut self.sealed)?;
        Ok(self.out)
    }

    /// Writes the sealed bytes gathered so far to `out` (fields, not `self`, so that a caller
    /// may hold other fields meanwhile).
    fn write_sealed(out: &mut W, sealed: &mut Vec<u8>) -> std::io::Result<()> {
        out.write_all(sealed)?;
        sealed.clear();
        Ok(())
    }

    /// Seals `buf`, coming after everything sealed so far, one segment at a time: each is copied
    /// into its place and sealed while it is in the cache. Whatever might be the last segment
    /// stays pending.
    fn stream_in(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
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
                None,
                &mut self.sealed,
                &self.pending,
            )?;
            self.pending.clear();
        }
        while buf.len() > SEGMENT {
            Self::seal_one(
                &self.segs,
                &mut self.next,
                None,
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

    /// Appends segment `next`, `plain` sealed, to `sealed`: the last one, bound to the object's
    /// key, when `key` is given, else one before it, with no associated data.
    fn seal_one(
        segs: &Segments,
        next: &mut u32,
        key: Option<&[u8]>,
        sealed: &mut Vec<u8>,
        plain: &[u8],
    ) -> std::io::Result<()> {
        let start = sealed.len();
        sealed.extend_from_slice(plain);
        sealed.extend_from_slice(&[0; TAG]);
        let aad = key.unwrap_or_default();
        segs.seal(*next, key.is_some(), aad, &mut sealed[start..])
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
            .finish_non_exhaustive()
    }
}

impl<W: std::io::Write> std::io::Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream_in(buf)?;
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
    // Each segment is opened straight into its place in the output: one pass over the object.
    let mut out = vec![0u8; plain as usize];
    for_segments(&mut out, plain, SEGMENT, |i, slot, len| {
        let start = i as usize * (SEGMENT + TAG);
        let last = i + 1 == count;
        let aad = header.binding.aad(aad, last);
        if segs
            .open(
                i as u32,
                last,
                aad,
                &body[start..start + len + TAG],
                &mut slot[..len],
            )
            .is_err()
        {
            failed.fetch_min(i, std::sync::atomic::Ordering::Relaxed);
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
    let nonce = sealed[MAGIC.len() + 1..HEADER_LEN]
        .try_into()
        .expect("nonce length");
    Header::of_format(format, nonce).ok_or(EnvelopeError::UnknownFormat(format))
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
/// [`EnvelopeError::BadLength`] when `stored` is not those segments;
/// [`EnvelopeError::WholeOnly`] for an object whose key only its last segment carries (formats
/// 3 and 4: its other segments are not bound to where it is stored); authentication failures.
pub fn open_range(
    key: &DataKey,
    aad: &[u8],
    header: &Header,
    plain_len: u64,
    range: &Range<u64>,
    stored: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if header.binding != KeyBinding::EverySegment {
        return Err(EnvelopeError::WholeOnly(header.format()));
    }
    let want = sealed_range(range, plain_len);
    if stored.len() as u64 != want.end - want.start {
        return Err(EnvelopeError::BadLength(stored.len() as u64));
    }
    let (first, last) = segment_span(range, plain_len);
    let segs = Segments::new(key, header);
    let count = segments(plain_len);
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    let mut buf = vec![0; SEGMENT];
    for (n, i) in (first..=last).enumerate() {
        let start = n * (SEGMENT + TAG);
        let len = segment_len(plain_len, i);
        let sealed = &stored[start..start + len + TAG];
        segs.open(i as u32, i + 1 == count, aad, sealed, &mut buf[..len])
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

    /// Format `format`'s header with a fixed nonce.
    fn fixed(format: u8) -> Header {
        Header::of_format(format, [9; NONCE_LEN]).unwrap()
    }

    /// Every format's header, each with a fresh nonce.
    fn every_format() -> Vec<Header> {
        FORMATS
            .iter()
            .map(|&(_, cipher, binding)| Header::random(cipher, binding))
            .collect()
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

    /// Sealing as the bytes arrive, in writes of any size, makes exactly the bytes of sealing
    /// them at once, in both late-bound formats.
    #[test]
    fn a_sealer_makes_the_bytes_seal_makes() {
        for (&n, head) in SIZES
            .iter()
            .chain(&[2 * SEGMENT, 2 * SEGMENT + 17])
            .flat_map(|n| [(n, fixed(3)), (n, fixed(4))])
        {
            let plain = data(n);
            let want = seal_with(&key(1), b"wal/x-1", &[&plain], &head);
            for write in [1usize, 1000, SEGMENT, SEGMENT + 3, 1 << 20] {
                let mut s = Sealer::with_header(&key(1), Vec::new(), &head);
                for part in plain.chunks(write) {
                    std::io::Write::write_all(&mut s, part).unwrap();
                }
                let got = s.finish(b"wal/x-1").unwrap();
                assert!(got == want, "{n} bytes, writes of {write}, {head:?}");
                assert_eq!(open(&key(1), b"wal/x-1", &got).unwrap(), plain);
            }
        }
    }

    /// A sealer writes a late-bound format, segment by segment as the bytes arrive; such an
    /// object is bound to its key by its last segment, and is read whole.
    #[test]
    fn a_late_bound_object_is_written_as_it_comes_and_read_whole() {
        let plain = data(3 * SEGMENT + 5);
        let mut s = Sealer::new(&key(1), Cipher::NEW, Vec::new());
        std::io::Write::write_all(&mut s, &plain).unwrap();
        // Every segment but the one that may be the last is already sealed, before the key is
        // known.
        assert_eq!(s.out.len(), HEADER_LEN + 3 * (SEGMENT + TAG));
        let sealed = s.finish(b"wal/a-1").unwrap();
        let head = header(&sealed).unwrap();
        assert_eq!(sealed[MAGIC.len()], 3);
        assert_eq!(head.binding, KeyBinding::LastSegment);
        assert_eq!(open(&key(1), b"wal/a-1", &sealed).unwrap(), plain);
        // Moved to another key: the last segment says so.
        assert_eq!(
            open(&key(1), b"wal/b-1", &sealed),
            Err(EnvelopeError::Authentication(3))
        );
        // No range of it opens, not even under its own key.
        let r = 0..10;
        let stored = &sealed[..sealed_range(&r, plain.len() as u64).end as usize];
        assert_eq!(
            open_range(
                &key(1),
                b"wal/a-1",
                &head,
                plain.len() as u64,
                &r,
                &stored[HEADER_LEN..]
            ),
            Err(EnvelopeError::WholeOnly(3))
        );
        // Its format byte changed to format 2's: the first segment was sealed without the key.
        let mut relabelled = sealed.clone();
        relabelled[MAGIC.len()] = 2;
        assert_eq!(
            open(&key(1), b"wal/a-1", &relabelled),
            Err(EnvelopeError::Authentication(0))
        );
        // Format 1's cipher streams in format 4.
        let s = Sealer::new(&key(1), Cipher::XChaCha20Poly1305, Vec::new());
        assert_eq!(s.finish(b"k").unwrap()[MAGIC.len()], 4);
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
        for (&n, head) in SIZES
            .iter()
            .flat_map(|n| every_format().into_iter().map(move |h| (n, h)))
        {
            let plain = data(n);
            let (a, b) = plain.split_at(n / 3);
            let sealed = seal_with(&key(1), b"k", &[a, b], &head);
            assert_eq!(header(&sealed).unwrap(), head);
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
        for head in every_format() {
            tampering_fails(&head);
        }
    }

    fn tampering_fails(head: &Header) {
        let seal = |aad: &[u8], plain: &[u8]| seal_with(&key(3), aad, &[plain], head);
        let plain = data(2 * SEGMENT + 10);
        let sealed = seal(b"wal/a", &plain);
        assert_eq!(
            open(&key(4), b"wal/a", &sealed),
            Err(EnvelopeError::Authentication(0))
        );
        // Moved: the first segment that carries the key fails.
        let bound = match head.binding {
            KeyBinding::EverySegment => 0,
            KeyBinding::LastSegment => 2,
        };
        assert_eq!(
            open(&key(3), b"wal/b", &sealed),
            Err(EnvelopeError::Authentication(bound))
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
        let empty = seal(b"wal/e", &[]);
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
        let mut sealed = seal(b"wal/l", &large);
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
        for (format, cipher, _) in FORMATS {
            let a = seal(&key(5), cipher, b"k", &[&plain]);
            let b = seal(&key(5), cipher, b"k", &[&plain]);
            assert_ne!(a, b);
            assert_eq!(
                seal_with(&key(5), b"k", &[&plain], &fixed(format)),
                seal_with(&key(5), b"k", &[&plain], &fixed(format))
            );
        }
    }

    /// Every format is frozen: objects sealed by any release open in every later one. The
    /// digests of format 1 were taken from the release before format 2 existed, format 2's from
    /// the one before format 3.
    #[test]
    fn formats_are_frozen() {
        use sha2::Digest;
        let digest = |format, plain: &[u8]| {
            let sealed = seal_with(&key(1), b"wal/x", &[plain], &fixed(format));
            hex::encode(sha2::Sha256::digest(sealed))
        };
        let plain = data(200_000);
        assert_eq!(
            digest(1, &plain),
            "d98745d825d8cadbd0c5d3de5f313cf7e0208939726019377e1275ceb71abae9"
        );
        assert_eq!(
            digest(1, &[]),
            "aba994b153fd0ef574e3b227a49f86c3c3c9b98895e0891d335414bb64a34112"
        );
        assert_eq!(
            digest(2, &plain),
            "d64c8aae91380556130593ec80d84082c40c240913fedb45816ca0c72dc6ef05"
        );
        assert_eq!(
            digest(2, &[]),
            "0267c4a1892655b9cc2c57ed30dbf33ef5147faa32b4c126570e06d2c329e69b"
        );
        assert_eq!(
            digest(3, &plain),
            "ae68cd44c18b15064d7bc45583a0c0b2a2317371c3200c15c7e8945213488b84"
        );
        assert_eq!(
            digest(3, &[]),
            "16a12eedeb20419b0bb8d7b60e77425af7d0f8e93ab930ba5bf435f03718fea5"
        );
        assert_eq!(
            digest(4, &plain),
            "053e5d5fefbcb3b60b1f381881f86f23fe325f685b9af59f814a8e77bce0bed0"
        );
        assert_eq!(
            digest(4, &[]),
            "9e6cfdb07eb2e4e57da2515bcb1b2dc6462cbc666d63d5dc25aa483838699e2a"
        );
    }

    /// Formats 2 and 3 are STREAM over AES-256-GCM exactly as RustCrypto's `aead::stream`
    /// builds it, under the object's derived key and prefix: the nonce schedule is theirs, not
    /// ours. Format 3 differs only in the associated data of the segments before the last.
    #[test]
    fn formats_2_and_3_are_rustcrypto_stream_over_aes_256_gcm() {
        use aes_gcm::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
        for (n, head) in [0, 1, SEGMENT, 2 * SEGMENT + 17]
            .into_iter()
            .flat_map(|n| [(n, fixed(2)), (n, fixed(3))])
        {
            let object = key(1).object_key(&head.nonce);
            let stream: StreamBE32<aes_gcm::Aes256Gcm> =
                StreamBE32::new(object.key().into(), (&object.nonce_prefix()).into());
            let plain = data(n);
            let sealed = seal_with(&key(1), b"wal/x", &[&plain], &head);
            let count = segments(n as u64);
            let mut want = sealed[..HEADER_LEN].to_vec();
            for i in 0..count {
                let seg =
                    &plain[(i as usize * SEGMENT).min(n)..((i as usize + 1) * SEGMENT).min(n)];
                let mut buf = seg.to_vec();
                let last = i + 1 == count;
                let aad: &[u8] = if last || head.binding == KeyBinding::EverySegment {
                    b"wal/x"
                } else {
                    b""
                };
                stream
                    .encrypt_in_place(i as u32, last, aad, &mut buf)
                    .unwrap();
                want.extend_from_slice(&buf);
            }
            assert!(sealed == want, "{n} bytes, {head:?}");
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
