//! Errors of the replication client, classified so that callers can print a useful hint.
//!
//! Server errors arrive as ErrorResponse messages (protocol docs, "Message Formats" and
//! "Error and Notice Message Fields"); [`classify_server_error`] turns the well-known ones
//! (authentication, missing REPLICATION attribute, `max_wal_senders`, `wal_level`) into their
//! own variants and keeps everything else as [`WalsenderError::Server`].
//!
//! Invariant: no variant ever holds a password. Messages follow the project style: lowercase,
//! no final period; hints come from [`WalsenderError::hint`].

use std::fmt;
use std::io;

/// Error of the replication-protocol client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalsenderError {
    /// The connection string or an environment variable (PGPORT, PGSSLMODE, …) is invalid.
    #[error("invalid connection parameters: {0}")]
    InvalidConnInfo(String),

    /// The TCP or Unix-socket connection could not be opened (or `connect_timeout` expired).
    /// `target` is `host:port` or the socket path.
    #[error("could not connect to server at {target}: {source}")]
    Connect {
        /// `host:port` or the Unix socket path.
        target: String,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The established connection failed (reset, closed by the server, …).
    #[error("connection to server lost: {0}")]
    Io(#[source] io::Error),

    /// TLS could not be negotiated or the server certificate was rejected.
    #[error("ssl error: {0}")]
    Tls(String),

    /// The server rejected the credentials or has no pg_hba.conf entry for this connection
    /// (SQLSTATE class 28).
    #[error("authentication failed for user \"{user}\": {message}")]
    AuthFailed {
        /// The user name we tried to log in as.
        user: String,
        /// SQLSTATE from the server: `28P01` bad password, `28000` pg_hba.conf rejection.
        sqlstate: String,
        /// The server's message.
        message: String,
    },

    /// The server asked for a password but none was given (conninfo, PGPASSWORD, ~/.pgpass).
    #[error("server requested a password for user \"{user}\" but none was supplied")]
    PasswordRequired {
        /// The user name we tried to log in as.
        user: String,
    },

    /// The server asked for an authentication method this client does not implement
    /// (GSSAPI, SSPI, Kerberos, SCM credentials, SCRAM with channel binding only).
    #[error("unsupported authentication method requested by server: {0}")]
    UnsupportedAuth(String),

    /// The role lacks the REPLICATION attribute (SQLSTATE 42501 at startup,
    /// "must be superuser or replication role to start walsender").
    #[error("role \"{user}\" is not allowed to open a replication connection: {message}")]
    NoReplicationPermission {
        /// The role name.
        user: String,
        /// The server's message.
        message: String,
    },

    /// All WAL sender slots are taken, or `max_wal_senders = 0` (SQLSTATE 53300,
    /// "number of requested standby connections exceeds max_wal_senders").
    #[error("no replication connection slot available: {message}")]
    TooManyWalSenders {
        /// The server's message.
        message: String,
    },

    /// `wal_level = minimal` ("WAL level not sufficient for making an online backup").
    #[error("server wal_level is too low for a backup: {message}")]
    WalLevelMinimal {
        /// The server's message.
        message: String,
    },

    /// Any other ErrorResponse from the server.
    #[error("server error {sqlstate}: {message}{}", Detail(.detail))]
    Server {
        /// Severity, non-localised when the server sends it (`ERROR`, `FATAL`, `PANIC`).
        severity: String,
        /// Five-character SQLSTATE code.
        sqlstate: String,
        /// Primary message.
        message: String,
        /// Optional DETAIL.
        detail: Option<String>,
        /// Optional HINT.
        hint: Option<String>,
    },

    /// The server's version cannot run the requested command.
    #[error("PostgreSQL {version} is not supported for {what}")]
    UnsupportedServerVersion {
        /// The `server_version` reported by the server.
        version: String,
        /// What was attempted.
        what: &'static str,
    },

    /// An argument cannot be sent to the server (e.g. a label containing a NUL byte).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The server sent an archive name or tablespace location that is not safe to use as a
    /// path (`..` components, a relative location, an unexpected archive name).
    #[error("refusing unsafe {what} from server: {value:?}")]
    UnsafeName {
        /// What the value is (`archive name`, `tablespace location`, …).
        what: &'static str,
        /// The value as received.
        value: String,
    },

    /// The server sent something this client does not expect at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Formats an optional DETAIL field after the message.
struct Detail<'a>(&'a Option<String>);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, " (detail: {d})"),
            None => Ok(()),
        }
    }
}

impl WalsenderError {
    /// A short, actionable hint for the user, if there is one.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            Self::InvalidConnInfo(_) => {
                "use libpq key=value syntax, e.g. \"host=db1 port=5432 user=backup\"".to_owned()
            }
            Self::Connect { target, .. } => format!(
                "check that the server is running and accepts connections at {target} \
                 (listen_addresses, port, firewall)"
            ),
            Self::Tls(_) => {
                "check sslmode and sslrootcert, and the server's ssl settings".to_owned()
            }
            Self::AuthFailed { .. } => "check the password (password=, PGPASSWORD or ~/.pgpass) \
                 and that pg_hba.conf has a \"replication\" line for this user, host and \
                 encryption"
                .to_owned(),
            Self::PasswordRequired { .. } => {
                "supply the password with PGPASSWORD, ~/.pgpass or password= in the connection \
                 string"
                    .to_owned()
            }
            Self::UnsupportedAuth(_) => {
                "use scram-sha-256, md5, password or trust for this user in pg_hba.conf".to_owned()
            }
            Self::NoReplicationPermission { user, .. } => {
                format!("grant it with: ALTER ROLE \"{user}\" REPLICATION")
            }
            Self::TooManyWalSenders { .. } => {
                "raise max_wal_senders (needs a restart) or stop other replication connections \
                 (pg_stat_replication)"
                    .to_owned()
            }
            Self::WalLevelMinimal { .. } => {
                "set wal_level = replica (or logical) and restart the server".to_owned()
            }
            Self::Server { hint, .. } => return hint.clone(),
            Self::UnsupportedServerVersion { what, .. } if what.contains("17") => {
                "take a full backup (without --incremental)".to_owned()
            }
            Self::UnsupportedServerVersion { .. } => {
                "pgpitr needs PostgreSQL 13 or later".to_owned()
            }
            Self::Io(_)
            | Self::InvalidArgument(_)
            | Self::UnsafeName { .. }
            | Self::Protocol(_) => return None,
        };
        Some(hint)
    }

    /// Whether retrying later may succeed (network trouble, no free WAL sender slot, server
    /// starting up or shutting down). Authentication, permission and protocol errors are
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Io(_) | Self::TooManyWalSenders { .. } => true,
            // Class 08 connection exception, 53 insufficient resources, 57P0x shutdown/startup.
            Self::Server { sqlstate, .. } => {
                sqlstate.starts_with("08")
                    || sqlstate.starts_with("53")
                    || sqlstate.starts_with("57P")
            }
            _ => false,
        }
    }

    /// The SQLSTATE of a server-reported error, if this error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::AuthFailed { sqlstate, .. } | Self::Server { sqlstate, .. } => Some(sqlstate),
            _ => None,
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse that this client uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerMessage {
    pub severity: String,
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// Turns an ErrorResponse into the most specific error variant.
///
/// `during_startup` is true until the first ReadyForQuery: SQLSTATE 42501 and 53300 only mean
/// "no REPLICATION attribute" and "no WAL sender slot" then (42501 is also what a file
/// permission error during BASE_BACKUP reports, see errcode_for_file_access() in
/// src/backend/utils/error/elog.c).
pub(crate) fn classify_server_error(
    msg: ServerMessage,
    user: &str,
    during_startup: bool,
) -> WalsenderError {
    let lower = msg.message.to_lowercase();
    if lower.contains("must be superuser or replication role")
        || lower.contains("permission denied to start wal sender")
        || (during_startup && msg.sqlstate == "42501")
    {
        return WalsenderError::NoReplicationPermission {
            user: user.to_owned(),
            message: msg.message,
        };
    }
    if lower.contains("max_wal_senders") || (during_startup && msg.sqlstate == "53300") {
        return WalsenderError::TooManyWalSenders {
            message: msg.message,
        };
    }
    if lower.contains("wal level not sufficient")
        || lower.contains("requires wal_level")
        || (msg.sqlstate == "55000" && lower.contains("wal_level"))
    {
        return WalsenderError::WalLevelMinimal {
            message: msg.message,
        };
    }
    if during_startup && msg.sqlstate.starts_with("28") {
        return WalsenderError::AuthFailed {
            user: user.to_owned(),
            sqlstate: msg.sqlstate,
            message: msg.message,
        };
    }
    WalsenderError::Server {
        severity: msg.severity,
        sqlstate: msg.sqlstate,
        message: msg.message,
        detail: msg.detail,
        hint: msg.hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(sqlstate: &str, message: &str) -> ServerMessage {
        ServerMessage {
            severity: "FATAL".into(),
            sqlstate: sqlstate.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn classifies_well_known_errors() {
        let e = classify_server_error(
            msg(
                "42501",
                "must be superuser or replication role to start walsender",
            ),
            "bob",
            true,
        );
        assert!(
            matches!(e, WalsenderError::NoReplicationPermission { .. }),
            "{e:?}"
        );
        assert!(e.hint().unwrap().contains("ALTER ROLE \"bob\" REPLICATION"));

        let e = classify_server_error(
            msg(
                "53300",
                "number of requested standby connections exceeds max_wal_senders (currently 0)",
            ),
            "bob",
            true,
        );
        assert!(
            matches!(e, WalsenderError::TooManyWalSenders { .. }),
            "{e:?}"
        );
        assert!(e.is_transient());

        let e = classify_server_error(
            msg(
                "55000",
                "WAL level not sufficient for making an online backup",
            ),
            "bob",
            false,
        );
        assert!(matches!(e, WalsenderError::WalLevelMinimal { .. }), "{e:?}");

        let e = classify_server_error(
            msg("28P01", "password authentication failed for user \"bob\""),
            "bob",
            true,
        );
        assert!(matches!(e, WalsenderError::AuthFailed { .. }), "{e:?}");
        assert_eq!(e.sqlstate(), Some("28P01"));
    }

    #[test]
    fn file_permission_error_during_backup_is_not_a_role_problem() {
        let e = classify_server_error(
            msg("42501", "could not open file \"x\": Permission denied"),
            "bob",
            false,
        );
        assert!(matches!(e, WalsenderError::Server { .. }), "{e:?}");
    }

    #[test]
    fn server_error_display_includes_detail() {
        let mut m = msg("XX001", "checksum verification failure during base backup");
        m.detail = Some("1 failure".into());
        let e = classify_server_error(m, "bob", false);
        assert_eq!(
            e.to_string(),
            "server error XX001: checksum verification failure during base backup \
             (detail: 1 failure)"
        );
    }
}

/// Hostile ErrorResponse fields: property-based (see `crate::proptest_config`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn server_message() -> impl Strategy<Value = ServerMessage> {
        let text = "\\PC{0,40}|(must be superuser or replication role|max_wal_senders|wal_level|WAL level not sufficient|requires wal_level)[ -~]{0,10}";
        (
            "\\PC{0,10}",
            "[0-9A-Z]{0,6}|28[0-9A-Z]{3}|42501|53300|55000|08[0-9]{3}|57P0[0-9]",
            text,
            proptest::option::of("\\PC{0,40}"),
            proptest::option::of("\\PC{0,40}"),
        )
            .prop_map(
                |(severity, sqlstate, message, detail, hint)| ServerMessage {
                    severity,
                    sqlstate,
                    message,
                    detail,
                    hint,
                },
            )
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config(3000))]

        #[test]
        fn every_server_error_is_classified_and_keeps_its_message(
            msg in server_message(),
            user in "\\PC{0,20}",
            during_startup in any::<bool>(),
        ) {
            let e = classify_server_error(msg.clone(), &user, during_startup);
            prop_assert!(e.to_string().contains(&msg.message));
            let _ = (e.hint(), e.is_transient());
            if let Some(sqlstate) = e.sqlstate() {
                prop_assert_eq!(sqlstate, msg.sqlstate.as_str());
            }
        }
    }
}
