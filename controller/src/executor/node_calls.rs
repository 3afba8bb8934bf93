//! The engine's calls on one node: drain, apply, health check, undo, bring back and hooks, each journaled as a
//! step and seen through cancellation (the batch loop that sequences them is in `engine.rs`).

use super::engine::{Drain, HookCall, RolloutEngine};
use super::state::{NodePhase, Step, StepStatus, Verdict};
use super::{
    Action, ApplyCall, ApplyOutcome, CallError, Event, HookFailure, HookKind, HookOutcome, NodeRef,
    Observer, RolloutEffects, RolloutJournal, RolloutJournalError,
};
use std::time::Duration;

impl<E: RolloutEffects, J: RolloutJournal, O: Observer> RolloutEngine<'_, E, J, O> {
    /// `offline` then `wait_offline` (the wait is cut short by Ctrl-C).
    pub(super) async fn drain(&self, node: &NodeRef) -> Result<Drain, RolloutJournalError> {
        match self.hook(node, HookKind::Offline, false).await? {
            HookCall::Ok => {}
            HookCall::Failed(failure) => {
                return Ok(Drain::Failed(format!(
                    "offline hook failed, node not restarted: {failure}"
                )));
            }
            HookCall::Cancelled => return Ok(Drain::Cancelled),
        }
        if self.cancel.is_cancelled() {
            return Ok(Drain::Cancelled);
        }
        Ok(match self.hook(node, HookKind::WaitOffline, true).await? {
            HookCall::Ok => Drain::Drained,
            HookCall::Failed(HookFailure::Timeout { waited, last }) => Drain::Failed(format!(
                "drain timed out after {}: {last}; node not restarted",
                humantime::format_duration(round_to_millis(waited))
            )),
            HookCall::Failed(failure) => Drain::Failed(format!(
                "wait_offline failed, node not restarted: {failure}"
            )),
            HookCall::Cancelled => Drain::Cancelled,
        })
    }

    /// Apply (or Rollback), resent with the same patch id while the answer is lost. `maybe_delivered`: an earlier
    /// run may already have sent it, so "unreachable" or "refused" no longer proves that nothing changed.
    pub(super) async fn apply(
        &self,
        node: &NodeRef,
        maybe_delivered: bool,
    ) -> Result<(NodePhase, Option<String>, Option<Duration>), RolloutJournalError> {
        let call = ApplyCall {
            patch_id: self.spec.patch_id.clone(),
            action: self.spec.action.clone(),
        };
        self.step(node, Step::Apply, StepStatus::Started, &call.patch_id)?;
        let mut maybe_delivered = maybe_delivered;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match self.effects.apply(node, &call).await {
                Ok(result) => {
                    let downtime = Some(result.downtime);
                    let replay = if result.replayed {
                        " (recorded result of an earlier call)"
                    } else {
                        ""
                    };
                    return Ok(match result.outcome {
                        ApplyOutcome::Committed => {
                            self.step(
                                node,
                                Step::Apply,
                                StepStatus::Done,
                                &format!("committed{replay}"),
                            )?;
                            (NodePhase::Applied, None, downtime)
                        }
                        ApplyOutcome::OfflineSwapped => {
                            self.step(
                                node,
                                Step::Apply,
                                StepStatus::Done,
                                &format!("files swapped{replay}"),
                            )?;
                            (NodePhase::Returning(Verdict::Patched), None, downtime)
                        }
                        ApplyOutcome::Reverted => {
                            let why = format!("reverted by the agent: {}", result.reason);
                            self.step(node, Step::Apply, StepStatus::Failed, &why)?;
                            (NodePhase::Returning(Verdict::Reverted), Some(why), downtime)
                        }
                        ApplyOutcome::Failed => {
                            let why = format!("apply failed, nothing changed: {}", result.reason);
                            self.step(node, Step::Apply, StepStatus::Failed, &why)?;
                            (NodePhase::Returning(Verdict::Failed), Some(why), downtime)
                        }
                    });
                }
                Err(error) => error,
            };
            match error {
                CallError::Unknown(_) => maybe_delivered = true,
                CallError::NotSent(_) | CallError::Refused(_) if !maybe_delivered => {
                    let why = format!("{error}; node not restarted");
                    self.step(node, Step::Apply, StepStatus::Failed, &why)?;
                    return Ok((NodePhase::Returning(Verdict::Failed), Some(why), None));
                }
                CallError::NotSent(_) | CallError::Refused(_) => {}
            }
            if attempts > self.spec.apply_retry.retries {
                let why = format!(
                    "{error} after {attempts} attempts; the apply's outcome is unknown, so the node is left out of \
                     service and the rollout stays unfinished: check the node's agent, then run \
                     `patchctl patch --resume <cluster>` (it asks the agent again with the same patch id)"
                );
                self.step(node, Step::Apply, StepStatus::Failed, &why)?;
                return Ok((NodePhase::ApplyUnknown, Some(why), None));
            }
            self.effects.sleep(self.spec.apply_retry.delay).await;
        }
    }

    /// The cluster's `health` check after a commit; a failing node is rolled back by its agent.
    pub(super) async fn check_health(
        &self,
        node: &NodeRef,
        reason: &mut Option<String>,
    ) -> Result<NodePhase, RolloutJournalError> {
        if !self.spec.action.uses_hooks() {
            return Ok(NodePhase::Returning(Verdict::Patched));
        }
        let failure = match self.hook(node, HookKind::Health, false).await? {
            HookCall::Ok | HookCall::Cancelled => {
                return Ok(NodePhase::Returning(Verdict::Patched));
            }
            HookCall::Failed(failure) => failure,
        };
        if let Action::Rollback { .. } = self.spec.action {
            let why = format!("health check failed after the rollback: {failure}; left offline");
            *reason = Some(why);
            return Ok(NodePhase::LeftOffline);
        }
        *reason = Some(format!("health check failed after the apply ({failure})"));
        Ok(NodePhase::Undoing)
    }

    /// The agent's undo of the committed patch (phase `Undoing` already journaled, so a resume sends it again).
    pub(super) async fn undo(
        &self,
        node: &NodeRef,
        reason: &mut Option<String>,
    ) -> Result<NodePhase, RolloutJournalError> {
        let cause = reason
            .take()
            .unwrap_or_else(|| "health check failed after the apply".to_string());
        self.step(node, Step::Undo, StepStatus::Started, &self.spec.patch_id)?;
        match self.effects.undo(node, &self.spec.patch_id).await {
            Ok(result) if result.outcome == ApplyOutcome::Committed => {
                let detail = if result.replayed {
                    "recorded result of an earlier call"
                } else {
                    ""
                };
                self.step(node, Step::Undo, StepStatus::Done, detail)?;
                *reason = Some(format!("{cause}; rolled back"));
                Ok(NodePhase::Returning(Verdict::Reverted))
            }
            Ok(result) => {
                let why = format!(
                    "{cause} and the rollback did not commit ({:?}: {}); left offline",
                    result.outcome, result.reason
                );
                self.step(node, Step::Undo, StepStatus::Failed, &why)?;
                *reason = Some(why);
                Ok(NodePhase::LeftOffline)
            }
            Err(error) => {
                let why = format!("{cause} and the rollback failed ({error}); left offline");
                self.step(node, Step::Undo, StepStatus::Failed, &why)?;
                *reason = Some(why);
                Ok(NodePhase::LeftOffline)
            }
        }
    }

    /// `online` then `wait_online`; never cut short (a node must not be left out by Ctrl-C).
    pub(super) async fn bring_back(
        &self,
        node: &NodeRef,
    ) -> Result<Result<(), String>, RolloutJournalError> {
        for kind in [HookKind::Online, HookKind::WaitOnline] {
            if let HookCall::Failed(failure) = self.hook(node, kind, false).await? {
                return Ok(Err(format!("{} hook: {failure}", kind.step())));
            }
        }
        Ok(Ok(()))
    }

    /// One hook step, journaled; `cancellable` waits end early on Ctrl-C.
    pub(super) async fn hook(
        &self,
        node: &NodeRef,
        kind: HookKind,
        cancellable: bool,
    ) -> Result<HookCall, RolloutJournalError> {
        let step = kind.step();
        self.step(node, step, StepStatus::Started, "")?;
        let outcome = if cancellable {
            tokio::select! {
                outcome = self.effects.hook(node, kind) => Some(outcome),
                () = self.cancel.cancelled() => None,
            }
        } else {
            Some(self.effects.hook(node, kind).await)
        };
        match outcome {
            Some(Ok(HookOutcome::Done)) => {
                self.step(node, step, StepStatus::Done, "")?;
                Ok(HookCall::Ok)
            }
            Some(Ok(HookOutcome::NotConfigured)) => {
                self.step(
                    node,
                    step,
                    StepStatus::Skipped,
                    "no such hook for this role",
                )?;
                Ok(HookCall::Ok)
            }
            Some(Err(failure)) => {
                self.step(node, step, StepStatus::Failed, &failure.to_string())?;
                Ok(HookCall::Failed(failure))
            }
            None => {
                self.step(node, step, StepStatus::Failed, "interrupted")?;
                Ok(HookCall::Cancelled)
            }
        }
    }

    pub(super) fn step(
        &self,
        node: &NodeRef,
        step: Step,
        status: StepStatus,
        detail: &str,
    ) -> Result<(), RolloutJournalError> {
        self.journal.step(node, step, status, detail)?;
        self.observer.event(&Event::Step {
            node: node.clone(),
            step,
            status,
            detail: detail.to_string(),
        });
        Ok(())
    }

    pub(super) fn finish(
        &self,
        node: &NodeRef,
        phase: NodePhase,
        reason: Option<&str>,
    ) -> Result<(), RolloutJournalError> {
        self.journal.node_phase(node, &phase, reason)?;
        self.observer.event(&Event::NodeFinished {
            node: node.clone(),
            phase,
            reason: reason.map(str::to_string),
        });
        Ok(())
    }
}

fn round_to_millis(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis().min(u128::from(u64::MAX)) as u64)
}
