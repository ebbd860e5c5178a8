//! `pgpitr status [--json]`: the repository's health at a glance, judged by the rules of
//! [`crate::monitor::checks`] against the configured thresholds. The exit code follows the
//! Nagios plugin convention: 0 OK, 1 WARNING, 2 CRITICAL (an unreachable repository too), and 3
//! UNKNOWN for a configuration error (decided by the binary, before any check).

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::monitor::checks::{self, Check, Level};
use crate::monitor::facts::Facts;
use crate::monitor::scan;

#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = "\
Checks (one line each: level, what, age, the fix):
  backup      the newest backup's age            (max_backup_age, default 8d; none at all: CRITICAL)
  wal         the newest archived WAL's age      (max_wal_age, default 1h; none at all: CRITICAL)
  window      what can be recovered, per timeline (backups but none restorable: WARNING)
  repository  size and bytes written in the last 7 days
  verify      the last `pgpitr verify`            (max_verify_age, default 8d; failed: CRITICAL; never: WARNING)
  drill       the last `pgpitr drill` and its RTO (max_drill_age, default 35d; failed: CRITICAL; never: WARNING)
An age over its limit is a WARNING, over twice its limit CRITICAL. The age of WAL is judged by the
time the storage stored it (mtime, S3 Last-Modified) against this host's clock.

Exit codes (Nagios plugin convention): 0 OK, 1 WARNING, 2 CRITICAL (also: the repository cannot
be read), 3 UNKNOWN (a configuration error). The first line of the text output sums it up.

Example, from cron or as a Nagios/Icinga check command:
  pgpitr status || mail -s \"pgpitr: $(pgpitr status | head -1)\" dba@example.com
  pgpitr status --json | jq -r '.checks[] | select(.level != \"ok\") | .message'")]
pub struct StatusArgs {
    /// Print one JSON document (status, exit_code, repository, checks, facts) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `status` found.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The worst level of the checks.
    pub status: Level,
    /// The exit code for it.
    pub exit_code: u8,
    /// The repository's location.
    pub repository: String,
    pub checks: Vec<Check>,
    /// What the scan found; `None` when the repository could not be read.
    pub facts: Option<Facts>,
}

/// Scans the repository and judges it.
///
/// # Errors
/// Only configuration errors: a repository that cannot be read is a CRITICAL report.
pub async fn run(config: &Config) -> Result<StatusReport, ConfigError> {
    let thresholds = config.thresholds()?;
    let opened = match config.storage().await {
        Ok(storage) => Ok(storage),
        // The repository's key could not be read: as unreachable as a failed scan.
        Err(e) if e.storage_error().is_some() => Err(e.to_string()),
        Err(e) => return Err(e),
    };
    let repository = match &opened {
        Ok(storage) => storage.location(),
        Err(_) => config.raw_storage().await?.location(),
    };
    let scanned = match opened {
        Ok(storage) => scan::scan(storage.as_ref())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let (checks, facts) = match scanned {
        Ok(facts) => (
            checks::evaluate(&facts, &thresholds, jiff::Timestamp::now()),
            Some(facts),
        ),
        Err(e) => (
            vec![Check {
                name: "repository",
                level: Level::Critical,
                message: format!("unreachable: {}", one_line(&e)),
                age_seconds: None,
                threshold_seconds: None,
                fix: Some("check `repo` and the access to it (`pgpitr check`)".into()),
            }],
            None,
        ),
    };
    let status = checks::overall(&checks);
    Ok(StatusReport {
        status,
        exit_code: status.exit_code(),
        repository,
        checks,
        facts,
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The text form: a summary line, then one line per check (an unreachable repository: the one
/// line alone).
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if r.facts.is_none() {
        for c in &r.checks {
            let _ = writeln!(
                s,
                "PGPITR {} - repository {} {}",
                c.level.as_str(),
                r.repository,
                c.message
            );
        }
        return s;
    }
    let count = |l: Level| r.checks.iter().filter(|c| c.level == l).count();
    let _ = writeln!(
        s,
        "PGPITR {} - {} critical, {} warning(s); repository {}",
        r.status.as_str(),
        count(Level::Critical),
        count(Level::Warning),
        r.repository
    );
    for c in &r.checks {
        let _ = write!(s, "{:<8} {}: {}", c.level.as_str(), c.name, c.message);
        match &c.fix {
            Some(fix) => {
                let _ = writeln!(s, "; fix: {fix}");
            }
            None => s.push('\n'),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_repository_is_one_line() {
        let r = StatusReport {
            status: Level::Critical,
            exit_code: 2,
            repository: "s3://b/p".into(),
            checks: vec![Check {
                name: "repository",
                level: Level::Critical,
                message: format!("unreachable: {}", one_line("storage unavailable\n  for ''")),
                age_seconds: None,
                threshold_seconds: None,
                fix: None,
            }],
            facts: None,
        };
        assert_eq!(
            render(&r),
            "PGPITR CRITICAL - repository s3://b/p unreachable: storage unavailable for ''\n"
        );
    }
}
