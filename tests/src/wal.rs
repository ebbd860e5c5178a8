//! Synthetic WAL segments with a valid long page header, for tests of the archive and restore
//! commands that need no running server.

/// A WAL segment of `seg_size` bytes for segment number `segno` of cluster `sysid` (PostgreSQL 15
/// magic), filled with pseudo-random bytes seeded by `seed` after the header.
pub fn synthetic_segment(sysid: u64, seg_size: u32, segno: u64, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; seg_size as usize];
    let mut x = seed | 1;
    for (i, byte) in b.iter_mut().enumerate().skip(40) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = if i % 4 == 0 { x as u8 } else { 0 };
    }
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&2u16.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[8..16].copy_from_slice(&(segno * u64::from(seg_size)).to_le_bytes());
    b[24..32].copy_from_slice(&sysid.to_le_bytes());
    b[32..36].copy_from_slice(&seg_size.to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

/// A `global/pg_control` of cluster `sysid` (PostgreSQL 15's `pg_control_version`), as far as
/// pgpitr reads it: the system identifier, the version and a valid CRC-32C after a struct of
/// PostgreSQL 15's size, zero-padded to 8192 bytes.
pub fn synthetic_pg_control(sysid: u64) -> Vec<u8> {
    const STRUCT_LEN: usize = 296;
    let mut b = vec![0u8; 8192];
    b[0..8].copy_from_slice(&sysid.to_le_bytes());
    b[8..12].copy_from_slice(&1300u32.to_le_bytes());
    let crc = crc32c::crc32c(&b[..STRUCT_LEN - 4]);
    b[STRUCT_LEN - 4..STRUCT_LEN].copy_from_slice(&crc.to_le_bytes());
    b
}
