//! The part index that ends every WAL object: the plain length, the SHA-256 of the plain bytes
//! (the one in the object's key) and an XXH3-128 of each part's plain bytes, so that a restore
//! can decode and verify the parts on every core and write each at its offset, instead of
//! hashing the whole file with SHA-256 on one thread.
//!
//! It is one lz4 *skippable frame* (lz4/doc/lz4_Frame_format.md, "Skippable Frames"), which
//! `lz4 -d` skips, so a WAL object stays a standard lz4 stream. Layout, integers little-endian:
//!
//! ```text
//! magic       u32   0x184D2A5E (a skippable frame)
//! size        u32   bytes that follow, up to the end of the object
//! plain_len   u64   plain bytes of the whole file
//! part_size   u32   plain bytes of every part but the last (1 MiB)
//! sha256      [32]  SHA-256 of the plain bytes
//! parts       [16]  XXH3-128 of each part's plain bytes, one per frame before the index
//! index_len   u32   bytes of the whole index, magic included
//! tag         [8]   "pgpitrPI"
//! ```
//!
//! The tag and `index_len` at the very end let a reader find the index without walking the
//! frames. An object holding no part index (written before it existed, or by another tool) is
//! verified with the SHA-256 of its key alone.

/// The magic number of the index's skippable frame.
const MAGIC: u32 = 0x184D_2A5E;
/// The last bytes of every object with a part index.
const TAG: &[u8; 8] = b"pgpitrPI";
/// Bytes of the index besides the part hashes: magic, size, plain_len, part_size, sha256,
/// index_len, tag.
const FIXED: usize = 4 + 4 + 8 + 4 + 32 + 4 + 8;

/// A parsed part index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartIndex {
    pub plain_len: u64,
    pub part_size: u32,
    pub sha256: [u8; 32],
    /// XXH3-128 of each part's plain bytes, in order; one part (empty) for an empty file.
    pub parts: Vec<u128>,
}

impl PartIndex {
    /// The number of parts a file of `plain_len` bytes is cut into: at least one.
    pub fn part_count(plain_len: u64, part_size: u32) -> usize {
        plain_len.div_ceil(u64::from(part_size)).max(1) as usize
    }

    /// Plain bytes of part `i`.
    pub fn part_len(&self, i: usize) -> usize {
        let start = i as u64 * u64::from(self.part_size);
        (self.plain_len - start).min(u64::from(self.part_size)) as usize
    }

    /// The XXH3-128 of `plain`, as the index holds it.
    pub fn hash(plain: &[u8]) -> u128 {
        twox_hash::XxHash3_128::oneshot(plain)
    }

    /// The index as stored: one skippable frame, to be appended after the frames.
    pub fn encode(&self) -> Vec<u8> {
        let len = FIXED + 16 * self.parts.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&((len - 8) as u32).to_le_bytes());
        out.extend_from_slice(&self.plain_len.to_le_bytes());
        out.extend_from_slice(&self.part_size.to_le_bytes());
        out.extend_from_slice(&self.sha256);
        for h in &self.parts {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(TAG);
        out
    }

    /// Splits `object` into its frames and its part index. `None` when the object does not end
    /// with one; `Some(Err)` when it ends with the tag but the index is malformed (a corrupt
    /// object).
    pub fn split(object: &[u8]) -> Option<Result<(&[u8], PartIndex), String>> {
        if !object.ends_with(TAG) {
            return None;
        }
        Some(Self::split_tagged(object))
    }

    fn split_tagged(object: &[u8]) -> Result<(&[u8], PartIndex), String> {
        let end = object.len() - TAG.len();
        let len = end
            .checked_sub(4)
            .and_then(|at| u32_at(object, at))
            .ok_or("truncated")? as usize;
        if len < FIXED || len > object.len() || !(len - FIXED).is_multiple_of(16) {
            return Err(format!("an index of {len} bytes"));
        }
        let index = &object[object.len() - len..];
        if u32_at(index, 0) != Some(MAGIC) || u32_at(index, 4) != Some((len - 8) as u32) {
            return Err("no skippable frame header".into());
        }
        let plain_len = u64::from_le_bytes(index[8..16].try_into().expect("8 bytes"));
        let part_size = u32_at(index, 16).expect("within FIXED");
        if part_size == 0 || part_size as usize > super::codec::MAX_FRAME_PLAIN {
            return Err(format!("parts of {part_size} bytes"));
        }
        let count = (len - FIXED) / 16;
        if count != Self::part_count(plain_len, part_size) {
            return Err(format!("{count} parts for {plain_len} bytes"));
        }
        let sha256 = index[20..52].try_into().expect("32 bytes");
        let parts = index[52..52 + 16 * count]
            .chunks_exact(16)
            .map(|h| u128::from_le_bytes(h.try_into().expect("16 bytes")))
            .collect();
        let index = PartIndex {
            plain_len,
            part_size,
            sha256,
            parts,
        };
        Ok((&object[..object.len() - len], index))
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(plain_len: u64) -> PartIndex {
        let count = PartIndex::part_count(plain_len, 1 << 20);
        PartIndex {
            plain_len,
            part_size: 1 << 20,
            sha256: [7; 32],
            parts: (0..count as u128).map(|i| i * 0x0101_0101).collect(),
        }
    }

    #[test]
    fn an_index_comes_back_from_the_end_of_its_object() {
        for plain_len in [0, 1, 1 << 20, (16 << 20) + 5] {
            let want = index(plain_len);
            let mut object = b"frames".to_vec();
            object.extend_from_slice(&want.encode());
            let (frames, got) = PartIndex::split(&object).unwrap().unwrap();
            assert_eq!(frames, b"frames");
            assert_eq!(got, want);
            let last = got.parts.len() - 1;
            assert_eq!(
                got.part_len(last) as u64,
                plain_len - last as u64 * (1 << 20)
            );
        }
    }

    #[test]
    fn objects_without_an_index_and_damaged_indexes_are_told_apart() {
        assert!(PartIndex::split(b"plain lz4 frames").is_none());
        let good = index(3 << 20).encode();
        // Any damaged byte of the fixed fields, or a cut, makes a malformed index (or none).
        for at in [0, 4, 9, 18, good.len() - 12] {
            let mut bad = good.clone();
            bad[at] ^= 0x80;
            assert!(
                !matches!(PartIndex::split(&bad), Some(Ok(_))),
                "byte {at} damaged"
            );
        }
        assert!(!matches!(PartIndex::split(&good[16..]), Some(Ok(_))));
        // A part count that does not fit the length.
        let mut wrong = index(3 << 20);
        wrong.parts.pop();
        assert!(matches!(PartIndex::split(&wrong.encode()), Some(Err(_))));
    }

    /// Found by the property tests: an object of the tag alone (or of fewer than 4 bytes
    /// before it) underflowed the offset of `index_len`.
    #[test]
    fn an_object_of_the_tag_alone_is_a_truncated_index() {
        for object in [&TAG[..], &b"xyzpgpitrPI"[..]] {
            assert_eq!(PartIndex::split(object), Some(Err("truncated".to_string())));
        }
    }

    #[test]
    fn the_index_is_an_lz4_skippable_frame() {
        let encoded = index(5).encode();
        assert!((0x184D_2A50..=0x184D_2A5F).contains(&u32_at(&encoded, 0).unwrap()));
        assert_eq!(u32_at(&encoded, 4).unwrap() as usize, encoded.len() - 8);
    }
}

/// Hostile part indexes: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn part_index() -> impl Strategy<Value = PartIndex> {
        (
            prop_oneof![0u64..(64 << 20), Just(0)],
            prop_oneof![
                Just(1u32 << 20),
                1u32..=super::super::codec::MAX_FRAME_PLAIN as u32
            ],
            any::<[u8; 32]>(),
            any::<u128>(),
        )
            .prop_filter("a few thousand parts at most", |(len, size, _, _)| {
                PartIndex::part_count(*len, *size) <= 4096
            })
            .prop_map(|(plain_len, part_size, sha256, seed)| PartIndex {
                plain_len,
                part_size,
                sha256,
                parts: (0..PartIndex::part_count(plain_len, part_size) as u128)
                    .map(|i| seed.wrapping_mul(i + 1))
                    .collect(),
            })
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(4000))]

        #[test]
        fn every_index_round_trips_after_any_frames(
            index in part_index(),
            frames in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut object = frames.clone();
            object.extend_from_slice(&index.encode());
            let (got_frames, got) = PartIndex::split(&object).unwrap().unwrap();
            prop_assert_eq!(got_frames, &frames[..]);
            prop_assert_eq!(got, index);
        }

        #[test]
        fn arbitrary_bytes_ending_with_the_tag_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut object = bytes;
            object.extend_from_slice(TAG);
            if let Some(Ok((frames, index))) = PartIndex::split(&object) {
                prop_assert_eq!(index.parts.len(), PartIndex::part_count(index.plain_len, index.part_size));
                prop_assert!(frames.len() < object.len());
            }
        }

        #[test]
        fn every_suffix_of_an_index_is_refused_without_panic(
            index in part_index(),
            cut in any::<prop::sample::Index>(),
        ) {
            let encoded = index.encode();
            let suffix = &encoded[1 + cut.index(encoded.len() - 1)..];
            prop_assert!(!matches!(PartIndex::split(suffix), Some(Ok(_))));
        }

        #[test]
        fn mutated_indexes_give_an_index_or_a_typed_error(
            index in part_index(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut object = index.encode();
            for (at, b) in edits {
                let at = at.index(object.len());
                object[at] = b;
            }
            if let Some(Ok((_, got))) = PartIndex::split(&object) {
                prop_assert_eq!(got.parts.len(), PartIndex::part_count(got.plain_len, got.part_size));
                let last = got.parts.len() - 1;
                prop_assert!(got.part_len(last) as u64 <= u64::from(got.part_size));
            }
        }
    }
}
