//! `pgpitr restore`: plans like `pgpitr plan` (refusing before anything is written when no plan
//! reaches the target), writes a new data directory that recovers to the target
//! ([`crate::recovery::restore`]), and with `--start` starts PostgreSQL on it and waits for the
//! end of recovery ([`crate::recovery::start`]).
//!
//! Before it reads anything, `restore` writes a lease (`leases/<token>.lease`, see
//! [`crate::repo::lease`]) that stops `expire` from deleting anything; once the plan is made it
//! narrows the lease to the chosen backup and the WAL from its start, for `--recovery-lease`
//! (default 7 days), so that the recovery through `pgpitr-restore` that follows keeps what it
//! reads (issue 15, item 6). A restore that fails before the data directory is written removes
//! its lease.
//!
//! Ownership: a restore run as root writes files owned by root; `--owner USER` hands them to
//! USER, and `--start` as root requires `--owner` (PostgreSQL refuses to run as root) and runs
//! the server as that user. Run as the PostgreSQL user itself, neither is needed.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::recovery::restore::{self, is_root, Owner, RestoreError, RestoreRequest, Restored};
use crate::recovery::settings::{ArchiveMode, TargetAction};
use crate::recovery::start::{self, StartError, StartOptions, StartOutcome};
use crate::recovery::target::quote_setting;
use crate::recovery::RecoveryPlan;
use crate::repo::lease::{Lease, LeaseScope};
use crate::retention::KeepWithin;
use crate::storage::StorageError;

use super::backup::human_bytes;
use super::plan::{load_and_plan, PlanCommandError, TargetArgs};

/// The log file `--start` gives `pg_ctl -l`, inside the data directory.
pub const START_LOG: &str = "pgpitr-start.log";

/// Arguments of `pgpitr restore`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Read location NAME first: `main` (the repository) or a copy's name; the next locations
    /// are tried only when it is unreachable. The restored server's restore_command reads
    /// from the location the restore read.
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    /// The new data directory; it must not exist or be empty (its parent must exist).
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// What the server does at the target (recovery_target_action). The default, pause, is
    /// PostgreSQL's: the server stays read-only at the target until
    /// `SELECT pg_wal_replay_resume()` promotes it, so the data can be checked before a new
    /// timeline begins.
    #[arg(long, value_enum, default_value_t = TargetAction::Pause)]
    pub target_action: TargetAction,
    /// Restore tablespace OID into DIR instead of its original location (repeatable).
    #[arg(long = "tablespace-map", value_name = "OID=DIR", value_parser = parse_tablespace_map)]
    pub tablespace_map: Vec<(u32, PathBuf)>,
    /// off (default): the restored server does not archive; preserve: keep the source's
    /// archive_mode and archive_command (a promoted copy then archives its new timeline into
    /// the same repository).
    #[arg(long, value_enum, default_value_t = ArchiveMode::Off)]
    pub archive_mode: ArchiveMode,
    /// Give the restored files to this user (root only); required with --start as root.
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    /// Start PostgreSQL on the restored directory, wait until recovery ends and report where.
    /// Exit code 3 when recovery ended before the target.
    #[arg(long)]
    pub start: bool,
    /// Directory of pg_ctl for the backup's major version (default:
    /// /usr/lib/postgresql/<major>/bin, else the PATH).
    #[arg(long, value_name = "DIR", requires = "start")]
    pub pg_bin: Option<PathBuf>,
    /// Options for the server, passed to `pg_ctl -o` (e.g. "-p 5433").
    #[arg(
        long,
        value_name = "OPTIONS",
        requires = "start",
        allow_hyphen_values = true
    )]
    pub server_options: Option<String>,
    /// Stop waiting for the end of recovery after this many seconds (the server keeps running).
    #[arg(long, value_name = "SECONDS", requires = "start")]
    pub start_timeout: Option<u64>,
    /// How long the restore's lease keeps the chosen backup and its WAL from `pgpitr expire`
    /// after the restore, for the recovery that reads them through pgpitr-restore: 7d, 12h.
    /// `pgpitr unlock --leases` ends it earlier.
    #[arg(long, value_name = "DURATION", default_value = "7d")]
    pub recovery_lease: KeepWithin,
}

fn parse_tablespace_map(s: &str) -> Result<(u32, PathBuf), String> {
    let (oid, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("expected OID=DIR, got '{s}'"))?;
    let oid: u32 = oid
        .trim()
        .parse()
        .map_err(|_| format!("'{oid}' is not a tablespace OID"))?;
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(format!("'{}' is not an absolute path", dir.display()));
    }
    Ok((oid, dir))
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanCommandError),
    #[error("backup {0} is listed but its manifest could not be read")]
    NoManifest(String),
    #[error("cannot write the restore's lease, which keeps expire from deleting what the restore reads: {0}; hint: the restore needs write access to leases/ in the repository (nothing was written)")]
    Lease(StorageError),
    #[error("--start as root needs --owner USER: PostgreSQL refuses to run as root (nothing was written)")]
    StartNeedsOwner,
    #[error("--tablespace-map {0}=…: given twice")]
    DuplicateMap(u32),
    #[error("{0} (nothing was written)")]
    BeforeWriting(StartError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("the data directory is restored at {pgdata}, but starting it failed: {source}")]
    Start {
        pgdata: PathBuf,
        #[source]
        source: StartError,
    },
}

impl RestoreCommandError {
    /// Whether this is a mistake in the arguments (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RestoreCommandError::Config(_)
                | RestoreCommandError::StartNeedsOwner
                | RestoreCommandError::DuplicateMap(_)
        )
    }
}

/// What `restore` did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub plan: RecoveryPlan,
    pub restored: Restored,
    pub owner: Option<String>,
    pub start: Option<StartOutcome>,
    /// The lease left for the recovery, and how long it holds.
    pub lease: Option<(String, KeepWithin)>,
}

impl RestoreReport {
    /// 0, or 3 when recovery ended before the target.
    pub fn exit_code(&self) -> u8 {
        match self.start {
            Some(StartOutcome::TargetNotReached { .. }) => 3,
            _ => 0,
        }
    }
}

/// `pgpitr restore`; `bin_dir` is where `pgpitr-restore` is installed (beside `pgpitr`).
///
/// # Errors
/// Bad arguments, no plan (nothing written), a refused directory (nothing written), failures
/// while writing (what was written is removed), a server that fails to start.
pub async fn run(
    config: &Config,
    args: &RestoreArgs,
    bin_dir: &Path,
) -> Result<RestoreReport, RestoreCommandError> {
    let owner = match &args.owner {
        Some(name) => Some(Owner::lookup(name)?),
        None => None,
    };
    if args.start && is_root() && owner.is_none() {
        return Err(RestoreCommandError::StartNeedsOwner);
    }
    let mut tablespace_map = std::collections::HashMap::new();
    for (oid, dir) in &args.tablespace_map {
        if tablespace_map.insert(*oid, dir.clone()).is_some() {
            return Err(RestoreCommandError::DuplicateMap(*oid));
        }
    }
    let pgdata = absolute(&args.pgdata);

    let storage = config.storage().await?;
    let mut lease = Lease::take(storage.clone(), &pgdata)
        .await
        .map_err(RestoreCommandError::Lease)?;
    let result = run_leased(
        config,
        args,
        bin_dir,
        storage,
        &mut lease,
        owner,
        tablespace_map,
        pgdata,
    )
    .await;
    match result {
        Ok(mut report) => {
            report.lease = Some((lease.key().to_string(), args.recovery_lease));
            Ok(report)
        }
        // The data directory exists: the recovery may still be started by hand.
        Err(e @ RestoreCommandError::Start { .. }) => Err(e),
        Err(e) => {
            lease.remove().await;
            Err(e)
        }
    }
}

/// The restore, under `lease`.
#[allow(clippy::too_many_arguments)]
async fn run_leased(
    config: &Config,
    args: &RestoreArgs,
    bin_dir: &Path,
    storage: crate::storage::DynStorage,
    lease: &mut Lease,
    owner: Option<Owner>,
    tablespace_map: std::collections::HashMap<u32, PathBuf>,
    pgdata: PathBuf,
) -> Result<RestoreReport, RestoreCommandError> {
    let (state, plan) = load_and_plan(storage.as_ref(), &args.target).await?;
    for n in &plan.notes {
        tracing::warn!("{n}");
    }
    let manifest = state
        .manifest(&plan.backup.id)
        .ok_or_else(|| RestoreCommandError::NoManifest(plan.backup.id.to_string()))?;
    let start_opts = if args.start {
        let major = manifest.pg_version_num / 10_000;
        let bin = match &args.pg_bin {
            Some(d) => d.clone(),
            None => start::find_bin_dir(major).ok_or(RestoreCommandError::BeforeWriting(
                StartError::NoPgCtl { major },
            ))?,
        };
        Some(StartOptions {
            pgdata: pgdata.clone(),
            bin_dir: bin,
            server_options: args.server_options.clone(),
            log_file: pgdata.join(START_LOG),
            action: args.target_action,
            db_user: std::env::var("PGUSER")
                .ok()
                .or_else(|| owner.as_ref().map(|o| o.name.clone()))
                .or_else(|| Owner::current().ok().map(|o| o.name))
                .unwrap_or_else(|| "postgres".into()),
            pg_version_num: manifest.pg_version_num,
            timeout: args.start_timeout.map(std::time::Duration::from_secs),
            run_as: None,
        })
    } else {
        None
    };

    lease
        .narrow(
            LeaseScope {
                backup: manifest.id.clone(),
                start_timeline: manifest.start_timeline,
                start_lsn: manifest.start_lsn,
            },
            std::time::Duration::from_secs(args.recovery_lease.seconds),
        )
        .await
        .map_err(RestoreCommandError::Lease)?;

    let req = RestoreRequest {
        config,
        plan: &plan,
        manifest,
        pgdata: pgdata.clone(),
        tablespace_map,
        action: args.target_action,
        archive_mode: args.archive_mode,
        restore_bin: bin_dir.join("pgpitr-restore"),
        owner: owner.clone(),
    };
    tracing::info!(
        "restoring backup {} into {} ({})",
        plan.backup.id,
        pgdata.display(),
        plan.reason
    );
    let restored = restore::restore(storage, &req).await?;

    let start = match start_opts {
        Some(opts) => {
            if let (true, Some(o)) = (is_root(), &owner) {
                start::drop_privileges(o).map_err(|source| RestoreCommandError::Start {
                    pgdata: pgdata.clone(),
                    source,
                })?;
            }
            Some(start::start_and_wait(&opts).await.map_err(|source| {
                RestoreCommandError::Start {
                    pgdata: pgdata.clone(),
                    source,
                }
            })?)
        }
        None => None,
    };
    Ok(RestoreReport {
        plan,
        restored,
        owner: owner.map(|o| o.name),
        start,
        lease: None,
    })
}

/// `p` made absolute against the current directory (without resolving symlinks: the
/// directory may not exist yet).
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The report for people.
pub fn render(r: &RestoreReport) -> String {
    let p = &r.plan;
    let w = &r.restored;
    let mut out = String::new();
    out.push_str(&format!(
        "restored backup {} into {}: {} files, {} ({} read) in {:.1} s\n",
        p.backup.id,
        w.pgdata.display(),
        w.files,
        human_bytes(w.bytes),
        human_bytes(w.fetched),
        w.elapsed.as_secs_f64()
    ));
    out.push_str(&format!("why: {}\n", p.reason));
    for (oid, dir) in &w.tablespaces {
        out.push_str(&format!("tablespace {oid}: {}\n", dir.display()));
    }
    out.push_str(&format!(
        "recovery: {} on timeline {}, {} WAL files to replay from the archive ({} compressed)\n",
        p.spec.target,
        p.target_timeline,
        p.segments.len(),
        human_bytes(p.bytes_to_fetch)
    ));
    out.push_str("postgresql.auto.conf:\n");
    for (k, v) in &w.settings {
        out.push_str(&format!("  {k} = {}\n", quote_setting(v)));
    }
    out.push_str(&format!(
        "repository for restore_command: {}\n",
        w.config_file.display()
    ));
    if let Some((key, until)) = &r.lease {
        out.push_str(&format!(
            "lease: {key} keeps backup {} and its WAL from expire for {until}; `pgpitr unlock --leases` ends it once recovery is done\n",
            p.backup.id
        ));
    }
    match &r.start {
        None => {
            let who = match (&r.owner, is_root()) {
                (Some(o), _) => format!("as {o}: "),
                (None, true) => "after `chown -R postgres: <dir>`, as postgres: ".into(),
                (None, false) => String::new(),
            };
            out.push_str(&format!(
                "next: {who}pg_ctl -D {} start; recovery then ends with recovery_target_action = {}\n",
                w.pgdata.display(),
                recovery_action(r)
            ));
        }
        Some(StartOutcome::Promoted {
            replay_lsn,
            last_xact,
            timeline,
        }) => out.push_str(&format!(
            "recovery ended at lsn {replay_lsn}, last transaction {}; promoted to timeline {timeline}, open for writes\n",
            last_xact.as_deref().unwrap_or("(none replayed)")
        )),
        Some(StartOutcome::Paused {
            replay_lsn,
            last_xact,
        }) => out.push_str(&format!(
            "recovery paused at the target: lsn {replay_lsn}, last transaction {}; the server is read-only — check the data, then `SELECT pg_wal_replay_resume()` to promote\n",
            last_xact.as_deref().unwrap_or("(none replayed)")
        )),
        Some(StartOutcome::ShutDown { min_recovery_lsn }) => out.push_str(&format!(
            "recovery reached the target and the server shut down (minimum recovery ending location {})\n",
            min_recovery_lsn.as_deref().unwrap_or("?")
        )),
        Some(StartOutcome::TargetNotReached { log_line }) => out.push_str(&format!(
            "recovery ended before the target {}: the archived WAL stops earlier (server log: {log_line}); the server stopped. Wait for more WAL to be archived, or restore to an earlier target\n",
            p.spec.target
        )),
    }
    out
}

fn recovery_action(r: &RestoreReport) -> String {
    r.restored
        .settings
        .iter()
        .find(|(k, _)| k == "recovery_target_action")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}
