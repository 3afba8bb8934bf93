//! End to end, the agent's side of upgrade runbooks (`UpgradeStep`) with the real `patchd` over mutual TLS: an
//! undeclared action is refused and nothing runs; a yaml_edit outside the roots or through a planted symlink is
//! refused; a declared action runs and reports its exit code; a 0-byte dump is refused and leaves no file; a
//! tampered backup is not restored. On the real Docker Engine: container stop/start (idempotent), a
//! `container = true` action run by `docker exec`, and an Apply with `env_add` of a container stopped beforehand
//! (the runbook's stop, then swap) starts the new container with the variable in its environment.

use patchd_e2e::apply_support::{AgentRpc, outcome, push};
use patchd_e2e::container_rig::{ContainerRig, RigOptions, SERVICE, env_of};
use patchd_e2e::{AgentConfig, AgentProcess, Pki};
use patchd_proto::v1;
use std::path::{Path, PathBuf};
use tonic::Code;

/// An agent on 127.0.91.1 with one upgrade root and a few declared actions.
struct HostRig {
    agent: AgentProcess,
    pki: Pki,
    root: PathBuf,
    outside: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostRig {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let pki = Pki::new(dir.path());
        let tls = pki.issue_agent("upg-host", &["127.0.91.1"]);
        let upgrade = format!(
            r#"
[upgrade]
roots = ["{root}"]

[[upgrade.action]]
name = "mark-and-exit"
argv = ["/bin/sh", "-c", "echo ran > \"$0\"; exit \"$1\"", "{{marker}}", "{{code}}"]
params = [{{ name = "marker", type = "path" }}, {{ name = "code", type = "int" }}]

[[upgrade.action]]
name = "dump"
argv = ["/bin/sh", "-c", "head -c \"$0\" /dev/zero", "{{bytes}}"]
params = [{{ name = "bytes", type = "int" }}]
"#,
            root = root.display()
        );
        let config = AgentConfig::new(&dir.path().join("agent"), &tls)
            .listen("127.0.91.1:0")
            .extra(&upgrade);
        let state = config.state_path().to_path_buf();
        let agent = AgentProcess::start(&config.write());
        HostRig {
            agent,
            pki,
            root,
            outside,
            state,
            _dir: dir,
        }
    }

    fn rpc(&self) -> AgentRpc {
        AgentRpc::connect(&self.pki, self.agent.addr)
    }
}

fn step(op: v1::upgrade_step_request::Op) -> v1::UpgradeStepRequest {
    v1::UpgradeStepRequest {
        upgrade_id: "upg-e2e".into(),
        step: "s1@node-1".into(),
        service: String::new(),
        lease: None,
        op: Some(op),
    }
}

fn call(action: &str, args: &[&str]) -> Option<v1::ActionCall> {
    Some(v1::ActionCall {
        action: action.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
    })
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn the_agent_runs_only_declared_actions_and_touches_only_its_roots() {
    use v1::upgrade_step_request::Op;
    let rig = HostRig::start();
    let mut rpc = rig.rpc();
    let marker = rig.root.join("marker");
    let marker_arg = marker.display().to_string();

    // An action the agent did not declare: refused, and nothing ran.
    let refused = rpc
        .upgrade_step(step(Op::Run(v1::RunActionOp {
            call: call("touch", &[&marker_arg]),
            container: String::new(),
        })))
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("`touch` is not declared"),
        "{}",
        refused.message()
    );
    assert!(!marker.exists(), "nothing ran");

    // Wrong argument type: INVALID_ARGUMENT, nothing ran.
    let refused = rpc
        .upgrade_step(step(Op::Run(v1::RunActionOp {
            call: call("mark-and-exit", &[&marker_arg, "seven"]),
            container: String::new(),
        })))
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(!marker.exists(), "nothing ran");

    // A declared action runs; its exit code is the answer, not an error.
    let ran = rpc
        .upgrade_step(step(Op::Run(v1::RunActionOp {
            call: call("mark-and-exit", &[&marker_arg, "7"]),
            container: String::new(),
        })))
        .unwrap();
    assert_eq!(ran.exit_code, 7);
    assert_eq!(text(&marker), "ran\n");

    // yaml_edit outside the roots, and through a symlink planted in a root: refused, the file untouched.
    let victim = rig.outside.join("config.yaml");
    std::fs::write(&victim, "oms_meta_host: a\n").unwrap();
    std::os::unix::fs::symlink(&rig.outside, rig.root.join("planted")).unwrap();
    let edits = r#"[{"op":{"delete":"oms_meta_*"},"when":null}]"#;
    for file in [victim.clone(), rig.root.join("planted/config.yaml")] {
        let refused = rpc
            .upgrade_step(step(Op::YamlEdit(v1::YamlEditOp {
                file: file.display().to_string(),
                edits_json: edits.into(),
            })))
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{}: {refused:?}",
            file.display()
        );
    }
    assert_eq!(text(&victim), "oms_meta_host: a\n");

    // A dump that comes out 0 bytes: FAILED_PRECONDITION and no file left.
    let dumps = rig.root.join("dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    let output = dumps.join("rm.sql").display().to_string();
    let refused = rpc
        .upgrade_step(step(Op::BackupCommand(v1::BackupCommandOp {
            call: call("dump", &["0"]),
            output: output.clone(),
            min_bytes: 1,
        })))
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        std::fs::read_dir(&dumps).unwrap().count(),
        0,
        "no file left"
    );
    let dumped = rpc
        .upgrade_step(step(Op::BackupCommand(v1::BackupCommandOp {
            call: call("dump", &["512"]),
            output: output.clone(),
            min_bytes: 1,
        })))
        .unwrap();
    assert_eq!(dumped.backups[0].size, 512);
    assert_eq!(
        dumped.backups[0].sha256,
        patchd_e2e::sha256_file(Path::new(&output))
    );

    // A backed-up file whose backup is tampered with: not restored, the target untouched.
    let config = rig.root.join("config.yaml");
    std::fs::write(&config, "oms_meta_host: b\n").unwrap();
    let saved = rpc
        .upgrade_step(step(Op::BackupPaths(v1::BackupPathsOp {
            paths: vec![config.display().to_string()],
            min_bytes: 1,
        })))
        .unwrap();
    let backup = saved.backups[0].clone();
    assert!(
        Path::new(&backup.path).starts_with(rig.state.join("upgrade/upg-e2e")),
        "{}",
        backup.path
    );
    std::fs::write(&config, "edited since\n").unwrap();
    std::fs::write(&backup.path, "tampered\n").unwrap();
    let refused = rpc
        .upgrade_step(step(Op::Restore(v1::RestoreOp {
            backups: vec![backup],
            call: None,
        })))
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(text(&config), "edited since\n", "the target is untouched");
}

#[test]
fn containers_are_stopped_started_and_exec_ed_and_an_apply_adds_env_to_a_stopped_container() {
    use v1::upgrade_step_request::Op;
    let mut rig = ContainerRig::start("upg-agent", RigOptions::default());
    let upgrade = r#"
[upgrade]
roots = []

[[upgrade.action]]
name = "worker-version"
argv = ["/demo-worker", "version"]
container = true
"#;
    let mut config = text(&rig.config_path);
    config.push_str(upgrade);
    std::fs::write(&rig.config_path, config).unwrap();
    rig.agent.restart();
    let mut rpc = rig.rpc();
    let power = |start: bool, container: &str| {
        step(Op::ContainerPower(v1::ContainerPowerOp {
            container: container.into(),
            start,
        }))
    };
    let running = |rig: &ContainerRig| rig.current().state.unwrap_or_default().running;

    // A container the agent does not manage is refused.
    let refused = rpc
        .upgrade_step(power(false, "some-other-container"))
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(running(&rig), Some(true));

    // docker exec of a declared container action.
    let exec = rpc
        .upgrade_step(step(Op::Run(v1::RunActionOp {
            call: call("worker-version", &[]),
            container: rig.container.clone(),
        })))
        .unwrap();
    assert_eq!(exec.exit_code, 0, "{exec:?}");
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "v1.0.0");

    // Another rollout holds the service's lease: a step naming the service is refused as Apply is.
    rpc.lease(
        SERVICE,
        v1::LeaseAction::Acquire,
        ("other-rollout", "other-store"),
        60_000,
    )
    .unwrap();
    let mut leased = power(false, &rig.container);
    leased.service = SERVICE.into();
    let refused = rpc.upgrade_step(leased.clone()).unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(running(&rig), Some(true), "nothing stopped");
    rpc.lease(
        SERVICE,
        v1::LeaseAction::Release,
        ("other-rollout", "other-store"),
        0,
    )
    .unwrap();

    // Stop twice (idempotent), start, stop again: the runbook's stop before the swap.
    assert_eq!(
        rpc.upgrade_step(power(false, &rig.container)).unwrap().note,
        "stopped"
    );
    assert_eq!(running(&rig), Some(false));
    assert_eq!(
        rpc.upgrade_step(power(false, &rig.container)).unwrap().note,
        "already stopped"
    );
    assert_eq!(
        rpc.upgrade_step(power(true, &rig.container)).unwrap().note,
        "started"
    );
    rig.wait_serving("v1.0.0");
    assert_eq!(
        rpc.upgrade_step(power(false, &rig.container)).unwrap().note,
        "stopped"
    );

    // Apply with env_add to the stopped container: the new one is created, started, and passes probation.
    let (package, new_image) = rig.image_package("v4.3.1", "ok");
    let digest = push(&rig.pki, &rig.agent.addr_string(), &package);
    rpc.stage(SERVICE, &digest).unwrap();
    let applied = rpc
        .apply_request(v1::ApplyRequest {
            service: SERVICE.into(),
            digest,
            patch_id: "upg-e2e:swap@worker-1".into(),
            env_add: [("UPGRADE_MARK".to_string(), "from-request".to_string())].into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        outcome(&applied),
        v1::ApplyOutcome::Committed,
        "{applied:?}"
    );
    let after = rig.assert_one_running();
    assert_eq!(after.image.as_deref(), Some(new_image.as_str()));
    let env = env_of(&after);
    assert!(
        env.contains(&"UPGRADE_MARK=from-request".to_string()),
        "{env:?}"
    );
    assert!(
        env.contains(&patchd_e2e::container_rig::ENV_ADD.to_string()),
        "{env:?}"
    );
    rig.wait_serving("v4.3.1");
}
