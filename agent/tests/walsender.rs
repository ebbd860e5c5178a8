//! The replication client against a real PostgreSQL 15 (see `common` for the test cluster):
//! authentication methods, TLS modes, error classification, replication commands and
//! BASE_BACKUP output. Set `PGPITR_TEST_PGBIN` to a directory with initdb, pg_ctl and postgres
//! of another major version (13+) to run the same checks against it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use common::{ClusterOptions, PgCluster};
use pgpitr::walsender::{
    BackupEvent, BaseBackupOptions, ConnectParams, ReplicationConnection, WalsenderError,
};

fn hba(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

async fn connect(conninfo: &str) -> Result<ReplicationConnection, WalsenderError> {
    let params = ConnectParams::from_conninfo(conninfo).expect("valid conninfo");
    ReplicationConnection::connect(&params).await
}

/// Parses `X/X` into a 64-bit position.
fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("X/X form");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Asserts that an error never shows the password, in Display or Debug form.
fn assert_no_password(err: &WalsenderError, password: &str) {
    let shown = format!("{err} {err:?} {:?}", err.hint());
    assert!(!shown.contains(password), "password leaked: {shown}");
}

#[tokio::test]
async fn authentication_methods_tls_modes_and_errors() {
    let cert_dir = tempfile::tempdir().unwrap();
    let certs = common::make_certs(cert_dir.path());
    if certs.is_none() {
        eprintln!("openssl CLI not found: skipping the TLS checks");
    }
    let cluster = PgCluster::start(&ClusterOptions {
        hba: hba(&[
            "local replication trustuser trust",
            "host replication trustuser 127.0.0.1/32 trust",
            "host replication scramuser 127.0.0.1/32 scram-sha-256",
            "host replication md5user 127.0.0.1/32 md5",
            "host replication clearuser 127.0.0.1/32 password",
            "host replication norepl 127.0.0.1/32 trust",
            "hostssl replication tlsuser 127.0.0.1/32 scram-sha-256",
        ]),
        tls: certs
            .as_ref()
            .map(|c| (c.server_cert.clone(), c.server_key.clone())),
        // Many short connections; a walsender slot is freed only once its process exits.
        conf: vec!["max_wal_senders = 30".to_owned()],
        ..ClusterOptions::default()
    });
    cluster.psql(
        "CREATE ROLE trustuser LOGIN REPLICATION; \
         CREATE ROLE norepl LOGIN; \
         SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'sc''ram pw'; \
         CREATE ROLE clearuser LOGIN REPLICATION PASSWORD 'clearpw'; \
         CREATE ROLE tlsuser LOGIN REPLICATION PASSWORD 'tlspw'; \
         SET password_encryption = 'md5'; \
         CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5pw'",
    );

    // Trust over the Unix socket.
    let mut conn = connect(&cluster.socket_conninfo("user=trustuser"))
        .await
        .unwrap();
    assert!(!conn.is_tls());
    eprintln!("testing against PostgreSQL {}", conn.server_version());
    assert_eq!(conn.server_version_num() / 10000, cluster.major_version());
    assert_eq!(conn.parameter("integer_datetimes"), Some("on"));
    assert!(conn.backend_pid().is_some());
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname, None);
    assert!(lsn(&id.xlogpos) > 0);
    conn.close().await;

    // Trust over TCP, without TLS.
    let conn = connect(&cluster.tcp_conninfo("user=trustuser sslmode=disable"))
        .await
        .unwrap();
    assert!(!conn.is_tls());

    // SCRAM-SHA-256, with a quoted password.
    let mut conn =
        connect(&cluster.tcp_conninfo("user=scramuser sslmode=disable password='sc\\'ram pw'"))
            .await
            .unwrap();
    conn.identify_system().await.unwrap();
    let err = connect(&cluster.tcp_conninfo("user=scramuser sslmode=disable password=wrongpw1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WalsenderError::AuthFailed { sqlstate, .. } if sqlstate == "28P01"),
        "{err:?}"
    );
    assert!(err.hint().unwrap().contains("pg_hba.conf"));
    assert_no_password(&err, "wrongpw1");
    let err =
        connect(&cluster.tcp_conninfo("user=scramuser sslmode=disable passfile=/nonexistent"))
            .await
            .unwrap_err();
    assert!(
        matches!(err, WalsenderError::PasswordRequired { .. }),
        "{err:?}"
    );

    // MD5.
    connect(&cluster.tcp_conninfo("user=md5user sslmode=disable password=md5pw"))
        .await
        .unwrap();
    let err = connect(&cluster.tcp_conninfo("user=md5user sslmode=disable password=wrongpw2"))
        .await
        .unwrap_err();
    assert!(matches!(err, WalsenderError::AuthFailed { .. }), "{err:?}");
    assert_no_password(&err, "wrongpw2");

    // Cleartext password.
    connect(&cluster.tcp_conninfo("user=clearuser sslmode=disable password=clearpw"))
        .await
        .unwrap();

    // A role without REPLICATION.
    let err = connect(&cluster.tcp_conninfo("user=norepl sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WalsenderError::NoReplicationPermission { .. }),
        "{err:?}"
    );
    assert!(err.hint().unwrap().contains("REPLICATION"));

    let Some(certs) = certs else { return };
    let ca = certs.ca_cert.display().to_string();
    let other_ca = certs.other_ca_cert.display().to_string();

    // prefer (the default) uses TLS when the server offers it; SCRAM works over TLS.
    let conn = connect(&cluster.tcp_conninfo("user=trustuser"))
        .await
        .unwrap();
    assert!(conn.is_tls());

    // tlsuser only has a hostssl line: plain text is refused by pg_hba.conf.
    let err = connect(&cluster.tcp_conninfo("user=tlsuser password=tlspw sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WalsenderError::AuthFailed { sqlstate, .. } if sqlstate == "28000"),
        "{err:?}"
    );
    for mode in ["require", "prefer", "allow"] {
        let mut conn =
            connect(&cluster.tcp_conninfo(&format!("user=tlsuser password=tlspw sslmode={mode}")))
                .await
                .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
        assert!(conn.is_tls(), "sslmode={mode}");
        conn.identify_system().await.unwrap();
    }

    // verify-full: chain and host name.
    let mut conn = connect(&format!(
        "host=localhost port={} user=tlsuser password=tlspw sslmode=verify-full sslrootcert='{ca}'",
        cluster.port
    ))
    .await
    .unwrap();
    assert!(conn.is_tls());
    conn.identify_system().await.unwrap();
    // The certificate names localhost, not 127.0.0.1.
    let err = connect(&cluster.tcp_conninfo(&format!(
        "user=tlsuser password=tlspw sslmode=verify-full sslrootcert='{ca}'"
    )))
    .await
    .unwrap_err();
    assert!(matches!(err, WalsenderError::Tls(_)), "{err:?}");
    // verify-ca ignores the name but not the chain.
    connect(&cluster.tcp_conninfo(&format!(
        "user=tlsuser password=tlspw sslmode=verify-ca sslrootcert='{ca}'"
    )))
    .await
    .unwrap();
    let err = connect(&cluster.tcp_conninfo(&format!(
        "user=tlsuser password=tlspw sslmode=verify-ca sslrootcert='{other_ca}'"
    )))
    .await
    .unwrap_err();
    assert!(matches!(err, WalsenderError::Tls(_)), "{err:?}");
    // verify-full needs a root certificate file.
    let err = connect(&cluster.tcp_conninfo(
        "user=tlsuser password=tlspw sslmode=verify-full sslrootcert=/nonexistent/root.crt",
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&err, WalsenderError::Tls(m) if m.contains("does not exist")),
        "{err:?}"
    );
}

#[tokio::test]
async fn no_wal_sender_slot_and_no_server_tls() {
    let cluster = PgCluster::start(&ClusterOptions {
        hba: hba(&[
            "local replication postgres trust",
            "host replication postgres 127.0.0.1/32 trust",
        ]),
        conf: vec!["max_wal_senders = 0".to_owned()],
        ..ClusterOptions::default()
    });
    let err = connect(&cluster.socket_conninfo("user=postgres"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WalsenderError::TooManyWalSenders { .. }),
        "{err:?}"
    );
    assert!(err.hint().unwrap().contains("max_wal_senders"));
    assert!(err.is_transient());

    // The server has ssl = off.
    let err = connect(&cluster.tcp_conninfo("user=postgres sslmode=require"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WalsenderError::Tls(m) if m.contains("does not support SSL")),
        "{err:?}"
    );

    // An unused port.
    let err = connect(&format!(
        "host=127.0.0.1 port={} user=postgres connect_timeout=5",
        common::free_port()
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, WalsenderError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn timeline_history_after_promotion() {
    let cluster = PgCluster::start(&ClusterOptions {
        hba: hba(&["local replication postgres trust"]),
        ..ClusterOptions::default()
    });
    cluster.restart_as_standby();
    cluster.promote();

    let mut conn = connect(&cluster.socket_conninfo("user=postgres"))
        .await
        .unwrap();
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.timeline, 2);
    let (name, content) = conn.timeline_history(2).await.unwrap();
    assert_eq!(name, "00000002.history");
    let content = String::from_utf8(content).unwrap();
    // "<parent tli>\t<switch point>\t<reason>" (src/backend/access/transam/timeline.c).
    let first = content.lines().next().expect("one line");
    let fields: Vec<&str> = first.split('\t').collect();
    assert_eq!(fields[0], "1", "{content:?}");
    assert!(lsn(fields[1]) > 0, "{content:?}");
    let err = conn.timeline_history(3).await.unwrap_err();
    assert!(matches!(err, WalsenderError::Server { .. }), "{err:?}");
    conn.close().await;
}

/// One archive as received: name, location, bytes.
type Archive = (String, Option<String>, Vec<u8>);

/// Member names and contents (for small files) of a tar archive; asserts it is well-formed.
fn tar_members(data: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(data);
    let mut members = BTreeMap::new();
    for entry in archive.entries().expect("tar archive") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("entry path").display().to_string();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_owned();
        let mut content = Vec::new();
        if entry.header().size().unwrap() < 64 * 1024 {
            entry.read_to_end(&mut content).unwrap();
        }
        members.insert(path, content);
    }
    members
}

#[tokio::test]
async fn base_backup_streams_archives_and_manifest() {
    let cluster = PgCluster::start(&ClusterOptions {
        hba: hba(&["local replication postgres trust"]),
        data_checksums: true,
        ..ClusterOptions::default()
    });
    let ts_dir = cluster.postgres_owned_dir("ts1");
    cluster.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    cluster.psql("CREATE TABLE t TABLESPACE ts1 AS SELECT g FROM generate_series(1, 1000) g");
    let ts_oid: u32 = cluster
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")
        .parse()
        .unwrap();
    let sysid: u64 = cluster
        .psql("SELECT system_identifier FROM pg_control_system()")
        .parse()
        .unwrap();

    let mut conn = connect(&cluster.socket_conninfo("user=postgres"))
        .await
        .unwrap();
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.system_identifier, sysid);
    assert_eq!(conn.show("wal_segment_size").await.unwrap(), "16MB");
    assert_eq!(
        conn.simple_query("SHOW wal_level").await.unwrap(),
        vec![vec![Some("replica".to_owned())]]
    );
    let err = conn.show("wal_level; DROP").await.unwrap_err();
    assert!(matches!(err, WalsenderError::InvalidArgument(_)), "{err:?}");
    let err = conn.show("no_such_setting").await.unwrap_err();
    assert!(matches!(err, WalsenderError::Server { .. }), "{err:?}");
    // Timeline 1 has no history file; the error leaves the connection usable.
    let err = conn.timeline_history(1).await.unwrap_err();
    assert!(matches!(err, WalsenderError::Server { .. }), "{err:?}");

    let opts = BaseBackupOptions {
        label: "pgpitr it's a test".to_owned(),
        fast_checkpoint: true,
        wait_for_wal: false,
        manifest: true,
        progress: true,
        max_rate: None,
        tablespace_map: true,
        incremental: false,
    };
    let mut stream = conn.base_backup(opts).await.unwrap();
    let mut started = None;
    let mut finished = None;
    let mut tablespaces = None;
    let mut archives: Vec<Archive> = Vec::new();
    let mut open: Option<Archive> = None;
    let mut manifest = Vec::new();
    let mut last_progress = 0;
    while let Some(event) = stream.next_event().await.unwrap() {
        assert!(finished.is_none(), "event after Finished: {event:?}");
        match event {
            BackupEvent::Started {
                start_lsn,
                timeline,
            } => {
                assert!(started.is_none() && tablespaces.is_none());
                started = Some((start_lsn, timeline));
            }
            BackupEvent::Tablespaces(ts) => {
                assert!(started.is_some() && archives.is_empty());
                tablespaces = Some(ts);
            }
            BackupEvent::ArchiveStart {
                name,
                tablespace_location,
            } => {
                assert!(open.is_none(), "archive {name} starts inside another");
                assert!(manifest.is_empty(), "archive after the manifest");
                open = Some((name, tablespace_location, Vec::new()));
            }
            BackupEvent::ArchiveData(data) => open
                .as_mut()
                .expect("data inside an archive")
                .2
                .extend_from_slice(&data),
            BackupEvent::ArchiveEnd => archives.push(open.take().expect("end of an open archive")),
            BackupEvent::ManifestData(data) => {
                assert!(open.is_none());
                manifest.extend_from_slice(&data);
            }
            BackupEvent::Progress { bytes_done } => {
                assert!(bytes_done >= last_progress);
                last_progress = bytes_done;
            }
            BackupEvent::Finished { stop_lsn, timeline } => finished = Some((stop_lsn, timeline)),
        }
    }
    assert!(stream.next_event().await.unwrap().is_none());
    drop(stream);

    let (start_lsn, start_tli) = started.expect("Started");
    let (stop_lsn, stop_tli) = finished.expect("Finished");
    assert_eq!((start_tli, stop_tli), (1, 1));
    assert!(lsn(&start_lsn) > 0 && lsn(&stop_lsn) >= lsn(&start_lsn));

    let tablespaces = tablespaces.expect("Tablespaces");
    assert_eq!(tablespaces.len(), 2, "{tablespaces:?}");
    assert_eq!(tablespaces[0].oid, Some(ts_oid));
    assert_eq!(
        tablespaces[0].location.as_deref(),
        Some(ts_dir.to_str().unwrap())
    );
    assert_eq!(tablespaces[1].oid, None, "main data directory comes last");
    assert!(tablespaces.iter().all(|t| t.size_estimate_bytes.is_some()));
    let major = cluster.major_version();
    if major >= 15 {
        assert!(last_progress > 0, "PROGRESS was requested");
    }

    let names: BTreeSet<&str> = archives.iter().map(|a| a.0.as_str()).collect();
    let ts_name = format!("{ts_oid}.tar");
    assert_eq!(names, BTreeSet::from(["base.tar", ts_name.as_str()]));
    for (name, location, data) in &archives {
        assert!(
            data.len() >= 1024 && data[data.len() - 1024..].iter().all(|&b| b == 0),
            "{name} does not end with the tar trailer"
        );
        if name == "base.tar" {
            assert_eq!(location, &None);
            let members = tar_members(data);
            for required in [
                "PG_VERSION",
                "global/pg_control",
                "backup_label",
                "tablespace_map",
            ] {
                assert!(
                    members.contains_key(required),
                    "{required} missing from base.tar"
                );
            }
            assert_eq!(members["PG_VERSION"], format!("{major}\n").as_bytes());
            let label = String::from_utf8_lossy(&members["backup_label"]).into_owned();
            assert!(label.contains("LABEL: pgpitr it's a test"), "{label}");
            let map = String::from_utf8_lossy(&members["tablespace_map"]).into_owned();
            assert!(
                map.contains(&format!("{ts_oid} {}", ts_dir.display())),
                "{map}"
            );
        } else {
            assert_eq!(location.as_deref(), Some(ts_dir.to_str().unwrap()));
            let members = tar_members(data);
            assert!(
                members
                    .keys()
                    .any(|m| m.starts_with(&format!("PG_{major}_"))),
                "{:?}",
                members.keys().collect::<Vec<_>>()
            );
        }
    }

    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    assert!(manifest.get("PostgreSQL-Backup-Manifest-Version").is_some());
    let files = manifest["Files"].as_array().expect("Files");
    let pg_version = files
        .iter()
        .find(|f| f["Path"] == "PG_VERSION")
        .expect("PG_VERSION in manifest");
    // CRC-32C, as asked; PostgreSQL writes the bytes of the uint32 in the server's order.
    assert_eq!(pg_version["Checksum-Algorithm"], "CRC32C");
    let crc = crc32c::crc32c(format!("{major}\n").as_bytes());
    let checksum = pg_version["Checksum"].as_str().expect("Checksum");
    assert!(
        checksum == hex::encode(crc.to_le_bytes()) || checksum == hex::encode(crc.to_be_bytes()),
        "PG_VERSION checksum {checksum}, CRC-32C {crc:08x}"
    );

    // The connection is usable after the backup.
    let again = conn.identify_system().await.unwrap();
    assert_eq!(again.system_identifier, sysid);
    conn.close().await;
}

/// Flips bytes inside the first page of a relation file.
fn corrupt_page(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(8000)).unwrap();
    file.write_all(&[0xA5; 16]).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test]
async fn checksum_failure_after_end_position_is_an_error() {
    let cluster = PgCluster::start(&ClusterOptions {
        hba: hba(&["local replication postgres trust"]),
        data_checksums: true,
        ..ClusterOptions::default()
    });
    cluster.psql(
        "CREATE TABLE t AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 1000) g",
    );
    cluster.psql("CHECKPOINT");
    let rel = cluster.psql("SELECT pg_relation_filepath('t')");
    corrupt_page(&cluster.data.join(rel));

    let mut conn = connect(&cluster.socket_conninfo("user=postgres"))
        .await
        .unwrap();
    let opts = BaseBackupOptions {
        fast_checkpoint: true,
        wait_for_wal: false,
        ..BaseBackupOptions::new("corrupt")
    };
    let mut stream = conn.base_backup(opts).await.unwrap();
    let mut archive_ends = 0;
    let mut manifest_bytes = 0;
    let err = loop {
        match stream.next_event().await {
            Ok(Some(BackupEvent::Finished { .. })) => panic!("a corrupt backup must not finish"),
            Ok(Some(BackupEvent::ArchiveEnd)) => archive_ends += 1,
            Ok(Some(BackupEvent::ManifestData(d))) => manifest_bytes += d.len(),
            Ok(Some(_)) => {}
            Ok(None) => panic!("stream ended without Finished or an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.sqlstate(), Some("XX001"), "{err:?}");
    assert!(err.to_string().contains("checksum"), "{err}");
    // The error came after all the data had been sent.
    assert_eq!(archive_ends, 1);
    assert!(manifest_bytes > 0);
    assert!(stream.next_event().await.unwrap().is_none());
    drop(stream);
    // The server ended the command with ReadyForQuery: the connection is still usable.
    conn.identify_system().await.unwrap();
}
