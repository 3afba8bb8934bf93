//! Fault isolation with a real agent: one service's unreadable journal quarantines that service only (the agent
//! starts, serves and patches the others, and reports the quarantine in Status and `patchctl display`); an
//! interrupted apply is recovered and its service started on a state disk filled to the last byte (the journal's
//! space reserve); and following the corrupt-journal advice (move it aside) keeps the backup sets.

use patchd_e2e::apply_support::{
    AgentRpc, ServiceReaper, WorkerRig, WorkerService, http_get, journal, journal_phase, outcome,
    push, worker_package,
};
use patchd_e2e::cluster_fixture::{ClusterFixture, FixtureOptions};
use patchd_e2e::tmpfs::Tmpfs;
use patchd_e2e::{AgentConfig, AgentProcess, Pki, sha256_file, wait_for};
use patchd_proto::v1::{self, ApplyOutcome, ServiceState};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn journal_path(state: &Path, service: &str) -> PathBuf {
    state.join("journal").join(format!("{service}.json"))
}

/// Pushes and stages `package` for `service`; its digest.
fn push_and_stage(rig: &WorkerRig, service: &str, package: &Path) -> String {
    let digest = push(&rig.pki, &rig.agent.addr_string(), package);
    AgentRpc::connect(&rig.pki, rig.agent.addr)
        .stage(service, &digest)
        .unwrap_or_else(|e| panic!("stage {service}: {e}"));
    digest
}

#[test]
fn an_unreadable_journal_quarantines_one_service_and_the_agent_serves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let agent_dir = dir.path().join("agent-1");
    let first = WorkerService::new(&agent_dir.join("deploy"), "worker-1");
    let second = WorkerService::new(&agent_dir.join("deploy"), "worker-2");
    first.install("v1.0.0");
    second.install("v1.0.0");
    let config = AgentConfig::new(&agent_dir, &tls)
        .extra(&first.toml("200ms", "8s"))
        .extra(&second.toml("200ms", "8s"));
    let config_path = config.write();
    let state = config.state_path().to_path_buf();
    let reaper = ServiceReaper::new(&state);
    let agent = AgentProcess::start(&config_path);
    first.wait_serving("v1.0.0");
    second.wait_serving("v1.0.0");
    reaper.track("worker-1");
    reaper.track("worker-2");
    let mut rig = WorkerRig {
        agent,
        reaper,
        worker: first.clone(),
        pki,
        config_path,
        state,
        dir,
    };

    let package = worker_package(&rig.packages(), "v1.0.1", "ok");
    let digest = push_and_stage(&rig, "worker-1", &package);
    push_and_stage(&rig, "worker-2", &package);
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let applied = rpc.apply("worker-1", &digest, "p1", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    first.wait_serving("v1.0.1");
    rig.reaper.track("worker-1");
    let deployed = first.file_hashes();

    // worker-1's journal is garbage, then (second round) a directory: the agent must start either way.
    for (round, breakage) in ["garbage", "directory"].into_iter().enumerate() {
        rig.agent.stop();
        let path = journal_path(&rig.state, "worker-1");
        if path.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        if breakage == "garbage" {
            std::fs::write(&path, b"{\"current\": {\"phase\": ").unwrap();
        } else {
            std::fs::create_dir(&path).unwrap();
        }
        rig.agent = AgentProcess::try_start(&rig.config_path, &[]).unwrap_or_else(|e| {
            panic!("{breakage}: one bad journal must not keep the agent from starting: {e}")
        });
        let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);

        let status = rpc.status("worker-1");
        assert!(
            status.quarantine.contains(&path.display().to_string())
                && status.quarantine.contains("refuses Apply and Rollback"),
            "{breakage}: {}",
            status.quarantine
        );
        assert!(
            status.quarantine.contains("move it aside"),
            "{breakage}: {}",
            status.quarantine
        );
        assert!(
            rpc.status("worker-2").quarantine.is_empty(),
            "{breakage}: only the bad service is quarantined"
        );
        let refused = rpc
            .apply("worker-1", &digest, &format!("again-{round}"), false)
            .unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("quarantined") && refused.message().contains("worker-1"),
            "{}",
            refused.message()
        );
        assert!(
            rpc.rollback("worker-1", "", &format!("undo-{round}"))
                .is_err(),
            "{breakage}: rollback of a quarantined service is refused"
        );
        // Left as it is: still the patched files, still serving, its backup set untouched.
        assert_eq!(first.file_hashes(), deployed, "{breakage}");
        assert_eq!(first.served_version().as_deref(), Some("v1.0.1"));
        assert!(rig.state.join("backups/worker-1/p1").is_dir(), "{breakage}");
        assert!(
            path.exists(),
            "{breakage}: the bad journal is left for the operator"
        );

        // The other service is served: a patch of it commits.
        let version = format!("v1.0.{}", round + 2);
        let package = worker_package(&rig.packages(), &version, "ok");
        let digest_other = push_and_stage(&rig, "worker-2", &package);
        let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
        let patched = rpc
            .apply("worker-2", &digest_other, &format!("other-{round}"), false)
            .unwrap();
        assert_eq!(outcome(&patched), ApplyOutcome::Committed, "{patched:?}");
        second.wait_serving(&version);
        rig.reaper.track("worker-2");
        assert_eq!(rpc.status("worker-2").state(), ServiceState::Running);
    }
    rig.stop();
}

/// `patchctl display` shows a quarantined node's reason and what to do.
#[test]
fn display_shows_a_quarantined_service_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            masters: 1,
            workers: 2,
            first_host: 41,
            ..Default::default()
        },
    );
    let node = cluster.node("worker-1").clone();
    let agent = cluster.agent("worker-1").expect("worker-1's agent runs");
    // The topology names the port the agent got at its first start: keep it across the restart.
    let config = agent.config_path().to_path_buf();
    let text = std::fs::read_to_string(&config).unwrap();
    let fixed = text.replace(
        &format!("listen = \"{}:0\"", node.host),
        &format!("listen = \"{}\"", agent.addr),
    );
    assert_ne!(text, fixed, "the fixture's agent listens on port 0: {text}");
    std::fs::write(&config, fixed).unwrap();
    agent.stop();
    let path = journal_path(&node.state_dir(), "demo-worker");
    std::fs::write(&path, b"not json at all").unwrap();
    agent.restart();

    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    let problems = shown
        .split_once("Problems:")
        .map(|(_, problems)| problems.to_string())
        .unwrap_or_else(|| panic!("no problems listed:\n{shown}"));
    let line = problems
        .lines()
        .find(|line| line.contains(&node.id()) && line.contains("quarantined"))
        .unwrap_or_else(|| panic!("no quarantine line for {}:\n{shown}", node.id()));
    assert!(
        line.contains(&path.display().to_string()) && line.contains("move it aside"),
        "{line}"
    );
    let other = cluster.node("worker-2").id();
    assert!(
        !problems.contains(&other),
        "the other node is not affected:\n{shown}"
    );
}

/// A [`WorkerRig`] whose state dir is on its own tmpfs, with the original file hashes and the v1.0.1 package.
/// The rig drops before the tmpfs (the service's log is on it).
struct FullDiskRig {
    rig: WorkerRig,
    original: (String, String),
    package: PathBuf,
    tmpfs: Tmpfs,
}

impl FullDiskRig {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tmpfs = Tmpfs::mount("512m");
        let pki = Pki::new(dir.path());
        let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
        let agent_dir = dir.path().join("agent-1");
        let worker = WorkerService::new(&agent_dir.join("deploy"), "worker-1");
        worker.install("v1.0.0");
        let original = worker.file_hashes();
        let state = tmpfs.path.join("state");
        let config = AgentConfig::new(&agent_dir, &tls)
            .state_dir(&state)
            .extra(&worker.toml("300ms", "8s"));
        let config_path = config.write();
        let reaper = ServiceReaper::new(&state);
        let agent = AgentProcess::start(&config_path);
        worker.wait_serving("v1.0.0");
        reaper.track("worker-1");
        let rig = WorkerRig {
            agent,
            reaper,
            worker,
            pki,
            config_path,
            state: state.clone(),
            dir,
        };
        assert!(
            state.join("journal/.space-reserve").is_file(),
            "the agent takes its space reserve at start"
        );
        let package = worker_package(&rig.packages(), "v1.0.1", "ok");
        Self {
            rig,
            original,
            package,
            tmpfs,
        }
    }

    /// Pushes and stages the package, then runs an apply that kills the agent at `point`; the digest.
    fn interrupted_apply(&mut self, point: &str, patch_id: &str) -> String {
        let rig = &mut self.rig;
        let digest = push_and_stage(rig, "worker-1", &self.package);
        rig.agent.kill();
        rig.agent = AgentProcess::start_with_env(&rig.config_path, &[("PATCHD_FAULT", point)]);
        let answer =
            AgentRpc::connect(&rig.pki, rig.agent.addr).apply("worker-1", &digest, patch_id, false);
        assert!(
            answer.is_err(),
            "{point}: the agent should have died: {answer:?}"
        );
        let agent = &mut rig.agent;
        wait_for(Duration::from_secs(30), "the agent to die", || {
            !agent.is_running()
        });
        rig.reaper.track("worker-1");
        assert!(
            !["committed", "reverted", "failed"]
                .contains(&journal_phase(&rig.state, "worker-1").as_str()),
            "{point}: an unfinished apply must be left for recovery"
        );
        digest
    }

    /// Restarts the agent on the full disk (it must start) and checks that the previous version was restored and
    /// is served by a running service.
    fn restart_and_check_restored(&mut self, what: &str) -> v1::ServiceStatus {
        let rig = &mut self.rig;
        rig.agent = AgentProcess::try_start(&rig.config_path, &[]).unwrap_or_else(|e| {
            panic!("{what}: the agent must start and recover on a full state disk: {e}")
        });
        rig.worker.wait_serving("v1.0.0");
        rig.reaper.track("worker-1");
        assert_eq!(rig.worker.file_hashes(), self.original, "{what}");
        let status = AgentRpc::connect(&rig.pki, rig.agent.addr).status("worker-1");
        assert_eq!(status.state(), ServiceState::Running, "{what}");
        status
    }
}

#[test]
fn an_interrupted_apply_is_recovered_and_started_on_a_full_state_disk() {
    let mut disk = FullDiskRig::start();
    for point in ["after-swap:1", "during-probation:2"] {
        let patch_id = format!("p-{}", point.replace(':', "-"));
        let digest = disk.interrupted_apply(point, &patch_id);
        disk.tmpfs.fill();
        let status = disk.restart_and_check_restored(point);
        let rig = &mut disk.rig;
        assert_eq!(
            journal_phase(&rig.state, "worker-1"),
            "reverted",
            "{point}: {}",
            journal(&rig.state, "worker-1")
        );
        assert!(
            status.quarantine.is_empty(),
            "{point}: {}",
            status.quarantine
        );
        assert!(
            rig.agent
                .stderr()
                .contains("released the journal's space reserve"),
            "{point}: {}",
            rig.agent.stderr()
        );

        // Space comes back: the next apply retakes the reserve.
        std::fs::remove_file(disk.tmpfs.path.join("filler")).unwrap();
        let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
        let done = rpc
            .apply("worker-1", &digest, &format!("{patch_id}-again"), false)
            .unwrap();
        assert_eq!(outcome(&done), ApplyOutcome::Committed, "{done:?}");
        rig.worker.wait_serving("v1.0.1");
        rig.reaper.track("worker-1");
        assert!(
            rig.state.join("journal/.space-reserve").is_file(),
            "{point}: the reserve is taken again once there is room"
        );
        let back = rpc
            .rollback("worker-1", "", &format!("{patch_id}-undo"))
            .unwrap();
        assert_eq!(outcome(&back), ApplyOutcome::Committed, "{back:?}");
        rig.worker.wait_serving("v1.0.0");
        rig.reaper.track("worker-1");
    }
    disk.rig.stop();
}

/// With the reserve already used up, no journal write succeeds: recovery still restores the previous files and
/// starts the service, quarantines it (refusing changes), and leaves the journal saying "unfinished", so the
/// start after space was freed restores again and finishes it.
#[test]
fn without_its_reserve_recovery_still_restores_and_starts_and_the_next_start_finishes() {
    let mut disk = FullDiskRig::start();
    let _untracked = KillWhoeverServes(disk.rig.worker.clone());
    let digest = disk.interrupted_apply("after-swap:1", "p1");
    std::fs::remove_file(disk.rig.state.join("journal/.space-reserve")).unwrap();
    disk.tmpfs.fill();
    let status = disk.restart_and_check_restored("no reserve");
    assert!(
        status.quarantine.contains("next start") && status.quarantine.contains("restart patchd"),
        "{}",
        status.quarantine
    );
    let rig = &mut disk.rig;
    assert_eq!(journal_phase(&rig.state, "worker-1"), "swapping");
    assert!(
        rig.state.join("backups/worker-1/p1").is_dir(),
        "kept for the next start"
    );
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let refused = rpc.apply("worker-1", &digest, "p2", false).unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    std::fs::remove_file(disk.tmpfs.path.join("filler")).unwrap();
    rig.agent.stop();
    rig.agent = AgentProcess::start(&rig.config_path);
    rig.worker.wait_serving("v1.0.0");
    rig.reaper.track("worker-1");
    assert_eq!(journal_phase(&rig.state, "worker-1"), "reverted");
    assert_eq!(rig.worker.file_hashes(), disk.original);
    assert!(
        !rig.state.join("backups/worker-1/p1").exists(),
        "the finished apply's backups are removed"
    );
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    assert!(rpc.status("worker-1").quarantine.is_empty());
    assert!(
        rpc.apply("worker-1", &digest, "p1", false)
            .unwrap()
            .replayed
    );
    disk.rig.stop();
}

/// Known limit of the process backend (not of this feature): on a full disk the service's pid file cannot be
/// written, so a later agent cannot adopt the process started then, and the reaper (which reads pid files) does
/// not know it. When dropped, this SIGKILLs whatever serves on the worker's address, by the pid `/version` reports.
struct KillWhoeverServes(WorkerService);

impl Drop for KillWhoeverServes {
    fn drop(&mut self) {
        let Some((200, body)) = http_get(&self.0.listen, "/version") else {
            return;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&body) else {
            return;
        };
        if let Some(pid) = value["pid"].as_i64().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn moving_a_corrupt_journal_aside_keeps_the_backup_sets() {
    let mut rig = WorkerRig::start("300ms");
    let original = rig.worker.file_hashes();
    let package = worker_package(&rig.packages(), "v1.0.1", "ok");
    let digest = push_and_stage(&rig, "worker-1", &package);
    // An apply interrupted mid-swap: its backup set holds the only copy of the previous files.
    rig.agent.kill();
    rig.agent = AgentProcess::start_with_env(&rig.config_path, &[("PATCHD_FAULT", "after-swap:1")]);
    let answer =
        AgentRpc::connect(&rig.pki, rig.agent.addr).apply("worker-1", &digest, "p1", false);
    assert!(answer.is_err(), "the agent should have died: {answer:?}");
    let agent = &mut rig.agent;
    wait_for(Duration::from_secs(30), "the agent to die", || {
        !agent.is_running()
    });
    rig.reaper.track("worker-1");
    let set = rig.state.join("backups/worker-1/p1");
    let mut backed_up: Vec<String> = std::fs::read_dir(&set)
        .unwrap()
        .map(|entry| sha256_file(&entry.unwrap().path()))
        .collect();
    backed_up.sort();
    let mut expected = vec![original.0.clone(), original.1.clone()];
    expected.sort();
    assert_eq!(backed_up, expected, "the set holds the previous files");

    let path = journal_path(&rig.state, "worker-1");
    std::fs::write(&path, b"\x00\x01 corrupted").unwrap();
    rig.agent = AgentProcess::start(&rig.config_path);
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let advice = rpc.status("worker-1").quarantine;
    assert!(advice.contains("move it aside"), "{advice}");
    assert!(set.is_dir(), "quarantine leaves the backups alone");

    // Follow the advice.
    rig.agent.stop();
    std::fs::rename(&path, path.with_extension("json.bad")).unwrap();
    rig.agent = AgentProcess::start(&rig.config_path);
    rig.reaper.track("worker-1");
    let kept = rig.state.join("quarantine/worker-1/p1");
    let mut still: Vec<String> = std::fs::read_dir(&kept)
        .unwrap_or_else(|e| panic!("the set must be kept at {}: {e}", kept.display()))
        .map(|entry| sha256_file(&entry.unwrap().path()))
        .collect();
    still.sort();
    assert_eq!(still, expected, "every backed-up file is kept");
    assert!(
        advice.contains(&rig.state.join("quarantine/worker-1").display().to_string()),
        "the advice names where the sets go: {advice}"
    );
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let status = rpc.status("worker-1");
    assert!(status.quarantine.is_empty(), "{}", status.quarantine);
    assert_eq!(
        status.quarantined_backups,
        vec![kept.display().to_string()],
        "listed in Status"
    );
    assert!(
        rig.agent.stderr().contains(&kept.display().to_string()),
        "and in the agent's log"
    );
    // The service takes patches again.
    let done = rpc.apply("worker-1", &digest, "p2", false).unwrap();
    assert_eq!(outcome(&done), ApplyOutcome::Committed, "{done:?}");
    rig.worker.wait_serving("v1.0.1");
    rig.reaper.track("worker-1");
    rig.stop();
}
