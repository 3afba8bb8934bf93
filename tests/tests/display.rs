//! End to end: `patchctl display` prints the seed's table from real agents and the cluster API, and a dead or hung
//! agent costs no more than the probe timeout.

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use patchd_e2e::cluster_fixture::{ClusterFixture, FixtureOptions};
use std::time::{Duration, Instant};

fn row<'a>(table: &'a str, node_id: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.starts_with(node_id))
        .unwrap_or_else(|| panic!("no row for {node_id}:\n{table}"))
}

#[test]
fn display_shows_every_node_and_a_dead_or_hung_agent_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            masters: 1,
            workers: 2,
            ..Default::default()
        },
    );

    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(
        &lines[..2],
        ["Cluster name: c", "Cluster version: v1.0.0"],
        "{shown}"
    );
    for column in [
        "ID",
        "Role",
        "Host",
        "Ports",
        "OS/Arch",
        "Status",
        "Data Dir",
        "Deploy Dir",
        "Version",
    ] {
        assert!(lines[2].contains(column), "{shown}");
    }
    assert!(
        lines[3].starts_with("-- ") && lines[3].contains(" ----"),
        "{shown}"
    );
    let master = row(&shown, &cluster.node("master-1").id());
    assert!(
        master.contains("demo-master") && master.contains("Healthy|L"),
        "{shown}"
    );
    assert!(
        master.contains(&format!("linux/{}", std::env::consts::ARCH)),
        "{shown}"
    );
    for worker in cluster.workers() {
        let line = row(&shown, &worker.id());
        assert!(
            line.contains("Free") || line.contains("Bound"),
            "member state from the master: {shown}"
        );
        assert!(
            line.contains(&worker.deploy_dir.to_string_lossy().into_owned()),
            "{shown}"
        );
    }
    assert!(shown.contains("Total nodes: 3"), "{shown}");

    let json = cluster.patchctl_ok(&[
        "--format",
        "json",
        "display",
        &cluster.name,
        "-R",
        "demo-worker",
    ]);
    let document: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(document["total_nodes"], 2, "{json}");
    assert!(
        document["nodes"][0]["service"]["pid"].as_u64().unwrap() > 0,
        "{json}"
    );

    // worker-1's agent is gone (connection refused); worker-2's hangs (stopped: TCP accepts, TLS never answers).
    cluster.kill_agent("worker-1");
    let hung = cluster
        .agent("worker-2")
        .and_then(|agent| agent.pid())
        .unwrap();
    nix::sys::signal::kill(Pid::from_raw(hung as i32), Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let out = cluster.patchctl(&["display", &cluster.name, "--timeout", "2s"]);
    let took = started.elapsed();
    nix::sys::signal::kill(Pid::from_raw(hung as i32), Signal::SIGCONT).unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 2 s per probe, all in parallel; generous slack for process start-up on a loaded machine.
    assert!(took < Duration::from_secs(12), "display took {took:?}");
    assert!(
        row(&shown, &cluster.node("worker-1").id()).contains("Unreachable"),
        "{shown}"
    );
    assert!(
        row(&shown, &cluster.node("worker-2").id()).contains("Unreachable"),
        "{shown}"
    );
    assert!(
        row(&shown, &cluster.node("master-1").id()).contains("Healthy|L"),
        "{shown}"
    );
    assert!(shown.contains("no answer within 2s"), "{shown}");
}
