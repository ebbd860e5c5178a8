//! `pgpitr-restore`: PostgreSQL's `restore_command`. Argument parsing and exit codes only; the
//! work is `pgpitr::commands::archive_get`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgpitr::commands::archive_get::{self, exit, FetchError};
use pgpitr::config::Config;

/// Restore one WAL file from the pgpitr repository.
///
/// In postgresql.conf (pgpitr restore writes this for you):
///
///     restore_command = 'pgpitr-restore %f %p'
///
/// Exit codes: 0 restored; 1 not in the archive (PostgreSQL asks for files that may not exist);
/// 200 bad arguments or configuration; 201 storage unreachable after retries; 202 the stored file
/// is corrupt or ambiguous or the repository is another cluster's. Codes above 125 make
/// PostgreSQL stop recovery instead of treating the file as missing and promoting early.
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Configuration file (default: $PGPITR_CONFIG, then /etc/pgpitr/pgpitr.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Read location NAME first: `main` (the repository) or a copy's name (`[[copy]]`). The
    /// next location is read only when this one is unreachable, never when it answers that
    /// it does not hold the file.
    #[arg(long, value_name = "NAME")]
    from: Option<String>,
    /// %f: the name of the WAL file PostgreSQL wants.
    wal_name: String,
    /// %p: where to write it, relative to the data directory.
    dest: PathBuf,
    /// Internal: fetch the segments after %f into the spool of %p, then exit (the background
    /// refill a call starts when the spool runs low).
    #[arg(long, hide = true)]
    refill: bool,
}

fn main() -> ExitCode {
    pgpitr::heap::return_large_buffers();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE as u8);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    pgpitr::logging::init("warn");
    if cli.refill {
        yield_cpu_to_recovery();
        let result = pgpitr::logging::runtime().block_on(async {
            let config = Config::load(cli.config.as_deref()).map_err(FetchError::from)?;
            let from = cli.from.as_deref().unwrap_or(pgpitr::config::MAIN_LOCATION);
            let config = config.location(from).map_err(FetchError::from)?;
            archive_get::refill(&config, &cli.wal_name, &cli.dest).await
        });
        if let Err(e) = result {
            tracing::debug!("refill after {} failed: {e}", cli.wal_name);
        }
        return ExitCode::SUCCESS;
    }
    let result = pgpitr::logging::runtime().block_on(fetch(&cli));
    match result {
        Ok((restored, location)) => {
            tracing::info!(name = %cli.wal_name, source = ?restored.source, "restored");
            if let Some(after) = restored.refill_after {
                spawn_refill(&cli, &after.to_string(), location.as_deref());
            }
            ExitCode::SUCCESS
        }
        Err(FetchError::NotFound(_)) => ExitCode::from(exit::NOT_FOUND as u8),
        Err(e) => {
            eprintln!("pgpitr-restore: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Fetches `%f` from the first location (`--from`, else the repository) that is reachable,
/// in the order of `pgpitr::copy::read::order`; also returns the name of the one that
/// answered when it is not the default, for the refill.
async fn fetch(cli: &Cli) -> Result<(archive_get::Restored, Option<String>), FetchError> {
    let config = Config::load(cli.config.as_deref()).map_err(FetchError::from)?;
    let names = pgpitr::copy::read::order(&config, cli.from.as_deref())?;
    let last = names.len() - 1;
    for (i, name) in names.iter().enumerate() {
        let location = config.location(name)?;
        match archive_get::run(&location, &cli.wal_name, &cli.dest).await {
            Err(e) if i < last && e.is_unreachable() => {
                tracing::warn!("location {name} is unreachable, reading the next one: {e}");
            }
            Ok(restored) => {
                return Ok((
                    restored,
                    (i > 0 || cli.from.is_some()).then(|| name.clone()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("at least the main location")
}

/// Niceness of the background refill: its downloads and decompression use the CPU that the
/// startup process does not, instead of taking turns with it (on a small machine replay is
/// the critical path, and a segment the refill has not fetched yet is fetched by the call).
const REFILL_NICE: i32 = 10;

/// Lowers the priority of this process (before any thread starts: threads inherit it).
fn yield_cpu_to_recovery() {
    // SAFETY: setpriority only reads its arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, REFILL_NICE) } != 0 {
        tracing::debug!(
            "could not lower the refill's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Starts `pgpitr-restore --refill` in the background, detached: its own process group, no
/// stdio (PostgreSQL's log is not its log), not waited for. A failure to start only means the
/// next calls fetch from the repository themselves.
fn spawn_refill(cli: &Cli, after: &str, location: Option<&str>) {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = Command::new(exe);
    if let Some(config) = &cli.config {
        cmd.arg("--config").arg(config);
    }
    if let Some(from) = location {
        cmd.arg("--from").arg(from);
    }
    cmd.arg("--refill")
        .arg(after)
        .arg(&cli.dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    if let Err(e) = cmd.spawn() {
        tracing::debug!("could not start the background refill: {e}");
    }
}
