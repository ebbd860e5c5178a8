//! Ordinary SQL connections (tokio-postgres) built from the same [`ConnectParams`] as the
//! replication connection, for what a walsender cannot do: `pg_switch_wal()`, `pg_stat_archiver`,
//! reading the next transaction id. Without TLS: used for checks and optional information; the
//! backup itself goes through the walsender, which honours `sslmode`.

use std::time::Duration;

use crate::walsender::ConnectParams;

/// Opens a SQL connection to `dbname` from `params`, or `postgres` when the conninfo names the
/// pseudo-database `replication` (the default for replication conninfos).
///
/// # Errors
/// The connection failed or took more than 15 s.
pub async fn connect(
    params: &ConnectParams,
    application_name: &str,
) -> Result<tokio_postgres::Client, String> {
    let dbname = match params.dbname.as_str() {
        "replication" | "" => "postgres",
        other => other,
    };
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(dbname)
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = &params.password {
        cfg.password(p);
    }
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(15), cfg.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| format!("connecting to {} timed out", params.target()))?
            .map_err(|e| format!("connecting to {}: {e}", params.target()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
