//! End-to-end: `patchctl upgrade <cluster> <runbook> --dry-run` as the real binary against a real store, with the
//! shipped OMS example (`examples/oms/`): the golden text, JSON, selection, refusals with line and key, and a run
//! without the image package its container swaps need refused before anything changes.
//!
//! Needs the binaries: `cargo build -p patchd-agent -p patchctl -p patchd-demo --bins --features patchd-agent/fault-injection`

use patchd_e2e::{patchctl, patchctl_ok, workspace_root};
use std::path::{Path, PathBuf};

const GOLDEN: &str = "tests/golden/upgrade_oms_dry_run.txt";

fn example(name: &str) -> String {
    let path: PathBuf = workspace_root().join("examples/oms").join(name);
    path.to_str().expect("utf-8 path").to_string()
}

fn imported_home(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    patchctl_ok(
        &home,
        &["cluster", "import", "oms", &example("topology.yaml")],
    );
    home
}

#[test]
fn dry_run_of_the_oms_example_prints_every_step_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = imported_home(dir.path());
    let runbook = example("runbook.yaml");
    let text = patchctl_ok(&home, &["upgrade", "oms", &runbook, "--dry-run"]);
    let golden_path = workspace_root().join(GOLDEN);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden_path, &text).expect("write golden");
    }
    let golden = std::fs::read_to_string(&golden_path).expect("read golden");
    assert_eq!(
        text, golden,
        "rerun with UPDATE_GOLDEN=1 to accept a deliberate change"
    );

    let json: serde_json::Value = serde_json::from_str(&patchctl_ok(
        &home,
        &["--format", "json", "upgrade", "oms", &runbook, "--dry-run"],
    ))
    .expect("JSON");
    let steps = json["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 26);
    let on = |id: &str| -> Vec<String> {
        steps
            .iter()
            .filter(|step| step["step"] == id)
            .map(|step| step["node"].as_str().unwrap_or("controller").to_string())
            .collect()
    };
    assert_eq!(on("docker-upgrade"), vec!["127.0.2.1:8088"]);
    // Once for the cluster (placed on the first node, where its undo reloads the dump).
    assert_eq!(on("heartbeat-rotate"), vec!["127.0.2.1:8088"]);
    assert_eq!(on("ha-off"), vec!["controller"]);
    assert_eq!(on("swap").len(), 3);
    assert_eq!(json["plan"]["batches"].as_array().map(Vec::len), Some(3));
}

#[test]
fn selection_limits_the_node_steps_and_once_follows_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = imported_home(dir.path());
    let json: serde_json::Value = serde_json::from_str(&patchctl_ok(
        &home,
        &[
            "--format",
            "json",
            "upgrade",
            "oms",
            &example("runbook.yaml"),
            "--dry-run",
            "-N",
            "oms-3,oms-2",
        ],
    ))
    .expect("JSON");
    let steps = json["steps"].as_array().expect("steps");
    let nodes: Vec<&str> = steps
        .iter()
        .filter_map(|step| step["node"].as_str())
        .collect();
    assert!(!nodes.contains(&"127.0.2.1:8088"), "{nodes:?}");
    let upgrade: Vec<&serde_json::Value> = steps
        .iter()
        .filter(|s| s["step"] == "docker-upgrade")
        .collect();
    assert_eq!(upgrade.len(), 1);
    assert_eq!(upgrade[0]["node"], "127.0.2.2:8088");
}

#[test]
fn a_bad_runbook_is_refused_with_line_and_key_and_nothing_runs_without_dry_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = imported_home(dir.path());
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(example("runbook.yaml"))
        .expect("read example")
        .replace(
            "database: cm_hb\n      statements",
            "database: cm_hb_typo\n      statements",
        )
        .replace(
            "    undo: { restore: { backup: dump-cm-hb, command: [mysql-load, cm_hb] } }\n",
            "",
        );
    std::fs::write(&bad, text).expect("write");
    let out = patchctl(
        &home,
        &["upgrade", "oms", bad.to_str().expect("utf-8"), "--dry-run"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 48: steps[6].sql.database: database `cm_hb_typo` is not defined"),
        "{stderr}"
    );
    assert!(
        stderr.contains("steps[6]: a `sql` step changes something: give `undo:`"),
        "{stderr}"
    );
    assert!(stderr.contains("line 44: steps[6]"), "{stderr}");

    // Without --dry-run the upgrade needs its image package (the runbook swaps containers) before anything else.
    let out = patchctl(&home, &["upgrade", "oms", &example("runbook.yaml")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("step `swap` swaps a container to the package's image: give the image package with `--package PKG`; nothing was changed"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
