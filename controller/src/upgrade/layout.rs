//! A runbook checked against a cluster and laid over the planner's node order: what `--dry-run` prints and what
//! a run journals as its schedule.

use crate::rollout::plan_input;
use crate::topology::Topology;
use patchd_planner::{Plan, Policy, RolloutPlanError};
use patchd_runbook::schedule::{NodeRef, Schedule, ScheduleError, schedule};
use patchd_runbook::{ClusterFacts, Runbook, RunbookError, parse_for_cluster};
use std::collections::HashMap;

/// Why a runbook cannot run on the cluster.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The runbook is refused (every problem with line and key).
    #[error(transparent)]
    Runbook(#[from] RunbookError),
    /// The selection cannot be planned.
    #[error(transparent)]
    Plan(#[from] RolloutPlanError),
    /// The runbook cannot be laid over the plan.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
}

/// A runbook over a plan.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The runbook.
    pub runbook: Runbook,
    /// The planner's plan of the selected nodes.
    pub plan: Plan,
    /// The nodes in plan order.
    pub nodes: Vec<NodeRef>,
    /// Every step instance in run order.
    pub schedule: Schedule,
}

/// Checks `text` against `topology` and lays it over the plan of the selected nodes (`-N`, `-R`). Leaders and
/// down nodes are not observed: the order is the topology's.
pub fn lay_out(
    text: &str,
    topology: &Topology,
    nodes: &[String],
    roles: &[String],
    policy: Policy,
) -> Result<Layout, LayoutError> {
    let runbook = parse(text, topology)?;
    let input = plan_input(
        topology,
        &HashMap::new(),
        nodes,
        roles,
        runbook.roles.clone(),
        policy,
    );
    let plan = patchd_planner::plan(&input)?;
    let nodes: Vec<NodeRef> = plan
        .batches()
        .iter()
        .flat_map(|batch| {
            batch.nodes.iter().map(|node| {
                let declared = topology.node_by_id(&node.id);
                NodeRef {
                    id: node.id.clone(),
                    name: node.name.clone(),
                    host: node.host.clone(),
                    role: batch.role.clone(),
                    deploy_dir: declared.map(|n| n.deploy_dir.clone()).unwrap_or_default(),
                    service: declared.map(|n| n.service.clone()).unwrap_or_default(),
                    batch: batch.index,
                }
            })
        })
        .collect();
    let schedule = schedule(&runbook, &nodes)?;
    Ok(Layout {
        runbook,
        plan,
        nodes,
        schedule,
    })
}

/// Checks `text` against `topology` (its roles and databases).
pub fn parse(text: &str, topology: &Topology) -> Result<Runbook, RunbookError> {
    let facts = ClusterFacts {
        roles: topology.role_order(),
        databases: topology
            .databases
            .iter()
            .map(|db| db.name.clone())
            .collect(),
    };
    parse_for_cluster(text, &facts)
}
