//! The rollout executor: a journaled step engine that drives the planner's batches node by node.
//!
//! A rollout is a sequence of **node steps** over ordered batches. Every step's effect (an agent call, a cluster
//! API hook, a pause) goes through the [`RolloutEffects`] trait, every transition is written to the [`RolloutJournal`] before the
//! effect starts and after it ends, and progress goes to an [`Observer`]. The engine itself does no I/O, so it is
//! tested with in-memory fakes (order of steps, budget accounting, resume after a crash at every journal write).
//!
//! # A node's way through a rollout
//!
//! ```text
//! Pending ─stage─▶ Staged ─offline, wait_offline─▶ Drained ─apply─▶ Applied ─health─▶ Returning(patched)
//!                     │            │ (hook error, drain timeout, Ctrl-C)   │ (reverted/failed)       │ online,
//!                     │            └────────────────▶ Returning(failed|requeue) ◀───┘                │ wait_online,
//!                     │                                                                               ▼ mark
//!                     └─ already running the package ─▶ Skipped                                     Done
//! ```
//!
//! The `health` hook runs before the `online` hook (the node must serve before it is given work back) and
//! `wait_online` after it (it polls until the cluster shows the node back, which can only happen once `online`
//! was called). Steps whose hook the topology does not define are journaled as skipped. `--offline` swaps files
//! only: no hooks, no restart. A rollback is the same program with the agent's Rollback call in place of Apply
//! and no staging.
//!
//! # Failure budget (exact rule)
//!
//! With budget `B` and `F` nodes failed so far (reverted, failed, or left offline, staging failures included), a
//! node may **start** its turn only while `F + in_flight < B + 1`. So even if every node in flight fails, at most
//! `B + 1` nodes end failed: the rollout halts as soon as `F > B`, and it never starts a node whose failure could
//! take `F` past `B + 1`. The price is parallelism: with the default budget 0 one node is patched at a time
//! whatever the batch size; `--failure-budget 9` lets a batch of 10 run at once. Staging failures leave their
//! node untouched; they count against the budget like any other failure. With `--stage-all-first`
//! ([`StagingMode::Upfront`]) they are all known before the first turn, so a rollout that cannot stage more nodes
//! than its budget allows halts before touching any node. By default ([`StagingMode::Ahead`]) a node's staging
//! failure is counted when its batch comes, before any node of that batch starts (the batch waits for all its
//! nodes' staging results), so failures are accounted in plan order and the rule above holds exactly in both
//! modes; the nodes patched in earlier batches stay patched. A resumed rollout already past its budget halts
//! before staging or starting anything.
//!
//! # Leases (two controllers, one node)
//!
//! Before anything else (settling, staging, any node's turn) the rollout takes a lease on every node it still
//! has to finish ([`RolloutEffects::lease`]; the agent keeps it per service, see `patchd_agent::lease`), one
//! after the other in node id order so that two rollouts wanting the same nodes meet at the first they share, and
//! the effects renew them in the background until [`RolloutEffects::release_leases`] at the end of the run,
//! whatever the end. If another rollout (of this or another controller) holds any of them, the rollout is
//! refused as a whole before it changes anything ([`RolloutEnd::Refused`], the holder named in each such node's
//! reason): all or nothing, so two rollouts never interleave on the nodes they share, and each one's
//! `--max-unavailable` and failure budget hold on those nodes across controllers. A node whose agent does not
//! answer the lease call is not refused for it: its own steps fail (or are retried) as before, and its agent
//! refuses a change while another rollout holds the service. A resume is the same rollout: it takes its own
//! leases again (renewed, or re-taken after they expired unless another rollout took them meanwhile: then the
//! resume is refused and the runner keeps the rollout resumable).
//!
//! # Interrupts and crashes
//!
//! * Ctrl-C ([`Cancel`]): no new node starts; a node waiting for its drain is put back online and returns to
//!   `Pending`; a node whose apply was sent finishes its steps. The rollout ends [`RolloutEnd::Interrupted`].
//! * Crash (the process killed at any point): the journal holds each node's [`NodePhase`], written **before** the
//!   phase's effect. On resume, terminal nodes are never touched again; a node in `Draining`/`Drained` (maybe
//!   offline, not applied) is put back online and re-queued; a node in `Applying` or `ApplyUnknown` gets the same
//!   Apply again (the agent is idempotent per patch id and answers with the recorded result, without a second
//!   restart; as the earlier run may have delivered it, an unreachable agent is not taken as "nothing changed"); a
//!   node in `Undoing` gets the same undo again, then returns as reverted; a node in `Applied` or `Returning`
//!   continues from there.
//! * Unknown apply outcome (every retry unanswered): the node stays out of service in `ApplyUnknown`, nothing else
//!   starts, and the run ends [`RolloutEnd::Interrupted`] so the rollout stays unfinished and resumable.

mod engine;
mod node_calls;
mod state;
#[cfg(test)]
mod tests;

pub use engine::RolloutEngine;
pub use state::{NodePhase, NodeRecord, Step, StepStatus, Verdict};

use patchd_package::digest::TreeDigest;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// What the rollout does to each node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Apply a package (staged first on every node).
    Patch {
        /// Tree digest of the package.
        digest: TreeDigest,
        /// `--offline`: swap files only, no hooks, no restart.
        offline: bool,
    },
    /// Bring nodes back to an earlier version through the agent's Rollback call.
    Rollback {
        /// `--to <patch-id>`; `None`: undo the last committed patch.
        to_patch_id: Option<String>,
    },
}

impl Action {
    /// Whether the cluster's hooks are called (not with `--offline`).
    pub fn uses_hooks(&self) -> bool {
        !matches!(self, Action::Patch { offline: true, .. })
    }
}

/// A node as the engine knows it: the effects look everything else up by `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    /// Node ID (topology).
    pub id: String,
    /// Node name (for hooks and messages).
    pub name: String,
    /// Role of the node.
    pub role: String,
}

/// One batch of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    /// 0-based position.
    pub index: usize,
    /// Role of every node in it.
    pub role: String,
    /// The canary batch.
    pub canary: bool,
    /// Ask the [`Observer`] whether to go on after this batch.
    pub pause_after: bool,
    /// Nodes in order.
    pub nodes: Vec<NodeRef>,
}

/// Everything one run of the engine needs besides its effects.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// The patch id of this rollout (the agent's idempotency key).
    pub patch_id: String,
    /// Patch or rollback.
    pub action: Action,
    /// Ordered batches (from the planner).
    pub batches: Vec<BatchSpec>,
    /// Nodes allowed to end failed before the rollout halts.
    pub failure_budget: u32,
    /// Parallel stagings (uploads).
    pub stage_concurrency: usize,
    /// Whether every node is staged before any is touched, or each batch once its own nodes are.
    pub staging: StagingMode,
    /// How an Apply whose answer was lost is sent again.
    pub apply_retry: ApplyRetryPolicy,
    /// Each node's record from an earlier run of the same rollout (resume); empty for a fresh rollout.
    pub prior: HashMap<String, NodeRecord>,
}

/// When a patch's package is staged, relative to the batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StagingMode {
    /// A batch starts as soon as each of its nodes is staged; the later nodes go on staging meanwhile, in plan
    /// order, so the fleet's uploads overlap its restarts (as a rolling upgrade by hand does). A node whose
    /// staging fails is left untouched and counts against the failure budget when its batch comes.
    #[default]
    Ahead,
    /// Every node is staged before any is touched (`--stage-all-first`): a package that cannot be staged on more
    /// nodes than the budget allows halts the rollout with the whole fleet untouched.
    Upfront,
}

/// How often, and how far apart, an Apply (or Rollback) call whose answer was lost is sent again with the same
/// patch id before the node is left in `ApplyUnknown`. The agent answers a repeated call with the recorded result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyRetryPolicy {
    /// Sends after the first one.
    pub retries: u32,
    /// Wait between two sends.
    pub delay: Duration,
}

impl Default for ApplyRetryPolicy {
    /// Five more sends, 2 s apart: rides out an agent restart or a short network cut.
    fn default() -> Self {
        Self {
            retries: 5,
            delay: Duration::from_secs(2),
        }
    }
}

/// A cluster API hook step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookKind {
    /// Take the node out of service.
    Offline,
    /// Poll until the cluster says the node is out.
    WaitOffline,
    /// The node serves (after apply, before online).
    Health,
    /// Give the node back its work.
    Online,
    /// Poll until the cluster shows the node back.
    WaitOnline,
}

impl HookKind {
    /// The journal step of this hook.
    pub fn step(self) -> Step {
        match self {
            HookKind::Offline => Step::Offline,
            HookKind::WaitOffline => Step::WaitOffline,
            HookKind::Health => Step::Health,
            HookKind::Online => Step::Online,
            HookKind::WaitOnline => Step::WaitOnline,
        }
    }
}

/// A hook call that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// The hook ran and its expectation held.
    Done,
    /// The role defines no such hook.
    NotConfigured,
}

/// A hook call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookFailure {
    /// A wait hook's condition did not hold within its timeout.
    #[error("timed out after {waited:?}: {last}")]
    Timeout {
        /// How long it polled.
        waited: Duration,
        /// The last observation (status, field value or error).
        last: String,
    },
    /// The call failed or its expectation did not hold.
    #[error("{0}")]
    Failed(String),
}

/// What staging found on one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StageReport {
    /// The node already runs this package (a committed apply of the same digest): nothing to do.
    pub already_running: bool,
    /// Bytes uploaded (0 when the agent held the blob).
    pub bytes_pushed: u64,
}

/// One Apply (or Rollback) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyCall {
    /// Idempotency key.
    pub patch_id: String,
    /// Patch or rollback.
    pub action: Action,
}

/// The agent's answer to Apply or Rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeApplyResult {
    /// What happened.
    pub outcome: ApplyOutcome,
    /// Why, when it did not commit.
    pub reason: String,
    /// The agent answered from its record of an earlier identical call (no second restart).
    pub replayed: bool,
    /// Stop → healthy (or → reverted), as measured by the agent.
    pub downtime: Duration,
}

/// Outcome of an apply on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// New version running and healthy.
    Committed,
    /// New version failed probation; the agent restored and restarted the old one.
    Reverted,
    /// `--offline`: files swapped, nothing restarted.
    OfflineSwapped,
    /// Could not apply; nothing changed.
    Failed,
}

/// An agent call that got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The request never reached the agent (connection refused, TLS failure): nothing changed.
    #[error("agent unreachable: {0}")]
    NotSent(String),
    /// The request may have reached the agent but no answer came back: the outcome is unknown.
    #[error("no answer from the agent: {0}")]
    Unknown(String),
    /// The agent answered with an error (bad request, unknown service…): nothing changed.
    #[error("agent refused: {0}")]
    Refused(String),
}

/// A lease the rollout could not take on a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseFailure {
    /// Another rollout holds the node's service; the text names it and its expiry.
    #[error("{0}")]
    Held(String),
    /// The agent did not answer, or answered with another error: the node's own steps meet the same problem.
    #[error("{0}")]
    Unanswered(String),
}

/// The effects of a rollout: agent calls, cluster hooks, and the clock. Implemented for real in
/// `agent::effects::LiveEffects` and by fakes in the tests.
pub trait RolloutEffects: Sync {
    /// Uploads the package when the agent lacks it and stages it for the node's service.
    fn stage(&self, node: &NodeRef) -> impl Future<Output = Result<StageReport, CallError>> + Send;
    /// Calls one hook of the node's role (polling for the wait hooks and `health`).
    fn hook(
        &self,
        node: &NodeRef,
        hook: HookKind,
    ) -> impl Future<Output = Result<HookOutcome, HookFailure>> + Send;
    /// Apply (or Rollback) on the node's agent.
    fn apply(
        &self,
        node: &NodeRef,
        call: &ApplyCall,
    ) -> impl Future<Output = Result<NodeApplyResult, CallError>> + Send;
    /// Undoes the patch `patch_id` the agent committed (the cluster's health check failed afterwards).
    fn undo(
        &self,
        node: &NodeRef,
        patch_id: &str,
    ) -> impl Future<Output = Result<NodeApplyResult, CallError>> + Send;
    /// Waits (apply retries, canary wait).
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send;
    /// Takes (or renews) this rollout's lease on the node's service and keeps it renewed until
    /// [`Self::release_leases`].
    fn lease(&self, node: &NodeRef) -> impl Future<Output = Result<(), LeaseFailure>> + Send;
    /// Stops renewing and gives back every lease this run took.
    fn release_leases(&self) -> impl Future<Output = ()> + Send;
}

/// A journal write failed: the rollout cannot promise a correct resume and stops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot record the rollout's progress: {0}")]
pub struct RolloutJournalError(pub String);

/// Where the engine records every transition (the controller's store).
pub trait RolloutJournal: Sync {
    /// A node enters `phase`. Written before the phase's effect.
    fn node_phase(
        &self,
        node: &NodeRef,
        phase: &NodePhase,
        reason: Option<&str>,
    ) -> Result<(), RolloutJournalError>;
    /// A step started, ended, failed or was skipped.
    fn step(
        &self,
        node: &NodeRef,
        step: Step,
        status: StepStatus,
        detail: &str,
    ) -> Result<(), RolloutJournalError>;
    /// The node now runs what the rollout wanted: record `(patched)` (or clear it after a rollback).
    fn mark(&self, node: &NodeRef) -> Result<(), RolloutJournalError>;
}

/// What the operator decides at a pause (after the canary batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseDecision {
    /// Go on with the next batches.
    Continue,
    /// Stop here; the remaining nodes stay untouched.
    Stop,
}

/// Something worth showing while the rollout runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Staging starts on this many nodes.
    StageStarted {
        /// Nodes to stage.
        nodes: usize,
    },
    /// A batch starts.
    BatchStarted {
        /// The batch.
        batch: BatchSpec,
    },
    /// A step of a node changed.
    Step {
        /// The node.
        node: NodeRef,
        /// Which step.
        step: Step,
        /// Its new status.
        status: StepStatus,
        /// Detail (reason, figures).
        detail: String,
    },
    /// A node reached a terminal (or re-queued) phase.
    NodeFinished {
        /// The node.
        node: NodeRef,
        /// Where it ended.
        phase: NodePhase,
        /// Why, for failures.
        reason: Option<String>,
    },
    /// The failure budget is spent: no new node starts.
    Halting {
        /// Failures so far.
        failures: u32,
        /// The budget.
        budget: u32,
    },
    /// Ctrl-C seen: finishing what is in flight.
    Interrupting,
}

/// Progress display and operator decisions.
pub trait Observer: Sync {
    /// Shows an event.
    fn event(&self, event: &Event);
    /// Decides whether to go on after a batch marked `pause_after`.
    fn pause(&self, batch: &BatchSpec) -> impl Future<Output = PauseDecision> + Send;
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutEnd {
    /// Every node done or skipped.
    Completed,
    /// Every node had its turn; some failed within the budget.
    CompletedWithFailures,
    /// The failure budget was spent; the nodes after that were not started.
    Halted,
    /// Ctrl-C (in-flight steps finished, the rest untouched), or a node's apply outcome is unknown
    /// ([`NodePhase::ApplyUnknown`]); resumable.
    Interrupted,
    /// The operator stopped the rollout at a pause.
    Stopped,
    /// Another rollout holds a lease on some of the nodes: nothing was started or changed (the holders are named
    /// in those nodes' reasons).
    Refused,
}

/// Per node, what a run of the engine ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// The node.
    pub node: NodeRef,
    /// Final phase (`Pending`/`Staged` = not started).
    pub phase: NodePhase,
    /// Why it failed, or a note.
    pub reason: Option<String>,
    /// Time of its turn (offline → back online), when it had one in this run.
    pub duration: Option<Duration>,
    /// Service downtime reported by the agent.
    pub downtime: Option<Duration>,
}

/// What [`RolloutEngine::run`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutReport {
    /// How the rollout ended.
    pub end: RolloutEnd,
    /// Every node of the plan, in plan order.
    pub nodes: Vec<NodeReport>,
    /// Nodes that ended failed (counted against the budget).
    pub failures: u32,
}

/// Ctrl-C, shared between the signal handler and the engine.
#[derive(Debug, Clone)]
pub struct Cancel {
    receiver: tokio::sync::watch::Receiver<bool>,
}

/// The sending side of [`Cancel`].
#[derive(Debug)]
pub struct CancelHandle {
    sender: tokio::sync::watch::Sender<bool>,
}

impl Cancel {
    /// A new cancel flag and the handle that raises it.
    pub fn new() -> (CancelHandle, Cancel) {
        let (sender, receiver) = tokio::sync::watch::channel(false);
        (CancelHandle { sender }, Cancel { receiver })
    }

    /// Whether Ctrl-C was seen.
    pub fn is_cancelled(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once cancelled (never, if the handle is dropped without cancelling).
    pub async fn cancelled(&self) {
        let mut receiver = self.receiver.clone();
        if receiver.wait_for(|cancelled| *cancelled).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl CancelHandle {
    /// Raises the flag.
    pub fn cancel(&self) {
        self.sender.send_replace(true);
    }
}
