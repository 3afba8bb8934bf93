//! End to end: a new version that crashes is reverted by the agents and counted against the failure budget (the
//! rollout halts at budget + 1 failures and starts no further node); an agent killed mid-rollout fails only its
//! own node, which stays online on its old version; a package for another component, or a patch while another
//! rollout is unfinished, is refused at once, without waiting for a node whose agent hangs.

use patchd_e2e::cluster_fixture::{ClusterFixture, ORIGINAL_VERSION, output_text};
use std::time::Duration;

/// (result, reason) of a node in the JSON summary of `patchctl --format json patch`.
fn result_of(summary: &serde_json::Value, node_id: &str) -> (String, String) {
    let nodes = summary["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {summary}"));
    let node = nodes
        .iter()
        .find(|n| n["node"] == node_id)
        .unwrap_or_else(|| panic!("no {node_id} in {summary}"));
    (
        node["result"].as_str().unwrap_or_default().to_string(),
        node["reason"].as_str().unwrap_or_default().to_string(),
    )
}

fn summary(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON summary ({e}):\n{stdout}"))
}

#[test]
fn a_crashing_version_is_reverted_and_the_rollout_halts_at_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 4);
    let before = cluster.worker_versions();
    let package = cluster.worker_package("v1.0.1-broken", "crash");

    let out = cluster.patchctl(&[
        "--format",
        "json",
        "patch",
        &cluster.name,
        package.to_str().unwrap(),
        "-y",
        "--failure-budget",
        "1",
        "--batch-size",
        "4",
        "--max-unavailable",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let summary = summary(&String::from_utf8_lossy(&out.stdout));
    // Budget 1: at most two nodes in flight, and the rollout halts once two have failed.
    assert_eq!(summary["failures"], 2, "{}", output_text(&out));
    assert!(
        summary["end"].as_str().unwrap().contains("halted"),
        "{}",
        output_text(&out)
    );
    for (worker, old) in cluster.workers().zip(&before) {
        let (result, reason) = result_of(&summary, &worker.id());
        let now = cluster
            .version_of(&worker.name)
            .unwrap_or_else(|| panic!("{} serves", worker.name));
        assert_eq!(
            now.version, ORIGINAL_VERSION,
            "{} runs its old version",
            worker.name
        );
        assert_ne!(
            cluster.member_state(&worker.name).as_deref(),
            Some("Offline"),
            "{} online",
            worker.name
        );
        if result == "reverted" {
            assert!(reason.contains("reverted by the agent"), "{reason}");
            assert!(
                worker.start_count() >= 3,
                "{}: old, new (crashed), old again",
                worker.name
            );
        } else {
            assert_eq!(result, "not started", "{}", output_text(&out));
            assert_eq!(now.pid, old.pid, "{} untouched", worker.name);
            assert_eq!(worker.start_count(), 1);
        }
    }
    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert!(!shown.contains("(patched)"), "{shown}");
}

#[test]
fn an_agent_killed_mid_rollout_fails_only_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterFixture::with_workers(dir.path(), 3);
    // Slow drains keep the rollout busy with worker-1 while worker-3's agent dies.
    cluster.set_drain("delay", 1500);
    let before = cluster.version_of("worker-3").unwrap();
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let mut patch = cluster.spawn_patchctl(
        "patch",
        &[
            "--format",
            "json",
            "patch",
            &cluster.name,
            package.to_str().unwrap(),
            "-y",
        ],
    );
    cluster.wait_drain_started("worker-1", Duration::from_secs(60));
    cluster.kill_agent("worker-3");
    let code = patch.wait(Duration::from_secs(120));
    let stdout = patch.stdout_text();
    assert_eq!(
        code,
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{}",
        patch.stderr_text()
    );
    let summary = summary(&stdout);
    assert_eq!(
        result_of(&summary, &cluster.node("worker-1").id()).0,
        "patched",
        "{stdout}"
    );
    assert_eq!(
        result_of(&summary, &cluster.node("worker-2").id()).0,
        "patched",
        "{stdout}"
    );
    let (result, reason) = result_of(&summary, &cluster.node("worker-3").id());
    assert_eq!(result, "failed", "{stdout}");
    assert!(reason.contains("unreachable"), "{reason}");
    let after = cluster.version_of("worker-3").unwrap();
    assert_eq!(
        (after.version.as_str(), after.pid),
        (ORIGINAL_VERSION, before.pid),
        "worker-3 untouched"
    );
    cluster.wait_back_online("worker-3", Duration::from_secs(20));
}

#[test]
fn a_package_for_another_component_is_refused_without_waiting_for_a_hung_node() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterFixture::with_workers(dir.path(), 2);
    let package = cluster.master_package("v1.0.1-hotfix", "ok");
    // worker-2's agent hangs (stopped: TCP accepts, TLS never answers), so its status probe lasts the whole
    // probe timeout; the refusal of the package must not wait for it.
    let hung = cluster
        .agent("worker-2")
        .and_then(|agent| agent.pid())
        .unwrap();
    kill(Pid::from_raw(hung as i32), Signal::SIGSTOP).unwrap();
    let patch = |package: &std::path::Path, extra: &[&str]| {
        let started = std::time::Instant::now();
        let package = package.to_str().unwrap();
        let mut args = vec![
            "patch",
            &cluster.name,
            package,
            "-y",
            "--probe-timeout",
            "120s",
        ];
        args.extend_from_slice(extra);
        let out = cluster.patchctl(&args);
        (out, started.elapsed())
    };
    let (out, took) = patch(&package, &["-R", "demo-worker"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("run another component"), "{text}");
    // Far below the 120 s probe timeout: the refusal came from the package check alone.
    assert!(took < Duration::from_secs(60), "the refusal took {took:?}");

    // The same for a rollout of another package left unfinished: it must be finished first, said at once.
    let store = patchctl::store::Store::open_home(&patchctl::home::Home::at(cluster.pki.home()))
        .expect("open the controller's store");
    store
        .create_rollout(&patchctl::store::NewRollout {
            id: "r-unfinished".into(),
            cluster: cluster.name.clone(),
            kind: patchctl::store::RolloutKind::Patch,
            package_digest: Some("d1".repeat(32).parse().unwrap()),
            package_path: "/tmp/other.tar.gz".into(),
            version: "v0.9.9".into(),
            plan_json: r#"{"batches":[]}"#.into(),
            options_json: "{}".into(),
        })
        .expect("create rollout");
    store
        .set_rollout_state("r-unfinished", patchctl::store::RolloutState::Running)
        .expect("state");
    let worker_package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let (out, took) = patch(&worker_package, &[]);
    kill(Pid::from_raw(hung as i32), Signal::SIGCONT).unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("r-unfinished") && text.contains("finish it first"),
        "{text}"
    );
    assert!(took < Duration::from_secs(60), "the refusal took {took:?}");
    let changes: Vec<_> = cluster
        .master_calls()
        .into_iter()
        .filter(|call| call.method != "GET")
        .collect();
    assert!(
        changes.is_empty(),
        "nothing may change in the cluster: {changes:?}"
    );
}
