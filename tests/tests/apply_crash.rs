//! Crash safety of apply with a real agent: the agent kills itself (SIGKILL, `PATCHD_FAULT=<point>[:n]`, binaries
//! built with `--features patchd-agent/fault-injection`) at every fault point in turn; after a restart, recovery
//! must leave the service's deploy dir exactly as before (every file old, files and directories the package adds
//! gone; no fault point lies after the commit), the service running and serving the old version, the journal
//! final, no temporaries, and a repeated Apply with the same patch id must replay the recorded result without
//! changing anything.

use patchd_e2e::apply_support::{
    AgentRpc, WorkerRig, journal, journal_phase, outcome, package_hashes, pid_alive, push,
    service_pid, worker_package,
};
use patchd_e2e::{AgentProcess, sha256_file, wait_for};
use patchd_proto::v1::{ApplyOutcome, ServiceState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// Every entry under `dir`: relative path → sha256 of a file, or "dir".
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut entries = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap().flatten() {
            let path = entry.path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if entry.file_type().unwrap().is_dir() {
                entries.insert(name, "dir".to_string());
                stack.push(path);
            } else {
                entries.insert(name, sha256_file(&path));
            }
        }
    }
    entries
}

/// A [`WorkerRig`] (agent and `worker-1` at v1.0.0), and the state crashes must come back to.
struct CrashRig {
    rig: WorkerRig,
    /// The deploy dir and the version served before the operation that crashes: recovery must restore both.
    original: BTreeMap<String, String>,
    serving: String,
}

impl std::ops::Deref for CrashRig {
    type Target = WorkerRig;
    fn deref(&self) -> &WorkerRig {
        &self.rig
    }
}

impl std::ops::DerefMut for CrashRig {
    fn deref_mut(&mut self) -> &mut WorkerRig {
        &mut self.rig
    }
}

/// The operation a crash interrupts.
#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    Apply(&'a str),
    /// Roll back the last committed patch.
    Rollback,
}

impl Op<'_> {
    fn call(
        self,
        rpc: &mut AgentRpc,
        patch_id: &str,
    ) -> Result<patchd_proto::v1::ApplyResponse, tonic::Status> {
        match self {
            Op::Apply(digest) => rpc.apply("worker-1", digest, patch_id, false),
            Op::Rollback => rpc.rollback("worker-1", "", patch_id),
        }
    }
}

impl CrashRig {
    fn stop(self) {
        self.rig.stop();
    }

    fn start() -> Self {
        let rig = WorkerRig::start("300ms");
        let original = tree(&rig.worker.deploy_dir);
        Self {
            rig,
            original,
            serving: "v1.0.0".to_string(),
        }
    }

    /// Pushes and stages `package`; its digest.
    fn push_and_stage(&self, package: &Path) -> String {
        let digest = push(&self.pki, &self.agent.addr_string(), package);
        AgentRpc::connect(&self.pki, self.agent.addr)
            .stage("worker-1", &digest)
            .unwrap();
        digest
    }

    /// Restarts the agent armed to die at `point`, runs `op`, checks it died there, restarts it, and checks that
    /// recovery left everything as it was before `op` and that a replay changes nothing.
    fn crash_and_recover(&mut self, point: &str, op: Op<'_>, patch_id: &str) {
        self.agent.kill();
        self.agent = AgentProcess::start_with_env(&self.config_path, &[("PATCHD_FAULT", point)]);
        let mut rpc = AgentRpc::connect(&self.pki, self.agent.addr);
        let answer = op.call(&mut rpc, patch_id);
        assert!(
            answer.is_err(),
            "{point}: the agent should have died, got {answer:?}"
        );
        let agent = &mut self.agent;
        wait_for(
            Duration::from_secs(30),
            "the agent to die at the fault point",
            || !agent.is_running(),
        );
        let point_name = point.split(':').next().unwrap();
        assert!(
            self.agent
                .stderr()
                .contains(&format!("injected crash at {point_name}")),
            "{point}: {}",
            self.agent.stderr()
        );
        assert!(
            !["committed", "reverted", "failed"]
                .contains(&journal_phase(&self.state, "worker-1").as_str()),
            "{point}: the journal must show an unfinished apply before recovery"
        );
        self.reaper.track("worker-1");

        self.agent.restart();
        let (expected_phase, expected_outcome) = if point == "after-prepare" {
            ("failed", ApplyOutcome::Failed)
        } else {
            ("reverted", ApplyOutcome::Reverted)
        };
        assert_eq!(
            journal_phase(&self.state, "worker-1"),
            expected_phase,
            "{point}: journal {}",
            journal(&self.state, "worker-1")
        );
        assert_eq!(
            tree(&self.worker.deploy_dir),
            self.original,
            "{point}: the deploy dir must be exactly as before"
        );
        assert!(
            temporaries(&self.worker.deploy_dir).is_empty(),
            "{point}: {:?}",
            temporaries(&self.worker.deploy_dir)
        );
        self.worker.wait_serving(&self.serving);
        let mut rpc = AgentRpc::connect(&self.pki, self.agent.addr);
        let status = rpc.status("worker-1");
        assert_eq!(status.state(), ServiceState::Running, "{point}");
        assert_eq!(
            Some(status.pid as i32),
            service_pid(&self.state, "worker-1"),
            "{point}"
        );
        assert!(pid_alive(status.pid as i32), "{point}");
        assert_eq!(status.binary_sha256, self.worker.file_hashes().0, "{point}");
        assert!(!status.apply_in_flight, "{point}");
        self.reaper.track("worker-1");

        let replay = op.call(&mut rpc, patch_id).unwrap();
        assert!(replay.replayed, "{point}: {replay:?}");
        assert_eq!(outcome(&replay), expected_outcome, "{point}: {replay:?}");
        assert!(
            replay.reason.contains("agent restarted"),
            "{point}: {}",
            replay.reason
        );
        assert_eq!(
            tree(&self.worker.deploy_dir),
            self.original,
            "{point}: a replay changes nothing"
        );
        assert_eq!(
            rpc.status("worker-1").pid,
            status.pid,
            "{point}: a replay does not restart"
        );
    }

    /// A normal apply of `digest` commits (also after crashes); the backups left are only its own. It becomes the
    /// state later crashes must come back to.
    fn apply_commits(&mut self, digest: &str, version: &str) {
        let mut rpc = AgentRpc::connect(&self.pki, self.agent.addr);
        let applied = rpc.apply("worker-1", digest, "final", false).unwrap();
        assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
        assert_eq!(
            self.worker.file_hashes(),
            package_hashes(&self.packages(), version)
        );
        self.worker.wait_serving(version);
        self.reaper.track("worker-1");
        let backups: Vec<_> = std::fs::read_dir(self.state.join("backups/worker-1"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            backups,
            vec![std::ffi::OsString::from("final")],
            "interrupted applies leave no backup sets"
        );
        self.original = tree(&self.worker.deploy_dir);
        self.serving = version.to_string();
    }
}

/// [`worker_package`] plus `plugins/extra.conf`: a file and a directory the deployed version does not have.
fn worker_package_adding_a_file(dir: &Path, version: &str, mode: &str) -> PathBuf {
    let built = worker_package(dir, version, mode);
    let root = dir.join(version).join("demo-worker");
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    std::fs::write(
        root.join("plugins/extra.conf"),
        format!("added in {version}\n"),
    )
    .unwrap();
    patchd_package::pack_dir(&root, version, &built).unwrap();
    built
}

#[test]
fn agent_killed_at_every_fault_point_recovers_to_the_old_version() {
    let mut rig = CrashRig::start();
    let pkgs = rig.packages();
    let good_digest = rig.push_and_stage(&worker_package(&pkgs, "v2.0.0", "ok"));
    let crash_digest = rig.push_and_stage(&worker_package(&pkgs, "v2.0.1-crash", "crash"));

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
        rig.crash_and_recover(point, Op::Apply(digest), &format!("crash-{index}"));
    }
    rig.apply_commits(&good_digest, "v2.0.0");
    rig.stop();
}

#[test]
fn a_package_adding_files_leaves_no_trace_after_a_crash() {
    let mut rig = CrashRig::start();
    let pkgs = rig.packages();
    let good_digest = rig.push_and_stage(&worker_package_adding_a_file(&pkgs, "v2.1.0", "ok"));
    let crash_digest = rig.push_and_stage(&worker_package_adding_a_file(
        &pkgs,
        "v2.1.1-crash",
        "crash",
    ));

    // Three swaps in order: conf/worker.toml, demo-worker, plugins/extra.conf (the added file, in an added
    // directory). A crash after the third, or while the third is being undone, leaves the new file behind.
    let points: [(&str, &str); 5] = [
        ("after-swap:2", &good_digest),
        ("after-swap:3", &good_digest),
        ("during-probation", &good_digest),
        ("during-revert:1", &crash_digest),
        ("during-revert:3", &crash_digest),
    ];
    for (index, (point, digest)) in points.into_iter().enumerate() {
        rig.crash_and_recover(point, Op::Apply(digest), &format!("add-crash-{index}"));
    }
    rig.apply_commits(&good_digest, "v2.1.0");
    assert_eq!(
        std::fs::read_to_string(
            rig.worker
                .deploy_dir
                .join("bin/demo-worker/plugins/extra.conf")
        )
        .unwrap(),
        "added in v2.1.0\n"
    );
    rig.stop();
}

#[test]
fn a_rollback_killed_at_every_fault_point_recovers_to_the_patched_version() {
    let mut rig = CrashRig::start();
    let v1 = rig.original.clone();
    let pkgs = rig.packages();
    let digest = rig.push_and_stage(&worker_package_adding_a_file(&pkgs, "v2.1.0", "ok"));
    rig.apply_commits(&digest, "v2.1.0");

    // Rolling back swaps three files: the old conf and binary back, and the added file out (its directory too).
    let points = [
        "after-prepare",
        "after-stop",
        "after-swap:1",
        "after-swap:3",
        "after-start",
        "during-probation",
        "before-commit",
    ];
    for (index, point) in points.into_iter().enumerate() {
        rig.crash_and_recover(point, Op::Rollback, &format!("rollback-crash-{index}"));
    }

    // After all that, the rollback itself still works: exactly the version installed at the start.
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    let rolled = rpc.rollback("worker-1", "", "rollback-final").unwrap();
    assert_eq!(outcome(&rolled), ApplyOutcome::Committed, "{rolled:?}");
    assert_eq!(
        tree(&rig.worker.deploy_dir),
        v1,
        "back to the original files, added ones gone"
    );
    rig.worker.wait_serving("v1.0.0");
    rig.reaper.track("worker-1");
    rig.stop();
}
