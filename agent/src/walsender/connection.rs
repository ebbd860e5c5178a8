//! The physical replication connection: connecting, startup, and the simple-query commands
//! of the replication protocol (IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY).
//!
//! Protocol references: PostgreSQL docs "Streaming Replication Protocol" (protocol-replication)
//! and src/backend/replication/walsender.c (`exec_replication_command()`,
//! `IdentifySystem()`, `SendTimeLineHistory()`). A walsender accepts only the simple-query
//! protocol; every command ends with ReadyForQuery.
//!
//! Invariant: a connection whose command was interrupted (a dropped [`BaseBackupStream`], an
//! I/O or protocol error) is marked unusable and refuses further commands, because the
//! position in the message stream is unknown.
//!
//! [`BaseBackupStream`]: super::BaseBackupStream

use std::collections::HashMap;
use std::io;

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::net::{TcpStream, UnixStream};

use super::auth;
use super::base_backup::{self, BaseBackupOptions, BaseBackupStream};
use super::conninfo::{ConnectParams, SslMode};
use super::error::{classify_server_error, WalsenderError};
use super::tls::{self, Verify};
use super::version::parse_server_version_num;
use super::wire::{self, Wire};

/// CopyData payload size for UPLOAD_MANIFEST, in bytes.
const UPLOAD_PIECE: usize = 64 * 1024;

/// Result of IDENTIFY_SYSTEM (walsender.c `IdentifySystem()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (from pg_control).
    pub system_identifier: u64,
    /// Current timeline ID.
    pub timeline: u32,
    /// Current WAL flush location, `X/X` hexadecimal form (e.g. `0/3000148`).
    pub xlogpos: String,
    /// Database connected to; `None` on a physical replication connection.
    pub dbname: Option<String>,
}

/// One result set: column names and rows of raw (text-format) values.
#[derive(Debug, Default)]
pub(crate) struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<Bytes>>>,
}

/// An open physical replication (walsender) connection.
pub struct ReplicationConnection {
    pub(crate) wire: Wire,
    user: String,
    parameters: HashMap<String, String>,
    server_version_num: u32,
    backend_pid: Option<i32>,
    tls: bool,
    /// Set while a command is in flight; left set if it did not finish cleanly.
    pub(crate) busy: bool,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("user", &self.user)
            .field("server_version_num", &self.server_version_num)
            .field("backend_pid", &self.backend_pid)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How TLS is used on one connection attempt.
#[derive(Debug, Clone, Copy)]
enum Attempt {
    Plain,
    /// Ask for TLS; continue in plain text if the server says no.
    TlsIfAvailable(Verify),
    /// Ask for TLS; fail if the server says no.
    TlsRequired(Verify),
}

impl ReplicationConnection {
    /// Opens a physical replication connection (startup parameter `replication=true`).
    ///
    /// TLS follows `params.sslmode` like libpq: `disable` never asks; `allow` tries plain
    /// first and TLS if the server rejects the plain connection in pg_hba.conf; `prefer` tries
    /// TLS first and falls back to plain if the server does not support it, the handshake
    /// fails, or pg_hba.conf rejects the TLS connection; `require`, `verify-ca` and
    /// `verify-full` insist on TLS. Certificates are checked as libpq does: not at all
    /// (`require` without a root certificate file), the chain (`verify-ca`, or any mode when a
    /// root file exists), or chain and host name (`verify-full`). Unix sockets never use TLS.
    /// `connect_timeout` bounds the whole exchange.
    ///
    /// # Errors
    ///
    /// [`WalsenderError::Connect`] (network, timeout), [`WalsenderError::Tls`],
    /// [`WalsenderError::AuthFailed`], [`WalsenderError::PasswordRequired`],
    /// [`WalsenderError::NoReplicationPermission`], [`WalsenderError::TooManyWalSenders`],
    /// [`WalsenderError::Server`] for other startup failures, [`WalsenderError::Protocol`] when
    /// the server does not report a parsable `server_version`.
    pub async fn connect(params: &ConnectParams) -> Result<Self, WalsenderError> {
        match params.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, Self::connect_with_fallback(params))
                .await
                .map_err(|_| WalsenderError::Connect {
                    target: params.target(),
                    source: io::Error::new(io::ErrorKind::TimedOut, "connect_timeout expired"),
                })?,
            None => Self::connect_with_fallback(params).await,
        }
    }

    async fn connect_with_fallback(params: &ConnectParams) -> Result<Self, WalsenderError> {
        if params.is_unix_socket() {
            return Self::attempt(params, Attempt::Plain).await;
        }
        let verify = tls::verify_level(params);
        match params.sslmode {
            SslMode::Disable => Self::attempt(params, Attempt::Plain).await,
            SslMode::Allow => match Self::attempt(params, Attempt::Plain).await {
                Err(e) if rejected_by_hba(&e) => {
                    tracing::debug!("plain connection rejected ({e}); retrying with TLS");
                    Self::attempt(params, Attempt::TlsRequired(verify)).await
                }
                other => other,
            },
            SslMode::Prefer => match Self::attempt(params, Attempt::TlsIfAvailable(verify)).await {
                Err(e) if matches!(e, WalsenderError::Tls(_)) || rejected_by_hba(&e) => {
                    tracing::debug!("TLS connection failed ({e}); retrying without TLS");
                    Self::attempt(params, Attempt::Plain).await
                }
                other => other,
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                Self::attempt(params, Attempt::TlsRequired(verify)).await
            }
        }
    }

    async fn attempt(params: &ConnectParams, attempt: Attempt) -> Result<Self, WalsenderError> {
        let (stream, tls): (Box<dyn wire::Stream>, bool) = match params.socket_path() {
            Some(path) => {
                let unix =
                    UnixStream::connect(&path)
                        .await
                        .map_err(|source| WalsenderError::Connect {
                            target: path.display().to_string(),
                            source,
                        })?;
                (Box::new(unix), false)
            }
            None => {
                let mut tcp = connect_tcp(params).await?;
                match attempt {
                    Attempt::Plain => (Box::new(tcp), false),
                    Attempt::TlsIfAvailable(verify) | Attempt::TlsRequired(verify) => {
                        if tls::request_tls(&mut tcp).await? {
                            (Box::new(tls::handshake(tcp, params, verify).await?), true)
                        } else if matches!(attempt, Attempt::TlsRequired(_)) {
                            return Err(WalsenderError::Tls(format!(
                                "server at {} does not support SSL, but sslmode={} requires it",
                                params.target(),
                                params.sslmode
                            )));
                        } else {
                            (Box::new(tcp), false)
                        }
                    }
                }
            }
        };
        let mut conn = Self {
            wire: Wire::new(stream),
            user: params.user.clone(),
            parameters: HashMap::new(),
            server_version_num: 0,
            backend_pid: None,
            tls,
            busy: true,
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    /// Sends the startup message, authenticates and reads up to the first ReadyForQuery.
    async fn startup(&mut self, params: &ConnectParams) -> Result<(), WalsenderError> {
        let mut startup = vec![
            ("user", params.user.as_str()),
            ("replication", "true"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        if !params.dbname.is_empty() {
            startup.push(("database", params.dbname.as_str()));
        }
        frontend::startup_message(startup, &mut self.wire.wbuf).map_err(|e| {
            WalsenderError::InvalidArgument(format!("cannot encode startup message: {e}"))
        })?;
        self.wire.flush().await?;
        auth::authenticate(&mut self.wire, params).await?;
        loop {
            match self.wire.read_message().await? {
                Message::ParameterStatus(body) => self.set_parameter(&body)?,
                Message::BackendKeyData(body) => self.backend_pid = Some(body.process_id()),
                Message::NoticeResponse(body) => {
                    wire::log_notice(&wire::server_message(body.fields())?)
                }
                Message::ErrorResponse(body) => {
                    let msg = wire::server_message(body.fields())?;
                    return Err(classify_server_error(msg, &self.user, true));
                }
                Message::ReadyForQuery(_) => break,
                _ => {
                    return Err(WalsenderError::Protocol(
                        "unexpected message during connection startup".to_owned(),
                    ))
                }
            }
        }
        let version = self.parameter("server_version").ok_or_else(|| {
            WalsenderError::Protocol("server did not report server_version".to_owned())
        })?;
        self.server_version_num = parse_server_version_num(version).ok_or_else(|| {
            WalsenderError::Protocol(format!("cannot parse server_version {version:?}"))
        })?;
        self.busy = false;
        tracing::debug!(
            server_version = self.server_version(),
            tls = self.tls,
            "replication connection established"
        );
        Ok(())
    }

    pub(crate) fn set_parameter(
        &mut self,
        body: &postgres_protocol::message::backend::ParameterStatusBody,
    ) -> Result<(), WalsenderError> {
        let name = body.name().map_err(bad_utf8)?;
        let value = body.value().map_err(bad_utf8)?;
        self.parameters.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    /// The server's version as a number, `major * 10000 + minor` (150018 for 15.18), computed
    /// from the `server_version` startup parameter (see [`parse_server_version_num`]).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// The server's `server_version` string as reported (e.g. `15.18 (Debian 15.18-1)`).
    pub fn server_version(&self) -> &str {
        self.parameter("server_version").unwrap_or("")
    }

    /// A parameter reported by the server with ParameterStatus (`server_version`,
    /// `integer_datetimes`, `server_encoding`, `TimeZone`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The walsender's process ID on the server, from BackendKeyData.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// True if the connection is encrypted with TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The user name this connection logged in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Runs IDENTIFY_SYSTEM.
    ///
    /// # Errors
    ///
    /// Server errors, or [`WalsenderError::Protocol`] if the result does not have the
    /// documented shape (one row: systemid, timeline, xlogpos, dbname).
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, WalsenderError> {
        let row = self.single_row("IDENTIFY_SYSTEM", 4).await?;
        let text = |i: usize| -> Result<Option<String>, WalsenderError> {
            row[i].as_ref().map(|v| utf8(v.clone())).transpose()
        };
        let required = |i: usize, name: &str| -> Result<String, WalsenderError> {
            text(i)?.ok_or_else(|| {
                WalsenderError::Protocol(format!("IDENTIFY_SYSTEM returned NULL {name}"))
            })
        };
        let systemid = required(0, "systemid")?;
        let timeline = required(1, "timeline")?;
        let xlogpos = required(2, "xlogpos")?;
        check_lsn(&xlogpos)?;
        Ok(SystemIdentity {
            system_identifier: systemid.parse().map_err(|_| {
                WalsenderError::Protocol(format!("invalid system identifier {systemid:?}"))
            })?,
            timeline: parse_timeline(&timeline)?,
            xlogpos,
            dbname: text(3)?,
        })
    }

    /// Runs `SHOW name` (allowed on replication connections since PostgreSQL 10) and returns
    /// the setting's value as the server displays it (units included, e.g. `16MB`).
    ///
    /// # Errors
    ///
    /// [`WalsenderError::InvalidArgument`] if `name` is not a plain (optionally dotted)
    /// identifier; server errors such as unrecognized configuration parameter.
    pub async fn show(&mut self, name: &str) -> Result<String, WalsenderError> {
        let valid = !name.is_empty()
            && name
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !valid {
            return Err(WalsenderError::InvalidArgument(format!(
                "not a configuration parameter name: {name:?}"
            )));
        }
        let row = self.single_row(&format!("SHOW {name}"), 1).await?;
        match row.into_iter().next().flatten() {
            Some(v) => utf8(v),
            None => Err(WalsenderError::Protocol(format!(
                "SHOW {name} returned NULL"
            ))),
        }
    }

    /// Runs TIMELINE_HISTORY for timeline `tli` and returns the history file's name
    /// (`0000000N.history`) and raw contents (walsender.c `SendTimeLineHistory()`).
    ///
    /// # Errors
    ///
    /// Server errors (e.g. the file does not exist; timeline 1 has none), or
    /// [`WalsenderError::UnsafeName`] if the file name is not `<8 hex digits>.history`.
    pub async fn timeline_history(
        &mut self,
        tli: u32,
    ) -> Result<(String, Vec<u8>), WalsenderError> {
        let row = self
            .single_row(&format!("TIMELINE_HISTORY {tli}"), 2)
            .await?;
        let mut values = row.into_iter();
        let name = values.next().flatten().map(utf8).transpose()?;
        let content = values.next().flatten();
        let (Some(name), Some(content)) = (name, content) else {
            return Err(WalsenderError::Protocol(
                "TIMELINE_HISTORY returned NULL".to_owned(),
            ));
        };
        let valid = name.len() == 16
            && name.ends_with(".history")
            && name[..8].bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(WalsenderError::UnsafeName {
                what: "timeline history file name",
                value: name,
            });
        }
        Ok((name, content.to_vec()))
    }

    /// Runs a replication command (or, on a database-bound walsender, SQL) with the simple
    /// query protocol and returns all rows of all result sets as text (`None` for NULL).
    ///
    /// Not for commands that start a COPY (BASE_BACKUP, START_REPLICATION): those fail with
    /// [`WalsenderError::Protocol`] and leave the connection unusable.
    ///
    /// # Errors
    ///
    /// The classified server error (the connection stays usable), or
    /// [`WalsenderError::Protocol`] for non-UTF-8 values or unexpected messages.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, WalsenderError> {
        let sets = self.query(sql).await?;
        sets.into_iter()
            .flat_map(|set| set.rows)
            .map(|row| row.into_iter().map(|v| v.map(utf8).transpose()).collect())
            .collect()
    }

    /// Starts BASE_BACKUP; read its output with [`BaseBackupStream::next_event`].
    ///
    /// The connection is busy until the stream has returned `Finished` or an error; dropping
    /// the stream earlier leaves the connection unusable.
    ///
    /// # Errors
    ///
    /// [`WalsenderError::UnsupportedServerVersion`] before PostgreSQL 13,
    /// [`WalsenderError::InvalidArgument`] for a label with a NUL byte; I/O errors.
    pub async fn base_backup(
        &mut self,
        opts: BaseBackupOptions,
    ) -> Result<BaseBackupStream<'_>, WalsenderError> {
        let command =
            base_backup::build_command(&opts, self.server_version_num, self.server_version())?;
        self.send_query(&command).await?;
        Ok(BaseBackupStream::new(self, &opts))
    }

    /// Runs UPLOAD_MANIFEST (PostgreSQL 17+): sends `manifest`, the `backup_manifest` of the
    /// backup an incremental BASE_BACKUP on this connection is to be taken against, with the
    /// CopyIn sub-protocol (walsender.c `UploadManifest()`; the server parses and checks it
    /// in basebackup_incremental.c before ReadyForQuery).
    ///
    /// # Errors
    ///
    /// [`WalsenderError::UnsupportedServerVersion`] before 17; the classified server error
    /// (e.g. a manifest of another system) — the connection stays usable; I/O and protocol
    /// errors.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<(), WalsenderError> {
        if self.server_version_num < 170000 {
            return Err(WalsenderError::UnsupportedServerVersion {
                version: self.server_version().to_owned(),
                what: "incremental backups (PostgreSQL 17 or later)",
            });
        }
        self.send_query("UPLOAD_MANIFEST").await?;
        let mut error = None;
        loop {
            match self.wire.read_message().await? {
                Message::CopyInResponse(_) => {
                    for piece in manifest.chunks(UPLOAD_PIECE) {
                        frontend::CopyData::new(piece)
                            .map_err(|e| {
                                WalsenderError::InvalidArgument(format!(
                                    "cannot encode the manifest: {e}"
                                ))
                            })?
                            .write(&mut self.wire.wbuf);
                        self.wire.flush().await?;
                    }
                    frontend::copy_done(&mut self.wire.wbuf);
                    self.wire.flush().await?;
                }
                Message::CommandComplete(_) => {}
                Message::ErrorResponse(body) => {
                    let msg = wire::server_message(body.fields())?;
                    error = Some(classify_server_error(msg, &self.user, false));
                }
                Message::NoticeResponse(body) => {
                    wire::log_notice(&wire::server_message(body.fields())?)
                }
                Message::ParameterStatus(body) => self.set_parameter(&body)?,
                Message::ReadyForQuery(_) => {
                    self.busy = false;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                _ => return Err(unexpected_message("message in UPLOAD_MANIFEST response")),
            }
        }
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(mut self) {
        self.wire.terminate().await;
    }

    /// Sends one simple Query message, marking the connection busy.
    pub(crate) async fn send_query(&mut self, sql: &str) -> Result<(), WalsenderError> {
        if self.busy {
            return Err(WalsenderError::Protocol(
                "connection is unusable: an earlier command did not finish".to_owned(),
            ));
        }
        if sql.contains('\0') {
            return Err(WalsenderError::InvalidArgument(
                "command contains a NUL byte".to_owned(),
            ));
        }
        self.busy = true;
        frontend::query(sql, &mut self.wire.wbuf)
            .map_err(|e| WalsenderError::InvalidArgument(format!("cannot encode query: {e}")))?;
        self.wire.flush().await
    }

    /// Runs a command that returns zero or more result sets.
    pub(crate) async fn query(&mut self, sql: &str) -> Result<Vec<ResultSet>, WalsenderError> {
        self.send_query(sql).await?;
        let mut sets = Vec::new();
        let mut current: Option<ResultSet> = None;
        let mut error = None;
        loop {
            match self.wire.read_message().await? {
                Message::RowDescription(body) => {
                    sets.extend(current.take());
                    current = Some(ResultSet {
                        columns: wire::column_names(&body)?,
                        rows: Vec::new(),
                    });
                }
                Message::DataRow(body) => match current.as_mut() {
                    Some(set) => set.rows.push(wire::data_row(&body)?),
                    None => return Err(unexpected_message("DataRow without RowDescription")),
                },
                Message::CommandComplete(_) | Message::EmptyQueryResponse => {
                    sets.extend(current.take())
                }
                Message::ErrorResponse(body) => {
                    let msg = wire::server_message(body.fields())?;
                    error = Some(classify_server_error(msg, &self.user, false));
                }
                Message::NoticeResponse(body) => {
                    wire::log_notice(&wire::server_message(body.fields())?)
                }
                Message::ParameterStatus(body) => self.set_parameter(&body)?,
                Message::ReadyForQuery(_) => {
                    self.busy = false;
                    sets.extend(current.take());
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(sets),
                    };
                }
                Message::CopyOutResponse(_) | Message::CopyInResponse(_) => {
                    return Err(unexpected_message(
                        "COPY response to a simple query (use the dedicated method)",
                    ))
                }
                _ => return Err(unexpected_message("message in query response")),
            }
        }
    }

    /// Runs a command expected to return exactly one row of `columns` columns.
    async fn single_row(
        &mut self,
        sql: &str,
        columns: usize,
    ) -> Result<Vec<Option<Bytes>>, WalsenderError> {
        let mut sets = self.query(sql).await?;
        let shape_error = || {
            WalsenderError::Protocol(format!(
                "{sql} returned an unexpected result (expected one row of {columns} columns)"
            ))
        };
        if sets.len() != 1 {
            return Err(shape_error());
        }
        let set = sets.remove(0);
        match <[_; 1]>::try_from(set.rows) {
            Ok([row]) if row.len() == columns => Ok(row),
            _ => Err(shape_error()),
        }
    }

    /// Reads and discards messages until ReadyForQuery (after an error inside a command).
    pub(crate) async fn drain_to_ready(&mut self) {
        loop {
            match self.wire.read_message().await {
                Ok(Message::ReadyForQuery(_)) => {
                    self.busy = false;
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

/// True if the server refused this connection in pg_hba.conf (SQLSTATE 28000, e.g. "no
/// pg_hba.conf entry for replication connection from host ..., no encryption"), as opposed to
/// a wrong password (28P01).
fn rejected_by_hba(e: &WalsenderError) -> bool {
    matches!(e, WalsenderError::AuthFailed { sqlstate, .. } if sqlstate == "28000")
}

async fn connect_tcp(params: &ConnectParams) -> Result<TcpStream, WalsenderError> {
    let connect_error = |source| WalsenderError::Connect {
        target: params.target(),
        source,
    };
    let addrs = tokio::net::lookup_host((params.host.as_str(), params.port))
        .await
        .map_err(connect_error)?;
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Like libpq: small protocol messages should not wait for Nagle.
                stream.set_nodelay(true).map_err(connect_error)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(connect_error(last_error.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
    })))
}

pub(crate) fn utf8(value: Bytes) -> Result<String, WalsenderError> {
    String::from_utf8(value.to_vec())
        .map_err(|_| WalsenderError::Protocol("server sent a value that is not UTF-8".to_owned()))
}

fn bad_utf8(e: io::Error) -> WalsenderError {
    WalsenderError::Protocol(format!("server sent invalid text: {e}"))
}

pub(crate) fn unexpected_message(what: &str) -> WalsenderError {
    WalsenderError::Protocol(format!("unexpected {what}"))
}

/// Checks the `X/X` hexadecimal LSN form (each half at most 8 hex digits).
pub(crate) fn check_lsn(lsn: &str) -> Result<(), WalsenderError> {
    let valid = lsn.split_once('/').is_some_and(|(hi, lo)| {
        [hi, lo]
            .iter()
            .all(|h| !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if valid {
        Ok(())
    } else {
        Err(WalsenderError::Protocol(format!(
            "invalid WAL location {lsn:?} from server"
        )))
    }
}

/// Parses a timeline ID (decimal, 1 or more).
pub(crate) fn parse_timeline(s: &str) -> Result<u32, WalsenderError> {
    match s.parse::<u32>() {
        Ok(t) if t >= 1 => Ok(t),
        _ => Err(WalsenderError::Protocol(format!(
            "invalid timeline {s:?} from server"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_and_timeline_checks() {
        for good in ["0/0", "0/3000148", "FFFFFFFF/FFFFFFFF", "a/b"] {
            check_lsn(good).unwrap();
        }
        for bad in ["", "0", "/1", "1/", "0/123456789", "0/xyz", "0/1/2"] {
            assert!(check_lsn(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_timeline("1").unwrap(), 1);
        assert!(parse_timeline("0").is_err());
        assert!(parse_timeline("-1").is_err());
    }
}
