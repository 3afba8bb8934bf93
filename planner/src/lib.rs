//! patchd rollout planner: topology view + selection + observed status + policy → an immutable, printable [`Plan`].
//!
//! The crate is pure: no I/O, no clock, no async (its only dependencies are `serde` and `thiserror`), so every
//! decision about *which* nodes are patched *in which order* is a function of its input and is tested with tables
//! and golden text files (`planner/tests/`).
//!
//! # Selection (tiup's `-N` / `-R` semantics)
//!
//! * `-N` names nodes by ID or by name; `-R` names roles. Both lists are comma-separated on the command line (the
//!   CLI splits them; the planner receives lists).
//! * Both given: the selection is their **intersection** (nodes named by `-N` whose role is in `-R`).
//! * Only one given: that one.
//! * Neither: every node of the roles whose component matches the package ([`Selection::component_roles`]).
//! * A selected node whose role is not in `component_roles` is refused (the package does not match it). A rollback
//!   has no package: its caller passes every role as `component_roles`.
//! * An unknown node or role, or a selection that ends up empty, is an error that lists what exists.
//!
//! # Order and batches
//!
//! * One role at a time, in `role_order` (the topology's order). Roles with no selected node are skipped.
//! * Within a role: selected nodes that are already down come first (patching them costs no availability), then
//!   the others in input order, then the leaders. Leaders never share a batch with non-leaders, so a leader is
//!   restarted only after every other node of its role is back.
//! * Amounts (`--batch-size`, `--max-unavailable`) are counts (`3`) or percents (`25%`) evaluated **per role**
//!   against the role's total node count (selected or not); a percent rounds down with a minimum of 1.
//!
//! # Unavailability budget and down nodes
//!
//! For a role with `total` nodes, `B = batch_size(total)` and `U = max_unavailable(total)`:
//!
//! * `down_outside` = nodes of the role that are down and **not** selected. They are unavailable already and the
//!   rollout cannot change that, so they use up part of the budget: `headroom = U − down_outside`.
//! * A selected node that is already down is **not** counted as a node the rollout takes down: patching it does
//!   not reduce availability. It still occupies a slot of the batch (`B` is a parallelism bound).
//! * So a batch holds at most `B` nodes, of which at most `headroom` are up.
//! * If `headroom` is 0 while selected up nodes remain, planning fails ([`RolloutPlanError::NoHeadroom`]): patching any
//!   of them would exceed `--max-unavailable`.
//!
//! # Canary
//!
//! `--canary N`: the very first batch of the plan holds the first `N` nodes of the first role (in the order
//! above), ignores `B`, still respects `headroom`, and is marked `canary` and `pause_after` (the executor waits
//! for a confirmation or `--canary-wait` before going on). `N` larger than the first role's selected nodes is an
//! error.
//!
//! # Failure budget
//!
//! The planner only carries `failure_budget` in the [`Policy`]; the executor accounts it with the nodes in flight.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

/// Everything the planner decides from. Built by the controller from the topology, the command line and the
/// status it observed (leaders, down nodes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanInput {
    /// Every node of the cluster (not only the selected ones: percents and down nodes are per role).
    pub nodes: Vec<PlanNode>,
    /// Rollout order of roles (the topology's file order). Every node's role must appear here.
    pub role_order: Vec<String>,
    /// What the operator asked for.
    pub selection: Selection,
    /// Batch sizing, canary and failure budget.
    pub policy: Policy,
}

/// One node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanNode {
    /// Unique node ID (`host:port` unless the topology gives one).
    pub id: String,
    /// Role name.
    pub role: String,
    /// Host (for display).
    pub host: String,
    /// Node name (defaults to the ID); `-N` accepts it as well as the ID.
    pub name: String,
    /// The role's leader hook named this node.
    pub is_leader: bool,
    /// Observed down (service not serving, or agent not answering) before the rollout.
    pub is_down: bool,
}

/// The operator's selection: tiup's `-N` and `-R`, already split on commas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// `-N`: node IDs or names.
    pub nodes: Vec<String>,
    /// `-R`: role names.
    pub roles: Vec<String>,
    /// Roles whose component matches the package. The default selection when neither `-N` nor `-R` is given, and
    /// the only roles any selected node may belong to. For a rollback (no package) pass every role.
    pub component_roles: Vec<String>,
}

/// How fast and how carefully to roll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Nodes per batch (per role).
    pub batch_size: Amount,
    /// Nodes of a role that may be unavailable at once, counting the ones already down outside the selection.
    pub max_unavailable: Amount,
    /// First batch of N nodes, then a pause.
    pub canary: Option<u32>,
    /// Nodes allowed to end reverted or failed before the rollout halts.
    pub failure_budget: u32,
}

impl Default for Policy {
    /// tiup's behaviour: one node at a time, no canary, halt at the first failure.
    fn default() -> Self {
        Self {
            batch_size: Amount::Count(1),
            max_unavailable: Amount::Count(1),
            canary: None,
            failure_budget: 0,
        }
    }
}

/// A count (`3`) or a percent of the role's nodes (`25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Amount {
    /// That many nodes.
    Count(u32),
    /// That percent of the role's nodes, rounded down, at least 1.
    Percent(u32),
}

/// A malformed `--batch-size` / `--max-unavailable` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount `{input}`: {reason}; write a count such as `3` or a percent such as `25%`")]
pub struct AmountError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Amount {
    /// The amount for a role of `total` nodes: a percent rounds down, with a minimum of 1.
    pub fn resolve(self, total: usize) -> usize {
        match self {
            Amount::Count(count) => count as usize,
            Amount::Percent(percent) => (total * percent as usize / 100).max(1),
        }
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| AmountError {
            input: text.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = text.trim();
        let (digits, is_percent) = match trimmed.strip_suffix('%') {
            Some(rest) => (rest.trim_end(), true),
            None => (trimmed, false),
        };
        if digits.is_empty() {
            return Err(fail("it is empty"));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail("it is not a whole number"));
        }
        let value: u32 = digits
            .parse()
            .map_err(|_| fail("the number is too large"))?;
        if value == 0 {
            return Err(fail("it must be at least 1"));
        }
        if is_percent {
            if value > 100 {
                return Err(fail("a percent must be between 1% and 100%"));
            }
            Ok(Amount::Percent(value))
        } else {
            Ok(Amount::Count(value))
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(count) => write!(f, "{count}"),
            Amount::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

impl From<Amount> for String {
    fn from(amount: Amount) -> Self {
        amount.to_string()
    }
}

impl TryFrom<String> for Amount {
    type Error = AmountError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// The immutable result of planning: ordered batches. Obtained only from [`plan`] (or deserialized from a journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    batches: Vec<Batch>,
    policy: Policy,
    summary: PlanSummary,
}

/// Nodes restarted together. Batches run strictly one after the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// 0-based position in the plan.
    pub index: usize,
    /// Every node of a batch has this role.
    pub role: String,
    /// The `--canary` batch.
    pub canary: bool,
    /// Wait for a confirmation (or `--canary-wait`) after this batch.
    pub pause_after: bool,
    /// Nodes of the batch, in order.
    pub nodes: Vec<PlannedNode>,
}

/// A node in a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNode {
    /// Node ID.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Leader of its role when planned.
    pub is_leader: bool,
    /// Already down when planned.
    pub was_down: bool,
}

/// Totals and the per-role numbers the batches were cut with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Selected nodes (= nodes in the plan).
    pub total_nodes: usize,
    /// Selected nodes that were already down.
    pub down_nodes: usize,
    /// One entry per role in the plan, in rollout order.
    pub roles: Vec<RoleSummary>,
}

/// How one role was batched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSummary {
    /// Role name.
    pub role: String,
    /// Nodes of the role in the cluster.
    pub total: usize,
    /// Nodes of the role in the plan.
    pub selected: usize,
    /// `--batch-size` evaluated for this role.
    pub batch_size: usize,
    /// `--max-unavailable` evaluated for this role.
    pub max_unavailable: usize,
    /// Nodes of the role down and not selected (they use up unavailability budget).
    pub down_outside: usize,
    /// Up nodes one batch may take down: `max_unavailable − down_outside`.
    pub headroom: usize,
}

impl Plan {
    /// Batches in execution order.
    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    /// The policy the plan was made with (the executor needs the failure budget).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Totals and per-role numbers.
    pub fn summary(&self) -> &PlanSummary {
        &self.summary
    }

    /// Every planned node in execution order, with its batch.
    pub fn nodes(&self) -> impl Iterator<Item = (&Batch, &PlannedNode)> {
        self.batches
            .iter()
            .flat_map(|batch| batch.nodes.iter().map(move |node| (batch, node)))
    }
}

/// Why no plan could be made. Each message lists what exists and says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutPlanError {
    /// `-N` named nodes that are not in the cluster.
    #[error("unknown node(s) {}; the cluster has: {}", list(unknown), list(known))]
    UnknownNodes {
        /// Names given that match no node ID or name.
        unknown: Vec<String>,
        /// Node IDs of the cluster.
        known: Vec<String>,
    },
    /// `-R` named roles that are not in the cluster.
    #[error("unknown role(s) {}; the cluster has: {}", list(unknown), list(known))]
    UnknownRoles {
        /// Roles given that do not exist.
        unknown: Vec<String>,
        /// Roles of the cluster.
        known: Vec<String>,
    },
    /// Nothing left to patch.
    #[error("the selection is empty: {reason}")]
    EmptySelection {
        /// Why, naming what exists.
        reason: String,
    },
    /// A selected node's role does not run the package's component.
    #[error(
        "the package does not match node(s) {}; it matches role(s) {}: select nodes of those roles",
        list(nodes),
        list_or_none(component_roles)
    )]
    ComponentMismatch {
        /// Offending nodes as `id (role)`.
        nodes: Vec<String>,
        /// Roles the package matches.
        component_roles: Vec<String>,
    },
    /// The input itself is inconsistent (a bug in the caller, or a broken topology).
    #[error("invalid planner input: {0}")]
    InvalidInput(String),
    /// Nodes already down outside the selection use up all of `--max-unavailable`.
    #[error(
        "role {role}: {down_outside} node(s) already down outside the selection ({}) and --max-unavailable is \
         {max_unavailable}: patching any other node would exceed it; bring those nodes back, include them in \
         the selection, or raise --max-unavailable",
        list(down_nodes)
    )]
    NoHeadroom {
        /// The role.
        role: String,
        /// How many of its nodes are down outside the selection.
        down_outside: usize,
        /// Their IDs.
        down_nodes: Vec<String>,
        /// `--max-unavailable` evaluated for the role.
        max_unavailable: usize,
    },
    /// `--canary N` cannot be honoured.
    #[error("--canary {canary}: {reason}")]
    Canary {
        /// N.
        canary: u32,
        /// Why, and what to do.
        reason: String,
    },
}

fn list(items: &[String]) -> String {
    items.join(", ")
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

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

fn check_input(input: &PlanInput) -> Result<(), RolloutPlanError> {
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
fn select(input: &PlanInput) -> Result<HashSet<&str>, RolloutPlanError> {
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

impl fmt::Display for Plan {
    /// Stable text rendering (golden files, `patchctl patch --dry-run`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = &self.summary;
        let policy = &self.policy;
        writeln!(
            f,
            "Plan: {} node(s) in {} role(s), {} batch(es)",
            summary.total_nodes,
            summary.roles.len(),
            self.batches.len()
        )?;
        let canary = match policy.canary {
            Some(count) => count.to_string(),
            None => "none".to_string(),
        };
        writeln!(
            f,
            "Policy: batch size {}, max unavailable {}, canary {}, failure budget {}",
            policy.batch_size, policy.max_unavailable, canary, policy.failure_budget
        )?;
        let id_width = self
            .batches
            .iter()
            .flat_map(|b| &b.nodes)
            .map(|n| n.id.len())
            .max()
            .unwrap_or(0);
        let name_width = self
            .batches
            .iter()
            .flat_map(|b| &b.nodes)
            .map(|n| n.name.len())
            .max()
            .unwrap_or(0);
        let host_width = self
            .batches
            .iter()
            .flat_map(|b| &b.nodes)
            .map(|n| n.host.len())
            .max()
            .unwrap_or(0);
        for role in &summary.roles {
            writeln!(f)?;
            writeln!(
                f,
                "Role {}: {} of {} node(s); batch size {}, max unavailable {} ({} down outside the selection, {} \
                 may go down at once)",
                role.role,
                role.selected,
                role.total,
                role.batch_size,
                role.max_unavailable,
                role.down_outside,
                role.headroom
            )?;
            for batch in self.batches.iter().filter(|batch| batch.role == role.role) {
                let mut marks = Vec::new();
                if batch.canary {
                    marks.push("canary");
                }
                if batch.pause_after {
                    marks.push("pause after");
                }
                let marks = if marks.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", marks.join(", "))
                };
                writeln!(f, "  Batch {}{}", batch.index + 1, marks)?;
                for node in &batch.nodes {
                    let mut notes = Vec::new();
                    if node.is_leader {
                        notes.push("leader");
                    }
                    if node.was_down {
                        notes.push("down");
                    }
                    let notes = if notes.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", notes.join(", "))
                    };
                    let line = format!(
                        "    {:<id_width$}  {:<name_width$}  {:<host_width$}{}",
                        node.id, node.name, node.host, notes
                    );
                    writeln!(f, "{}", line.trim_end())?;
                }
            }
        }
        Ok(())
    }
}
