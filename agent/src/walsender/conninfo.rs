//! Connection parameters: libpq `key=value` connection strings, environment defaults and the
//! password file.
//!
//! Parsing follows libpq's `conninfo_parse()` (src/interfaces/libpq/fe-connect.c): pairs are
//! separated by whitespace, whitespace around `=` is allowed, a value is either a run of
//! non-space characters or a single-quoted string, and in both a backslash takes the next
//! character literally. Later duplicates win. Unknown keys are an error, as in libpq.
//!
//! Precedence for each field: connection string, then the libpq environment variable (PGHOST,
//! PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGSSLROOTCERT, PGAPPNAME,
//! PGCONNECT_TIMEOUT), then the default. When no password results, the password file
//! (`passfile=`, PGPASSFILE or `~/.pgpass`) is consulted (libpq rules, see the `pgpass` module).
//!
//! Invariant: the password never appears in `Debug` output.

use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::error::WalsenderError;
use super::pgpass::{self, PgpassQuery};

/// The Unix-socket directory used when no host is given and it exists (Debian/Ubuntu
/// packages' compiled-in `DEFAULT_PGSOCKET_DIR`).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// Default server port.
pub const DEFAULT_PORT: u16 = 5432;
/// Database name sent when none is given. A physical replication connection is not bound to a
/// database (the server ignores it); `replication` is what pg_basebackup sends, so `.pgpass`
/// lines written for pg_basebackup match.
pub const DEFAULT_DBNAME: &str = "replication";
/// `application_name` sent when none is given.
pub const DEFAULT_APPLICATION_NAME: &str = "pgpitr";

/// libpq `sslmode` (PostgreSQL docs, "SSL Support", table "SSL Mode Descriptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Try without TLS first; if the server rejects that, try TLS (without verification).
    Allow,
    /// Try TLS first; fall back to plain if the server does not support it (the default).
    #[default]
    Prefer,
    /// TLS without certificate verification (unless a root certificate file exists, in which
    /// case the chain is verified as with `VerifyCa`, like libpq).
    Require,
    /// TLS, verifying that the server certificate chains to `sslrootcert`.
    VerifyCa,
    /// TLS, verifying the chain and that the certificate is valid for the host name.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = WalsenderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(WalsenderError::InvalidConnInfo(
                    "invalid sslmode value (expected disable, allow, prefer, require, verify-ca or verify-full)".into(),
                ))
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        })
    }
}

/// Where and how to open a physical replication connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// TCP host name or IP address, or a Unix-socket directory (starts with `/`).
    pub host: String,
    /// TCP port, or the number in the socket file name `.s.PGSQL.<port>`.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Password, if any. Never printed by `Debug`.
    pub password: Option<String>,
    /// Database name sent in the startup packet (ignored by the server for physical
    /// replication; used for `.pgpass` matching).
    pub dbname: String,
    /// `application_name`, visible in `pg_stat_replication`.
    pub application_name: String,
    /// TLS policy.
    pub sslmode: SslMode,
    /// PEM file with trusted root certificates, or `system` for the system store. `None` means
    /// libpq's default `~/.postgresql/root.crt` (used if it exists).
    pub sslrootcert: Option<PathBuf>,
    /// Limit for connecting, TLS and authentication together; `None` waits indefinitely.
    pub connect_timeout: Option<Duration>,
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl ConnectParams {
    /// Parses a libpq `key=value` connection string and applies libpq's environment defaults
    /// and password-file lookup (see the module docs).
    ///
    /// Supported keys: `host`, `port`, `user`, `password`, `dbname`, `application_name`,
    /// `fallback_application_name`, `sslmode`, `sslrootcert`, `connect_timeout`, `passfile`,
    /// `replication` (must be a true value: this client is physical-only). Keys that only tune
    /// libpq behaviour this client does not have (`keepalives*`, `sslsni`, `target_session_attrs`,
    /// …) are accepted and ignored.
    ///
    /// # Errors
    ///
    /// [`WalsenderError::InvalidConnInfo`] for syntax errors, unknown or unsupported keys
    /// (`hostaddr`, `sslcert`, several hosts, URIs), and invalid values (port, sslmode, …), and
    /// when no user name can be determined.
    pub fn from_conninfo(conninfo: &str) -> Result<Self, WalsenderError> {
        Self::from_conninfo_with(conninfo, &SystemEnv)
    }

    pub(crate) fn from_conninfo_with(
        conninfo: &str,
        env: &dyn Environment,
    ) -> Result<Self, WalsenderError> {
        let pairs = parse_pairs(conninfo)?;
        resolve(&pairs, env)
    }

    /// True if `host` names a Unix-socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The socket file `<host>/.s.PGSQL.<port>` when `host` is a directory.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.is_unix_socket()
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// `host:port` or the socket path, for messages.
    pub fn target(&self) -> String {
        match self.socket_path() {
            Some(p) => p.display().to_string(),
            None if self.host.contains(':') => format!("[{}]:{}", self.host, self.port),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Access to the process environment, replaceable in tests.
pub(crate) trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn os_user(&self) -> Option<String>;
    fn home_dir(&self) -> Option<PathBuf>;
    fn default_socket_dir_exists(&self) -> bool;
}

/// The real environment.
pub(crate) struct SystemEnv;

impl Environment for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn os_user(&self) -> Option<String> {
        passwd_entry().map(|(name, _)| name)
    }

    fn home_dir(&self) -> Option<PathBuf> {
        home_dir()
    }

    fn default_socket_dir_exists(&self) -> bool {
        Path::new(DEFAULT_SOCKET_DIR).is_dir()
    }
}

/// `$HOME`, else the home directory of the effective user (libpq `pqGetHomeDirectory()`).
pub(crate) fn home_dir() -> Option<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Some(PathBuf::from(h)),
        _ => passwd_entry().map(|(_, home)| home),
    }
}

/// Name and home directory of the effective user, from the password database.
fn passwd_entry() -> Option<(String, PathBuf)> {
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, which outlive the call; `result` is
    // either null or points to `pwd`, whose string fields point into `buf`.
    unsafe {
        let uid = libc::geteuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        let name = CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned();
        let home = if pwd.pw_dir.is_null() {
            PathBuf::new()
        } else {
            PathBuf::from(CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned())
        };
        Some((name, home))
    }
}

fn invalid(msg: String) -> WalsenderError {
    WalsenderError::InvalidConnInfo(msg)
}

/// Splits a connection string into `(key, value)` pairs (libpq `conninfo_parse()`).
fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, WalsenderError> {
    if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        return Err(invalid(
            "connection URIs are not supported; use key=value pairs".to_owned(),
        ));
    }
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The "key" may be a stray piece of an unquoted password: do not echo it.
            return Err(invalid(format!(
                "missing \"=\" after key number {} in connection info string",
                pairs.len() + 1
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let value = if chars.next_if_eq(&'\'').is_some() {
            read_quoted(&mut chars)?
        } else {
            let mut value = String::new();
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
            value
        };
        pairs.push((key, value));
    }
}

/// Reads a single-quoted value after its opening quote; a backslash escapes the next character.
fn read_quoted(chars: &mut impl Iterator<Item = char>) -> Result<String, WalsenderError> {
    let mut value = String::new();
    loop {
        match chars.next() {
            Some('\\') => match chars.next() {
                Some(c) => value.push(c),
                None => break,
            },
            Some('\'') => return Ok(value),
            Some(c) => value.push(c),
            None => break,
        }
    }
    Err(invalid(
        "unterminated quoted string in connection info string".to_owned(),
    ))
}

/// Keys accepted for libpq compatibility that change nothing here.
const IGNORED_KEYS: &[&str] = &[
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "load_balance_hosts",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "require_auth",
];

#[derive(Default)]
struct Raw {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    application_name: Option<String>,
    fallback_application_name: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    connect_timeout: Option<String>,
    passfile: Option<String>,
}

fn resolve(
    pairs: &[(String, String)],
    env: &dyn Environment,
) -> Result<ConnectParams, WalsenderError> {
    let mut raw = Raw::default();
    for (key, value) in pairs {
        let v = Some(value.clone());
        match key.as_str() {
            "host" => raw.host = v,
            "port" => raw.port = v,
            "user" => raw.user = v,
            "password" => raw.password = v,
            "dbname" => raw.dbname = v,
            "application_name" => raw.application_name = v,
            "fallback_application_name" => raw.fallback_application_name = v,
            "sslmode" => raw.sslmode = v,
            "sslrootcert" => raw.sslrootcert = v,
            "connect_timeout" => raw.connect_timeout = v,
            "passfile" => raw.passfile = v,
            "replication" => match value.to_ascii_lowercase().as_str() {
                "true" | "on" | "yes" | "1" => {}
                _ => {
                    return Err(invalid(
                        "this replication value is not supported: this client opens physical \
                         replication connections only"
                            .into(),
                    ))
                }
            },
            "channel_binding" | "gssencmode" if value == "require" => {
                return Err(invalid(format!("{key}=require is not supported")))
            }
            "channel_binding" | "gssencmode" => {}
            "hostaddr" | "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir"
            | "service" | "options" | "krbsrvname" | "gsslib" | "requirepeer" => {
                return Err(invalid(format!(
                    "connection option \"{key}\" is not supported"
                )))
            }
            k if IGNORED_KEYS.contains(&k) => {
                tracing::debug!("ignoring connection option \"{k}\"");
            }
            other => return Err(invalid(format!("invalid connection option \"{other}\""))),
        }
    }

    // Connection string, then environment; empty values count as unset (libpq treats an empty
    // host, user, ... as "use the default").
    let pick = |value: Option<String>, var: &str| -> Option<String> {
        value
            .filter(|v| !v.is_empty())
            .or_else(|| env.var(var).filter(|v| !v.is_empty()))
    };

    let host = match pick(raw.host, "PGHOST") {
        Some(h) if h.contains(',') => {
            return Err(invalid("multiple hosts are not supported".into()))
        }
        Some(h) => h,
        None if env.default_socket_dir_exists() => DEFAULT_SOCKET_DIR.to_owned(),
        None => "localhost".to_owned(),
    };
    let port = match pick(raw.port, "PGPORT") {
        Some(p) => match p.trim().parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(invalid("invalid port number (expected 1 to 65535)".into())),
        },
        None => DEFAULT_PORT,
    };
    let user = match pick(raw.user, "PGUSER").or_else(|| env.os_user()) {
        Some(u) => u,
        None => {
            return Err(invalid(
                "could not determine the user name; set user= or PGUSER".to_owned(),
            ))
        }
    };
    let dbname = pick(raw.dbname, "PGDATABASE").unwrap_or_else(|| DEFAULT_DBNAME.to_owned());
    let application_name = pick(raw.application_name, "PGAPPNAME")
        .or(raw.fallback_application_name.filter(|v| !v.is_empty()))
        .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned());
    let sslmode = match pick(raw.sslmode, "PGSSLMODE") {
        Some(m) => m.parse()?,
        None => SslMode::default(),
    };
    let sslrootcert = pick(raw.sslrootcert, "PGSSLROOTCERT").map(PathBuf::from);
    let connect_timeout = match pick(raw.connect_timeout, "PGCONNECT_TIMEOUT") {
        Some(t) => match t.trim().parse::<i64>() {
            // libpq: zero or negative means wait indefinitely; 1 is raised to 2.
            Ok(n) if n <= 0 => None,
            Ok(n) => Some(Duration::from_secs(n.max(2) as u64)),
            Err(_) => {
                return Err(invalid(
                    "invalid integer value for connection option \"connect_timeout\"".into(),
                ))
            }
        },
        None => None,
    };

    let mut password = pick(raw.password, "PGPASSWORD");
    if password.is_none() {
        let passfile = pick(raw.passfile, "PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env.home_dir().map(|h| h.join(".pgpass")));
        if let Some(passfile) = passfile {
            // libpq matches the default socket directory as "localhost"; other directories
            // are matched literally.
            let match_host = if host == DEFAULT_SOCKET_DIR {
                "localhost"
            } else {
                host.as_str()
            };
            let port_str = port.to_string();
            let query = PgpassQuery {
                host: match_host,
                port: &port_str,
                dbname: &dbname,
                user: &user,
            };
            password = pgpass::lookup_file(&passfile, query).filter(|p| !p.is_empty());
        }
    }

    Ok(ConnectParams {
        host,
        port,
        user,
        password,
        dbname,
        application_name,
        sslmode,
        sslrootcert,
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Default)]
    struct FakeEnv {
        vars: HashMap<&'static str, String>,
        home: Option<PathBuf>,
        socket_dir: bool,
    }

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn os_user(&self) -> Option<String> {
            Some("osuser".to_owned())
        }
        fn home_dir(&self) -> Option<PathBuf> {
            self.home.clone()
        }
        fn default_socket_dir_exists(&self) -> bool {
            self.socket_dir
        }
    }

    fn parse(s: &str, env: &FakeEnv) -> Result<ConnectParams, WalsenderError> {
        ConnectParams::from_conninfo_with(s, env)
    }

    #[test]
    fn splits_pairs_like_libpq() {
        let pairs = parse_pairs(
            "host=db1  port = 5433 user='back up' password='it\\'s \\\\ ok' dbname=a\\ b",
        )
        .unwrap();
        let expected = [
            ("host", "db1"),
            ("port", "5433"),
            ("user", "back up"),
            ("password", "it's \\ ok"),
            ("dbname", "a b"),
        ];
        assert_eq!(pairs.len(), expected.len());
        for ((k, v), (ek, ev)) in pairs.iter().zip(expected) {
            assert_eq!((k.as_str(), v.as_str()), (ek, ev));
        }
        assert_eq!(parse_pairs("").unwrap(), vec![]);
        assert_eq!(
            parse_pairs("a=''").unwrap(),
            vec![("a".to_owned(), String::new())]
        );
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "host",
            "host db1",
            "user='abc",
            "user='abc\\",
            "postgresql://x/y",
        ] {
            let err = parse_pairs(bad).unwrap_err();
            assert!(
                matches!(err, WalsenderError::InvalidConnInfo(_)),
                "{bad}: {err:?}"
            );
        }
        // A stray part of an unquoted password is not echoed.
        let err = parse_pairs("password=my secret").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let env = FakeEnv::default();
        for bad in [
            "foo=bar",
            "port=0",
            "port=abc",
            "port=70000",
            "sslmode=maybe",
            "host=a,b",
            "hostaddr=1.2.3.4",
            "replication=database",
            "connect_timeout=x",
        ] {
            let err = parse(bad, &env).unwrap_err();
            assert!(
                matches!(err, WalsenderError::InvalidConnInfo(_)),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn defaults_without_environment() {
        let env = FakeEnv::default();
        let p = parse("", &env).unwrap();
        assert_eq!(p.host, "localhost");
        assert_eq!(p.port, 5432);
        assert_eq!(p.user, "osuser");
        assert_eq!(p.password, None);
        assert_eq!(p.dbname, "replication");
        assert_eq!(p.application_name, "pgpitr");
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.sslrootcert, None);
        assert_eq!(p.connect_timeout, None);

        let env = FakeEnv {
            socket_dir: true,
            ..FakeEnv::default()
        };
        let p = parse("", &env).unwrap();
        assert_eq!(p.host, DEFAULT_SOCKET_DIR);
        assert!(p.is_unix_socket());
        assert_eq!(
            p.socket_path().unwrap(),
            PathBuf::from("/var/run/postgresql/.s.PGSQL.5432")
        );
    }

    #[test]
    fn environment_is_used_but_conninfo_wins() {
        let mut env = FakeEnv::default();
        for (k, v) in [
            ("PGHOST", "envhost"),
            ("PGPORT", "6000"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/etc/ca.pem"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "1"),
        ] {
            env.vars.insert(k, v.to_owned());
        }
        let p = parse("", &env).unwrap();
        assert_eq!(p.host, "envhost");
        assert_eq!(p.port, 6000);
        assert_eq!(p.user, "envuser");
        assert_eq!(p.password.as_deref(), Some("envpw"));
        assert_eq!(p.dbname, "envdb");
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.application_name, "envapp");
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(2)));

        let p = parse(
            "host=/tmp/sock port=7000 user=u password=pw dbname=d sslmode=disable \
             application_name=app connect_timeout=0",
            &env,
        )
        .unwrap();
        assert_eq!(p.host, "/tmp/sock");
        assert_eq!(p.port, 7000);
        assert_eq!(p.user, "u");
        assert_eq!(p.password.as_deref(), Some("pw"));
        assert_eq!(p.dbname, "d");
        assert_eq!(p.sslmode, SslMode::Disable);
        assert_eq!(p.application_name, "app");
        assert_eq!(p.connect_timeout, None);
        assert_eq!(p.target(), "/tmp/sock/.s.PGSQL.7000");
    }

    #[test]
    fn password_never_in_debug() {
        let env = FakeEnv::default();
        let p = parse("password=hunter2 host=h", &env).unwrap();
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
    }

    #[test]
    fn pgpass_is_consulted_when_no_password() {
        let dir = tempfile::tempdir().unwrap();
        let pgpass = dir.path().join(".pgpass");
        std::fs::write(
            &pgpass,
            "localhost:5432:replication:backup:socketpw\n\
             db1:5433:*:backup:tcppw\n",
        )
        .unwrap();
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = FakeEnv {
            home: Some(dir.path().to_owned()),
            socket_dir: true,
            ..FakeEnv::default()
        };
        // The default socket directory is matched as "localhost".
        let p = parse("user=backup", &env).unwrap();
        assert_eq!(p.password.as_deref(), Some("socketpw"));
        let p = parse("host=db1 port=5433 user=backup", &env).unwrap();
        assert_eq!(p.password.as_deref(), Some("tcppw"));
        // An explicit password wins.
        let p = parse("host=db1 port=5433 user=backup password=x", &env).unwrap();
        assert_eq!(p.password.as_deref(), Some("x"));
        // No match.
        let p = parse("host=db2 user=backup", &env).unwrap();
        assert_eq!(p.password, None);

        // passfile= and PGPASSFILE point elsewhere.
        let other = dir.path().join("other");
        std::fs::write(&other, "*:*:*:*:otherpw\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        let conninfo = format!("host=db2 user=backup passfile='{}'", other.display());
        assert_eq!(
            parse(&conninfo, &env).unwrap().password.as_deref(),
            Some("otherpw")
        );
        let mut env = env;
        env.vars.insert("PGPASSFILE", other.display().to_string());
        let p = parse("host=db2 user=backup", &env).unwrap();
        assert_eq!(p.password.as_deref(), Some("otherpw"));

        // A world-readable file is ignored.
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = parse("host=db2 user=backup", &env).unwrap();
        assert_eq!(p.password, None);
    }
}
