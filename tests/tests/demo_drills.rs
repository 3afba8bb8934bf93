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

use nix::sys::signal::Signal;
use patchd_e2e::cluster_fixture::http;
use patchd_e2e::demo_fleet::*;
use patchd_e2e::{sha256_file, toml_string, wait_for};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

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
