//! A real Garage cluster (an S3-compatible object store) on 127.0.0.1, the
//! shared storage tier behind several mirror replicas.
//!
//! [`GarageCluster::start`] runs one `garage server` per node, each with its
//! own config, metadata (SQLite) and data dirs in a [`Scratch`] dir and its
//! own log file. Node 0 connects to the others (`garage node connect`), then
//! one zone per node is assigned and the layout applied, with replication
//! factor `min(3, nodes)`; the cluster is ready once every node reports itself
//! healthy through the admin API. [`GarageCluster::shared`] is one 3-node
//! cluster per test binary; tests sharing it create buckets of their own.
//!
//! Garage only logs the configured address of its listeners, so it cannot be
//! given port 0: each node's ports are taken from the kernel by binding
//! 127.0.0.1:0, and the harness keeps holding them with listeners of its own
//! whenever the node is not running, so that a stopped node gets the same
//! ports back on [`GarageCluster::start_node`] (its peers and clients still
//! know it by them).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::process::{self, Process};
use super::shared;
use super::wait;
use super::workdir::{self, Scratch};

/// The `s3_region` of every cluster.
pub const REGION: &str = "garage";

/// The error when the binary is missing: never a skip (see [`process::tool`]).
pub const INSTALL_HINT: &str = "garage not found: install it with `cargo install garage --version 2.5.0 --locked \
     --no-default-features --features bundled-libs,sqlite` (see .ci/run)";

/// Nodes of a [`GarageCluster`] keep this many copies of every object.
const MAX_REPLICATION_FACTOR: usize = 3;

/// The log levels `garage server` defaults to, set explicitly so that a
/// `RUST_LOG` meant for the mirror does not flood the Garage logs.
const SERVER_LOG: &str = "netapp=info,garage=info";
const CLI_LOG: &str = "netapp=warn,garage=warn";

/// A running Garage cluster; every node is killed on drop.
pub struct GarageCluster {
    name: String,
    binary: PathBuf,
    admin_token: String,
    nodes: Vec<Node>,
    /// Declared before `dir` so that the processes die before their files go.
    states: Mutex<Vec<NodeState>>,
    dir: Scratch,
}

/// A bucket and a key that may read, write and administer it.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// What does not change when a node restarts.
struct Node {
    name: String,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    admin_port: u16,
}

enum NodeState {
    Running(Process),
    /// The node's ports, held while it is not running.
    Stopped(Vec<TcpListener>),
}

/// One node's view of the cluster (`GET /v2/GetClusterHealth`).
#[derive(Debug)]
struct Health {
    status: String,
    storage_nodes: u64,
    storage_nodes_up: u64,
}

impl GarageCluster {
    /// Starts `nodes` Garage nodes on loopback, connects them, assigns a
    /// layout with replication factor `min(3, nodes)` and one zone per node,
    /// applies it and waits until every node reports the cluster healthy.
    /// Its files are named after the running test.
    pub fn start(nodes: usize) -> Result<GarageCluster> {
        GarageCluster::start_named(&workdir::test_scoped("garage"), nodes)
    }

    /// A 3-node cluster started once per test binary and never stopped.
    /// Tests use buckets of their own and must not stop its nodes.
    ///
    /// Panics with the error if the cluster cannot start.
    pub fn shared() -> &'static GarageCluster {
        static SHARED: OnceLock<Result<GarageCluster, String>> = OnceLock::new();
        shared::once(&SHARED, || GarageCluster::start_named("shared-garage", 3))
            .unwrap_or_else(|error| panic!("{error:#}"))
    }

    /// Starts a cluster whose files and logs are named after `name`.
    pub fn start_named(name: &str, nodes: usize) -> Result<GarageCluster> {
        ensure!(nodes > 0, "a Garage cluster needs at least one node");
        let binary = garage_binary()?;
        let dir = Scratch::new(name)?;
        let rpc_secret = random_hex(32)?;
        let admin_token = random_hex(32)?;
        let replication_factor = nodes.min(MAX_REPLICATION_FACTOR);
        let mut configs = Vec::with_capacity(nodes);
        let mut states = Vec::with_capacity(nodes);
        for index in 0..nodes {
            let node_name = format!("{name}-node{index}");
            let node_dir = dir.subdir(&format!("node{index}"))?;
            let listeners = (0..3).map(|_| reserve_port()).collect::<Result<Vec<_>>>()?;
            let ports =
                listeners.iter().map(|listener| Ok(listener.local_addr()?.port())).collect::<Result<Vec<_>>>()?;
            let node = Node {
                log: workdir::log_file(&node_name)?,
                name: node_name,
                config: node_dir.join("garage.toml"),
                s3_port: ports[0],
                rpc_port: ports[1],
                admin_port: ports[2],
            };
            let config = node.config_toml(&node_dir, replication_factor, &rpc_secret, &admin_token);
            std::fs::write(&node.config, config).with_context(|| format!("writing {}", node.config.display()))?;
            configs.push(node);
            states.push(NodeState::Stopped(listeners));
        }
        let cluster = GarageCluster {
            name: name.to_owned(),
            binary,
            admin_token,
            nodes: configs,
            states: Mutex::new(states),
            dir,
        };
        let log_offsets = (0..nodes).map(|index| cluster.spawn_node(index)).collect::<Result<Vec<_>>>()?;
        for (index, since) in log_offsets.into_iter().enumerate() {
            cluster.wait_for_listeners(index, since)?;
        }
        cluster.configure_layout().with_context(|| format!("setting up Garage cluster {name}"))?;
        cluster.wait_until_settled()?;
        Ok(cluster)
    }

    /// How many nodes the cluster has (running or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// S3 endpoint URL of node `node`, e.g. `http://127.0.0.1:39001`.
    pub fn endpoint(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[node].s3_port)
    }

    /// The `s3_region` clients must sign for.
    pub fn region(&self) -> &str {
        REGION
    }

    /// Creates bucket `name` (an S3 bucket name: 3 to 63 characters among
    /// `a-z0-9.-`) and a key with read, write and owner rights on it.
    pub fn create_bucket(&self, name: &str) -> Result<Bucket> {
        let node = self.running_node()?;
        self.cli(node, &["bucket", "create", name]).with_context(|| format!("creating bucket {name}"))?;
        let payload = serde_json::json!({ "name": format!("{name}-key") }).to_string();
        let key = self.cli(node, &["json-api", "CreateKey", &payload])?;
        let key: serde_json::Value =
            serde_json::from_str(&key).with_context(|| format!("CreateKey printed `{key}`"))?;
        let field = |name: &str| {
            key[name].as_str().map(str::to_owned).with_context(|| format!("no `{name}` in CreateKey's answer {key}"))
        };
        let (access_key_id, secret_access_key) = (field("accessKeyId")?, field("secretAccessKey")?);
        self.cli(node, &["bucket", "allow", "--read", "--write", "--owner", name, "--key", &access_key_id])
            .with_context(|| format!("granting key {access_key_id} access to bucket {name}"))?;
        Ok(Bucket { name: name.to_owned(), access_key_id, secret_access_key })
    }

    /// Kills node `node` with SIGKILL, as a crash would. Its data stays for
    /// [`start_node`].
    ///
    /// This does not wait for the other nodes to notice: Garage only does on
    /// its next message to the dead node (status exchange every 10 s, ping
    /// every 15 s), and requests meanwhile succeed on the quorum of the others.
    ///
    /// [`start_node`]: GarageCluster::start_node
    pub fn stop_node(&self, node: usize) -> Result<()> {
        let mut states = self.states();
        let state = states.get_mut(node).with_context(|| format!("no node {node} in {}", self.name))?;
        let NodeState::Running(process) = state else {
            bail!("{} is not running", self.nodes[node].name);
        };
        process.kill();
        // Hold the ports again right away so that nothing else takes them.
        let listeners = self.nodes[node].hold_ports()?;
        *state = NodeState::Stopped(listeners);
        Ok(())
    }

    /// Starts node `node` again on its data and ports, reconnects it with the
    /// running nodes and waits until every running node sees it up.
    pub fn start_node(&self, node: usize) -> Result<()> {
        ensure!(node < self.nodes.len(), "no node {node} in {}", self.name);
        let since = self.spawn_node(node)?;
        self.wait_for_listeners(node, since)?;
        // Without this the others would only retry their connections to it
        // after a backoff of up to 30 s.
        let restarted = self.node_id(node)?;
        for peer in self.running_nodes()?.into_iter().filter(|&peer| peer != node) {
            self.cli(node, &["node", "connect", &self.node_id(peer)?])?;
            self.cli(peer, &["node", "connect", &restarted])?;
        }
        self.wait_until_settled()
    }

    /// Spawns the server of a stopped node, releasing its ports first, and
    /// returns the length its log had before.
    fn spawn_node(&self, index: usize) -> Result<u64> {
        let node = &self.nodes[index];
        let mut states = self.states();
        let NodeState::Stopped(listeners) = &mut states[index] else {
            bail!("{} is already running", node.name);
        };
        listeners.clear();
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&node.config).arg("server").env("RUST_LOG", SERVER_LOG).env("NO_COLOR", "1");
        let since = std::fs::metadata(&node.log)?.len();
        let process = Process::spawn_logged(&node.name, command, &node.log, &node.log)?;
        states[index] = NodeState::Running(process);
        Ok(since)
    }

    /// Waits until the node's RPC, S3 and admin listeners are bound, reading
    /// its log from offset `since` on (the lines of this run).
    fn wait_for_listeners(&self, index: usize, since: u64) -> Result<()> {
        let node = &self.nodes[index];
        let rpc_line = format!("Listening on 127.0.0.1:{}", node.rpc_port);
        let what = format!("{} to listen (log {})", node.name, node.log.display());
        wait::poll(&what, wait::STARTUP_TIMEOUT, || {
            self.check_alive(index)?;
            let log = std::fs::read(&node.log).unwrap_or_default();
            let this_run = String::from_utf8_lossy(log.get(since as usize..).unwrap_or_default());
            let ready = this_run.contains(&rpc_line) && [node.s3_port, node.admin_port].into_iter().all(accepts);
            Ok(ready.then_some(()))
        })
    }

    /// Connects every node to every other one (one way would do, but the
    /// other way round would only come with peer discovery, seconds later),
    /// assigns one zone per node and applies the layout.
    fn configure_layout(&self) -> Result<()> {
        let ids = (0..self.nodes.len()).map(|node| self.node_id(node)).collect::<Result<Vec<_>>>()?;
        for from in 0..ids.len() {
            for (to, id) in ids.iter().enumerate() {
                if to != from {
                    self.cli(from, &["node", "connect", id])?;
                }
            }
        }
        for (index, id) in ids.iter().enumerate() {
            let node_id = id.split('@').next().unwrap_or(id);
            self.cli(0, &["layout", "assign", "-z", &format!("zone{index}"), "-c", "1G", node_id])?;
        }
        self.cli(0, &["layout", "apply", "--version", "1"])?;
        Ok(())
    }

    /// Waits until every running node has the layout and sees exactly the
    /// running nodes up: `healthy` when all are running, `degraded` otherwise.
    fn wait_until_settled(&self) -> Result<()> {
        let what = format!("Garage cluster {} to settle", self.name);
        wait::poll(&what, wait::STARTUP_TIMEOUT, || {
            let running = self.running_nodes()?;
            let expected_status = if running.len() == self.nodes.len() { "healthy" } else { "degraded" };
            for &node in &running {
                let Some(health) = self.health(node) else {
                    return Ok(None);
                };
                let settled = health.status == expected_status
                    && health.storage_nodes == self.nodes.len() as u64
                    && health.storage_nodes_up == running.len() as u64;
                if !settled {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .with_context(|| self.describe_health())
    }

    /// The node's view of the cluster, `None` while its admin API does not answer.
    fn health(&self, node: usize) -> Option<Health> {
        let url = format!("http://127.0.0.1:{}/v2/GetClusterHealth", self.nodes[node].admin_port);
        let mut response =
            AGENT.get(&url).header("Authorization", format!("Bearer {}", self.admin_token)).call().ok()?;
        if response.status() != 200 {
            return None;
        }
        let body: serde_json::Value = serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
        Some(Health {
            status: body["status"].as_str()?.to_owned(),
            storage_nodes: body["storageNodes"].as_u64()?,
            storage_nodes_up: body["storageNodesUp"].as_u64()?,
        })
    }

    /// Every node's view of the cluster and log, for a failed wait.
    fn describe_health(&self) -> String {
        let mut text = String::new();
        for (index, node) in self.nodes.iter().enumerate() {
            text += &format!(
                "{}: {:?}, log {}:\n{}\n",
                node.name,
                self.health(index),
                node.log.display(),
                wait::tail(&node.log, 15)
            );
        }
        text
    }

    /// `<hex node id>@127.0.0.1:<rpc port>`, read from the node's key file.
    fn node_id(&self, node: usize) -> Result<String> {
        Ok(self.cli(node, &["node", "id", "--quiet"])?.trim().to_owned())
    }

    /// Runs `garage -c <node's config> ARGS` and returns its stdout.
    fn cli(&self, node: usize, args: &[&str]) -> Result<String> {
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&self.nodes[node].config).args(args).env("RUST_LOG", CLI_LOG);
        process::run_stdout(&mut command)
    }

    /// Fails with the node's log tail if it is running no more.
    fn check_alive(&self, index: usize) -> Result<()> {
        if let NodeState::Running(process) = &mut self.states()[index]
            && let Some(status) = process.exit_status()?
        {
            let log = &self.nodes[index].log;
            bail!(
                "{} exited ({status}); its log {} ends with:\n{}",
                process.name(),
                log.display(),
                wait::tail(log, 30)
            );
        }
        Ok(())
    }

    /// The nodes that should be running, failing if one of them died.
    fn running_nodes(&self) -> Result<Vec<usize>> {
        let running: Vec<usize> =
            (0..self.nodes.len()).filter(|&node| matches!(self.states()[node], NodeState::Running(_))).collect();
        for &node in &running {
            self.check_alive(node)?;
        }
        Ok(running)
    }

    /// A running node to send admin commands to.
    fn running_node(&self) -> Result<usize> {
        self.running_nodes()?.first().copied().with_context(|| format!("no node of {} is running", self.name))
    }

    fn states(&self) -> MutexGuard<'_, Vec<NodeState>> {
        self.states.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        let logs: Vec<String> = self.nodes.iter().map(|node| node.log.display().to_string()).collect();
        eprintln!("--- Garage cluster {} ({}) logs: {} ---", self.name, self.dir.path().display(), logs.join(" "));
    }
}

impl Node {
    fn config_toml(&self, dir: &Path, replication_factor: usize, rpc_secret: &str, admin_token: &str) -> String {
        let dir = dir.display();
        format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = {replication_factor}
consistency_mode = "consistent"
compression_level = "none"

rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{s3}"
s3_region = "{REGION}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{admin_token}"
"#,
            rpc = self.rpc_port,
            s3 = self.s3_port,
            admin = self.admin_port,
        )
    }

    /// Binds the node's ports so that nothing else takes them while it is down.
    fn hold_ports(&self) -> Result<Vec<TcpListener>> {
        [self.s3_port, self.rpc_port, self.admin_port]
            .into_iter()
            .map(|port| {
                // The killed process's sockets may take a moment to be released.
                wait::poll(&format!("port {port} of {} to be free", self.name), Duration::from_secs(10), || {
                    Ok(TcpListener::bind(("127.0.0.1", port)).ok())
                })
            })
            .collect()
    }
}

/// A port picked by the kernel, held by the returned listener.
fn reserve_port() -> Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").context("reserving a port")
}

fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// `garage` on PATH or in cargo's bin dir, or the error with the install hint.
fn garage_binary() -> Result<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|cargo_home| cargo_home.join("bin"));
    let path = std::env::var_os("PATH");
    find_binary("garage", path.iter().flat_map(std::env::split_paths).chain(cargo_bin))
}

fn find_binary(name: &str, mut dirs: impl Iterator<Item = PathBuf>) -> Result<PathBuf> {
    dirs.find_map(|dir| Some(dir.join(name)).filter(|candidate| candidate.is_file())).context(INSTALL_HINT)
}

/// `bytes` random bytes, hex-encoded.
fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buffer = vec![0; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buffer).context("reading /dev/urandom")?;
    Ok(hex::encode(buffer))
}

static AGENT: LazyLock<ureq::Agent> = LazyLock::new(|| {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_garage_fails_with_the_install_hint() {
        let error = find_binary("garage", std::iter::once(PathBuf::from("/nonexistent"))).unwrap_err().to_string();
        assert!(error.contains("cargo install garage --version 2.5.0"), "{error}");
    }
}
