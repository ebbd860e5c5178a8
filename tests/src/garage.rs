//! A real Garage S3 server on loopback, one per test process, with a fresh bucket per test.
//! The binary comes from `$GARAGE_BIN`, else `~/.cache/pgpitr/garage/bin/garage` (where
//! `scripts/test` installs it), else `garage` on the PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{free_port, run_ok};

/// Fixed test credentials, imported into this throwaway server only.
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "5e1ec7ed0123456789abcdef0123456789abcdef0123456789abcdef01234567";
pub const REGION: &str = "garage";

pub struct Garage {
    pub endpoint: String,
    node: Node,
    _root: tempfile::TempDir,
    child: Mutex<Child>,
}

pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let cached = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/pgpitr/garage/bin/garage");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("garage")
}

impl Garage {
    /// The process-wide server, started on first use.
    pub fn shared() -> &'static Garage {
        static G: OnceLock<Garage> = OnceLock::new();
        G.get_or_init(|| {
            // Ports are picked by binding and releasing them, so another process can take one
            // in between; a loaded machine can also be slow to start it. Try a few times.
            let mut failures = Vec::new();
            for _ in 0..3 {
                match std::panic::catch_unwind(Garage::start) {
                    Ok(g) => return g,
                    Err(e) => failures.push(
                        e.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default(),
                    ),
                }
            }
            panic!("Garage did not start: {failures:?}")
        })
    }

    fn start() -> Garage {
        remove_dead_roots();
        let root = new_root();
        let node = Node::configure(root.path(), 1);
        let child = node.spawn();
        let g = Garage {
            endpoint: node.endpoint(),
            node: node.clone(),
            _root: root,
            child: Mutex::new(child),
        };
        let id = node.wait_id();
        let id = id.split('@').next().unwrap();
        run_ok(
            node.cli()
                .args(["layout", "assign", "-z", "dc1", "-c", "1G", id]),
        );
        run_ok(node.cli().args(["layout", "apply", "--version", "1"]));
        import_test_key(&node);
        g
    }

    /// Creates a new empty bucket that the test key can read and write; returns its name.
    pub fn bucket(&self) -> String {
        create_bucket(&self.node)
    }

    /// A client of this server with the test key, for what pgpitr never does itself (leaving a
    /// multipart upload open, as a killed writer does).
    pub fn client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .endpoint_url(&self.endpoint)
                .force_path_style(true)
                .credentials_provider(Credentials::new(KEY_ID, SECRET, None, None, "test"))
                .build(),
        )
    }

    /// Starts a multipart upload of `key` in `bucket`, uploads one part of `part_len` bytes and
    /// leaves it open, as a writer killed mid-upload does; returns the upload id.
    pub async fn leave_upload_open(&self, bucket: &str, key: &str, part_len: usize) -> String {
        let client = self.client();
        let id = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap()
            .upload_id()
            .unwrap()
            .to_string();
        client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(&id)
            .part_number(1)
            .body(vec![7u8; part_len].into())
            .send()
            .await
            .unwrap();
        id
    }

    /// The environment that points pgpitr at `s3://bucket/prefix` on this server, with the
    /// credentials in the standard AWS variables (never in a config file or argv).
    pub fn env(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        env_for(&self.endpoint, bucket, prefix)
    }
}

/// The environment that points pgpitr at `s3://bucket/prefix` on the S3 API at `endpoint`, with
/// the test credentials in the standard AWS variables (never in a config file or argv).
pub fn env_for(endpoint: &str, bucket: &str, prefix: &str) -> Vec<(String, String)> {
    [
        ("PGPITR_REPO", format!("s3://{bucket}/{prefix}")),
        ("PGPITR_S3_ENDPOINT", endpoint.to_string()),
        ("PGPITR_S3_REGION", REGION.to_string()),
        ("PGPITR_S3_FORCE_PATH_STYLE", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// One Garage node: its directory (metadata, data, config, log) and loopback ports. The single
/// server and each node of a [`crate::garage_cluster::GarageCluster`] are made by the same code.
#[derive(Debug, Clone)]
pub struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub rpc_port: u16,
    pub s3_port: u16,
}

impl Node {
    /// Writes the configuration of a node in `dir` (created) for a cluster of
    /// `replication_factor` copies; every node shares the test `rpc_secret`.
    pub fn configure(dir: &Path, replication_factor: u32) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{r}/meta\"\ndata_dir = \"{r}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = {replication_factor}\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                r = dir.display(),
                secret = "ab".repeat(32),
            ),
        )
        .unwrap();
        Node {
            dir: dir.to_path_buf(),
            config,
            rpc_port: rpc,
            s3_port: s3,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("garage.log")
    }

    /// Starts `garage server` for this node (its log appended to [`Node::log_path`]), killed
    /// when the test process exits.
    pub fn spawn(&self) -> Child {
        let binary = binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        spawn_tied_to_process(
            Command::new(&binary)
                .arg("-c")
                .arg(&self.config)
                .arg("server")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap_or_else(|e| {
            panic!(
                "starting Garage ({}): {e}; run scripts/test, which installs it",
                binary.display()
            )
        })
    }

    /// The `garage` CLI talking to this node.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(binary());
        c.arg("-c").arg(&self.config).env("RUST_LOG", "warn");
        c
    }

    /// Waits up to 60 s for the node to answer; returns its full id (`<key>@127.0.0.1:<port>`).
    pub fn wait_id(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.cli().args(["node", "id", "-q"]).output().unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "Garage did not start: {}; log: {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Imports the fixed test key through `node`.
pub fn import_test_key(node: &Node) {
    run_ok(
        node.cli()
            .args(["key", "import", "--yes", "-n", "test", KEY_ID, SECRET]),
    );
}

/// Creates, through `node`, a new empty bucket that the test key can read and write; returns
/// its name.
pub fn create_bucket(node: &Node) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    run_ok(node.cli().args(["bucket", "create", &name]));
    run_ok(node.cli().args([
        "bucket", "allow", "--read", "--write", "--owner", &name, "--key", "test",
    ]));
    name
}

/// A fresh Garage root directory under the temporary directory, recording this process as its
/// owner so that [`remove_dead_roots`] removes it once the process is gone.
pub fn new_root() -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix(ROOT_PREFIX)
        .tempdir()
        .unwrap();
    std::fs::write(root.path().join(OWNER_FILE), std::process::id().to_string()).unwrap();
    root
}

const ROOT_PREFIX: &str = "pgpitr-garage-";
/// Holds the pid of the test process that owns a Garage directory.
const OWNER_FILE: &str = "owner.pid";

/// Deletes the Garage directories of test processes that have exited. The shared server is a
/// static, never dropped, so its directory outlives its process; the next start cleans up.
pub fn remove_dead_roots() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(ROOT_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let dead = match owner {
            Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            // From before owners were recorded: dead if untouched for an hour.
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600),
        };
        if dead {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Spawns `cmd` so that it is killed when this test process exits: statics are never dropped, so
/// the child gets `PR_SET_PDEATHSIG`, which fires when the spawning *thread* ends — hence a
/// thread that lives as long as the process.
pub fn spawn_tied_to_process(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let cmd = std::mem::replace(cmd, Command::new("true"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut cmd = cmd;
        tx.send(cmd.spawn()).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap()
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
        }
    }
}
