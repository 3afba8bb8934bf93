//! Crash safety of apply with a real agent: the agent kills itself (SIGKILL, `PATCHD_FAULT=<point>[:n]`, binaries
//! built with `--features patchd-agent/fault-injection`) at every fault point in turn; after a restart, recovery
//! must leave every file of the service all-old (no fault point lies after the commit), the service running and
//! serving the old version, the journal final, no temporaries, and a repeated Apply with the same patch id must
//! replay the recorded result without changing anything.

use patchd_e2e::apply_support::{
    AgentRpc, ServiceReaper, WorkerService, journal, journal_phase, outcome, package_hashes,
    pid_alive, push, service_pid, worker_package,
};
use patchd_e2e::{AgentConfig, AgentProcess, Pki, wait_for};
use patchd_proto::v1::{ApplyOutcome, ServiceState};
use std::path::Path;
use std::time::Duration;

/// Names in the deploy dir that only an unfinished apply leaves.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".patchd-") {
                found.push(entry.path().display().to_string());
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn agent_killed_at_every_fault_point_recovers_to_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let agent_dir = dir.path().join("agent-1");
    let worker = WorkerService::new(&agent_dir.join("deploy"), "worker-1");
    worker.install("v1.0.0");
    let config = AgentConfig::new(&agent_dir, &tls).extra(&worker.toml("300ms", "8s"));
    let config_path = config.write();
    let state = config.state_path().to_path_buf();
    let reaper = ServiceReaper::new(&state);
    let mut agent = AgentProcess::start(&config_path);
    worker.wait_serving("v1.0.0");
    reaper.track("worker-1");
    let original = worker.file_hashes();

    let pkgs = dir.path().join("packages");
    let good = worker_package(&pkgs, "v2.0.0", "ok");
    let crash = worker_package(&pkgs, "v2.0.1-crash", "crash");
    let mut rpc = AgentRpc::connect(&pki, agent.addr);
    let good_digest = push(&pki, &agent.addr_string(), &good);
    let crash_digest = push(&pki, &agent.addr_string(), &crash);
    rpc.stage("worker-1", &good_digest).unwrap();
    rpc.stage("worker-1", &crash_digest).unwrap();
    drop(rpc);

    // The package has two changed files (conf/worker.toml sorts before demo-worker), so `after-swap:1` and
    // `during-revert:1` leave a mixed deploy dir behind that recovery must put back.
    let points: [(&str, &str); 9] = [
        ("after-prepare", &good_digest),
        ("after-stop", &good_digest),
        ("after-swap:1", &good_digest),
        ("after-swap:2", &good_digest),
        ("after-start", &good_digest),
        ("during-probation", &good_digest),
        ("before-commit", &good_digest),
        ("during-revert:1", &crash_digest),
        ("during-revert:2", &crash_digest),
    ];
    for (index, (point, digest)) in points.into_iter().enumerate() {
        let patch_id = format!("crash-{index}");
        agent.kill();
        agent = AgentProcess::start_with_env(&config_path, &[("PATCHD_FAULT", point)]);
        let mut rpc = AgentRpc::connect(&pki, agent.addr);
        let answer = rpc.apply("worker-1", digest, &patch_id, false);
        assert!(
            answer.is_err(),
            "{point}: the agent should have died, got {answer:?}"
        );
        wait_for(
            Duration::from_secs(30),
            "the agent to die at the fault point",
            || !agent.is_running(),
        );
        let point_name = point.split(':').next().unwrap();
        assert!(
            agent
                .stderr()
                .contains(&format!("injected crash at {point_name}")),
            "{point}: {}",
            agent.stderr()
        );
        assert!(
            !["committed", "reverted", "failed"]
                .contains(&journal_phase(&state, "worker-1").as_str()),
            "{point}: the journal must show an unfinished apply before recovery"
        );
        reaper.track("worker-1");

        agent.restart();
        let phase = journal_phase(&state, "worker-1");
        let expected_phase = if point == "after-prepare" {
            "failed"
        } else {
            "reverted"
        };
        assert_eq!(
            phase,
            expected_phase,
            "{point}: journal {}",
            journal(&state, "worker-1")
        );
        assert_eq!(
            worker.file_hashes(),
            original,
            "{point}: every file must be the old one"
        );
        assert!(
            temporaries(&worker.deploy_dir).is_empty(),
            "{point}: {:?}",
            temporaries(&worker.deploy_dir)
        );
        worker.wait_serving("v1.0.0");
        let mut rpc = AgentRpc::connect(&pki, agent.addr);
        let status = rpc.status("worker-1");
        assert_eq!(status.state(), ServiceState::Running, "{point}");
        assert_eq!(
            Some(status.pid as i32),
            service_pid(&state, "worker-1"),
            "{point}"
        );
        assert!(pid_alive(status.pid as i32), "{point}");
        assert_eq!(status.binary_sha256, original.0, "{point}");
        assert!(!status.apply_in_flight, "{point}");
        reaper.track("worker-1");

        let replay = rpc.apply("worker-1", digest, &patch_id, false).unwrap();
        assert!(replay.replayed, "{point}: {replay:?}");
        let expected = if point == "after-prepare" {
            ApplyOutcome::Failed
        } else {
            ApplyOutcome::Reverted
        };
        assert_eq!(outcome(&replay), expected, "{point}: {replay:?}");
        assert!(
            replay.reason.contains("agent restarted"),
            "{point}: {}",
            replay.reason
        );
        assert_eq!(
            worker.file_hashes(),
            original,
            "{point}: a replay changes nothing"
        );
        assert_eq!(
            rpc.status("worker-1").pid,
            status.pid,
            "{point}: a replay does not restart"
        );
    }

    // After all that, a normal apply still commits (all-new).
    let mut rpc = AgentRpc::connect(&pki, agent.addr);
    let applied = rpc.apply("worker-1", &good_digest, "final", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    assert_eq!(worker.file_hashes(), package_hashes(&pkgs, "v2.0.0"));
    worker.wait_serving("v2.0.0");
    reaper.track("worker-1");
    let backups: Vec<_> = std::fs::read_dir(state.join("backups/worker-1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        backups,
        vec![std::ffi::OsString::from("final")],
        "interrupted applies leave no backup sets"
    );

    agent.stop();
    reaper.reap();
}
