//! Real PostgreSQL clusters for tests: `initdb` + `pg_ctl` as [`crate::PG_USER`], on a private
//! port and Unix socket directory, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{as_pg_user, free_port, give_to_pg_user, run_ok, temp_dir};

/// Directory of the server binaries of `major`: `$PG<major>_SERVER_BIN` (set by scripts/test;
/// deliberately not a `PGPITR_*` name, which pgpitr would reject as an unknown setting), else the
/// Debian package's `/usr/lib/postgresql/<major>/bin`.
///
/// # Panics
/// When neither holds a `postgres` binary: a major the suite covers is never skipped silently
/// (issue 20), the test fails naming the variable to set.
pub fn bin_dir(major: u32) -> PathBuf {
    let var = server_bin_var(major);
    let dir = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    assert!(
        dir.join("postgres").is_file(),
        "no PostgreSQL {major} server binaries in {}: set {var} to their directory \
         (scripts/test --setup-only installs them and prints it)",
        dir.display()
    );
    dir
}

/// The environment variable naming the server binaries of `major`.
pub fn server_bin_var(major: u32) -> String {
    format!("PG{major}_SERVER_BIN")
}

/// The PostgreSQL 15 client tools (psql, pgbench, pg_waldump, …), used with every major.
pub fn client_bin(tool: &str) -> PathBuf {
    bin_dir(15).join(tool)
}

pub struct Cluster {
    pub major: u32,
    pub port: u16,
    /// Owns the data directory, the socket directory and the log.
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    /// Extra environment for the server (and so for archive_command / restore_command).
    pub env: Vec<(String, String)>,
    running: bool,
}

impl Cluster {
    /// `initdb` a new cluster (with data checksums) and append `conf` to postgresql.conf.
    pub fn init(major: u32, conf: &str) -> Cluster {
        let root = temp_dir("pg");
        let data = root.path().join("data");
        let socket_dir = root.path().join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        give_to_pg_user(root.path());
        run_ok(
            as_pg_user(bin_dir(major).join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "-k", "--no-sync"]),
        );
        let mut cluster = Cluster::empty(major, root, data, socket_dir);
        cluster.append_conf(conf);
        cluster
    }

    /// A cluster object for a data directory created some other way (e.g. by `pgpitr restore`).
    pub fn adopt(major: u32, root: tempfile::TempDir, data: PathBuf) -> Cluster {
        let socket_dir = root.path().join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        give_to_pg_user(root.path());
        Cluster::empty(major, root, data, socket_dir)
    }

    fn empty(major: u32, root: tempfile::TempDir, data: PathBuf, socket_dir: PathBuf) -> Cluster {
        Cluster {
            major,
            port: free_port(),
            root,
            data,
            socket_dir,
            env: Vec::new(),
            running: false,
        }
    }

    /// A streaming hot standby of this cluster, started, with `conf` appended to its
    /// postgresql.conf and this cluster's extra environment: a copy of the data directory taken
    /// while this cluster is stopped (cleanly, so the copy starts from a shutdown checkpoint and
    /// needs no WAL but what it streams; works for every major, unlike the PostgreSQL 15
    /// `pg_basebackup` against newer servers), then `standby.signal` and `primary_conninfo`.
    pub fn standby(&mut self, conf: &str) -> Cluster {
        self.stop();
        let root = temp_dir("pg-standby");
        let data = root.path().join("data");
        run_ok(Command::new("cp").arg("-a").arg(&self.data).arg(&data));
        self.start();
        for stale in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(data.join(stale));
        }
        std::fs::write(data.join("standby.signal"), "").unwrap();
        let mut standby = Cluster::adopt(self.major, root, data);
        standby.append_conf(&format!(
            "primary_conninfo = 'host={} port={} user=postgres application_name=standby'\nhot_standby = on\n{conf}",
            self.socket_dir.display(),
            self.port
        ));
        standby.env = self.env.clone();
        standby.start();
        standby
    }

    /// Waits up to 120 s until this standby has replayed everything `primary` has written.
    pub fn wait_replayed(&self, primary: &Cluster) {
        let lsn = primary.psql("SELECT pg_current_wal_lsn()");
        assert!(
            self.wait_for(
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
                "t",
                120
            ),
            "the standby did not replay up to {lsn}:\n{}",
            self.log()
        );
    }

    pub fn append_conf(&mut self, conf: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        writeln!(f, "\n{conf}").unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server and waits until it accepts connections (`pg_ctl -w`; a server in
    /// archive recovery accepts them only once consistent with hot_standby, so `wait` may be
    /// false for recovery tests).
    pub fn start(&mut self) {
        self.start_with(true)
    }

    pub fn start_with(&mut self, wait: bool) {
        let opts = format!(
            "-p {} -c unix_socket_directories='{}' -c listen_addresses=''",
            self.port,
            self.socket_dir.display()
        );
        let mut cmd = as_pg_user(bin_dir(self.major).join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(opts)
            .arg("-t")
            .arg("120");
        cmd.arg(if wait { "-w" } else { "-W" }).arg("start");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = as_pg_user(bin_dir(self.major).join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .output();
            self.running = false;
        }
    }

    /// Whether the postmaster is running (it may have shut down by itself, e.g. after recovery
    /// with `recovery_target_action = shutdown` or a fatal restore_command error).
    pub fn is_running(&self) -> bool {
        as_pg_user(bin_dir(self.major).join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("status")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Runs SQL through psql and returns its unaligned, tuples-only output, trimmed.
    pub fn psql(&self, sql: &str) -> String {
        run_ok(self.psql_cmd().args(["-c", sql])).trim().to_string()
    }

    /// Like [`Cluster::psql`] but returns the error output instead of panicking on failure.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = self.psql_cmd().args(["-c", sql]).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn psql_cmd(&self) -> Command {
        let mut c = Command::new(client_bin("psql"));
        c.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ]);
        c.arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string());
        c
    }

    /// A `pgbench` command against this cluster (add the options).
    pub fn pgbench(&self) -> Command {
        let mut c = Command::new(client_bin("pgbench"));
        c.args(["-U", "postgres"])
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string());
        c
    }

    /// Waits up to `secs` for `sql` to return `expected`.
    pub fn wait_for(&self, sql: &str, expected: &str, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if self.try_psql(sql).map(|v| v == expected).unwrap_or(false) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        false
    }

    /// Waits up to 120 s until PostgreSQL reports `segment` (or a later file name) archived.
    pub fn wait_archived(&self, segment: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let last = self.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            if last.as_str() >= segment {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "segment {segment} not archived (last {last}):\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Waits up to 120 s until no WAL file waits to be archived (no `.ready` in
    /// `pg_wal/archive_status`): a backup's `.backup` history file, for one, is archived after
    /// the backup has returned, so a listing of the repository taken right after a backup may
    /// miss it.
    pub fn wait_archive_idle(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let ready: Vec<String> = std::fs::read_dir(self.pg_wal().join("archive_status"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .filter(|n| n.ends_with(".ready"))
                        .collect()
                })
                .unwrap_or_default();
            if ready.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still waiting to be archived: {ready:?}\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn pg_wal(&self) -> PathBuf {
        self.data.join("pg_wal")
    }

    pub fn path(&self) -> &Path {
        &self.data
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_pg_user(bin_dir(self.major).join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
