//! `pgpitr drill`: a restore drill that proves the repository can be recovered, end to end.
//!
//! Steps, each named in the result when it fails:
//!
//! 1. `plan` — read the repository and choose the target: `latest` (everything archived),
//!    `random` (a uniformly random LSN inside the recoverable window of the newest timeline,
//!    printed so that the drill can be repeated with `--target LSN`) or a given time or LSN;
//! 2. `restore` — `pgpitr restore` into `<scratch>/data` with `recovery_target_action = pause`
//!    and `archive_mode = off` (the drill never archives into the repository); run as root,
//!    the files go to `--owner` (default `postgres`);
//! 3. `start` / `recovery` — start PostgreSQL as the data directory's owner (a child process
//!    switched to its uid and gid; pgpitr stays root to clean up), on a free port, with its Unix
//!    socket inside the scratch directory, `listen_addresses = ''` (never reachable from the
//!    network), its own `pg_hba.conf` (local trust: only the owner and root can enter the
//!    socket directory), `hot_standby = on`, `ssl = off`, `lc_messages = C` (the log is read),
//!    and wait for the end of recovery ([`crate::recovery::start`]);
//! 4. `target` — prove the target was reached: for a time or LSN, recovery must be paused
//!    and the server log must say "recovery stopping before/after …" (a pause for any other
//!    reason, or PostgreSQL's "recovery ended before configured recovery target was reached",
//!    fails), the last replayed commit must not be later than a time target and the replay
//!    LSN not before an LSN target; for `latest`, replay must reach the newest segment the
//!    repository holds on the target timeline — recovery that stops early at a gap in the
//!    archive promotes without any error from PostgreSQL, and is a failed drill here;
//! 5. `promote` — `pg_wal_replay_resume()`: the scratch copy opens for writes (on a new
//!    timeline that is archived nowhere), so that `pg_amcheck --install-missing` can install
//!    amcheck where the source lacks it;
//! 6. `amcheck` — `pg_amcheck --all` when installed (beside `postgres`, else on the `PATH`;
//!    `skipped` otherwise);
//! 7. `check-sql` — the DBA's checks (see [`parse_checks`] for the format);
//! 8. the result is written to the repository ([`crate::repo::runs::DrillRun`], also when a
//!    step failed), the server is stopped (`pg_ctl stop -m fast`, then `immediate`), the
//!    restore's lease removed and the scratch directory removed unless `--keep` (it is then left
//!    with the server stopped). The same cleanup runs on Ctrl-C and SIGTERM (step
//!    `interrupted`).
//!
//! The recovery time objective measured is restore + recovery (to the pause at the target, or
//! to promotion for `latest`), in seconds.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::pg::Lsn;
use crate::recovery::restore::{is_root, Owner};
use crate::recovery::settings::{shell_quote, ArchiveMode, TargetAction};
use crate::recovery::source::RepoState;
use crate::recovery::start::{self, StartError, StartOptions, StartOutcome};
use crate::recovery::target::format_target_time;
use crate::recovery::{archived_wal_ranges, recoverable_windows, BackupSummary, TargetTimeline};
use crate::repo::runs::{self, DrillRun};
use crate::retention::KeepWithin;
use crate::storage::DynStorage;

use super::plan::{TargetArgs, TargetKeyword};
use super::restore::{RestoreArgs, RestoreCommandError};

/// The server log of the drill, in the scratch directory.
pub const LOG_FILE: &str = "postgresql.log";

/// Arguments of `pgpitr drill`.
#[derive(clap::Args, Debug, Clone)]
pub struct DrillArgs {
    /// What to recover to: latest (all archived WAL), random (a random LSN inside the
    /// recoverable window of the newest timeline; printed, to repeat the drill with --target
    /// LSN), a time ('2026-11-23 10:14:59+01') or an LSN (0/16B3748).
    #[arg(
        long,
        value_name = "random|latest|TIME|LSN",
        default_value = "latest",
        value_parser = parse_drill_target
    )]
    pub target: DrillTarget,
    /// The DBA's checks: SQL statements, each ending with `;` at the end of a line and returning
    /// one row with one boolean that must be true; `-- ` comment lines; `\c DBNAME` switches
    /// database (default postgres). E.g. `SELECT count(*) >= 1000 FROM orders;`.
    #[arg(long, value_name = "FILE")]
    pub check_sql: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Leave the scratch directory (server stopped) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Create the scratch directory inside DIR (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// When run as root: the user that owns the restored files and runs PostgreSQL.
    #[arg(long, value_name = "USER", default_value = "postgres")]
    pub owner: String,
    /// Directory of postgres/pg_ctl for the backup's major version (default:
    /// /usr/lib/postgresql/<major>/bin, else the PATH).
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Fail the recovery step when recovery has not ended after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub recovery_timeout: Option<u64>,
    /// Do not run pg_amcheck.
    #[arg(long)]
    pub no_amcheck: bool,
}

/// `--target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillTarget {
    Latest,
    Random,
    Time(Timestamp),
    Lsn(Lsn),
}

impl std::fmt::Display for DrillTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrillTarget::Latest => f.write_str("latest"),
            DrillTarget::Random => f.write_str("random"),
            DrillTarget::Time(t) => f.write_str(&format_target_time(*t)),
            DrillTarget::Lsn(l) => write!(f, "{l}"),
        }
    }
}

fn parse_drill_target(s: &str) -> Result<DrillTarget, String> {
    match s.trim() {
        "latest" => return Ok(DrillTarget::Latest),
        "random" => return Ok(DrillTarget::Random),
        _ => {}
    }
    if let Ok(l) = s.trim().parse::<Lsn>() {
        return Ok(DrillTarget::Lsn(l));
    }
    match crate::recovery::RecoveryTarget::time(s) {
        Ok(crate::recovery::RecoveryTarget::Time(t)) => Ok(DrillTarget::Time(t)),
        Ok(_) => Err(format!("'{s}' is not random, latest, a time or an LSN")),
        Err(e) => Err(format!("'{s}' is not random, latest or an LSN, and {e}")),
    }
}

/// Errors that stop a drill before it can record anything.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--owner {0}: no such user")]
    UnknownOwner(String),
    #[error("--owner {0}: PostgreSQL refuses to run as root; name another user")]
    RootOwner(String),
    #[error("--check-sql {path}: {message}")]
    CheckSql { path: PathBuf, message: String },
    #[error("cannot create the scratch directory in {dir}: {source}")]
    Scratch {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the drill ran (ok: {ok}) but its result could not be written to the repository: {source}"
    )]
    Record {
        ok: bool,
        source: crate::repo::RepoError,
    },
}

impl DrillError {
    /// Whether this is a mistake in the arguments (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            DrillError::Config(_)
                | DrillError::UnknownOwner(_)
                | DrillError::RootOwner(_)
                | DrillError::CheckSql { .. }
        )
    }
}

/// One check of `--check-sql`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The line where the statement starts (1-based).
    pub line: usize,
    pub database: String,
    pub sql: String,
}

/// Parses a `--check-sql` file: statements end with `;` at the end of a line (a last one may
/// lack it); lines whose first non-blank characters are `--` are comments; a line `\c DBNAME`
/// (or `\connect DBNAME`) between statements makes the following checks run in that database
/// (default `postgres`). Each statement must return exactly one row of one column, `true`.
///
/// # Errors
/// No statement at all, or `\c` without a name or inside a statement.
pub fn parse_checks(text: &str) -> Result<Vec<Check>, String> {
    let mut out = Vec::new();
    let mut database = "postgres".to_string();
    let mut current = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with("--") {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("\\connect")
            .or_else(|| line.strip_prefix("\\c"))
        {
            if !current.trim().is_empty() {
                return Err(format!("line {}: \\c inside a statement", i + 1));
            }
            let name = rest.trim().trim_matches('"');
            if name.is_empty() || rest.starts_with(|c: char| !c.is_whitespace()) {
                return Err(format!("line {}: expected \\c DBNAME", i + 1));
            }
            database = name.to_string();
            continue;
        }
        if current.is_empty() {
            start = i + 1;
        } else {
            current.push('\n');
        }
        current.push_str(raw.trim_end());
        if line.ends_with(';') {
            push_check(&mut out, &mut current, start, &database);
        }
    }
    push_check(&mut out, &mut current, start, &database);
    if out.is_empty() {
        return Err("no SQL statement in the file".into());
    }
    Ok(out)
}

fn push_check(out: &mut Vec<Check>, current: &mut String, line: usize, database: &str) {
    let sql = current.trim().trim_end_matches(';').trim().to_string();
    current.clear();
    if !sql.is_empty() {
        out.push(Check {
            line,
            database: database.to_string(),
            sql,
        });
    }
}

/// What one check returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub line: usize,
    pub database: String,
    pub sql: String,
    pub ok: bool,
    /// `t`, `f`, or what went wrong (one line).
    pub result: String,
}

/// What `drill` did: the record written to the repository and details for the report.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    #[serde(flatten)]
    pub run: DrillRun,
    /// The repository key of the record.
    pub record: String,
    /// The target used (for `random`, the one drawn).
    pub resolved_target: Option<String>,
    /// `passed`, `skipped (…)`, or why it failed; `None` when the step was not reached.
    pub amcheck: Option<String>,
    pub checks: Vec<CheckResult>,
    /// The scratch directory (removed unless `--keep`).
    pub scratch: PathBuf,
    pub kept: bool,
}

impl DrillReport {
    /// 0 when every step passed, else 1.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.run.ok)
    }
}

/// A failed step.
#[derive(Debug, Clone)]
struct StepFailure {
    step: &'static str,
    message: String,
}

fn fail(step: &'static str) -> impl Fn(String) -> StepFailure {
    move |message| StepFailure {
        step,
        message: one_line(&message),
    }
}

/// `s` on one line (whitespace runs collapsed), at most 400 characters.
fn one_line(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match joined.char_indices().nth(400) {
        Some((i, _)) => format!("{}…", &joined[..i]),
        None => joined,
    }
}

/// What the steps learned so far; read after an interruption too.
#[derive(Debug, Default)]
struct Progress {
    step: &'static str,
    backup_id: Option<String>,
    resolved_target: Option<String>,
    reached: Option<String>,
    restore_seconds: f64,
    recovery_seconds: f64,
    lease: Option<String>,
    amcheck: Option<String>,
    checks: Vec<CheckResult>,
    /// `pg_ctl`'s directory once the server was started.
    server_bin: Option<PathBuf>,
}

/// The scratch directory and the server on it.
struct Scratch {
    dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<Owner>,
}

impl Scratch {
    fn create(parent: Option<&Path>, run_as: Option<&Owner>) -> Result<Scratch, DrillError> {
        let parent = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let err = |source| DrillError::Scratch {
            dir: parent.clone(),
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix("pgpitr-drill-")
            .tempdir_in(&parent)
            .map_err(err)?
            .keep();
        let scratch = Scratch {
            pgdata: dir.join("data"),
            socket_dir: dir.join("socket"),
            dir,
            run_as: run_as.cloned(),
        };
        let made = (|| {
            std::fs::create_dir(&scratch.socket_dir)?;
            if let Some(o) = run_as {
                for d in [&scratch.dir, &scratch.socket_dir] {
                    std::os::unix::fs::chown(d, Some(o.uid), Some(o.gid))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&scratch.dir);
            return Err(err(e));
        }
        Ok(scratch)
    }

    /// Stops the server if one runs: fast, then immediate.
    fn stop_server(&self, bin: &Path) -> Result<(), String> {
        if !start::postmaster_alive(&self.pgdata) {
            return Ok(());
        }
        let fast = start::stop(bin, &self.pgdata, self.run_as.as_ref(), "fast", 60);
        if fast.is_ok() && !start::postmaster_alive(&self.pgdata) {
            return Ok(());
        }
        match start::stop(bin, &self.pgdata, self.run_as.as_ref(), "immediate", 60) {
            Ok(()) => Ok(()),
            Err(e) if !start::postmaster_alive(&self.pgdata) => {
                tracing::debug!("pg_ctl stop: {e}");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Stops a started server when dropped (a panic, or a future dropped on the way).
struct ServerGuard<'a> {
    scratch: &'a Scratch,
    progress: &'a Mutex<Progress>,
}

impl Drop for ServerGuard<'_> {
    fn drop(&mut self) {
        let bin = self.progress.lock().unwrap().server_bin.clone();
        if let Some(bin) = bin {
            if let Err(e) = self.scratch.stop_server(&bin) {
                tracing::error!(
                    "cannot stop the drill's server on {}: {e}",
                    self.scratch.pgdata.display()
                );
            }
        }
    }
}

/// Everything the steps read.
struct Ctx<'a> {
    config: &'a Config,
    args: &'a DrillArgs,
    bin_dir: &'a Path,
    storage: DynStorage,
    scratch: &'a Scratch,
    checks: Vec<Check>,
    owner: Option<Owner>,
    db_user: String,
}

/// `pgpitr drill`; `bin_dir` is where `pgpitr-restore` is installed.
///
/// # Errors
/// Bad arguments, an unusable repository configuration, no scratch directory (nothing
/// recorded), or a result that cannot be recorded. A failed step is not an error: it is in the
/// report (`run.ok` false) and in the repository.
pub async fn run(
    config: &Config,
    args: &DrillArgs,
    bin_dir: &Path,
) -> Result<DrillReport, DrillError> {
    let owner = if is_root() {
        let o =
            Owner::lookup(&args.owner).map_err(|_| DrillError::UnknownOwner(args.owner.clone()))?;
        if o.uid == 0 {
            return Err(DrillError::RootOwner(args.owner.clone()));
        }
        Some(o)
    } else {
        None
    };
    let checks = match &args.check_sql {
        Some(path) => {
            let bad = |message: String| DrillError::CheckSql {
                path: path.clone(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            parse_checks(&text).map_err(bad)?
        }
        None => Vec::new(),
    };
    let db_user = std::env::var("PGUSER")
        .ok()
        .or_else(|| owner.as_ref().map(|o| o.name.clone()))
        .or_else(|| Owner::current().ok().map(|o| o.name))
        .unwrap_or_else(|| "postgres".into());
    let storage = config.storage().await?;
    let scratch = Scratch::create(args.scratch.as_deref(), owner.as_ref())?;
    tracing::info!("drill in {}", scratch.dir.display());

    let started_at = Timestamp::now();
    let progress = Mutex::new(Progress::default());
    let ctx = Ctx {
        config,
        args,
        bin_dir,
        storage: storage.clone(),
        scratch: &scratch,
        checks,
        owner,
        db_user,
    };
    let outcome = {
        let _guard = ServerGuard {
            scratch: &scratch,
            progress: &progress,
        };
        tokio::select! {
            r = steps(&ctx, &progress) => r,
            signal = interrupted() => {
                let step = progress.lock().unwrap().step;
                Err(StepFailure {
                    step: "interrupted",
                    message: format!("interrupted by {signal} during the {step} step"),
                })
            }
        }
        // The guard stops the server here, before the result is recorded.
    };
    let p = std::mem::take(&mut *progress.lock().unwrap());
    let mut outcome = outcome;
    if let Some(bin) = &p.server_bin {
        if let Err(e) = scratch.stop_server(bin) {
            if outcome.is_ok() {
                outcome = Err(fail("stop")(e));
            }
        }
    }

    let finished_at = Timestamp::now();
    let (ok, failed_step, message) = match &outcome {
        Ok(msg) => (true, None, msg.clone()),
        Err(f) => (false, Some(f.step.to_string()), f.message.clone()),
    };
    let run = DrillRun {
        started_at,
        finished_at,
        ok,
        failed_step,
        message,
        backup_id: p.backup_id.clone(),
        target: args.target.to_string(),
        reached: p.reached.clone(),
        restore_seconds: p.restore_seconds,
        recovery_seconds: p.recovery_seconds,
        rto_seconds: p.restore_seconds + p.recovery_seconds,
        host: host_name(),
    };
    let recorded = runs::record(storage.as_ref(), &run).await;

    if let Some(lease) = &p.lease {
        if let Err(e) = storage.delete(lease).await {
            tracing::warn!("cannot remove the drill's lease {lease}: {e}; it lapses by itself");
        }
    }
    if !args.keep {
        if let Err(e) = std::fs::remove_dir_all(&scratch.dir) {
            tracing::warn!(
                "cannot remove the scratch directory {}: {e}",
                scratch.dir.display()
            );
        }
    }
    let record = recorded.map_err(|source| DrillError::Record { ok, source })?;
    Ok(DrillReport {
        run,
        record,
        resolved_target: p.resolved_target,
        amcheck: p.amcheck,
        checks: p.checks,
        scratch: scratch.dir.clone(),
        kept: args.keep,
    })
}

/// Resolves with the name of the first of SIGINT and SIGTERM to arrive.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => std::future::pending().await,
    }
}

fn set_step(p: &Mutex<Progress>, step: &'static str) {
    p.lock().unwrap().step = step;
    tracing::info!("drill: {step}");
}

/// The steps from choosing the target to the checks; returns the success message.
async fn steps(ctx: &Ctx<'_>, p: &Mutex<Progress>) -> Result<String, StepFailure> {
    set_step(p, "plan");
    let state = RepoState::load(ctx.storage.as_ref())
        .await
        .map_err(|e| fail("plan")(e.to_string()))?;
    let target = match ctx.args.target {
        DrillTarget::Random => random_target(&state).map_err(fail("plan"))?,
        t => t,
    };
    if ctx.args.target == DrillTarget::Random {
        tracing::info!("drill: random target {target}; repeat with --target {target}");
    }
    p.lock().unwrap().resolved_target = Some(target.to_string());

    set_step(p, "restore");
    let mut target_args = TargetArgs::default();
    match target {
        DrillTarget::Time(t) => target_args.target_time = Some(t),
        DrillTarget::Lsn(l) => target_args.target_lsn = Some(l),
        DrillTarget::Latest | DrillTarget::Random => {
            target_args.target = Some(TargetKeyword::Latest)
        }
    }
    if let (DrillTarget::Random, DrillTarget::Lsn(_)) = (ctx.args.target, target) {
        if let Some(tli) = newest_window(&state).map(|w| w.timeline) {
            target_args.target_timeline = TargetTimeline::Id(tli);
        }
    }
    let restore_args = RestoreArgs {
        from: None,
        target: target_args,
        pgdata: ctx.scratch.pgdata.clone(),
        target_action: TargetAction::Pause,
        tablespace_map: Vec::new(),
        archive_mode: ArchiveMode::Off,
        owner: ctx.owner.as_ref().map(|o| o.name.clone()),
        start: false,
        pg_bin: None,
        server_options: None,
        start_timeout: None,
        recovery_lease: KeepWithin::parse("1d").expect("a valid duration"),
    };
    let began = Instant::now();
    let report = super::restore::run(ctx.config, &restore_args, ctx.bin_dir)
        .await
        .map_err(|e| match e {
            RestoreCommandError::Plan(_) => fail("plan")(e.to_string()),
            e => fail("restore")(e.to_string()),
        })?;
    {
        let mut g = p.lock().unwrap();
        g.restore_seconds = began.elapsed().as_secs_f64();
        g.backup_id = Some(report.plan.backup.id.to_string());
        g.lease = report.lease.as_ref().map(|(k, _)| k.clone());
    }
    let manifest = state
        .manifest(&report.plan.backup.id)
        .ok_or_else(|| fail("restore")("the chosen backup's manifest vanished".into()))?;

    set_step(p, "start");
    let major = manifest.pg_version_num / 10_000;
    let bin = match &ctx.args.pg_bin {
        Some(d) => d.clone(),
        None => start::find_bin_dir(major)
            .ok_or_else(|| fail("start")(StartError::NoPgCtl { major }.to_string()))?,
    };
    let port = free_port().map_err(|e| fail("start")(format!("no free port: {e}")))?;
    let hba = ctx.scratch.dir.join("pg_hba.conf");
    prepare_server_files(ctx, &hba).map_err(fail("start"))?;
    let options = [
        format!("-p {port}"),
        "-c listen_addresses=''".into(),
        format!(
            "-c unix_socket_directories={}",
            shell_quote(&ctx.scratch.socket_dir.to_string_lossy())
        ),
        format!("-c hba_file={}", shell_quote(&hba.to_string_lossy())),
        "-c archive_mode=off".into(),
        "-c hot_standby=on".into(),
        "-c ssl=off".into(),
        "-c logging_collector=off".into(),
        "-c log_destination=stderr".into(),
        "-c lc_messages=C".into(),
        "-c external_pid_file=''".into(),
        "-c cluster_name=pgpitr-drill".into(),
    ]
    .join(" ");
    let log_file = ctx.scratch.dir.join(LOG_FILE);
    let opts = StartOptions {
        pgdata: ctx.scratch.pgdata.clone(),
        bin_dir: bin.clone(),
        server_options: Some(options),
        log_file: log_file.clone(),
        action: TargetAction::Pause,
        db_user: ctx.db_user.clone(),
        pg_version_num: manifest.pg_version_num,
        timeout: ctx.args.recovery_timeout.map(Duration::from_secs),
        run_as: ctx.owner.clone(),
    };
    p.lock().unwrap().server_bin = Some(bin.clone());
    let began = Instant::now();
    let outcome = start::start_and_wait(&opts).await;
    p.lock().unwrap().recovery_seconds = began.elapsed().as_secs_f64();
    let outcome = outcome.map_err(|e| match e {
        StartError::Exited { .. } | StartError::Timeout { .. } => fail("recovery")(e.to_string()),
        e => fail("start")(e.to_string()),
    })?;

    set_step(p, "target");
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    let seg_size = state.identity.wal_segment_size;
    let newest = archived_wal_ranges(&state.wal, seg_size)
        .into_iter()
        .find(|t| t.timeline == report.plan.target_timeline)
        .map(|t| t.last);
    let reached = prove_target(
        target,
        &outcome,
        &log,
        newest.map(|s| (s, s.start_lsn(seg_size))),
    )
    .map_err(fail("target"))?;
    p.lock().unwrap().reached = Some(reached.clone());

    let conn = Conn {
        socket_dir: ctx.scratch.socket_dir.clone(),
        port,
        user: ctx.db_user.clone(),
    };
    if matches!(outcome, StartOutcome::Paused { .. }) {
        set_step(p, "promote");
        promote(&conn).await.map_err(fail("promote"))?;
    }

    set_step(p, "amcheck");
    let amcheck = if ctx.args.no_amcheck {
        "skipped (--no-amcheck)".to_string()
    } else {
        match find_tool(&bin, "pg_amcheck") {
            None => "skipped (pg_amcheck is not installed)".to_string(),
            Some(tool) => {
                let r = amcheck(&tool, &conn).await;
                p.lock().unwrap().amcheck = Some(match &r {
                    Ok(()) => "passed".into(),
                    Err(e) => format!("failed: {e}"),
                });
                r.map_err(fail("amcheck"))?;
                "passed".to_string()
            }
        }
    };
    p.lock().unwrap().amcheck = Some(amcheck.clone());

    set_step(p, "check-sql");
    let results = run_checks(&conn, &ctx.checks).await;
    let failed: Vec<&CheckResult> = results.iter().filter(|r| !r.ok).collect();
    let summary = if failed.is_empty() {
        Ok(format!("{} checks passed", results.len()))
    } else {
        Err(format!(
            "{} of {} checks failed: {}",
            failed.len(),
            results.len(),
            failed
                .iter()
                .map(|r| format!("line {} ({}) {}", r.line, one_line(&r.sql), r.result))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    };
    p.lock().unwrap().checks = results;
    let checks = summary.map_err(fail("check-sql"))?;
    Ok(format!(
        "target {target} reached ({reached}); pg_amcheck {amcheck}; {checks}"
    ))
}

/// The recoverable window of the newest timeline that has one.
fn newest_window(state: &RepoState) -> Option<crate::recovery::RecoverableWindow> {
    let summaries: Vec<BackupSummary> = state.manifests.iter().map(BackupSummary::from).collect();
    recoverable_windows(
        &summaries,
        &state.wal,
        &state.histories,
        state.identity.wal_segment_size,
    )
    .into_iter()
    .filter(|w| w.earliest.is_some() && w.latest.is_some())
    .max_by_key(|w| w.timeline)
}

/// A uniformly random LSN after the start of the newest timeline's continuous window (the end
/// of the oldest backup from which WAL is archived without a gap up to the newest segment) and
/// before the start of the newest archived segment of that window: every such LSN is followed
/// by a replayed record, so recovery can stop there. (The window's end is known as an LSN only:
/// the repository keeps no commit times.)
fn random_target(state: &RepoState) -> Result<DrillTarget, String> {
    let w = newest_window(state).ok_or("the repository has no restorable backup")?;
    // The continuous window only: under a WAL window (`keep_wal_within`) older backups are
    // isolated points, and a target between them is unreachable.
    let earliest = w.continuous_from().expect("filtered");
    let latest = w.latest.as_ref().expect("filtered");
    let lo = earliest.lsn.0 + 1;
    let hi = latest
        .last_segment
        .start_lsn(state.identity.wal_segment_size)
        .0;
    if hi <= lo {
        return Err(format!(
            "the recoverable window of timeline {} ends in the segment where its oldest backup ends: too short for a random target; use --target latest",
            w.timeline
        ));
    }
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Ok(DrillTarget::Lsn(Lsn(lo + r % (hi - lo))))
}

/// Checks that recovery stopped at `target` (see the module documentation); returns where it
/// stopped. `newest` is the newest archived segment of the target timeline and its start.
fn prove_target(
    target: DrillTarget,
    outcome: &StartOutcome,
    log: &str,
    newest: Option<(crate::pg::WalSegmentName, Lsn)>,
) -> Result<String, String> {
    let describe = |lsn: &str, xact: &Option<String>| match xact {
        Some(t) => format!("lsn {lsn}, last commit {t}"),
        None => format!("lsn {lsn}, no commit replayed"),
    };
    let parse_lsn = |s: &str| {
        s.parse::<Lsn>()
            .map_err(|_| format!("the server reported replay location '{s}'"))
    };
    match (target, outcome) {
        (_, StartOutcome::TargetNotReached { log_line }) => Err(format!(
            "recovery ended before the target {target}: the archive does not reach it (server log: {log_line})"
        )),
        (DrillTarget::Latest | DrillTarget::Random, StartOutcome::Promoted { replay_lsn, last_xact, .. }) => {
            let reached = parse_lsn(replay_lsn)?;
            if let Some((seg, start)) = newest {
                if reached < start {
                    return Err(format!(
                        "recovery ended at {reached}, before the newest archived segment {seg} (from {start}): WAL between them is missing from the archive"
                    ));
                }
            }
            Ok(describe(replay_lsn, last_xact))
        }
        (DrillTarget::Time(t), StartOutcome::Paused { replay_lsn, last_xact }) => {
            stopping_line(log)?;
            if let Some(x) = last_xact {
                let at = crate::recovery::target::parse_target_time(x)
                    .map_err(|_| format!("the server reported the last commit time '{x}'"))?;
                if at > t {
                    return Err(format!(
                        "the last replayed commit ({x}) is after the target {target}"
                    ));
                }
            }
            Ok(describe(replay_lsn, last_xact))
        }
        (DrillTarget::Lsn(l), StartOutcome::Paused { replay_lsn, last_xact }) => {
            stopping_line(log)?;
            let reached = parse_lsn(replay_lsn)?;
            if reached < l {
                return Err(format!("replay stopped at {reached}, before the target {l}"));
            }
            Ok(describe(replay_lsn, last_xact))
        }
        (_, StartOutcome::Paused { replay_lsn, .. }) => Err(format!(
            "recovery paused at {replay_lsn} without a target"
        )),
        (_, StartOutcome::Promoted { replay_lsn, .. }) => Err(format!(
            "recovery ended and the server promoted at {replay_lsn} instead of pausing at the target {target}"
        )),
        (_, StartOutcome::ShutDown { .. }) => {
            Err("the server shut down instead of pausing at the target".into())
        }
    }
}

/// The server log's "recovery stopping …" line, which PostgreSQL writes when it stops at a
/// recovery target (`recoveryStopsBefore` / `recoveryStopsAfter`, xlogrecovery.c).
fn stopping_line(log: &str) -> Result<&str, String> {
    log.lines()
        .find(|l| l.contains("recovery stopping "))
        .ok_or_else(|| {
            "recovery paused, but the server log does not say that it stopped at the target (no \"recovery stopping\" line)".to_string()
        })
}

/// Gives the scratch files to the owner: a `postgresql.conf` when the backup has none (Debian
/// keeps it in /etc; the server then runs on defaults plus the restore's settings) and the
/// drill's `pg_hba.conf`.
fn prepare_server_files(ctx: &Ctx<'_>, hba: &Path) -> Result<(), String> {
    let write = |path: &Path, text: &str| -> Result<(), String> {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(o) = &ctx.owner {
            std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    };
    let conf = ctx.scratch.pgdata.join("postgresql.conf");
    if !conf.exists() {
        write(
            &conf,
            "# written by `pgpitr drill`: the backup has no postgresql.conf\n",
        )?;
    }
    write(
        hba,
        "# written by `pgpitr drill`: the socket directory is reachable only by its owner (and root)\nlocal all all trust\n",
    )
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `tool` beside the server binaries, else on the PATH.
fn find_tool(bin: &Path, tool: &str) -> Option<PathBuf> {
    let beside = bin.join(tool);
    if beside.is_file() {
        return Some(beside);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// Where the drill's server listens.
struct Conn {
    socket_dir: PathBuf,
    port: u16,
    user: String,
}

impl Conn {
    async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client, String> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .dbname(dbname)
            .application_name("pgpitr drill")
            .connect_timeout(Duration::from_secs(10));
        let (client, conn) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to database {dbname}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// Ends the pause at the target and waits until the server is open for writes.
async fn promote(conn: &Conn) -> Result<(), String> {
    let c = conn.connect("postgres").await?;
    c.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .map_err(|e| format!("pg_wal_replay_resume(): {e}"))?;
    let began = Instant::now();
    loop {
        let row = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| format!("pg_is_in_recovery(): {e}"))?;
        if !row.get::<_, bool>(0) {
            return Ok(());
        }
        if began.elapsed() > Duration::from_secs(600) {
            return Err(
                "the server did not leave recovery within 600 s of pg_wal_replay_resume()".into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `pg_amcheck --install-missing --all` on the drill's server.
async fn amcheck(tool: &Path, conn: &Conn) -> Result<(), String> {
    let out = tokio::process::Command::new(tool)
        .arg("-h")
        .arg(&conn.socket_dir)
        .args(["-p", &conn.port.to_string(), "-U", &conn.user])
        .args(["--install-missing", "--all", "--no-password"])
        .env("LC_ALL", "C")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", tool.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(format!("pg_amcheck {}: {first}", out.status))
}

/// Runs every check, each on its own connection to its database.
async fn run_checks(conn: &Conn, checks: &[Check]) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for c in checks {
        let result = match conn.connect(&c.database).await {
            Err(e) => Err(e),
            Ok(client) => one_boolean(&client, &c.sql).await,
        };
        let (ok, result) = match result {
            Ok(v) => (v == "t", if v == "t" { v } else { format!("returned {v}") }),
            Err(e) => (false, one_line(&e)),
        };
        if !ok {
            tracing::warn!("check at line {} failed: {result}", c.line);
        }
        out.push(CheckResult {
            line: c.line,
            database: c.database.clone(),
            sql: c.sql.clone(),
            ok,
            result,
        });
    }
    out
}

/// The single value of `sql`'s single row (`t` or `f` for a boolean); anything else is an
/// error.
async fn one_boolean(client: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("error: {}", db.message()),
            None => format!("error: {e}"),
        })?;
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    match rows.as_slice() {
        [row] if row.len() == 1 => Ok(row.get(0).unwrap_or("null").to_string()),
        [row] => Err(format!("returned {} columns, not one boolean", row.len())),
        _ => Err(format!("returned {} rows, not one", rows.len())),
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The report for people.
pub fn render(r: &DrillReport) -> String {
    let run = &r.run;
    let mut out = String::new();
    if run.ok {
        out.push_str(&format!("drill passed: {}\n", run.message));
    } else {
        out.push_str(&format!(
            "drill FAILED at step {}: {}\n",
            run.failed_step.as_deref().unwrap_or("?"),
            run.message
        ));
    }
    out.push_str(&format!(
        "target: {}{}\n",
        run.target,
        match &r.resolved_target {
            Some(t) if *t != run.target => format!(" (drawn: {t}; repeat with --target {t})"),
            _ => String::new(),
        }
    ));
    if let Some(b) = &run.backup_id {
        out.push_str(&format!("backup: {b}\n"));
    }
    if let Some(reached) = &run.reached {
        out.push_str(&format!("reached: {reached}\n"));
    }
    out.push_str(&format!(
        "recovery time: {:.1} s (restore {:.1} s + recovery {:.1} s)\n",
        run.rto_seconds, run.restore_seconds, run.recovery_seconds
    ));
    if let Some(a) = &r.amcheck {
        out.push_str(&format!("pg_amcheck: {a}\n"));
    }
    for c in &r.checks {
        out.push_str(&format!(
            "check line {} [{}]: {} — {}\n",
            c.line,
            c.database,
            if c.ok { "ok" } else { "FAILED" },
            if c.ok {
                one_line(&c.sql)
            } else {
                format!("{} {}", one_line(&c.sql), c.result)
            }
        ));
    }
    out.push_str(&format!("recorded: {}\n", r.record));
    if r.kept {
        out.push_str(&format!(
            "scratch directory kept (server stopped): {}\n",
            r.scratch.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_files_split_on_semicolons_at_line_ends_with_database_switches() {
        let text = "-- orders are there\nSELECT count(*) >= 1000\n  FROM orders;\n\n\\c shop\nSELECT true;\nSELECT 'a;b' = 'a;b'\n";
        let checks = parse_checks(text).unwrap();
        assert_eq!(
            checks,
            vec![
                Check {
                    line: 2,
                    database: "postgres".into(),
                    sql: "SELECT count(*) >= 1000\n  FROM orders".into()
                },
                Check {
                    line: 6,
                    database: "shop".into(),
                    sql: "SELECT true".into()
                },
                Check {
                    line: 7,
                    database: "shop".into(),
                    sql: "SELECT 'a;b' = 'a;b'".into()
                },
            ]
        );
        assert!(parse_checks("-- nothing\n\n").is_err());
        assert!(parse_checks("SELECT\n\\c other\ntrue;").is_err());
        assert!(parse_checks("\\c\nSELECT true;").is_err());
        assert!(parse_checks("\\copy x\nSELECT true;").is_err());
    }

    #[test]
    fn targets_parse_as_keywords_lsns_or_times() {
        assert_eq!(parse_drill_target("latest"), Ok(DrillTarget::Latest));
        assert_eq!(parse_drill_target("random"), Ok(DrillTarget::Random));
        assert_eq!(
            parse_drill_target("0/16B3748"),
            Ok(DrillTarget::Lsn(Lsn(0x16B3748)))
        );
        let t = parse_drill_target("2026-11-23 09:14:59.5+00").unwrap();
        assert_eq!(
            t,
            DrillTarget::Time("2026-11-23T09:14:59.5Z".parse().unwrap())
        );
        assert!(parse_drill_target("yesterday").is_err());
    }

    fn paused(lsn: &str, xact: Option<&str>) -> StartOutcome {
        StartOutcome::Paused {
            replay_lsn: lsn.into(),
            last_xact: xact.map(str::to_string),
        }
    }

    #[test]
    fn a_target_counts_as_reached_only_with_proof() {
        let t: Timestamp = "2026-11-23T09:00:00Z".parse().unwrap();
        let stop_log = "LOG:  recovery stopping before commit of transaction 740, time 2026-11-23 09:00:01+00\nLOG:  pausing at the end of recovery\n";
        let time = DrillTarget::Time(t);
        assert!(prove_target(
            time,
            &paused("0/3000100", Some("2026-11-23 08:59:59.9+00")),
            stop_log,
            None
        )
        .is_ok());
        // Paused without the log line (e.g. for insufficient hot standby parameters).
        let e = prove_target(
            time,
            &paused("0/3000100", None),
            "LOG: recovery has paused\n",
            None,
        )
        .unwrap_err();
        assert!(e.contains("recovery stopping"), "{e}");
        // A commit later than the target replayed.
        assert!(prove_target(
            time,
            &paused("0/3000100", Some("2026-11-23 09:00:02+00")),
            stop_log,
            None
        )
        .is_err());
        // The archive ended first.
        assert!(prove_target(
            time,
            &StartOutcome::TargetNotReached {
                log_line: "FATAL: recovery ended before configured recovery target was reached"
                    .into()
            },
            "",
            None
        )
        .is_err());
        // LSN targets: at or after the LSN.
        let lsn = DrillTarget::Lsn("0/3000100".parse().unwrap());
        assert!(prove_target(lsn, &paused("0/3000128", None), stop_log, None).is_ok());
        assert!(prove_target(lsn, &paused("0/3000000", None), stop_log, None).is_err());
        // Latest: replay must reach the newest archived segment.
        let seg: crate::pg::WalSegmentName = "000000010000000000000005".parse().unwrap();
        let promoted = |lsn: &str| StartOutcome::Promoted {
            replay_lsn: lsn.into(),
            last_xact: None,
            timeline: "2".into(),
        };
        let newest = Some((seg, Lsn(0x5000000)));
        assert!(prove_target(DrillTarget::Latest, &promoted("0/5000100"), "", newest).is_ok());
        let e = prove_target(DrillTarget::Latest, &promoted("0/3FFFFE0"), "", newest).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        // A time target that promoted instead of pausing proves nothing.
        assert!(prove_target(time, &promoted("0/5000100"), stop_log, None).is_err());
    }
}
