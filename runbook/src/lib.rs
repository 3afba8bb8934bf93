//! patchd upgrade runbooks: the YAML model of an upgrade procedure with every check ([`parse`]), `yaml_edit` as a
//! pure function ([`yaml_edit::apply_edits`]), the schedule of steps over the planner's node order
//! ([`schedule::schedule`]) and the journaled upgrade step machine ([`machine`]).
//!
//! The crate is pure: no I/O, no clock, no async. Hosts, databases, HTTP and time are reached through the
//! machine's traits; the controller provides them.
//!
//! # The file
//!
//! ```yaml
//! runbook: oms-4.3.1            # name
//! roles: [oms]                  # roles whose nodes run the node steps (the planner orders them)
//! params: { refetch_min: 30 }   # values for {refetch_min}
//! point_of_no_return: upgrade   # optional: after this step a failure halts instead of rolling back
//! steps:
//!   - id: ha-read               # unique; letters, digits, - and _
//!     scope: cluster            # `cluster` (once; before the node steps, or after them) or `node` (per node)
//!     http: { url: "{master}/ha", save: "ha = value" }
//! ```
//!
//! * **Scopes.** Cluster steps written before the first node step run once before any node; those written after
//!   the last one run once after every node; a cluster step between node steps is refused. A cluster step runs on
//!   the controller unless `on: <role>` names a role, then on that role's first node in plan order (`sql` and `http`
//!   are always sent by the controller; `on:` places the commands, files and containers of the step and its undo,
//!   and a `restore` must run where its backup was taken). Node steps run
//!   on every node of their `roles` (default: the runbook's), node after node in plan order, all of a node's steps
//!   before the next node's; `once: true` runs one on exactly one node of each role: its first in plan order.
//! * **Kinds** (one per step): `check` (a `command`, `http` GET or `sql` query, and `expect`: `exit`, `field` with
//!   `equals`/`not_equals`, or `no_rows: true`); `http` (`method`, `url`, `body`, `save: NAME = field`,
//!   `restore: NAME` sending the saved value as the body, `expect_status`); `backup` (`paths`, or a `command` and
//!   its `output` file; `min_bytes`, default 1); `yaml_edit` (`file` and `edits`: `copy`/`rename`/`delete` with
//!   `when`, see [`yaml_edit`]); `sql` (`database` of the topology, `statements`); `container` (`name` and one of
//!   `swap: {env_add}`, `stop: true`, `start: true`, `exec: [..]`); `mark: NAME`; `assert: EXPR` (see
//!   [`assert`]); `restore` (`backup: <backup step id>`, and the `command` that reads a saved output back).
//! * **Placeholders**: see [`placeholder`]; each is checked where it is used.
//! * **Undo.** A step that changes nothing (`check`, `mark`, `assert`, `backup`, an HTTP GET) has no undo.
//!   `yaml_edit` and `container` swap/stop/start undo themselves (original bytes, old container). Every other
//!   step that changes something needs `undo: <step body>` (an `http`, `sql`, `container` or `restore`; or a list of
//!   them, run in order), or
//!   `undo: none`, allowed only at or after the step named by `point_of_no_return`: before it a failure rolls
//!   every change back, so every change must be undoable.
//! * **Idempotency** (what happens after a crash mid-step, see [`machine`]): `check`, `mark`, `assert`,
//!   `yaml_edit`, `restore`, container swap/stop/start and HTTP GET/PUT/DELETE are idempotent; `backup`, `sql`,
//!   `exec`, HTTP POST/PATCH and every `once` step are not. `idempotent: true|false` overrides the kind's default
//!   (never for `once`); a non-idempotent step may declare `resolve: <check>`, which tells whether it took effect.
//!
//! Every problem is reported with its line and key ([`Problem`]), all at once.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod assert;
mod lines;
pub mod machine;
mod model;
pub mod placeholder;
mod raw;
pub mod schedule;
mod validate;
pub mod yaml_edit;

pub use model::*;

use std::fmt;

/// What the cluster offers a runbook: its roles and the databases its topology defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterFacts {
    /// Role names of the topology.
    pub roles: Vec<String>,
    /// Database names of the topology's `databases:`.
    pub databases: Vec<String>,
}

/// One problem in a runbook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Key path (`steps[3].check.expect`).
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Why a runbook was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunbookError {
    /// Not YAML, or a key or type serde refuses.
    #[error("the runbook is not valid: {message}")]
    Syntax {
        /// serde's message, with its line and column.
        message: String,
    },
    /// Every check that failed.
    #[error("the runbook has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The problems, by line.
        problems: Vec<Problem>,
    },
}

/// Parses and checks a runbook on its own (no topology).
pub fn parse(text: &str) -> Result<Runbook, RunbookError> {
    parse_inner(text, None)
}

/// Parses and checks a runbook against a cluster: its roles and databases must exist there.
pub fn parse_for_cluster(text: &str, facts: &ClusterFacts) -> Result<Runbook, RunbookError> {
    parse_inner(text, Some(facts))
}

fn parse_inner(text: &str, facts: Option<&ClusterFacts>) -> Result<Runbook, RunbookError> {
    let raw: raw::RawRunbook =
        serde_norway::from_str(text).map_err(|error| RunbookError::Syntax {
            message: error.to_string(),
        })?;
    let index = lines::LineIndex::new(text);
    validate::build(raw, &index, facts).map_err(|problems| RunbookError::Invalid { problems })
}

#[cfg(test)]
mod tests;
