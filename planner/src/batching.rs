//! [`plan`]: the order, batches, canary and unavailability budget of a rollout (the rules are in the crate docs).

use super::*;
use crate::select::{check_input, select};

/// Turns the input into an ordered plan, or says why it cannot.
pub fn plan(input: &PlanInput) -> Result<Plan, RolloutPlanError> {
    check_input(input)?;
    let selected = select(input)?;
    let policy = &input.policy;

    let mut batches: Vec<Batch> = Vec::new();
    let mut roles = Vec::new();
    let mut canary_left = policy.canary;
    for role in &input.role_order {
        let role_nodes: Vec<&PlanNode> = input
            .nodes
            .iter()
            .filter(|node| &node.role == role)
            .collect();
        let mut chosen: Vec<&PlanNode> = role_nodes
            .iter()
            .copied()
            .filter(|node| selected.contains(node.id.as_str()))
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let total = role_nodes.len();
        let batch_size = policy.batch_size.resolve(total);
        let max_unavailable = policy.max_unavailable.resolve(total);
        let down_outside_nodes: Vec<String> = role_nodes
            .iter()
            .filter(|node| node.is_down && !selected.contains(node.id.as_str()))
            .map(|node| node.id.clone())
            .collect();
        let headroom = max_unavailable.saturating_sub(down_outside_nodes.len());
        if headroom == 0 && chosen.iter().any(|node| !node.is_down) {
            return Err(RolloutPlanError::NoHeadroom {
                role: role.clone(),
                down_outside: down_outside_nodes.len(),
                down_nodes: down_outside_nodes,
                max_unavailable,
            });
        }
        // Down first (free), then followers, then leaders; stable, so topology order is kept within each group.
        chosen.sort_by_key(|node| (!node.is_down, node.is_leader && !node.is_down));
        let mut remaining: &[&PlanNode] = &chosen;

        if let Some(canary) = canary_left.take() {
            let wanted = canary as usize;
            if wanted > remaining.len() {
                return Err(RolloutPlanError::Canary {
                    canary,
                    reason: format!(
                        "the first role, {role}, has only {} selected node(s); use a smaller canary",
                        remaining.len()
                    ),
                });
            }
            let (canary_nodes, rest) = remaining.split_at(wanted);
            let up = canary_nodes.iter().filter(|node| !node.is_down).count();
            if up > headroom {
                return Err(RolloutPlanError::Canary {
                    canary,
                    reason: format!(
                        "it would take {up} node(s) of role {role} down at once but only {headroom} may be \
                         unavailable (--max-unavailable {max_unavailable}, {} already down outside the \
                         selection); use a smaller canary or raise --max-unavailable",
                        down_outside_nodes.len()
                    ),
                });
            }
            push_batch(&mut batches, role, canary_nodes, true);
            remaining = rest;
        }

        while !remaining.is_empty() {
            let leaders_only = is_leader_group(remaining[0]);
            let mut taken = 0;
            let mut up = 0;
            for node in remaining {
                if taken == batch_size || is_leader_group(node) != leaders_only {
                    break;
                }
                if !node.is_down {
                    if up == headroom {
                        break;
                    }
                    up += 1;
                }
                taken += 1;
            }
            let (batch_nodes, rest) = remaining.split_at(taken);
            push_batch(&mut batches, role, batch_nodes, false);
            remaining = rest;
        }

        roles.push(RoleSummary {
            role: role.clone(),
            total,
            selected: chosen.len(),
            batch_size,
            max_unavailable,
            down_outside: down_outside_nodes.len(),
            headroom,
        });
    }

    let total_nodes = batches.iter().map(|batch| batch.nodes.len()).sum();
    let down_nodes = batches
        .iter()
        .flat_map(|batch| &batch.nodes)
        .filter(|node| node.was_down)
        .count();
    Ok(Plan {
        batches,
        policy: policy.clone(),
        summary: PlanSummary {
            total_nodes,
            down_nodes,
            roles,
        },
    })
}

/// Leaders that are up form their own batches at the end of a role; a down leader is batched with the down nodes.
fn is_leader_group(node: &PlanNode) -> bool {
    node.is_leader && !node.is_down
}

fn push_batch(batches: &mut Vec<Batch>, role: &str, nodes: &[&PlanNode], canary: bool) {
    batches.push(Batch {
        index: batches.len(),
        role: role.to_string(),
        canary,
        pause_after: canary,
        nodes: nodes
            .iter()
            .map(|node| PlannedNode {
                id: node.id.clone(),
                name: node.name.clone(),
                host: node.host.clone(),
                is_leader: node.is_leader,
                was_down: node.is_down,
            })
            .collect(),
    });
}
