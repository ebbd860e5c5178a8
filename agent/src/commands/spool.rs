//! The spool directory: where `pgpitr-archive` remembers segments it pushed ahead of
//! PostgreSQL's request and `pgpitr-restore` keeps segments it fetched ahead. By default it is
//! `pg_wal/pgpitr_spool` in the data directory: on the same file system as `pg_wal`, so a
//! prefetched segment moves into place with a rename, and outside what base backups copy.
//! PostgreSQL ignores directories in `pg_wal` that are not its own (`archive_status`, `summaries`).
//!
//! A spooled file vouches only for the repository, cluster and data directory it was made for:
//! each lives in `<spool>/<purpose>/<binding>/`, where the binding is derived from the
//! repository's location, the cluster's system identifier and the data directory (the working
//! directory PostgreSQL runs the commands in). Two `archive_command`s into two repositories, a
//! changed `repo`, or several clusters sharing one `spool_dir` therefore never see each other's
//! markers or prefetched segments.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::Config;

/// `<spool>/<purpose>/<binding>` for a WAL path (`%p`) handed over by PostgreSQL, where
/// `purpose` is `archive` or `restore` and the binding is the first 16 hex digits of the SHA-256
/// of the repository ([`Config::repo_binding`]), `system_identifier` and the working directory.
pub fn spool_dir(
    config: &Config,
    wal_path: &Path,
    purpose: &str,
    system_identifier: u64,
) -> PathBuf {
    let base = spool_base(config, wal_path);
    let cwd = std::env::current_dir().unwrap_or_default();
    let mut h = Sha256::new();
    for part in [
        config.repo_binding().as_bytes(),
        system_identifier.to_string().as_bytes(),
        cwd.as_os_str().as_encoded_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    base.join(purpose).join(&hex::encode(h.finalize())[..16])
}

/// `spool_dir`, else `pgpitr_spool` beside the WAL path (`%p`) handed over by PostgreSQL.
fn spool_base(config: &Config, wal_path: &Path) -> PathBuf {
    match &config.spool_dir {
        Some(dir) => dir.clone(),
        None => wal_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("pgpitr_spool"),
    }
}

/// `<spool>/keys`: where `pgpitr-archive` and `pgpitr-restore` keep stretched passphrases of
/// an encrypted repository between calls (`crypto::slots`), so that each call does not spend a
/// fraction of a second on Argon2id. Mode 0700, files 0600; outside what base backups copy.
pub fn key_cache_dir(config: &Config, wal_path: &Path) -> PathBuf {
    spool_base(config, wal_path).join("keys")
}

/// Creates `dir` (and its parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(repo: &str, endpoint: Option<&str>) -> Config {
        let mut env = vec![("PGPITR_REPO".to_string(), repo.to_string())];
        if let Some(e) = endpoint {
            env.push(("PGPITR_S3_ENDPOINT".into(), e.into()));
        }
        Config::from_parts(None, None, &env).unwrap()
    }

    #[test]
    fn each_repository_and_cluster_has_its_own_spool() {
        let p = Path::new("pg_wal/000000010000000000000001");
        let a = spool_dir(&config("/a", None), p, "archive", 1);
        assert!(a.starts_with("pg_wal/pgpitr_spool/archive"), "{a:?}");
        assert_eq!(a, spool_dir(&config("/a", None), p, "archive", 1));
        let others = [
            spool_dir(&config("/b", None), p, "archive", 1),
            spool_dir(&config("/a", None), p, "archive", 2),
            spool_dir(&config("/a", None), p, "restore", 1),
            spool_dir(
                &config("s3://b/p", Some("http://one:3900")),
                p,
                "archive",
                1,
            ),
            spool_dir(
                &config("s3://b/p", Some("http://two:3900")),
                p,
                "archive",
                1,
            ),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(&a, o);
            for o2 in &others[i + 1..] {
                assert_ne!(o, o2);
            }
        }
    }
}
