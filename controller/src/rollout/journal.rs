//! The rollout engine's journal in the store: each node's exact phase (read back on resume), its coarse state for
//! `audit`, each step, the `(patched)` marks.

use crate::executor::{
    NodePhase, NodeRecord, NodeRef, RolloutEnd, RolloutJournal, RolloutJournalError, Step,
    StepStatus, Verdict,
};
use crate::store::{NodeRolloutState, RolloutState, Store, StoreError};
use patchd_package::digest::TreeDigest;
use std::collections::HashMap;
use std::sync::Arc;

/// Step name of the rows that journal a node's exact [`NodePhase`] (state = the phase, detail = the reason).
pub const PHASE_STEP: &str = "phase";

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
        RolloutEnd::Refused => RolloutState::Failed,
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
    /// The patch's package digest, marked on each patched node; `None` for a rollback, whose nodes lose their mark.
    pub patched_digest: Option<TreeDigest>,
    /// Package version label (patch).
    pub version: String,
}

fn journal_error(error: StoreError) -> RolloutJournalError {
    RolloutJournalError(error.to_string())
}

impl RolloutJournal for StoreJournal {
    fn node_phase(
        &self,
        node: &NodeRef,
        phase: &NodePhase,
        reason: Option<&str>,
    ) -> Result<(), RolloutJournalError> {
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
    ) -> Result<(), RolloutJournalError> {
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

    fn mark(&self, node: &NodeRef) -> Result<(), RolloutJournalError> {
        match &self.patched_digest {
            Some(digest) => self.store.mark_patched(
                &self.cluster,
                &node.id,
                &self.rollout_id,
                digest,
                &self.version,
            ),
            None => self.store.unmark_patched(&self.cluster, &node.id),
        }
        .map_err(journal_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewRollout, RolloutKind};

    fn digest() -> TreeDigest {
        "d".repeat(64).parse().unwrap()
    }

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
                package_digest: Some(digest()),
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
            patched_digest: Some(digest()),
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
