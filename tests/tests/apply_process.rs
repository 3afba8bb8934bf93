//! End-to-end apply on one real agent with a real demo-worker run by the `process` backend, driven over mutual
//! TLS: swap + restart + probation + commit, automatic revert of a crashing and of an unhealthy version, offline
//! swap, rollback (last patch, then to before a given patch), replays, adoption of the running service after an
//! agent crash, and refusals (confinement, unknown service, unstaged package, bad patch id).

use patchd_e2e::apply_support::{
    AgentRpc, WorkerRig, WorkerService, as_format_1, digest_of, outcome, package_hashes, pid_alive,
    push, service_pid, worker_package, worker_package_delayed,
};
use patchd_e2e::{AgentConfig, AgentProcess, Pki};
use patchd_proto::v1::{ApplyOutcome, ServiceState};
use tonic::Code;

#[test]
fn apply_commit_revert_offline_rollback_and_refusals() {
    let mut rig = WorkerRig::start("500ms");
    let pkgs = rig.packages();
    let agent = &mut rig.agent;
    let (pki, worker, state, reaper, dir) =
        (&rig.pki, &rig.worker, &rig.state, &rig.reaper, &rig.dir);
    let original = worker.file_hashes();

    let good = worker_package(&pkgs, "v1.1.0", "ok");
    let crash = worker_package(&pkgs, "v1.1.1-crash", "crash");
    let sick = worker_package(&pkgs, "v1.1.2-sick", "fail-health");
    let next = worker_package(&pkgs, "v1.2.0", "ok");
    let slow = worker_package_delayed(&pkgs, "v1.3.0-slow", "slow-start", 1500);

    let mut rpc = AgentRpc::connect(pki, agent.addr);
    let status = rpc.status("worker-1");
    assert_eq!(status.state(), ServiceState::Running);
    assert_eq!(
        status.binary_sha256, original.0,
        "status reports the deployed binary's sha256 read from disk"
    );
    assert_eq!(status.version, "");
    let first_pid = status.pid;

    // Refusals before anything is staged.
    let good_digest = push(pki, &agent.addr_string(), &good);
    let err = rpc
        .apply("worker-1", &good_digest, "p1", false)
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "apply before stage: {err:?}");
    assert!(err.message().contains("Stage"), "{}", err.message());
    let err = rpc.stage("nope", &good_digest).unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("worker-1"),
        "the error lists the managed services: {}",
        err.message()
    );
    let err = rpc
        .apply("worker-1", &good_digest, "../p1", false)
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Stage is idempotent.
    let staged = rpc.stage("worker-1", &good_digest).unwrap();
    assert!(!staged.already_staged);
    assert_eq!(staged.manifest.as_ref().unwrap().version, "v1.1.0");
    assert!(rpc.stage("worker-1", &good_digest).unwrap().already_staged);

    // 1. A good version: swap, restart, probation, commit.
    let applied = rpc.apply("worker-1", &good_digest, "p1", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    assert!(!applied.replayed);
    assert_eq!(worker.served_version().as_deref(), Some("v1.1.0"));
    let good_hashes = package_hashes(&pkgs, "v1.1.0");
    assert_eq!(worker.file_hashes(), good_hashes);
    assert_eq!(applied.binary_sha256, good_hashes.0);
    assert!(
        applied.downtime_ms > 0 && applied.downtime_ms < 8_000,
        "downtime {}",
        applied.downtime_ms
    );
    let status = rpc.status("worker-1");
    assert_eq!(status.version, "v1.1.0");
    assert_eq!(status.binary_sha256, good_hashes.0);
    assert_ne!(status.pid, first_pid, "the service was restarted");
    assert_eq!(status.history.len(), 1);
    assert!(!pid_alive(first_pid as i32), "the old process is gone");
    reaper.track("worker-1");
    let replay = rpc.apply("worker-1", &good_digest, "p1", false).unwrap();
    assert!(replay.replayed);
    assert_eq!(outcome(&replay), ApplyOutcome::Committed);
    assert_eq!(
        rpc.status("worker-1").pid,
        status.pid,
        "a replay does not restart"
    );

    // 2. A version that crashes at start: reverted by the agent, previous version serving again.
    let crash_digest = push(pki, &agent.addr_string(), &crash);
    rpc.stage("worker-1", &crash_digest).unwrap();
    let reverted = rpc.apply("worker-1", &crash_digest, "p2", false).unwrap();
    assert_eq!(outcome(&reverted), ApplyOutcome::Reverted, "{reverted:?}");
    assert!(
        reverted.reason.contains("exited with status"),
        "reason names the exit: {}",
        reverted.reason
    );
    assert!(
        reverted
            .log_tail
            .iter()
            .any(|l| l.contains("crashing on start")),
        "log tail shows the service's output: {:?}",
        reverted.log_tail
    );
    assert_eq!(
        worker.file_hashes(),
        good_hashes,
        "every file is back to the previous version"
    );
    assert_eq!(worker.served_version().as_deref(), Some("v1.1.0"));
    reaper.track("worker-1");

    // 3. A version whose health check fails: reverted after the probation timeout.
    let sick_digest = push(pki, &agent.addr_string(), &sick);
    rpc.stage("worker-1", &sick_digest).unwrap();
    let reverted = rpc.apply("worker-1", &sick_digest, "p3", false).unwrap();
    assert_eq!(outcome(&reverted), ApplyOutcome::Reverted, "{reverted:?}");
    assert!(
        reverted.reason.contains("not healthy") && reverted.reason.contains("500"),
        "{}",
        reverted.reason
    );
    assert_eq!(worker.file_hashes(), good_hashes);
    assert_eq!(worker.served_version().as_deref(), Some("v1.1.0"));
    reaper.track("worker-1");
    let status = rpc.status("worker-1");
    assert_eq!(status.version, "v1.1.0");
    assert_eq!(status.last.as_ref().unwrap().patch_id, "p3");

    // 4. Offline: files swapped, the running process untouched.
    let next_digest = push(pki, &agent.addr_string(), &next);
    rpc.stage("worker-1", &next_digest).unwrap();
    let pid_before = rpc.status("worker-1").pid;
    let offline = rpc.apply("worker-1", &next_digest, "p4", true).unwrap();
    assert_eq!(
        outcome(&offline),
        ApplyOutcome::OfflineSwapped,
        "{offline:?}"
    );
    assert_eq!(worker.file_hashes(), package_hashes(&pkgs, "v1.2.0"));
    assert_eq!(
        worker.served_version().as_deref(),
        Some("v1.1.0"),
        "still the old process"
    );
    assert_eq!(rpc.status("worker-1").pid, pid_before);

    // 5. Rollback of the last patch (the offline one), with a restart and probation.
    let rolled = rpc.rollback("worker-1", "", "r1").unwrap();
    assert_eq!(outcome(&rolled), ApplyOutcome::Committed, "{rolled:?}");
    assert_eq!(worker.file_hashes(), good_hashes);
    worker.wait_serving("v1.1.0");
    assert_eq!(rpc.status("worker-1").version, "v1.1.0");
    reaper.track("worker-1");

    // 6. Rollback to the version before p1: the original files.
    let rolled = rpc.rollback("worker-1", "p1", "r2").unwrap();
    assert_eq!(outcome(&rolled), ApplyOutcome::Committed, "{rolled:?}");
    assert_eq!(worker.file_hashes(), original);
    assert_eq!(worker.served_version().as_deref(), Some("v1.0.0"));
    let status = rpc.status("worker-1");
    assert_eq!(status.version, "");
    assert!(status.history.is_empty());
    assert!(rpc.rollback("worker-1", "p1", "r2").unwrap().replayed);
    let err = rpc.rollback("worker-1", "", "r3").unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "nothing left to roll back: {err:?}"
    );
    reaper.track("worker-1");

    // 6b. A version that takes 1.5 s to listen: probation waits for its health check, then commits.
    let slow_digest = push(pki, &agent.addr_string(), &slow);
    rpc.stage("worker-1", &slow_digest).unwrap();
    let applied = rpc.apply("worker-1", &slow_digest, "p5", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    assert!(
        applied.downtime_ms >= 1500,
        "unavailable until it answered: {} ms",
        applied.downtime_ms
    );
    assert_eq!(worker.served_version().as_deref(), Some("v1.3.0-slow"));
    reaper.track("worker-1");

    // 7. The agent crashes (kill -9): the service keeps running and is adopted, not started twice.
    let pid = service_pid(state, "worker-1").unwrap();
    agent.kill();
    assert!(pid_alive(pid), "the service outlives the agent");
    agent.restart();
    let mut rpc = AgentRpc::connect(pki, agent.addr);
    let status = rpc.status("worker-1");
    assert_eq!(status.pid as i32, pid, "adopted through the pid file");
    assert_eq!(status.state(), ServiceState::Running);
    assert_eq!(status.version, "v1.3.0-slow");
    assert_eq!(worker.served_version().as_deref(), Some("v1.3.0-slow"));

    // 8. Confinement: a directory of the deploy dir replaced by a symlink leading outside the deploy roots.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let conf_dir = worker.conf().parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&conf_dir).unwrap();
    std::os::unix::fs::symlink(&outside, &conf_dir).unwrap();
    let err = rpc
        .apply("worker-1", &good_digest, "p9", false)
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("outside"), "{}", err.message());
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "nothing was written outside"
    );
    assert_eq!(worker.served_version().as_deref(), Some("v1.3.0-slow"));

    rig.stop();
}

/// A patchctl older than tree digest version 2 names packages by their version-1 (sha256) digest: today's agent
/// takes its upload, stages and applies it, and reports the patch under that name.
#[test]
fn a_package_uploaded_by_a_patchctl_before_tree_version_2_stages_and_applies() {
    let rig = WorkerRig::start("200ms");
    let pkgs = rig.packages();
    let original = rig.worker.file_hashes();
    // What such a patchctl sends: a package with a format-1 manifest (sha256 digests), under a version-1 name.
    let built = worker_package(&pkgs, "v1.1.0", "ok");
    let package = pkgs.join("worker-v1.1.0-format-1.tar.gz");
    as_format_1(&built, &package);
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let digest = rpc.upload_as_version_1(&package);
    assert_ne!(
        digest,
        digest_of(&package),
        "the version-1 name is not today's"
    );
    let staged = rpc.stage("worker-1", &digest).unwrap();
    let manifest = staged.manifest.as_ref().unwrap();
    assert_eq!(manifest.version, "v1.1.0");
    let binary = manifest
        .files
        .iter()
        .find(|file| file.path == "demo-worker/demo-worker")
        .unwrap();
    let (binary_sha256, conf_sha256) = package_hashes(&pkgs, "v1.1.0");
    assert_eq!(binary.digest, binary_sha256, "checked as sha256");
    let applied = rpc.apply("worker-1", &digest, "p1", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    assert_eq!(rig.worker.served_version().as_deref(), Some("v1.1.0"));
    assert_eq!(rig.worker.file_hashes(), (binary_sha256, conf_sha256));
    let status = rpc.status("worker-1");
    assert_eq!(status.version, "v1.1.0");
    assert_eq!(
        status.last.as_ref().map(|patch| patch.digest.as_str()),
        Some(digest.as_str())
    );
    // Today's package over it: the files deployed from the format-1 package are compared in BLAKE3 and replaced;
    // rolling that back checks their backups in BLAKE3, as the format-2 plan recorded them.
    let next = worker_package(&pkgs, "v1.2.0", "ok");
    let next_digest = push(&rig.pki, &rig.agent.addr_string(), &next);
    rpc.stage("worker-1", &next_digest).unwrap();
    let applied = rpc.apply("worker-1", &next_digest, "p2", false).unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    assert_eq!(rig.worker.served_version().as_deref(), Some("v1.2.0"));
    assert_eq!(rig.worker.file_hashes(), package_hashes(&pkgs, "v1.2.0"));
    let rolled_back = rpc.rollback("worker-1", "", "r1").unwrap();
    assert_eq!(
        outcome(&rolled_back),
        ApplyOutcome::Committed,
        "{rolled_back:?}"
    );
    assert_eq!(rig.worker.file_hashes(), package_hashes(&pkgs, "v1.1.0"));
    rig.worker.wait_serving("v1.1.0");
    // Rolling back the format-1 patch itself checks its backups of the original files in sha256, as its plan
    // recorded them.
    let rolled_back = rpc.rollback("worker-1", "p1", "r2").unwrap();
    assert_eq!(
        outcome(&rolled_back),
        ApplyOutcome::Committed,
        "{rolled_back:?}"
    );
    assert_eq!(rig.worker.file_hashes(), original);
    rig.worker.wait_serving("v1.0.0");
    rig.stop();
}

#[test]
fn a_service_outside_the_deploy_roots_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-2", &["127.0.0.1"]);
    let agent_dir = dir.path().join("agent-2");
    let worker = WorkerService::new(&dir.path().join("elsewhere"), "worker-x");
    let config = AgentConfig::new(&agent_dir, &tls).extra(&worker.toml("500ms", "5s"));
    let config_path = config.write();
    let err = AgentProcess::try_start(&config_path, &[])
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("deploy root"), "{err}");
}
