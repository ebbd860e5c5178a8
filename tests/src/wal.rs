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

/// A fake data directory, as far as the archive and restore commands look at one:
/// `global/pg_control` of cluster `sysid` and `pg_wal/archive_status`, holding synthetic
/// segments of `seg_size` bytes written and marked as PostgreSQL would. Removed on drop.
pub struct FakeDataDir {
    _dir: tempfile::TempDir,
    pub pgdata: std::path::PathBuf,
    sysid: u64,
    seg_size: u32,
}

impl FakeDataDir {
    pub fn new(tag: &str, sysid: u64, seg_size: u32) -> FakeDataDir {
        let dir = crate::temp_dir(tag);
        let pgdata = dir.path().join("pgdata");
        std::fs::create_dir_all(pgdata.join("pg_wal/archive_status")).unwrap();
        std::fs::create_dir_all(pgdata.join("global")).unwrap();
        std::fs::write(
            pgdata.join("global/pg_control"),
            synthetic_pg_control(sysid),
        )
        .unwrap();
        FakeDataDir {
            _dir: dir,
            pgdata,
            sysid,
            seg_size,
        }
    }

    /// The file name of segment `segno` on timeline 1.
    pub fn segment_name(&self, segno: u64) -> String {
        let per_id = 0x1_0000_0000 / u64::from(self.seg_size);
        format!("00000001{:08X}{:08X}", segno / per_id, segno % per_id)
    }

    /// The bytes of segment `segno` filled from `seed` ([`synthetic_segment`]).
    pub fn segment_bytes(&self, segno: u64, seed: u64) -> Vec<u8> {
        synthetic_segment(self.sysid, self.seg_size, segno, seed)
    }

    /// Writes segment `segno` (filled from `seed`) into `pg_wal`; its name and bytes.
    pub fn write_segment(&self, segno: u64, seed: u64) -> (String, Vec<u8>) {
        let name = self.segment_name(segno);
        let bytes = self.segment_bytes(segno, seed);
        std::fs::write(self.pgdata.join("pg_wal").join(&name), &bytes).unwrap();
        (name, bytes)
    }

    /// `pg_wal/archive_status/<name>.<suffix>`.
    pub fn status_file(&self, name: &str, suffix: &str) -> std::path::PathBuf {
        self.pgdata
            .join("pg_wal/archive_status")
            .join(format!("{name}.{suffix}"))
    }

    /// What PostgreSQL does once a segment is complete: `<name>.ready`.
    pub fn mark_ready(&self, name: &str) {
        std::fs::write(self.status_file(name, "ready"), "").unwrap();
    }

    /// What PostgreSQL does once archive_command succeeded: `.ready` becomes `.done`.
    pub fn mark_done(&self, name: &str) {
        std::fs::rename(
            self.status_file(name, "ready"),
            self.status_file(name, "done"),
        )
        .unwrap();
    }
}
