//! End to end on the real Docker Engine: the agent is killed (SIGKILL, through `PATCHD_FAULT`) at every step of a
//! container swap and started again; recovery leaves exactly one container under the service's name, running the
//! old image (the original container ID: the swap had not committed) and nothing renamed aside. A crash during a
//! revert is finished the same way; an uninterrupted apply then commits the new image.

use patchd_e2e::apply_support::{outcome, push, v1};
use patchd_e2e::container_rig::{ContainerRig, RigOptions, SERVICE};
use patchd_e2e::{AgentProcess, wait_for};
use std::time::Duration;

/// Kills the agent at `point` during an apply of `digest`, starts it again, and checks what recovery left.
fn crash_and_recover(rig: &mut ContainerRig, point: &str, digest: &str, patch_id: &str) {
    rig.agent.kill();
    rig.agent = AgentProcess::start_with_env(&rig.config_path, &[("PATCHD_FAULT", point)]);
    let answer = rig.rpc().apply(SERVICE, digest, patch_id, false);
    assert!(
        answer.is_err(),
        "{point}: the agent should have died, got {answer:?}"
    );
    let agent = &mut rig.agent;
    wait_for(
        Duration::from_secs(30),
        "the agent to die at the fault point",
        || !agent.is_running(),
    );
    let point_name = point.split(':').next().unwrap_or(point);
    assert!(
        rig.agent
            .stderr()
            .contains(&format!("injected crash at {point_name}")),
        "{point}: {}",
        rig.agent.stderr()
    );
    // Recovery runs before the agent listens.
    rig.agent = AgentProcess::start(&rig.config_path);
    let now = rig.assert_one_running();
    assert_eq!(
        now.id.as_deref(),
        Some(rig.original_id.as_str()),
        "{point}: the original container runs again"
    );
    assert_eq!(
        now.image.as_deref(),
        Some(rig.original_image.as_str()),
        "{point}"
    );
    // Before the old container was stopped nothing live had changed: the apply failed rather than reverted.
    let phase = if point == "after-prepare" {
        "failed"
    } else {
        "reverted"
    };
    assert_eq!(rig.journal_phase(), phase, "{point}");
    rig.wait_serving("v1.0.0");
}

#[test]
fn a_kill_9_at_every_step_of_the_container_swap_recovers_to_one_running_container() {
    let mut rig = ContainerRig::start("ct-crash", RigOptions::default());
    let (package, new_image) = rig.image_package("v1.0.1-hotfix", "ok");
    let digest = push(&rig.pki, &rig.agent.addr_string(), &package);
    rig.rpc().stage(SERVICE, &digest).unwrap();
    let points = [
        "after-prepare",
        "after-stop",
        "after-swap:1",
        "after-swap:2",
        "after-start",
        "during-probation",
        "before-commit",
    ];
    for (index, point) in points.iter().enumerate() {
        crash_and_recover(&mut rig, point, &digest, &format!("crash-{index}"));
    }

    // A crash while reverting a new version that exits at once.
    let (broken, _) = rig.image_package("v1.0.2-broken", "crash");
    let broken_digest = push(&rig.pki, &rig.agent.addr_string(), &broken);
    rig.rpc().stage(SERVICE, &broken_digest).unwrap();
    crash_and_recover(&mut rig, "during-revert", &broken_digest, "crash-revert");

    // Without faults the swap commits: one container, the new image, nothing left aside.
    let applied = rig.rpc().apply(SERVICE, &digest, "final", false).unwrap();
    assert_eq!(
        outcome(&applied),
        v1::ApplyOutcome::Committed,
        "{applied:?}"
    );
    let now = rig.assert_one_running();
    assert_eq!(now.image.as_deref(), Some(new_image.as_str()));
    rig.wait_serving("v1.0.1-hotfix");
    let status = rig.rpc().status(SERVICE);
    let short = &new_image.trim_start_matches("sha256:")[..12];
    assert!(
        status.image.contains(short),
        "Status names the image: {status:?}"
    );
}
