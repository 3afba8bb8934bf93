//! Table tests of the planner: selection semantics, errors that list what exists, ordering, batch sizing.
// Test code: helpers may panic like the tests (clippy treats only `#[test]` functions as tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchd_planner::{
    Amount, Plan, PlanInput, PlanNode, Policy, RolloutPlanError, Selection, plan,
};

/// A node description: `(id, role, leader, down)`; name = `n-<id>`, host = id before ':'.
type Spec<'a> = (&'a str, &'a str, bool, bool);

fn nodes(specs: &[Spec<'_>]) -> Vec<PlanNode> {
    specs
        .iter()
        .map(|&(id, role, is_leader, is_down)| PlanNode {
            id: id.to_string(),
            role: role.to_string(),
            host: id.split(':').next().unwrap_or(id).to_string(),
            name: format!("n-{id}"),
            is_leader,
            is_down,
        })
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

fn input(
    specs: &[Spec<'_>],
    roles: &[&str],
    n: &[&str],
    r: &[&str],
    component: &[&str],
    policy: Policy,
) -> PlanInput {
    PlanInput {
        nodes: nodes(specs),
        role_order: strings(roles),
        selection: Selection {
            nodes: strings(n),
            roles: strings(r),
            component_roles: strings(component),
        },
        policy,
    }
}

/// Batches as lists of node IDs.
fn shape(plan: &Plan) -> Vec<Vec<&str>> {
    plan.batches()
        .iter()
        .map(|batch| batch.nodes.iter().map(|node| node.id.as_str()).collect())
        .collect()
}

fn policy(batch: &str, unavailable: &str) -> Policy {
    Policy {
        batch_size: batch.parse().expect("batch size"),
        max_unavailable: unavailable.parse().expect("max unavailable"),
        ..Policy::default()
    }
}

const CLUSTER: &[Spec<'static>] = &[
    ("m1:1", "master", false, false),
    ("m2:1", "master", true, false),
    ("m3:1", "master", false, false),
    ("w1:2", "worker", false, false),
    ("w2:2", "worker", false, false),
    ("w3:2", "worker", false, false),
    ("w4:2", "worker", false, false),
];
const ROLES: &[&str] = &["master", "worker"];

#[test]
fn selection_semantics() {
    struct Case {
        name: &'static str,
        n: &'static [&'static str],
        r: &'static [&'static str],
        component: &'static [&'static str],
        expected: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "neither: component roles",
            n: &[],
            r: &[],
            component: &["worker"],
            expected: &["w1:2", "w2:2", "w3:2", "w4:2"],
        },
        Case {
            name: "neither: two component roles",
            n: &[],
            r: &[],
            component: &["master", "worker"],
            expected: &["m1:1", "m3:1", "m2:1", "w1:2", "w2:2", "w3:2", "w4:2"],
        },
        Case {
            name: "-R only",
            n: &[],
            r: &["master"],
            component: &["master"],
            expected: &["m1:1", "m3:1", "m2:1"],
        },
        Case {
            name: "-N only, by id and name",
            n: &["w3:2", "n-w1:2"],
            r: &[],
            component: &["worker"],
            expected: &["w1:2", "w3:2"],
        },
        Case {
            name: "-N and -R: intersection",
            n: &["m1:1", "w2:2", "w4:2"],
            r: &["worker"],
            component: &["master", "worker"],
            expected: &["w2:2", "w4:2"],
        },
        Case {
            name: "duplicates collapse",
            n: &["w1:2", "w1:2", "n-w1:2"],
            r: &[],
            component: &["worker"],
            expected: &["w1:2"],
        },
        Case {
            name: "names are trimmed: `-R \"master, worker\"` keeps ` worker`",
            n: &[],
            r: &["master", " worker"],
            component: &["master", "worker"],
            expected: &["m1:1", "m3:1", "m2:1", "w1:2", "w2:2", "w3:2", "w4:2"],
        },
        Case {
            name: "names are trimmed: -N and -R with spaces",
            n: &[" w2:2", "m1:1 "],
            r: &["worker ", " worker"],
            component: &["master", "worker"],
            expected: &["w2:2"],
        },
    ];
    for case in cases {
        let plan = plan(&input(
            CLUSTER,
            ROLES,
            case.n,
            case.r,
            case.component,
            policy("100%", "100%"),
        ))
        .unwrap_or_else(|error| panic!("{}: {error}", case.name));
        let got: Vec<&str> = plan.nodes().map(|(_, node)| node.id.as_str()).collect();
        assert_eq!(got, case.expected, "{}", case.name);
    }
}

#[test]
fn selection_errors_list_what_exists() {
    let unknown_node = plan(&input(
        CLUSTER,
        ROLES,
        &["w9:2", "w1:2"],
        &[],
        &["worker"],
        Policy::default(),
    ));
    let Err(RolloutPlanError::UnknownNodes { unknown, known }) = &unknown_node else {
        panic!("expected UnknownNodes, got {unknown_node:?}");
    };
    assert_eq!(unknown, &["w9:2"]);
    assert_eq!(known.len(), CLUSTER.len());
    let message = unknown_node.expect_err("error").to_string();
    assert!(
        message.contains("w9:2") && message.contains("m1:1") && message.contains("w4:2"),
        "{message}"
    );

    let unknown_role = plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &["wrker"],
        &["worker"],
        Policy::default(),
    ));
    let message = unknown_role.expect_err("unknown role").to_string();
    assert!(
        message.contains("wrker") && message.contains("master, worker"),
        "{message}"
    );

    let disjoint = plan(&input(
        CLUSTER,
        ROLES,
        &["m1:1"],
        &["worker"],
        &["worker", "master"],
        Policy::default(),
    ));
    let Err(RolloutPlanError::EmptySelection { reason }) = &disjoint else {
        panic!("expected EmptySelection, got {disjoint:?}");
    };
    assert!(
        reason.contains("m1:1") && reason.contains("worker") && reason.contains("master"),
        "{reason}"
    );

    let no_component = plan(&input(CLUSTER, ROLES, &[], &[], &[], Policy::default()));
    let message = no_component.expect_err("no component role").to_string();
    assert!(
        message.contains("matches no role") && message.contains("master, worker"),
        "{message}"
    );

    let mismatch = plan(&input(
        CLUSTER,
        ROLES,
        &["m1:1", "w1:2"],
        &[],
        &["worker"],
        Policy::default(),
    ));
    let message = mismatch.expect_err("component mismatch").to_string();
    assert!(
        message.contains("m1:1 (master)") && message.contains("matches role(s) worker"),
        "{message}"
    );
    assert!(!message.contains("w1:2"), "{message}");

    let mismatch_role = plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &["master"],
        &["worker"],
        Policy::default(),
    ));
    assert!(
        matches!(
            mismatch_role,
            Err(RolloutPlanError::ComponentMismatch { .. })
        ),
        "{mismatch_role:?}"
    );
}

#[test]
fn leaders_go_last_in_their_own_batch() {
    let plan = plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &["master"],
        &["master"],
        policy("2", "2"),
    ))
    .expect("plan");
    assert_eq!(shape(&plan), vec![vec!["m1:1", "m3:1"], vec!["m2:1"]]);
    assert!(plan.batches()[1].nodes[0].is_leader);
    // Even with a batch as large as the role, the leader does not share a batch.
    let plan2 = patchd_planner::plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &["master"],
        &["master"],
        policy("100%", "100%"),
    ))
    .expect("plan");
    assert_eq!(shape(&plan2), vec![vec!["m1:1", "m3:1"], vec!["m2:1"]]);
}

#[test]
fn batch_size_and_max_unavailable_counts_and_percents() {
    struct Case {
        batch: &'static str,
        unavailable: &'static str,
        expected: &'static [&'static [&'static str]],
    }
    let all_workers: &[&str] = &["worker"];
    let cases = [
        // tiup default: one at a time.
        Case {
            batch: "1",
            unavailable: "1",
            expected: &[&["w1:2"], &["w2:2"], &["w3:2"], &["w4:2"]],
        },
        Case {
            batch: "3",
            unavailable: "3",
            expected: &[&["w1:2", "w2:2", "w3:2"], &["w4:2"]],
        },
        // max-unavailable caps the batch size.
        Case {
            batch: "4",
            unavailable: "2",
            expected: &[&["w1:2", "w2:2"], &["w3:2", "w4:2"]],
        },
        // 50% of 4 = 2.
        Case {
            batch: "50%",
            unavailable: "100%",
            expected: &[&["w1:2", "w2:2"], &["w3:2", "w4:2"]],
        },
        // 30% of 4 = 1.2 → 1; 10% of 4 = 0.4 → minimum 1.
        Case {
            batch: "30%",
            unavailable: "100%",
            expected: &[&["w1:2"], &["w2:2"], &["w3:2"], &["w4:2"]],
        },
        Case {
            batch: "100%",
            unavailable: "10%",
            expected: &[&["w1:2"], &["w2:2"], &["w3:2"], &["w4:2"]],
        },
        // 75% of 4 = 3.
        Case {
            batch: "100%",
            unavailable: "75%",
            expected: &[&["w1:2", "w2:2", "w3:2"], &["w4:2"]],
        },
    ];
    for case in cases {
        let plan = plan(&input(
            CLUSTER,
            ROLES,
            &[],
            &[],
            all_workers,
            policy(case.batch, case.unavailable),
        ))
        .expect("plan");
        let expected: Vec<Vec<&str>> = case.expected.iter().map(|batch| batch.to_vec()).collect();
        assert_eq!(
            shape(&plan),
            expected,
            "batch {} max-unavailable {}",
            case.batch,
            case.unavailable
        );
    }
}

#[test]
fn percents_are_evaluated_per_role() {
    // 50%: 3 masters → 1, 4 workers → 2.
    let plan = plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &[],
        &["master", "worker"],
        policy("50%", "50%"),
    ))
    .expect("plan");
    assert_eq!(
        shape(&plan),
        vec![
            vec!["m1:1"],
            vec!["m3:1"],
            vec!["m2:1"],
            vec!["w1:2", "w2:2"],
            vec!["w3:2", "w4:2"]
        ]
    );
    let roles = &plan.summary().roles;
    assert_eq!((roles[0].batch_size, roles[1].batch_size), (1, 2));
}

#[test]
fn down_nodes() {
    let cluster: &[Spec<'_>] = &[
        ("w1:2", "worker", false, false),
        ("w2:2", "worker", false, true),
        ("w3:2", "worker", false, false),
        ("w4:2", "worker", false, true),
        ("w5:2", "worker", false, false),
    ];
    let roles = &["worker"];
    // Selected down nodes go first and do not use the unavailability budget: with max-unavailable 1 and batch 2,
    // both down nodes share a batch, then up nodes go one at a time.
    let plan1 = plan(&input(
        cluster,
        roles,
        &[],
        &[],
        &["worker"],
        policy("2", "1"),
    ))
    .expect("plan");
    assert_eq!(
        shape(&plan1),
        vec![
            vec!["w2:2", "w4:2"],
            vec!["w1:2"],
            vec!["w3:2"],
            vec!["w5:2"]
        ]
    );
    assert!(plan1.batches()[0].nodes.iter().all(|node| node.was_down));
    assert_eq!(plan1.summary().down_nodes, 2);
    // A selected down node rides along with an up one even when only one more node may go down.
    let plan2 = plan(&input(
        cluster,
        roles,
        &["w1:2", "w2:2", "w3:2"],
        &[],
        &["worker"],
        policy("2", "2"),
    ))
    .expect("plan");
    // w4 is down outside the selection: it uses one of the 2 allowed, so up nodes go one at a time.
    assert_eq!(shape(&plan2), vec![vec!["w2:2", "w1:2"], vec!["w3:2"]]);
    assert_eq!(plan2.summary().roles[0].down_outside, 1);
    assert_eq!(plan2.summary().roles[0].headroom, 1);
    // Down outside the selection using the whole budget: refused, naming them.
    let refused = plan(&input(
        cluster,
        roles,
        &["w1:2"],
        &[],
        &["worker"],
        policy("1", "2"),
    ));
    let message = refused.expect_err("no headroom").to_string();
    assert!(
        message.contains("w2:2, w4:2") && message.contains("--max-unavailable is 2"),
        "{message}"
    );
    // ... unless only down nodes are selected: patching them takes nothing down.
    let only_down = plan(&input(
        cluster,
        roles,
        &["w2:2"],
        &[],
        &["worker"],
        policy("1", "1"),
    ))
    .expect("plan");
    assert_eq!(shape(&only_down), vec![vec!["w2:2"]]);
}

#[test]
fn canary_is_first_and_pauses() {
    let mut with_canary = policy("2", "2");
    with_canary.canary = Some(1);
    let plan1 = plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &[],
        &["master", "worker"],
        with_canary.clone(),
    ))
    .expect("plan");
    assert_eq!(
        shape(&plan1),
        vec![
            vec!["m1:1"],
            vec!["m3:1"],
            vec!["m2:1"],
            vec!["w1:2", "w2:2"],
            vec!["w3:2", "w4:2"]
        ]
    );
    let first = &plan1.batches()[0];
    assert!(first.canary && first.pause_after);
    assert!(
        plan1.batches()[1..]
            .iter()
            .all(|batch| !batch.canary && !batch.pause_after)
    );

    // A canary larger than the batch size is allowed (within max-unavailable).
    let mut big = policy("1", "3");
    big.canary = Some(3);
    let plan2 = plan(&input(CLUSTER, ROLES, &[], &[], &["worker"], big)).expect("plan");
    assert_eq!(
        shape(&plan2),
        vec![vec!["w1:2", "w2:2", "w3:2"], vec!["w4:2"]]
    );

    let mut too_wide = policy("1", "1");
    too_wide.canary = Some(2);
    let message = plan(&input(CLUSTER, ROLES, &[], &[], &["worker"], too_wide))
        .expect_err("canary")
        .to_string();
    assert!(
        message.contains("--canary 2") && message.contains("only 1 may be"),
        "{message}"
    );

    let mut too_many = policy("1", "100%");
    too_many.canary = Some(5);
    let message = plan(&input(CLUSTER, ROLES, &[], &[], &["worker"], too_many))
        .expect_err("canary")
        .to_string();
    assert!(message.contains("only 4 selected"), "{message}");

    let mut zero = policy("1", "1");
    zero.canary = Some(0);
    assert!(matches!(
        plan(&input(CLUSTER, ROLES, &[], &[], &["worker"], zero)),
        Err(RolloutPlanError::Canary { .. })
    ));
}

#[test]
fn roles_follow_role_order_not_node_order() {
    let cluster: &[Spec<'_>] = &[
        ("w1:2", "worker", false, false),
        ("m1:1", "master", false, false),
        ("p1:3", "proxy", false, false),
        ("w2:2", "worker", false, false),
    ];
    let plan = plan(&input(
        cluster,
        &["proxy", "master", "worker"],
        &[],
        &[],
        &["master", "worker", "proxy"],
        policy("5", "5"),
    ))
    .expect("plan");
    let roles: Vec<&str> = plan
        .batches()
        .iter()
        .map(|batch| batch.role.as_str())
        .collect();
    assert_eq!(roles, vec!["proxy", "master", "worker"]);
    assert_eq!(
        shape(&plan),
        vec![vec!["p1:3"], vec!["m1:1"], vec!["w1:2", "w2:2"]]
    );
    let indexes: Vec<usize> = plan.batches().iter().map(|batch| batch.index).collect();
    assert_eq!(indexes, vec![0, 1, 2]);
}

#[test]
fn amounts_parse_with_clear_errors() {
    assert_eq!("3".parse::<Amount>(), Ok(Amount::Count(3)));
    assert_eq!(" 25% ".parse::<Amount>(), Ok(Amount::Percent(25)));
    for bad in [
        "",
        "0",
        "0%",
        "101%",
        "-1",
        "1.5",
        "abc",
        "%",
        "99999999999",
    ] {
        let error = bad.parse::<Amount>().expect_err(bad).to_string();
        assert!(
            error.contains("`3`") && error.contains("`25%`"),
            "{bad}: {error}"
        );
    }
    assert_eq!(Amount::Percent(25).to_string(), "25%");
    assert_eq!(Amount::Percent(1).resolve(7), 1);
    assert_eq!(Amount::Percent(50).resolve(7), 3);
    assert_eq!(Amount::Count(4).resolve(2), 4);
}

#[test]
fn invalid_input_is_refused() {
    let mut bad = input(
        CLUSTER,
        &["master"],
        &[],
        &[],
        &["master"],
        Policy::default(),
    );
    assert!(
        matches!(plan(&bad), Err(RolloutPlanError::InvalidInput(_))),
        "worker not in role order"
    );
    bad.role_order = strings(ROLES);
    bad.nodes.push(bad.nodes[0].clone());
    assert!(
        matches!(plan(&bad), Err(RolloutPlanError::InvalidInput(_))),
        "duplicate id"
    );
}

#[test]
fn plan_round_trips_through_json() {
    let mut with_canary = policy("2", "25%");
    with_canary.canary = Some(1);
    with_canary.failure_budget = 2;
    let plan = plan(&input(
        CLUSTER,
        ROLES,
        &[],
        &[],
        &["master", "worker"],
        with_canary,
    ))
    .expect("plan");
    let json = serde_json::to_string(&plan).expect("serialize");
    assert!(json.contains(r#""max_unavailable":"25%""#), "{json}");
    let back: Plan = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, plan);
    assert_eq!(back.policy().failure_budget, 2);
}
