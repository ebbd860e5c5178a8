//! `pgpitr check`: proves the setup works end to end, each failure with its fix — the
//! configuration, the storage, the replication connection and permission, `wal_level`,
//! `archive_mode`, `archive_command`, and finally a forced WAL switch whose segment must appear
//! in the repository. On a hot standby (issue 20), which cannot switch WAL, `check` says what a
//! backup from it needs and waits instead for the last segment it received complete.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::pg::{Lsn, TimelineId, WalFileName, WalSegmentName};
use crate::repo::encryption::KeyError;
use crate::repo::{wal, RepoError, RepoIdentity};
use crate::walsender::{ConnectParams, ReplicationConnection};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Seconds to wait for the switched WAL segment to reach the repository.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check that can run; later checks that depend on a failed one are skipped.
pub async fn run(config: &Config, args: &CheckArgs) -> Vec<Check> {
    let mut out = vec![Check::ok("config", format!("repository {}", config.repo))];

    let storage = match config.storage().await {
        Ok(s) => s,
        Err(e) => {
            let (name, fix) = match &e {
                ConfigError::Key(k) if !matches!(k, KeyError::Storage(_)) => (
                    "encryption",
                    "see docs/operations.md, \"Encryption at rest\" (`pgpitr key list` shows the key slots)",
                ),
                _ => ("storage", "fix `repo` in the configuration"),
            };
            out.push(Check::fail(name, e.to_string(), fix));
            return out;
        }
    };
    out.push(Check::ok(
        "encryption",
        match storage.encryption() {
            Some(r) => format!(
                "encrypted repository (key {}), opened with the configured passphrase",
                r.key
            ),
            None => "not encrypted (chosen at creation: `pgpitr init --encrypt`)".to_string(),
        },
    ));
    let identity = match storage.check_writable().await {
        Err(e) => {
            out.push(Check::fail(
                "storage",
                e.to_string(),
                "make the repository exist and be writable by this user",
            ));
            return out;
        }
        Ok(()) => match RepoIdentity::load(storage.as_ref()).await {
            Ok(id) => {
                out.push(Check::ok(
                    "storage",
                    format!(
                        "{} reachable, cluster {}",
                        storage.location(),
                        id.system_identifier
                    ),
                ));
                Some(id)
            }
            Err(RepoError::NotInitialized { .. }) => {
                out.push(Check::ok(
                    "storage",
                    format!("{} reachable, no WAL archived yet", storage.location()),
                ));
                None
            }
            Err(e) => {
                out.push(Check::fail(
                    "storage",
                    e.to_string(),
                    "point `repo` at this cluster's repository",
                ));
                return out;
            }
        },
    };

    if let Some(lock) = storage.object_lock() {
        out.push(Check::ok(
            "object lock",
            format!(
                "{} mode: the bucket has Object Lock enabled; new objects are locked for {} (see docs/operations.md, \"Immutable backups\")",
                lock.mode.name(),
                crate::repo::staging::human_age(lock.retain.as_secs())
            ),
        ));
    }

    let params = match ConnectParams::from_conninfo(&config.conninfo) {
        Ok(p) => p,
        Err(e) => {
            out.push(Check::fail(
                "connection",
                e.to_string(),
                e.hint().unwrap_or_default(),
            ));
            return out;
        }
    };
    let mut conn = match ReplicationConnection::connect(&params).await {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            // A standby in recovery without hot_standby refuses every connection.
            let fix = if message.contains("starting up")
                || message.contains("not accepting connections")
                || message.contains("Hot standby")
            {
                "if this server is a standby, set hot_standby = on there and restart it: a backup \
                 from a standby connects to it"
                    .to_string()
            } else {
                e.hint().unwrap_or_default()
            };
            out.push(Check::fail("replication connection", message, fix));
            return out;
        }
    };
    let mut received = None;
    match conn.identify_system().await {
        Ok(system) => match &identity {
            Some(id) if id.system_identifier != system.system_identifier => out.push(Check::fail(
                "replication connection",
                format!(
                    "the server is cluster {}, the repository holds cluster {}",
                    system.system_identifier, id.system_identifier
                ),
                "give each cluster its own repository",
            )),
            _ => {
                received = system
                    .xlogpos
                    .parse::<Lsn>()
                    .ok()
                    .map(|lsn| (TimelineId(system.timeline), lsn));
                out.push(Check::ok(
                    "replication connection",
                    format!(
                        "{} as {}, PostgreSQL {}, cluster {}",
                        params.target(),
                        params.user,
                        conn.server_version(),
                        system.system_identifier
                    ),
                ))
            }
        },
        Err(e) => {
            out.push(Check::fail(
                "replication connection",
                e.to_string(),
                e.hint().unwrap_or_default(),
            ));
            return out;
        }
    }

    let show = |v: Result<String, _>| {
        v.unwrap_or_else(|e: crate::walsender::WalsenderError| format!("<{e}>"))
    };
    let wal_level = show(conn.show("wal_level").await);
    out.push(if wal_level == "minimal" {
        Check::fail(
            "wal_level",
            "minimal: WAL cannot rebuild a base backup",
            "set wal_level = replica in postgresql.conf and restart",
        )
    } else {
        Check::ok("wal_level", wal_level)
    });
    let standby =
        crate::pgsql::is_standby(conn.parameter("in_hot_standby").map(str::to_owned), &params)
            .await
            .unwrap_or(false);
    let archive_mode = show(conn.show("archive_mode").await);
    // A standby's own archive_command runs only with archive_mode = always.
    let standby_archives = archive_mode == "always";
    if standby {
        out.push(Check::ok(
            "standby",
            "this server is a hot standby: a backup from it reads nothing from the primary; its \
             WAL must reach this repository from the primary (archive_mode = on and \
             archive_command = pgpitr-archive there, with archive_timeout so that segments \
             switch while the primary is quiet) or from this standby (archive_mode = always)",
        ));
    }
    out.push(if standby && !standby_archives {
        Check::ok(
            "archive_mode",
            format!(
                "{archive_mode}: this standby archives nothing while in recovery; the primary must \
                 archive into this repository (or set archive_mode = always here)"
            ),
        )
    } else if archive_mode == "on" || archive_mode == "always" {
        Check::ok("archive_mode", archive_mode)
    } else {
        Check::fail(
            "archive_mode",
            archive_mode,
            "set archive_mode = on in postgresql.conf and restart",
        )
    });
    let archive_command = show(conn.show("archive_command").await);
    let seg_size = conn
        .show("wal_segment_size")
        .await
        .ok()
        .and_then(|s| super::backup::parse_segment_size(&s));
    out.push(
        if standby && !standby_archives && !archive_command.contains("pgpitr-archive") {
            Check::ok(
                "archive_command",
                format!("'{archive_command}' (not run while this standby is in recovery)"),
            )
        } else if archive_command.contains("pgpitr-archive")
            && archive_command.contains("%p")
            && archive_command.contains("%f")
        {
            Check::ok("archive_command", archive_command)
        } else {
            Check::fail(
                "archive_command",
                format!("'{archive_command}' does not call pgpitr-archive %p %f"),
                "set archive_command = '/usr/local/bin/pgpitr-archive %p %f' and reload",
            )
        },
    );
    conn.close().await;
    if out.iter().any(|c| !c.ok) {
        return out;
    }

    if standby {
        out.push(
            match standby_wait(
                config,
                received,
                seg_size,
                Duration::from_secs(args.timeout),
            )
            .await
            {
                Ok((segment, waited)) => Check::ok(
                    "archiving",
                    format!(
                        "{segment}, the last segment this standby received complete, is in the \
                         repository (after {:.1} s)",
                        waited.as_secs_f64()
                    ),
                ),
                Err((detail, fix)) => Check::fail("archiving", detail, fix),
            },
        );
        return out;
    }
    out.push(
        match switch_and_wait(config, &params, Duration::from_secs(args.timeout)).await {
            Ok((segment, waited)) => Check::ok(
                "archiving",
                format!(
                    "{segment} reached the repository in {:.1} s",
                    waited.as_secs_f64()
                ),
            ),
            Err((detail, fix)) => Check::fail("archiving", detail, fix),
        },
    );
    out
}

/// Forces a WAL switch and waits until the segment it closed is in the repository.
async fn switch_and_wait(
    config: &Config,
    params: &ConnectParams,
    timeout: Duration,
) -> Result<(WalFileName, Duration), (String, String)> {
    let client = crate::pgsql::connect(params, "pgpitr check")
        .await
        .map_err(|e| {
            (
                e,
                "allow an ordinary connection to database postgres for this role in pg_hba.conf"
                    .to_string(),
            )
        })?;
    // A record first (a transaction's commit), so that the switch closes a segment even on an
    // idle server whose last switch left it at a segment's start: there a switch is a no-op,
    // and the segment named would not be closed before the server wrote more (a second `check`
    // in a row would time out).
    client
        .batch_execute("SELECT txid_current()")
        .await
        .map_err(|e| (format!("txid_current(): {e}"), String::new()))?;
    let row = client
        .query_one(
            "SELECT pg_walfile_name(pg_current_wal_insert_lsn()), pg_switch_wal()::text",
            &[],
        )
        .await
        .map_err(|e| {
            (
                format!("pg_switch_wal(): {e}"),
                "run pgpitr check as a superuser or grant EXECUTE ON FUNCTION pg_switch_wal"
                    .to_string(),
            )
        })?;
    let name: String = row.get(0);
    let segment: WalFileName = name
        .parse()
        .map_err(|e: crate::pg::ParseError| (e.to_string(), String::new()))?;
    let storage = config
        .storage()
        .await
        .map_err(|e| (e.to_string(), String::new()))?;
    let started = Instant::now();
    loop {
        match wal::find(storage.as_ref(), segment).await {
            Ok(found) if !found.is_empty() => return Ok((segment, started.elapsed())),
            Ok(_) => {}
            Err(e) => return Err((e.to_string(), "check the repository".into())),
        }
        if started.elapsed() > timeout {
            let failed: Option<String> = client
                .query_one("SELECT last_failed_wal FROM pg_stat_archiver", &[])
                .await
                .ok()
                .and_then(|r| r.get(0));
            return Err((
                format!("{segment} did not reach the repository within {} s (last failed: {})", timeout.as_secs(), failed.unwrap_or_else(|| "none".into())),
                "look for 'pgpitr-archive: error' in PostgreSQL's log; the archive_command must reach the same repository as this configuration".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// On a standby, which cannot switch WAL: waits until the segment before the one holding
/// `received` (the position IDENTIFY_SYSTEM reported, on its timeline) is in the repository.
async fn standby_wait(
    config: &Config,
    received: Option<(TimelineId, Lsn)>,
    seg_size: Option<crate::pg::WalSegSize>,
    timeout: Duration,
) -> Result<(WalSegmentName, Duration), (String, String)> {
    let (Some((tli, lsn)), Some(seg_size)) = (received, seg_size) else {
        return Err((
            "cannot read this standby's WAL position or segment size".into(),
            "check the replication connection".into(),
        ));
    };
    let Some(segno) = lsn.segno(seg_size).checked_sub(1).filter(|&n| n > 0) else {
        return Err((
            format!("this standby has received no complete segment yet (at {lsn})"),
            "wait for the primary to switch segments (archive_timeout) and run check again".into(),
        ));
    };
    let segment = WalSegmentName::from_segno(tli, segno, seg_size);
    let storage = config
        .storage()
        .await
        .map_err(|e| (e.to_string(), String::new()))?;
    let started = Instant::now();
    loop {
        match wal::find(storage.as_ref(), WalFileName::Segment(segment)).await {
            Ok(found) if !found.is_empty() => return Ok((segment, started.elapsed())),
            Ok(_) => {}
            Err(e) => return Err((e.to_string(), "check the repository".into())),
        }
        if started.elapsed() > timeout {
            return Err((
                format!(
                    "{segment}, the last segment this standby received complete, did not reach \
                     the repository within {} s",
                    timeout.as_secs()
                ),
                "archive into this repository from the primary (archive_mode = on, \
                 archive_command = 'pgpitr-archive %p %f') or from this standby (archive_mode = \
                 always, same archive_command), and look for 'pgpitr-archive: error' in that \
                 server's log"
                    .into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Human-readable report, one line per check plus a fix line for failures.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!(
            "{:<24} {}  {}\n",
            c.name,
            if c.ok { "ok  " } else { "FAIL" },
            c.detail
        ));
        if let Some(fix) = c.fix.as_deref().filter(|f| !f.is_empty()) {
            s.push_str(&format!("{:<24}       fix: {fix}\n", ""));
        }
    }
    s
}
