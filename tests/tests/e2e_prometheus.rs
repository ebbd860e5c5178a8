//! A real Prometheus server (Debian's `prometheus` package, installed by `scripts/test`) scrapes
//! `pgpitr metrics --listen` and evaluates the shipped alert rules
//! (docs/monitoring/pgpitr-alerts.yml): its HTTP API shows pgpitr's series, and with archiving
//! broken and the newest archived WAL file two hours old, the stale-WAL alert is pending or
//! firing while the backup alerts stay quiet.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use pgpitr_tests::cli::{archiving_cluster, conninfo, local_repo, pgpitr_cmd, pgpitr_ok, repo_env};
use pgpitr_tests::monitoring::http_get;
use pgpitr_tests::{files_under, free_port, temp_dir};

/// Kills and reaps a child process when dropped, also when the test fails.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sets the modification time of every WAL object of local repository `repo` to `age` ago:
/// as if archiving had stopped that long ago.
fn age_wal_objects(repo: &Path, age: Duration) {
    let then = SystemTime::now() - age;
    for e in files_under(&repo.join("wal")) {
        let f = std::fs::File::open(&e).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(then))
            .unwrap();
    }
}

/// Polls Prometheus's API at `path` until `done` accepts the decoded JSON (or 90 s pass).
fn wait_api(port: u16, path: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some((200, body)) = http_get(&format!("127.0.0.1:{port}"), path) {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if done(&v) {
                return;
            }
            last = Some(v);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("Prometheus never showed {what}; last answer to {path}: {last:?}");
}

#[test]
fn prometheus_scrapes_pgpitr_metrics_and_fires_the_stale_wal_alert() {
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "");
    let mut backup_env = env.clone();
    backup_env.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    pgpitr_ok(&backup_env, &["backup", "--checkpoint", "fast"]);
    c.wait_archive_idle();
    // Archiving breaks, and two hours pass without WAL reaching the repository.
    c.psql("ALTER SYSTEM SET archive_command = 'false'");
    c.psql("SELECT pg_reload_conf()");
    age_wal_objects(&repo, Duration::from_secs(2 * 3600));

    let metrics_port = free_port();
    let _metrics = Reaped(
        pgpitr_cmd(
            &env,
            &["metrics", "--listen", &format!("127.0.0.1:{metrics_port}")],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    );

    let dir = temp_dir("prometheus");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring/pgpitr-alerts.yml");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n  - job_name: pgpitr\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n",
            rules.canonicalize().unwrap().display()
        ),
    )
    .unwrap();
    let prometheus_port = free_port();
    let _prometheus = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus, installed by scripts/test)"),
    );

    // The series arrive: one backup, the repository readable.
    wait_api(
        prometheus_port,
        "/api/v1/query?query=pgpitr_backups",
        "pgpitr_backups = 1",
        |v| v["data"]["result"][0]["value"][1] == "1",
    );
    wait_api(
        prometheus_port,
        "/api/v1/query?query=pgpitr_repository_up",
        "pgpitr_repository_up = 1",
        |v| v["data"]["result"][0]["value"][1] == "1",
    );
    // The stale-WAL alert goes pending (its `for` is 5 minutes) or firing.
    wait_api(
        prometheus_port,
        "/api/v1/alerts",
        "PgpitrWalArchiveStale pending or firing",
        |v| {
            v["data"]["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|a| {
                    a["labels"]["alertname"] == "PgpitrWalArchiveStale"
                        && (a["state"] == "pending" || a["state"] == "firing")
                })
            })
        },
    );
    // A fresh backup: the backup alerts stay quiet.
    let (_, alerts) = http_get(&format!("127.0.0.1:{prometheus_port}"), "/api/v1/alerts").unwrap();
    for quiet in [
        "PgpitrNoBackup",
        "PgpitrBackupTooOld",
        "PgpitrRepositoryUnreachable",
    ] {
        assert!(!alerts.contains(quiet), "{quiet} in {alerts}");
    }
}
