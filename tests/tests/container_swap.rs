//! End to end on the real Docker Engine: `patchctl patch` of a container service swaps the container for one made
//! from the new image with the same configuration (Mounts, Env plus `env_add`, privileged, ulimits, pids limit,
//! network mode, restart policy, labels), `rollback` goes back to the previous image with that configuration,
//! and a new image that exits at once is reverted: the original container ID runs again, and patchctl exits 3.

use patchd_e2e::cluster_fixture::output_text;
use patchd_e2e::container_rig::{ContainerRig, ENV_ADD, RigOptions, carried_config, env_of};

#[test]
fn a_patched_container_keeps_its_configuration_and_rolls_back_to_the_previous_image() {
    let rig = ContainerRig::start("ct-swap", RigOptions::default());
    let before = rig.assert_one_running();
    let config_before = carried_config(&before);
    let env_before = env_of(&before);
    let (package, new_image) = rig.image_package("v1.0.1-hotfix", "ok");

    let out = rig.patchctl(&["patch", &rig.cluster, &package.to_string_lossy(), "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let after = rig.assert_one_running();
    assert_eq!(
        after.image.as_deref(),
        Some(new_image.as_str()),
        "the new image runs"
    );
    assert_ne!(
        after.id.as_deref(),
        Some(rig.original_id.as_str()),
        "a new container"
    );
    assert_eq!(
        carried_config(&after),
        config_before,
        "configuration carried over"
    );
    let mut expected_env = env_before.clone();
    expected_env.push(ENV_ADD.to_string());
    assert_eq!(
        env_of(&after),
        expected_env,
        "Env is the old one plus env_add"
    );
    assert_eq!(rig.served_version().as_deref(), Some("v1.0.1-hotfix"));
    assert!(
        rig.docker.inspect_image(&rig.original_image).is_some(),
        "the previous image is kept for rollback"
    );
    let shown =
        String::from_utf8_lossy(&rig.patchctl(&["display", &rig.cluster]).stdout).into_owned();
    let short = &new_image.trim_start_matches("sha256:")[..12];
    assert!(
        shown.contains(short),
        "display shows the image's short ID:\n{shown}"
    );
    assert!(shown.contains("(patched)"), "{shown}");

    let out = rig.patchctl(&["rollback", &rig.cluster, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let rolled_back = rig.assert_one_running();
    assert_eq!(
        rolled_back.image.as_deref(),
        Some(rig.original_image.as_str()),
        "the previous image runs again"
    );
    assert_eq!(
        carried_config(&rolled_back),
        config_before,
        "same configuration"
    );
    rig.wait_serving("v1.0.0");
}

#[test]
fn a_new_image_whose_entrypoint_exits_1_is_reverted_and_the_original_container_runs_again() {
    // The new image's own entrypoint is used, and it exits 1 at once (it cannot listen on "not-an-address").
    let rig = ContainerRig::start(
        "ct-revert",
        RigOptions {
            use_image_defaults: true,
        },
    );
    let binary = rig.path().join("binaries/v1.0.0/demo-worker");
    let broken = rig.docker.build_image(
        &format!("{}:broken", rig.docker.name("worker")),
        &binary,
        &["/demo-worker", "serve", "--listen", "not-an-address"],
    );
    let (package, _) = rig.package_of(&broken, "v1.0.1-broken");

    let out = rig.patchctl(&["patch", &rig.cluster, &package.to_string_lossy(), "-y"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let text = output_text(&out);
    assert!(
        text.contains("exited with status 1"),
        "the reason names the exit:\n{text}"
    );
    let now = rig.assert_one_running();
    assert_eq!(
        now.id.as_deref(),
        Some(rig.original_id.as_str()),
        "the original container runs again"
    );
    assert_eq!(now.image.as_deref(), Some(rig.original_image.as_str()));
    rig.wait_serving("v1.0.0");
}

#[test]
fn an_offline_apply_recreates_a_stopped_container_without_starting_it() {
    use patchd_e2e::apply_support::{outcome, push, v1};
    use patchd_e2e::container_rig::SERVICE;
    let rig = ContainerRig::start("ct-offline", RigOptions::default());
    let before = rig.current();
    let (package, new_image) = rig.image_package("v1.0.1-hotfix", "ok");
    let digest = push(&rig.pki, &rig.agent.addr_string(), &package);
    let mut rpc = rig.rpc();
    rpc.stage(SERVICE, &digest).unwrap();

    // A running container is refused: an offline apply never starts or stops anything.
    let refused = rpc.apply(SERVICE, &digest, "offline-1", true).unwrap();
    assert_eq!(outcome(&refused), v1::ApplyOutcome::Failed, "{refused:?}");
    assert!(refused.reason.contains("docker stop"), "{}", refused.reason);
    assert_eq!(rig.assert_one_running().id, before.id);

    let stopped = std::process::Command::new("docker")
        .args(["stop", &rig.container])
        .output()
        .unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    let applied = rpc.apply(SERVICE, &digest, "offline-2", true).unwrap();
    assert_eq!(
        outcome(&applied),
        v1::ApplyOutcome::OfflineSwapped,
        "{applied:?}"
    );
    assert_eq!(
        rig.containers(),
        vec![rig.container.clone()],
        "nothing left aside"
    );
    let now = rig.current();
    assert_eq!(now.image.as_deref(), Some(new_image.as_str()));
    assert_eq!(
        now.state.clone().unwrap_or_default().running,
        Some(false),
        "not started"
    );
    assert_eq!(carried_config(&now), carried_config(&before));
}
