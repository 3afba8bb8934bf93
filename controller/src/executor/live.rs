//! The engine's real effects and journal: agents over mutual TLS, the cluster's HTTP hooks, and the SQLite store.

use super::state::{NodePhase, NodeRecord, Step, StepStatus, Verdict};
use super::{
    Action, ApplyCall, ApplyResult, BatchSpec, CallError, Effects, HookFailure, HookKind,
    HookOutcome, Journal, JournalError, NodeRef, RolloutEnd, Staged,
};
use crate::agent_client::{AgentClient, AgentClientError, PreparedBlob, PushOptions, PushProgress};
use crate::agent_ops;
use crate::hooks::ClusterHooks;
use crate::store::{NodeRolloutState, RolloutKind, RolloutState, Store, StoreError};
use crate::tls_files::ControllerTls;
use crate::topology::{Node, Topology};
use patchd_planner::Plan;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Step name of the rows that journal a node's exact [`NodePhase`] (state = the phase, detail = the reason).
pub const PHASE_STEP: &str = "phase";

/// How long one Apply/Rollback call may take (stop, swap, start, probation) before its answer counts as lost.
pub const APPLY_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Options a rollout needs again when resumed, stored as JSON with the rollout.
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
    /// `--canary-wait` in milliseconds.
    pub canary_wait_ms: Option<u64>,
    /// `rollback --to`.
    pub to_patch_id: Option<String>,
    /// Component of the package (patch only).
    pub component: String,
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

/// The store's coarse node state for a phase (what `audit` and other readers see).
pub fn coarse_state(phase: NodePhase) -> NodeRolloutState {
    match phase {
        NodePhase::Pending => NodeRolloutState::Pending,
        NodePhase::Staged => NodeRolloutState::Staged,
        NodePhase::Draining | NodePhase::Returning(Verdict::Requeue) => NodeRolloutState::Draining,
        NodePhase::Drained => NodeRolloutState::Drained,
        NodePhase::Applying | NodePhase::ApplyUnknown | NodePhase::Undoing => {
            NodeRolloutState::Applying
        }
        NodePhase::Applied | NodePhase::Returning(Verdict::Patched) => NodeRolloutState::Applied,
        NodePhase::Returning(Verdict::Reverted) | NodePhase::Reverted => NodeRolloutState::Reverted,
        NodePhase::Returning(Verdict::Failed) | NodePhase::Failed | NodePhase::LeftOffline => {
            NodeRolloutState::Failed
        }
        NodePhase::Done => NodeRolloutState::Done,
        NodePhase::Skipped => NodeRolloutState::Skipped,
    }
}

/// The store's rollout state for how a run of the engine ended.
pub fn rollout_state(end: &RolloutEnd) -> RolloutState {
    match end {
        RolloutEnd::Completed => RolloutState::Succeeded,
        RolloutEnd::CompletedWithFailures | RolloutEnd::Halted => RolloutState::Halted,
        RolloutEnd::Interrupted => RolloutState::Interrupted,
        RolloutEnd::Stopped => RolloutState::Cancelled,
    }
}

/// Each node's last journaled phase in a rollout (the input of a resume).
pub fn prior_records(
    store: &Store,
    rollout_id: &str,
) -> Result<HashMap<String, NodeRecord>, StoreError> {
    let Some(report) = store.rollout_report(rollout_id)? else {
        return Ok(HashMap::new());
    };
    let mut records = HashMap::new();
    for node in report.nodes {
        let last_phase = node.steps.iter().rev().find(|step| step.step == PHASE_STEP);
        if let Some(row) = last_phase
            && let Ok(phase) = row.state.parse::<NodePhase>()
        {
            let reason = (!row.detail.is_empty()).then(|| row.detail.clone());
            records.insert(node.node_id.clone(), NodeRecord { phase, reason });
        }
    }
    Ok(records)
}

/// Journals into the store: the exact phase as a `phase` row (read back by [`prior_records`]) and the coarse
/// state; each step as a row; marks as `(patched)` markers.
pub struct StoreJournal {
    /// The store.
    pub store: Arc<Store>,
    /// Cluster name.
    pub cluster: String,
    /// Rollout id.
    pub rollout_id: String,
    /// Patch or rollback.
    pub kind: RolloutKind,
    /// Package digest (patch).
    pub digest: String,
    /// Package version label (patch).
    pub version: String,
}

fn journal_error(error: StoreError) -> JournalError {
    JournalError(error.to_string())
}

impl Journal for StoreJournal {
    fn node_phase(
        &self,
        node: &NodeRef,
        phase: &NodePhase,
        reason: Option<&str>,
    ) -> Result<(), JournalError> {
        self.store
            .record_node_step(
                &self.rollout_id,
                &node.id,
                PHASE_STEP,
                phase.as_str(),
                reason.unwrap_or_default(),
            )
            .map_err(journal_error)?;
        self.store
            .set_node_state(&self.rollout_id, &node.id, coarse_state(*phase))
            .map_err(journal_error)
    }

    fn step(
        &self,
        node: &NodeRef,
        step: Step,
        status: StepStatus,
        detail: &str,
    ) -> Result<(), JournalError> {
        let state = match status {
            StepStatus::Started => "started",
            StepStatus::Done => "ok",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
        };
        self.store
            .record_node_step(&self.rollout_id, &node.id, step.as_str(), state, detail)
            .map_err(journal_error)
    }

    fn mark(&self, node: &NodeRef) -> Result<(), JournalError> {
        match self.kind {
            RolloutKind::Patch => self.store.mark_patched(
                &self.cluster,
                &node.id,
                &self.rollout_id,
                &self.digest,
                &self.version,
            ),
            RolloutKind::Rollback => self.store.unmark_patched(&self.cluster, &node.id),
        }
        .map_err(journal_error)
    }
}

/// Progress callback of the uploads: (node, bytes done, total).
pub type PushProgressFn = Arc<dyn Fn(&NodeRef, PushProgress) + Send + Sync>;

/// Agents over mutual TLS and the cluster's hooks.
pub struct LiveEffects {
    topology: Arc<Topology>,
    hooks: ClusterHooks,
    tls: ControllerTls,
    blob: Option<Arc<PreparedBlob>>,
    on_push: PushProgressFn,
}

impl LiveEffects {
    /// Effects for a cluster; `blob` is the prepared package of a patch (`None` for a rollback).
    pub fn new(
        topology: Arc<Topology>,
        hooks: ClusterHooks,
        tls: ControllerTls,
        blob: Option<Arc<PreparedBlob>>,
        on_push: PushProgressFn,
    ) -> Self {
        Self {
            topology,
            hooks,
            tls,
            blob,
            on_push,
        }
    }

    fn node(&self, node: &NodeRef) -> Result<&Node, CallError> {
        self.topology.node_by_id(&node.id).ok_or_else(|| {
            CallError::Refused(format!(
                "node {} is no longer in the cluster's topology",
                node.id
            ))
        })
    }

    async fn connect(&self, node: &Node) -> Result<AgentClient, CallError> {
        AgentClient::connect(&node.agent_address(), &self.tls)
            .await
            .map_err(|error| CallError::NotSent(error.to_string()))
    }
}

fn client_error(error: AgentClientError) -> CallError {
    match error {
        AgentClientError::Connect { .. } | AgentClientError::BadAddress(_) => {
            CallError::NotSent(error.to_string())
        }
        other => CallError::Refused(other.to_string()),
    }
}

impl Effects for LiveEffects {
    async fn stage(&self, node_ref: &NodeRef) -> Result<Staged, CallError> {
        let node = self.node(node_ref)?;
        let Some(blob) = &self.blob else {
            return Err(CallError::Refused(
                "nothing to stage: no package".to_string(),
            ));
        };
        let mut client = self.connect(node).await?;
        let services = agent_ops::status(client.raw(), Some(&node.service))
            .await
            .map_err(|status| CallError::Refused(format!("Status: {}", status.message())))?;
        let Some(service) = services
            .into_iter()
            .find(|service| service.name == node.service)
        else {
            return Err(CallError::Refused(format!(
                "agent {} manages no service `{}`: add it to the agent's patchd.toml or fix the topology",
                node.agent_address(),
                node.service
            )));
        };
        if service.runs_digest(&blob.digest) {
            return Ok(Staged {
                already_running: true,
                bytes_pushed: 0,
            });
        }
        let on_push = Arc::clone(&self.on_push);
        let report = client
            .push(blob, &PushOptions::default(), |progress| {
                on_push(node_ref, progress)
            })
            .await
            .map_err(client_error)?;
        agent_ops::stage(client.raw(), &node.service, &blob.digest)
            .await
            .map_err(|status| {
                CallError::Refused(format!("Stage: {:?}: {}", status.code(), status.message()))
            })?;
        Ok(Staged {
            already_running: false,
            bytes_pushed: report.bytes_sent,
        })
    }

    async fn hook(&self, node_ref: &NodeRef, hook: HookKind) -> Result<HookOutcome, HookFailure> {
        let node = self
            .node(node_ref)
            .map_err(|error| HookFailure::Failed(error.to_string()))?;
        self.hooks.run(node, hook).await
    }

    async fn apply(&self, node_ref: &NodeRef, call: &ApplyCall) -> Result<ApplyResult, CallError> {
        let node = self.node(node_ref)?;
        // A fresh connection per call: a refused connection then proves the request was never sent.
        let mut client = self.connect(node).await?;
        let answer = match &call.action {
            Action::Patch { digest, offline } => {
                tokio::time::timeout(
                    APPLY_CALL_TIMEOUT,
                    agent_ops::apply(
                        client.raw(),
                        &node.service,
                        digest,
                        &call.patch_id,
                        *offline,
                    ),
                )
                .await
            }
            Action::Rollback { to_patch_id } => {
                tokio::time::timeout(
                    APPLY_CALL_TIMEOUT,
                    agent_ops::rollback(
                        client.raw(),
                        &node.service,
                        to_patch_id.as_deref(),
                        &call.patch_id,
                    ),
                )
                .await
            }
        };
        answer.unwrap_or_else(|_| {
            Err(CallError::Unknown(format!(
                "no answer within {}s",
                APPLY_CALL_TIMEOUT.as_secs()
            )))
        })
    }

    async fn undo(&self, node_ref: &NodeRef, patch_id: &str) -> Result<ApplyResult, CallError> {
        let node = self.node(node_ref)?;
        let mut client = self.connect(node).await?;
        let operation = format!("{patch_id}-undo");
        tokio::time::timeout(
            APPLY_CALL_TIMEOUT,
            agent_ops::rollback(client.raw(), &node.service, Some(patch_id), &operation),
        )
        .await
        .unwrap_or_else(|_| {
            Err(CallError::Unknown(format!(
                "no answer within {}s",
                APPLY_CALL_TIMEOUT.as_secs()
            )))
        })
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewRollout;

    #[test]
    fn every_phase_maps_to_a_store_state_of_the_same_terminality() {
        for phase in NodePhase::ALL {
            let coarse = coarse_state(phase);
            if phase.is_terminal() {
                assert!(coarse.is_terminal(), "{phase} → {coarse}");
                assert_eq!(coarse.is_failure(), phase.is_failure(), "{phase}");
            }
            if phase.is_in_flight() {
                assert!(
                    !coarse.is_terminal() || matches!(phase, NodePhase::Returning(_)),
                    "{phase} → {coarse}"
                );
            }
        }
    }

    #[test]
    fn the_store_journal_reads_back_the_exact_phases() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
        store
            .create_rollout(&NewRollout {
                id: "r1".into(),
                cluster: "c".into(),
                kind: RolloutKind::Patch,
                package_digest: "d".into(),
                package_path: "/p".into(),
                version: "v".into(),
                plan_json: "{}".into(),
                options_json: "{}".into(),
            })
            .unwrap();
        let journal = StoreJournal {
            store: Arc::clone(&store),
            cluster: "c".into(),
            rollout_id: "r1".into(),
            kind: RolloutKind::Patch,
            digest: "d".into(),
            version: "v".into(),
        };
        let a = NodeRef {
            id: "a".into(),
            name: "a".into(),
            role: "w".into(),
        };
        let b = NodeRef {
            id: "b".into(),
            name: "b".into(),
            role: "w".into(),
        };
        journal.node_phase(&a, &NodePhase::Applying, None).unwrap();
        journal
            .step(&a, Step::Apply, StepStatus::Failed, "probe failed")
            .unwrap();
        journal
            .node_phase(
                &a,
                &NodePhase::Returning(Verdict::Reverted),
                Some("reverted by the agent"),
            )
            .unwrap();
        journal.node_phase(&b, &NodePhase::Done, None).unwrap();
        journal.mark(&b).unwrap();
        let records = prior_records(&store, "r1").unwrap();
        assert_eq!(
            records["a"],
            NodeRecord {
                phase: NodePhase::Returning(Verdict::Reverted),
                reason: Some("reverted by the agent".into())
            }
        );
        assert_eq!(records["b"].phase, NodePhase::Done);
        let states = store.node_states("r1").unwrap();
        assert_eq!(states[0].state, NodeRolloutState::Reverted);
        assert_eq!(store.node_marks("c").unwrap()[0].node_id, "b");
    }
}
