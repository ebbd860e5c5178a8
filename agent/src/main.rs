//! `pgpitr`: the agent. Parses arguments, runs one command from `pgpitr::commands`, maps the
//! result to an exit code: 0 success, 1 failure, 2 bad arguments or configuration (clap's own
//! usage errors also exit 2), 3 a restore whose recovery ended before its target;
//! `drill` exits 1 when a step failed (named on stderr and in the record), `copy` when a copy
//! is incomplete (its errors in the report). `status` follows
//! the Nagios plugin convention instead: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgpitr::commands;
use pgpitr::config::Config;

/// PostgreSQL physical backup and WAL archiving for point-in-time recovery.
///
/// WAL reaches the repository through `archive_command = 'pgpitr-archive %p %f'`; base backups
/// through `pgpitr backup` (weekly, from a timer); `pgpitr restore --target-time '…' --pgdata DIR`
/// builds a new data directory that recovers to that moment. Start with `pgpitr init`.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Configuration file (default: $PGPITR_CONFIG, then /etc/pgpitr/pgpitr.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a commented starter configuration and print the postgresql.conf lines;
    /// `--encrypt` also creates the key of a new encrypted repository.
    Init(commands::init::InitArgs),
    /// The key slots of an encrypted repository: create, list, add and remove passphrases
    /// (rotation rewrites one slot, never the data).
    Key(commands::key::KeyArgs),
    /// Take a base backup over the replication protocol into the repository.
    Backup(commands::backup::BackupArgs),
    /// List backups, the archived WAL per timeline and the recoverable window.
    List(commands::list::ListArgs),
    /// Show which backup and which archived WAL reach a recovery target (writes nothing).
    Plan(commands::plan::PlanArgs),
    /// Write a new data directory that recovers to a target time, LSN, xid or restore point.
    Restore(commands::restore::RestoreArgs),
    /// Check the configuration, storage, connection, server settings and that WAL arrives.
    Check(commands::check::CheckArgs),
    /// Delete backups, WAL and packs that the retention policy no longer keeps, and killed
    /// writers' staging objects older than --staging-grace.
    Expire(commands::expire::ExpireArgs),
    /// Bring the backups and WAL each copy's retention keeps to the copies (`[[copy]]`):
    /// only what a copy lacks, each object verified on arrival; resumable after a kill.
    Copy(commands::copy::CopyArgs),
    /// Re-read every object: chunk and WAL checksums, pack indexes, WAL continuity; warn about
    /// killed writers' staging objects (which do not fail it).
    Verify(commands::verify::VerifyArgs),
    /// Restore drill: restore a backup into a scratch directory, start PostgreSQL on it, prove
    /// the target was reached, run pg_amcheck and --check-sql, record the result and the
    /// recovery time in the repository, clean up. Exit 0 only when every step passed.
    Drill(commands::drill::DrillArgs),
    /// Health at a glance: newest backup and WAL and their ages, the recoverable window, the
    /// last verify and drill; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (configuration).
    Status(commands::status::StatusArgs),
    /// The same facts as Prometheus metrics: printed, written for node_exporter
    /// (--textfile PATH) or served at /metrics (--listen ADDR).
    Metrics(commands::metrics::MetricsArgs),
    /// Break the repository lock left by a backup or expire that died; `--leases` removes the
    /// leases of restores.
    Unlock(commands::unlock::UnlockArgs),
}

/// Exit codes of `pgpitr`.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    /// `status`: Nagios' UNKNOWN, for a configuration error.
    pub const UNKNOWN: u8 = 3;
}

fn main() -> ExitCode {
    pgpitr::heap::return_large_buffers();
    let cli = Cli::parse();
    pgpitr::logging::init("info");
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgpitr: error: {e:#}");
            let usage = e
                .downcast_ref::<pgpitr::config::ConfigError>()
                .is_some_and(|e| e.storage_error().is_none())
                || e.downcast_ref::<commands::expire::ExpireError>()
                    .is_some_and(|e| {
                        matches!(
                            e,
                            commands::expire::ExpireError::Policy(_)
                                | commands::expire::ExpireError::Config(_)
                        )
                    })
                || e.downcast_ref::<commands::metrics::MetricsError>()
                    .is_some_and(|e| matches!(e, commands::metrics::MetricsError::Config(_)))
                || e.downcast_ref::<commands::restore::RestoreCommandError>()
                    .is_some_and(|e| e.is_usage())
                || e.downcast_ref::<commands::drill::DrillError>()
                    .is_some_and(|e| e.is_usage())
                || e.downcast_ref::<commands::key::KeyCommandError>()
                    .is_some_and(|e| e.is_usage())
                || e.downcast_ref::<commands::copy::CopyError>()
                    .is_some_and(|e| e.is_usage());
            ExitCode::from(if usage { exit::USAGE } else { exit::FAILURE })
        }
    }
}

/// The directory of this executable, where `pgpitr-archive` and `pgpitr-restore` are installed.
fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

/// Loads the configuration and a multi-threaded runtime for commands that need storage.
fn load(config_path: Option<&Path>) -> anyhow::Result<(Config, tokio::runtime::Runtime)> {
    let config = Config::load(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok((config, rt))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = cli.config.as_deref();
    match cli.command {
        Command::Init(args) => {
            print!("{}", commands::init::run(config_path, &args, &bin_dir())?);
            if args.encrypt {
                let written = commands::init::config_path(config_path, &args);
                let (config, rt) = load(Some(&written))?;
                let key = commands::key::KeyArgs {
                    command: commands::key::KeyCommand::Create,
                };
                print!("{}", rt.block_on(commands::key::run(&config, &key))?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Key(args) => {
            let (config, rt) = load(config_path)?;
            print!("{}", rt.block_on(commands::key::run(&config, &args))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(args) => {
            let (config, rt) = load(config_path)?;
            // On a worker thread, beside the I/O driver: the backup stream then needs no thread
            // hop per socket read.
            let backup = rt.spawn(async move { commands::backup::run(&config, &args).await });
            let manifest = rt.block_on(backup).expect("backup task")?;
            println!("{}", manifest.id);
            Ok(ExitCode::SUCCESS)
        }
        Command::List(args) => {
            let (config, rt) = load(config_path)?;
            let listing = rt.block_on(commands::list::run(&config))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", commands::list::render(&listing));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => {
            let (config, rt) = load(config_path)?;
            let (_, config) = rt.block_on(pgpitr::copy::read::first_reachable(
                &config,
                args.from.as_deref(),
            ))?;
            let plan = rt.block_on(commands::plan::run(&config, &args))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", commands::plan::render(&plan));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore(args) => {
            let (config, rt) = load(config_path)?;
            let (from, config) = rt.block_on(pgpitr::copy::read::first_reachable(
                &config,
                args.from.as_deref(),
            ))?;
            if from != pgpitr::config::MAIN_LOCATION {
                eprintln!("pgpitr: restoring from copy {from}");
            }
            let report = rt.block_on(commands::restore::run(&config, &args, &bin_dir()))?;
            print!("{}", commands::restore::render(&report));
            Ok(ExitCode::from(report.exit_code()))
        }
        Command::Check(args) => {
            let (config, rt) = load(config_path)?;
            let checks = rt.block_on(commands::check::run(&config, &args));
            if args.json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", commands::check::render(&checks));
            }
            let failed = checks.iter().any(|c| !c.ok);
            Ok(if failed {
                ExitCode::from(exit::FAILURE)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Copy(args) => {
            let (config, rt) = load(config_path)?;
            let reports = rt.block_on(commands::copy::run(&config, &args))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", commands::copy::render(&reports));
            }
            Ok(if reports.iter().all(commands::copy::CopyReport::ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::FAILURE)
            })
        }
        Command::Expire(args) => {
            let (config, rt) = load(config_path)?;
            let config = match &args.copy {
                Some(name) => config.location(name)?,
                None => config,
            };
            let report = rt.block_on(commands::expire::run(&config, &args))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", commands::expire::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let (config, rt) = load(config_path)?;
            let config = match &args.copy {
                Some(name) => config.location(name)?,
                None => config,
            };
            let report = rt.block_on(commands::verify::run(&config, &args))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", commands::verify::render(&report));
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::FAILURE)
            })
        }
        Command::Drill(args) => {
            let (config, rt) = load(config_path)?;
            let report = rt.block_on(commands::drill::run(&config, &args, &bin_dir()))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", commands::drill::render(&report));
            }
            if let (false, Some(step)) = (report.run.ok, &report.run.failed_step) {
                eprintln!(
                    "pgpitr: error: drill failed at step {step}: {}",
                    report.run.message
                );
            }
            Ok(ExitCode::from(report.exit_code()))
        }
        Command::Status(args) => {
            let report = match load(config_path) {
                Ok((config, rt)) => rt.block_on(commands::status::run(&config)),
                Err(e) => {
                    eprintln!("pgpitr: error: {e:#}");
                    return Ok(ExitCode::from(exit::UNKNOWN));
                }
            };
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("pgpitr: error: {e}");
                    return Ok(ExitCode::from(exit::UNKNOWN));
                }
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", commands::status::render(&report));
            }
            Ok(ExitCode::from(report.exit_code))
        }
        Command::Metrics(args) => {
            let (config, rt) = load(config_path)?;
            let mut stdout = std::io::stdout();
            let outcome = rt.block_on(commands::metrics::run(&config, &args, &mut stdout))?;
            Ok(match outcome {
                commands::metrics::Outcome::Down => ExitCode::from(exit::FAILURE),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Unlock(args) => {
            let (config, rt) = load(config_path)?;
            let broken = rt.block_on(commands::unlock::run(&config, &args))?;
            if broken.is_empty() && !args.leases {
                println!("no lock to break");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
