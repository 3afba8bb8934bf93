//! End to end: two controllers (two `PATCHCTL_HOME`s, each with its own store and its own certificate from the
//! same CA) start a rollout on the same nodes at once. Exactly one proceeds; the other is refused before it changes
//! anything, names the holder (its rollout, controller and expiry) and exits 1; both stores tell the truth in
//! `audit` and `display`; once the first rollout has ended (its leases released), the second controller can run.
//! And on one agent over its gRPC API: a lease refuses every other caller's Apply, survives an agent crash and
//! restart, and once expired is taken over by another rollout.

use patchd_e2e::apply_support::{AgentRpc, WorkerRig, outcome, push, worker_package};
use patchd_e2e::cluster_fixture::{Background, ClusterFixture, output_text};
use patchd_e2e::wait_for;
use patchd_proto::v1::{ApplyOutcome, LeaseAction};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

/// A second controller home for the fixture's cluster: certificate `ops-b` issued by the cluster CA, the same
/// topology imported with its `tls_dir` pointing at that identity.
fn second_controller(cluster: &ClusterFixture) -> PathBuf {
    let home = cluster.dir.join("home-b");
    let tls = home.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let issued = cluster.dir.join("issued-b");
    cluster.patchctl_ok(&[
        "cert",
        "issue",
        "ops-b",
        "--role",
        "controller",
        "--out",
        issued.to_str().unwrap(),
    ]);
    std::fs::copy(cluster.pki.ca_cert(), tls.join("ca.crt")).unwrap();
    std::fs::copy(issued.join("ops-b.crt"), tls.join("controller.crt")).unwrap();
    std::fs::copy(issued.join("ops-b.key"), tls.join("controller.key")).unwrap();
    let topology = std::fs::read_to_string(&cluster.topology_path).unwrap();
    let home_a_tls =
        serde_json::Value::String(cluster.pki.tls_dir().to_string_lossy().into_owned());
    let home_b_tls = serde_json::Value::String(tls.to_string_lossy().into_owned());
    assert!(topology.contains(&home_a_tls.to_string()));
    let topology = topology.replace(&home_a_tls.to_string(), &home_b_tls.to_string());
    let path = cluster.dir.join("topology-b.yaml");
    std::fs::write(&path, topology).unwrap();
    patchd_e2e::patchctl_ok(
        &home,
        &["cluster", "import", &cluster.name, path.to_str().unwrap()],
    );
    home
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn two_controllers_on_the_same_nodes_one_proceeds_the_other_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 2);
    let home_b = second_controller(&cluster);
    // Each drain takes 1.5 s, so the first rollout holds its leases well after the second one has started.
    cluster.set_drain("delay", 1500);
    let package_a = cluster.worker_package("v1.0.1-from-a", "ok");
    let package_b = cluster.worker_package("v1.0.2-from-b", "ok");

    let mut a = cluster.spawn_patchctl(
        "patch-a",
        &["patch", &cluster.name, package_a.to_str().unwrap(), "-y"],
    );
    let mut b = Background::spawn(
        &home_b,
        &cluster.dir,
        "patch-b",
        &["patch", &cluster.name, package_b.to_str().unwrap(), "-y"],
    );
    let code_a = a.wait(Duration::from_secs(180));
    let code_b = b.wait(Duration::from_secs(180));
    let report = format!("A:\n{}\nB:\n{}", a.output(), b.output());
    let (winner_home, loser, loser_home, winner_version, winner_cn) = match (code_a, code_b) {
        (Some(0), Some(1)) => (
            cluster.pki.home().to_path_buf(),
            &b,
            home_b.clone(),
            "v1.0.1-from-a",
            "controller",
        ),
        (Some(1), Some(0)) => (
            home_b.clone(),
            &a,
            cluster.pki.home().to_path_buf(),
            "v1.0.2-from-b",
            "ops-b",
        ),
        other => panic!("exactly one rollout proceeds, the other exits 1; got {other:?}\n{report}"),
    };

    // The refused controller names the holder: its rollout, its controller (certificate and store) and expiry.
    let refused = text(&loser.stderr);
    assert!(refused.contains("is leased by rollout `"), "{report}");
    assert!(
        refused.contains(&format!("of controller `{winner_cn}` (store store-")),
        "{report}"
    );
    assert!(
        refused.contains("until 20"),
        "the expiry is named; {report}"
    );
    assert!(refused.contains("Nothing was changed"), "{report}");

    // Every worker runs the winner's version, restarted once.
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            winner_version,
            "{}; {report}",
            worker.name
        );
        assert_eq!(worker.start_count(), 2, "{} restarted once", worker.name);
    }

    // Both stores tell the truth: the winner's rollout succeeded and marked the workers; the loser's was refused,
    // changed nothing and marked nothing, and its display shows what the agents really run.
    let audit_winner = patchd_e2e::patchctl_ok(&winner_home, &["audit", &cluster.name]);
    assert!(audit_winner.contains("succeeded"), "{audit_winner}");
    let audit_loser = patchd_e2e::patchctl_ok(&loser_home, &["audit", &cluster.name]);
    assert!(audit_loser.contains("failed"), "{audit_loser}");
    assert!(!audit_loser.contains("succeeded"), "{audit_loser}");
    let shown_winner = patchd_e2e::patchctl_ok(&winner_home, &["display", &cluster.name]);
    assert_eq!(
        shown_winner.matches("demo-worker (patched)").count(),
        2,
        "{shown_winner}"
    );
    let shown_loser = patchd_e2e::patchctl_ok(&loser_home, &["display", &cluster.name]);
    assert!(!shown_loser.contains("(patched)"), "{shown_loser}");
    assert_eq!(
        shown_loser.matches(winner_version).count(),
        2,
        "{shown_loser}"
    );

    // The leases were released at the end: the second controller can now roll out.
    cluster.set_drain("normal", 0);
    let (loser_package, loser_version) = if loser_home == home_b {
        (&package_b, "v1.0.2-from-b")
    } else {
        (&package_a, "v1.0.1-from-a")
    };
    let again = patchd_e2e::patchctl(
        &loser_home,
        &[
            "patch",
            &cluster.name,
            loser_package.to_str().unwrap(),
            "-y",
        ],
    );
    assert_eq!(again.status.code(), Some(0), "{}", output_text(&again));
    for worker in cluster.workers() {
        assert_eq!(
            cluster.version_of(&worker.name).unwrap().version,
            loser_version
        );
    }
}

#[test]
fn a_lease_refuses_other_callers_survives_an_agent_restart_and_is_taken_over_once_expired() {
    let mut rig = WorkerRig::start("300ms");
    let package = worker_package(&rig.packages(), "v1.1.0", "ok");
    let digest = push(&rig.pki, &rig.agent.addr_string(), &package);
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    rpc.stage("worker-1", &digest).unwrap();

    // Rollout r-x of store store-x takes the lease for 12 s (long enough to restart the agent within it).
    let x = ("r-x", "store-x");
    let y = ("r-y", "store-y");
    let granted = rpc
        .lease("worker-1", LeaseAction::Acquire, x, 12_000)
        .unwrap();
    assert!(granted.held && granted.taken_over.is_empty(), "{granted:?}");
    assert!(rig.state.join("leases/worker-1.json").is_file());
    let refused = rpc
        .lease("worker-1", LeaseAction::Acquire, y, 60_000)
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("leased by rollout `r-x` of controller `controller` (store store-x)"),
        "{}",
        refused.message()
    );

    // The agent crashes and comes back: the lease is still there, and an Apply without it (or with another
    // rollout's ticket) is refused naming the holder; the service is untouched.
    rig.agent.kill();
    rig.agent.restart();
    let mut rpc = AgentRpc::connect(&rig.pki, rig.agent.addr);
    for ticket in [None, Some(y)] {
        let refused = rpc
            .apply_leased("worker-1", &digest, "p-y", false, ticket)
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().contains("rollout `r-x`"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(rig.worker.served_version().as_deref(), Some("v1.0.0"));

    // Once it expires, rollout r-y takes it over (the answer names the expired holder) and may apply; r-x may not.
    let mut taken = None;
    wait_for(Duration::from_secs(40), "r-x's lease to expire", || {
        taken = rpc.lease("worker-1", LeaseAction::Acquire, y, 60_000).ok();
        taken.is_some()
    });
    let taken = taken.unwrap();
    assert!(taken.taken_over.contains("rollout `r-x`"), "{taken:?}");
    let refused = rpc
        .apply_leased("worker-1", &digest, "p-x", false, Some(x))
        .unwrap_err();
    assert!(
        refused.message().contains("rollout `r-y`"),
        "{}",
        refused.message()
    );
    let applied = rpc
        .apply_leased("worker-1", &digest, "p-y", false, Some(y))
        .unwrap();
    assert_eq!(outcome(&applied), ApplyOutcome::Committed, "{applied:?}");
    rig.worker.wait_serving("v1.1.0");

    // Released: the file is gone and a caller without a ticket is let through again.
    rpc.lease("worker-1", LeaseAction::Release, y, 0).unwrap();
    assert!(!rig.state.join("leases/worker-1.json").exists());
    let replay = rpc.apply("worker-1", &digest, "p-y", false).unwrap();
    assert!(replay.replayed);
    rig.stop();
}
