//! The `UpgradeStep` call: one agent-side operation of an upgrade runbook (a declared action, a backup, a
//! restore, a YAML edit, a container stop/start), in the controller's types. What each operation means is in the
//! comments of `agent.proto`; the agent runs only actions its `patchd.toml` declares, under its declared roots.

use super::ops::{AgentRpc, LeaseTicket, classify};
use crate::executor::CallError;
use crate::untrusted::escaped;
use patchd_proto::v1;
use patchd_runbook::machine::BackupRecord;

/// A declared action and its arguments: a runbook's `command: [NAME, ARG..]`, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionCall {
    /// The action's name in the agent's `[[upgrade.action]]`.
    pub action: String,
    /// Its positional parameters.
    pub args: Vec<String>,
}

impl ActionCall {
    /// From a rendered argv (`[NAME, ARG..]`); `None` when empty.
    pub fn from_argv(argv: &[String]) -> Option<Self> {
        let (action, args) = argv.split_first()?;
        Some(Self {
            action: action.clone(),
            args: args.to_vec(),
        })
    }

    fn to_wire(&self) -> v1::ActionCall {
        v1::ActionCall {
            action: self.action.clone(),
            args: self.args.clone(),
        }
    }
}

/// One agent-side operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeOp {
    /// Run a declared action, on the host or inside `container`.
    Run {
        /// The action.
        call: ActionCall,
        /// The container (`None`: the host).
        container: Option<String>,
    },
    /// Copy paths into the agent's backup area.
    BackupPaths {
        /// Paths.
        paths: Vec<String>,
        /// Smallest accepted copy.
        min_bytes: u64,
    },
    /// Save an action's output to `output`.
    BackupCommand {
        /// The action.
        call: ActionCall,
        /// Where.
        output: String,
        /// Smallest accepted output.
        min_bytes: u64,
    },
    /// Put backups back (to their sources, or through `call`'s standard input).
    Restore {
        /// What a backup recorded.
        backups: Vec<BackupRecord>,
        /// The loading action, for command-output backups.
        call: Option<ActionCall>,
    },
    /// Edit a YAML file (the edits as JSON of `Vec<patchd_runbook::yaml_edit::Edit>`).
    YamlEdit {
        /// The file.
        file: String,
        /// The edits.
        edits_json: String,
    },
    /// Stop or start a managed container.
    ContainerPower {
        /// The container.
        container: String,
        /// `true`: start; `false`: stop.
        start: bool,
    },
}

impl UpgradeOp {
    fn to_wire(&self) -> v1::upgrade_step_request::Op {
        use v1::upgrade_step_request::Op;
        match self {
            UpgradeOp::Run { call, container } => Op::Run(v1::RunActionOp {
                call: Some(call.to_wire()),
                container: container.clone().unwrap_or_default(),
            }),
            UpgradeOp::BackupPaths { paths, min_bytes } => Op::BackupPaths(v1::BackupPathsOp {
                paths: paths.clone(),
                min_bytes: *min_bytes,
            }),
            UpgradeOp::BackupCommand {
                call,
                output,
                min_bytes,
            } => Op::BackupCommand(v1::BackupCommandOp {
                call: Some(call.to_wire()),
                output: output.clone(),
                min_bytes: *min_bytes,
            }),
            UpgradeOp::Restore { backups, call } => Op::Restore(v1::RestoreOp {
                backups: backups
                    .iter()
                    .map(|backup| v1::UpgradeBackup {
                        path: backup.path.clone(),
                        source: backup.source.clone().unwrap_or_default(),
                        size: backup.size,
                        sha256: backup.sha256.clone(),
                    })
                    .collect(),
                call: call.as_ref().map(ActionCall::to_wire),
            }),
            UpgradeOp::YamlEdit { file, edits_json } => Op::YamlEdit(v1::YamlEditOp {
                file: file.clone(),
                edits_json: edits_json.clone(),
            }),
            UpgradeOp::ContainerPower { container, start } => {
                Op::ContainerPower(v1::ContainerPowerOp {
                    container: container.clone(),
                    start: *start,
                })
            }
        }
    }
}

/// What the agent answered, its text escaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepAnswer {
    /// The action's exit code (run, backup and restore of a command).
    pub exit_code: i32,
    /// Its standard output (at most 64 KiB).
    pub stdout: Vec<u8>,
    /// The last lines of its standard error.
    pub stderr_tail: String,
    /// Files saved (backups, a YAML edit's original).
    pub backups: Vec<BackupRecord>,
    /// What changed.
    pub note: String,
}

/// Who asks and for which step instance.
#[derive(Debug, Clone, Copy)]
pub struct StepCaller<'a> {
    /// The upgrade's id.
    pub upgrade_id: &'a str,
    /// The step instance (`id@node`).
    pub step: &'a str,
    /// The node's service (its lease covers the step).
    pub service: &'a str,
    /// The upgrade's lease ticket.
    pub lease: &'a LeaseTicket,
}

/// `UpgradeStep`: runs `op` on the agent. A refusal (a command not declared, a path outside the roots, a failed
/// action) comes back as [`CallError::Refused`] with the agent's words.
pub async fn upgrade_step(
    rpc: &mut AgentRpc,
    caller: StepCaller<'_>,
    op: &UpgradeOp,
) -> Result<StepAnswer, CallError> {
    let request = v1::UpgradeStepRequest {
        upgrade_id: caller.upgrade_id.to_string(),
        step: caller.step.to_string(),
        service: caller.service.to_string(),
        lease: Some(caller.lease.to_wire()),
        op: Some(op.to_wire()),
    };
    let response = rpc
        .upgrade_step(request)
        .await
        .map_err(|status| classify(&status))?
        .into_inner();
    Ok(StepAnswer {
        exit_code: response.exit_code,
        stdout: response.stdout.to_vec(),
        stderr_tail: escaped(&response.stderr_tail),
        backups: response
            .backups
            .into_iter()
            .map(|backup| BackupRecord {
                path: escaped(&backup.path),
                source: (!backup.source.is_empty()).then(|| escaped(&backup.source)),
                size: backup.size,
                sha256: escaped(&backup.sha256),
            })
            .collect(),
        note: escaped(&response.note),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::upgrade_step_request::Op;

    #[test]
    fn operations_reach_the_wire_with_their_records_and_the_host_as_an_empty_container() {
        let call =
            ActionCall::from_argv(&["mysql-load".to_string(), "cm".to_string()]).expect("call");
        assert_eq!(call.action, "mysql-load");
        assert!(ActionCall::from_argv(&[]).is_none());
        let restore = UpgradeOp::Restore {
            backups: vec![BackupRecord {
                path: "/state/upgrade/u1/dump/cm.sql".into(),
                source: None,
                size: 12,
                sha256: "ab".into(),
            }],
            call: Some(call.clone()),
        };
        let Op::Restore(wire) = restore.to_wire() else {
            panic!("not a restore");
        };
        assert_eq!(wire.backups[0].source, "");
        assert_eq!(wire.backups[0].size, 12);
        assert_eq!(wire.call.expect("call").args, vec!["cm".to_string()]);
        let run = UpgradeOp::Run {
            call,
            container: None,
        };
        let Op::Run(wire) = run.to_wire() else {
            panic!("not a run");
        };
        assert_eq!(wire.container, "");
        let Op::ContainerPower(power) = (UpgradeOp::ContainerPower {
            container: "oms-1".into(),
            start: false,
        })
        .to_wire() else {
            panic!("not a power op");
        };
        assert!(!power.start);
    }
}
