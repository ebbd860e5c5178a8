//! Issue 18 item 6 and issue 19 item 3: `s3_sse`, `s3_sse_kms_key_id` and `s3_storage_class`
//! are sent on every object pgpitr writes. A recording proxy (`pgpitr_tests::fault_proxy`, with
//! no faults) in front of Garage keeps every request's headers while a PostgreSQL 15 cluster
//! archives, is backed up (packs big enough for multipart uploads) and is restored to a restore
//! point through the same proxy. Garage 2.5 accepts these headers and ignores them (it has only
//! SSE-C), so the round trip proves they break nothing, and the recorded requests prove that
//! each PutObject and CreateMultipartUpload carried them. A storage class that needs a restore
//! request before a GET is refused before any request is made.

use std::process::Command;

use pgpitr_tests::cli::{archiving_cluster, conninfo, pgpitr_ok, text, Env};
use pgpitr_tests::fault_proxy::{FaultProxy, Seen};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::wal::FakeDataDir;
use pgpitr_tests::{bin, temp_dir, PG_USER};

const KMS_KEY: &str = "alias/pgpitr-test";
const CLASS: &str = "STANDARD_IA";

/// A fresh bucket on the shared Garage behind a recording proxy, and the environment that
/// reaches it through the proxy with `extra` settings.
fn through_proxy(prefix: &str, extra: &[(&str, &str)]) -> (FaultProxy, Env) {
    let g = Garage::shared();
    let proxy = FaultProxy::start(&g.endpoint, 0.0);
    proxy.record();
    let mut env = g.env(&g.bucket(), prefix);
    for (k, v) in env.iter_mut() {
        if k == "PGPITR_S3_ENDPOINT" {
            *v = proxy.endpoint();
        }
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    (proxy, env)
}

/// The query of a request target (after `?`), or "".
fn query(s: &Seen) -> &str {
    s.target.split_once('?').map_or("", |(_, q)| q)
}

/// PutObject (a PUT that is not an UploadPart) or CreateMultipartUpload (a POST `?uploads`).
fn is_object_write(s: &Seen) -> bool {
    let q = query(s);
    let upload_part = q.contains("uploadId=");
    (s.method == "PUT" && !upload_part)
        || (s.method == "POST" && !upload_part && q.split('&').any(|p| p.starts_with("uploads")))
}

#[test]
fn every_put_and_multipart_upload_carries_encryption_and_storage_class() {
    let (proxy, env) = through_proxy(
        "sse",
        &[
            ("PGPITR_S3_SSE", "aws:kms"),
            ("PGPITR_S3_SSE_KMS_KEY_ID", KMS_KEY),
            ("PGPITR_S3_STORAGE_CLASS", CLASS),
        ],
    );
    let c = archiving_cluster(env.clone(), "");
    // About 35 MB of hexadecimal text, which lz4 barely compresses: the backup's packs pass
    // the 16 MiB multipart threshold.
    c.psql(
        "CREATE TABLE big AS SELECT i, md5(random()::text) || md5(random()::text) AS pad \
         FROM generate_series(1, 350000) i",
    );
    c.psql("CREATE TABLE marker (id int)");
    let mut backup_env = env.clone();
    backup_env.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    pgpitr_ok(&backup_env, &["backup", "--checkpoint", "fast"]);
    c.psql("INSERT INTO marker VALUES (1)");
    c.psql("SELECT pg_create_restore_point('headers')");
    c.psql("INSERT INTO marker VALUES (2)");
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archived(&seg);

    // Restored through the proxy too; the restored server reads its WAL through it.
    let root = temp_dir("restore-headers");
    let data = root.path().join("data");
    pgpitr_ok(
        &env,
        &[
            "restore",
            "--target-name",
            "headers",
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    let mut r = Cluster::adopt(15, root, data);
    r.env = env
        .iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .cloned()
        .collect();
    r.start();
    assert!(
        r.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "the restored server did not finish recovery:\n{}",
        r.log()
    );
    assert_eq!(r.psql("SELECT string_agg(id::text, ',') FROM marker"), "1");
    assert_eq!(r.psql("SELECT count(*) FROM big"), "350000");
    drop(r);
    drop(c);

    let seen = proxy.seen();
    let writes: Vec<&Seen> = seen.iter().filter(|s| is_object_write(s)).collect();
    for w in &writes {
        assert_eq!(
            (
                w.header("x-amz-server-side-encryption"),
                w.header("x-amz-server-side-encryption-aws-kms-key-id"),
                w.header("x-amz-storage-class"),
            ),
            (Some("aws:kms"), Some(KMS_KEY), Some(CLASS)),
            "{} {} lacks a header: {:?}",
            w.method,
            w.target,
            w.headers
        );
    }
    let count = |what: &dyn Fn(&Seen) -> bool| writes.iter().filter(|s| what(s)).count();
    let wal = count(&|s| s.method == "PUT" && s.target.contains("/wal/"));
    let multipart = count(&|s| s.method == "POST");
    let manifests = count(&|s| s.target.contains("manifest"));
    assert!(
        wal > 0 && multipart > 0 && manifests > 0,
        "{} writes of {} requests: {wal} WAL PUTs, {multipart} multipart uploads, {manifests} manifests",
        writes.len(),
        seen.len()
    );
    // Every part belongs to an upload created with the headers: parts cannot carry them.
    assert!(seen
        .iter()
        .any(|s| s.method == "PUT" && query(s).contains("uploadId=")));
}

#[test]
fn aes256_alone_on_a_single_put_and_no_other_header() {
    let (proxy, env) = through_proxy("aes", &[("PGPITR_S3_SSE", "AES256")]);
    let dir = FakeDataDir::new("s3-headers", 7_400_000_000_000_000_018, 1 << 20);
    let (name, bytes) = dir.write_segment(1, 18);
    let run = |program: &str, args: &[&str]| {
        Command::new(bin(program))
            .args(args)
            .current_dir(&dir.pgdata)
            .env_remove("PGPITR_CONFIG")
            .envs(env.iter().cloned())
            .output()
            .unwrap()
    };
    let out = run("pgpitr-archive", &[&format!("pg_wal/{name}"), &name]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run("pgpitr-restore", &[&name, "pg_wal/RECOVERYXLOG"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(dir.pgdata.join("pg_wal/RECOVERYXLOG")).unwrap(),
        bytes
    );
    let seen = proxy.seen();
    let writes: Vec<&Seen> = seen.iter().filter(|s| is_object_write(s)).collect();
    assert!(
        writes.iter().any(|s| s.target.contains("/wal/")),
        "{seen:?}"
    );
    for w in &writes {
        assert_eq!(w.header("x-amz-server-side-encryption"), Some("AES256"));
        assert_eq!(
            w.header("x-amz-server-side-encryption-aws-kms-key-id"),
            None
        );
        assert_eq!(w.header("x-amz-storage-class"), None);
    }
    // Reads carry none of them (S3 refuses SSE headers on a GET of an SSE-S3 object).
    for r in seen
        .iter()
        .filter(|s| s.method == "GET" || s.method == "HEAD")
    {
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.starts_with("x-amz-server-side") || k == "x-amz-storage-class"),
            "{r:?}"
        );
    }
}

#[test]
fn archive_classes_are_refused_before_any_request() {
    for (class, why) in [
        ("GLACIER", "restored by a request"),
        ("deep_archive", "restored by a request"),
        ("REDUCED_REDUNDANCY", "fewer copies"),
        ("Zq7", "STANDARD_IA"),
    ] {
        let (proxy, env) = through_proxy("refused", &[("PGPITR_S3_STORAGE_CLASS", class)]);
        let dir = FakeDataDir::new("s3-headers", 7_400_000_000_000_000_018, 1 << 20);
        let (name, _) = dir.write_segment(1, 18);
        let out = Command::new(bin("pgpitr-archive"))
            .args([&format!("pg_wal/{name}"), &name])
            .current_dir(&dir.pgdata)
            .env_remove("PGPITR_CONFIG")
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{class}: {}", text(&out));
        assert_eq!(err.trim_end().lines().count(), 1, "{class}: {err}");
        assert!(
            err.contains("s3_storage_class") && err.contains(why) && !err.contains("Zq7"),
            "{class}: {err}"
        );
        assert_eq!(proxy.requests(), 0, "{class}: a request was made");
    }
}
