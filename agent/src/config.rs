//! Configuration: one TOML file (`--config FILE`, else `$PGPITR_CONFIG`, else
//! `/etc/pgpitr/pgpitr.toml` when it exists), then every key overridable by an environment
//! variable `PGPITR_<KEY>` (`repo` → `PGPITR_REPO`). Unknown keys and bad values are errors that
//! name the key. Credentials are never configured here: S3 uses the AWS credential chain and the
//! PostgreSQL connection uses libpq's variables and `~/.pgpass`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto::slots::Passphrase;
use crate::repo::encryption::KeyError;
use crate::storage::local::LocalStorage;
use crate::storage::s3::{S3Location, S3Storage, WriteOptions};
use crate::storage::DynStorage;

/// The system-wide default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pgpitr/pgpitr.toml";

/// Environment variables read by pgpitr itself that are not configuration keys.
const NON_KEY_VARS: &[&str] = &["PGPITR_CONFIG", "PGPITR_LOG"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The repository: an absolute directory path, or `s3://bucket/prefix`.
    pub repo: String,
    /// S3 endpoint URL for non-AWS servers, e.g. `http://127.0.0.1:3900`.
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    /// S3 region (Garage: `garage`).
    #[serde(default = "default_region")]
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS servers.
    #[serde(default)]
    pub s3_force_path_style: bool,
    /// Longest one S3 request attempt may take, connecting and reading included: `60s`, `500ms`,
    /// `2m`. A stalled server is a timeout, then a retry.
    #[serde(default = "default_s3_timeout")]
    pub s3_timeout: String,
    /// Retries of a failed S3 request after its first attempt (with exponential backoff).
    #[serde(default = "default_s3_retries")]
    pub s3_retries: u32,
    /// Server-side encryption of every object written: `AES256` or `aws:kms`.
    #[serde(default)]
    pub s3_sse: Option<String>,
    /// The KMS key of `s3_sse = "aws:kms"` (else the account's `aws/s3` key).
    #[serde(default)]
    pub s3_sse_kms_key_id: Option<String>,
    /// Storage class of every object written (`STANDARD_IA`, ...; see docs/configuration.md).
    #[serde(default)]
    pub s3_storage_class: Option<String>,
    /// S3 Object Lock of every object pgpitr writes once (WAL, packs, manifests): `governance`
    /// or `compliance`, locked for what the retention policy (`keep_*`) promises. The bucket
    /// must have Object Lock enabled. See docs/operations.md, "Immutable backups".
    #[serde(default)]
    pub s3_object_lock: Option<String>,
    /// libpq connection string for `backup` and `check`, e.g. `host=/run/postgresql user=postgres`.
    #[serde(default)]
    pub conninfo: String,
    /// Spool directory for archive batching and restore prefetching; default
    /// `pg_wal/pgpitr_spool` inside the data directory (same file system, so a rename moves a
    /// prefetched segment into place).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Most WAL files one `pgpitr-archive` call pushes ahead of PostgreSQL's request.
    #[serde(default = "default_archive_batch")]
    pub archive_batch: u32,
    /// Parallel uploads when batching.
    #[serde(default = "default_parallel")]
    pub archive_parallel: u32,
    /// Segments one `pgpitr-restore` call fetches ahead into the spool.
    #[serde(default = "default_prefetch")]
    pub restore_prefetch: u32,
    /// Parallel downloads for prefetching and `pgpitr restore`.
    #[serde(default = "default_parallel")]
    pub restore_parallel: u32,
    /// Retention for `pgpitr expire` (each overridden by its `--keep-*` option): the N newest
    /// backups.
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// Backups that stopped within this long before now: `30d`, `12h`, `2w`.
    #[serde(default)]
    pub keep_within: Option<String>,
    /// The newest backup of each of the N newest UTC days with a backup.
    #[serde(default)]
    pub keep_daily: Option<u32>,
    /// The newest backup of each of the N newest ISO weeks with a backup.
    #[serde(default)]
    pub keep_weekly: Option<u32>,
    /// The newest backup of each of the N newest months with a backup.
    #[serde(default)]
    pub keep_monthly: Option<u32>,
    /// The WAL window: continuous WAL (point-in-time recovery to any moment) for this long
    /// (`14d`; more than zero); older kept backups keep only their own WAL. Unset: all WAL from
    /// the oldest kept backup on.
    #[serde(default)]
    pub keep_wal_within: Option<String>,
    /// `pgpitr status`: the newest backup older than this is a warning, older than twice this
    /// critical (`8d`; units s, m, h, d, w).
    #[serde(default = "default_max_backup_age")]
    pub max_backup_age: String,
    /// `pgpitr status`: the newest archived WAL stored longer ago than this is a warning, twice
    /// this critical (`1h`). Keep `archive_timeout` below it, or an idle server warns.
    #[serde(default = "default_max_wal_age")]
    pub max_wal_age: String,
    /// `pgpitr status`: the last `pgpitr verify` older than this is a warning, twice this
    /// critical (`8d`).
    #[serde(default = "default_max_verify_age")]
    pub max_verify_age: String,
    /// `pgpitr status`: the last `pgpitr drill` older than this is a warning, twice this
    /// critical (`35d`).
    #[serde(default = "default_max_drill_age")]
    pub max_drill_age: String,
    /// `pgpitr metrics --listen`: how long one scan of the repository answers scrapes (`60s`;
    /// `0s` scans at every scrape).
    #[serde(default = "default_metrics_cache")]
    pub metrics_cache: String,
    /// A file holding the passphrase of an encrypted repository (one line; a trailing newline
    /// is not part of it). Unset: the repository must not be encrypted.
    #[serde(default)]
    pub encryption_passphrase_file: Option<PathBuf>,
    /// `pgpitr-archive` also stores each WAL file in every copy, and exits 0 only when every
    /// location holds it; off: copies get WAL from `pgpitr copy`.
    #[serde(default)]
    pub archive_to_copies: bool,
    /// Second locations (`[[copy]]` tables), each a complete repository of the same cluster
    /// that `pgpitr copy` fills (docs/operations.md, "A second location"). File only: no
    /// `PGPITR_*` variable names a copy.
    #[serde(default, rename = "copy", skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<CopyConfig>,
}

/// One `[[copy]]` table: a second location with its own storage settings and retention.
///
/// Every `s3_*` key it leaves out takes the main repository's value (same server, another
/// bucket needs only `repo`). Its `keep_*` keys are its own retention: when it sets any, only
/// those apply to it; when it sets none, the main repository's `keep_*` apply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// How `--to`, `--from` and `--copy` name it: 1 to 32 of `[a-z0-9_-]`, not `main`.
    pub name: String,
    /// The copy: an absolute directory path, or `s3://bucket/prefix`.
    pub repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_force_path_style: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_sse: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_sse_kms_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_storage_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
}

/// The name `--from` gives the main repository.
pub const MAIN_LOCATION: &str = "main";

fn default_region() -> String {
    "us-east-1".into()
}
fn default_s3_timeout() -> String {
    "60s".into()
}
fn default_s3_retries() -> u32 {
    crate::storage::s3::DEFAULT_RETRIES
}
fn default_max_backup_age() -> String {
    "8d".into()
}
fn default_max_wal_age() -> String {
    "1h".into()
}
fn default_max_verify_age() -> String {
    "8d".into()
}
fn default_max_drill_age() -> String {
    "35d".into()
}
fn default_metrics_cache() -> String {
    "60s".into()
}
fn default_archive_batch() -> u32 {
    16
}
fn default_parallel() -> u32 {
    3
}
fn default_prefetch() -> u32 {
    8
}

/// The type of each key, to turn environment strings into TOML values.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Int,
}

/// Keys and their types.
type Keys = &'static [(&'static str, Kind)];

/// Where a location's objects go and how they are written: the main repository's keys and
/// every `[[copy]]`'s.
const STORAGE_KEYS: Keys = &[
    ("repo", Kind::Str),
    ("s3_endpoint", Kind::Str),
    ("s3_region", Kind::Str),
    ("s3_force_path_style", Kind::Bool),
    ("s3_timeout", Kind::Str),
    ("s3_retries", Kind::Int),
    ("s3_sse", Kind::Str),
    ("s3_sse_kms_key_id", Kind::Str),
    ("s3_storage_class", Kind::Str),
];

/// Which backups a location keeps: the main repository's keys and every `[[copy]]`'s.
const RETENTION_KEYS: Keys = &[
    ("keep_last", Kind::Int),
    ("keep_within", Kind::Str),
    ("keep_daily", Kind::Int),
    ("keep_weekly", Kind::Int),
    ("keep_monthly", Kind::Int),
];

/// The keys of the configuration's top level.
const KEYS: &[Keys] = &[STORAGE_KEYS, RETENTION_KEYS, MAIN_KEYS];

/// The keys of a `[[copy]]` table.
const COPY_KEYS: &[Keys] = &[&[("name", Kind::Str)], STORAGE_KEYS, RETENTION_KEYS];

/// The key `key` among `groups`, with its type.
fn find_key(groups: &[Keys], key: &str) -> Option<(&'static str, Kind)> {
    groups
        .iter()
        .flat_map(|g| g.iter())
        .find(|(k, _)| *k == key)
        .copied()
}

/// The top level's keys that copies do not have.
const MAIN_KEYS: Keys = &[
    ("s3_object_lock", Kind::Str),
    ("conninfo", Kind::Str),
    ("spool_dir", Kind::Str),
    ("archive_batch", Kind::Int),
    ("archive_parallel", Kind::Int),
    ("restore_prefetch", Kind::Int),
    ("restore_parallel", Kind::Int),
    ("keep_wal_within", Kind::Str),
    ("max_backup_age", Kind::Str),
    ("max_wal_age", Kind::Str),
    ("max_verify_age", Kind::Str),
    ("max_drill_age", Kind::Str),
    ("metrics_cache", Kind::Str),
    ("encryption_passphrase_file", Kind::Str),
    ("archive_to_copies", Kind::Bool),
];

/// A configuration error; the message names the file or variable and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("no repository configured: set `repo` in {DEFAULT_CONFIG_PATH} (or --config FILE, or PGPITR_REPO)")]
    NoRepo,
    #[error("invalid `repo`: {message}")]
    Repo { message: String },
    #[error("invalid value for `{key}`: {message}")]
    Value { key: &'static str, message: String },
    #[error("config file {}: unknown key `{key}` (see docs/configuration.md)", path.display())]
    UnknownKey { path: PathBuf, key: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("copy {name}: {message}")]
    Copy { name: String, message: String },
    #[error("no location named `{0}`: `main` is the repository, the others are the `name`s of the [[copy]] tables")]
    NoSuchLocation(String),
}

impl ConfigError {
    /// The storage error behind this error, when opening the repository failed on storage
    /// (for exit codes that tell storage from configuration).
    pub fn storage_error(&self) -> Option<&crate::storage::StorageError> {
        match self {
            ConfigError::Key(KeyError::Storage(e)) => Some(e),
            _ => None,
        }
    }
}

impl Config {
    /// Loads the configuration as described in the module docs, from `explicit` if given.
    ///
    /// # Errors
    /// An unreadable or malformed file, an unknown key, a bad value, or no `repo` at all.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("PGPITR_"))
            .collect();
        let path = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PGPITR_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()));
        let text = match &path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        Self::from_parts(path.as_deref(), text.as_deref(), &env)
    }

    /// Builds a configuration from a file's text and `PGPITR_*` variables (pure; for tests).
    pub fn from_parts(
        path: Option<&Path>,
        text: Option<&str>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let path_buf = path.map(Path::to_path_buf).unwrap_or_default();
        let mut table: toml::Table = match text {
            Some(t) => toml::from_str(t).map_err(|e| ConfigError::Parse {
                path: path_buf.clone(),
                message: syntax_error(t, &e),
            })?,
            None => toml::Table::new(),
        };
        for (var, value) in env {
            if NON_KEY_VARS.contains(&var.as_str()) {
                continue;
            }
            let key = var.trim_start_matches("PGPITR_").to_ascii_lowercase();
            let Some((name, kind)) = find_key(KEYS, &key) else {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    message: "unknown setting (see docs/configuration.md)".into(),
                });
            };
            let bad = |what: &str| ConfigError::Env {
                var: var.clone(),
                message: format!("expected {what}"),
            };
            let v = match kind {
                Kind::Str => toml::Value::String(value.clone()),
                Kind::Bool => toml::Value::Boolean(match value.as_str() {
                    "true" | "on" | "yes" | "1" => true,
                    "false" | "off" | "no" | "0" => false,
                    _ => return Err(bad("true or false")),
                }),
                Kind::Int => {
                    toml::Value::Integer(value.parse().map_err(|_| bad("a whole number"))?)
                }
            };
            table.insert((*name).to_string(), v);
        }
        if !table.contains_key("repo") {
            return Err(ConfigError::NoRepo);
        }
        check_types(&path_buf, &table)?;
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path_buf,
                    message: value_error(&e),
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key: &'static str, v: u32| {
            if v == 0 || v > 256 {
                Err(ConfigError::Value {
                    key,
                    message: format!("{v} is outside 1..=256"),
                })
            } else {
                Ok(())
            }
        };
        positive("archive_parallel", self.archive_parallel)?;
        positive("restore_parallel", self.restore_parallel)?;
        if self.archive_batch > 1024 {
            return Err(ConfigError::Value {
                key: "archive_batch",
                message: "at most 1024".into(),
            });
        }
        if self.restore_prefetch > 1024 {
            return Err(ConfigError::Value {
                key: "restore_prefetch",
                message: "at most 1024".into(),
            });
        }
        self.s3_timeout()?;
        if self.s3_retries > MAX_S3_RETRIES {
            return Err(ConfigError::Value {
                key: "s3_retries",
                message: format!("at most {MAX_S3_RETRIES}"),
            });
        }
        self.s3_write_options()?;
        self.retention_policy()?;
        if self.s3_object_lock()?.is_some() && !self.repo.starts_with("s3://") {
            return Err(ConfigError::Value {
                key: "s3_object_lock",
                message: "only an s3:// repository can be locked (Object Lock is a feature of S3 buckets); remove it, or move the repository to a bucket with Object Lock".into(),
            });
        }
        self.keep_wal_within()?;
        self.thresholds()?;
        self.metrics_cache()?;
        let mut names = std::collections::HashSet::new();
        for copy in &self.copies {
            let valid = !copy.name.is_empty()
                && copy.name.len() <= 32
                && copy.name != MAIN_LOCATION
                && copy.name.bytes().all(|b| {
                    b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'_' || b == b'-'
                });
            let err = |message: String| ConfigError::Copy {
                name: if valid {
                    copy.name.clone()
                } else {
                    "(invalid name)".into()
                },
                message,
            };
            if !valid {
                return Err(err(
                    "`name` must be 1 to 32 of a-z, 0-9, _ and -, and not `main`".into(),
                ));
            }
            if !names.insert(copy.name.as_str()) {
                return Err(err("two [[copy]] tables have this name".into()));
            }
            let location = self.with_copy(copy);
            if location.repo.trim_end_matches('/') == self.repo.trim_end_matches('/') {
                return Err(err("`repo` is the main repository itself".into()));
            }
            location.validate().map_err(|e| err(e.to_string()))?;
        }
        match self.repo_kind()? {
            RepoKind::Local(p) if !p.is_absolute() => Err(ConfigError::Repo {
                message: "a local repository must be an absolute path (archive_command runs in the data directory)".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The configuration of location `name`: itself for `main`, else the configuration with
    /// the `[[copy]]` table `name` as its repository (see [`CopyConfig`] for what a copy
    /// inherits). Every command then works on that location as on a repository.
    ///
    /// # Errors
    /// [`ConfigError::NoSuchLocation`].
    pub fn location(&self, name: &str) -> Result<Config, ConfigError> {
        if name == MAIN_LOCATION {
            return Ok(self.clone());
        }
        self.copies
            .iter()
            .find(|c| c.name == name)
            .map(|c| self.with_copy(c))
            .ok_or_else(|| ConfigError::NoSuchLocation(name.to_string()))
    }

    /// The names of every location, the main repository first, then the copies in file order.
    pub fn location_names(&self) -> Vec<String> {
        std::iter::once(MAIN_LOCATION.to_string())
            .chain(self.copies.iter().map(|c| c.name.clone()))
            .collect()
    }

    fn with_copy(&self, c: &CopyConfig) -> Config {
        let own_retention = c.keep_last.is_some()
            || c.keep_within.is_some()
            || c.keep_daily.is_some()
            || c.keep_weekly.is_some()
            || c.keep_monthly.is_some();
        let mut out = Config {
            repo: c.repo.clone(),
            s3_endpoint: c.s3_endpoint.clone().or_else(|| self.s3_endpoint.clone()),
            s3_region: c
                .s3_region
                .clone()
                .unwrap_or_else(|| self.s3_region.clone()),
            s3_force_path_style: c.s3_force_path_style.unwrap_or(self.s3_force_path_style),
            s3_timeout: c
                .s3_timeout
                .clone()
                .unwrap_or_else(|| self.s3_timeout.clone()),
            s3_retries: c.s3_retries.unwrap_or(self.s3_retries),
            s3_sse: c.s3_sse.clone().or_else(|| self.s3_sse.clone()),
            // A copy that chooses its own encryption does not inherit the main's KMS key.
            s3_sse_kms_key_id: match &c.s3_sse {
                Some(_) => c.s3_sse_kms_key_id.clone(),
                None => c
                    .s3_sse_kms_key_id
                    .clone()
                    .or_else(|| self.s3_sse_kms_key_id.clone()),
            },
            s3_storage_class: c
                .s3_storage_class
                .clone()
                .or_else(|| self.s3_storage_class.clone()),
            copies: Vec::new(),
            ..self.clone()
        };
        if own_retention {
            out.keep_last = c.keep_last;
            out.keep_within = c.keep_within.clone();
            out.keep_daily = c.keep_daily;
            out.keep_weekly = c.keep_weekly;
            out.keep_monthly = c.keep_monthly;
        }
        out
    }

    /// `s3_timeout` as a duration.
    ///
    /// # Errors
    /// Not a whole number followed by `ms`, `s`, `m` or `h`, or outside 100ms..=1h.
    pub fn s3_timeout(&self) -> Result<std::time::Duration, ConfigError> {
        parse_timeout(&self.s3_timeout).map_err(|message| ConfigError::Value {
            key: "s3_timeout",
            message,
        })
    }

    /// `s3_sse`, `s3_sse_kms_key_id` and `s3_storage_class`, checked even for a local
    /// repository (which ignores them, like the other `s3_*` keys).
    ///
    /// # Errors
    /// See [`WriteOptions::parse`].
    pub fn s3_write_options(&self) -> Result<WriteOptions, ConfigError> {
        WriteOptions::parse(
            self.s3_sse.as_deref(),
            self.s3_sse_kms_key_id.as_deref(),
            self.s3_storage_class.as_deref(),
        )
        .map_err(|(key, message)| ConfigError::Value { key, message })
    }

    /// The WAL window of `pgpitr expire` (`keep_wal_within`), when set.
    ///
    /// # Errors
    /// A value that is not a duration, or zero.
    pub fn keep_wal_within(&self) -> Result<Option<crate::retention::KeepWithin>, ConfigError> {
        self.keep_wal_within
            .as_deref()
            .map(|w| {
                crate::retention::KeepWithin::parse_window(w).map_err(|e| ConfigError::Value {
                    key: "keep_wal_within",
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    /// `keep_last`, `keep_within`, `keep_daily`, `keep_weekly`, `keep_monthly` and
    /// `keep_wal_within` as a policy (`pgpitr expire` overrides each with its `--keep-*` option).
    ///
    /// # Errors
    /// A `keep_within` or `keep_wal_within` that is not a duration.
    pub fn retention_policy(&self) -> Result<crate::retention::RetentionPolicy, ConfigError> {
        let keep_within =
            match &self.keep_within {
                Some(w) => Some(crate::retention::KeepWithin::parse(w).map_err(|e| {
                    ConfigError::Value {
                        key: "keep_within",
                        message: e.to_string(),
                    }
                })?),
                None => None,
            };
        Ok(crate::retention::RetentionPolicy {
            keep_last: self.keep_last,
            keep_within,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_wal_within: self.keep_wal_within()?,
        })
    }

    /// `s3_object_lock` with the retention of a new object
    /// ([`crate::retention::promise::new_object_retention`]); `None` when unset or empty.
    ///
    /// # Errors
    /// A mode other than `governance` or `compliance`; a policy that promises no duration
    /// (no `keep_within`, `keep_daily`, `keep_weekly` or `keep_monthly` above 0).
    pub fn s3_object_lock(&self) -> Result<Option<crate::storage::ObjectLock>, ConfigError> {
        let Some(mode) = self
            .s3_object_lock
            .as_deref()
            .filter(|m| !m.trim().is_empty())
        else {
            return Ok(None);
        };
        let mode = crate::storage::LockMode::parse(mode).ok_or(ConfigError::Value {
            key: "s3_object_lock",
            message: "expected \"governance\" or \"compliance\"".into(),
        })?;
        let policy = self.retention_policy()?;
        let retain = crate::retention::promise::new_object_retention(&policy).ok_or(
            ConfigError::Value {
                key: "s3_object_lock",
                message: "locks objects for what the retention policy promises, and this one promises no duration: set keep_within, keep_daily, keep_weekly or keep_monthly (keep_last counts backups, not time)".into(),
            },
        )?;
        let retain_wal = crate::retention::promise::wal_retention(&policy).unwrap_or(retain);
        Ok(Some(crate::storage::ObjectLock {
            mode,
            retain,
            retain_wal,
            is_mutable: crate::repo::layout::is_mutable,
        }))
    }

    /// The age limits of `pgpitr status` (`max_backup_age`, `max_wal_age`, `max_verify_age`,
    /// `max_drill_age`), in seconds.
    ///
    /// # Errors
    /// A value that is not a positive duration.
    pub fn thresholds(&self) -> Result<crate::monitor::checks::Thresholds, ConfigError> {
        let positive = |key: &'static str, v: &str| match parse_duration(key, v)? {
            0 => Err(ConfigError::Value {
                key,
                message: "must be more than 0".into(),
            }),
            n => Ok(n),
        };
        Ok(crate::monitor::checks::Thresholds {
            backup: positive("max_backup_age", &self.max_backup_age)?,
            wal: positive("max_wal_age", &self.max_wal_age)?,
            verify: positive("max_verify_age", &self.max_verify_age)?,
            drill: positive("max_drill_age", &self.max_drill_age)?,
        })
    }

    /// `metrics_cache` as a duration.
    ///
    /// # Errors
    /// A value that is not a duration.
    pub fn metrics_cache(&self) -> Result<std::time::Duration, ConfigError> {
        parse_duration("metrics_cache", &self.metrics_cache).map(std::time::Duration::from_secs)
    }

    /// Which kind of repository `repo` names.
    pub fn repo_kind(&self) -> Result<RepoKind, ConfigError> {
        if self.repo.starts_with("s3://") {
            S3Location::parse(
                &self.repo,
                self.s3_endpoint.clone(),
                self.s3_region.clone(),
                self.s3_force_path_style,
            )
            .map_err(|message| ConfigError::Repo { message })
            .and_then(|mut loc| {
                loc.timeout = self.s3_timeout()?;
                loc.retries = self.s3_retries;
                loc.write = self.s3_write_options()?;
                loc.lock = self.s3_object_lock()?;
                Ok(RepoKind::S3(loc))
            })
        } else if self.repo.contains("://") {
            Err(ConfigError::Repo {
                message: "only local paths and s3:// URLs are supported".into(),
            })
        } else {
            Ok(RepoKind::Local(PathBuf::from(&self.repo)))
        }
    }

    /// A string that differs between any two repositories this configuration could name, for
    /// binding spooled files to their repository (`commands::spool`): a local repository's
    /// canonical path (as given when it does not exist), or an S3 repository's URL with its
    /// endpoint (or region, on AWS). Never shown to anyone.
    pub fn repo_binding(&self) -> String {
        match self.repo_kind() {
            Ok(RepoKind::Local(p)) => {
                let p = std::fs::canonicalize(&p).unwrap_or(p);
                format!("local\0{}", p.display())
            }
            _ => format!(
                "s3\0{}\0{}\0{}",
                self.s3_endpoint.as_deref().unwrap_or(""),
                self.s3_region,
                self.repo.trim_end_matches('/')
            ),
        }
    }

    /// Opens the repository's storage: reads `repo.json` and, for an encrypted repository,
    /// opens its key with the configured passphrase ([`crate::repo::encryption::open`]).
    ///
    /// # Errors
    /// A bad `repo`; an unreadable passphrase file; an encrypted repository without a
    /// passphrase, or a passphrase for an unencrypted one; a wrong passphrase; storage errors
    /// ([`ConfigError::storage_error`]).
    pub async fn storage(&self) -> Result<DynStorage, ConfigError> {
        self.storage_with_key_cache(None).await
    }

    /// [`Config::storage`], keeping stretched passphrases in the private directory
    /// `kek_cache` between processes (see `crypto::slots`).
    ///
    /// # Errors
    /// As [`Config::storage`].
    pub async fn storage_with_key_cache(
        &self,
        kek_cache: Option<&Path>,
    ) -> Result<DynStorage, ConfigError> {
        let raw = self.raw_storage().await?;
        let passphrase = self.encryption_passphrase()?;
        Ok(crate::repo::encryption::open(raw, passphrase.as_ref(), kek_cache).await?)
    }

    /// The repository's storage as it is, objects sealed or not: for `pgpitr key`, which
    /// manages the key slots (no I/O for a local directory; builds the S3 client).
    ///
    /// # Errors
    /// A bad `repo`.
    pub async fn raw_storage(&self) -> Result<DynStorage, ConfigError> {
        Ok(match self.repo_kind()? {
            RepoKind::Local(p) => std::sync::Arc::new(LocalStorage::new(p)),
            RepoKind::S3(loc) => std::sync::Arc::new(S3Storage::connect(loc).await),
        })
    }

    /// The passphrase in `encryption_passphrase_file`, `None` when unset.
    ///
    /// # Errors
    /// The file cannot be read, is empty, or is readable by every user.
    pub fn encryption_passphrase(&self) -> Result<Option<Passphrase>, ConfigError> {
        let Some(path) = &self.encryption_passphrase_file else {
            return Ok(None);
        };
        read_passphrase_file(path).map(Some)
    }
}

/// The passphrase in `path`. The messages name the setting, never the file's contents.
///
/// # Errors
/// The file cannot be read, is empty, or is readable by every user.
pub fn read_passphrase_file(path: &Path) -> Result<Passphrase, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |message: String| ConfigError::Value {
        key: "encryption_passphrase_file",
        message,
    };
    let file = std::fs::File::open(path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(err(format!(
            "{} is readable by every user; make it private (chmod o-rwx)",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::BufReader::new(file), &mut bytes)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    Passphrase::from_file_contents(bytes).map_err(|m| err(format!("{}: {m}", path.display())))
}

/// Most `s3_retries`: more would only hide an outage from `archive_command` for longer.
const MAX_S3_RETRIES: u32 = 100;

/// A timeout such as `60s`, `500ms`, `2m` or `1h`, from 100 ms to one hour. The message never
/// quotes the value.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let bad = || "expected a whole number and a unit: ms, s, m or h (e.g. 60s)".to_string();
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    match ms {
        Some(ms) if (100..=3_600_000).contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
        _ => Err("outside 100ms..=1h".into()),
    }
}

/// A duration of `key` (`30s`, `90m`, `1h`, `8d`, `2w`) in seconds; the message never quotes
/// the value.
fn parse_duration(key: &'static str, s: &str) -> Result<u64, ConfigError> {
    crate::retention::KeepWithin::parse(s)
        .map(|d| d.seconds)
        .map_err(|_| ConfigError::Value {
            key,
            message: "expected a whole number and a unit: s, m, h, d or w (e.g. 8d)".into(),
        })
}

/// Where a repository lives.
#[derive(Debug, Clone)]
pub enum RepoKind {
    Local(PathBuf),
    S3(S3Location),
}

/// A TOML syntax error as one line that names the line, column and key but never shows the
/// text: the line may hold a secret (a password in `conninfo`), and this message goes to
/// PostgreSQL's log.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return "invalid TOML syntax (the text is not shown)".into();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let key = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim())
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .map(|k| format!(" (key `{k}`)"))
        .unwrap_or_default();
    format!(
        "invalid TOML syntax at line {line}, column {column}{key}; check its quoting and escapes (\\ in a \"string\", or use a 'literal string'); the line is not shown, it may hold a secret"
    )
}

/// Each known key's value has its type (and an integer fits a `u32`), so that a wrong value is
/// reported by its key alone: toml's own message for it names neither key nor position.
/// An unknown key is named only when it looks like a key (a short bare key), since a mangled
/// line could put a secret where a key would be.
fn check_types(path: &Path, table: &toml::Table) -> Result<(), ConfigError> {
    check_table(path, table, KEYS, "")?;
    let Some(copies) = table.get("copy") else {
        return Ok(());
    };
    let bad = || ConfigError::Value {
        key: "copy",
        message: "expected [[copy]] tables (see docs/configuration.md)".into(),
    };
    for (i, copy) in copies.as_array().ok_or_else(bad)?.iter().enumerate() {
        let copy = copy.as_table().ok_or_else(bad)?;
        check_table(path, copy, COPY_KEYS, &format!("[[copy]] #{}: ", i + 1))?;
        for required in ["name", "repo"] {
            if !copy.contains_key(required) {
                return Err(ConfigError::Copy {
                    name: format!("#{}", i + 1),
                    message: format!("`{required}` is required"),
                });
            }
        }
    }
    Ok(())
}

/// [`check_types`] of one table against `keys`; `context` prefixes an unknown key's name.
fn check_table(
    path: &Path,
    table: &toml::Table,
    keys: &[Keys],
    context: &str,
) -> Result<(), ConfigError> {
    for (key, value) in table {
        if context.is_empty() && key == "copy" {
            continue;
        }
        let Some((name, kind)) = find_key(keys, key) else {
            let shown = key.len() <= 40
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            let shown = if shown {
                key.clone()
            } else {
                "(not shown)".into()
            };
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: format!("{context}{shown}"),
            });
        };
        let (ok, expected) = match kind {
            Kind::Str => (value.is_str(), "a string"),
            Kind::Bool => (value.is_bool(), "true or false"),
            Kind::Int => (
                value.as_integer().is_some_and(|i| u32::try_from(i).is_ok()),
                "a whole number from 0 to 4294967295",
            ),
        };
        if !ok {
            return Err(ConfigError::Value {
                key: name,
                message: format!("expected {expected} (the value is not shown)"),
            });
        }
    }
    Ok(())
}

/// A well-formed file whose keys or values are wrong, as one line: toml's message names the key
/// and the expected type; anything it quotes (the offending value) is left out.
fn value_error(e: &toml::de::Error) -> String {
    let text = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' | '\'' | '`' if !quoted => {
                quoted = true;
                out.push_str("(value not shown)");
            }
            '"' | '\'' | '`' => quoted = false,
            _ if !quoted => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_file() {
        let c = Config::from_parts(
            None,
            Some("repo = \"/a\"\narchive_parallel = 2\n"),
            &env(&[
                ("PGPITR_REPO", "s3://b/p"),
                ("PGPITR_S3_FORCE_PATH_STYLE", "true"),
                ("PGPITR_CONFIG", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.repo, "s3://b/p");
        assert!(c.s3_force_path_style);
        assert_eq!(c.archive_parallel, 2);
    }

    #[test]
    fn env_only_works_without_a_file() {
        let c = Config::from_parts(None, None, &env(&[("PGPITR_REPO", "/var/lib/pgpitr/repo")]))
            .unwrap();
        assert_eq!(c.restore_prefetch, 8);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::from_parts(
            Some(Path::new("/c.toml")),
            Some("repo = \"/a\"\nrepos = 1\n"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("repos"), "{e}");
        let e = Config::from_parts(
            None,
            None,
            &env(&[("PGPITR_REPO", "/a"), ("PGPITR_ARCHIVE_PARALLEL", "many")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("PGPITR_ARCHIVE_PARALLEL"), "{e}");
        let e = Config::from_parts(
            None,
            None,
            &env(&[("PGPITR_REPO", "/a"), ("PGPITR_NOPE", "1")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("PGPITR_NOPE"), "{e}");
        let e = Config::from_parts(None, Some("repo = \"/a\"\narchive_parallel = \"x\"\n"), &[])
            .unwrap_err();
        assert!(e.to_string().contains("archive_parallel"), "{e}");
        let e =
            Config::from_parts(None, None, &env(&[("PGPITR_REPO", "relative/dir")])).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        assert!(matches!(
            Config::from_parts(None, None, &[]),
            Err(ConfigError::NoRepo)
        ));
    }

    #[test]
    fn status_thresholds_and_metrics_cache() {
        let c = Config::from_parts(None, Some("repo = \"/a\"\n"), &[]).unwrap();
        let t = c.thresholds().unwrap();
        assert_eq!(
            (t.backup, t.wal, t.verify, t.drill),
            (8 * 86_400, 3600, 8 * 86_400, 35 * 86_400)
        );
        assert_eq!(c.metrics_cache().unwrap().as_secs(), 60);
        let env = vec![
            ("PGPITR_REPO".to_string(), "/a".to_string()),
            ("PGPITR_MAX_WAL_AGE".to_string(), "2s".to_string()),
            ("PGPITR_METRICS_CACHE".to_string(), "0s".to_string()),
        ];
        let c = Config::from_parts(None, None, &env).unwrap();
        assert_eq!(c.thresholds().unwrap().wal, 2);
        assert_eq!(c.metrics_cache().unwrap().as_secs(), 0);
        for (text, key) in [
            ("max_wal_age = \"0s\"", "max_wal_age"),
            ("max_backup_age = \"Zq7week\"", "max_backup_age"),
            ("max_drill_age = 35", "max_drill_age"),
            ("metrics_cache = \"Zq7\"", "metrics_cache"),
        ] {
            let e = Config::from_parts(None, Some(&format!("repo = \"/a\"\n{text}\n")), &[])
                .unwrap_err();
            let m = e.to_string();
            assert!(m.contains(key) && !m.contains("Zq7"), "{text}: {m}");
        }
    }

    #[test]
    fn s3_timeout_and_retries() {
        use std::time::Duration;
        let c = Config::from_parts(None, None, &env(&[("PGPITR_REPO", "s3://b/p")])).unwrap();
        assert_eq!(c.s3_timeout().unwrap(), Duration::from_secs(60));
        assert_eq!(c.s3_retries, 4);
        let RepoKind::S3(loc) = c.repo_kind().unwrap() else {
            panic!("not S3")
        };
        assert_eq!((loc.timeout, loc.retries), (Duration::from_secs(60), 4));
        let c = Config::from_parts(
            None,
            Some("repo = \"s3://b/p\"\ns3_timeout = \"2m\"\n"),
            &env(&[("PGPITR_S3_TIMEOUT", "1500ms"), ("PGPITR_S3_RETRIES", "0")]),
        )
        .unwrap();
        let RepoKind::S3(loc) = c.repo_kind().unwrap() else {
            panic!("not S3")
        };
        assert_eq!((loc.timeout, loc.retries), (Duration::from_millis(1500), 0));
        for (text, want) in [
            ("2s", 2000),
            ("3m", 180_000),
            ("1h", 3_600_000),
            ("100ms", 100),
        ] {
            assert_eq!(
                parse_timeout(text),
                Ok(Duration::from_millis(want)),
                "{text}"
            );
        }
        for bad in [
            "",
            "60",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            "2d",
            "50ms",
            "2h",
            "99999999999999999999h",
        ] {
            let e = Config::from_parts(
                None,
                None,
                &env(&[("PGPITR_REPO", "/a"), ("PGPITR_S3_TIMEOUT", bad)]),
            )
            .unwrap_err();
            assert!(e.to_string().contains("s3_timeout"), "{bad}: {e}");
        }
        let e =
            Config::from_parts(None, Some("repo = \"/a\"\ns3_retries = 101\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("s3_retries"), "{e}");
        let e =
            Config::from_parts(None, Some("repo = \"/a\"\ns3_timeout = 60\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("s3_timeout"), "{e}");
    }

    #[test]
    fn s3_encryption_and_storage_class() {
        use crate::storage::s3::{Class, Sse};
        let c = Config::from_parts(
            None,
            Some("repo = \"s3://b/p\"\ns3_sse = \"aws:kms\"\ns3_storage_class = \"GLACIER_IR\"\n"),
            &env(&[("PGPITR_S3_SSE_KMS_KEY_ID", "alias/backups")]),
        )
        .unwrap();
        let RepoKind::S3(loc) = c.repo_kind().unwrap() else {
            panic!("not S3")
        };
        assert_eq!(
            (loc.write.sse, loc.write.storage_class),
            (
                Some(Sse::Kms {
                    key_id: Some("alias/backups".into())
                }),
                Some(Class::GlacierIr)
            )
        );
        // An empty variable clears the file's value.
        let c = Config::from_parts(
            None,
            Some("repo = \"s3://b/p\"\ns3_storage_class = \"GLACIER_IR\"\n"),
            &env(&[("PGPITR_S3_STORAGE_CLASS", "")]),
        )
        .unwrap();
        assert_eq!(c.s3_write_options().unwrap().storage_class, None);
        // Checked for a local repository too (which ignores them, like every s3_* key).
        for (var, value, key) in [
            (
                "PGPITR_S3_STORAGE_CLASS",
                "DEEP_ARCHIVE",
                "s3_storage_class",
            ),
            ("PGPITR_S3_STORAGE_CLASS", "Zq7", "s3_storage_class"),
            ("PGPITR_S3_SSE", "Zq7", "s3_sse"),
            ("PGPITR_S3_SSE_KMS_KEY_ID", "Zq7", "s3_sse_kms_key_id"),
        ] {
            let e = Config::from_parts(None, None, &env(&[("PGPITR_REPO", "/a"), (var, value)]))
                .unwrap_err();
            let m = e.to_string();
            assert!(m.contains(key) && !m.contains("Zq7"), "{m}");
        }
        let e = Config::from_parts(
            None,
            Some("repo = \"/a\"\ns3_storage_class = \"GLACIER\"\n"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("restored by a request"), "{e}");
        let c = Config::from_parts(None, Some("repo = \"/a\"\ns3_sse = \"AES256\"\n"), &[]);
        assert!(c.is_ok());
    }

    #[test]
    fn copies_inherit_storage_keys_and_keep_their_own_retention() {
        let text = "repo = \"s3://main/p\"\ns3_endpoint = \"http://127.0.0.1:3900\"\n\
            s3_region = \"garage\"\ns3_force_path_style = true\nkeep_last = 4\n\
            [[copy]]\nname = \"dr\"\nrepo = \"s3://dr/p\"\ns3_storage_class = \"STANDARD_IA\"\nkeep_monthly = 24\n\
            [[copy]]\nname = \"disk\"\nrepo = \"/srv/copy\"\n";
        let c = Config::from_parts(None, Some(text), &[]).unwrap();
        assert_eq!(c.location_names(), ["main", "dr", "disk"]);
        let dr = c.location("dr").unwrap();
        assert_eq!(dr.repo, "s3://dr/p");
        assert_eq!(
            (
                dr.s3_endpoint.as_deref(),
                dr.s3_region.as_str(),
                dr.s3_force_path_style
            ),
            (Some("http://127.0.0.1:3900"), "garage", true)
        );
        assert_eq!(dr.s3_storage_class.as_deref(), Some("STANDARD_IA"));
        // Its own retention replaces the main's as a whole.
        assert_eq!((dr.keep_last, dr.keep_monthly), (None, Some(24)));
        assert!(dr.copies.is_empty());
        // No keep_* of its own: the main's.
        let disk = c.location("disk").unwrap();
        assert_eq!((disk.keep_last, disk.keep_monthly), (Some(4), None));
        assert_eq!(c.location("main").unwrap(), c);
        assert!(matches!(
            c.location("nope"),
            Err(ConfigError::NoSuchLocation(_))
        ));
        // A configuration with copies round-trips through TOML.
        let again = Config::from_parts(None, Some(&toml::to_string(&c).unwrap()), &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn bad_copies_are_named() {
        for (table, want) in [
            ("repo = \"/c\"", "`name` is required"),
            ("name = \"x\"", "`repo` is required"),
            ("name = \"main\"\nrepo = \"/c\"", "not `main`"),
            ("name = \"Zq7 x\"\nrepo = \"/c\"", "1 to 32"),
            ("name = \"x\"\nrepo = \"/a/\"", "the main repository itself"),
            ("name = \"x\"\nrepo = \"c\"", "absolute"),
            (
                "name = \"x\"\nrepo = \"/c\"\nkeep_within = \"soon\"",
                "keep_within",
            ),
            (
                "name = \"x\"\nrepo = \"/c\"\ns3_storage_class = \"Zq7\"",
                "s3_storage_class",
            ),
            (
                "name = \"x\"\nrepo = \"/c\"\nconninfo = \"Zq7\"",
                "[[copy]] #1: conninfo",
            ),
            (
                "name = \"x\"\nrepo = \"/c\"\nkeep_last = \"Zq7\"",
                "keep_last",
            ),
        ] {
            let text = format!("repo = \"/a\"\n[[copy]]\n{table}\n");
            let e = Config::from_parts(None, Some(&text), &[]).unwrap_err();
            let m = e.to_string();
            assert!(m.contains(want) && !m.contains("Zq7"), "{table}: {m}");
        }
        let two = "repo = \"/a\"\n[[copy]]\nname = \"x\"\nrepo = \"/c\"\n[[copy]]\nname = \"x\"\nrepo = \"/d\"\n";
        let e = Config::from_parts(None, Some(two), &[]).unwrap_err();
        assert!(e.to_string().contains("two [[copy]] tables"), "{e}");
        let e = Config::from_parts(None, Some("repo = \"/a\"\ncopy = 1\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("[[copy]] tables"), "{e}");
    }

    #[test]
    fn s3_object_lock_needs_a_bucket_and_a_policy_that_promises_time() {
        let lock = |text: &str, env_pairs: &[(&str, &str)]| {
            Config::from_parts(None, Some(text), &env(env_pairs)).map(|c| c.s3_object_lock())
        };
        let l = lock(
            "repo = \"s3://b/p\"\ns3_object_lock = \"Compliance\"\nkeep_daily = 7\nkeep_monthly = 12\n",
            &[],
        )
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(l.mode, crate::storage::LockMode::Compliance);
        assert_eq!(l.retain, std::time::Duration::from_secs(7 * 86_400));
        assert_eq!(l.retain_wal, l.retain);
        // Under a longer WAL window, WAL is locked for the window.
        let l = lock(
            "repo = \"s3://b/p\"\ns3_object_lock = \"governance\"\nkeep_daily = 7\nkeep_wal_within = \"14d\"\n",
            &[],
        )
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(l.retain, std::time::Duration::from_secs(7 * 86_400));
        assert_eq!(l.retain_wal, std::time::Duration::from_secs(14 * 86_400));
        assert!((l.is_mutable)("locks/1-2-3.lock") && !(l.is_mutable)("packs/ab/x.pack"));
        let l = lock(
            "repo = \"s3://b/p\"\nkeep_within = \"30d\"\n",
            &[("PGPITR_S3_OBJECT_LOCK", "governance")],
        )
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(l.mode, crate::storage::LockMode::Governance);
        // Empty: unset (an environment variable can clear the file's value).
        assert!(lock(
            "repo = \"s3://b/p\"\ns3_object_lock = \"compliance\"\n",
            &[("PGPITR_S3_OBJECT_LOCK", "")]
        )
        .unwrap()
        .unwrap()
        .is_none());
        for (text, want) in [
            (
                "repo = \"/var/lib/pgpitr\"\ns3_object_lock = \"governance\"\nkeep_daily = 7\n",
                "only an s3:// repository",
            ),
            (
                "repo = \"s3://b/p\"\ns3_object_lock = \"Zq7\"\nkeep_daily = 7\n",
                "\"governance\" or \"compliance\"",
            ),
            (
                "repo = \"s3://b/p\"\ns3_object_lock = \"governance\"\nkeep_last = 7\n",
                "promises no duration",
            ),
            (
                "repo = \"s3://b/p\"\ns3_object_lock = \"governance\"\n",
                "promises no duration",
            ),
        ] {
            let e = Config::from_parts(None, Some(text), &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("s3_object_lock") && e.contains(want),
                "{text}: {e}"
            );
            assert!(!e.contains("Zq7"), "{e}");
        }
    }

    #[test]
    fn retention_keys() {
        let c = Config::from_parts(
            None,
            Some("repo = \"/a\"\nkeep_last = 4\nkeep_within = \"30d\"\n"),
            &env(&[("PGPITR_KEEP_MONTHLY", "12")]),
        )
        .unwrap();
        assert_eq!(
            (c.keep_last, c.keep_within.as_deref(), c.keep_monthly),
            (Some(4), Some("30d"), Some(12))
        );
        for bad in ["keep_within = \"30 days\"", "keep_last = -1"] {
            let e = Config::from_parts(None, Some(&format!("repo = \"/a\"\n{bad}\n")), &[])
                .unwrap_err();
            assert!(e.to_string().contains(&bad[..9]), "{e}");
        }
    }

    #[test]
    fn keep_wal_within_is_a_positive_duration() {
        let c = Config::from_parts(
            None,
            Some("repo = \"/a\"\nkeep_wal_within = \"14d\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.keep_wal_within().unwrap().unwrap().seconds, 14 * 86_400);
        let c = Config::from_parts(
            None,
            None,
            &env(&[("PGPITR_REPO", "/a"), ("PGPITR_KEEP_WAL_WITHIN", "36h")]),
        )
        .unwrap();
        assert_eq!(c.keep_wal_within().unwrap().unwrap().to_string(), "36h");
        for bad in ["\"0d\"", "\"0\"", "\"two weeks\"", "\"\"", "14"] {
            let e = Config::from_parts(
                None,
                Some(&format!("repo = \"/a\"\nkeep_wal_within = {bad}\n")),
                &[],
            )
            .unwrap_err();
            assert!(e.to_string().contains("keep_wal_within"), "{bad}: {e}");
        }
    }
}

/// Hostile configuration files and variables: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// A password to look for in error messages.
    const SECRET: &str = "Zq7SecretPw";

    fn config() -> impl Strategy<Value = Config> {
        (
            (
                "/[a-zA-Z0-9_./ -]{0,30}",
                proptest::option::of("https?://[a-z0-9.]{1,20}(:[0-9]{1,5})?"),
                "[a-z0-9-]{1,12}",
                any::<bool>(),
                "\\PC{0,40}",
                proptest::option::of("/[a-zA-Z0-9_./-]{0,30}"),
            ),
            (0u32..=1024, 1u32..=256, 0u32..=1024, 1u32..=256),
            (
                proptest::option::of(any::<u32>()),
                proptest::option::of("[0-9]{1,6}[smhdw]"),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of("[1-9][0-9]{0,5}[smhdw]"),
            ),
            (
                "[1-9][0-9]{0,2}s|[1-5][0-9]?m",
                0u32..=100,
                proptest::option::of("/[a-zA-Z0-9_./-]{1,30}"),
            ),
            (
                "[1-9][0-9]{0,3}[smhdw]",
                "[1-9][0-9]{0,3}[smhdw]",
                "[1-9][0-9]{0,3}[smhdw]",
                "[1-9][0-9]{0,3}[smhdw]",
                "[0-9]{1,4}[smh]",
            ),
            (
                proptest::option::of(prop::sample::select(vec!["AES256", "aws:kms"])),
                proptest::option::of("[a-zA-Z0-9:/_-]{1,40}"),
                proptest::option::of(prop::sample::select(
                    crate::storage::s3::Class::ALL.map(|(_, n)| n).to_vec(),
                )),
            ),
        )
            .prop_map(
                |(
                    (repo, s3_endpoint, s3_region, s3_force_path_style, conninfo, spool_dir),
                    (archive_batch, archive_parallel, restore_prefetch, restore_parallel),
                    (
                        keep_last,
                        keep_within,
                        keep_daily,
                        keep_weekly,
                        keep_monthly,
                        keep_wal_within,
                    ),
                    (s3_timeout, s3_retries, encryption_passphrase_file),
                    (max_backup_age, max_wal_age, max_verify_age, max_drill_age, metrics_cache),
                    (s3_sse, kms_key_id, s3_storage_class),
                )| Config {
                    repo,
                    s3_endpoint,
                    s3_region,
                    s3_force_path_style,
                    s3_timeout,
                    s3_retries,
                    s3_sse_kms_key_id: kms_key_id.filter(|_| s3_sse == Some("aws:kms")),
                    s3_sse: s3_sse.map(str::to_string),
                    s3_storage_class: s3_storage_class.map(str::to_string),
                    s3_object_lock: None,
                    conninfo,
                    spool_dir: spool_dir.map(PathBuf::from),
                    archive_batch,
                    archive_parallel,
                    restore_prefetch,
                    restore_parallel,
                    keep_last,
                    keep_within,
                    keep_daily,
                    keep_weekly,
                    keep_monthly,
                    keep_wal_within,
                    max_backup_age,
                    max_wal_age,
                    max_verify_age,
                    max_drill_age,
                    metrics_cache,
                    encryption_passphrase_file: encryption_passphrase_file.map(PathBuf::from),
                    archive_to_copies: false,
                    copies: Vec::new(),
                },
            )
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_parts(Some(Path::new("/etc/pgpitr/pgpitr.toml")), Some(text), &[])
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn every_valid_config_round_trips_through_toml(c in config()) {
            let text = toml::to_string(&c).unwrap();
            prop_assert_eq!(parse(&text).unwrap(), c);
        }

        #[test]
        fn arbitrary_text_is_a_config_or_a_typed_error(
            text in "\\PC{0,200}|(repo|conninfo|keep_last|archive_batch|[a-z_]{1,12}) ?= ?(\"\\PC{0,20}\"?|'[ -~]{0,20}'?|-?[0-9]{1,12}|true|\\[\\PC{0,10}\\]?)\n{0,3}",
        ) {
            let _ = parse(&text);
        }

        #[test]
        fn mutated_files_never_show_the_password_in_an_error(
            c in config(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let c = Config { conninfo: format!("host=db password={SECRET} user=backup"), ..c };
            let mut bytes = toml::to_string(&c).unwrap().into_bytes();
            for (at, b) in edits {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = parse(&text) {
                prop_assert!(!e.to_string().contains(SECRET), "{}", e);
            }
        }

        #[test]
        fn arbitrary_variables_never_panic_and_are_not_quoted(
            key in prop::sample::select(KEYS.iter().flat_map(|g| g.iter()).map(|(k, _)| *k).collect::<Vec<_>>()),
            value in "Zq7\\PC{0,20}",
        ) {
            let env = vec![
                ("PGPITR_REPO".to_string(), "/var/lib/pgpitr".to_string()),
                (format!("PGPITR_{}", key.to_ascii_uppercase()), value.clone()),
            ];
            if let Err(e) = Config::from_parts(None, None, &env) {
                // `repo`, `keep_within` and `keep_wal_within` name the value they refuse, and
                // hold no secret.
                if !["repo", "keep_within", "keep_wal_within"].contains(&key) {
                    prop_assert!(!e.to_string().contains(&value), "{}", e);
                }
            }
        }
    }
}
