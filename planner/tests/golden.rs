//! Golden files: rendered plans compared byte for byte with `planner/tests/golden/*.txt`.
//! After an intended change of the rendering, regenerate them with `UPDATE_GOLDEN=1 cargo test -p patchd-planner`
//! and review the diff.
// Test code: helpers may panic like the tests (clippy treats only `#[test]` functions as tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchd_planner::{Amount, PlanInput, PlanNode, Policy, Selection, plan};
use std::path::PathBuf;

fn node(id: &str, role: &str, name: &str, is_leader: bool, is_down: bool) -> PlanNode {
    PlanNode {
        id: id.to_string(),
        role: role.to_string(),
        host: id.split(':').next().unwrap_or(id).to_string(),
        name: name.to_string(),
        is_leader,
        is_down,
    }
}

/// The quickstart's demo cluster: 3 masters (master-2 leads), 6 workers.
fn demo_nodes() -> Vec<PlanNode> {
    let mut nodes = vec![
        node("127.0.1.1:8261", "demo-master", "master-1", false, false),
        node("127.0.1.2:8261", "demo-master", "master-2", true, false),
        node("127.0.1.3:8261", "demo-master", "master-3", false, false),
    ];
    for k in 1..=6 {
        nodes.push(node(
            &format!("127.0.1.{}:8262", 10 + k),
            "demo-worker",
            &format!("worker-{k}"),
            false,
            false,
        ));
    }
    nodes
}

fn input(
    nodes: Vec<PlanNode>,
    n: &[&str],
    r: &[&str],
    component: &[&str],
    policy: Policy,
) -> PlanInput {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|item| item.to_string())
            .collect::<Vec<_>>()
    };
    PlanInput {
        nodes,
        role_order: list(&["demo-master", "demo-worker"]),
        selection: Selection {
            nodes: list(n),
            roles: list(r),
            component_roles: list(component),
        },
        policy,
    }
}

fn check_golden(name: &str, input: &PlanInput) {
    let rendered = plan(input)
        .unwrap_or_else(|error| panic!("{name}: {error}"))
        .to_string();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        rendered,
        expected,
        "{name}: rendering differs from {} (UPDATE_GOLDEN=1 to accept)",
        path.display()
    );
}

#[test]
fn golden_default_policy_one_role() {
    check_golden(
        "default_workers",
        &input(demo_nodes(), &[], &[], &["demo-worker"], Policy::default()),
    );
}

#[test]
fn golden_masters_leader_last() {
    let policy = Policy {
        batch_size: Amount::Count(2),
        max_unavailable: Amount::Count(2),
        ..Policy::default()
    };
    check_golden(
        "masters_leader_last",
        &input(
            demo_nodes(),
            &[],
            &["demo-master"],
            &["demo-master"],
            policy,
        ),
    );
}

#[test]
fn golden_canary_and_percents_across_roles() {
    let policy = Policy {
        batch_size: Amount::Percent(50),
        max_unavailable: Amount::Percent(50),
        canary: Some(1),
        failure_budget: 1,
    };
    check_golden(
        "canary_two_roles",
        &input(
            demo_nodes(),
            &[],
            &[],
            &["demo-master", "demo-worker"],
            policy,
        ),
    );
}

#[test]
fn golden_down_nodes() {
    let mut nodes = demo_nodes();
    nodes[5].is_down = true; // worker-3, selected
    nodes[8].is_down = true; // worker-6, not selected
    let policy = Policy {
        batch_size: Amount::Count(3),
        max_unavailable: Amount::Count(2),
        ..Policy::default()
    };
    let selected = [
        "worker-1",
        "worker-2",
        "worker-3",
        "127.0.1.14:8262",
        "worker-5",
    ];
    check_golden(
        "down_nodes",
        &input(nodes, &selected, &[], &["demo-worker"], policy),
    );
}

#[test]
fn golden_intersection() {
    let policy = Policy {
        batch_size: Amount::Count(5),
        max_unavailable: Amount::Count(5),
        ..Policy::default()
    };
    let selected = ["master-1", "master-2", "worker-2", "worker-4"];
    check_golden(
        "intersection",
        &input(
            demo_nodes(),
            &selected,
            &["demo-master"],
            &["demo-master", "demo-worker"],
            policy,
        ),
    );
}
