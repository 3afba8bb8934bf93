//! The demo fleet the fault drills (`tests/tests/demo_drills.rs`) run on: `patchctl demo up` in a temporary
//! `PATCHCTL_HOME` with `demo down` (and a SIGKILL of anything left) on drop; a network namespace joined by a veth
//! pair to cut one agent host off mid-rollout; a TCP relay; an agent started inside that namespace.

use crate::cluster_fixture::{Background, http, stamp_with_delay};
use crate::{bin, patchctl, patchctl_ok};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const ORIGINAL: &str = "v1.0.0";
pub const WORKER_PORT: u16 = 8262;
pub const MASTER_PORT: u16 = 8261;
pub const AGENT_PORT: u16 = 7480;

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn pid_alive(pid: i32) -> bool {
    u32::try_from(pid).is_ok_and(patchd_procstat::is_running)
}

/// Live processes whose executable lies under `dir`.
pub fn processes_running_under(dir: &Path) -> Vec<i32> {
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
pub fn kill_recorded_service(state_dir: &Path, service: &str) {
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

pub fn get_json(url: &str) -> Value {
    let (status, body) = http("GET", url, None).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

pub fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

/// A demo fleet in a temporary directory with its own controller home; `demo down` (then SIGKILL of anything
/// left from the demo directory) on drop.
pub struct Fleet {
    _tmp: tempfile::TempDir,
    pub home: PathBuf,
    pub dir: PathBuf,
    pub prefix: &'static str,
    pub nodes: usize,
}

impl Fleet {
    pub fn up(prefix: &'static str, nodes: usize) -> Fleet {
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

    pub fn demo(&self, args: &[&str]) -> Output {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut full = vec!["demo"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--dir", &dir]);
        patchctl(&self.home, &full)
    }

    pub fn patchctl(&self, args: &[&str]) -> Output {
        patchctl(&self.home, args)
    }

    pub fn patchctl_ok(&self, args: &[&str]) -> String {
        patchctl_ok(&self.home, args)
    }

    /// `patchctl` in the background, output to `<dir>/<label>.out|.err`.
    pub fn spawn_patchctl(&self, label: &str, args: &[&str]) -> Background {
        Background::spawn(&self.home, &self.dir, label, args)
    }

    pub fn master_url(&self) -> String {
        format!("http://{}.1:{MASTER_PORT}", self.prefix)
    }

    /// Worker names and their host numbers (one master below 6 hosts: workers on hosts 2..=N).
    pub fn workers(&self) -> Vec<(String, usize)> {
        (2..=self.nodes)
            .map(|host| (format!("worker-{}", host - 1), host))
            .collect()
    }

    pub fn worker_addr(&self, host: usize) -> String {
        format!("{}.{host}:{WORKER_PORT}", self.prefix)
    }

    /// `GET /version` of the worker on host `host`.
    pub fn worker_version(&self, host: usize) -> Value {
        get_json(&format!("http://{}/version", self.worker_addr(host)))
    }

    pub fn host_dir(&self, host: usize) -> PathBuf {
        self.dir.join("hosts").join(format!("host-{host}"))
    }

    /// How many times the agent of `host` started its service (`--- patchd …: starting` lines of its log).
    pub fn start_count(&self, host: usize) -> usize {
        let log = self.host_dir(host).join("state/logs/demo-worker.log");
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("--- patchd") && line.contains(": starting"))
            .count()
    }

    /// The original (v1.0.0) worker binary the demo deployed, and its release package.
    pub fn original_worker(&self) -> (PathBuf, PathBuf) {
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
    pub fn worker_hotfix(&self, version: &str, mode: &str, delay_ms: u64) -> PathBuf {
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
    pub fn members(&self) -> Vec<(String, String)> {
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

    pub fn member_state(&self, name: &str) -> Option<String> {
        self.members()
            .into_iter()
            .find(|(member, _)| member == name)
            .map(|(_, state)| state)
    }

    /// POST calls the master recorded (`/api/members/<name>/offline|online`).
    pub fn master_posts(&self) -> Vec<String> {
        get_json(&format!("{}/api/_test/calls", self.master_url()))
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["method"] == "POST")
            .filter_map(|c| c["path"].as_str().map(str::to_string))
            .collect()
    }

    pub fn set_drain(&self, mode: &str, delay_ms: u64) {
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
    pub fn display_nodes(&self) -> Vec<Value> {
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
pub fn result_of(summary: &Value, node_id: &str) -> (String, String) {
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
pub fn is_down_status(status: &str) -> bool {
    matches!(
        status,
        "Unreachable" | "Down" | "Failed" | "Stopped" | "Offline"
    )
}

// ----- crash drill ------------------------------------------------------------------------------------------------

pub struct Netns {
    pub name: String,
    pub host_link: String,
    pub subnet: String,
    pub host_ip: String,
    pub inside_ip: String,
}

/// Metric of the test's `unreachable` route for its /30 (the veth's own route, metric 0, wins while it is up).
pub const GUARD_METRIC: &str = "4242";

pub fn ip(args: &[&str]) -> Result<(), String> {
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
    pub fn create() -> Result<Netns, String> {
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

    pub fn set_link(&self, up: bool) {
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
pub fn start_relay(listen: &str, target: String) -> u16 {
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
pub struct IsolatedAgent {
    pub child: Option<Child>,
    pub state_dir: PathBuf,
}

impl IsolatedAgent {
    /// Starts `patchd run` (prefixed by `ip netns exec NS` when `netns` is given) and waits for its ready line.
    pub fn start(config: &Path, netns: Option<&str>, log: &Path) -> IsolatedAgent {
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

    pub fn kill(&mut self) {
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
