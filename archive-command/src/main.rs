//! `pgpitr-archive`: PostgreSQL's `archive_command`. Argument parsing and exit codes only; the
//! work is `pgpitr::commands::archive_push`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgpitr::commands::archive_push::{self, ArchiveError};
use pgpitr::config::Config;

/// Archive one WAL file into the pgpitr repository.
///
/// In postgresql.conf:
///
///     archive_mode = on
///     archive_command = 'pgpitr-archive %p %f'
///
/// The repository comes from /etc/pgpitr/pgpitr.toml (or --config FILE, or PGPITR_CONFIG), and
/// every key can be set as PGPITR_<KEY>, e.g. PGPITR_REPO=/var/lib/pgpitr/repo.
///
/// Exit codes: 0 archived (or already archived with the same content); 1 failed, PostgreSQL
/// retries (storage unreachable, a different file already archived under this name, a repository
/// of another cluster); 2 bad arguments or configuration.
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Configuration file (default: $PGPITR_CONFIG, then /etc/pgpitr/pgpitr.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// %p: path of the WAL file, relative to the data directory.
    wal_path: PathBuf,
    /// %f: the WAL file's name.
    wal_name: String,
}

fn main() -> ExitCode {
    pgpitr::heap::return_large_buffers();
    let cli = Cli::parse();
    pgpitr::logging::init("warn");
    let result = pgpitr::logging::runtime().block_on(async {
        let config = Config::load(cli.config.as_deref()).map_err(ArchiveError::from)?;
        archive_push::run(&config, &cli.wal_path, &cli.wal_name).await
    });
    match result {
        Ok(report) => {
            tracing::info!(name = %report.name, outcome = ?report.outcome, ahead = report.pushed_ahead.len(), "archived");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgpitr-archive: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
