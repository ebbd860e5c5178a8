//! The spool directory: where `pgpitr-archive` remembers segments it pushed ahead of
//! PostgreSQL's request and `pgpitr-restore` keeps segments it fetched ahead. By default it is
//! `pg_wal/pgpitr_spool` in the data directory: on the same file system as `pg_wal`, so a
//! prefetched segment moves into place with a rename, and outside what base backups copy.
//! PostgreSQL ignores directories in `pg_wal` that are not its own (`archive_status`, `summaries`).

use std::path::{Path, PathBuf};

use crate::config::Config;

/// `<spool>/archive` and `<spool>/restore` for a WAL path (`%p`) handed over by PostgreSQL.
pub fn spool_dir(config: &Config, wal_path: &Path, purpose: &str) -> PathBuf {
    let base = match &config.spool_dir {
        Some(dir) => dir.clone(),
        None => wal_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("pgpitr_spool"),
    };
    base.join(purpose)
}

/// Creates `dir` (and its parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
