//! What a new rollout is planned from: every node's observed status and the operator's selection and policy.

use crate::executor::{BatchSpec, NodeRef};
use crate::hooks::ClusterHooks;
use crate::node_status::{self, LiveAgentProbe, NodeStatus};
use crate::tls_files::ControllerTls;
use crate::topology::{Node, Topology};
use patchd_planner::{Plan, PlanInput, Policy, Selection};
use std::collections::HashMap;
use std::time::Duration;

/// Every node's status (leaders, down nodes) for the planner, probed in parallel.
pub async fn observe(
    hooks: &ClusterHooks,
    topology: &Topology,
    tls: &ControllerTls,
    timeout: Duration,
) -> HashMap<String, NodeStatus> {
    let nodes: Vec<&Node> = topology.nodes().collect();
    let probe = LiveAgentProbe::new(tls.clone());
    node_status::collect(hooks, &nodes, &probe, &|_| false, timeout)
        .await
        .into_iter()
        .map(|row| (row.id.clone(), row))
        .collect()
}

/// The planner's input: the observed cluster, the `-N`/`-R` selection, the roles the rollout may touch.
pub fn plan_input(
    topology: &Topology,
    observed: &HashMap<String, NodeStatus>,
    nodes: &[String],
    roles: &[String],
    component_roles: Vec<String>,
    policy: Policy,
) -> PlanInput {
    PlanInput {
        nodes: topology.plan_nodes(
            |node| observed.get(&node.id).is_some_and(|row| row.leader),
            |node| observed.get(&node.id).is_some_and(NodeStatus::is_down),
        ),
        role_order: topology.role_order(),
        selection: Selection {
            nodes: nodes.to_vec(),
            roles: roles.to_vec(),
            component_roles,
        },
        policy,
    }
}

/// The engine's batches for a plan; every planned node must be in the topology.
pub fn batches_from_plan(plan: &Plan, topology: &Topology) -> Vec<BatchSpec> {
    plan.batches()
        .iter()
        .map(|batch| BatchSpec {
            index: batch.index,
            role: batch.role.clone(),
            canary: batch.canary,
            pause_after: batch.pause_after,
            nodes: batch
                .nodes
                .iter()
                .map(|planned| NodeRef {
                    id: planned.id.clone(),
                    name: planned.name.clone(),
                    role: topology
                        .node_by_id(&planned.id)
                        .map_or_else(|| batch.role.clone(), |node| node.role.clone()),
                })
                .collect(),
        })
        .collect()
}
