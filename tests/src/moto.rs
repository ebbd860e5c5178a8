//! A moto S3 server (`moto_server`, from PyPI's `moto[server]`) on loopback, one per test: the
//! S3 server here that implements Object Lock (Garage does not). `scripts/test` installs it
//! into a cached virtual environment and exports `MOTO_SERVER_BIN`; without it a test that
//! needs it fails (never skips), saying how to install it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

use crate::free_port;

/// Throwaway credentials: moto accepts any.
pub const KEY_ID: &str = "AKIAMOTOTESTKEY00001";
pub const SECRET: &str = "motosecretmotosecretmotosecretmotosecret";
pub const REGION: &str = "us-east-1";

/// `$MOTO_SERVER_BIN`, else where `scripts/test` installs it.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MOTO_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let cached = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/pgpitr/moto/bin/moto_server");
    assert!(
        cached.exists(),
        "moto_server not found: set MOTO_SERVER_BIN, or run `scripts/test --setup-only`, which installs moto[server] from PyPI into {}",
        cached.display()
    );
    cached
}

/// A running `moto_server`, killed on drop.
pub struct Moto {
    pub endpoint: String,
    child: Child,
}

impl Moto {
    /// Starts a server on a free loopback port and waits until it answers.
    pub fn start() -> Moto {
        let bin = binary();
        // A port picked by binding and releasing it can be taken in between: try a few.
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut moto = Moto {
                endpoint: format!("http://127.0.0.1:{port}"),
                child,
            };
            if moto.wait_ready(port) {
                return moto;
            }
        }
        panic!("moto_server did not start (three ports tried)");
    }

    /// Whether the server answers on `port` within a minute (false when it exited first).
    fn wait_ready(&mut self, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// A client of this server, for what pgpitr never does itself (making buckets, acting as
    /// an attacker holding the bucket's credentials).
    pub fn client(&self) -> aws_sdk_s3::Client {
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

    /// Creates bucket `name`, with Object Lock enabled (and so versioning) when `locked`.
    pub async fn bucket(&self, name: &str, locked: bool) {
        self.client()
            .create_bucket()
            .bucket(name)
            .object_lock_enabled_for_bucket(locked)
            .send()
            .await
            .unwrap();
    }

    /// The environment naming `s3://bucket/prefix` on this server with the test credentials.
    pub fn env(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        [
            ("PGPITR_REPO", format!("s3://{bucket}/{prefix}")),
            ("PGPITR_S3_ENDPOINT", self.endpoint.clone()),
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
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
