//! End to end: Ctrl-C mid-rollout puts the drained node back online and exits 130, and `--resume` finishes the
//! job; SIGKILL of `patchctl` while an agent applies, then re-running the same command, resumes the rollout with
//! no node restarted twice.

use nix::sys::signal::Signal;
use patchd_e2e::cluster_fixture::{ClusterFixture, ORIGINAL_VERSION, output_text};
use patchd_e2e::wait_for;
use std::time::Duration;

#[test]
fn ctrl_c_puts_the_drained_node_back_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 3);
    // Each drain takes 3 s: Ctrl-C lands while worker-2 waits for its drain.
    cluster.set_drain("delay", 3000);
    let before = cluster.version_of("worker-2").unwrap();
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let mut patch = cluster.spawn_patchctl(
        "patch",
        &["patch", &cluster.name, package.to_str().unwrap(), "-y"],
    );
    cluster.wait_drain_started("worker-2", Duration::from_secs(90));
    patch.signal(Signal::SIGINT);
    let code = patch.wait(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(130),
        "stdout:\n{}\nstderr:\n{}",
        patch.stdout_text(),
        patch.stderr_text()
    );
    assert!(
        patch.stdout_text().contains("patchctl patch --resume c"),
        "{}",
        patch.stdout_text()
    );

    assert_eq!(
        cluster.version_of("worker-1").unwrap().version,
        "v1.0.1-hotfix"
    );
    let interrupted = cluster.version_of("worker-2").unwrap();
    assert_eq!(
        (interrupted.version.as_str(), interrupted.pid),
        (ORIGINAL_VERSION, before.pid),
        "not restarted"
    );
    let calls = cluster.master_calls();
    assert!(
        calls
            .iter()
            .any(|c| c.method == "POST" && c.path == "/api/members/worker-2/online"),
        "{calls:#?}"
    );
    cluster.wait_back_online("worker-2", Duration::from_secs(10));
    assert_eq!(
        cluster.version_of("worker-3").unwrap().version,
        ORIGINAL_VERSION
    );
    assert_eq!(cluster.node("worker-3").start_count(), 1);

    cluster.set_drain("normal", 0);
    let resumed = cluster.patchctl(&["patch", "--resume", &cluster.name]);
    assert_eq!(resumed.status.code(), Some(0), "{}", output_text(&resumed));
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            "v1.0.1-hotfix",
            "{}",
            worker.name
        );
        assert_eq!(
            worker.start_count(),
            2,
            "{} restarted exactly once",
            worker.name
        );
    }
}

#[test]
fn sigkill_during_an_apply_then_rerun_resumes_without_a_second_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 3);
    // The new version takes 2 s to listen: the agent's apply of worker-2 is in flight long enough to kill patchctl.
    let package = cluster.worker_package_slow("v1.0.1-hotfix", 2000);
    let args = [
        "patch",
        cluster.name.as_str(),
        package.to_str().unwrap(),
        "-y",
    ];
    let mut patch = cluster.spawn_patchctl("first", &args);
    let worker_2 = cluster.node("worker-2");
    wait_for(
        Duration::from_secs(90),
        "worker-2's new version to be started",
        || worker_2.start_count() >= 2,
    );
    patch.signal(Signal::SIGKILL);
    assert_eq!(
        patch.wait(Duration::from_secs(10)),
        None,
        "killed by the signal"
    );
    assert_eq!(
        cluster.node("worker-3").start_count(),
        1,
        "worker-3 was not reached"
    );

    // Re-running the same command finds the unfinished rollout of this package and resumes it.
    let rerun = cluster.patchctl(&args);
    assert_eq!(rerun.status.code(), Some(0), "{}", output_text(&rerun));
    assert!(
        String::from_utf8_lossy(&rerun.stderr).contains("resuming"),
        "{}",
        output_text(&rerun)
    );
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            "v1.0.1-hotfix",
            "{}",
            worker.name
        );
        assert_eq!(
            worker.start_count(),
            2,
            "{} restarted exactly once; {}",
            worker.name,
            output_text(&rerun)
        );
        assert_ne!(
            cluster.member_state(&worker.name).as_deref(),
            Some("Offline"),
            "{} online",
            worker.name
        );
    }
    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert_eq!(shown.matches("demo-worker (patched)").count(), 3, "{shown}");
}
