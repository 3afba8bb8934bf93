//! Fault drills on the demo fleet (`patchctl demo up`, a temporary `PATCHCTL_HOME`, `demo down` on drop):
//!
//! * a hotfix whose worker crashes on start: the agent reverts it, the rollout halts (exit 3), `display` shows
//!   every node up on the original version, and the master still lists every worker;
//! * one agent host cut off mid-rollout: that host lives in a network namespace joined to the host by a veth
//!   pair with a link-local /30 created by the test; its link goes down when the rollout reaches it, the rollout
//!   reports it unreachable and halts, every other node stays consistent and the audit records are intact
//!   (without network namespaces, the drill SIGKILLs that agent instead and says so). An `unreachable` route for
//!   the /30 (higher metric than the veth's) makes traffic to the cut-off host fail locally while its link is down,
//!   instead of following the default route off the machine;
//! * `patchctl patch` SIGKILLed while an agent applies, then `patchctl patch --resume demo`: every worker ends
//!   patched and none restarted twice.
//!
//! Each drill uses its own address prefix (`127.0.79`, `127.0.80`, `127.0.81`), so they run in parallel with each
//! other and with the quickstart test (`127.0.77`).

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use patchd_e2e::cluster_fixture::{Background, http, stamp_with_delay};
use patchd_e2e::{bin, patchctl, patchctl_ok, sha256_file, toml_string, wait_for};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ORIGINAL: &str = "v1.0.0";
const WORKER_PORT: u16 = 8262;
const MASTER_PORT: u16 = 8261;
const AGENT_PORT: u16 = 7480;

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Live processes whose executable lies under `dir`.
fn processes_running_under(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
        })
        .filter(|pid| pid_alive(*pid))
        .collect()
}

/// SIGKILLs the service recorded in an agent's `run/<service>.pid` (its whole process group).
fn kill_recorded_service(state_dir: &Path, service: &str) {
    let Ok(text) = std::fs::read_to_string(state_dir.join("run").join(format!("{service}.pid")))
    else {
        return;
    };
    let pid = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["pid"].as_i64())
        .and_then(|p| i32::try_from(p).ok());
    if let Some(pid) = pid.filter(|pid| *pid > 1 && pid_alive(*pid)) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn get_json(url: &str) -> Value {
    let (status, body) = http("GET", url, None).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

/// A demo fleet in a temporary directory with its own controller home; `demo down` (then SIGKILL of anything
/// left from the demo directory) on drop.
struct Fleet {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    dir: PathBuf,
    prefix: &'static str,
    nodes: usize,
}

impl Fleet {
    fn up(prefix: &'static str, nodes: usize) -> Fleet {
        let _ = bin("patchd");
        let _ = bin("demo-master");
        let _ = bin("demo-worker");
        let tmp = tempfile::tempdir().unwrap();
        let fleet = Fleet {
            home: tmp.path().join("home"),
            dir: tmp.path().join("demo"),
            _tmp: tmp,
            prefix,
            nodes,
        };
        let started = Instant::now();
        let nodes = nodes.to_string();
        let up = fleet.demo(&["up", "--nodes", &nodes, "--hosts-prefix", prefix]);
        assert!(up.status.success(), "demo up: {}", text(&up));
        eprintln!(
            "demo up ({nodes} nodes on {prefix}) took {:.1}s",
            started.elapsed().as_secs_f64()
        );
        fleet
    }

    fn demo(&self, args: &[&str]) -> Output {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut full = vec!["demo"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--dir", &dir]);
        patchctl(&self.home, &full)
    }

    fn patchctl(&self, args: &[&str]) -> Output {
        patchctl(&self.home, args)
    }

    fn patchctl_ok(&self, args: &[&str]) -> String {
        patchctl_ok(&self.home, args)
    }

    /// `patchctl` in the background, output to `<dir>/<label>.out|.err`.
    fn spawn_patchctl(&self, label: &str, args: &[&str]) -> Background {
        Background::spawn(&self.home, &self.dir, label, args)
    }

    fn master_url(&self) -> String {
        format!("http://{}.1:{MASTER_PORT}", self.prefix)
    }

    /// Worker names and their host numbers (one master below 6 hosts: workers on hosts 2..=N).
    fn workers(&self) -> Vec<(String, usize)> {
        (2..=self.nodes)
            .map(|host| (format!("worker-{}", host - 1), host))
            .collect()
    }

    fn worker_addr(&self, host: usize) -> String {
        format!("{}.{host}:{WORKER_PORT}", self.prefix)
    }

    /// `GET /version` of the worker on host `host`.
    fn worker_version(&self, host: usize) -> Value {
        get_json(&format!("http://{}/version", self.worker_addr(host)))
    }

    fn host_dir(&self, host: usize) -> PathBuf {
        self.dir.join("hosts").join(format!("host-{host}"))
    }

    /// How many times the agent of `host` started its service (`--- patchd …: starting` lines of its log).
    fn start_count(&self, host: usize) -> usize {
        let log = self.host_dir(host).join("state/logs/demo-worker.log");
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("--- patchd") && line.contains(": starting"))
            .count()
    }

    /// The original (v1.0.0) worker binary the demo deployed, and its release package.
    fn original_worker(&self) -> (PathBuf, PathBuf) {
        let packages = self.dir.join("packages");
        let package = packages.join(format!(
            "demo-worker-{ORIGINAL}-{}-{}.tar.gz",
            std::env::consts::OS,
            std::env::consts::ARCH
        ));
        (packages.join(".src/demo-worker/demo-worker"), package)
    }

    /// A hotfix of the worker built with `patchctl package build` from the release package: the binary stamped
    /// `version` / `mode` (`ok`, `crash`, `slow-start` with `delay_ms`).
    fn worker_hotfix(&self, version: &str, mode: &str, delay_ms: u64) -> PathBuf {
        let binary = self.dir.join("drill").join(version).join("demo-worker");
        stamp_with_delay("demo-worker", version, mode, delay_ms, &binary);
        let (_, base) = self.original_worker();
        let out = self
            .dir
            .join("drill")
            .join(format!("demo-worker-{version}.tar.gz"));
        self.patchctl_ok(&[
            "package",
            "build",
            "--base",
            base.to_str().unwrap(),
            "--replace",
            &format!("demo-worker/demo-worker={}", binary.display()),
            "--version",
            version,
            "-o",
            out.to_str().unwrap(),
        ]);
        out
    }

    /// Members as the master lists them: name → state.
    fn members(&self) -> Vec<(String, String)> {
        get_json(&format!("{}/api/members", self.master_url()))
            .as_array()
            .unwrap_or_else(|| panic!("members is not a list"))
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn member_state(&self, name: &str) -> Option<String> {
        self.members()
            .into_iter()
            .find(|(member, _)| member == name)
            .map(|(_, state)| state)
    }

    /// POST calls the master recorded (`/api/members/<name>/offline|online`).
    fn master_posts(&self) -> Vec<String> {
        get_json(&format!("{}/api/_test/calls", self.master_url()))
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["method"] == "POST")
            .filter_map(|c| c["path"].as_str().map(str::to_string))
            .collect()
    }

    fn set_drain(&self, mode: &str, delay_ms: u64) {
        let body = format!("{{\"mode\":\"{mode}\",\"delay_ms\":{delay_ms}}}");
        let (status, answer) = http(
            "POST",
            &format!("{}/api/_test/drain", self.master_url()),
            Some(&body),
        )
        .unwrap();
        assert!(
            (200..300).contains(&status),
            "drain mode refused: {status} {answer}"
        );
    }

    /// Nodes of `patchctl --format json display demo`.
    fn display_nodes(&self) -> Vec<Value> {
        let shown = json_of(&self.patchctl_ok(&["--format", "json", "display", "demo"]));
        shown["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("no nodes in {shown}"))
            .clone()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.demo(&["down"]);
        if let Ok(bytes) = std::fs::read(self.dir.join("demo.json"))
            && let Ok(record) = serde_json::from_slice::<Value>(&bytes)
        {
            for agent in record["agents"].as_array().into_iter().flatten() {
                if let Some(pid) = agent["pid"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                    .filter(|p| pid_alive(*p))
                {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        for pid in processes_running_under(&self.dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `(result, reason)` of a node in the JSON summary of `patchctl --format json patch`.
fn result_of(summary: &Value, node_id: &str) -> (String, String) {
    let node = summary["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node"] == node_id))
        .unwrap_or_else(|| panic!("no {node_id} in {summary}"));
    (
        node["result"].as_str().unwrap_or_default().to_string(),
        node["reason"].as_str().unwrap_or_default().to_string(),
    )
}

/// Display statuses of a node that is not serving.
fn is_down_status(status: &str) -> bool {
    matches!(
        status,
        "Unreachable" | "Down" | "Failed" | "Stopped" | "Offline"
    )
}

// ----- crash drill ------------------------------------------------------------------------------------------------

#[test]
fn crash_on_start_is_reverted_and_halts_with_every_node_healthy() {
    let started = Instant::now();
    let fleet = Fleet::up("127.0.79", 4);
    let workers = fleet.workers();
    let before: Vec<Value> = workers
        .iter()
        .map(|(_, host)| fleet.worker_version(*host))
        .collect();
    let (original_binary, _) = fleet.original_worker();
    let original_sha = sha256_file(&original_binary);
    let crash = fleet.worker_hotfix("v1.0.1-crash", "crash", 0);

    let out = fleet.patchctl(&[
        "--format",
        "json",
        "patch",
        "demo",
        crash.to_str().unwrap(),
        "-R",
        "demo-worker",
        "-y",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a rollout with a reverted node exits 3: {}",
        text(&out)
    );
    let summary = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(summary["failures"], 1, "{summary}");
    assert!(
        summary["end"]
            .as_str()
            .unwrap_or_default()
            .contains("halted"),
        "{summary}"
    );

    // The first worker got the crashing binary and was reverted by its agent; the rollout started no other.
    let (first_result, first_reason) = result_of(&summary, &fleet.worker_addr(workers[0].1));
    assert_eq!(first_result, "reverted", "{summary}");
    assert!(
        first_reason.contains("reverted by the agent"),
        "{first_reason}"
    );
    assert!(
        fleet.start_count(workers[0].1) >= 3,
        "old, new (crashed), old again"
    );
    for ((name, host), old) in workers.iter().zip(&before).skip(1) {
        assert_eq!(
            result_of(&summary, &fleet.worker_addr(*host)).0,
            "not started",
            "{name}: {summary}"
        );
        let now = fleet.worker_version(*host);
        assert_eq!(
            (&now["pid"], &now["started_unix"]),
            (&old["pid"], &old["started_unix"]),
            "{name} untouched"
        );
    }
    for (name, host) in &workers {
        assert_eq!(
            fleet.worker_version(*host)["version"],
            ORIGINAL,
            "{name} serves the original version"
        );
    }

    // display: every node up and running a working (the original) binary; nothing marked patched.
    let nodes = fleet.display_nodes();
    assert_eq!(nodes.len(), 4, "{nodes:?}");
    for node in &nodes {
        let status = node["status"].as_str().unwrap_or_default();
        assert!(
            !is_down_status(status),
            "node {} is {status}: {node}",
            node["id"]
        );
        assert_eq!(node["service"]["state"], "running", "{node}");
        assert_eq!(node["patched"], false, "{node}");
        assert!(
            node["problems"].as_array().is_none_or(Vec::is_empty),
            "{node}"
        );
        if node["role"] == "demo-worker" {
            assert_eq!(
                node["service"]["binary_sha256"],
                original_sha.as_str(),
                "{node}"
            );
        }
    }

    // The master still lists every worker, none offline.
    wait_for(
        Duration::from_secs(20),
        "every worker listed by the master and not Offline/Down",
        || {
            let members = fleet.members();
            workers.iter().all(|(name, _)| {
                members
                    .iter()
                    .any(|(member, state)| member == name && state != "Offline" && state != "Down")
            })
        },
    );
    eprintln!("crash drill took {:.1}s", started.elapsed().as_secs_f64());
}

// ----- network cut-off drill ----------------------------------------------------------------------------------

/// A network namespace joined to the host by a veth pair carrying a link-local /30 (both created here, removed
/// on drop). Only these two addresses are ever used.
struct Netns {
    name: String,
    host_link: String,
    subnet: String,
    host_ip: String,
    inside_ip: String,
}

/// Metric of the test's `unreachable` route for its /30 (the veth's own route, metric 0, wins while it is up).
const GUARD_METRIC: &str = "4242";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let id = std::process::id();
        // A /30 of 169.254.0.0/16 that no address or route of this machine uses yet.
        let mut used = String::new();
        for args in [
            &["-o", "-4", "addr", "show"][..],
            &["-4", "route", "show", "table", "all"],
        ] {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            used.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        // Third octets 20..=159 only: far from 169.254.169.x, where clouds put their metadata services.
        let third = (0..140)
            .map(|k| (id + k) % 140 + 20)
            .find(|third| !used.contains(&format!("169.254.{third}.")))
            .ok_or("no free 169.254.x.0/30")?;
        let netns = Netns {
            name: format!("pd-drill-{id}"),
            host_link: format!("pdh{}", id % 100_000),
            subnet: format!("169.254.{third}.0/30"),
            host_ip: format!("169.254.{third}.1"),
            inside_ip: format!("169.254.{third}.2"),
        };
        let inside_link = format!("pdn{}", id % 100_000);
        // First a fallback route that fails every packet to the /30 locally: while the veth is down (its own route
        // gone), a connection attempt then fails at once with "no route to host" instead of following the default
        // route off this machine.
        ip(&[
            "route",
            "add",
            "unreachable",
            &netns.subnet,
            "metric",
            GUARD_METRIC,
        ])?;
        ip(&["netns", "add", &netns.name])?;
        ip(&[
            "link",
            "add",
            &netns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &inside_link,
        ])?;
        ip(&["link", "set", &inside_link, "netns", &netns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", netns.host_ip),
            "dev",
            &netns.host_link,
        ])?;
        ip(&["link", "set", &netns.host_link, "up"])?;
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", netns.name.as_str(), "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        inside(&[
            "addr",
            "add",
            &format!("{}/30", netns.inside_ip),
            "dev",
            &inside_link,
        ])?;
        inside(&["link", "set", &inside_link, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    fn set_link(&self, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_link,
            if up { "up" } else { "down" },
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the pair, which removes the host end too.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&[
            "route",
            "del",
            "unreachable",
            &self.subnet,
            "metric",
            GUARD_METRIC,
        ]);
    }
}

/// Forwards TCP connections from `listen` to `target` (a thread per direction). Lets the worker inside the
/// namespace reach the master, which listens on a loopback address that cannot be routed over the veth.
fn start_relay(listen: &str, target: String) -> u16 {
    let listener = TcpListener::bind((listen, 0))
        .unwrap_or_else(|e| panic!("cannot bind the relay on {listen}: {e}"));
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for inbound in listener.incoming().map_while(Result::ok) {
            let Ok(outbound) = TcpStream::connect(&target) else {
                continue;
            };
            let (Ok(inbound_copy), Ok(outbound_copy)) = (inbound.try_clone(), outbound.try_clone())
            else {
                continue;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(inbound, outbound_copy);
            pipe(outbound, inbound_copy);
        }
    });
    port
}

/// The cut-off host: an agent (and the worker it runs) inside the namespace, or on loopback for the fallback.
struct IsolatedAgent {
    child: Option<Child>,
    state_dir: PathBuf,
}

impl IsolatedAgent {
    /// Starts `patchd run` (prefixed by `ip netns exec NS` when `netns` is given) and waits for its ready line.
    fn start(config: &Path, netns: Option<&str>, log: &Path) -> IsolatedAgent {
        let patchd = bin("patchd");
        let mut command = match netns {
            Some(name) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name]).arg(&patchd);
                command
            }
            None => Command::new(&patchd),
        };
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("PATCHD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the cut-off agent: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("patchd listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        let state_dir = config.parent().unwrap().join("state");
        let agent = IsolatedAgent {
            child: Some(child),
            state_dir,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!(
                "the cut-off agent printed no ready line:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        agent
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for IsolatedAgent {
    fn drop(&mut self) {
        self.kill();
        kill_recorded_service(&self.state_dir, "demo-worker");
    }
}

#[test]
fn a_host_cut_off_mid_rollout_is_reported_and_the_rest_stays_consistent() {
    let started = Instant::now();
    let fleet = Fleet::up("127.0.80", 4);
    // Declared after the fleet, so dropped first: the cut-off agent and its worker, then the namespace.
    let netns = match Netns::create() {
        Ok(netns) => Some(netns),
        Err(error) => {
            eprintln!(
                "WARNING: cannot create a network namespace ({error}): falling back to SIGKILL of the agent"
            );
            None
        }
    };
    let host = match &netns {
        Some(netns) => netns.inside_ip.clone(),
        None => format!("{}.20", fleet.prefix),
    };
    let master = format!("{}.1:{MASTER_PORT}", fleet.prefix);
    let master_url = match &netns {
        Some(netns) => format!(
            "http://{}:{}",
            netns.host_ip,
            start_relay(&netns.host_ip, master)
        ),
        None => format!("http://{master}"),
    };

    // The extra host: certificate from the demo's CA, the original worker deployed as the demo deploys it.
    let host_dir = fleet.dir.join("cut-off-host");
    let tls_dir = host_dir.join("tls");
    fleet.patchctl_ok(&[
        "cert",
        "issue",
        "agent-cut",
        "--role",
        "agent",
        "--san",
        &host,
        "--out",
        tls_dir.to_str().unwrap(),
    ]);
    let deploy_dir = host_dir.join("deploy/demo-worker-8262");
    let (original_binary, _) = fleet.original_worker();
    let binary = deploy_dir.join("bin/demo-worker/demo-worker");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    std::fs::copy(&original_binary, &binary).unwrap();
    let q = |p: &Path| toml_string(&p.to_string_lossy());
    let config = host_dir.join("patchd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{host}:{AGENT_PORT}\"\nstate_dir = {state}\ndeploy_roots = [{root}]\n\n[tls]\nca = {ca}\ncert = {cert}\nkey = {key}\n\n\
             [[service]]\nname = \"demo-worker\"\ncomponent = \"demo-worker\"\ndeploy_dir = {dir}\nbackend = \"process\"\n\
             command = [\"{{deploy_dir}}/bin/demo-worker/demo-worker\", \"serve\", \"--listen\", \"{host}:{WORKER_PORT}\", \"--name\", \"worker-cut\", \"--master\", \"{master_url}\"]\n\
             user = \"root\"\nrestart_on_crash = true\nstop_timeout = \"5s\"\n\n[service.health]\nmin_healthy = \"1s\"\nhttp = \"http://{host}:{WORKER_PORT}/health\"\ntimeout = \"15s\"\n",
            state = q(&host_dir.join("state")),
            root = q(&host_dir.join("deploy")),
            ca = q(&fleet.home.join("tls/ca.crt")),
            cert = q(&tls_dir.join("agent-cut.crt")),
            key = q(&tls_dir.join("agent-cut.key")),
            dir = q(&deploy_dir),
        ),
    )
    .unwrap();
    let mut agent = IsolatedAgent::start(
        &config,
        netns.as_ref().map(|n| n.name.as_str()),
        &host_dir.join("patchd.log"),
    );
    let cut_worker = format!("{host}:{WORKER_PORT}");
    wait_for(
        Duration::from_secs(30),
        "worker-cut to register with the master",
        || {
            fleet
                .member_state("worker-cut")
                .is_some_and(|state| state == "Free" || state == "Bound")
        },
    );
    let cut_before = get_json(&format!("http://{cut_worker}/version"));

    // The cut-off host joins the topology second among the workers: worker-1, worker-cut, worker-2, worker-3.
    let topology = std::fs::read_to_string(fleet.dir.join("topology.yaml")).unwrap();
    let cut_line = format!(
        "      - {{ host: {host}, port: {WORKER_PORT}, name: worker-cut, deploy_dir: {} }}",
        serde_json::Value::String(deploy_dir.to_string_lossy().into_owned())
    );
    let mut lines: Vec<String> = topology.lines().map(str::to_string).collect();
    let after = lines
        .iter()
        .position(|l| l.contains("name: worker-1,"))
        .unwrap_or_else(|| panic!("no worker-1:\n{topology}"));
    lines.insert(after + 1, cut_line);
    let extended = fleet.dir.join("topology-with-cut-host.yaml");
    std::fs::write(&extended, lines.join("\n") + "\n").unwrap();
    fleet.patchctl_ok(&["cluster", "import", "demo", extended.to_str().unwrap()]);

    let workers = fleet.workers();
    let before: Vec<Value> = workers
        .iter()
        .map(|(_, host)| fleet.worker_version(*host))
        .collect();
    let hotfix = fleet.worker_hotfix("v1.0.1-hotfix", "ok", 0);
    // Each drain takes 1 s: the link goes down while the rollout drains worker-cut, before its Apply.
    fleet.set_drain("delay", 1000);
    http(
        "DELETE",
        &format!("{}/api/_test/calls", fleet.master_url()),
        None,
    )
    .unwrap();
    let mut patch = fleet.spawn_patchctl(
        "patch",
        &[
            "--format",
            "json",
            "patch",
            "demo",
            hotfix.to_str().unwrap(),
            "-R",
            "demo-worker",
            "-y",
        ],
    );
    wait_for(
        Duration::from_secs(60),
        "the rollout to reach worker-cut",
        || {
            fleet
                .master_posts()
                .iter()
                .any(|p| p == "/api/members/worker-cut/offline")
        },
    );
    match &netns {
        Some(netns) => netns.set_link(false),
        None => agent.kill(),
    }
    let code = patch.wait(Duration::from_secs(90));
    let stdout = patch.stdout_text();
    assert_eq!(code, Some(3), "{}", patch.output());
    let summary = json_of(&stdout);

    // The cut-off node is reported unreachable, and the rollout halted at the budget (0): no further node.
    let (result, reason) = result_of(&summary, &cut_worker);
    eprintln!("cut-off node {cut_worker}: {result}: {reason}");
    assert_eq!(result, "failed", "{stdout}");
    assert!(
        reason.contains("unreachable") && reason.contains(&host),
        "the reason names the host: {reason}"
    );
    if netns.is_some() {
        assert!(
            reason.contains("No route to host"),
            "a network failure, nothing else answered: {reason}"
        );
    }
    assert_eq!(summary["failures"], 1, "{stdout}");
    assert!(
        summary["end"]
            .as_str()
            .unwrap_or_default()
            .contains("halted"),
        "{stdout}"
    );
    assert_eq!(
        result_of(&summary, &fleet.worker_addr(workers[0].1)).0,
        "patched",
        "{stdout}"
    );
    for (name, host) in &workers[1..] {
        assert_eq!(
            result_of(&summary, &fleet.worker_addr(*host)).0,
            "not started",
            "{name}: {stdout}"
        );
    }

    // Every other node is consistent: worker-1 on the hotfix, the others untouched, and all online.
    assert_eq!(
        fleet.worker_version(workers[0].1)["version"],
        "v1.0.1-hotfix"
    );
    for ((name, host), old) in workers.iter().zip(&before).skip(1) {
        let now = fleet.worker_version(*host);
        assert_eq!(
            (&now["version"], &now["pid"]),
            (&old["version"], &old["pid"]),
            "{name} untouched"
        );
    }
    let posts = fleet.master_posts();
    assert!(
        posts.iter().any(|p| p == "/api/members/worker-cut/online"),
        "put back online after the failure: {posts:?}"
    );
    wait_for(
        Duration::from_secs(20),
        "worker-1..3 online in the master",
        || {
            let members = fleet.members();
            workers.iter().all(|(name, _)| {
                members
                    .iter()
                    .any(|(m, state)| m == name && (state == "Free" || state == "Bound"))
            })
        },
    );
    assert_ne!(
        fleet.member_state("worker-cut").as_deref(),
        Some("Offline"),
        "not left offline"
    );
    let nodes = fleet.display_nodes();
    for node in &nodes {
        let id = node["id"].as_str().unwrap_or_default();
        let status = node["status"].as_str().unwrap_or_default();
        if id == cut_worker {
            assert_eq!(status, "Unreachable", "{node}");
        } else {
            assert!(!is_down_status(status), "{id} is {status}: {node}");
            assert_eq!(
                node["patched"],
                id == fleet.worker_addr(workers[0].1),
                "{node}"
            );
        }
    }

    // The controller's records: the rollout and every node's result, with the reason.
    let rollouts = json_of(&fleet.patchctl_ok(&["--format", "json", "audit", "demo"]));
    let rollout = rollouts
        .as_array()
        .and_then(|all| all.last())
        .unwrap_or_else(|| panic!("no rollout: {rollouts}"));
    assert_eq!(rollout["id"], summary["rollout"], "{rollouts}");
    let id = rollout["id"].as_str().unwrap();
    let report =
        json_of(&fleet.patchctl_ok(&["--format", "json", "audit", "demo", "--rollout", id]));
    let recorded = report["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes: {report}"));
    assert_eq!(recorded.len(), 4, "every worker recorded: {report}");
    let cut = recorded
        .iter()
        .find(|n| n["node_id"] == cut_worker)
        .unwrap_or_else(|| panic!("no {cut_worker}: {report}"));
    assert_eq!(cut["state"], "failed", "{cut}");
    assert!(
        cut["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{cut}"
    );
    let first = recorded
        .iter()
        .find(|n| n["node_id"] == fleet.worker_addr(workers[0].1))
        .unwrap();
    assert_eq!(first["state"], "done", "{first}");

    // Back on the network, the cut-off host still runs its untouched original.
    if let Some(netns) = &netns {
        netns.set_link(true);
        let mut now = None;
        wait_for(
            Duration::from_secs(20),
            "worker-cut reachable again",
            || {
                now = http("GET", &format!("http://{cut_worker}/version"), None).ok();
                now.is_some()
            },
        );
        let now = get_json(&format!("http://{cut_worker}/version"));
        assert_eq!(
            (&now["version"], &now["pid"]),
            (&cut_before["version"], &cut_before["pid"]),
            "worker-cut untouched"
        );
    }
    drop(agent);
    eprintln!(
        "network drill ({}) took {:.1}s",
        if netns.is_some() {
            "netns link down"
        } else {
            "FALLBACK: agent SIGKILLed"
        },
        started.elapsed().as_secs_f64()
    );
}

// ----- controller killed and resumed --------------------------------------------------------------------------

#[test]
fn controller_killed_mid_apply_then_resume_restarts_no_worker_twice() {
    let started = Instant::now();
    let fleet = Fleet::up("127.0.81", 4);
    let workers = fleet.workers();
    // The new version takes 2 s to listen: worker-2's apply is in flight long enough to kill patchctl.
    let hotfix = fleet.worker_hotfix("v1.0.1-hotfix", "slow-start", 2000);
    let mut patch = fleet.spawn_patchctl(
        "first",
        &[
            "patch",
            "demo",
            hotfix.to_str().unwrap(),
            "-R",
            "demo-worker",
            "-y",
        ],
    );
    let (_, second) = workers[1];
    wait_for(
        Duration::from_secs(60),
        "worker-2's new version to be started",
        || fleet.start_count(second) >= 2,
    );
    patch.signal(Signal::SIGKILL);
    assert_eq!(
        patch.wait(Duration::from_secs(10)),
        None,
        "killed by the signal"
    );
    let (_, first) = workers[0];
    let first_patched = fleet.worker_version(first);
    assert_eq!(
        first_patched["version"], "v1.0.1-hotfix",
        "worker-1 was done before the kill"
    );
    let untouched: Vec<Value> = workers[2..]
        .iter()
        .map(|(_, host)| fleet.worker_version(*host))
        .collect();

    let resumed = fleet.patchctl(&["patch", "--resume", "demo"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    for (name, host) in &workers {
        assert_eq!(
            fleet.worker_version(*host)["version"],
            "v1.0.1-hotfix",
            "{name}"
        );
        assert_eq!(
            fleet.start_count(*host),
            2,
            "{name} started once by the demo, once with the hotfix"
        );
    }
    let first_now = fleet.worker_version(first);
    assert_eq!(
        (&first_now["pid"], &first_now["started_unix"]),
        (&first_patched["pid"], &first_patched["started_unix"]),
        "worker-1 was not restarted again by the resume"
    );
    for ((name, host), old) in workers[2..].iter().zip(&untouched) {
        assert_ne!(
            fleet.worker_version(*host)["pid"],
            old["pid"],
            "{name} patched by the resume"
        );
    }
    wait_for(Duration::from_secs(20), "every worker online", || {
        let members = fleet.members();
        workers.iter().all(|(name, _)| {
            members
                .iter()
                .any(|(m, state)| m == name && (state == "Free" || state == "Bound"))
        })
    });
    let nodes = fleet.display_nodes();
    assert_eq!(
        nodes.iter().filter(|n| n["patched"] == true).count(),
        3,
        "{nodes:?}"
    );
    eprintln!(
        "kill-and-resume drill took {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
