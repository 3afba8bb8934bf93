//! The quickstart, end to end: `patchctl demo up` starts agents and the demo cluster and imports it, a hotfix of
//! demo-worker is built and rolled out with `patch -R demo-worker`, and `patchctl demo down` stops every process
//! the demo started (agents and services) and nothing else.
//!
//! Runs on `127.0.77.k` (not the default `127.0.1.k`) so it never meets a demo someone runs by hand.

use patchd_e2e::cluster_fixture::{http, stamp};
use patchd_e2e::{bin, patchctl, patchctl_ok};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const PREFIX: &str = "127.0.77";

/// Processes whose executable lies under `dir` (services deployed by the demo).
fn processes_running_under(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
        })
        .filter(|pid| {
            // Zombies (already exited, not yet reaped) are not running.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
        })
        .collect()
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Runs `demo down` on drop, then SIGKILLs anything still recorded or running from the demo directory, so a
/// failing test leaks nothing.
struct DemoGuard {
    home: PathBuf,
    dir: PathBuf,
}

impl DemoGuard {
    fn demo(&self, args: &[&str]) -> Output {
        let mut full = vec!["demo"];
        full.extend_from_slice(args);
        let dir = self.dir.to_string_lossy().into_owned();
        full.extend_from_slice(&["--dir", &dir]);
        patchctl(&self.home, &full)
    }

    fn record(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("demo.json")).unwrap()).unwrap()
    }
}

impl Drop for DemoGuard {
    fn drop(&mut self) {
        let _ = self.demo(&["down"]);
        if let Ok(bytes) = std::fs::read(self.dir.join("demo.json"))
            && let Ok(record) = serde_json::from_slice::<Value>(&bytes)
        {
            for agent in record["agents"].as_array().into_iter().flatten() {
                if let Some(pid) = agent["pid"].as_u64().filter(|pid| pid_alive(*pid)) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::SIGKILL,
                    );
                }
            }
        }
        for pid in processes_running_under(&self.dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
        }
    }
}

fn get_json(url: &str) -> Value {
    let (status, body) = http("GET", url, None).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(out)
}

#[test]
fn demo_up_patch_down() {
    let _ = bin("patchd");
    let _ = bin("demo-master");
    let _ = bin("demo-worker");
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let demo = DemoGuard {
        home: home.clone(),
        dir: tmp.path().join("demo"),
    };
    let dir = demo.dir.to_string_lossy().into_owned();

    // Up: CA and certificates created, 4 agents (1 master + 3 workers), cluster imported.
    let up = demo.demo(&["up", "--nodes", "4", "--hosts-prefix", PREFIX]);
    let text = assert_ok(&up, "demo up");
    assert!(text.contains("is up"), "{text}");
    assert!(
        text.contains("patchctl patch demo"),
        "prints what to run next: {text}"
    );
    for file in ["ca.crt", "ca.key", "controller.crt", "controller.key"] {
        assert!(home.join("tls").join(file).is_file(), "{file} created");
    }
    let record = demo.record();
    let agents = record["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 4);
    for agent in agents {
        assert!(
            pid_alive(agent["pid"].as_u64().unwrap()),
            "agent {} runs",
            agent["addr"]
        );
    }
    let packages: Vec<String> = std::fs::read_dir(demo.dir.join("packages"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar.gz"))
        .collect();
    let worker_base = packages
        .iter()
        .find(|n| n.starts_with("demo-worker-v1.0.0-linux-"))
        .expect("original package");
    assert!(
        packages
            .iter()
            .any(|n| n.starts_with("demo-master-v1.0.0-linux-")),
        "{packages:?}"
    );
    assert!(
        demo.dir
            .join("hosts/host-2/deploy/demo-worker-8262/bin/demo-worker/demo-worker")
            .is_file(),
        "deployed as tiup lays it out"
    );

    // Up again: says so, changes nothing.
    let again = assert_ok(
        &demo.demo(&["up", "--nodes", "4", "--hosts-prefix", PREFIX]),
        "second demo up",
    );
    assert!(again.contains("already up"), "{again}");
    assert_eq!(demo.record()["agents"], record["agents"], "no new agents");

    // The cluster as the master sees it, and as `demo status` and `display` report it.
    let leader = get_json(&format!("http://{PREFIX}.1:8261/api/leader"));
    assert_eq!(leader["leader"], "master-1");
    let members = get_json(&format!("http://{PREFIX}.1:8261/api/members"));
    let states: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["state"].as_str())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "Bound").count(),
        2,
        "{members}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == "Free").count(),
        1,
        "{members}"
    );
    let status: Value = serde_json::from_str(&assert_ok(
        &demo.demo(&["status", "--format", "json"]),
        "demo status",
    ))
    .expect("status JSON");
    assert_eq!(status["up"], true, "{status}");
    assert!(
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["version"] == "v1.0.0"),
        "{status}"
    );
    let display = patchctl_ok(&home, &["display", "demo"]);
    for k in 1..=4 {
        assert!(
            display.contains(&format!("{PREFIX}.{k}")),
            "display lists host {k}:\n{display}"
        );
    }

    // A hotfix of the worker, rolled out worker by worker through the master's API.
    let hotfix_binary = tmp.path().join("hotfix/demo-worker");
    stamp("demo-worker", "v1.0.1-hotfix", "ok", &hotfix_binary);
    let hotfix = tmp.path().join("demo-worker-v1.0.1-hotfix.tar.gz");
    let base = demo.dir.join("packages").join(worker_base);
    patchctl_ok(
        &home,
        &[
            "package",
            "build",
            "--base",
            base.to_str().unwrap(),
            "--replace",
            &format!("demo-worker/demo-worker={}", hotfix_binary.display()),
            "--version",
            "v1.0.1-hotfix",
            "-o",
            hotfix.to_str().unwrap(),
        ],
    );
    http(
        "DELETE",
        &format!("http://{PREFIX}.1:8261/api/_test/calls"),
        None,
    )
    .unwrap();
    patchctl_ok(
        &home,
        &[
            "patch",
            "demo",
            hotfix.to_str().unwrap(),
            "-R",
            "demo-worker",
            "-y",
        ],
    );
    for k in 2..=4 {
        let version = get_json(&format!("http://{PREFIX}.{k}:8262/version"));
        assert_eq!(version["version"], "v1.0.1-hotfix", "worker on host {k}");
    }
    assert_eq!(
        get_json(&format!("http://{PREFIX}.1:8261/version"))["version"],
        "v1.0.0",
        "-R keeps the master"
    );
    let calls = get_json(&format!("http://{PREFIX}.1:8261/api/_test/calls"));
    let hook_calls: Vec<String> = calls
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["method"] == "POST")
        .map(|c| c["path"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..=3)
        .flat_map(|w| {
            [
                format!("/api/members/worker-{w}/offline"),
                format!("/api/members/worker-{w}/online"),
            ]
        })
        .collect();
    assert_eq!(
        hook_calls, expected,
        "each worker is taken offline and back online, one at a time"
    );
    let after = patchctl_ok(&home, &["display", "demo"]);
    assert_eq!(after.matches("v1.0.1-hotfix").count(), 3, "{after}");
    assert_eq!(after.matches("(patched)").count(), 3, "{after}");

    // Down: every agent and service stops; the files stay.
    let service_pids: Vec<u64> = (1..=4)
        .map(|k| {
            let port = if k == 1 { 8261 } else { 8262 };
            get_json(&format!("http://{PREFIX}.{k}:{port}/version"))["pid"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let down = assert_ok(&demo.demo(&["down"]), "demo down");
    assert!(
        down.contains("stopped 8 process(es)"),
        "4 agents + 4 services: {down}"
    );
    for agent in agents {
        assert!(
            !pid_alive(agent["pid"].as_u64().unwrap()),
            "agent {} stopped",
            agent["addr"]
        );
    }
    for pid in service_pids {
        assert!(!pid_alive(pid), "service pid {pid} stopped");
    }
    assert_eq!(
        processes_running_under(&demo.dir),
        Vec::<u32>::new(),
        "nothing runs from the demo directory"
    );
    assert!(
        demo.dir.join("topology.yaml").is_file() && demo.dir.join("logs").is_dir(),
        "files kept"
    );
    std::thread::sleep(Duration::from_millis(100));
    for k in 1..=4 {
        std::net::TcpListener::bind(format!("{PREFIX}.{k}:7480")).expect("agent port free again");
    }
    // Up again in the same home, as `scripts/demo.sh` run twice does: the services are fresh, and so is `display`.
    assert_ok(
        &demo.demo(&["up", "--nodes", "4", "--hosts-prefix", PREFIX]),
        "demo up again",
    );
    let fresh = patchctl_ok(&home, &["display", "demo"]);
    assert!(
        !fresh.contains("(patched)") && !fresh.contains("v1.0.1-hotfix"),
        "no mark of the earlier demo's patch: {fresh}"
    );
    assert_ok(&demo.demo(&["down"]), "demo down after the second up");
    let again = assert_ok(&demo.demo(&["down"]), "second demo down");
    assert!(again.contains("nothing was running"), "{again}");
    assert_ok(&demo.demo(&["down", "--purge"]), "demo down --purge");
    assert!(
        !Path::new(&dir).exists(),
        "--purge removes the demo directory"
    );
}

#[test]
fn demo_up_refuses_bad_settings_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let dir = dir.to_str().unwrap();
    let out = patchctl(tmp.path(), &["demo", "up", "--nodes", "1", "--dir", dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nodes 1 is out of range"),
        "{out:?}"
    );
    let out = patchctl(
        tmp.path(),
        &["demo", "up", "--hosts-prefix", "10.0.0", "--dir", dir],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{out:?}"
    );
    let out = patchctl(
        tmp.path(),
        &[
            "demo",
            "up",
            "--bin-dir",
            tmp.path().to_str().unwrap(),
            "--dir",
            dir,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cargo build --release --bins"),
        "{out:?}"
    );
    let out = patchctl(
        tmp.path(),
        &["demo", "down", "--dir", tmp.path().to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a directory that is not a demo is refused (and never purged)"
    );
}
