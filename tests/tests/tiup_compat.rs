//! End to end: tiup's way of typing booleans (`--overwrite=true`, `--offline=false`) is accepted by `patchctl patch`,
//! and `patchctl cluster show` lists the package a `--overwrite` rollout recorded for each role.

use patchd_e2e::cluster_fixture::{ClusterFixture, output_text};

#[test]
fn tiup_booleans_are_accepted_and_cluster_show_lists_the_overwritten_role_package() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterFixture::with_workers(dir.path(), 2);
    let package = cluster.worker_package("v1.0.1-hotfix", "ok");
    let package = package.to_str().unwrap();
    let name = cluster.name.as_str();

    let yaml_before = cluster.patchctl_ok(&["cluster", "show", name]);
    assert!(
        !yaml_before.contains("patch --overwrite"),
        "no package recorded yet:\n{yaml_before}"
    );

    // `--offline=true` is the offline mode (the plan's header says so), `--offline=false` and a bare `--offline`
    // behave as before; `--offline false` stays a positional argument, as with tiup.
    let offline = cluster.patchctl_ok(&["patch", name, package, "--offline=true", "--dry-run"]);
    assert!(offline.contains("--offline: files only"), "{offline}");
    let bare = cluster.patchctl_ok(&["patch", name, package, "--offline", "--dry-run"]);
    assert!(bare.contains("--offline: files only"), "{bare}");
    let online = cluster.patchctl_ok(&["patch", name, package, "--offline=false", "--dry-run"]);
    assert!(!online.contains("--offline"), "{online}");
    let bad = cluster.patchctl(&["patch", name, package, "--overwrite=maybe", "--dry-run"]);
    assert_eq!(bad.status.code(), Some(2), "{}", output_text(&bad));
    assert!(
        output_text(&bad).contains("--overwrite"),
        "{}",
        output_text(&bad)
    );

    // One worker is enough (the demo master keeps its last worker online); its role gets the package recorded.
    let out = cluster.patchctl(&[
        "patch",
        name,
        package,
        "-N",
        "worker-1",
        "--overwrite=true",
        "--offline=false",
        "-y",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));

    let shown = cluster.patchctl_ok(&["cluster", "show", name]);
    assert!(
        shown.starts_with(&yaml_before),
        "the stored file comes first, verbatim:\n{shown}"
    );
    let recorded = shown
        .lines()
        .find(|line| line.starts_with("#   demo-worker:"))
        .unwrap_or_else(|| panic!("no recorded package for demo-worker:\n{shown}"));
    assert!(
        recorded.contains("v1.0.1-hotfix") && recorded.contains(package),
        "{recorded}"
    );
    let document: serde_json::Value =
        serde_json::from_str(&cluster.patchctl_ok(&["--format", "json", "cluster", "show", name]))
            .unwrap();
    let packages = document["role_packages"].as_array().unwrap();
    assert_eq!(packages.len(), 1, "{document:#}");
    assert_eq!(packages[0]["role"], "demo-worker");
    assert_eq!(packages[0]["version"], "v1.0.1-hotfix");
    assert_eq!(packages[0]["digest"].as_str().unwrap().len(), 64);
}
