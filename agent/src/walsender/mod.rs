//! Client for PostgreSQL's replication protocol (the walsender), used for BASE_BACKUP.
//!
//! tokio-postgres cannot open replication connections nor read the COPY output of
//! BASE_BACKUP, so this is a small client of its own on tokio and `postgres-protocol`
//! (see DESIGN.md, "The replication client"). It owns:
//!
//! - [`ConnectParams`]: libpq-compatible connection strings, environment defaults and
//!   `~/.pgpass` ([`conninfo`]);
//! - [`ReplicationConnection`]: startup with `replication=true`, authentication (trust,
//!   password, MD5, SCRAM-SHA-256), TLS per `sslmode`, and the simple-query commands
//!   IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY;
//! - [`BaseBackupStream`]: BASE_BACKUP for PostgreSQL 13 and later as a pull-based stream of
//!   [`BackupEvent`]s, with archive names and tablespace locations validated;
//! - [`WalsenderError`]: errors classified for useful hints.
//!
//! References: PostgreSQL docs "Frontend/Backend Protocol" and "Streaming Replication
//! Protocol"; src/backend/replication/walsender.c, src/backend/replication/repl_gram.y,
//! src/backend/replication/basebackup.c (13/14), src/backend/backup/basebackup.c and
//! basebackup_copy.c (15+).
//!
//! ```no_run
//! # async fn demo() -> Result<(), pgpitr::walsender::WalsenderError> {
//! use pgpitr::walsender::{BackupEvent, BaseBackupOptions, ConnectParams, ReplicationConnection};
//!
//! let params = ConnectParams::from_conninfo("host=db1 user=backup")?;
//! let mut conn = ReplicationConnection::connect(&params).await?;
//! let id = conn.identify_system().await?;
//! let mut backup = conn.base_backup(BaseBackupOptions::new("nightly")).await?;
//! while let Some(event) = backup.next_event().await? {
//!     if let BackupEvent::Finished { stop_lsn, .. } = event {
//!         println!("backup of {} done at {stop_lsn}", id.system_identifier);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod auth;
mod base_backup;
mod connection;
pub mod conninfo;
mod error;
mod pgpass;
mod tls;
mod version;
mod wire;

pub use base_backup::{
    validate_archive_name, validate_tablespace_location, BackupEvent, BaseBackupOptions,
    BaseBackupStream, TablespaceInfo,
};
pub use connection::{ReplicationConnection, SystemIdentity};
pub use conninfo::{ConnectParams, SslMode};
pub use error::WalsenderError;
pub use version::parse_server_version_num;
