//! `pgpitr metrics`: the facts of [`crate::monitor`] as Prometheus metrics: printed, written to
//! a file for node_exporter's textfile collector (`--textfile`, atomically: a temporary file in
//! the same directory, then a rename), or served at `/metrics` (`--listen`, each scan cached
//! for `--cache` seconds, default `metrics_cache`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::monitor::serve;

#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = "\
Without an option, prints the metrics once (OpenMetrics text, which Prometheus reads).

With node_exporter (run from a timer every minute or so):
  pgpitr metrics --textfile /var/lib/node_exporter/textfile/pgpitr.prom
Or as an exporter, for Prometheus to scrape (a scan answers scrapes for --cache seconds):
  pgpitr metrics --listen 127.0.0.1:9187

One listing of the repository gives every fact (backups, newest WAL per timeline, recoverable
window, size, bytes written in the last 7 days, last verify and drill). When the repository
cannot be read, the only series is pgpitr_repository_up 0, and (without --listen) the exit
code is 1. docs/operations.md lists every metric.")]
pub struct MetricsArgs {
    /// Write the metrics to this file atomically instead of printing them (for node_exporter's
    /// textfile collector: name it `*.prom` in its directory).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub textfile: Option<PathBuf>,
    /// Serve the metrics at http://ADDR/metrics until interrupted (Ctrl-C); port 0 picks a free
    /// port. The address served is printed on the first line.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// With --listen: seconds one scan answers scrapes (default: `metrics_cache`, 60s).
    #[arg(long, value_name = "SECONDS", requires = "listen")]
    pub cache: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot write the metrics file {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
}

/// What `metrics` did, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The repository was scanned.
    Up,
    /// The scan failed: `pgpitr_repository_up 0` was exported.
    Down,
    /// The server ended (Ctrl-C).
    Served,
}

/// Runs `metrics` with `args`; `out` receives the printed metrics or the address served.
///
/// # Errors
/// Configuration errors, a metrics file that cannot be written, an address that cannot be bound.
pub async fn run(
    config: &Config,
    args: &MetricsArgs,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, MetricsError> {
    let storage = match config.storage().await {
        Ok(storage) => storage,
        // The repository's key could not be read because the repository could not: as down
        // as a failed scan, and said so in the file node_exporter reads rather than leaving the
        // last one there (an exporter, with --listen, fails to start instead).
        Err(e) if e.storage_error().is_some() && args.listen.is_none() => {
            tracing::warn!("the repository could not be opened: {e}");
            let location = config.raw_storage().await?.location();
            let text = crate::monitor::metrics::encode(&location, Err(()));
            emit(args, &text, out)?;
            return Ok(Outcome::Down);
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(addr) = args.listen {
        let cache = match args.cache {
            Some(s) => Duration::from_secs(s),
            None => config.metrics_cache()?,
        };
        let listener =
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| MetricsError::Listen {
                    addr,
                    message: e.to_string(),
                })?;
        let bound = listener.local_addr().map_err(|e| MetricsError::Listen {
            addr,
            message: e.to_string(),
        })?;
        let _ = writeln!(out, "serving http://{bound}/metrics");
        let _ = out.flush();
        let cache = Arc::new(serve::Cache::new(storage, cache));
        let interrupted = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve::serve(listener, cache, interrupted)
            .await
            .map_err(|e| MetricsError::Listen {
                addr,
                message: e.to_string(),
            })?;
        return Ok(Outcome::Served);
    }
    let (text, up) = serve::exposition(&storage).await;
    emit(args, &text, out)?;
    Ok(if up { Outcome::Up } else { Outcome::Down })
}

/// Prints `text`, or writes it to `--textfile`.
fn emit(args: &MetricsArgs, text: &str, out: &mut (dyn Write + Send)) -> Result<(), MetricsError> {
    match &args.textfile {
        Some(path) => write_atomically(path, text.as_bytes()).map_err(|e| MetricsError::Write {
            path: path.clone(),
            message: e.to_string(),
        }),
        None => {
            let _ = out.write_all(text.as_bytes());
            Ok(())
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, readable by all
/// (node_exporter runs as another user), fsynced, then renamed over `path`: a reader sees the
/// old file or the new one, never part of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".pgpitr-metrics.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_textfile_is_replaced_whole_and_no_temporary_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpitr.prom");
        write_atomically(&path, b"one\n").unwrap();
        write_atomically(&path, b"two\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pgpitr.prom")]);
        assert!(write_atomically(&dir.path().join("no/such/dir.prom"), b"x").is_err());
    }
}
