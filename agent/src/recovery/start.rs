//! `pgpitr restore --start`: starting PostgreSQL on a restored data directory and waiting until
//! recovery has ended, then saying where it ended.
//!
//! The server is started with `pg_ctl start` (not waiting: `pg_ctl -w` would return at
//! consistency, long before the target) as the data directory's owner — when pgpitr runs as
//! root it hands the files to `--owner` and drops to that user first ([`drop_privileges`]),
//! because PostgreSQL refuses to run as root and a server started by root through `runuser`
//! would be a child of a shell nobody waits for. Then, every half second:
//!
//! - `postmaster.pid` (src/include/utils/pidfile.h: line 4 port, 5 first socket directory, 6
//!   listen address, 8 status) says whether the postmaster lives and where to connect;
//! - once it accepts connections (hot standby), SQL says whether recovery is still running,
//!   paused at the target (`pg_get_wal_replay_pause_state()`, PG 14+; before,
//!   `pg_is_wal_replay_paused()`) or over (`pg_is_in_recovery()` false: promoted);
//! - if the postmaster exits, the server log and `pg_controldata` say why: "recovery ended
//!   before configured recovery target was reached" (FATAL since PostgreSQL 13) means the
//!   archive did not reach the target ([`StartOutcome::TargetNotReached`], exit code 3 of
//!   `pgpitr`); "shut down in recovery" with `recovery_target_action = shutdown` is the
//!   target reached; anything else is a failure with the end of the log.
//!
//! The connection goes over the Unix socket as the database user named like the owner (or
//! `PGUSER`), which local `peer` or `trust` authentication accepts in PostgreSQL's and the
//! distributions' default `pg_hba.conf`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::restore::Owner;
use super::settings::TargetAction;

/// The message PostgreSQL (13+) logs, FATAL, when the WAL ran out before the target
/// (`PerformWalRecovery`, xlogrecovery.c).
pub const TARGET_NOT_REACHED: &str = "recovery ended before configured recovery target was reached";

const POLL: Duration = Duration::from_millis(500);
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// How long the postmaster has to write its pid file after `pg_ctl start`.
const PID_FILE_WAIT: Duration = Duration::from_secs(60);

/// How to start and what to wait for.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub pgdata: PathBuf,
    /// Directory of `pg_ctl`, `postgres`, `pg_controldata` for the backup's major version.
    pub bin_dir: PathBuf,
    /// Passed to `pg_ctl -o` (e.g. `-p 5433`).
    pub server_options: Option<String>,
    /// The server log (`pg_ctl -l`).
    pub log_file: PathBuf,
    pub action: TargetAction,
    /// Database user for the status queries.
    pub db_user: String,
    /// `server_version_num` of the backup.
    pub pg_version_num: u32,
    /// Give up waiting (the server keeps running) after this long.
    pub timeout: Option<Duration>,
    /// Run `pg_ctl` as this user (a child process switched to its uid and gid) instead of as
    /// this process; `pgpitr drill` run as root, which must stay root to clean up.
    pub run_as: Option<Owner>,
}

/// Where recovery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Recovery ended; the server is open for writes on `timeline`.
    Promoted {
        replay_lsn: String,
        last_xact: Option<String>,
        timeline: String,
    },
    /// Recovery is paused at the target; the server is read-only.
    Paused {
        replay_lsn: String,
        last_xact: Option<String>,
    },
    /// The server shut down at the target (`recovery_target_action = shutdown`).
    ShutDown { min_recovery_lsn: Option<String> },
    /// The archived WAL ended before the target; the server stopped.
    TargetNotReached { log_line: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no pg_ctl for PostgreSQL {major} in /usr/lib/postgresql/{major}/bin or on the PATH; give its directory with --pg-bin")]
    NoPgCtl { major: u32 },
    #[error("{pgdata} has no postgresql.conf (the source server keeps its configuration elsewhere?): copy it in, or name it with --server-options \"-c config_file=…\"; the restored data directory is ready, start it yourself with pg_ctl")]
    NoConfig { pgdata: PathBuf },
    #[error("switching to user {user}: {source}")]
    Privileges {
        user: String,
        source: std::io::Error,
    },
    #[error("pg_ctl start failed ({status}): {output}")]
    PgCtl { status: String, output: String },
    #[error("the server stopped during recovery; end of its log ({log}):\n{tail}")]
    Exited { log: PathBuf, tail: String },
    #[error("recovery did not end within {secs} s; the server is still running (log: {log})")]
    Timeout { secs: u64, log: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The directory with `pg_ctl` for PostgreSQL `major`: the Debian/Ubuntu layout
/// `/usr/lib/postgresql/<major>/bin`, else the one on the `PATH`.
pub fn find_bin_dir(major: u32) -> Option<PathBuf> {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("pg_ctl").is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find(|d| d.join("pg_ctl").is_file()))
}

/// Switches this whole process (every thread) to `owner`: its groups, then its uid. Used once
/// the restore is written, before starting the server, when running as root.
///
/// # Errors
/// The system refused (not root, or an unknown user).
pub fn drop_privileges(owner: &Owner) -> Result<(), StartError> {
    let fail = || StartError::Privileges {
        user: owner.name.clone(),
        source: std::io::Error::last_os_error(),
    };
    let name = std::ffi::CString::new(owner.name.as_str()).map_err(|_| StartError::Privileges {
        user: owner.name.clone(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: plain system calls on valid arguments; glibc applies set*id to every thread.
    unsafe {
        if libc::initgroups(name.as_ptr(), owner.gid) != 0 {
            return Err(fail());
        }
        if libc::setgid(owner.gid) != 0 {
            return Err(fail());
        }
        if libc::setuid(owner.uid) != 0 {
            return Err(fail());
        }
    }
    Ok(())
}

/// The parts of `postmaster.pid` used here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PidFile {
    pid: i32,
    port: u16,
    socket_dir: String,
    listen: String,
    status: String,
}

fn read_pid_file(pgdata: &Path) -> Option<PidFile> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    parse_pid_file(&text)
}

fn parse_pid_file(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    Some(PidFile {
        pid: lines.first()?.trim().parse().ok()?,
        port: lines.get(3)?.trim().parse().ok()?,
        socket_dir: lines
            .get(4)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        listen: lines
            .get(5)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        status: lines
            .get(7)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    })
}

/// Whether a postmaster runs on `pgdata` (its `postmaster.pid` names a live process).
pub fn postmaster_alive(pgdata: &Path) -> bool {
    read_pid_file(pgdata).is_some_and(|p| alive(p.pid))
}

/// `pg_ctl stop -m <mode>` on `pgdata`, waiting up to `wait_secs`, as `run_as` when given (see
/// [`StartOptions::run_as`]).
///
/// # Errors
/// `pg_ctl` could not run or failed (output included, one line).
pub fn stop(
    bin_dir: &Path,
    pgdata: &Path,
    run_as: Option<&Owner>,
    mode: &str,
    wait_secs: u64,
) -> Result<(), StartError> {
    let mut cmd = Command::new(bin_dir.join("pg_ctl"));
    cmd.arg("-D")
        .arg(pgdata)
        .args(["-m", mode, "-w", "-t", &wait_secs.to_string(), "stop"]);
    if let Some(o) = run_as {
        use std::os::unix::process::CommandExt;
        cmd.uid(o.uid).gid(o.gid).env("HOME", &o.home);
    }
    let out = cmd.output().map_err(|e| StartError::Io {
        path: bin_dir.join("pg_ctl"),
        source: e,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(StartError::PgCtl {
        status: out.status.to_string(),
        output: String::from_utf8_lossy(&out.stderr)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Starts the server and waits for the end of recovery; see the module documentation.
///
/// # Errors
/// `pg_ctl` missing or failing, a server that stops for another reason than the target, a
/// timeout.
pub async fn start_and_wait(opts: &StartOptions) -> Result<StartOutcome, StartError> {
    let custom_config = opts
        .server_options
        .as_deref()
        .is_some_and(|o| o.contains("config_file"));
    if !opts.pgdata.join("postgresql.conf").is_file() && !custom_config {
        return Err(StartError::NoConfig {
            pgdata: opts.pgdata.clone(),
        });
    }
    let mut cmd = Command::new(opts.bin_dir.join("pg_ctl"));
    cmd.arg("-D")
        .arg(&opts.pgdata)
        .arg("-l")
        .arg(&opts.log_file)
        .arg("-W");
    if let Some(o) = &opts.server_options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg("start");
    let user = match &opts.run_as {
        Some(o) => Some(o.clone()),
        None => Owner::current().ok(),
    };
    if let Some(me) = user {
        cmd.env("HOME", &me.home)
            .env("USER", &me.name)
            .env("LOGNAME", &me.name);
    }
    if let Some(o) = &opts.run_as {
        use std::os::unix::process::CommandExt;
        cmd.uid(o.uid).gid(o.gid);
    }
    tracing::info!("starting PostgreSQL: {cmd:?}");
    let out = cmd.output().map_err(|e| StartError::Io {
        path: opts.bin_dir.join("pg_ctl"),
        source: e,
    })?;
    if !out.status.success() {
        return Err(StartError::PgCtl {
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string(),
        });
    }
    wait(opts).await
}

async fn wait(opts: &StartOptions) -> Result<StartOutcome, StartError> {
    let began = Instant::now();
    let mut last_report = Instant::now();
    let mut seen: Option<PidFile> = None;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut connect_error: Option<String> = None;
    loop {
        tokio::time::sleep(POLL).await;
        if let Some(t) = opts.timeout.filter(|t| began.elapsed() > *t) {
            return Err(StartError::Timeout {
                secs: t.as_secs(),
                log: opts.log_file.clone(),
            });
        }
        let pid = read_pid_file(&opts.pgdata);
        if let Some(p) = &pid {
            seen = Some(p.clone());
        }
        let running = seen.as_ref().is_some_and(|p| alive(p.pid));
        if !running {
            if seen.is_some() || began.elapsed() > PID_FILE_WAIT {
                return exited(opts);
            }
            continue;
        }
        let p = seen.as_ref().expect("running implies seen");
        // Connections are accepted once consistent (status "standby") or after promotion.
        let accepting = pid
            .as_ref()
            .is_some_and(|p| p.status == "standby" || p.status == "ready");
        if client.is_none() && accepting {
            match connect(p, &opts.db_user).await {
                Ok(c) => client = Some(c),
                Err(e) => connect_error = Some(e),
            }
        }
        let Some(c) = &client else {
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                match &connect_error {
                    Some(e) => tracing::warn!(
                        "recovery: cannot connect as database user {} to check progress: {e} (set PGUSER to another role)",
                        opts.db_user
                    ),
                    None => tracing::info!("recovery: the server is starting (not yet consistent)"),
                }
            }
            continue;
        };
        match status(c, opts.pg_version_num).await {
            Ok(s) => {
                if !s.in_recovery {
                    let timeline = c
                        .query_one(
                            "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
                            &[],
                        )
                        .await
                        .ok()
                        .and_then(|r| r.get::<_, Option<String>>(0))
                        .and_then(|hex| u32::from_str_radix(&hex, 16).ok())
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into());
                    return Ok(StartOutcome::Promoted {
                        replay_lsn: s.replay_lsn,
                        last_xact: s.last_xact,
                        timeline,
                    });
                }
                if s.paused {
                    return Ok(StartOutcome::Paused {
                        replay_lsn: s.replay_lsn,
                        last_xact: s.last_xact,
                    });
                }
                if last_report.elapsed() >= REPORT_EVERY {
                    last_report = Instant::now();
                    tracing::info!(
                        "recovery: replayed up to {}, last transaction {}",
                        s.replay_lsn,
                        s.last_xact.as_deref().unwrap_or("none yet")
                    );
                }
            }
            // The server is going away (or restarting): the pid file decides next round.
            Err(_) => client = None,
        }
    }
}

async fn connect(p: &PidFile, user: &str) -> Result<tokio_postgres::Client, String> {
    let mut cfg = tokio_postgres::Config::new();
    if !p.socket_dir.is_empty() && !p.socket_dir.starts_with('@') {
        cfg.host_path(&p.socket_dir);
    } else {
        let host = p.listen.split(',').next().unwrap_or("").trim();
        cfg.host(match host {
            "" | "*" | "0.0.0.0" => "127.0.0.1",
            "::" => "::1",
            h => h,
        });
    }
    cfg.port(p.port)
        .user(user)
        .dbname("postgres")
        .application_name("pgpitr restore")
        .connect_timeout(Duration::from_secs(5));
    match cfg.connect(tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let _ = client.batch_execute("SET TimeZone = 'UTC'").await;
            Ok(client)
        }
        Err(e) => {
            tracing::debug!("connecting to the restored server: {e}");
            Err(e.to_string())
        }
    }
}

struct Status {
    in_recovery: bool,
    paused: bool,
    replay_lsn: String,
    last_xact: Option<String>,
}

async fn status(c: &tokio_postgres::Client, version: u32) -> Result<Status, tokio_postgres::Error> {
    let paused = if version >= 140_000 {
        "pg_get_wal_replay_pause_state() = 'paused'"
    } else {
        "pg_is_wal_replay_paused()"
    };
    let row = c
        .query_one(
            &format!(
                "SELECT pg_is_in_recovery(), \
                        CASE WHEN pg_is_in_recovery() THEN {paused} ELSE false END, \
                        coalesce(pg_last_wal_replay_lsn()::text, ''), \
                        pg_last_xact_replay_timestamp()::text"
            ),
            &[],
        )
        .await?;
    Ok(Status {
        in_recovery: row.get(0),
        paused: row.get(1),
        replay_lsn: row.get(2),
        last_xact: row.get(3),
    })
}

/// Why the postmaster is gone.
fn exited(opts: &StartOptions) -> Result<StartOutcome, StartError> {
    let log = std::fs::read_to_string(&opts.log_file).unwrap_or_default();
    if let Some(line) = log.lines().find(|l| l.contains(TARGET_NOT_REACHED)) {
        return Ok(StartOutcome::TargetNotReached {
            log_line: line.trim().to_string(),
        });
    }
    if opts.action == TargetAction::Shutdown {
        let control = controldata(&opts.bin_dir, &opts.pgdata);
        if control
            .iter()
            .any(|(k, v)| k == "Database cluster state" && v == "shut down in recovery")
        {
            return Ok(StartOutcome::ShutDown {
                min_recovery_lsn: control
                    .into_iter()
                    .find(|(k, _)| k == "Minimum recovery ending location")
                    .map(|(_, v)| v),
            });
        }
    }
    let lines: Vec<&str> = log.lines().collect();
    let mut tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.is_empty() {
        tail = "(empty: with logging_collector = on the server logs to its log_directory)".into();
    }
    Err(StartError::Exited {
        log: opts.log_file.clone(),
        tail,
    })
}

/// `pg_controldata` output as `(field, value)` pairs; empty if it cannot run.
fn controldata(bin_dir: &Path, pgdata: &Path) -> Vec<(String, String)> {
    let Ok(out) = Command::new(bin_dir.join("pg_controldata"))
        .arg("-D")
        .arg(pgdata)
        .env("LC_ALL", "C")
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_lines_are_read_as_postgresql_writes_them() {
        let text = "12345\n/srv/pg/restore\n1763889299\n5433\n/var/run/postgresql\n*\n  5432001    196608\nstandby \n";
        assert_eq!(
            parse_pid_file(text),
            Some(PidFile {
                pid: 12345,
                port: 5433,
                socket_dir: "/var/run/postgresql".into(),
                listen: "*".into(),
                status: "standby".into(),
            })
        );
        // Written in steps: early on only the first lines exist.
        assert_eq!(parse_pid_file("12345\n/srv/pg\n"), None);
        let early = parse_pid_file("12345\n/srv/pg\n1\n5432\n").unwrap();
        assert_eq!(early.status, "");
    }
}
