//! The ordered steps of one upgrade: a validated [`Runbook`] laid over the planner's node order. Pure; the
//! result is what `patchctl upgrade --dry-run` prints and what the [`crate::machine`] walks.
//!
//! Order: the cluster steps before the nodes; then, node after node in plan order (batch by batch), every node
//! step whose roles hold the node (a `once` step only on its role's first node in plan order); then the cluster
//! steps after the nodes. A cluster step `on: <role>` runs on that role's first node in plan order.

use crate::model::*;
use crate::placeholder::{Placeholder, render};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A node in plan order, as the schedule needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    /// Node ID.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Role.
    pub role: String,
    /// Deploy directory (the topology's).
    #[serde(default)]
    pub deploy_dir: String,
    /// The agent service the node runs (the topology's).
    #[serde(default)]
    pub service: String,
    /// 0-based batch of the plan.
    pub batch: usize,
}

/// Names one step instance: the step id, and the node for node steps and cluster steps `on:` a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StepKey {
    /// Step id.
    pub step: String,
    /// Node ID, when the instance runs on a node.
    pub node: Option<String>,
}

impl fmt::Display for StepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{}@{node}", self.step),
            None => write!(f, "{}", self.step),
        }
    }
}

/// One step instance in run order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduledStep {
    /// Its journal name.
    pub key: StepKey,
    /// Position of the step in [`Runbook::steps`].
    pub step_index: usize,
    /// The step's scope.
    pub scope: Scope,
    /// The node it runs on (`None`: the controller).
    pub node: Option<NodeRef>,
    /// The node is the first of its role in plan order.
    pub is_first: bool,
    /// The node is the last of its role in plan order.
    pub is_last: bool,
}

impl ScheduledStep {
    /// The node placeholders' values (`{host}`, `{is_last}`, …) for this instance.
    pub fn node_value(&self, name: &str) -> Option<String> {
        let node = self.node.as_ref()?;
        Some(match name {
            "host" => node.host.clone(),
            "id" => node.id.clone(),
            "name" => node.name.clone(),
            "role" => node.role.clone(),
            "deploy_dir" => node.deploy_dir.clone(),
            "service" => node.service.clone(),
            "is_first" => self.is_first.to_string(),
            "is_last" => self.is_last.to_string(),
            _ => return None,
        })
    }
}

/// Renders the node placeholders in a param's value for `step` (other text is left as written).
pub fn render_node_placeholders(value: &str, step: &ScheduledStep) -> String {
    render(value, &|name| match Placeholder::parse(name) {
        Placeholder::Node(node) => step.node_value(node),
        _ => None,
    })
}

/// Every step instance of an upgrade, in run order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    /// In run order.
    pub steps: Vec<ScheduledStep>,
}

/// Why the runbook cannot be laid over this plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A cluster step runs on a role's first node, and the plan has none of that role.
    #[error(
        "step `{step}` runs `on: {role}`, but the plan holds no node of role `{role}`; select one of its nodes \
         (-N/-R) or change `on:`"
    )]
    NoNodeOfRole {
        /// Step id.
        step: String,
        /// The role.
        role: String,
    },
    /// The plan holds no node the node steps run on.
    #[error(
        "the plan holds no node of the runbook's roles ({0}); select some of their nodes (-N/-R)"
    )]
    NoNodes(String),
}

/// Lays `runbook` over `nodes` (plan order).
pub fn schedule(runbook: &Runbook, nodes: &[NodeRef]) -> Result<Schedule, ScheduleError> {
    let position_in_role = |node: &NodeRef| {
        let same_role: Vec<&NodeRef> = nodes.iter().filter(|n| n.role == node.role).collect();
        let first = same_role.first().is_some_and(|n| n.id == node.id);
        let last = same_role.last().is_some_and(|n| n.id == node.id);
        (first, last)
    };
    let cluster = |scope: Scope, out: &mut Vec<ScheduledStep>| -> Result<(), ScheduleError> {
        for (step_index, step) in runbook.steps.iter().enumerate() {
            if step.scope != scope {
                continue;
            }
            let node = match &step.on {
                RunsOn::Controller => None,
                RunsOn::FirstNodeOf(role) => Some(
                    nodes
                        .iter()
                        .find(|node| &node.role == role)
                        .cloned()
                        .ok_or_else(|| ScheduleError::NoNodeOfRole {
                            step: step.id.clone(),
                            role: role.clone(),
                        })?,
                ),
            };
            let (is_first, is_last) = node.as_ref().map(position_in_role).unwrap_or_default();
            out.push(ScheduledStep {
                key: StepKey {
                    step: step.id.clone(),
                    node: node.as_ref().map(|node| node.id.clone()),
                },
                step_index,
                scope,
                node,
                is_first,
                is_last,
            });
        }
        Ok(())
    };
    let mut steps = Vec::new();
    cluster(Scope::ClusterBefore, &mut steps)?;
    let has_node_steps = runbook.steps.iter().any(|step| step.scope == Scope::Node);
    if has_node_steps && !nodes.iter().any(|node| runbook.roles.contains(&node.role)) {
        return Err(ScheduleError::NoNodes(runbook.roles.join(", ")));
    }
    for node in nodes {
        let (is_first, is_last) = position_in_role(node);
        for (step_index, step) in runbook.steps.iter().enumerate() {
            if step.scope != Scope::Node || !step.roles.contains(&node.role) {
                continue;
            }
            if step.once && !is_first {
                continue;
            }
            steps.push(ScheduledStep {
                key: StepKey {
                    step: step.id.clone(),
                    node: Some(node.id.clone()),
                },
                step_index,
                scope: Scope::Node,
                node: Some(node.clone()),
                is_first,
                is_last,
            });
        }
    }
    cluster(Scope::ClusterAfter, &mut steps)?;
    Ok(Schedule { steps })
}

/// One line of the dry run, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DryRunStep {
    /// 1-based position.
    pub position: usize,
    /// `cluster_before`, `node` or `cluster_after`.
    pub scope: Scope,
    /// Step id.
    pub step: String,
    /// Node ID, or none for the controller.
    pub node: Option<String>,
    /// Batch of the node.
    pub batch: Option<usize>,
    /// The step kind.
    pub kind: String,
    /// What it does, placeholders of the node and params filled in.
    pub does: String,
    /// How it is undone.
    pub undo: String,
    /// Re-run after a crash mid-step, or resolved first.
    pub idempotent: bool,
    /// `once` step.
    pub once: bool,
    /// The point of no return.
    pub point_of_no_return: bool,
}

/// The dry run of `schedule`: every step with what it does and how it is undone.
pub fn dry_run(runbook: &Runbook, schedule: &Schedule) -> Vec<DryRunStep> {
    schedule
        .steps
        .iter()
        .enumerate()
        .map(|(position, instance)| {
            let step = &runbook.steps[instance.step_index];
            let fill = |text: &str| {
                render(text, &|name| match Placeholder::parse(name) {
                    Placeholder::Node(node) => instance.node_value(node),
                    Placeholder::Param(param) => runbook
                        .params
                        .get(param)
                        .map(|value| render_node_placeholders(value, instance)),
                    Placeholder::Saved(_) | Placeholder::Mark(_) => None,
                })
            };
            let undo = match &step.undo {
                Undo::NothingToUndo => "nothing to undo".to_string(),
                Undo::BuiltIn => match &step.action {
                    Action::Container(ContainerAction {
                        name,
                        op: ContainerOp::Stop,
                    }) => format!("start container {}", fill(name)),
                    Action::Container(ContainerAction {
                        name,
                        op: ContainerOp::Start,
                    }) => format!("stop container {}", fill(name)),
                    Action::Container(_) => "put the old container back".to_string(),
                    _ => "restore the original file".to_string(),
                },
                Undo::Actions(actions) => actions
                    .iter()
                    .map(|action| describe(action, &fill))
                    .collect::<Vec<_>>()
                    .join("; then "),
                Undo::None => "none".to_string(),
            };
            DryRunStep {
                position: position + 1,
                scope: instance.scope,
                step: step.id.clone(),
                node: instance.node.as_ref().map(|node| node.id.clone()),
                batch: instance.node.as_ref().map(|node| node.batch),
                kind: step.action.kind().to_string(),
                does: describe(&step.action, &fill),
                undo,
                idempotent: step.idempotent,
                once: step.once,
                point_of_no_return: runbook.point_of_no_return.as_deref() == Some(step.id.as_str()),
            }
        })
        .collect()
}

/// The text form of [`dry_run`]: one block per scope and node, one line per step.
pub fn render_dry_run(runbook: &Runbook, steps: &[DryRunStep]) -> String {
    let mut out = format!(
        "Upgrade runbook `{}`: {} steps\n",
        runbook.name,
        steps.len()
    );
    let mut current: Option<(Scope, Option<String>)> = None;
    for step in steps {
        let block = (step.scope, step.node.clone());
        let new_block = match &current {
            Some((scope, node)) => {
                *scope != step.scope || (step.scope == Scope::Node && *node != step.node)
            }
            None => true,
        };
        if new_block {
            let heading = match (step.scope, &step.node) {
                (Scope::ClusterBefore, _) => "cluster, before the nodes".to_string(),
                (Scope::ClusterAfter, _) => "cluster, after the nodes".to_string(),
                (Scope::Node, Some(node)) => {
                    format!("node {node} (batch {})", step.batch.map_or(0, |b| b + 1))
                }
                (Scope::Node, None) => "node".to_string(),
            };
            out.push_str(&format!("\n{heading}:\n"));
            current = Some(block);
        }
        let place = match (&step.node, step.scope) {
            (Some(node), Scope::ClusterBefore | Scope::ClusterAfter) => format!(" (on {node})"),
            _ => String::new(),
        };
        let mut flags = Vec::new();
        if step.once {
            flags.push("once");
        }
        if !step.idempotent {
            flags.push("not idempotent");
        }
        if step.point_of_no_return {
            flags.push("POINT OF NO RETURN");
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" [{}]", flags.join(", "))
        };
        out.push_str(&format!(
            "  {:>2}. {}{place}: {}{flags}\n      undo: {}\n",
            step.position, step.step, step.does, step.undo
        ));
    }
    out
}

fn describe(action: &Action, fill: &dyn Fn(&str) -> String) -> String {
    let argv = |argv: &[String]| {
        argv.iter()
            .map(|arg| fill(arg))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match action {
        Action::Check(check) => {
            let probe = match &check.probe {
                Probe::Command(command) => format!("run `{}`", argv(command)),
                Probe::Http { method, url, .. } => {
                    format!("{} {}", method.name(), fill(url))
                }
                Probe::Sql { database, query } => format!("query {database}: {}", fill(query)),
            };
            let expect = match &check.expect {
                Expect::Exit(code) => format!("exit code {code}"),
                Expect::FieldEquals { field, value } => format!("field {field} = {value}"),
                Expect::FieldNotEquals { field, value } => format!("field {field} != {value}"),
                Expect::NoRows => "no rows".to_string(),
            };
            format!("check {probe} → {expect}")
        }
        Action::Http(call) => {
            let mut text = format!("{} {}", call.method.name(), fill(&call.url));
            if let Some(save) = &call.save {
                text.push_str(&format!(", save {} = {}", save.name, save.field));
            }
            if let Some(name) = &call.restore {
                text.push_str(&format!(", body = saved {name}"));
            }
            if let Some(body) = &call.body {
                text.push_str(&format!(", body {}", fill(body)));
            }
            text
        }
        Action::Backup(backup) => match &backup.source {
            BackupSource::Paths(paths) => format!(
                "back up {} (each ≥ {} bytes)",
                argv(paths).replace(' ', ", "),
                backup.min_bytes
            ),
            BackupSource::CommandOutput { command, output } => format!(
                "save the output of `{}` to {} (≥ {} bytes)",
                argv(command),
                fill(output),
                backup.min_bytes
            ),
        },
        Action::YamlEdit(edit) => {
            let edits: Vec<String> = edit
                .edits
                .iter()
                .map(|edit| {
                    let op = match &edit.op {
                        crate::yaml_edit::EditOp::Copy { from, to, .. } => {
                            format!("copy {from} → {to}")
                        }
                        crate::yaml_edit::EditOp::Rename { from, to, .. } => {
                            format!("rename {from} → {to}")
                        }
                        crate::yaml_edit::EditOp::Delete(key) => format!("delete {key}"),
                    };
                    match &edit.when {
                        Some(crate::yaml_edit::When::Present(key)) => {
                            format!("{op} (when {key} present)")
                        }
                        Some(crate::yaml_edit::When::Absent(key)) => {
                            format!("{op} (when {key} absent)")
                        }
                        None => op,
                    }
                })
                .collect();
            format!("edit {}: {}", fill(&edit.file), edits.join("; "))
        }
        Action::Sql(sql) => format!(
            "SQL on {}: {}",
            sql.database,
            sql.statements
                .iter()
                .map(|statement| fill(statement))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Action::Container(container) => {
            let name = fill(&container.name);
            match &container.op {
                ContainerOp::Swap { env_add } => {
                    let env: Vec<String> = env_add
                        .iter()
                        .map(|(key, value)| format!("{key}={value}"))
                        .collect();
                    if env.is_empty() {
                        format!("swap container {name} to the package's image")
                    } else {
                        format!(
                            "swap container {name} to the package's image, adding {}",
                            env.join(" ")
                        )
                    }
                }
                ContainerOp::Stop => format!("stop container {name}"),
                ContainerOp::Start => format!("start container {name}"),
                ContainerOp::Exec(command) => {
                    format!("in container {name}: run `{}`", argv(command))
                }
            }
        }
        Action::Mark(name) => format!("mark {name} (the time now)"),
        Action::Assert(assertion) => format!("assert {}", assertion.text),
        Action::Restore(restore) => match &restore.command {
            Some(command) => format!(
                "restore the output saved by {} through `{}` (sha256 checked first)",
                restore.backup,
                argv(command)
            ),
            None => format!(
                "restore the files saved by {} (sha256 checked first)",
                restore.backup
            ),
        },
    }
}
