//! End-to-end: `patchctl cluster import|list|show` and `patchctl audit` run as the real binary against a real store.
//!
//! Needs the binaries: `cargo build -p patchd-agent -p patchctl -p patchd-demo --bins --features patchd-agent/fault-injection`

use patchctl::home::Home;
use patchctl::store::{NewRollout, NodeRolloutState, RolloutKind, RolloutState, Store};
use patchd_e2e::{patchctl, patchctl_ok, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Output;

fn example_topology() -> PathBuf {
    workspace_root().join("controller/examples/topology.yaml")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}):\n{text}"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
    path
}

#[test]
fn import_list_show_and_reimport() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let topology = example_topology();
    let topology_arg = topology.to_str().expect("utf-8 path");

    let out = patchctl_ok(&home, &["cluster", "list"]);
    assert!(out.contains("No cluster registered"), "{out}");

    let out = patchctl_ok(&home, &["cluster", "import", "demo", topology_arg]);
    assert!(out.contains("Imported cluster `demo`"), "{out}");
    assert!(
        out.contains("demo-master") && out.contains("demo-worker"),
        "{out}"
    );
    assert!(out.contains("Total nodes: 5"), "{out}");

    let out = patchctl_ok(&home, &["cluster", "list"]);
    let row = out
        .lines()
        .find(|line| line.starts_with("demo "))
        .unwrap_or_else(|| panic!("no demo row:\n{out}"));
    assert!(
        row.contains("v1.0.0") && row.contains("demo-master,demo-worker") && row.contains(" 5 "),
        "{row}"
    );

    let listed = json(&patchctl_ok(
        &home,
        &["--format", "json", "cluster", "list"],
    ));
    let clusters = listed.as_array().expect("array");
    assert_eq!(clusters.len(), 1);
    assert_eq!(clusters[0]["name"], "demo");
    assert_eq!(clusters[0]["nodes"], 5);
    assert_eq!(
        clusters[0]["roles"],
        serde_json::json!(["demo-master", "demo-worker"])
    );

    let shown = patchctl_ok(&home, &["cluster", "show", "demo"]);
    let original = std::fs::read_to_string(&topology).expect("read example");
    assert_eq!(shown, original, "show prints the stored file verbatim");
    let shown = json(&patchctl_ok(
        &home,
        &["--format", "json", "cluster", "show", "demo"],
    ));
    assert_eq!(
        shown["topology"]["roles"][1]["nodes"][0]["id"],
        "127.0.1.3:8262"
    );
    assert_eq!(
        shown["topology"]["roles"][1]["hooks"]["wait_offline"]["timeout"],
        "10s"
    );

    // Re-import is the edit path: a changed file replaces the stored one.
    let edited = original.replace("version: v1.0.0", "version: v1.0.1").replace(
        "      - { host: 127.0.1.5, port: 8262, name: worker-3, deploy_dir: /opt/demo/worker-8262, data_dir: /opt/demo/data/worker-8262 }\n",
        "",
    );
    assert_ne!(edited, original);
    let edited_path = write(dir.path(), "edited.yaml", &edited);
    let out = patchctl_ok(
        &home,
        &[
            "--format",
            "json",
            "cluster",
            "import",
            "demo",
            edited_path.to_str().expect("utf-8"),
        ],
    );
    let summary = json(&out);
    assert_eq!(summary["created"], false);
    assert_eq!(summary["total_nodes"], 4);
    assert_eq!(summary["version"], "v1.0.1");
    let listed = json(&patchctl_ok(
        &home,
        &["--format", "json", "cluster", "list"],
    ));
    assert_eq!(listed[0]["nodes"], 4);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    let out = patchctl(&home, &["cluster", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("registered: demo"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn malformed_topologies_are_refused_with_line_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "typo.yaml",
            "roles:\n  w:\n    nodes:\n      - host: 127.0.1.1\n        prot: 8262\n        deploy_dir: /a\n",
            &[
                "typo.yaml",
                "line 5",
                "roles.w.nodes[0]",
                "unknown field `prot`",
                "expected one of",
            ],
        ),
        (
            "placeholder.yaml",
            "roles:\n  w:\n    hooks:\n      online: { method: POST, url: \"http://{host}/m/{nmae}\" }\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n",
            &["line 4", "roles.w.hooks.online.url", "{nmae}", "use {host}"],
        ),
        (
            "duplicate.yaml",
            "roles:\n  w:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n      - { host: 127.0.1.1, port: 1, deploy_dir: /b }\n",
            &[
                "line 5",
                "roles.w.nodes[1].id",
                "127.0.1.1:1",
                "must be unique",
            ],
        ),
        (
            "not-yaml.yaml",
            "roles: [\n  - {\n",
            &["not-yaml.yaml", "line "],
        ),
    ];
    for (name, text, expected) in cases {
        let path = write(dir.path(), name, text);
        let out = patchctl(
            &home,
            &["cluster", "import", "bad", path.to_str().expect("utf-8")],
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name} must be refused with exit 1; stderr: {}",
            stderr(&out)
        );
        let message = stderr(&out);
        for fragment in expected {
            assert!(
                message.contains(fragment),
                "{name}: `{fragment}` missing from:\n{message}"
            );
        }
    }
    // Nothing was registered by the refused imports.
    let listed = json(&patchctl_ok(
        &home,
        &["--format", "json", "cluster", "list"],
    ));
    assert_eq!(listed, serde_json::json!([]));

    let out = patchctl(
        &home,
        &[
            "cluster",
            "import",
            "prod",
            example_topology().to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("names the cluster `demo`"),
        "{}",
        stderr(&out)
    );
    let out = patchctl(
        &home,
        &[
            "cluster",
            "import",
            "bad name",
            example_topology().to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid cluster name"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn reimport_is_refused_while_a_rollout_holds_the_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let topology = example_topology();
    patchctl_ok(
        &home,
        &[
            "cluster",
            "import",
            "demo",
            topology.to_str().expect("utf-8"),
        ],
    );
    // This test process plays the running rollout: it is alive, so its lock must be respected.
    let store = Store::open_home(&Home::at(&home)).expect("open store");
    let lock = store.acquire_rollout_lock("demo").expect("lock");
    let out = patchctl(
        &home,
        &[
            "cluster",
            "import",
            "demo",
            topology.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains("while a rollout runs"), "{message}");

    // `cluster unlock` respects a holder that is alive on this host, unless forced.
    let out = patchctl(&home, &["cluster", "unlock", "demo"]);
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(
        message.contains(&format!("pid {}", std::process::id())) && message.contains("--force"),
        "{message}"
    );
    assert!(
        store.rollout_lock_holder("demo").expect("holder").is_some(),
        "a refused unlock must keep the lock"
    );
    patchctl_ok(&home, &["cluster", "unlock", "demo", "--force"]);
    assert!(store.rollout_lock_holder("demo").expect("holder").is_none());
    drop(lock);
    patchctl_ok(
        &home,
        &[
            "cluster",
            "import",
            "demo",
            topology.to_str().expect("utf-8"),
        ],
    );

    // `--resume` with nothing to resume is "nothing to do" (4), not an error.
    for command in ["patch", "rollback"] {
        let out = patchctl(&home, &[command, "--resume", "demo"]);
        assert_eq!(out.status.code(), Some(4), "{command}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("Nothing to resume"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn audit_lists_rollouts_and_reports_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    patchctl_ok(
        &home,
        &[
            "cluster",
            "import",
            "demo",
            example_topology().to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        json(&patchctl_ok(&home, &["--format", "json", "audit"])),
        serde_json::json!([])
    );
    let out = patchctl(&home, &["audit", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("registered: demo"),
        "{}",
        stderr(&out)
    );

    // A journal as the executor writes it (the rollout e2e tests produce real ones).
    let store = Store::open_home(&Home::at(&home)).expect("open store");
    store
        .create_rollout(&NewRollout {
            id: "r-test-1".into(),
            cluster: "demo".into(),
            kind: RolloutKind::Patch,
            package_digest: Some("d1".repeat(32).parse().unwrap()),
            package_path: "/tmp/demo-worker.tar.gz".into(),
            version: "v1.0.1".into(),
            plan_json: r#"{"batches":[]}"#.into(),
            options_json: "{}".into(),
        })
        .expect("create rollout");
    store
        .set_rollout_state("r-test-1", RolloutState::Running)
        .expect("state");
    for (node, steps, state) in [
        (
            "127.0.1.3:8262",
            &[
                ("offline", "started", ""),
                ("offline", "ok", ""),
                ("apply", "started", ""),
                ("apply", "ok", ""),
            ][..],
            NodeRolloutState::Done,
        ),
        (
            "127.0.1.4:8262",
            &[
                ("apply", "started", ""),
                ("apply", "failed", "probation failed: exited with 3"),
            ][..],
            NodeRolloutState::Reverted,
        ),
    ] {
        for (step, result, detail) in steps {
            store
                .record_node_step("r-test-1", node, step, result, detail)
                .expect("step");
        }
        store
            .set_node_state("r-test-1", node, state)
            .expect("node state");
    }
    store
        .set_rollout_state("r-test-1", RolloutState::Halted)
        .expect("state");

    let out = patchctl_ok(&home, &["audit", "demo"]);
    let row = out
        .lines()
        .find(|line| line.starts_with("r-test-1"))
        .unwrap_or_else(|| panic!("no row:\n{out}"));
    assert!(
        row.contains("halted")
            && row.contains("1 reverted")
            && row.contains("1 done")
            && row.contains("v1.0.1"),
        "{row}"
    );

    let out = patchctl_ok(&home, &["audit", "--rollout", "r-test-1"]);
    let failed = out
        .lines()
        .find(|line| line.starts_with("127.0.1.4:8262"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        failed.contains("reverted") && failed.contains("probation failed: exited with 3"),
        "{failed}"
    );
    let done = out
        .lines()
        .find(|line| line.starts_with("127.0.1.3:8262"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        done.contains("offline ok") && done.contains("apply ok"),
        "{done}"
    );

    let report = json(&patchctl_ok(
        &home,
        &["--format", "json", "audit", "demo", "--rollout", "r-test-1"],
    ));
    assert_eq!(report["rollout"]["state"], "halted");
    assert_eq!(
        report["rollout"]["plan"],
        serde_json::json!({"batches": []})
    );
    assert_eq!(
        report["nodes"][1]["reason"],
        "probation failed: exited with 3"
    );
    assert_eq!(
        report["nodes"][0]["steps"].as_array().map(Vec::len),
        Some(4)
    );
    assert!(report["nodes"][0]["steps"][1]["duration_ms"].is_u64());

    let out = patchctl(&home, &["audit", "--rollout", "r-none"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("r-test-1"),
        "lists what exists: {}",
        stderr(&out)
    );
}
