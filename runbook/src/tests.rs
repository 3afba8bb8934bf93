//! Runbook checks: every problem named with its line and key, and a valid runbook's defaults.

use super::*;

const BASE: &str = "runbook: t\nroles: [oms]\nparams: { refetch_min: 30 }\nsteps:\n";

/// (steps text appended to BASE, expected line, expected key, a fragment of the message)
const CASES: &[(&str, usize, &str, &str)] = &[
    (
        "  - id: a\n    scope: node\n    sql: { database: cm, statements: [\"DROP TABLE x\"] }\n",
        5,
        "steps[0]",
        "give `undo:`",
    ),
    (
        "  - id: a\n    scope: node\n    sql: { database: cm, statements: [\"x\"] }\n    undo: none\n",
        8,
        "steps[0].undo",
        "only at or after the `point_of_no_return`",
    ),
    (
        "  - id: a\n    scope: cluster\n    check: { command: [true], expect: { exit: 0 } }\n",
        5,
        "steps[0]",
        "acts on a host",
    ),
    (
        "  - id: a\n    scope: node\n    mark: T1\n  - id: b\n    scope: cluster\n    mark: T2\n  - id: c\n    scope: node\n    mark: T3\n",
        12,
        "steps[2].scope",
        "node steps must be one block",
    ),
    (
        "  - id: a\n    scope: cluster\n    http: { method: PUT, url: \"http://m/{host}\" }\n    undo: { http: { method: PUT, url: \"http://m\" } }\n",
        7,
        "steps[0].http.url",
        "node's placeholder",
    ),
    (
        "  - id: a\n    scope: cluster\n    http: { method: PUT, url: \"http://m\", restore: ha }\n    undo: { http: { method: PUT, url: \"http://m\" } }\n",
        7,
        "steps[0].http.restore",
        "no earlier cluster step saves `ha`",
    ),
    (
        "  - id: a\n    scope: cluster\n    assert: \"T2 - T1 < {refetch_min}m\"\n",
        7,
        "steps[0].assert",
        "`T2` is not a mark",
    ),
    (
        "  - id: a\n    scope: node\n    check: { sql: { database: cm, query: q }, expect: { exit: 0 } }\n",
        7,
        "steps[0].check.expect",
        "`exit:` is for a `command` check",
    ),
    (
        "  - id: a\n    scope: node\n    yaml_edit: { file: /c.yaml, edits: [ { copy: { from: \"a_*\", to: b } } ] }\n",
        7,
        "steps[0].yaml_edit.edits[0].copy",
        "must hold a `*`",
    ),
    (
        "  - id: a\n    scope: node\n    yaml_edit: { file: /c.yaml, edits: [ { delete: a } ] }\n    undo: none\n",
        8,
        "steps[0].undo",
        "undoes itself",
    ),
    (
        "  - id: a\n    scope: node\n    mark: T1\n  - id: a\n    scope: node\n    mark: T2\n",
        8,
        "steps[1].id",
        "already used",
    ),
    (
        "  - id: a\n    scope: node\n    once: true\n    idempotent: true\n    container: { name: c, exec: [x] }\n    undo: { container: { name: c, exec: [y] } }\n",
        8,
        "steps[0].idempotent",
        "never re-run",
    ),
    (
        "  - id: a\n    scope: node\n    restore: { backup: dump }\n",
        7,
        "steps[0].restore.backup",
        "not an earlier backup step",
    ),
    (
        "  - id: a\n    scope: node\n    http: { url: \"http://m/{nope}\" }\n",
        7,
        "steps[0].http.url",
        "`{nope}` is not a placeholder",
    ),
    (
        "  - id: dump\n    scope: cluster\n    on: oms\n    backup: { command: [dump], output: /b.sql }\n  - id: a\n    scope: node\n    restore: { backup: dump, command: [load] }\n    undo: none\n",
        11,
        "steps[1].restore.backup",
        "was taken on the first node of oms, but this step runs on every node",
    ),
    (
        "  - id: a\n    scope: node\n    roles: [oms]\n    container: { name: c, exec: [x] }\n    undo: none\n  - id: b\n    scope: node\n    roles: [other]\n    container: { name: c, exec: [y] }\n    undo: none\n",
        15,
        "steps[1].undo",
        "where the point of no return `a` never runs",
    ),
];

#[test]
fn every_problem_names_its_line_and_key() {
    for (steps, line, key, fragment) in CASES {
        let text = format!("{BASE}{steps}");
        // Cases naming a second role or a point of no return get them.
        let text = if steps.contains("roles: [other]") {
            text.replacen(
                "roles: [oms]\n",
                "roles: [oms, other]\npoint_of_no_return: a\n",
                1,
            )
        } else {
            text
        };
        let problems = match parse(&text) {
            Err(RunbookError::Invalid { problems }) => problems,
            other => panic!("expected problems for\n{text}\ngot {other:?}"),
        };
        assert!(
            problems
                .iter()
                .any(|p| p.key == *key && p.line == Some(*line) && p.message.contains(fragment)),
            "wanted line {line} {key} `{fragment}` for\n{text}\ngot:\n{}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn unknown_keys_are_refused_by_serde_with_their_line() {
    let error = parse(&format!(
        "{BASE}  - id: a\n    scope: node\n    mark: T1\n    colour: red\n"
    ))
    .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("colour") && text.contains("line 8"), "{text}");
}

#[test]
fn cluster_facts_are_checked() {
    let text = format!(
        "{BASE}  - id: a\n    scope: cluster\n    check: {{ sql: {{ database: cm, query: q }}, expect: {{ no_rows: true }} }}\n"
    );
    let facts = ClusterFacts {
        roles: vec!["other".into()],
        databases: vec![],
    };
    let Err(RunbookError::Invalid { problems }) = parse_for_cluster(&text, &facts) else {
        panic!("expected problems");
    };
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        all.iter()
            .any(|p| p.contains("role `oms` is not in the cluster's topology")),
        "{all:?}"
    );
    assert!(
        all.iter()
            .any(|p| p.contains("database `cm` is not defined")),
        "{all:?}"
    );
}

#[test]
fn defaults_follow_the_kind() {
    let text = format!(
        "{BASE}  - id: dump\n    scope: node\n    backup: {{ command: [dump], output: /b.sql }}\n  - id: get\n    scope: cluster\n    on: oms\n    http: {{ url: \"http://{{host}}/x\" }}\n"
    );
    let runbook = parse(&text).unwrap();
    let dump = &runbook.steps[0];
    assert!(!dump.idempotent);
    assert_eq!(dump.undo, Undo::NothingToUndo);
    assert!(matches!(&dump.action, Action::Backup(b) if b.min_bytes == 1));
    let get = &runbook.steps[1];
    assert_eq!(get.scope, Scope::ClusterAfter);
    assert_eq!(get.on, RunsOn::FirstNodeOf("oms".into()));
    assert!(get.idempotent);
}

#[test]
fn the_oms_example_is_valid_and_its_schedule_matches_the_golden_dry_run() {
    let text = include_str!("../../examples/oms/runbook.yaml");
    let facts = ClusterFacts {
        roles: vec!["oms".into()],
        databases: vec!["rm".into(), "cm".into(), "cm_hb".into()],
    };
    let runbook = parse_for_cluster(text, &facts).unwrap_or_else(|error| panic!("{error}"));
    let nodes: Vec<schedule::NodeRef> = (1..=3)
        .map(|n| schedule::NodeRef {
            id: format!("127.0.2.{n}:8088"),
            name: format!("oms-{n}"),
            host: format!("127.0.2.{n}"),
            role: "oms".into(),
            deploy_dir: "/data/oms".into(),
            service: "oms".into(),
            batch: n - 1,
        })
        .collect();
    let planned = schedule::schedule(&runbook, &nodes).unwrap();
    let text = schedule::render_dry_run(&runbook, &schedule::dry_run(&runbook, &planned));
    let golden = include_str!("../tests/golden/oms_dry_run.txt");
    if text != golden && std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/oms_dry_run.txt"),
            &text,
        )
        .unwrap();
        return;
    }
    assert_eq!(
        text, golden,
        "rerun with UPDATE_GOLDEN=1 to accept a deliberate change"
    );
    // `once` on the first node only; the heartbeat rotation once for the cluster.
    let upgrades: Vec<_> = planned
        .steps
        .iter()
        .filter(|s| s.key.step == "docker-upgrade")
        .collect();
    assert_eq!(upgrades.len(), 1);
    assert_eq!(upgrades[0].key.node.as_deref(), Some("127.0.2.1:8088"));
}

/// The crate stays pure: no file, network, process, clock or async use in its sources (tests may read files).
#[test]
fn the_crate_does_no_io_reads_no_clock_and_has_no_async() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut checked = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .unwrap()
                    .map(|entry| entry.unwrap().path()),
            );
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        if path.ends_with("tests.rs") {
            continue;
        }
        for forbidden in [
            "std::fs",
            "std::net",
            "std::process",
            "SystemTime",
            "Instant",
            "async ",
            "tokio",
            "std::env",
        ] {
            assert!(
                !code.contains(forbidden),
                "{} uses `{forbidden}`",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} files checked");
}
