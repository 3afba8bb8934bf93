//! A real demo cluster for end-to-end rollout tests: one `patchd` agent per node on `127.0.1.k` (process backend),
//! `demo-master`/`demo-worker` services deployed as tiup lays them out, a topology with the demo's cluster-API hooks
//! imported into a fresh controller home, and helpers to build hotfix packages, read the master's call log, steer
//! its drain behaviour, and run `patchctl` in the background (for Ctrl-C and SIGKILL).
//!
//! ```no_run
//! use patchd_e2e::cluster_fixture::{ClusterFixture, FixtureOptions};
//! let dir = tempfile::tempdir().unwrap();
//! let cluster = ClusterFixture::start(dir.path(), FixtureOptions { masters: 1, workers: 3, ..Default::default() });
//! // (the same as `ClusterFixture::with_workers(dir.path(), 3)`)
//! let package = cluster.worker_package("v1.0.1-hotfix", "ok");
//! let out = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
//! assert!(out.status.success());
//! ```
//!
//! Every process started here is killed on drop: agents first (so nothing restarts a service), then the
//! services found through the agents' pid files (their whole process group).

use crate::{AgentConfig, AgentProcess, Pki, bin, toml_string, wait_for};
use serde::Deserialize;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Version label of the services as first deployed.
pub const ORIGINAL_VERSION: &str = "v1.0.0";

/// How the cluster is built.
#[derive(Debug, Clone)]
pub struct FixtureOptions {
    /// Number of demo masters (1 or 2; the first, `master-1`, leads while alive).
    pub masters: usize,
    /// Number of demo workers (at least 2: the master refuses to drain the last available worker).
    pub workers: usize,
    /// Timeout of the `wait_offline` hook (the drain timeout).
    pub drain_timeout: Duration,
    /// First host number: node i runs on `127.0.1.<first_host + i>`.
    pub first_host: u8,
    /// The agent's health probation of a service (`min_healthy`).
    pub min_healthy: Duration,
    /// Fake tasks handed to workers by the master.
    pub tasks: usize,
    /// Raw TOML appended to every agent's patchd.toml (e.g. a `[trust]` section).
    pub agent_extra: String,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        Self {
            masters: 1,
            workers: 3,
            drain_timeout: Duration::from_secs(10),
            first_host: 1,
            min_healthy: Duration::from_millis(500),
            tasks: 2,
            agent_extra: String::new(),
        }
    }
}

/// Role of a fixture node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// `demo-master`.
    Master,
    /// `demo-worker`.
    Worker,
}

impl NodeRole {
    /// Component, role and service name.
    pub fn component(self) -> &'static str {
        match self {
            NodeRole::Master => "demo-master",
            NodeRole::Worker => "demo-worker",
        }
    }
}

/// One node: a service and the agent that manages it.
#[derive(Debug, Clone)]
pub struct FixtureNode {
    /// `master-1`, `worker-2`…
    pub name: String,
    /// Role.
    pub role: NodeRole,
    /// `127.0.1.k`.
    pub host: String,
    /// Service port.
    pub port: u16,
    /// The agent's directory (config, state, deploy root).
    pub agent_dir: PathBuf,
    /// The service's deploy directory.
    pub deploy_dir: PathBuf,
}

impl FixtureNode {
    /// Node ID in the topology (`host:port`).
    pub fn id(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.agent_dir.join("state")
    }

    /// The service's output, appended by the agent across restarts.
    pub fn service_log(&self) -> PathBuf {
        self.state_dir()
            .join("logs")
            .join(format!("{}.log", self.role.component()))
    }

    /// How many times the agent started the service (its `--- patchd …: starting` log lines).
    pub fn start_count(&self) -> usize {
        std::fs::read_to_string(self.service_log())
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("--- patchd") && line.contains(": starting"))
            .count()
    }
}

/// `GET /version` of a demo service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceVersion {
    /// Stamped version label.
    pub version: String,
    /// Stamped mode.
    pub mode: String,
    /// Process id.
    pub pid: u32,
    /// Start time (Unix seconds).
    pub started_unix: u64,
}

/// One entry of the master's call log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MasterCall {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The member it is about.
    pub member: Option<String>,
}

/// The running cluster.
pub struct ClusterFixture {
    /// Cluster name as imported.
    pub name: String,
    /// The fixture directory.
    pub dir: PathBuf,
    /// Controller home with the cluster CA.
    pub pki: Pki,
    /// Masters first, then workers.
    pub nodes: Vec<FixtureNode>,
    agents: Vec<Option<AgentProcess>>,
    /// The imported topology file.
    pub topology_path: PathBuf,
    master_base: PathBuf,
    worker_base: PathBuf,
}

/// A loopback port free right now on `host`.
pub fn free_port(host: &str) -> u16 {
    let listener =
        TcpListener::bind((host, 0)).unwrap_or_else(|e| panic!("cannot bind {host}:0: {e}"));
    listener
        .local_addr()
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("no local address: {e}"))
}

/// Copies a demo binary with a version label and mode stamped into it (`demo-* stamp`).
pub fn stamp(component: &str, version: &str, mode: &str, out: &Path) {
    stamp_with_delay(component, version, mode, 0, out);
}

/// [`stamp`] with the start delay of mode `slow-start`.
pub fn stamp_with_delay(component: &str, version: &str, mode: &str, delay_ms: u64, out: &Path) {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    let output = Command::new(bin(component))
        .args([
            "stamp",
            "--version",
            version,
            "--mode",
            mode,
            "--delay-ms",
            &delay_ms.to_string(),
            "--out",
        ])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {component} stamp: {e}"));
    assert!(
        output.status.success(),
        "{component} stamp failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`, clock ticks since boot).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    patchd_procstat::start_ticks(pid)
}

/// A blocking HTTP call on loopback: (status, body).
pub fn http(method: &str, url: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut request = client.request(method, url);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| e.to_string())?;
        Ok((status, text))
    })
}

/// An exit code with stdout and stderr, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl ClusterFixture {
    /// [`ClusterFixture::start`] with one master, `workers` workers and the other options at their defaults.
    pub fn with_workers(dir: &Path, workers: usize) -> Self {
        Self::start(
            dir,
            FixtureOptions {
                masters: 1,
                workers,
                ..Default::default()
            },
        )
    }

    /// Builds and starts the cluster, waits until every service is up and every worker registered, and imports
    /// the topology as cluster `c` into a fresh controller home.
    pub fn start(dir: &Path, options: FixtureOptions) -> Self {
        assert!((1..=2).contains(&options.masters), "1 or 2 masters");
        assert!(options.workers >= 1, "at least one worker");
        let pki = Pki::new(dir);
        let mut nodes = Vec::new();
        let roles = std::iter::repeat_n(NodeRole::Master, options.masters)
            .chain(std::iter::repeat_n(NodeRole::Worker, options.workers));
        let mut per_role = [0usize; 2];
        for (index, role) in roles.enumerate() {
            let counter = &mut per_role[usize::from(role == NodeRole::Worker)];
            *counter += 1;
            let name = match role {
                NodeRole::Master => format!("master-{counter}"),
                NodeRole::Worker => format!("worker-{counter}"),
            };
            let host = format!("127.0.1.{}", usize::from(options.first_host) + index);
            let port = free_port(&host);
            let agent_dir = dir.join(format!("host-{}-{name}", index + 1));
            let deploy_dir = agent_dir
                .join("deploy")
                .join(format!("{}-{port}", role.component()));
            nodes.push(FixtureNode {
                name,
                role,
                host,
                port,
                agent_dir,
                deploy_dir,
            });
        }

        // The original v1.0.0 binaries, deployed as tiup does, and packed as the bases of hotfixes.
        let originals = dir.join("originals");
        let mut bases = Vec::new();
        for role in [NodeRole::Master, NodeRole::Worker] {
            let component = role.component();
            let tree = originals.join("tree").join(component);
            stamp(component, ORIGINAL_VERSION, "ok", &tree.join(component));
            let base = originals.join(format!(
                "{component}-{ORIGINAL_VERSION}-linux-x86_64.tar.gz"
            ));
            patchd_package::pack_dir(&tree, ORIGINAL_VERSION, &base)
                .unwrap_or_else(|e| panic!("cannot pack the original {component}: {e}"));
            bases.push(base);
        }
        let master_urls: Vec<String> = nodes
            .iter()
            .filter(|n| n.role == NodeRole::Master)
            .map(FixtureNode::url)
            .collect();
        let mut agents = Vec::new();
        for (index, node) in nodes.iter().enumerate() {
            let component = node.role.component();
            let binary = node.deploy_dir.join("bin").join(component).join(component);
            std::fs::create_dir_all(binary.parent().unwrap_or(&node.deploy_dir))
                .unwrap_or_else(|e| panic!("cannot create the deploy dir of {}: {e}", node.name));
            std::fs::copy(
                originals.join("tree").join(component).join(component),
                &binary,
            )
            .unwrap_or_else(|e| panic!("cannot deploy {}: {e}", node.name));
            let mut command = vec![
                format!("{{deploy_dir}}/bin/{component}/{component}"),
                "serve".to_string(),
                "--listen".to_string(),
                format!("{}:{}", node.host, node.port),
                "--name".to_string(),
                node.name.clone(),
            ];
            match node.role {
                NodeRole::Master => {
                    for peer in nodes
                        .iter()
                        .filter(|p| p.role == NodeRole::Master && p.name != node.name)
                    {
                        command.push("--peer".to_string());
                        command.push(format!("{}={}", peer.name, peer.url()));
                    }
                    command.push("--tasks".to_string());
                    command.push(options.tasks.to_string());
                }
                NodeRole::Worker => {
                    for url in &master_urls {
                        command.push("--master".to_string());
                        command.push(url.clone());
                    }
                }
            }
            let argv: Vec<String> = command.iter().map(|arg| toml_string(arg)).collect();
            let service = format!(
                "[[service]]\nname = \"{component}\"\ncomponent = \"{component}\"\ndeploy_dir = {}\nbackend = \"process\"\n\
                 command = [{}]\nuser = \"root\"\nrestart_on_crash = true\nstop_timeout = \"5s\"\n\n[service.health]\nmin_healthy = \"{}ms\"\n\
                 http = \"{}/health\"\ntimeout = \"15s\"\n",
                toml_string(&node.deploy_dir.to_string_lossy()),
                argv.join(", "),
                options.min_healthy.as_millis(),
                node.url()
            );
            let tls = pki.issue_agent(&format!("agent-{}", index + 1), &[&node.host]);
            let config = AgentConfig::new(&node.agent_dir, &tls)
                .listen(&format!("{}:0", node.host))
                .deploy_roots(&[&node.agent_dir.join("deploy")])
                .extra(&service)
                .extra(&options.agent_extra)
                .write();
            agents.push(Some(AgentProcess::start(&config)));
        }
        let fixture = Self {
            name: "c".to_string(),
            dir: dir.to_path_buf(),
            pki,
            nodes,
            agents,
            topology_path: dir.join("topology.yaml"),
            master_base: bases[0].clone(),
            worker_base: bases[1].clone(),
        };
        for node in &fixture.nodes {
            wait_for(
                Duration::from_secs(60),
                &format!("{} to serve", node.name),
                || {
                    matches!(
                        http("GET", &format!("{}/health", node.url()), None),
                        Ok((200, _))
                    )
                },
            );
        }
        let workers: Vec<&FixtureNode> = fixture.workers().collect();
        wait_for(
            Duration::from_secs(60),
            "every worker to register with the master",
            || {
                workers.iter().all(|worker| {
                    fixture
                        .member_state(&worker.name)
                        .is_some_and(|state| state != "Down")
                })
            },
        );
        std::fs::write(&fixture.topology_path, fixture.topology_yaml(&options))
            .unwrap_or_else(|e| panic!("cannot write the topology: {e}"));
        let topology = fixture.topology_path.to_string_lossy().into_owned();
        fixture.patchctl_ok(&["cluster", "import", &fixture.name, &topology]);
        fixture
    }

    fn topology_yaml(&self, options: &FixtureOptions) -> String {
        let drain = format!("{}ms", options.drain_timeout.as_millis());
        let leader = "http://{demo-master.leader.host}:{demo-master.leader.port}";
        let mut text = format!(
            "name: {}\nversion: {ORIGINAL_VERSION}\nagent:\n  port: 7480\n  tls_dir: {}\nroles:\n  demo-master:\n    hooks:\n\
             \x20     health: {{ url: \"http://{{host}}:{{port}}/health\", interval: 100ms, timeout: 15s }}\n\
             \x20     leader: {{ url: \"http://{{host}}:{{port}}/api/leader\", field: leader, timeout: 3s }}\n    nodes:\n",
            self.name,
            serde_json::Value::String(self.pki.tls_dir().to_string_lossy().into_owned())
        );
        let node_line = |node: &FixtureNode, agent_port: u16| {
            format!(
                "      - {{ host: {}, port: {}, name: {}, agent_port: {agent_port}, deploy_dir: {}, data_dir: {} }}\n",
                node.host,
                node.port,
                node.name,
                serde_json::Value::String(node.deploy_dir.to_string_lossy().into_owned()),
                serde_json::Value::String(
                    node.agent_dir.join("data").to_string_lossy().into_owned()
                ),
            )
        };
        for (index, node) in self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.role == NodeRole::Master)
        {
            text.push_str(&node_line(node, self.agent_port(index)));
        }
        text.push_str(&format!(
            "  demo-worker:\n    hooks:\n\
             \x20     offline: {{ method: POST, url: \"{leader}/api/members/{{name}}/offline\", timeout: 5s }}\n\
             \x20     wait_offline: {{ url: \"{leader}/api/members/{{name}}\", field: state, equals: Offline, interval: 100ms, timeout: {drain} }}\n\
             \x20     online: {{ method: POST, url: \"{leader}/api/members/{{name}}/online\", timeout: 5s }}\n\
             \x20     wait_online: {{ url: \"{leader}/api/members/{{name}}\", field: state, not_equals: Offline, interval: 100ms, timeout: 10s }}\n\
             \x20     health: {{ url: \"http://{{host}}:{{port}}/health\", interval: 100ms, timeout: 15s }}\n    nodes:\n"
        ));
        for (index, node) in self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.role == NodeRole::Worker)
        {
            text.push_str(&node_line(node, self.agent_port(index)));
        }
        text
    }

    fn agent_port(&self, index: usize) -> u16 {
        self.agents[index]
            .as_ref()
            .map_or(0, |agent| agent.addr.port())
    }

    /// The workers.
    pub fn workers(&self) -> impl Iterator<Item = &FixtureNode> {
        self.nodes
            .iter()
            .filter(|node| node.role == NodeRole::Worker)
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> &FixtureNode {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The agent of a node (None once killed).
    pub fn agent(&mut self, name: &str) -> Option<&mut AgentProcess> {
        let index = self.index(name);
        self.agents[index].as_mut()
    }

    /// SIGKILLs the agent of a node (its service keeps running: it is in its own process group).
    pub fn kill_agent(&mut self, name: &str) {
        let index = self.index(name);
        if let Some(mut agent) = self.agents[index].take() {
            agent.kill();
        }
    }

    /// A hotfix of demo-worker: the original package with the binary re-stamped as `version` / `mode`
    /// (`ok`, `crash`, `fail-health`, `slow-start`), plus `extra` files (`(path in package, local file)`).
    pub fn worker_package_with(
        &self,
        version: &str,
        mode: &str,
        extra: &[(String, PathBuf)],
    ) -> PathBuf {
        self.package(NodeRole::Worker, version, mode, 0, extra)
    }

    /// A demo-worker hotfix that sleeps `delay_ms` before it listens (a slow restart).
    pub fn worker_package_slow(&self, version: &str, delay_ms: u64) -> PathBuf {
        self.package(NodeRole::Worker, version, "slow-start", delay_ms, &[])
    }

    /// [`ClusterFixture::worker_package_with`] without extra files.
    pub fn worker_package(&self, version: &str, mode: &str) -> PathBuf {
        self.package(NodeRole::Worker, version, mode, 0, &[])
    }

    /// A hotfix of demo-master.
    pub fn master_package(&self, version: &str, mode: &str) -> PathBuf {
        self.package(NodeRole::Master, version, mode, 0, &[])
    }

    fn package(
        &self,
        role: NodeRole,
        version: &str,
        mode: &str,
        delay_ms: u64,
        extra: &[(String, PathBuf)],
    ) -> PathBuf {
        let component = role.component();
        let work = self
            .dir
            .join("packages")
            .join(format!("{component}-{version}-{mode}"));
        let binary = work.join(component);
        stamp_with_delay(component, version, mode, delay_ms, &binary);
        let base = match role {
            NodeRole::Master => &self.master_base,
            NodeRole::Worker => &self.worker_base,
        };
        let out = self
            .dir
            .join("packages")
            .join(format!("{component}-{version}-{mode}-linux-x86_64.tar.gz"));
        patchd_package::build_with(
            &patchd_package::BuildSpec {
                base,
                replacements: &[(format!("{component}/{component}"), binary)],
                additions: extra,
                version: Some(version),
            },
            &out,
        )
        .unwrap_or_else(|e| panic!("cannot build the {component} hotfix: {e}"));
        out
    }

    /// `GET /version` of a node's service.
    pub fn version_of(&self, name: &str) -> Option<ServiceVersion> {
        let (status, body) =
            http("GET", &format!("{}/version", self.node(name).url()), None).ok()?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    fn master_url(&self) -> String {
        self.nodes
            .iter()
            .find(|node| node.role == NodeRole::Master)
            .map(FixtureNode::url)
            .unwrap_or_default()
    }

    /// A worker's state as the first master reports it (`Free`, `Bound`, `Offline`, `Down`).
    pub fn member_state(&self, worker: &str) -> Option<String> {
        let (status, body) = http(
            "GET",
            &format!("{}/api/members/{worker}", self.master_url()),
            None,
        )
        .ok()?;
        if status != 200 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        value.get("state")?.as_str().map(str::to_string)
    }

    /// The first master's call log (offline/online and member reads).
    pub fn master_calls(&self) -> Vec<MasterCall> {
        let (_, body) = http(
            "GET",
            &format!("{}/api/_test/calls", self.master_url()),
            None,
        )
        .unwrap_or_else(|e| panic!("cannot read the master's call log: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("bad call log {body}: {e}"))
    }

    /// `GET /version` of every worker, in order; panics when one does not answer.
    pub fn worker_versions(&self) -> Vec<ServiceVersion> {
        self.workers()
            .map(|worker| {
                self.version_of(&worker.name)
                    .unwrap_or_else(|| panic!("{} does not serve /version", worker.name))
            })
            .collect()
    }

    /// Whether the first master's call log holds `METHOD PATH`.
    pub fn master_called(&self, method: &str, path: &str) -> bool {
        self.master_calls()
            .iter()
            .any(|call| call.method == method && call.path == path)
    }

    /// Waits (up to `timeout`) until the rollout asked the master to drain `worker` (`POST …/offline`).
    pub fn wait_drain_started(&self, worker: &str, timeout: Duration) {
        let path = format!("/api/members/{worker}/offline");
        wait_for(timeout, &format!("{worker}'s drain to start"), || {
            self.master_called("POST", &path)
        });
    }

    /// Waits (up to `timeout`) until the master no longer reports `worker` as `Offline`.
    pub fn wait_back_online(&self, worker: &str, timeout: Duration) {
        wait_for(timeout, &format!("{worker} back online"), || {
            self.member_state(worker)
                .is_some_and(|state| state != "Offline")
        });
    }

    /// Steers `POST …/offline` on every master: `normal`, `refuse`, `never`, or `delay` (then `delay_ms`).
    pub fn set_drain(&self, mode: &str, delay_ms: u64) {
        for master in self
            .nodes
            .iter()
            .filter(|node| node.role == NodeRole::Master)
        {
            let body = format!("{{\"mode\":\"{mode}\",\"delay_ms\":{delay_ms}}}");
            let (status, answer) = http(
                "POST",
                &format!("{}/api/_test/drain", master.url()),
                Some(&body),
            )
            .unwrap_or_else(|e| panic!("cannot set the drain mode: {e}"));
            assert!(
                (200..300).contains(&status),
                "drain mode refused: {status} {answer}"
            );
        }
    }

    /// Runs `patchctl` with this cluster's home.
    pub fn patchctl(&self, args: &[&str]) -> Output {
        crate::patchctl(self.pki.home(), args)
    }

    /// Runs `patchctl`, panics unless it exits 0, returns stdout.
    pub fn patchctl_ok(&self, args: &[&str]) -> String {
        crate::patchctl_ok(self.pki.home(), args)
    }

    /// Starts `patchctl` in the background; its stdout and stderr go to `<dir>/<label>.out|.err`.
    pub fn spawn_patchctl(&self, label: &str, args: &[&str]) -> Background {
        Background::spawn(self.pki.home(), &self.dir, label, args)
    }
}

impl Drop for ClusterFixture {
    fn drop(&mut self) {
        // Agents first, so none restarts a service killed below.
        self.agents.clear();
        for node in &self.nodes {
            let pid_file = node
                .state_dir()
                .join("run")
                .join(format!("{}.pid", node.role.component()));
            let Ok(text) = std::fs::read_to_string(&pid_file) else {
                continue;
            };
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let Some(pid) = record
                .get("pid")
                .and_then(serde_json::Value::as_i64)
                .and_then(|p| i32::try_from(p).ok())
            else {
                continue;
            };
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A `patchctl` running in the background; SIGKILLed on drop.
pub struct Background {
    child: Option<Child>,
    /// Its stdout file.
    pub stdout: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
}

impl Background {
    /// Starts `patchctl args` with `PATCHCTL_HOME=home`; its stdout and stderr go to `<dir>/<label>.out|.err`.
    pub fn spawn(home: &Path, dir: &Path, label: &str, args: &[&str]) -> Background {
        let stdout = dir.join(format!("{label}.out"));
        let stderr = dir.join(format!("{label}.err"));
        let open = |path: &Path| {
            std::fs::File::create(path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        let child = Command::new(bin("patchctl"))
            .args(args)
            .env("PATCHCTL_HOME", home)
            .env_remove("PATCHCTL_LOG")
            .stdin(Stdio::null())
            .stdout(open(&stdout))
            .stderr(open(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start patchctl: {e}"));
        Background {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// Sends a signal (`SIGINT` for Ctrl-C, `SIGKILL` for a crash).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Waits for the exit (panics after `timeout`); returns the exit code (None when killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "patchctl did not exit within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// What it printed on stdout so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What it printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Both outputs, labelled, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout_text(),
            self.stderr_text()
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
