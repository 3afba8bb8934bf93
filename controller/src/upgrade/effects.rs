//! `LiveUpgradeEffects`: the step machine's effects for real. `http`, `sql` and their checks run in `patchctl`;
//! everything on a node goes to its agent: declared actions, backups, restores, YAML edits and container
//! stop/start through `UpgradeStep`, the container swap through the package's upload, Stage and Apply (with
//! `env_add`) and its undo through Rollback. The machine is synchronous and runs on a blocking thread; each call
//! here enters the runtime with `Handle::block_on`.

use super::expect::{Verdict, command_verdict, field_text, json_verdict, rows_verdict};
use super::http::HttpSteps;
use super::journal::SharedHistory;
use super::sql::SqlSteps;
use crate::agent::client::{AgentClient, PreparedBlob, PushOptions};
use crate::agent::effects::APPLY_CALL_TIMEOUT;
use crate::agent::ops::{self, LeaseTicket};
use crate::agent::upgrade_step::{ActionCall, StepAnswer, StepCaller, UpgradeOp, upgrade_step};
use crate::executor::ApplyOutcome;
use crate::tls_files::ControllerTls;
use crate::topology::{Node, Topology};
use patchd_runbook::machine::{Entry, Resolution, StepOutput, StepResult, UpgradeEffects, Values};
use patchd_runbook::schedule::ScheduledStep;
use patchd_runbook::{
    Action, Backup, BackupSource, Check, ContainerAction, ContainerOp, HttpCall, Probe, Restore,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

/// How long one agent-side step may take (a dump of a large database, `docker_upgrade.sh`).
const STEP_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// What the effects need to know about the upgrade.
pub struct UpgradeContext {
    /// The upgrade's id (the agents' `upgrade_id`, the lease's rollout id).
    pub upgrade_id: String,
    /// The upgrade's lease ticket.
    pub lease: LeaseTicket,
    /// The image package of `container: swap` steps (`--package`).
    pub package: Option<Arc<PreparedBlob>>,
}

/// The real effects.
pub struct LiveUpgradeEffects {
    runtime: Handle,
    topology: Arc<Topology>,
    tls: ControllerTls,
    http: HttpSteps,
    sql: SqlSteps,
    context: UpgradeContext,
    history: SharedHistory,
}

impl LiveUpgradeEffects {
    /// Effects for an upgrade of `topology`'s cluster; `history` is the journal as it grows.
    pub fn new(
        runtime: Handle,
        topology: Arc<Topology>,
        tls: ControllerTls,
        context: UpgradeContext,
        history: SharedHistory,
    ) -> Result<Self, String> {
        let http = HttpSteps::for_cluster(&tls)?;
        let sql = SqlSteps::new(&topology);
        Ok(Self {
            runtime,
            topology,
            tls,
            http,
            sql,
            context,
            history,
        })
    }

    fn node_of(&self, step: &ScheduledStep) -> Result<&Node, String> {
        let node = step.node.as_ref().ok_or_else(|| {
            format!(
                "step {} runs on the controller, and this action needs a node: give it `on: <role>`",
                step.key
            )
        })?;
        self.node_by_id(&node.id)
    }

    fn node_by_id(&self, id: &str) -> Result<&Node, String> {
        self.topology.node_by_id(id).ok_or_else(|| {
            format!("node {id} is no longer in the cluster's topology; re-import the topology it ran with")
        })
    }

    /// One `UpgradeStep` call on `node` for `step`.
    fn agent(
        &self,
        step: &ScheduledStep,
        node: &Node,
        op: UpgradeOp,
    ) -> Result<StepAnswer, String> {
        let key = step.key.to_string();
        let caller = StepCaller {
            upgrade_id: &self.context.upgrade_id,
            step: &key,
            service: &node.service,
            lease: &self.context.lease,
        };
        self.runtime.block_on(async {
            let mut client = AgentClient::connect(&node.agent_address(), &self.tls)
                .await
                .map_err(|error| format!("agent {}: {error}", node.agent_address()))?;
            tokio::time::timeout(STEP_CALL_TIMEOUT, upgrade_step(client.raw(), caller, &op))
                .await
                .map_err(|_| {
                    format!(
                        "agent {}: no answer within {}s",
                        node.agent_address(),
                        STEP_CALL_TIMEOUT.as_secs()
                    )
                })?
                .map_err(|error| format!("agent {}: {error}", node.agent_address()))
        })
    }

    fn call(argv: &[String], values: &Values, step: &ScheduledStep) -> Result<ActionCall, String> {
        let rendered: Vec<String> = argv.iter().map(|arg| values.render(arg, step)).collect();
        ActionCall::from_argv(&rendered)
            .ok_or_else(|| format!("step {}: an empty command", step.key))
    }

    fn check(
        &self,
        step: &ScheduledStep,
        check: &Check,
        values: &Values,
    ) -> Result<Verdict, String> {
        match &check.probe {
            Probe::Command(argv) => {
                let node = self.node_of(step)?;
                let call = Self::call(argv, values, step)?;
                let answer = self.agent(
                    step,
                    node,
                    UpgradeOp::Run {
                        call,
                        container: None,
                    },
                )?;
                command_verdict(answer.exit_code, &answer.stdout, &check.expect)
            }
            Probe::Http { method, url, body } => {
                let url = values.render(url, step);
                let body = body.as_ref().map(|body| values.render(body, step));
                let answer =
                    self.runtime
                        .block_on(self.http.call(*method, &url, body.as_deref(), None))?;
                json_verdict(&answer.body, &check.expect)
            }
            Probe::Sql { database, query } => {
                let query = values.render(query, step);
                let rows = self
                    .runtime
                    .block_on(self.sql.count_rows(database, &query))?;
                rows_verdict(rows, &check.expect)
            }
        }
    }

    fn http(
        &self,
        step: &ScheduledStep,
        call: &HttpCall,
        values: &Values,
    ) -> Result<StepOutput, String> {
        let url = values.render(&call.url, step);
        let body = match (&call.restore, &call.body) {
            (Some(name), _) => Some(values.saved.get(name).cloned().ok_or_else(|| {
                format!("`restore: {name}`: no value was saved under `{name}` in this upgrade")
            })?),
            (None, Some(body)) => Some(values.render(body, step)),
            (None, None) => None,
        };
        let answer = self.runtime.block_on(self.http.call(
            call.method,
            &url,
            body.as_deref(),
            call.expect_status,
        ))?;
        let saved = match &call.save {
            Some(save) => Some((
                save.name.clone(),
                field_text(&answer.body, &save.field).map_err(|why| format!("{url}: {why}"))?,
            )),
            None => None,
        };
        let note = match &saved {
            Some((name, _)) => format!("HTTP {}, saved {name}", answer.status),
            None => format!("HTTP {}", answer.status),
        };
        Ok(StepOutput {
            saved,
            note: Some(note),
            ..StepOutput::default()
        })
    }

    fn backup(
        &self,
        step: &ScheduledStep,
        backup: &Backup,
        values: &Values,
    ) -> Result<StepOutput, String> {
        let node = self.node_of(step)?;
        let op = match &backup.source {
            BackupSource::Paths(paths) => UpgradeOp::BackupPaths {
                paths: paths.iter().map(|path| values.render(path, step)).collect(),
                min_bytes: backup.min_bytes,
            },
            BackupSource::CommandOutput { command, output } => UpgradeOp::BackupCommand {
                call: Self::call(command, values, step)?,
                output: values.render(output, step),
                min_bytes: backup.min_bytes,
            },
        };
        let answer = self.agent(step, node, op)?;
        if answer.backups.is_empty() {
            return Err("the agent saved nothing".to_string());
        }
        // The agent checks the size too; a second look here keeps a 0-byte dump from ever counting as a backup.
        if let Some(small) = answer.backups.iter().find(|b| b.size < backup.min_bytes) {
            return Err(format!(
                "{} holds {} bytes, less than the {} required",
                small.path, small.size, backup.min_bytes
            ));
        }
        let total: u64 = answer.backups.iter().map(|b| b.size).sum();
        Ok(StepOutput {
            note: Some(format!("{} file(s), {total} bytes", answer.backups.len())),
            backups: answer.backups,
            ..StepOutput::default()
        })
    }

    /// The backups the step `backup_step` recorded, and the node holding them (the same node as `step` when the
    /// backup step ran there, else the instance that ran it).
    fn recorded_backups(
        &self,
        step: &ScheduledStep,
        backup_step: &str,
    ) -> Result<(String, StepOutput), String> {
        let mut found: Vec<(Option<String>, StepOutput)> = Vec::new();
        for entry in self.history.entries() {
            if let Entry::Finished {
                key,
                result: StepResult::Done(output),
            } = entry
                && key.step == backup_step
            {
                found.retain(|(node, _)| *node != key.node);
                found.push((key.node.clone(), output));
            }
        }
        let here = step.node.as_ref().map(|node| node.id.clone());
        let chosen = found
            .iter()
            .find(|(node, _)| *node == here)
            .or_else(|| found.first())
            .cloned();
        match chosen {
            Some((Some(node), output)) if !output.backups.is_empty() => Ok((node, output)),
            _ => Err(format!(
                "step `{backup_step}` recorded no backup in this upgrade, so there is nothing to restore"
            )),
        }
    }

    fn restore(
        &self,
        step: &ScheduledStep,
        restore: &Restore,
        values: &Values,
    ) -> Result<StepOutput, String> {
        let (node_id, recorded) = self.recorded_backups(step, &restore.backup)?;
        let node = self.node_by_id(&node_id)?;
        let call = match &restore.command {
            Some(command) => Some(Self::call(command, values, step)?),
            None => None,
        };
        let count = recorded.backups.len();
        let answer = self.agent(
            step,
            node,
            UpgradeOp::Restore {
                backups: recorded.backups,
                call,
            },
        )?;
        Ok(StepOutput {
            note: Some(non_empty(answer.note, format!("{count} file(s) restored"))),
            ..StepOutput::default()
        })
    }

    fn container(
        &self,
        step: &ScheduledStep,
        container: &ContainerAction,
        values: &Values,
    ) -> Result<StepOutput, String> {
        let node = self.node_of(step)?;
        let name = values.render(&container.name, step);
        let answer = match &container.op {
            ContainerOp::Swap { env_add } => return self.swap(step, node, env_add),
            ContainerOp::Stop => self.agent(
                step,
                node,
                UpgradeOp::ContainerPower {
                    container: name,
                    start: false,
                },
            )?,
            ContainerOp::Start => self.agent(
                step,
                node,
                UpgradeOp::ContainerPower {
                    container: name,
                    start: true,
                },
            )?,
            ContainerOp::Exec(argv) => {
                let call = Self::call(argv, values, step)?;
                let answer = self.agent(
                    step,
                    node,
                    UpgradeOp::Run {
                        call,
                        container: Some(name),
                    },
                )?;
                if answer.exit_code != 0 {
                    return Err(format!(
                        "exited with code {}: {}",
                        answer.exit_code,
                        answer.stderr_tail.trim()
                    ));
                }
                answer
            }
        };
        Ok(StepOutput {
            note: (!answer.note.is_empty()).then_some(answer.note),
            ..StepOutput::default()
        })
    }

    /// The patch id of a swap: the upgrade and the step instance, in the characters patch ids allow.
    fn swap_patch_id(&self, step: &ScheduledStep) -> String {
        let node = step
            .node
            .as_ref()
            .map_or("cluster", |node| node.name.as_str());
        let raw = format!("{}.{}@{node}", self.context.upgrade_id, step.key.step);
        let safe: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._@-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        safe.chars().take(128).collect()
    }

    fn swap(
        &self,
        step: &ScheduledStep,
        node: &Node,
        env_add: &std::collections::BTreeMap<String, String>,
    ) -> Result<StepOutput, String> {
        let blob = self.context.package.as_ref().ok_or_else(|| {
            format!(
                "step {} swaps a container: give the image package with `--package PKG`",
                step.key
            )
        })?;
        let patch_id = self.swap_patch_id(step);
        let result = self.runtime.block_on(async {
            let mut client = AgentClient::connect(&node.agent_address(), &self.tls)
                .await
                .map_err(|error| format!("agent {}: {error}", node.agent_address()))?;
            client
                .push(blob, &PushOptions::default(), |_| {})
                .await
                .map_err(|error| format!("upload to {}: {error}", node.agent_address()))?;
            ops::stage(client.raw(), &node.service, &blob.digest, &blob.signatures)
                .await
                .map_err(|status| {
                    format!(
                        "Stage on {}: {:?}: {}",
                        node.agent_address(),
                        status.code(),
                        crate::untrusted::escaped(status.message())
                    )
                })?;
            tokio::time::timeout(
                APPLY_CALL_TIMEOUT,
                ops::apply_with_env(
                    client.raw(),
                    &node.service,
                    &blob.digest,
                    &patch_id,
                    false,
                    Some(&self.context.lease),
                    &blob.signatures,
                    env_add,
                ),
            )
            .await
            .map_err(|_| format!("Apply on {}: no answer", node.agent_address()))?
            .map_err(|error| format!("Apply on {}: {error}", node.agent_address()))
        })?;
        match result.outcome {
            ApplyOutcome::Committed => Ok(StepOutput {
                note: Some(format!("new container running, patch {patch_id}")),
                ..StepOutput::default()
            }),
            other => Err(format!(
                "the swap did not commit ({}): {}",
                ops::outcome_name(other),
                result.reason
            )),
        }
    }

    fn swap_undo(&self, step: &ScheduledStep, node: &Node) -> Result<(), String> {
        let patch_id = self.swap_patch_id(step);
        let rollback_id = format!("{patch_id}.undo")
            .chars()
            .take(128)
            .collect::<String>();
        let result = self.runtime.block_on(async {
            let mut client = AgentClient::connect(&node.agent_address(), &self.tls)
                .await
                .map_err(|error| format!("agent {}: {error}", node.agent_address()))?;
            tokio::time::timeout(
                APPLY_CALL_TIMEOUT,
                ops::rollback(
                    client.raw(),
                    &node.service,
                    Some(&patch_id),
                    &rollback_id,
                    Some(&self.context.lease),
                ),
            )
            .await
            .map_err(|_| format!("Rollback on {}: no answer", node.agent_address()))?
            .map_err(|error| format!("Rollback on {}: {error}", node.agent_address()))
        })?;
        match result.outcome {
            ApplyOutcome::Committed => Ok(()),
            other => Err(format!(
                "the rollback did not commit ({}): {}",
                ops::outcome_name(other),
                result.reason
            )),
        }
    }
}

fn non_empty(text: String, otherwise: String) -> String {
    if text.is_empty() { otherwise } else { text }
}

impl UpgradeEffects for LiveUpgradeEffects {
    fn run(
        &mut self,
        step: &ScheduledStep,
        action: &Action,
        values: &Values,
    ) -> Result<StepOutput, String> {
        match action {
            Action::Check(check) => match self.check(step, check, values)? {
                Verdict::Met(note) => Ok(StepOutput {
                    note: Some(note),
                    ..StepOutput::default()
                }),
                Verdict::NotMet(why) => Err(format!("check not met: {why}")),
            },
            Action::Http(call) => self.http(step, call, values),
            Action::Backup(backup) => self.backup(step, backup, values),
            Action::YamlEdit(edit) => {
                let node = self.node_of(step)?;
                let edits_json = serde_json::to_string(&edit.edits)
                    .map_err(|error| format!("cannot encode the edits: {error}"))?;
                let answer = self.agent(
                    step,
                    node,
                    UpgradeOp::YamlEdit {
                        file: values.render(&edit.file, step),
                        edits_json,
                    },
                )?;
                Ok(StepOutput {
                    note: (!answer.note.is_empty()).then_some(answer.note),
                    backups: answer.backups,
                    ..StepOutput::default()
                })
            }
            Action::Sql(sql) => {
                let statements: Vec<String> = sql
                    .statements
                    .iter()
                    .map(|statement| values.render(statement, step))
                    .collect();
                self.runtime
                    .block_on(self.sql.execute(&sql.database, &statements))?;
                Ok(StepOutput {
                    note: Some(format!(
                        "{} statement(s) on {}",
                        statements.len(),
                        sql.database
                    )),
                    ..StepOutput::default()
                })
            }
            Action::Container(container) => self.container(step, container, values),
            Action::Restore(restore) => self.restore(step, restore, values),
            Action::Mark(_) | Action::Assert(_) => Err(format!(
                "step {}: `{}` is evaluated by the step machine, not by effects",
                step.key,
                action.kind()
            )),
        }
    }

    fn resolve(
        &mut self,
        step: &ScheduledStep,
        check: &Check,
        values: &Values,
    ) -> Result<Resolution, String> {
        Ok(match self.check(step, check, values)? {
            Verdict::Met(note) => Resolution::TookEffect(StepOutput {
                note: Some(format!("resolve check: {note}")),
                ..StepOutput::default()
            }),
            Verdict::NotMet(_) => Resolution::NotTaken,
        })
    }

    fn undo(
        &mut self,
        step: &ScheduledStep,
        action: &Action,
        undo: Option<&Action>,
        output: &StepOutput,
        values: &Values,
    ) -> Result<(), String> {
        if let Some(undo) = undo {
            return self.run(step, undo, values).map(|_| ());
        }
        match action {
            Action::YamlEdit(_) => {
                if output.backups.is_empty() {
                    // Nothing was saved: the edit found the file already edited and left it as it was.
                    return Ok(());
                }
                let node = self.node_of(step)?;
                self.agent(
                    step,
                    node,
                    UpgradeOp::Restore {
                        backups: output.backups.clone(),
                        call: None,
                    },
                )
                .map(|_| ())
            }
            Action::Container(ContainerAction { name, op }) => {
                let node = self.node_of(step)?;
                let name = values.render(name, step);
                match op {
                    ContainerOp::Stop => self
                        .agent(
                            step,
                            node,
                            UpgradeOp::ContainerPower {
                                container: name,
                                start: true,
                            },
                        )
                        .map(|_| ()),
                    ContainerOp::Start => self
                        .agent(
                            step,
                            node,
                            UpgradeOp::ContainerPower {
                                container: name,
                                start: false,
                            },
                        )
                        .map(|_| ()),
                    ContainerOp::Swap { .. } => self.swap_undo(step, node),
                    ContainerOp::Exec(_) => Err(format!(
                        "step {}: an `exec` has no built-in undo; declare `undo:`",
                        step.key
                    )),
                }
            }
            other => Err(format!(
                "step {}: a `{}` step has no built-in undo; declare `undo:`",
                step.key,
                other.kind()
            )),
        }
    }

    fn now(&mut self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}
