//! Which nodes a rollout touches: the input checks and tiup's `-N`/`-R` selection rules (see the crate docs).

use super::*;

pub(crate) fn check_input(input: &PlanInput) -> Result<(), RolloutPlanError> {
    let mut ids = HashSet::new();
    for node in &input.nodes {
        if !ids.insert(node.id.as_str()) {
            return Err(RolloutPlanError::InvalidInput(format!(
                "node ID {} appears twice",
                node.id
            )));
        }
        if !input.role_order.contains(&node.role) {
            return Err(RolloutPlanError::InvalidInput(format!(
                "node {} has role {}, which is not in the role order ({})",
                node.id,
                node.role,
                input.role_order.join(", ")
            )));
        }
    }
    if input.policy.canary == Some(0) {
        return Err(RolloutPlanError::Canary {
            canary: 0,
            reason: "a canary batch needs at least 1 node".to_string(),
        });
    }
    for (flag, amount) in [
        ("--batch-size", input.policy.batch_size),
        ("--max-unavailable", input.policy.max_unavailable),
    ] {
        let valid = match amount {
            Amount::Count(count) => count >= 1,
            Amount::Percent(percent) => (1..=100).contains(&percent),
        };
        if !valid {
            return Err(RolloutPlanError::InvalidInput(format!(
                "{flag} {amount} is out of range; give at least 1, or a percent from 1% to 100%"
            )));
        }
    }
    Ok(())
}

/// The IDs of the selected nodes (tiup's semantics, see the crate docs).
pub(crate) fn select(input: &PlanInput) -> Result<HashSet<&str>, RolloutPlanError> {
    let selection = &input.selection;
    // Names are trimmed and de-duplicated once, so the checks and the filters see the same lists (`-R "a, b"`).
    let roles = dedup(&selection.roles);
    let wanted_nodes = dedup(&selection.nodes);
    let component_roles = dedup(&selection.component_roles);
    let known_roles: Vec<String> = input.role_order.clone();
    let known_ids = || {
        input
            .nodes
            .iter()
            .map(|node| node.id.clone())
            .collect::<Vec<_>>()
    };

    let unknown_roles: Vec<String> = roles
        .iter()
        .filter(|role| !known_roles.iter().any(|known| known == *role))
        .cloned()
        .collect();
    if !unknown_roles.is_empty() {
        return Err(RolloutPlanError::UnknownRoles {
            unknown: unknown_roles,
            known: known_roles,
        });
    }
    let unknown_components: Vec<String> = component_roles
        .iter()
        .filter(|role| !known_roles.iter().any(|known| known == *role))
        .cloned()
        .collect();
    if !unknown_components.is_empty() {
        return Err(RolloutPlanError::InvalidInput(format!(
            "component role(s) {} are not roles of the cluster",
            unknown_components.join(", ")
        )));
    }

    let mut by_name: HashMap<&str, &PlanNode> = HashMap::new();
    for node in &input.nodes {
        by_name.insert(node.id.as_str(), node);
    }
    for node in &input.nodes {
        by_name.entry(node.name.as_str()).or_insert(node);
    }
    let mut named: Vec<&PlanNode> = Vec::new();
    let mut unknown_nodes = Vec::new();
    for wanted in &wanted_nodes {
        match by_name.get(wanted.as_str()) {
            Some(node) if !named.iter().any(|known| known.id == node.id) => named.push(node),
            Some(_) => {}
            None => unknown_nodes.push(wanted.clone()),
        }
    }
    if !unknown_nodes.is_empty() {
        return Err(RolloutPlanError::UnknownNodes {
            unknown: unknown_nodes,
            known: known_ids(),
        });
    }

    let chosen: Vec<&PlanNode> = match (wanted_nodes.is_empty(), roles.is_empty()) {
        (false, false) => named
            .into_iter()
            .filter(|node| roles.contains(&node.role))
            .collect(),
        (false, true) => named,
        (true, false) => input
            .nodes
            .iter()
            .filter(|node| roles.contains(&node.role))
            .collect(),
        (true, true) => input
            .nodes
            .iter()
            .filter(|node| component_roles.contains(&node.role))
            .collect(),
    };

    if chosen.is_empty() {
        let reason = match (wanted_nodes.is_empty(), roles.is_empty()) {
            (false, false) => format!(
                "no node given with -N ({}) has a role given with -R ({}); those nodes have roles {}",
                wanted_nodes.join(","),
                roles.join(","),
                describe_roles_of(&input.nodes, &wanted_nodes)
            ),
            (true, false) => format!("role(s) {} have no node", roles.join(", ")),
            (true, true) if component_roles.is_empty() => format!(
                "the package's component matches no role of the cluster (roles: {}); check the package, or \
                 select nodes with -N/-R",
                known_roles.join(", ")
            ),
            _ => format!(
                "the package's roles ({}) have no node",
                component_roles.join(", ")
            ),
        };
        return Err(RolloutPlanError::EmptySelection { reason });
    }

    let mismatched: Vec<String> = chosen
        .iter()
        .filter(|node| !component_roles.contains(&node.role))
        .map(|node| format!("{} ({})", node.id, node.role))
        .collect();
    if !mismatched.is_empty() {
        return Err(RolloutPlanError::ComponentMismatch {
            nodes: mismatched,
            component_roles,
        });
    }
    Ok(chosen.into_iter().map(|node| node.id.as_str()).collect())
}

fn describe_roles_of(nodes: &[PlanNode], wanted: &[String]) -> String {
    let roles: BTreeSet<&str> = nodes
        .iter()
        .filter(|node| {
            wanted
                .iter()
                .any(|name| *name == node.id || *name == node.name)
        })
        .map(|node| node.role.as_str())
        .collect();
    roles.into_iter().collect::<Vec<_>>().join(", ")
}

fn dedup(items: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let item = item.trim();
        if !item.is_empty() && !out.iter().any(|known| known == item) {
            out.push(item.to_string());
        }
    }
    out
}
