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

mod amount;
mod batching;
mod render;
mod select;

pub use amount::{Amount, AmountError};
pub use batching::plan;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

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
