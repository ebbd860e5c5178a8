//! `pgpitr init`: writes a commented starter configuration and prints the `postgresql.conf`
//! lines that hand WAL to pgpitr. Never overwrites an existing file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `pgpitr init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Where to write the configuration (default: --config, then /etc/pgpitr/pgpitr.toml).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The repository to put in it: an absolute directory or s3://bucket/prefix.
    #[arg(long, default_value = "/var/lib/pgpitr/repo")]
    pub repo: String,
    /// Make the repository encrypted: write `encryption_passphrase_file` into the configuration
    /// and create the repository's key (`pgpitr key create`), with the passphrase read from
    /// that file, or asked for on the terminal and written there.
    #[arg(long)]
    pub encrypt: bool,
    /// The passphrase file for --encrypt (default: `passphrase` beside the configuration).
    #[arg(long, value_name = "FILE", requires = "encrypt")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} already exists; edit it, or choose another file with --output")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where `init` writes the configuration: --output, else --config, else the default.
pub fn config_path(config_path: Option<&Path>, args: &InitArgs) -> PathBuf {
    args.output
        .clone()
        .or_else(|| config_path.map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_CONFIG_PATH))
}

/// The passphrase file of `init --encrypt`: --passphrase-file, else `passphrase` beside the
/// configuration file.
pub fn passphrase_path(config: &Path, args: &InitArgs) -> PathBuf {
    args.passphrase_file
        .clone()
        .unwrap_or_else(|| config.parent().unwrap_or(Path::new(".")).join("passphrase"))
}

/// The starter configuration for `repo`, encrypted with the passphrase in `passphrase_file`
/// when given.
pub fn starter_config(repo: &str, passphrase_file: Option<&Path>) -> String {
    let s3 = if repo.starts_with("s3://") { "" } else { "# " };
    let encryption = match passphrase_file {
        Some(p) => format!(
            "# Encryption at rest: every object is encrypted with the repository's key, which this\n# passphrase opens. Keep a copy of the passphrase away from this host.\nencryption_passphrase_file = \"{}\"\n",
            p.display()
        ),
        None => "# Encryption at rest is chosen when the repository is created: `pgpitr init --encrypt`.\n# encryption_passphrase_file = \"/etc/pgpitr/passphrase\"\n".into(),
    };
    format!(
        r#"# pgpitr configuration. Every key can be overridden by PGPITR_<KEY> in the environment.
# Reference: docs/configuration.md

# The repository: an absolute directory owned by the PostgreSQL user, or s3://bucket/prefix.
repo = "{repo}"

# S3-compatible storage. Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, web identity, instance metadata), never from here.
{s3}s3_endpoint = "https://s3.eu-west-1.amazonaws.com"
{s3}s3_region = "eu-west-1"
{s3}s3_force_path_style = false
# Each S3 request: attempts of at most s3_timeout, retried s3_retries times with backoff.
# s3_timeout = "60s"
# s3_retries = 4
# Server-side encryption and storage class of every object written (docs/configuration.md).
# s3_sse = "AES256"                # or "aws:kms", with s3_sse_kms_key_id = "alias/..."
# s3_storage_class = "STANDARD_IA" # GLACIER and DEEP_ARCHIVE are refused
# Immutable backups: S3 Object Lock on WAL, packs and manifests, for what the keep_* policy
# promises (a bucket with Object Lock enabled; docs/operations.md, "Immutable backups").
# s3_object_lock = "governance"    # or "compliance"

# How `pgpitr backup` and `pgpitr check` reach the server (libpq syntax; PGHOST, PGUSER,
# PGPASSWORD and ~/.pgpass apply as usual). The role needs the REPLICATION attribute.
conninfo = "host=/var/run/postgresql user=postgres"

# Throughput knobs (defaults shown).
# archive_batch = 16      # WAL files one archive_command call pushes ahead
# archive_parallel = 3    # parallel uploads while doing so
# restore_prefetch = 8    # segments one restore_command call fetches ahead
# restore_parallel = 3    # parallel downloads

{encryption}"#
    )
}

/// The `postgresql.conf` lines to print, naming the installed commands by absolute path.
pub fn postgresql_conf_lines(bin_dir: &Path, config: &Path) -> String {
    let cfg = if config == Path::new(crate::config::DEFAULT_CONFIG_PATH) {
        String::new()
    } else {
        format!(" --config {}", config.display())
    };
    format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{}{cfg} %p %f'\nmax_wal_senders = 10\n",
        bin_dir.join("pgpitr-archive").display()
    )
}

/// Writes the starter file and returns the text to print.
///
/// # Errors
/// The file exists already, or cannot be written.
pub fn run(
    config_path: Option<&Path>,
    args: &InitArgs,
    bin_dir: &Path,
) -> Result<String, InitError> {
    let path = self::config_path(config_path, args);
    let passphrase = args.encrypt.then(|| passphrase_path(&path, args));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| InitError::Write {
            path: path.clone(),
            source,
        })?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                InitError::Exists(path.clone())
            } else {
                InitError::Write {
                    path: path.clone(),
                    source,
                }
            }
        })?;
    f.write_all(starter_config(&args.repo, passphrase.as_deref()).as_bytes())
        .map_err(|source| InitError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(format!(
        "wrote {}\n\nAdd to postgresql.conf (then restart PostgreSQL):\n\n{}\nThen run `pgpitr check`.\n",
        path.display(),
        postgresql_conf_lines(bin_dir, &path)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starter_config_is_valid_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpitr.toml");
        let args = InitArgs {
            output: Some(path.clone()),
            repo: "/var/lib/pgpitr/repo".into(),
            encrypt: false,
            passphrase_file: None,
        };
        let text = run(None, &args, Path::new("/usr/bin")).unwrap();
        assert!(
            text.contains("archive_command = '/usr/bin/pgpitr-archive --config"),
            "{text}"
        );
        let written = std::fs::read_to_string(&path).unwrap();
        let config = crate::config::Config::from_parts(Some(&path), Some(&written), &[]).unwrap();
        assert_eq!(config.repo, "/var/lib/pgpitr/repo");
        assert!(matches!(
            run(None, &args, Path::new("/usr/bin")),
            Err(InitError::Exists(_))
        ));
        let s3 = starter_config("s3://bucket/prefix", None);
        assert!(crate::config::Config::from_parts(None, Some(&s3), &[])
            .unwrap()
            .s3_endpoint
            .is_some());
        assert!(config.encryption_passphrase_file.is_none());
        let encrypted = starter_config("/r", Some(Path::new("/etc/pgpitr/passphrase")));
        let config = crate::config::Config::from_parts(None, Some(&encrypted), &[]).unwrap();
        assert_eq!(
            config.encryption_passphrase_file.as_deref(),
            Some(Path::new("/etc/pgpitr/passphrase"))
        );
    }
}
