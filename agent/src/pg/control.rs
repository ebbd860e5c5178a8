//! `global/pg_control`: the one field pgpitr reads from it, the cluster's system identifier,
//! after checking the file's CRC.
//!
//! Layout (src/include/catalog/pg_control.h, `ControlFileData`): `system_identifier` (uint64) at
//! offset 0 and `pg_control_version` (uint32) at offset 8, on every major; the struct ends with
//! `crc` (CRC-32C of every byte before it), whose offset changes between majors. The file is
//! `PG_CONTROL_FILE_SIZE` (8192) bytes, zero-padded after the struct. Rather than carry each
//! major's struct size, [`ControlFile::parse`] finds the 4-aligned offset whose four bytes are
//! the CRC-32C of everything before them (a random match has probability 2^-32 per offset).

/// Size of `global/pg_control` (`PG_CONTROL_FILE_SIZE`, src/include/catalog/pg_control.h).
pub const CONTROL_FILE_SIZE: usize = 8192;

/// The first `pg_control_version` pgpitr reads (PostgreSQL 13's is 1300).
const MIN_CONTROL_VERSION: u32 = 1300;
/// `ControlFileData` is a few hundred bytes on every supported major; the CRC lies within this.
const MAX_CRC_OFFSET: usize = 1024;

/// What pgpitr reads from `global/pg_control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    /// `PG_CONTROL_VERSION`, e.g. 1300 for PostgreSQL 13 through 16, 1700 for 17.
    pub control_version: u32,
}

/// Why a `pg_control` was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlFileError {
    #[error("{0} bytes, expected {CONTROL_FILE_SIZE}")]
    Size(usize),
    #[error("pg_control_version {0} is not one of PostgreSQL 13 or later")]
    Version(u32),
    #[error("its CRC does not match its contents (a torn or corrupt file)")]
    Crc,
}

impl ControlFile {
    /// Reads the fields above from the bytes of `global/pg_control`.
    ///
    /// # Errors
    /// A file of the wrong size, a version before PostgreSQL 13, or no matching CRC.
    pub fn parse(bytes: &[u8]) -> Result<ControlFile, ControlFileError> {
        if bytes.len() != CONTROL_FILE_SIZE {
            return Err(ControlFileError::Size(bytes.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let control_version = u32_at(8);
        if !(MIN_CONTROL_VERSION..100_000).contains(&control_version) {
            return Err(ControlFileError::Version(control_version));
        }
        let crc_matches = (16..=MAX_CRC_OFFSET)
            .step_by(4)
            .any(|at| crc32c::crc32c(&bytes[..at]) == u32_at(at));
        if !crc_matches {
            return Err(ControlFileError::Crc);
        }
        Ok(ControlFile {
            system_identifier: u64::from_le_bytes(bytes[0..8].try_into().expect("8")),
            control_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `pg_control` as PostgreSQL writes it: the struct (here `len` bytes ending in the CRC),
    /// then zeros to 8192 bytes.
    pub(super) fn synthetic(sysid: u64, version: u32, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; CONTROL_FILE_SIZE];
        b[0..8].copy_from_slice(&sysid.to_le_bytes());
        b[8..12].copy_from_slice(&version.to_le_bytes());
        for (i, byte) in b[12..len - 4].iter_mut().enumerate() {
            *byte = (i * 7 + 3) as u8;
        }
        let crc = crc32c::crc32c(&b[..len - 4]);
        b[len - 4..len].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn reads_the_system_identifier_whatever_the_struct_size() {
        for (version, len) in [(1300, 296), (1300, 304), (1700, 320), (1800, 328)] {
            let c =
                ControlFile::parse(&synthetic(7_300_000_000_000_000_001, version, len)).unwrap();
            assert_eq!(c.system_identifier, 7_300_000_000_000_000_001);
            assert_eq!(c.control_version, version);
        }
    }

    #[test]
    fn rejects_torn_short_and_old_files() {
        let mut torn = synthetic(42, 1300, 296);
        torn[100] ^= 1;
        assert_eq!(ControlFile::parse(&torn), Err(ControlFileError::Crc));
        assert_eq!(
            ControlFile::parse(&torn[..100]),
            Err(ControlFileError::Size(100))
        );
        assert_eq!(
            ControlFile::parse(&synthetic(42, 1201, 296)),
            Err(ControlFileError::Version(1201))
        );
    }
}

/// Hostile `pg_control` files: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::tests::synthetic;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn arbitrary_bytes_of_any_length_give_a_typed_error(
            bytes in proptest::collection::vec(any::<u8>(), 0..9000),
        ) {
            match ControlFile::parse(&bytes) {
                Err(ControlFileError::Size(n)) => prop_assert_eq!(n, bytes.len()),
                Err(_) => prop_assert_eq!(bytes.len(), CONTROL_FILE_SIZE),
                Ok(_) => prop_assert!(false, "random bytes accepted"),
            }
        }

        #[test]
        fn arbitrary_file_sized_bytes_never_panic(
            head in proptest::collection::vec(any::<u8>(), 0..1100),
            version in any::<u32>(),
        ) {
            let mut bytes = vec![0u8; CONTROL_FILE_SIZE];
            bytes[..head.len()].copy_from_slice(&head);
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            let _ = ControlFile::parse(&bytes);
        }

        #[test]
        fn a_flipped_bit_in_the_struct_is_caught(
            sysid in any::<u64>(),
            version in 1300u32..2000,
            words in 5usize..256,
            bit in any::<prop::sample::Index>(),
        ) {
            let len = words * 4;
            let good = synthetic(sysid, version, len);
            let parsed = ControlFile::parse(&good).unwrap();
            prop_assert_eq!(parsed, ControlFile { system_identifier: sysid, control_version: version });
            let bit = bit.index(len * 8);
            let mut torn = good.clone();
            torn[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(ControlFile::parse(&torn).is_err());
        }
    }
}
