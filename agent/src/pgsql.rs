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

/// Whether the server is a hot standby (in recovery): `in_hot_standby`, the parameter the
/// server reported at the replication connection's startup (PostgreSQL 14+), else
/// `pg_is_in_recovery()` over an ordinary connection (PostgreSQL 13); `None` when neither can be
/// read.
pub async fn is_standby(in_hot_standby: Option<String>, params: &ConnectParams) -> Option<bool> {
    if let Some(v) = in_hot_standby {
        return Some(v == "on");
    }
    let client = connect(params, "pgpitr")
        .await
        .map_err(|e| tracing::debug!("SQL connection failed: {e}"))
        .ok()?;
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .ok()?;
    row.try_get(0).ok()
}
