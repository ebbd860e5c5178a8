//! Running the `pgpitr` binary from tests: a repository named by `PGPITR_*` variables (and
//! nothing from the caller's environment), a PostgreSQL 15 cluster archiving into it through
//! `pgpitr-archive`, and checked runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::pg::Cluster;
use crate::{bin, give_to_pg_user, temp_dir};

/// `PGPITR_*` (and `AWS_*`) variables naming a repository and its settings.
pub type Env = Vec<(String, String)>;

/// A local repository directory that [`crate::PG_USER`] can write (inside the returned
/// temporary directory, removed on drop).
pub fn local_repo() -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir("repo");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    give_to_pg_user(&repo);
    (dir, repo)
}

/// The environment naming local repository `repo`.
pub fn repo_env(repo: &Path) -> Env {
    vec![("PGPITR_REPO".to_string(), repo.display().to_string())]
}

/// A passphrase file `name` in `dir` holding `passphrase`, mode 0600, that the server's user can
/// read (its `restore_command` opens the repository too).
pub fn passphrase_file(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{passphrase}\n")).unwrap();
    crate::set_mode(&path, 0o600);
    give_to_pg_user(&path);
    path
}

/// `env` with its passphrase file, if any, replaced by `file`.
pub fn with_passphrase(env: &Env, file: &Path) -> Env {
    let mut env: Env = env
        .iter()
        .filter(|(k, _)| k != "PGPITR_ENCRYPTION_PASSPHRASE_FILE")
        .cloned()
        .collect();
    env.push((
        "PGPITR_ENCRYPTION_PASSPHRASE_FILE".into(),
        file.display().to_string(),
    ));
    env
}

/// A libpq connection string for the cluster's socket, as user `postgres`.
pub fn conninfo(c: &Cluster) -> String {
    format!(
        "host={} port={} user=postgres",
        c.socket_dir.display(),
        c.port
    )
}

/// A started PostgreSQL 15 cluster archiving through `pgpitr-archive` with `env`, with `extra`
/// appended to its postgresql.conf.
pub fn archiving_cluster(env: Env, extra: &str) -> Cluster {
    archiving_cluster_of(15, env, extra)
}

/// [`archiving_cluster`] of PostgreSQL `major`.
pub fn archiving_cluster_of(major: u32, env: Env, extra: &str) -> Cluster {
    let conf = format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{} %p %f'\nmax_wal_senders = 4\nmax_wal_size = '1GB'\ncheckpoint_timeout = '1h'\n{extra}",
        bin("pgpitr-archive").display()
    );
    let mut c = Cluster::init(major, &conf);
    c.env = env;
    c.start();
    c
}

/// `pgpitr <args>` with `env` and nothing of the caller's configuration.
pub fn pgpitr_cmd(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("pgpitr"));
    cmd.args(args)
        .env_remove("PGPITR_CONFIG")
        .env_remove("PGPITR_CONNINFO")
        .envs(env.iter().cloned());
    cmd
}

/// Runs [`pgpitr_cmd`] to its end.
pub fn pgpitr(env: &Env, args: &[&str]) -> Output {
    pgpitr_cmd(env, args).output().unwrap()
}

/// Status, stdout and stderr of `out`, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `pgpitr <args>`, panicking with its output unless it succeeds; returns stdout.
pub fn pgpitr_ok(env: &Env, args: &[&str]) -> String {
    let out = pgpitr(env, args);
    assert!(
        out.status.success(),
        "pgpitr {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
