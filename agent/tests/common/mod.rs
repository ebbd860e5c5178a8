//! A throw-away PostgreSQL cluster for integration tests.
//!
//! Uses the server binaries in `/usr/lib/postgresql/15/bin` (or `PGPITR_TEST_PGBIN`). The
//! cluster lives in a temporary directory, listens on a free port on 127.0.0.1 and on a
//! private Unix-socket directory, and is stopped (`pg_ctl stop -m immediate`) on drop.
//! PostgreSQL refuses to run as root, so when the tests run as root every server command runs
//! as the `postgres` OS user through `runuser`, and the files it needs are chowned to it.
//!
//! `pg_hba.conf` always starts with `local all postgres trust` so that [`PgCluster::psql`]
//! can set things up; tests add their own lines.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The PostgreSQL 15 binaries of the Debian packages.
pub const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Directory with initdb, pg_ctl and postgres: `PGPITR_TEST_PGBIN` (e.g. another major
/// version) or [`PG15_BIN`].
pub fn pg_bin() -> PathBuf {
    std::env::var_os("PGPITR_TEST_PGBIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PG15_BIN))
}

/// psql: beside the server binaries if there is one there, else the PostgreSQL 15 one.
pub fn psql_bin() -> PathBuf {
    let beside = pg_bin().join("psql");
    if beside.exists() {
        beside
    } else {
        Path::new(PG15_BIN).join("psql")
    }
}

/// True when the current process runs as root (server commands then go through runuser).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Options for [`PgCluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Lines appended to pg_hba.conf after `local all postgres trust`.
    pub hba: Vec<String>,
    /// Lines appended to postgresql.conf (after the defaults below).
    pub conf: Vec<String>,
    /// Server certificate and key (PEM) to install; turns `ssl = on`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `initdb --data-checksums`.
    pub data_checksums: bool,
}

/// A running test cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl PgCluster {
    /// initdb, configure, start. Panics (with the server log) on failure.
    pub fn start(opts: &ClusterOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pgpitr-pg-")
            .tempdir()
            .expect("create temp dir");
        // The postgres user must be able to traverse it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        let log = dir.path().join("server.log");
        fs::create_dir(&socket_dir).unwrap();
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(&log, "").unwrap();
        chown_to_postgres(&[&socket_dir, &data, &log]);

        let mut initdb = vec![
            "-D".to_owned(),
            data.display().to_string(),
            "-U".to_owned(),
            "postgres".to_owned(),
            "--no-locale".to_owned(),
            "--encoding=UTF8".to_owned(),
            "--auth=trust".to_owned(),
            "--no-sync".to_owned(),
        ];
        if opts.data_checksums {
            initdb.push("--data-checksums".to_owned());
        }
        run_as_postgres(&pg_bin().join("initdb"), &initdb, "initdb");

        let port = free_port();
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", socket_dir.display()),
            "wal_level = replica".to_owned(),
            "max_wal_senders = 4".to_owned(),
            "fsync = off".to_owned(),
            "autovacuum = off".to_owned(),
            "shared_buffers = 16MB".to_owned(),
            "log_connections = on".to_owned(),
        ];
        if let Some((cert, key)) = &opts.tls {
            let dest_cert = data.join("server.crt");
            let dest_key = data.join("server.key");
            fs::copy(cert, &dest_cert).unwrap();
            fs::copy(key, &dest_key).unwrap();
            fs::set_permissions(&dest_key, fs::Permissions::from_mode(0o600)).unwrap();
            chown_to_postgres(&[&dest_cert, &dest_key]);
            conf.push("ssl = on".to_owned());
        }
        conf.extend(opts.conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf);
        let mut hba = vec!["local all postgres trust".to_owned()];
        hba.extend(opts.hba.iter().cloned());
        fs::write(data.join("pg_hba.conf"), hba.join("\n") + "\n").unwrap();
        chown_to_postgres(&[&data.join("pg_hba.conf")]);

        let cluster = Self {
            dir,
            data,
            socket_dir,
            port,
            log,
        };
        cluster.restart();
        cluster
    }

    /// The temporary directory holding the cluster (for tablespaces, certificates, …).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory inside the test directory owned by the postgres user (for tablespaces).
    pub fn postgres_owned_dir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        chown_to_postgres(&[&path]);
        path
    }

    /// Runs SQL through psql as the `postgres` superuser over the Unix socket; returns the
    /// unaligned, tuples-only output. Panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(psql_bin())
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        if !out.status.success() {
            panic!(
                "psql {sql:?} failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.server_log()
            );
        }
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The server's major version (15 for 15.18).
    pub fn major_version(&self) -> u32 {
        let num: u32 = self.psql("SHOW server_version_num").parse().unwrap();
        num / 10000
    }

    /// Conninfo for a TCP connection to 127.0.0.1.
    pub fn tcp_conninfo(&self, extra: &str) -> String {
        format!("host=127.0.0.1 port={} {extra}", self.port)
    }

    /// Conninfo for the Unix socket.
    pub fn socket_conninfo(&self, extra: &str) -> String {
        format!(
            "host='{}' port={} {extra}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        self.pg_ctl_ok(&["stop", "-m", "fast", "-w"], "stop");
    }

    /// Starts the server again after [`stop`](Self::stop).
    pub fn restart(&self) {
        let log = self.log.display().to_string();
        self.pg_ctl_ok(&["start", "-w", "-t", "60", "-l", &log], "start");
    }

    /// Stops the server, and starts it again in standby mode (standby.signal, no upstream):
    /// it replays its own WAL and waits; [`promote`](Self::promote) then ends recovery on a new
    /// timeline.
    pub fn restart_as_standby(&self) {
        self.stop();
        let signal = self.data.join("standby.signal");
        fs::write(&signal, "").unwrap();
        chown_to_postgres(&[&signal]);
        self.restart();
    }

    /// `pg_ctl promote -w`.
    pub fn promote(&self) {
        self.pg_ctl_ok(&["promote", "-w", "-t", "60"], "promote");
    }

    fn pg_ctl_ok(&self, args: &[&str], what: &str) {
        let out = self.pg_ctl(args);
        if !out.status.success() {
            panic!(
                "pg_ctl {what} failed: {}\n{}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.server_log()
            );
        }
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["-D".to_owned(), self.data.display().to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        postgres_command(&pg_bin().join("pg_ctl"), &full)
            .output()
            .expect("run pg_ctl")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }
}

/// A command that runs `program` as the postgres OS user when we are root.
fn postgres_command(program: &Path, args: &[String]) -> Command {
    let mut cmd = if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    };
    // The postgres user may not be allowed into the test's working directory.
    cmd.args(args).current_dir("/");
    cmd
}

fn run_as_postgres(program: &Path, args: &[String], what: &str) {
    let out = postgres_command(program, args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn chown_to_postgres(paths: &[&Path]) {
    if !running_as_root() {
        return;
    }
    let status = Command::new("chown")
        .arg("-R")
        .arg("postgres:postgres")
        .args(paths)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown failed");
}

fn append(path: &Path, lines: &[String]) {
    let mut content = fs::read_to_string(path).unwrap();
    content.push('\n');
    for line in lines {
        content.push_str(line);
        content.push('\n');
    }
    fs::write(path, content).unwrap();
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// PEM files of a test certificate authority and a server certificate it signed.
#[derive(Debug, Clone)]
pub struct TestCerts {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A second, unrelated CA (for negative verification tests).
    pub other_ca_cert: PathBuf,
}

/// Generates a CA and a server certificate for `localhost` (SAN `DNS:localhost` only) with the
/// openssl CLI. Returns `None` if openssl is not installed.
pub fn make_certs(dir: &Path) -> Option<TestCerts> {
    if Command::new("openssl").arg("version").output().is_err() {
        return None;
    }
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (key, cert, cn) in [
        ("ca.key", "ca.crt", "/CN=pgpitr test CA"),
        ("other-ca.key", "other-ca.crt", "/CN=pgpitr other CA"),
    ] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            cn,
            "-keyout",
            key,
            "-out",
            cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    Some(TestCerts {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        other_ca_cert: dir.join("other-ca.crt"),
    })
}
