//! Logging through `tracing` to stderr. The archive and restore commands are quiet by default
//! (warnings and errors only): their stderr is PostgreSQL's log, which is the DBA's log.
//! `PGPITR_LOG` takes a `tracing` filter such as `debug` or `pgpitr=trace`.

use tracing_subscriber::EnvFilter;

/// Installs the stderr subscriber with `default` as the filter unless `PGPITR_LOG` is set.
pub fn init(default: &str) {
    let filter = std::env::var("PGPITR_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// A single-threaded runtime for the short-lived archive and restore commands; blocking work
/// (compression, file I/O) runs on tokio's blocking pool, which uses every core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
