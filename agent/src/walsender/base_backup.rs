//! BASE_BACKUP: building the command per server version and turning the server's output into
//! a pull-based stream of [`BackupEvent`]s.
//!
//! Wire forms (PostgreSQL docs, protocol-replication "BASE_BACKUP"; server side in
//! src/backend/replication/basebackup.c for 13/14, src/backend/backup/basebackup.c and
//! basebackup_copy.c for 15+; grammar in src/backend/replication/repl_gram.y):
//!
//! - **PostgreSQL 15+**: `BASE_BACKUP ( LABEL '…', … )`. The server sends the start-position
//!   result set, the tablespace result set, then ONE CopyOutResponse whose CopyData frames
//!   start with a type byte: `n` new archive (`name\0location\0`), `d` data, `p` progress
//!   (int8, bytes sent so far), `m` manifest follows; then CopyDone, the end-position result
//!   set, CommandComplete and ReadyForQuery. Each tar archive is complete (with its
//!   end-of-archive blocks).
//! - **PostgreSQL 13/14**: `BASE_BACKUP LABEL '…' PROGRESS FAST NOWAIT …` (space-separated
//!   legacy options). After the two result sets, one CopyOutResponse per tablespace, in the
//!   order of the tablespace result set (the main data directory, with NULL oid, is always
//!   last: "Add a node for the base directory at the end" in `perform_base_backup()`). Those
//!   tar streams lack the 1024-byte end-of-archive trailer — this module appends it — and
//!   may contain empty CopyData frames. The manifest comes in one more CopyOutResponse.
//!
//! In both forms a base backup is only [`BackupEvent::Finished`] after CommandComplete and
//! ReadyForQuery: errors such as "checksum verification failure during base backup" are
//! raised after the end-position result set has been sent.
//!
//! Invariants: every archive name is `base.tar` or `<oid>.tar` and every tablespace location
//! is an absolute path without `..` (both checked before they are handed out); each
//! `ArchiveStart` is followed by its data and one `ArchiveEnd`; every tablespace in the
//! `Tablespaces` event gets exactly one archive.

use std::collections::VecDeque;
use std::path::{Component, Path};

use bytes::Bytes;
use postgres_protocol::message::backend::Message;

use super::connection::{
    check_lsn, parse_timeline, unexpected_message, utf8, ReplicationConnection, ResultSet,
};
use super::error::{classify_server_error, WalsenderError};
use super::wire;

/// Options of one BASE_BACKUP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupOptions {
    /// Backup label (stored in `backup_label`; the server limits it to 1023 bytes).
    pub label: String,
    /// Request an immediate checkpoint instead of a spread one (`CHECKPOINT 'fast'` / `FAST`).
    pub fast_checkpoint: bool,
    /// Wait until the WAL needed by the backup is archived (`WAIT true`; `false` sends
    /// `WAIT false` / `NOWAIT`). Only effective when the server archives WAL.
    pub wait_for_wal: bool,
    /// Ask for a backup manifest with CRC-32C file checksums (`MANIFEST 'yes'`,
    /// `MANIFEST_CHECKSUMS 'CRC32C'`: PostgreSQL's default, and the cheapest for the server).
    pub manifest: bool,
    /// Ask for size estimates and (15+) progress messages (`PROGRESS`). Costs a scan of the
    /// data directory before the backup starts.
    pub progress: bool,
    /// Server-side rate limit in kB/s (`MAX_RATE`; the server accepts 32 to 1048576).
    pub max_rate: Option<u32>,
    /// Put a `tablespace_map` file in `base.tar` instead of the `pg_tblspc` symlinks
    /// (`TABLESPACE_MAP`), as `pg_basebackup -Ft` does.
    pub tablespace_map: bool,
    /// An incremental backup against the manifest uploaded before on the same connection
    /// ([`ReplicationConnection::upload_manifest`]); PostgreSQL 17+ (`INCREMENTAL`).
    pub incremental: bool,
}

impl BaseBackupOptions {
    /// Options with `label` and the defaults: spread checkpoint, wait for WAL, manifest,
    /// no progress, no rate limit, tablespace map.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            fast_checkpoint: false,
            wait_for_wal: true,
            manifest: true,
            progress: false,
            max_rate: None,
            tablespace_map: true,
            incremental: false,
        }
    }
}

/// One tablespace of the backup, from the tablespace result set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// Tablespace OID; `None` for the main data directory.
    pub oid: Option<u32>,
    /// Absolute location on the server; `None` for the main data directory.
    pub location: Option<String>,
    /// Estimated size in bytes (sent in kB by the server); only with `progress`.
    pub size_estimate_bytes: Option<u64>,
}

/// One step of a running base backup, in server order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The backup started at this WAL location (`X/X`) and timeline.
    Started {
        /// Start WAL location, `X/X`.
        start_lsn: String,
        /// Timeline at the start.
        timeline: u32,
    },
    /// The tablespaces that will be sent, one archive each (main data directory last).
    Tablespaces(Vec<TablespaceInfo>),
    /// A tar archive begins: `base.tar` for the data directory, `<oid>.tar` for a tablespace.
    ArchiveStart {
        /// Validated archive name.
        name: String,
        /// Validated absolute tablespace location; `None` for `base.tar`.
        tablespace_location: Option<String>,
    },
    /// Next bytes of the current tar archive.
    ArchiveData(Bytes),
    /// The current archive is complete (a terminated tar stream).
    ArchiveEnd,
    /// Next bytes of the `backup_manifest` (JSON).
    ManifestData(Bytes),
    /// Bytes sent so far by the server (PostgreSQL 15+ only, with `progress`).
    Progress {
        /// Bytes of archive data sent so far.
        bytes_done: u64,
    },
    /// The backup completed successfully; the last event.
    Finished {
        /// End WAL location, `X/X`.
        stop_lsn: String,
        /// Timeline at the end.
        timeline: u32,
    },
}

/// The 1024 zero bytes that end a tar archive (two 512-byte blocks).
static TAR_TRAILER: [u8; 1024] = [0; 1024];

/// Builds the BASE_BACKUP command for `server_version_num`.
///
/// # Errors
///
/// [`WalsenderError::UnsupportedServerVersion`] before 13 (no manifests), or before 17 for an
/// incremental backup;
/// [`WalsenderError::InvalidArgument`] for a label containing a NUL byte.
pub(crate) fn build_command(
    opts: &BaseBackupOptions,
    server_version_num: u32,
    server_version: &str,
) -> Result<String, WalsenderError> {
    if server_version_num < 130000 {
        return Err(WalsenderError::UnsupportedServerVersion {
            version: server_version.to_owned(),
            what: "BASE_BACKUP",
        });
    }
    if opts.incremental && server_version_num < 170000 {
        return Err(WalsenderError::UnsupportedServerVersion {
            version: server_version.to_owned(),
            what: "incremental backups (PostgreSQL 17 or later)",
        });
    }
    let label = quote_literal(&opts.label)?;
    let mut parts: Vec<String> = Vec::new();
    if server_version_num >= 150000 {
        parts.push(format!("LABEL {label}"));
        if opts.progress {
            parts.push("PROGRESS".to_owned());
        }
        if opts.fast_checkpoint {
            parts.push("CHECKPOINT 'fast'".to_owned());
        }
        parts.push(format!("WAIT {}", opts.wait_for_wal));
        if let Some(rate) = opts.max_rate {
            parts.push(format!("MAX_RATE {rate}"));
        }
        if opts.tablespace_map {
            parts.push("TABLESPACE_MAP".to_owned());
        }
        if opts.manifest {
            parts.push("MANIFEST 'yes'".to_owned());
            parts.push("MANIFEST_CHECKSUMS 'CRC32C'".to_owned());
        }
        parts.push("TARGET 'client'".to_owned());
        if opts.incremental {
            parts.push("INCREMENTAL".to_owned());
        }
        Ok(format!("BASE_BACKUP ( {} )", parts.join(", ")))
    } else {
        parts.push(format!("LABEL {label}"));
        if opts.progress {
            parts.push("PROGRESS".to_owned());
        }
        if opts.fast_checkpoint {
            parts.push("FAST".to_owned());
        }
        if !opts.wait_for_wal {
            parts.push("NOWAIT".to_owned());
        }
        if let Some(rate) = opts.max_rate {
            parts.push(format!("MAX_RATE {rate}"));
        }
        if opts.tablespace_map {
            parts.push("TABLESPACE_MAP".to_owned());
        }
        if opts.manifest {
            parts.push("MANIFEST 'yes'".to_owned());
            parts.push("MANIFEST_CHECKSUMS 'CRC32C'".to_owned());
        }
        Ok(format!("BASE_BACKUP {}", parts.join(" ")))
    }
}

/// Quotes a string literal for the replication grammar: `'` doubled, no backslash escapes
/// (src/backend/replication/repl_scan.l, `xqdouble`).
fn quote_literal(s: &str) -> Result<String, WalsenderError> {
    if s.contains('\0') {
        return Err(WalsenderError::InvalidArgument(
            "backup label contains a NUL byte".to_owned(),
        ));
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}

/// Checks an archive name from the server: `base.tar` or `<oid>.tar`.
///
/// # Errors
///
/// [`WalsenderError::UnsafeName`] for anything else (paths, `..`, compression suffixes).
pub fn validate_archive_name(name: &str) -> Result<(), WalsenderError> {
    let ok = name == "base.tar"
        || name.strip_suffix(".tar").is_some_and(|oid| {
            !oid.is_empty()
                && oid.len() <= 10
                && oid.parse::<u32>().is_ok()
                && oid.bytes().all(|b| b.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(WalsenderError::UnsafeName {
            what: "archive name",
            value: name.to_owned(),
        })
    }
}

/// Checks a tablespace location from the server: an absolute path without `.` or `..`
/// components.
///
/// # Errors
///
/// [`WalsenderError::UnsafeName`] otherwise (relative paths include PostgreSQL 15+
/// "in-place" tablespaces, a developer feature).
pub fn validate_tablespace_location(location: &str) -> Result<(), WalsenderError> {
    let path = Path::new(location);
    let ok = path.is_absolute()
        && !location.contains('\0')
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !location.split('/').any(|c| c == "." || c == "..");
    if ok {
        Ok(())
    } else {
        Err(WalsenderError::UnsafeName {
            what: "tablespace location",
            value: location.to_owned(),
        })
    }
}

/// Where the stream is in the server's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the start-position and tablespace result sets.
    Header,
    /// PostgreSQL 15+: inside the single COPY stream.
    Copy { archive_open: bool, manifest: bool },
    /// PostgreSQL 13/14: inside the COPY of one tablespace archive.
    LegacyArchive,
    /// PostgreSQL 13/14: inside the COPY of the manifest.
    LegacyManifest,
    /// Between or after the COPY streams.
    AfterCopy,
    /// `Finished` or an error was returned.
    Done,
}

/// The output of a running BASE_BACKUP; pull events with [`next_event`](Self::next_event).
#[derive(Debug)]
pub struct BaseBackupStream<'a> {
    conn: &'a mut ReplicationConnection,
    legacy: bool,
    manifest_requested: bool,
    phase: Phase,
    pending: VecDeque<BackupEvent>,
    current_set: Option<ResultSet>,
    result_sets: usize,
    tablespaces: Vec<TablespaceInfo>,
    archives: usize,
    manifest_seen: bool,
    end: Option<(String, u32)>,
}

impl<'a> BaseBackupStream<'a> {
    pub(crate) fn new(conn: &'a mut ReplicationConnection, opts: &BaseBackupOptions) -> Self {
        let legacy = conn.server_version_num() < 150000;
        Self {
            conn,
            legacy,
            manifest_requested: opts.manifest,
            phase: Phase::Header,
            pending: VecDeque::new(),
            current_set: None,
            result_sets: 0,
            tablespaces: Vec::new(),
            archives: 0,
            manifest_seen: false,
            end: None,
        }
    }

    /// Returns the next event, or `None` after `Finished` (or after an error was returned).
    ///
    /// Cancel-safe only in the sense that dropping the stream is allowed; the connection is
    /// then unusable.
    ///
    /// # Errors
    ///
    /// Server errors (classified; e.g. [`WalsenderError::WalLevelMinimal`], or
    /// [`WalsenderError::Server`] with SQLSTATE XX001 for a data checksum failure) — the
    /// connection stays usable after those; [`WalsenderError::UnsafeName`] for a bad archive
    /// name or location, [`WalsenderError::Protocol`] for unexpected output, and I/O errors,
    /// after which the connection is unusable.
    pub async fn next_event(&mut self) -> Result<Option<BackupEvent>, WalsenderError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            if self.phase == Phase::Done {
                return Ok(None);
            }
            let msg = match self.conn.wire.read_message().await {
                Ok(m) => m,
                Err(e) => return Err(self.fail(e)),
            };
            if let Err(e) = self.handle(msg).await {
                return Err(self.fail(e));
            }
        }
    }

    fn fail(&mut self, e: WalsenderError) -> WalsenderError {
        self.phase = Phase::Done;
        self.pending.clear();
        e
    }

    async fn handle(&mut self, msg: Message) -> Result<(), WalsenderError> {
        match msg {
            Message::RowDescription(body) => {
                self.close_result_set()?;
                self.current_set = Some(ResultSet {
                    columns: wire::column_names(&body)?,
                    rows: Vec::new(),
                });
            }
            Message::DataRow(body) => match self.current_set.as_mut() {
                Some(set) => set.rows.push(wire::data_row(&body)?),
                None => return Err(unexpected_message("DataRow without RowDescription")),
            },
            Message::CommandComplete(_) => self.close_result_set()?,
            Message::CopyOutResponse(_) => {
                self.close_result_set()?;
                self.begin_copy()?;
            }
            Message::CopyData(body) => self.copy_data(body.into_bytes())?,
            Message::CopyDone => self.end_copy()?,
            Message::ErrorResponse(body) => {
                let msg = wire::server_message(body.fields())?;
                let err = classify_server_error(msg, self.conn.user(), false);
                self.conn.drain_to_ready().await;
                return Err(err);
            }
            Message::NoticeResponse(body) => {
                wire::log_notice(&wire::server_message(body.fields())?)
            }
            Message::ParameterStatus(body) => self.conn.set_parameter(&body)?,
            Message::ReadyForQuery(_) => self.ready()?,
            _ => return Err(unexpected_message("message in BASE_BACKUP output")),
        }
        Ok(())
    }

    /// Interprets a completed result set by position: start, tablespaces, end.
    fn close_result_set(&mut self) -> Result<(), WalsenderError> {
        let Some(set) = self.current_set.take() else {
            return Ok(());
        };
        self.result_sets += 1;
        match (self.phase, self.result_sets) {
            (Phase::Header, 1) => {
                let (lsn, tli) = position(set, "start")?;
                self.pending.push_back(BackupEvent::Started {
                    start_lsn: lsn,
                    timeline: tli,
                });
            }
            (Phase::Header, 2) => {
                self.tablespaces = tablespaces(set)?;
                self.pending
                    .push_back(BackupEvent::Tablespaces(self.tablespaces.clone()));
            }
            (Phase::AfterCopy, _) if self.end.is_none() => {
                self.end = Some(position(set, "end")?);
            }
            _ => return Err(unexpected_message("result set in BASE_BACKUP output")),
        }
        Ok(())
    }

    fn begin_copy(&mut self) -> Result<(), WalsenderError> {
        let header_done = self.result_sets == 2;
        match self.phase {
            Phase::Header if header_done && !self.legacy => {
                self.phase = Phase::Copy {
                    archive_open: false,
                    manifest: false,
                };
            }
            Phase::Header | Phase::AfterCopy
                if header_done && self.legacy && self.end.is_none() && !self.manifest_seen =>
            {
                if let Some(ts) = self.tablespaces.get(self.archives) {
                    let name = match ts.oid {
                        Some(oid) => format!("{oid}.tar"),
                        None => "base.tar".to_owned(),
                    };
                    self.pending.push_back(BackupEvent::ArchiveStart {
                        name,
                        tablespace_location: ts.location.clone(),
                    });
                    self.archives += 1;
                    self.phase = Phase::LegacyArchive;
                } else if self.manifest_requested {
                    self.manifest_seen = true;
                    self.phase = Phase::LegacyManifest;
                } else {
                    return Err(unexpected_message(
                        "extra COPY stream in BASE_BACKUP output",
                    ));
                }
            }
            _ => return Err(unexpected_message("CopyOutResponse in BASE_BACKUP output")),
        }
        Ok(())
    }

    fn copy_data(&mut self, data: Bytes) -> Result<(), WalsenderError> {
        match self.phase {
            Phase::LegacyArchive if !data.is_empty() => {
                self.pending.push_back(BackupEvent::ArchiveData(data))
            }
            Phase::LegacyManifest if !data.is_empty() => {
                self.pending.push_back(BackupEvent::ManifestData(data))
            }
            // PostgreSQL 13 sends empty CopyData frames.
            Phase::LegacyArchive | Phase::LegacyManifest => {}
            Phase::Copy {
                archive_open,
                manifest,
            } => self.copy_message(data, archive_open, manifest)?,
            _ => return Err(unexpected_message("CopyData outside COPY")),
        }
        Ok(())
    }

    /// One typed message of the PostgreSQL 15+ COPY stream (basebackup_copy.c).
    fn copy_message(
        &mut self,
        data: Bytes,
        archive_open: bool,
        manifest: bool,
    ) -> Result<(), WalsenderError> {
        let Some(&kind) = data.first() else {
            return Ok(());
        };
        let payload = data.slice(1..);
        match kind {
            b'n' => {
                if manifest {
                    return Err(unexpected_message("archive after the manifest"));
                }
                let (name, location) = parse_new_archive(&payload)?;
                validate_archive_name(&name)?;
                let location = if location.is_empty() {
                    None
                } else {
                    validate_tablespace_location(&location)?;
                    Some(location)
                };
                if archive_open {
                    self.pending.push_back(BackupEvent::ArchiveEnd);
                }
                self.archives += 1;
                self.pending.push_back(BackupEvent::ArchiveStart {
                    name,
                    tablespace_location: location,
                });
                self.phase = Phase::Copy {
                    archive_open: true,
                    manifest: false,
                };
            }
            b'd' if payload.is_empty() => {}
            b'd' if manifest => self.pending.push_back(BackupEvent::ManifestData(payload)),
            b'd' if archive_open => self.pending.push_back(BackupEvent::ArchiveData(payload)),
            b'd' => return Err(unexpected_message("archive data before any archive")),
            b'p' => {
                let bytes: [u8; 8] = payload[..].try_into().map_err(|_| {
                    WalsenderError::Protocol("malformed progress message".to_owned())
                })?;
                let done = i64::from_be_bytes(bytes);
                let bytes_done = u64::try_from(done)
                    .map_err(|_| WalsenderError::Protocol(format!("negative progress {done}")))?;
                self.pending.push_back(BackupEvent::Progress { bytes_done });
            }
            b'm' => {
                if manifest {
                    return Err(unexpected_message("second manifest"));
                }
                if archive_open {
                    self.pending.push_back(BackupEvent::ArchiveEnd);
                }
                self.manifest_seen = true;
                self.phase = Phase::Copy {
                    archive_open: false,
                    manifest: true,
                };
            }
            other => {
                return Err(WalsenderError::Protocol(format!(
                    "unknown message type {:?} in BASE_BACKUP stream",
                    char::from(other)
                )))
            }
        }
        Ok(())
    }

    fn end_copy(&mut self) -> Result<(), WalsenderError> {
        match self.phase {
            Phase::Copy { archive_open, .. } => {
                if archive_open {
                    self.pending.push_back(BackupEvent::ArchiveEnd);
                }
            }
            Phase::LegacyArchive => {
                self.pending
                    .push_back(BackupEvent::ArchiveData(Bytes::from_static(&TAR_TRAILER)));
                self.pending.push_back(BackupEvent::ArchiveEnd);
            }
            Phase::LegacyManifest => {}
            _ => return Err(unexpected_message("CopyDone outside COPY")),
        }
        self.phase = Phase::AfterCopy;
        Ok(())
    }

    /// ReadyForQuery: the command is over; check completeness and emit `Finished`.
    fn ready(&mut self) -> Result<(), WalsenderError> {
        self.conn.busy = false;
        self.close_result_set()?;
        let Some((stop_lsn, timeline)) = self.end.take() else {
            return Err(WalsenderError::Protocol(
                "server ended BASE_BACKUP without reporting the end position".to_owned(),
            ));
        };
        if self.phase != Phase::AfterCopy {
            return Err(unexpected_message(
                "end of BASE_BACKUP inside a COPY stream",
            ));
        }
        if self.archives != self.tablespaces.len() {
            return Err(WalsenderError::Protocol(format!(
                "server sent {} archives for {} tablespaces",
                self.archives,
                self.tablespaces.len()
            )));
        }
        if self.manifest_requested && !self.manifest_seen {
            return Err(WalsenderError::Protocol(
                "server did not send the requested backup manifest".to_owned(),
            ));
        }
        self.pending
            .push_back(BackupEvent::Finished { stop_lsn, timeline });
        self.phase = Phase::Done;
        Ok(())
    }
}

/// Parses a start/end position result set: one row `(recptr text, tli)`.
fn position(set: ResultSet, which: &str) -> Result<(String, u32), WalsenderError> {
    let shape = || {
        WalsenderError::Protocol(format!(
            "malformed {which} position result set (columns: {})",
            set.columns.join(", ")
        ))
    };
    let [row] = <[_; 1]>::try_from(set.rows).map_err(|_| shape())?;
    let [Some(lsn), Some(tli)] = <[_; 2]>::try_from(row).map_err(|_| shape())? else {
        return Err(shape());
    };
    let lsn = utf8(lsn)?;
    check_lsn(&lsn)?;
    Ok((lsn, parse_timeline(&utf8(tli)?)?))
}

/// Parses the tablespace result set: rows `(spcoid, spclocation, size in kB)`.
fn tablespaces(set: ResultSet) -> Result<Vec<TablespaceInfo>, WalsenderError> {
    let columns = set.columns.join(", ");
    let shape = || {
        WalsenderError::Protocol(format!(
            "malformed tablespace result set (columns: {columns})"
        ))
    };
    let mut out = Vec::with_capacity(set.rows.len());
    for row in set.rows {
        let [oid, location, size] = <[_; 3]>::try_from(row).map_err(|_| shape())?;
        let oid = oid
            .map(utf8)
            .transpose()?
            .map(|s| s.parse::<u32>().map_err(|_| shape()))
            .transpose()?;
        let location = location.map(utf8).transpose()?.filter(|l| !l.is_empty());
        if let Some(l) = &location {
            validate_tablespace_location(l)?;
        }
        if oid.is_some() != location.is_some() {
            return Err(shape());
        }
        let size_estimate_bytes = size
            .map(utf8)
            .transpose()?
            .map(|s| s.parse::<u64>().map_err(|_| shape()))
            .transpose()?
            .map(|kb| kb.saturating_mul(1024));
        out.push(TablespaceInfo {
            oid,
            location,
            size_estimate_bytes,
        });
    }
    if out.iter().filter(|t| t.oid.is_none()).count() != 1 {
        return Err(WalsenderError::Protocol(
            "tablespace result set does not list the main data directory exactly once".to_owned(),
        ));
    }
    Ok(out)
}

/// Parses the body of an `n` message: `name\0location\0`.
fn parse_new_archive(payload: &[u8]) -> Result<(String, String), WalsenderError> {
    let malformed = || WalsenderError::Protocol("malformed new-archive message".to_owned());
    let mut parts = payload.split(|&b| b == 0);
    let name = parts.next().ok_or_else(malformed)?;
    let location = parts.next().ok_or_else(malformed)?;
    // After the second NUL there must be nothing left.
    if parts.next() != Some(&[][..]) || parts.next().is_some() {
        return Err(malformed());
    }
    let text = |b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| WalsenderError::UnsafeName {
            what: "archive name or location (not UTF-8)",
            value: String::from_utf8_lossy(b).into_owned(),
        })
    };
    Ok((text(name)?, text(location)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BaseBackupOptions {
        BaseBackupOptions {
            label: "pgpitr 'nightly'".to_owned(),
            fast_checkpoint: true,
            wait_for_wal: false,
            manifest: true,
            progress: true,
            max_rate: Some(1024),
            tablespace_map: true,
            incremental: false,
        }
    }

    #[test]
    fn command_for_15_and_later() {
        assert_eq!(
            build_command(&opts(), 150018, "15.18").unwrap(),
            "BASE_BACKUP ( LABEL 'pgpitr ''nightly''', PROGRESS, CHECKPOINT 'fast', \
             WAIT false, MAX_RATE 1024, TABLESPACE_MAP, MANIFEST 'yes', \
             MANIFEST_CHECKSUMS 'CRC32C', TARGET 'client' )"
        );
        let plain = BaseBackupOptions {
            manifest: false,
            tablespace_map: false,
            ..BaseBackupOptions::new("x")
        };
        assert_eq!(
            build_command(&plain, 170000, "17beta1").unwrap(),
            "BASE_BACKUP ( LABEL 'x', WAIT true, TARGET 'client' )"
        );
    }

    #[test]
    fn incremental_command_for_17_and_later_only() {
        let incr = BaseBackupOptions {
            incremental: true,
            ..opts()
        };
        assert!(build_command(&incr, 170002, "17.2")
            .unwrap()
            .ends_with("TARGET 'client', INCREMENTAL )"));
        for (num, v) in [(160004, "16.4"), (140010, "14.10")] {
            assert!(matches!(
                build_command(&incr, num, v),
                Err(WalsenderError::UnsupportedServerVersion { .. })
            ));
        }
    }

    #[test]
    fn command_for_13_and_14() {
        assert_eq!(
            build_command(&opts(), 140010, "14.10").unwrap(),
            "BASE_BACKUP LABEL 'pgpitr ''nightly''' PROGRESS FAST NOWAIT MAX_RATE 1024 \
             TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
        assert_eq!(
            build_command(&BaseBackupOptions::new("a\\b"), 130000, "13.0").unwrap(),
            "BASE_BACKUP LABEL 'a\\b' TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
    }

    #[test]
    fn command_errors() {
        let err = build_command(&opts(), 120000, "12.0").unwrap_err();
        assert!(matches!(
            err,
            WalsenderError::UnsupportedServerVersion { .. }
        ));
        let err = build_command(&BaseBackupOptions::new("a\0b"), 150000, "15.0").unwrap_err();
        assert!(matches!(err, WalsenderError::InvalidArgument(_)));
    }

    #[test]
    fn archive_names() {
        for good in ["base.tar", "16384.tar", "4294967295.tar"] {
            validate_archive_name(good).unwrap();
        }
        for bad in [
            "",
            ".tar",
            "base.tar.gz",
            "../base.tar",
            "/base.tar",
            "x/16384.tar",
            "16384",
            "+1.tar",
            "4294967296.tar",
            "base",
            "..",
            "16384.tar/..",
            " 1.tar",
        ] {
            assert!(validate_archive_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tablespace_locations() {
        for good in ["/srv/ts1", "/", "/a/b c/d"] {
            validate_tablespace_location(good).unwrap();
        }
        for bad in [
            "",
            "relative",
            "pg_tblspc/16384",
            "/srv/../etc",
            "/srv/./x",
            "/srv/..",
            "./x",
        ] {
            assert!(validate_tablespace_location(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_archive_message() {
        assert_eq!(
            parse_new_archive(b"base.tar\0\0").unwrap(),
            ("base.tar".to_owned(), String::new())
        );
        assert_eq!(
            parse_new_archive(b"16384.tar\0/srv/ts\0").unwrap(),
            ("16384.tar".to_owned(), "/srv/ts".to_owned())
        );
        for bad in [&b"base.tar"[..], b"base.tar\0", b"a\0b\0c", b"a\0b\0\0"] {
            assert!(parse_new_archive(bad).is_err(), "{bad:?}");
        }
    }

    fn set(rows: Vec<Vec<Option<&str>>>) -> ResultSet {
        ResultSet {
            columns: Vec::new(),
            rows: rows
                .into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn tablespace_result_set() {
        let ts = tablespaces(set(vec![
            vec![Some("16384"), Some("/srv/ts"), Some("10")],
            vec![None, None, None],
        ]))
        .unwrap();
        assert_eq!(
            ts,
            vec![
                TablespaceInfo {
                    oid: Some(16384),
                    location: Some("/srv/ts".to_owned()),
                    size_estimate_bytes: Some(10240),
                },
                TablespaceInfo {
                    oid: None,
                    location: None,
                    size_estimate_bytes: None,
                },
            ]
        );
        assert!(tablespaces(set(vec![
            vec![Some("1"), Some("../x"), None],
            vec![None, None, None]
        ]))
        .is_err());
        assert!(tablespaces(set(vec![vec![Some("1"), Some("/x"), None]])).is_err());
        assert!(position(set(vec![vec![Some("0/2000028"), Some("1")]]), "start").is_ok());
        assert!(position(set(vec![vec![Some("zz"), Some("1")]]), "start").is_err());
    }
}

/// Hostile BASE_BACKUP result sets and archive messages: property-based (see
/// `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// A result set of arbitrary shape: cells of digits, paths, LSNs, arbitrary bytes or NULL.
    fn result_set() -> impl Strategy<Value = ResultSet> {
        let cell = proptest::option::weighted(
            0.8,
            prop_oneof![
                "[0-9]{1,25}",
                "(/[a-z.]{0,6}){0,4}",
                "[0-9A-F]{1,9}/[0-9A-F]{1,9}",
                "\\PC{0,12}",
            ]
            .prop_map(Bytes::from)
            .boxed()
            .prop_union(
                proptest::collection::vec(any::<u8>(), 0..12)
                    .prop_map(Bytes::from)
                    .boxed(),
            ),
        );
        proptest::collection::vec(proptest::collection::vec(cell, 0..4), 0..4).prop_map(|rows| {
            ResultSet {
                columns: vec!["spcoid".into(), "spclocation".into(), "size".into()],
                rows,
            }
        })
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(2000))]

        #[test]
        fn accepted_archive_names_are_base_or_an_oid(name in "\\PC{0,14}|[0-9]{0,12}\\.tar|base\\.tar.{0,3}") {
            if validate_archive_name(&name).is_ok() {
                let oid = name.strip_suffix(".tar").unwrap();
                prop_assert!(oid == "base" || oid.parse::<u32>().is_ok());
            }
        }

        #[test]
        fn accepted_tablespace_locations_are_absolute_and_without_dots(
            location in "\\PC{0,20}|(/[a-z.\\x00]{0,4}){0,5}/?",
        ) {
            if validate_tablespace_location(&location).is_ok() {
                prop_assert!(location.starts_with('/') && !location.contains('\0'));
                prop_assert!(location.split('/').all(|c| c != "." && c != ".."));
            }
        }

        #[test]
        fn new_archive_messages_never_panic(payload in proptest::collection::vec(
            prop_oneof![Just(0u8), any::<u8>(), Just(b'a')], 0..40)) {
            if let Ok((name, location)) = parse_new_archive(&payload) {
                prop_assert_eq!(payload, [name.as_bytes(), &[0], location.as_bytes(), &[0]].concat());
            }
        }

        #[test]
        fn tablespace_result_sets_give_tablespaces_or_a_typed_error(set in result_set()) {
            if let Ok(ts) = tablespaces(set) {
                prop_assert_eq!(ts.iter().filter(|t| t.oid.is_none()).count(), 1);
                for l in ts.iter().filter_map(|t| t.location.as_deref()) {
                    prop_assert!(validate_tablespace_location(l).is_ok());
                }
            }
        }

        #[test]
        fn position_result_sets_give_a_position_or_a_typed_error(set in result_set()) {
            let _ = position(set, "start");
        }

        #[test]
        fn server_versions_never_panic(version in "\\PC{0,20}|[0-9]{1,12}(\\.[0-9]{0,12}){0,3}(beta|devel|rc)?[0-9]?( \\PC{0,8})?") {
            if let Some(n) = crate::walsender::version::parse_server_version_num(&version) {
                prop_assert!(n >= 10_000 || version.starts_with('0'));
            }
        }
    }
}
