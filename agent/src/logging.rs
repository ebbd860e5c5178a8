//! Logging through `tracing` to stderr. The archive and restore commands are quiet by default
//! (warnings and errors only): their stderr is PostgreSQL's log, which is the DBA's log.
//! `PGPITR_LOG` takes a `tracing` filter such as `debug` or `pgpitr=trace`.

use tracing_subscriber::EnvFilter;

/// The AWS SDK's own crates, silent unless `PGPITR_LOG` names them: their warnings are
/// multi-line debug dumps (a failed credential provider prints its whole error chain), and
/// pgpitr reports every storage failure itself, in one line (`storage::s3`).
const SDK_SILENCED: &str = "aws_config=off,aws_smithy_runtime=off,aws_smithy_runtime_api=off,aws_sdk_s3=off,aws_sdk_sts=off,aws_sdk_sso=off,aws_sdk_ssooidc=off";

/// Installs the stderr subscriber with `default` as the filter (the AWS SDK's crates off)
/// unless `PGPITR_LOG` is set.
pub fn init(default: &str) {
    let filter = std::env::var("PGPITR_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{default},{SDK_SILENCED}")));
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
