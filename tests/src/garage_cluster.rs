//! A three-node Garage cluster on loopback with replication factor 3 (every object on every
//! node; reads and writes need a quorum of two), owned by one test: nodes can be killed
//! (`SIGKILL`) and started again. Each node is configured and started by the same code as the
//! single-node server ([`crate::garage::Node`]); the cluster is joined with `garage node
//! connect` and one layout assigning every node to zone `dc1`.

use std::process::Child;
use std::time::{Duration, Instant};

use crate::garage::{self, Node};
use crate::run_ok;

pub struct GarageCluster {
    pub nodes: Vec<Node>,
    children: Vec<Option<Child>>,
    _root: tempfile::TempDir,
}

impl GarageCluster {
    /// Starts `count` nodes with `replication_factor = count`, connects them, applies one
    /// layout and imports the test key.
    pub fn start(count: usize) -> GarageCluster {
        garage::remove_dead_roots();
        let root = garage::new_root();
        let nodes: Vec<Node> = (0..count)
            .map(|i| Node::configure(&root.path().join(format!("node{i}")), count as u32))
            .collect();
        let children = nodes.iter().map(|n| Some(n.spawn())).collect();
        let cluster = GarageCluster {
            nodes,
            children,
            _root: root,
        };
        let ids: Vec<String> = cluster.nodes.iter().map(Node::wait_id).collect();
        let first = &cluster.nodes[0];
        for id in &ids[1..] {
            run_ok(first.cli().args(["node", "connect", id]));
        }
        for id in &ids {
            let key = id.split('@').next().unwrap();
            cluster.retry(|| {
                first
                    .cli()
                    .args(["layout", "assign", "-z", "dc1", "-c", "1G", key])
                    .output()
                    .unwrap()
            });
        }
        run_ok(first.cli().args(["layout", "apply", "--version", "1"]));
        cluster.retry(|| {
            first
                .cli()
                .args(["key", "import", "--yes", "-n", "test"])
                .args([garage::KEY_ID, garage::SECRET])
                .output()
                .unwrap()
        });
        cluster
    }

    /// Runs `op` until it succeeds, for up to 60 s (nodes learn of each other and of the
    /// layout a moment after the command that changed it returns).
    fn retry(&self, op: impl Fn() -> std::process::Output) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = op();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A new bucket (through node 0) that the test key can read and write.
    pub fn bucket(&self) -> String {
        let mut name = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while name.is_none() {
            match std::panic::catch_unwind(|| garage::create_bucket(&self.nodes[0])) {
                Ok(n) => name = Some(n),
                Err(e) if Instant::now() >= deadline => std::panic::resume_unwind(e),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        name.unwrap()
    }

    /// The environment for pgpitr on `s3://bucket/prefix` through node `node`'s S3 API.
    pub fn env(&self, node: usize, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        garage::env_for(&self.nodes[node].endpoint(), bucket, prefix)
    }

    /// Kills node `i` with `SIGKILL`, as a crash or power loss would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its own data and ports, and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} is running");
        self.children[i] = Some(self.nodes[i].spawn());
        self.nodes[i].wait_id();
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}
