//! What the store holds, as Rust types: clusters, marks, role packages, rollouts and their rows, and the stored
//! enums with their state machines.

use patchd_package::digest::TreeDigest;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A point in time, stored as Unix milliseconds, shown and serialized as RFC 3339 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(self) -> i64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = i128::from(self.0) * 1_000_000;
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&format).ok())
        {
            Some(text) => f.write_str(&text),
            None => write!(f, "@{}ms", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A registered cluster: its topology file as imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredCluster {
    /// Cluster name (the import name).
    pub name: String,
    /// The topology YAML text, verbatim.
    pub yaml: String,
    /// Where it was imported from.
    pub source_path: String,
    /// First import.
    pub created_at: Timestamp,
    /// Last (re-)import.
    pub imported_at: Timestamp,
}

/// The `(patched)` marker of one node: the package it last received through a successful rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeMark {
    /// Node ID.
    pub node_id: String,
    /// The rollout that patched it.
    pub rollout_id: String,
    /// Tree digest of the package.
    pub digest: TreeDigest,
    /// Package version label.
    pub version: String,
    /// When.
    pub patched_at: Timestamp,
}

/// The package recorded for a role by `patch --overwrite` (what a scale-out deploys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolePackage {
    /// Role name.
    pub role: String,
    /// Tree digest.
    pub digest: TreeDigest,
    /// Package file path on the controller.
    pub path: String,
    /// Version label.
    pub version: String,
    /// When it was recorded.
    pub set_at: Timestamp,
}

/// Whether a rollout patches or rolls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    /// `patchctl patch`.
    Patch,
    /// `patchctl rollback`.
    Rollback,
}

impl RolloutKind {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::Patch => "patch",
            RolloutKind::Rollback => "rollback",
        }
    }
}

impl fmt::Display for RolloutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutKind {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "patch" => Ok(RolloutKind::Patch),
            "rollback" => Ok(RolloutKind::Rollback),
            other => Err(UnknownValue(other.to_string())),
        }
    }
}

/// A string that names no variant of a stored enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value `{0}`")]
pub struct UnknownValue(pub String);

/// State of a whole rollout.
///
/// Unfinished (a `--resume` picks it up): `Planned`, `Running`, `Paused`, `Interrupted`.
/// Finished: `Succeeded`, `Halted`, `Failed`, `Cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Journaled, nothing done yet.
    Planned,
    /// Staging or rolling through batches (also what a SIGKILLed process leaves behind).
    Running,
    /// Waiting after the canary batch.
    Paused,
    /// Stopped by Ctrl-C after finishing the steps in flight; resumable.
    Interrupted,
    /// Every planned node done.
    Succeeded,
    /// Stopped because the failure budget was spent; every node is on a working version.
    Halted,
    /// Ended by an error that is not a node failure (reported in the journal).
    Failed,
    /// Abandoned by the operator (e.g. declined after the canary); not resumable.
    Cancelled,
}

impl RolloutState {
    /// Every state, in lifecycle order.
    pub const ALL: [RolloutState; 8] = [
        RolloutState::Planned,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Interrupted,
        RolloutState::Succeeded,
        RolloutState::Halted,
        RolloutState::Failed,
        RolloutState::Cancelled,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Planned => "planned",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Interrupted => "interrupted",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Halted => "halted",
            RolloutState::Failed => "failed",
            RolloutState::Cancelled => "cancelled",
        }
    }

    /// Whether `--resume` may continue a rollout in this state.
    pub fn is_unfinished(self) -> bool {
        matches!(
            self,
            RolloutState::Planned
                | RolloutState::Running
                | RolloutState::Paused
                | RolloutState::Interrupted
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutState {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        RolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownValue(text.into()))
    }
}

/// The one state machine of a node inside a rollout (patch or rollback). The executor moves a node forward
/// through it and journals every move with [`Store::set_node_state`] *before* doing the step's effect where that
/// matters for a crash, so a resumed controller knows what may be half-done:
///
/// ```text
/// Pending → Staged → Draining → Drained → Applying → Applied → Done
///                        │           │          ├──────→ Reverted   (agent reverted: failed probation)
///                        └───────────┴──────────┴──────→ Failed     (drain timeout, unreachable, error)
/// Pending/Staged ─────────────────────────────────────→ Skipped    (halted before its turn, or nothing to do)
/// ```
///
/// * `Draining`/`Drained`: the node may be offline in the cluster; a resume must finish or undo that.
/// * `Applying`: the outcome is known only to the agent; a resume asks it.
/// * `Applied`: new version running and healthy; `online`/`wait_online` may still be owed.
/// * Terminal: `Done`, `Reverted`, `Failed`, `Skipped` (a resume never touches such a node again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRolloutState {
    /// In the plan, nothing done.
    Pending,
    /// The package is staged on the node's agent; nothing live changed.
    Staged,
    /// The `offline` hook was (or is being) called; waiting for the cluster to report the node out.
    Draining,
    /// The cluster reports the node out.
    Drained,
    /// The agent was asked to apply (stop, swap, start, probation).
    Applying,
    /// The agent reports the new files running and healthy; bringing the node back online.
    Applied,
    /// The agent reverted the node to its previous files (probation failed); counts against the budget.
    Reverted,
    /// A step failed and the node was left on its previous files (drain timeout, unreachable agent, hook error).
    Failed,
    /// Not processed: the rollout halted before its turn, or it already ran the package.
    Skipped,
    /// Patched, back online and healthy.
    Done,
}

impl NodeRolloutState {
    /// Every state, in lifecycle order.
    pub const ALL: [NodeRolloutState; 10] = [
        NodeRolloutState::Pending,
        NodeRolloutState::Staged,
        NodeRolloutState::Draining,
        NodeRolloutState::Drained,
        NodeRolloutState::Applying,
        NodeRolloutState::Applied,
        NodeRolloutState::Reverted,
        NodeRolloutState::Failed,
        NodeRolloutState::Skipped,
        NodeRolloutState::Done,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRolloutState::Pending => "pending",
            NodeRolloutState::Staged => "staged",
            NodeRolloutState::Draining => "draining",
            NodeRolloutState::Drained => "drained",
            NodeRolloutState::Applying => "applying",
            NodeRolloutState::Applied => "applied",
            NodeRolloutState::Reverted => "reverted",
            NodeRolloutState::Failed => "failed",
            NodeRolloutState::Skipped => "skipped",
            NodeRolloutState::Done => "done",
        }
    }

    /// A resume never touches a node in a terminal state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            NodeRolloutState::Done
                | NodeRolloutState::Reverted
                | NodeRolloutState::Failed
                | NodeRolloutState::Skipped
        )
    }

    /// Counts against the failure budget.
    pub fn is_failure(self) -> bool {
        matches!(self, NodeRolloutState::Reverted | NodeRolloutState::Failed)
    }
}

impl fmt::Display for NodeRolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeRolloutState {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        NodeRolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownValue(text.into()))
    }
}

/// Options a rollout needs again when resumed, stored as JSON with the rollout (`options_json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// The agent idempotency key of this rollout.
    pub patch_id: String,
    /// `--offline`.
    pub offline: bool,
    /// `--overwrite`.
    pub overwrite: bool,
    /// `--concurrency` (parallel stagings).
    pub concurrency: usize,
    /// `--stage-all-first`: every node staged before any is touched (absent in rollouts journaled before it).
    #[serde(default)]
    pub stage_all_first: bool,
    /// `--canary-wait` in milliseconds.
    pub canary_wait_ms: Option<u64>,
    /// `rollback --to`.
    pub to_patch_id: Option<String>,
    /// Component of the package (patch only).
    pub component: String,
}

/// What [`Store::create_rollout`] journals before anything is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    /// Unique ID ([`new_rollout_id`] makes one).
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Patch or rollback.
    pub kind: RolloutKind,
    /// Tree digest of the package (`None` for a rollback without one; stored as an empty column).
    pub package_digest: Option<TreeDigest>,
    /// Package file on the controller.
    pub package_path: String,
    /// Package version label.
    pub version: String,
    /// The `patchd_planner::Plan` as JSON.
    pub plan_json: String,
    /// The command-line options needed to resume, as JSON.
    pub options_json: String,
}

/// A journaled rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollout {
    /// ID.
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Patch or rollback.
    pub kind: RolloutKind,
    /// Current state.
    pub state: RolloutState,
    /// Tree digest of the package (`None` for a rollback without one).
    #[serde(serialize_with = "digest_or_empty")]
    pub package_digest: Option<TreeDigest>,
    /// Package file on the controller.
    pub package_path: String,
    /// Package version label.
    pub version: String,
    /// The plan, as JSON.
    pub plan_json: String,
    /// The options, as JSON.
    pub options_json: String,
    /// When it was journaled.
    pub created_at: Timestamp,
    /// Last state change.
    pub updated_at: Timestamp,
}

/// A node's current state in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeState {
    /// Node ID.
    pub node_id: String,
    /// State.
    pub state: NodeRolloutState,
    /// When it was set.
    pub updated_at: Timestamp,
}

/// One row of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// Step name (`stage`, `offline`, `wait_offline`, `apply`, `online`, …).
    pub step: String,
    /// `started`, or the step's result (`ok`, `failed`, `timeout`, …).
    pub state: String,
    /// Free text: the reason of a failure, a version, a URL.
    pub detail: String,
    /// When it was recorded.
    pub at: Timestamp,
    /// For a result row: time since the matching `started` row of the same node and step, else since the node's
    /// previous row. `None` for a `started` row and for a node's first row.
    pub duration_ms: Option<u64>,
}

/// Everything one node went through in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    /// Node ID.
    pub node_id: String,
    /// Final (or current) state; `None` if only steps were recorded.
    pub state: Option<NodeRolloutState>,
    /// Steps in order.
    pub steps: Vec<StepRecord>,
    /// Time from the node's first to its last row.
    pub duration_ms: u64,
    /// The detail of the last failed/timed-out/reverted step, if any.
    pub reason: Option<String>,
}

/// A rollout with its per-node history (`patchctl audit --rollout ID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutReport {
    /// The rollout.
    pub rollout: Rollout,
    /// Nodes in the order they were first recorded.
    pub nodes: Vec<NodeReport>,
}

/// A fresh rollout ID: UTC time to the second plus the PID, e.g. `r20261121-153012-4242`. Sorts by time.
pub fn new_rollout_id() -> String {
    let format = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    let now = time::OffsetDateTime::now_utc();
    let stamp = now
        .format(&format)
        .unwrap_or_else(|_| Timestamp::now().0.to_string());
    format!("r{stamp}-{}", std::process::id())
}

/// Serializes a rollout's optional digest as the column holds it: the digest, or an empty string.
fn digest_or_empty<S: serde::Serializer>(
    digest: &Option<TreeDigest>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(digest.as_ref().map_or("", TreeDigest::as_str))
}
