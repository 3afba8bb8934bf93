//! A node's rollout phase (the one enum the journal stores), the step names, and their text forms.

use std::fmt;
use std::str::FromStr;

/// Where a node is in a rollout. Written to the journal **before** the effect of the phase starts, so after a
/// crash the recorded phase says which effect may have happened (see the module docs for the resume rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodePhase {
    /// Nothing done yet in this rollout.
    Pending,
    /// The package is staged on the node's agent; nothing live changed.
    Staged,
    /// The `offline` hook is being called or its drain awaited: the node may be out of service, not restarted.
    Draining,
    /// The cluster confirmed the node out of service; not restarted yet.
    Drained,
    /// Apply (or Rollback) sent or about to be sent: the agent may be restarting the service.
    Applying,
    /// The Apply's outcome stayed unknown (every retry went unanswered): the node is left out of service, not
    /// terminal. Resume asks the agent again with the same patch id (it replays the recorded result or waits for
    /// the apply in flight) and goes on from the answer.
    ApplyUnknown,
    /// The agent committed the new version; the cluster's `health` check is pending.
    Applied,
    /// The cluster's `health` check failed after the commit: the agent's undo (`{patch}-undo`) is sent or about to
    /// be. Resume sends the same undo again (the agent replays it by its id), then returns the node as reverted.
    Undoing,
    /// Being put back into service with this verdict (online, wait_online, then the verdict's terminal phase).
    Returning(Verdict),
    /// Terminal: the node runs the new version, back in service, marked.
    Done,
    /// Terminal: the node already ran the package; untouched.
    Skipped,
    /// Terminal: the new version failed and the old one runs again; back in service. Counts as a failure.
    Reverted,
    /// Terminal: the node could not be patched (drain timeout, hook or staging error, apply refused); it runs
    /// its old version and is back in service unless the reason says otherwise. Counts as a failure.
    Failed,
    /// Terminal: the node could not be put back into service (or its undo failed); it is left out of service and
    /// the reason says so. Counts as a failure.
    LeftOffline,
}

/// What a node returning to service ends as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Patched: ends `Done` (after `mark`).
    Patched,
    /// Reverted: ends `Reverted`.
    Reverted,
    /// Not patched: ends `Failed`.
    Failed,
    /// Interrupted before its apply: ends `Pending`, to be run again.
    Requeue,
}

impl NodePhase {
    /// No further step will ever run for this node in this rollout.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Skipped | Self::Reverted | Self::Failed | Self::LeftOffline
        )
    }

    /// Counted against the failure budget.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Reverted | Self::Failed | Self::LeftOffline)
    }

    /// Held against the failure budget: a failure, or an apply whose outcome is unknown (it may have failed).
    pub fn holds_budget(self) -> bool {
        self.is_failure() || self == Self::ApplyUnknown
    }

    /// An effect of the node's turn may be under way (resume must settle it first).
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            Self::Draining
                | Self::Drained
                | Self::Applying
                | Self::ApplyUnknown
                | Self::Applied
                | Self::Undoing
                | Self::Returning(_)
        )
    }

    /// Stable text form stored in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Staged => "staged",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::Applying => "applying",
            Self::ApplyUnknown => "apply_unknown",
            Self::Applied => "applied",
            Self::Undoing => "undoing",
            Self::Returning(Verdict::Patched) => "returning:patched",
            Self::Returning(Verdict::Reverted) => "returning:reverted",
            Self::Returning(Verdict::Failed) => "returning:failed",
            Self::Returning(Verdict::Requeue) => "returning:requeue",
            Self::Done => "done",
            Self::Skipped => "skipped",
            Self::Reverted => "reverted",
            Self::Failed => "failed",
            Self::LeftOffline => "left_offline",
        }
    }

    /// Every phase (for parsing and tests).
    pub const ALL: [NodePhase; 17] = [
        Self::Pending,
        Self::Staged,
        Self::Draining,
        Self::Drained,
        Self::Applying,
        Self::ApplyUnknown,
        Self::Applied,
        Self::Undoing,
        Self::Returning(Verdict::Patched),
        Self::Returning(Verdict::Reverted),
        Self::Returning(Verdict::Failed),
        Self::Returning(Verdict::Requeue),
        Self::Done,
        Self::Skipped,
        Self::Reverted,
        Self::Failed,
        Self::LeftOffline,
    ];
}

impl fmt::Display for NodePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A journal held a phase this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown node phase `{0}` in the journal (written by a newer patchctl?)")]
pub struct UnknownPhase(pub String);

impl FromStr for NodePhase {
    type Err = UnknownPhase;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|phase| phase.as_str() == text)
            .ok_or_else(|| UnknownPhase(text.to_string()))
    }
}

/// A node's last journaled phase and reason (input of a resume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Last phase written.
    pub phase: NodePhase,
    /// Reason written with it.
    pub reason: Option<String>,
}

/// A step of a node's turn, as journaled and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Upload (if needed) and stage the package.
    Stage,
    /// `offline` hook.
    Offline,
    /// `wait_offline` hook.
    WaitOffline,
    /// Agent Apply or Rollback.
    Apply,
    /// `health` hook.
    Health,
    /// Agent Rollback of a patch whose node failed the cluster's health check.
    Undo,
    /// `online` hook.
    Online,
    /// `wait_online` hook.
    WaitOnline,
    /// Record `(patched)`.
    Mark,
}

impl Step {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Offline => "offline",
            Self::WaitOffline => "wait_offline",
            Self::Apply => "apply",
            Self::Health => "health",
            Self::Undo => "undo",
            Self::Online => "online",
            Self::WaitOnline => "wait_online",
            Self::Mark => "mark",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepStatus {
    /// Written before the effect.
    Started,
    /// The effect succeeded.
    Done,
    /// The effect failed (detail says why).
    Failed,
    /// Not run (no such hook, or not needed).
    Skipped,
}

impl StepStatus {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
