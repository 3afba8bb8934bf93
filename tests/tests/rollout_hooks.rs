//! End to end: `patchctl patch` on a real demo cluster calls the cluster API around every node in the right order,
//! patches the leader last, and leaves a node whose drain times out untouched and back online.

use patchd_e2e::cluster_fixture::{
    ClusterFixture, FixtureOptions, MasterCall, ORIGINAL_VERSION, output_text, process_start_ticks,
};
use std::time::Duration;

fn position(calls: &[MasterCall], method: &str, path: &str) -> usize {
    calls
        .iter()
        .position(|call| call.method == method && call.path == path)
        .unwrap_or_else(|| panic!("no {method} {path} in the call log: {calls:#?}"))
}

#[test]
fn hooks_run_in_order_around_each_worker_and_display_shows_the_patch() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 3);
    let before = cluster.worker_versions();
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");

    let out = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));

    let calls = cluster.master_calls();
    let mut previous_online = None;
    for (worker, old) in cluster.workers().zip(&before) {
        let member = format!("/api/members/{}", worker.name);
        let offline = position(&calls, "POST", &format!("{member}/offline"));
        let online = position(&calls, "POST", &format!("{member}/online"));
        assert!(
            offline < online,
            "{} offline after online: {calls:#?}",
            worker.name
        );
        // wait_offline polled between the two, wait_online after the online call.
        assert!(
            calls[offline..online]
                .iter()
                .any(|c| c.method == "GET" && c.path == member),
            "{calls:#?}"
        );
        assert!(
            calls[online..]
                .iter()
                .any(|c| c.method == "GET" && c.path == member),
            "{calls:#?}"
        );
        // One node at a time (default failure budget 0): the next drain starts after the previous node is back.
        if let Some(previous) = previous_online {
            assert!(
                previous < offline,
                "{} drained before the previous worker was back: {calls:#?}",
                worker.name
            );
        }
        previous_online = Some(online);
        let after = cluster.version_of(&worker.name).unwrap();
        assert_eq!(after.version, "v1.0.1-hotfix");
        assert_ne!(after.pid, old.pid, "{} was restarted", worker.name);
        assert_eq!(
            worker.start_count(),
            2,
            "{} started once more, no extra restart",
            worker.name
        );
        assert_ne!(
            cluster.member_state(&worker.name).as_deref(),
            Some("Offline"),
            "{} back online",
            worker.name
        );
    }

    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert!(
        shown.starts_with("Cluster name: c\nCluster version: v1.0.0\n"),
        "{shown}"
    );
    assert_eq!(shown.matches("demo-worker (patched)").count(), 3, "{shown}");
    assert_eq!(shown.matches("v1.0.1-hotfix").count(), 3, "{shown}");
    assert!(shown.contains("Healthy|L"), "{shown}");
    assert!(shown.contains("Total nodes: 4"), "{shown}");

    // Running the same patch again touches nothing: every node already runs the package.
    let again = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
    assert_eq!(again.status.code(), Some(0), "{}", output_text(&again));
    assert!(
        cluster.workers().all(|w| w.start_count() == 2),
        "{}",
        output_text(&again)
    );
    assert_eq!(
        String::from_utf8_lossy(&again.stdout)
            .matches("skipped")
            .count(),
        3,
        "{}",
        output_text(&again)
    );

    // Rollback is a rollout too: same hooks, one restart per node, back to the original version, marks cleared.
    let back = cluster.patchctl(&["rollback", &cluster.name, "-y"]);
    assert_eq!(back.status.code(), Some(0), "{}", output_text(&back));
    let calls = cluster.master_calls();
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            ORIGINAL_VERSION,
            "{}",
            worker.name
        );
        assert_eq!(worker.start_count(), 3, "{}", worker.name);
        let onlines = calls
            .iter()
            .filter(|c| {
                c.method == "POST" && c.path == format!("/api/members/{}/online", worker.name)
            })
            .count();
        assert_eq!(
            onlines, 2,
            "drained and put back once per rollout: {calls:#?}"
        );
    }
    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert!(!shown.contains("(patched)"), "{shown}");
}

#[test]
fn the_leader_is_patched_last() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::start(
        dir.path(),
        FixtureOptions {
            masters: 2,
            workers: 2,
            ..Default::default()
        },
    );
    // master-1 leads (smallest alive name); the planner must restart master-2 first.
    let package = cluster.master_package("v1.0.1-hotfix", "ok");
    let plan = cluster.patchctl_ok(&[
        "patch",
        &cluster.name,
        package.to_str().unwrap(),
        "--dry-run",
    ]);
    let first = plan.find(&cluster.node("master-2").id()).unwrap();
    let last = plan.find(&cluster.node("master-1").id()).unwrap();
    assert!(first < last, "{plan}");
    assert!(plan.contains("(leader)"), "{plan}");

    let out = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let leader = cluster.version_of("master-1").unwrap();
    let follower = cluster.version_of("master-2").unwrap();
    assert_eq!(leader.version, "v1.0.1-hotfix");
    assert_eq!(follower.version, "v1.0.1-hotfix");
    let leader_started = process_start_ticks(leader.pid).unwrap();
    let follower_started = process_start_ticks(follower.pid).unwrap();
    assert!(
        leader_started > follower_started,
        "the leader restarted after the follower: {}",
        output_text(&out)
    );
}

#[test]
fn a_drain_timeout_leaves_the_node_untouched_and_online() {
    let dir = tempfile::tempdir().unwrap();
    let options = FixtureOptions {
        masters: 1,
        workers: 2,
        drain_timeout: Duration::from_millis(1500),
        ..Default::default()
    };
    let cluster = ClusterFixture::start(dir.path(), options);
    cluster.set_drain("never", 0);
    let before = cluster.version_of("worker-1").unwrap();
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");

    let out = cluster.patchctl(&[
        "patch",
        &cluster.name,
        package.to_str().unwrap(),
        "-N",
        "worker-1",
        "-y",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("drain timed out"), "{}", output_text(&out));

    let after = cluster.version_of("worker-1").unwrap();
    assert_eq!(after.version, ORIGINAL_VERSION);
    assert_eq!(after.pid, before.pid, "not restarted");
    assert_eq!(cluster.node("worker-1").start_count(), 1);
    let calls = cluster.master_calls();
    let offline = position(&calls, "POST", "/api/members/worker-1/offline");
    let online = position(&calls, "POST", "/api/members/worker-1/online");
    assert!(
        offline < online,
        "put back online after the timeout: {calls:#?}"
    );
    assert_ne!(cluster.member_state("worker-1").as_deref(), Some("Offline"));
    let shown = cluster.patchctl_ok(&["display", &cluster.name]);
    assert!(!shown.contains("(patched)"), "{shown}");
}
