//! End-to-end acceptance of upgrade runbooks (issue 14) on the OMS rig (`patchd_e2e::oms_rig`): the example runbook
//! (`examples/oms/runbook.yaml`) upgrades three real demo-oms containers from v4.3.0 to v4.3.1 through real agents,
//! a real MariaDB and the demo console; `patchctl rollback --upgrade` puts everything back; a dump that comes out
//! empty halts before any container is stopped; a release that fails its health probe on node 2 is rolled back
//! there with exit 3; an undeclared command and an edit outside the declared roots are refused. Needs the Docker
//! Engine and MariaDB: fails (never skips) without them.

use patchd_e2e::oms_rig::{
    CLUSTER, CONFIG_430, CONFIG_431, NEW_VERSION, OLD_VERSION, OmsRig, Snapshot, describe,
};
use patchd_e2e::{patchd, sha256_file};
use std::collections::HashMap;
use std::path::Path;

/// Runs the upgrade; the ID it announced (it must have started).
fn upgrade(rig: &OmsRig, runbook: &Path, package: Option<&Path>) -> (std::process::Output, String) {
    let (out, id) = rig.upgrade(runbook, package);
    let id = id.unwrap_or_else(|| panic!("no upgrade ID announced:\n{}", describe(&out)));
    (out, id)
}

/// `step` → `outcome` of every step instance in the audit.
fn outcomes(audit: &serde_json::Value) -> HashMap<String, String> {
    audit["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|row| {
            (
                row["step"].as_str().expect("step").to_string(),
                row["outcome"].as_str().expect("outcome").to_string(),
            )
        })
        .collect()
}

/// The outcome of `step` (on the controller, or `step@<node>` for a cluster step placed on a node).
fn outcome_of<'a>(steps: &'a HashMap<String, String>, step: &str) -> &'a str {
    steps
        .iter()
        .find(|(key, _)| *key == step || key.starts_with(&format!("{step}@")))
        .map(|(_, outcome)| outcome.as_str())
        .unwrap_or_else(|| panic!("no step {step} in the audit: {steps:?}"))
}

/// The top-level entries of a YAML mapping, in file order (quoting and comments aside).
fn entries(text: &str) -> Vec<(String, serde_norway::Value)> {
    let value: serde_norway::Value = serde_norway::from_str(text).expect("YAML");
    value
        .as_mapping()
        .expect("a mapping")
        .iter()
        .map(|(key, value)| (key.as_str().expect("string key").to_string(), value.clone()))
        .collect()
}

fn assert_unchanged(rig: &OmsRig, before: &Snapshot, what: &str) {
    let after = rig.snapshot();
    for (index, (old, new)) in before.nodes.iter().zip(&after.nodes).enumerate() {
        assert_eq!(old, new, "{what}: node {} changed", index + 1);
    }
    assert_eq!(before.tables, after.tables, "{what}: the databases changed");
    assert_eq!(
        before.ha_config, after.ha_config,
        "{what}: ha.config changed"
    );
    for node in &rig.nodes {
        node.wait_serving(OLD_VERSION);
    }
}

#[test]
fn the_example_upgrade_migrates_three_nodes_and_rollback_upgrade_puts_everything_back() {
    let rig = OmsRig::start("upg-oms-ok", 10);
    let package = rig.new_package(None);
    let new_image = rig
        .docker
        .inspect_image(&rig.docker.name(&format!("demo-oms:{NEW_VERSION}")))
        .and_then(|image| image.id)
        .expect("the v4.3.1 image");
    let before = rig.snapshot();
    let ha_before = before.ha_config.clone();
    let heartbeat_before = rig.db.sql(
        Some("cm_hb"),
        "SELECT id FROM heatbeat_sequence ORDER BY id",
    );
    assert_eq!(heartbeat_before.lines().count(), 4, "{heartbeat_before}");
    let binds_before: Vec<_> = rig
        .nodes
        .iter()
        .map(|node| rig.container(node).host_config.and_then(|h| h.binds))
        .collect();

    let runbook = rig.write_runbook("runbook.yaml", &rig.example_runbook());
    let (out, id) = upgrade(&rig, &runbook, Some(&package));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // Every node: a new container from the new image, the same mounts, IS_UPGRADE added, serving v4.3.1 on the
    // migrated config.yaml, exactly the guide's after-sample.
    for (index, node) in rig.nodes.iter().enumerate() {
        node.wait_serving(NEW_VERSION);
        let inspected = rig.container(node);
        assert_ne!(inspected.id.as_deref(), Some(node.original_id.as_str()));
        assert_eq!(inspected.image.as_deref(), Some(new_image.as_str()));
        assert_eq!(
            inspected.host_config.clone().and_then(|h| h.binds),
            binds_before[index],
            "{}: the same mounts",
            node.name
        );
        let env = inspected.config.and_then(|c| c.env).unwrap_or_default();
        assert!(env.iter().any(|e| e == "IS_UPGRADE=true"), "{env:?}");
        let served = node.served().expect("serving");
        assert_eq!(served["is_upgrade"], "true", "{served}");
        let config = std::fs::read_to_string(node.config()).expect("config.yaml");
        assert_eq!(
            entries(&config),
            entries(CONFIG_431),
            "{}: config.yaml is the guide's V4.3.1 sample:\n{config}",
            node.name
        );
    }

    // Three non-empty dumps on the first node, each recorded with its size and sha256.
    let audit = rig.audit(&id);
    assert_eq!(audit["upgrade"]["outcome"], "completed", "{audit:#}");
    let steps = outcomes(&audit);
    assert!(steps.values().all(|outcome| outcome == "done"), "{audit:#}");
    let backups = audit["backups"].as_array().expect("backups");
    let dumps = rig.nodes[0].deploy_dir.join("upgrade-backup");
    for (step, db) in [
        ("dump-rm", "rm"),
        ("dump-cm", "cm"),
        ("dump-cm-hb", "cm_hb"),
    ] {
        let dump = dumps.join(format!("{db}.sql"));
        let bytes = std::fs::read(&dump).unwrap_or_else(|e| panic!("{}: {e}", dump.display()));
        assert!(!bytes.is_empty(), "{} is empty", dump.display());
        assert!(String::from_utf8_lossy(&bytes).contains("CREATE TABLE"));
        let recorded: Vec<_> = backups
            .iter()
            .filter(|row| {
                row["step"]
                    .as_str()
                    .is_some_and(|s| s == step || s.starts_with(&format!("{step}@")))
            })
            .collect();
        assert_eq!(recorded.len(), 1, "{step}: one backup: {audit:#}");
        assert_eq!(
            recorded[0]["path"],
            dump.to_string_lossy().as_ref(),
            "{audit:#}"
        );
        assert_eq!(recorded[0]["size"], bytes.len() as u64, "{audit:#}");
        assert_eq!(
            recorded[0]["sha256"],
            sha256_file(&dump).as_str(),
            "{audit:#}"
        );
    }
    // The heartbeat table rotated: only its last row is left, and no intermediate table.
    let last = heartbeat_before.lines().last().expect("a row");
    assert_eq!(
        rig.db
            .sql(Some("cm_hb"), "SELECT id FROM heatbeat_sequence"),
        format!("{last}\n")
    );
    assert_eq!(
        rig.db.sql(Some("cm_hb"), "SHOW TABLES"),
        "heatbeat_sequence\n"
    );
    // docker_upgrade.sh ran once, on the first node.
    let runs: Vec<usize> = rig.nodes.iter().map(|node| node.upgrade_runs()).collect();
    assert_eq!(runs, vec![1, 0, 0], "docker_upgrade.sh runs per node");
    let once: Vec<&String> = steps
        .keys()
        .filter(|s| s.starts_with("docker-upgrade"))
        .collect();
    assert_eq!(
        once,
        vec![&format!("docker-upgrade@{}", rig.nodes[0].name)],
        "{audit:#}"
    );
    // HA: off during the upgrade, back on with the value it had.
    let stats = rig.master.stats();
    assert_eq!(stats["value"], ha_before.as_str(), "{stats}");
    assert_eq!(stats["puts"], 2, "{stats}");
    assert_eq!(stats["put_values"][0], r#"{"enable": false}"#, "{stats}");
    assert_eq!(
        audit["saved"],
        serde_json::json!([["ha_config", ha_before]]),
        "{audit:#}"
    );
    // T1 and T2 are in the audit, and the window between them.
    let marks: Vec<&str> = audit["marks"]
        .as_array()
        .expect("marks")
        .iter()
        .filter_map(|mark| mark[0].as_str())
        .collect();
    assert_eq!(marks, vec!["T1", "T2"], "{audit:#}");
    assert_eq!(audit["windows"][0][0], "T2 - T1", "{audit:#}");
    assert!(
        audit["windows"][0][1]
            .as_i64()
            .is_some_and(|s| (0..1800).contains(&s)),
        "{audit:#}"
    );

    // The full undo: tables as before (from the dumps), the old config byte for byte, the old image running.
    let out = rig.patchctl(&["rollback", CLUSTER, "--upgrade", &id, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(rig.audit(&id)["upgrade"]["outcome"], "undone");
    let after = rig.snapshot();
    assert_eq!(after.tables, before.tables, "the databases as before");
    for (node, snapshot) in rig.nodes.iter().zip(&after.nodes) {
        node.wait_serving(OLD_VERSION);
        assert_eq!(
            snapshot.config,
            CONFIG_430.as_bytes(),
            "{}: the old config.yaml byte for byte",
            node.name
        );
        assert_eq!(
            snapshot.image, rig.old_image,
            "{}: the old image",
            node.name
        );
        assert!(snapshot.running, "{} runs", node.name);
    }
    assert_eq!(
        rig.master.ha_config(),
        ha_before,
        "HA back on with its value"
    );
}

#[test]
fn a_dump_that_comes_out_empty_halts_before_any_container_is_stopped() {
    let rig = OmsRig::start("upg-oms-empty", 20);
    let package = rig.new_package(None);
    let before = rig.snapshot();
    // The cm dump through a declared action that dumps no table definition and no row: 0 bytes.
    let text = rig.example_runbook();
    assert!(text.contains("[mysqldump, cm]"));
    let runbook = rig.write_runbook(
        "runbook-empty-dump.yaml",
        &text.replace("[mysqldump, cm]", "[dump-nothing, cm]"),
    );
    let (out, id) = upgrade(&rig, &runbook, Some(&package));
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let said = describe(&out);
    assert!(said.contains("dump-cm"), "the failed step is named: {said}");

    assert_unchanged(&rig, &before, "after an empty dump");
    let dumps = rig.nodes[0].deploy_dir.join("upgrade-backup");
    assert!(
        !dumps.join("cm.sql").exists(),
        "the empty dump is not left behind"
    );
    let stats = rig.master.stats();
    assert_eq!(stats["puts"], 2, "HA off, then back on: {stats}");
    let audit = rig.audit(&id);
    assert_eq!(audit["upgrade"]["outcome"], "rolled_back", "{audit:#}");
    let steps = outcomes(&audit);
    assert_eq!(outcome_of(&steps, "dump-cm"), "failed", "{audit:#}");
    assert_eq!(outcome_of(&steps, "ha-off"), "undone", "{audit:#}");
    assert!(
        !steps.keys().any(|step| step.starts_with("stop@")),
        "no container was stopped: {audit:#}"
    );
}

#[test]
fn a_release_failing_its_health_probe_on_node_2_is_rolled_back_there_with_exit_3() {
    let rig = OmsRig::start("upg-oms-broken", 30);
    let package = rig.new_package(Some(&rig.nodes[1].host));
    let before = rig.snapshot();
    let runbook = rig.write_runbook("runbook.yaml", &rig.example_runbook());
    let (out, id) = upgrade(&rig, &runbook, Some(&package));
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let audit = rig.audit(&id);
    assert_eq!(audit["upgrade"]["outcome"], "rolled_back", "{audit:#}");
    let steps = outcomes(&audit);
    assert_eq!(
        steps[&format!("swap@{}", rig.nodes[1].name)],
        "failed",
        "{audit:#}"
    );
    assert_eq!(outcome_of(&steps, "ha-off"), "undone", "{audit:#}");

    let node2 = &rig.nodes[1];
    let inspected = rig.container(node2);
    assert_eq!(
        inspected.id.as_deref(),
        Some(node2.original_id.as_str()),
        "node 2 runs its old container again"
    );
    assert_eq!(
        inspected.state.and_then(|s| s.running),
        Some(true),
        "node 2's container runs"
    );
    assert_eq!(
        std::fs::read(node2.config()).expect("config.yaml"),
        CONFIG_430.as_bytes(),
        "node 2's config.yaml byte for byte"
    );
    node2.wait_serving(OLD_VERSION);
    // Node 3 was never reached.
    assert_eq!(before.nodes[2], rig.snapshot().nodes[2], "node 3 untouched");
    // The cluster steps are undone: HA back on with its saved value.
    assert_eq!(rig.master.ha_config(), before.ha_config);
}

#[test]
fn an_undeclared_command_and_an_edit_outside_the_roots_are_refused() {
    let rig = OmsRig::start("upg-oms-refused", 40);
    let before = rig.snapshot();
    let node = &rig.nodes[0];
    for node in &rig.nodes {
        let config = node.agent.config_path().to_string_lossy().into_owned();
        let out = patchd(&["validate", "--config", &config]);
        assert!(
            out.status.success(),
            "the rig's declarations validate: {}",
            describe(&out)
        );
    }

    // A command no agent declared: refused, and it did not run.
    let marker = rig.path().join("pwned");
    let runbook = rig.write_runbook(
        "undeclared.yaml",
        &format!(
            "runbook: undeclared\nroles: [oms]\nsteps:\n  - id: arbitrary\n    scope: node\n    \
             check: {{ command: [sh, -c, \"touch {}\"], expect: {{ exit: 0 }} }}\n",
            marker.display()
        ),
    );
    let (out, _) = rig.upgrade(&runbook, None);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let said = describe(&out).to_lowercase();
    assert!(
        said.contains("declar") || said.contains("permission"),
        "the refusal says the command is not declared: {said}"
    );
    assert!(!marker.exists(), "the undeclared command ran");

    // yaml_edit of a file outside the declared roots: by absolute path, through `..` and through a symlink.
    let outside = rig.path().join("outside");
    std::fs::create_dir_all(&outside).expect("outside dir");
    let target = outside.join("config.yaml");
    std::fs::write(&target, CONFIG_430).expect("outside config");
    std::os::unix::fs::symlink(&target, node.deploy_dir.join("link.yaml")).expect("symlink");
    let relative = format!("{}/../../outside/config.yaml", node.deploy_dir.display());
    for (case, file, why) in [
        (
            "absolute",
            target.to_string_lossy().into_owned(),
            "outside the declared upgrade roots",
        ),
        ("dot-dot", relative, "not a clean absolute path"),
        ("symlink", "{deploy_dir}/link.yaml".to_string(), "symlink"),
    ] {
        let runbook = rig.write_runbook(
            &format!("outside-{case}.yaml"),
            &format!(
                "runbook: outside-{case}\nroles: [oms]\nsteps:\n  - id: edit\n    scope: node\n    \
                 yaml_edit: {{ file: \"{file}\", edits: [{{ delete: \"oms_meta_*\" }}] }}\n"
            ),
        );
        let out = rig.patchctl(&["upgrade", CLUSTER, &runbook.to_string_lossy(), "-y"]);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{case}: refused\n{}",
            describe(&out)
        );
        assert!(
            describe(&out).contains(why),
            "{case}: the refusal says why ({why}):\n{}",
            describe(&out)
        );
        assert_eq!(
            std::fs::read(&target).expect("outside config"),
            CONFIG_430.as_bytes(),
            "{case}: the file outside the roots is untouched"
        );
    }
    std::fs::remove_file(node.deploy_dir.join("link.yaml")).expect("remove symlink");
    assert_unchanged(&rig, &before, "after the refused runbooks");
}
