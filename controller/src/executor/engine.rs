//! The step engine: settles nodes left in flight by an earlier run, stages, then runs the batches under the
//! failure budget, journaling every transition before its effect.

use super::state::{NodePhase, NodeRecord, Step, StepStatus, Verdict};
use super::{
    Action, Cancel, Event, HookFailure, LeaseFailure, NodeRef, NodeReport, Observer, PauseDecision,
    RolloutEffects, RolloutEnd, RolloutJournal, RolloutJournalError, RolloutReport, RolloutSpec,
    StagingMode,
};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Runs one rollout (fresh or resumed) over its effects, journal and observer.
pub struct RolloutEngine<'a, E, J, O> {
    pub(super) spec: &'a RolloutSpec,
    pub(super) effects: &'a E,
    pub(super) journal: &'a J,
    pub(super) observer: &'a O,
    pub(super) cancel: Cancel,
}

/// Where one node's turn ended in this run.
#[derive(Debug)]
pub(super) struct TurnEnd {
    phase: NodePhase,
    reason: Option<String>,
    duration: Duration,
    downtime: Option<Duration>,
}

/// A hook step seen through cancellation.
pub(super) enum HookCall {
    Ok,
    Failed(HookFailure),
    Cancelled,
}

/// How a drain ended.
pub(super) enum Drain {
    Drained,
    Failed(String),
    Cancelled,
}

/// What the engine knows of a node during the run.
#[derive(Debug, Clone)]
struct NodeState {
    record: NodeRecord,
    duration: Option<Duration>,
    downtime: Option<Duration>,
}

/// Staging in this run: nodes whose result has not come yet, and nodes it left untouched (skipped or failed).
struct StagingProgress {
    awaiting: HashSet<String>,
    untouched: HashSet<String>,
    /// Staging failures not yet counted against the budget.
    uncounted_failures: HashSet<String>,
}

impl StagingProgress {
    /// Counts (once) the staging failures among `nodes`.
    fn count_failures<'n>(&mut self, nodes: impl Iterator<Item = &'n NodeRef>) -> u32 {
        let mut counted = 0;
        for node in nodes {
            if self.uncounted_failures.remove(&node.id) {
                counted += 1;
            }
        }
        counted
    }
}

/// What woke the batch loop: a node's turn ended, or a later node's staging did.
enum Progress<T, S> {
    Turn(Option<T>),
    Staged(Option<S>),
}

impl<'a, E: RolloutEffects, J: RolloutJournal, O: Observer> RolloutEngine<'a, E, J, O> {
    /// An engine for `spec`.
    pub fn new(
        spec: &'a RolloutSpec,
        effects: &'a E,
        journal: &'a J,
        observer: &'a O,
        cancel: Cancel,
    ) -> Self {
        Self {
            spec,
            effects,
            journal,
            observer,
            cancel,
        }
    }

    /// Runs the rollout to its end under its leases (see the module doc of [`super`]), released whatever the
    /// end. A journal error stops it at once, as a crash would: resume settles the rest.
    pub async fn run(&self) -> Result<RolloutReport, RolloutJournalError> {
        let refused = self.take_leases().await;
        let outcome = match refused {
            Ok(None) => self.run_leased().await,
            Ok(Some(report)) => Ok(report),
            Err(error) => Err(error),
        };
        self.effects.release_leases().await;
        outcome
    }

    /// Takes the lease of every node not finished yet, one after the other in node id order and stopping at the
    /// first refusal: two rollouts that want the same nodes meet at the first one they share, so exactly one of
    /// them goes on (taking them all at once, each could hold one the other needs and both would be refused).
    /// `Some(report)` when another rollout holds one: the rollout ends [`RolloutEnd::Refused`] with every node as
    /// it was.
    async fn take_leases(&self) -> Result<Option<RolloutReport>, RolloutJournalError> {
        let order: Vec<&NodeRef> = self
            .spec
            .batches
            .iter()
            .flat_map(|batch| batch.nodes.iter())
            .collect();
        let mut unfinished: Vec<&NodeRef> = order
            .iter()
            .copied()
            .filter(|node| {
                !self
                    .spec
                    .prior
                    .get(&node.id)
                    .is_some_and(|record| record.phase.is_terminal())
            })
            .collect();
        unfinished.sort_by(|a, b| a.id.cmp(&b.id));
        let mut held = HashMap::new();
        for node in unfinished {
            if let Err(LeaseFailure::Held(holder)) = self.effects.lease(node).await {
                held.insert(node.id.clone(), holder);
                break;
            }
        }
        if held.is_empty() {
            return Ok(None);
        }
        let mut states = HashMap::new();
        for node in &order {
            let mut record = self
                .spec
                .prior
                .get(&node.id)
                .cloned()
                .unwrap_or(NodeRecord {
                    phase: NodePhase::Pending,
                    reason: None,
                });
            if let Some(holder) = held.remove(&node.id) {
                let reason = format!("not started, untouched: {holder}");
                self.journal
                    .node_phase(node, &record.phase, Some(&reason))?;
                self.observer.event(&Event::NodeFinished {
                    node: (*node).clone(),
                    phase: record.phase,
                    reason: Some(reason.clone()),
                });
                record.reason = Some(reason);
            }
            states.insert(
                node.id.clone(),
                NodeState {
                    record,
                    duration: None,
                    downtime: None,
                },
            );
        }
        let failures = states
            .values()
            .filter(|state| state.record.phase.is_failure())
            .count() as u32;
        Ok(Some(self.report(
            RolloutEnd::Refused,
            &order,
            states,
            failures,
        )))
    }

    /// [`Self::run`] once the leases are held.
    async fn run_leased(&self) -> Result<RolloutReport, RolloutJournalError> {
        let order: Vec<&NodeRef> = self
            .spec
            .batches
            .iter()
            .flat_map(|batch| batch.nodes.iter())
            .collect();
        let mut states: HashMap<String, NodeState> = order
            .iter()
            .map(|node| {
                let record = self
                    .spec
                    .prior
                    .get(&node.id)
                    .cloned()
                    .unwrap_or(NodeRecord {
                        phase: NodePhase::Pending,
                        reason: None,
                    });
                (
                    node.id.clone(),
                    NodeState {
                        record,
                        duration: None,
                        downtime: None,
                    },
                )
            })
            .collect();
        let mut failures = states
            .values()
            .filter(|state| state.record.phase.is_failure())
            .count() as u32;

        // 1. Nodes an earlier run left in flight are settled before anything else starts.
        let in_flight: Vec<(&NodeRef, NodePhase, Option<String>)> = order
            .iter()
            .filter_map(|node| {
                let record = &states[&node.id].record;
                record
                    .phase
                    .is_in_flight()
                    .then(|| (*node, resume_phase(record.phase), record.reason.clone()))
            })
            .collect();
        let mut settling: FuturesUnordered<_> = in_flight
            .into_iter()
            .map(
                |(node, phase, reason)| async move { (node, self.turn(node, phase, reason).await) },
            )
            .collect();
        // A node whose apply outcome is still unknown holds the rollout: nothing new starts, and the rollout
        // ends interrupted (unfinished) so that a resume asks its agent again.
        let mut unsettled = false;
        while let Some((node, end)) = settling.next().await {
            let end = end?;
            failures += u32::from(end.phase.holds_budget());
            unsettled |= end.phase == NodePhase::ApplyUnknown;
            apply_end(&mut states, node, end);
        }
        drop(settling);

        // 2. Staging, in plan order, `stage_concurrency` nodes at a time. Upfront: every node is staged before any
        // is touched. Ahead: a batch starts once each of its nodes is staged, while the later ones go on staging
        // (a node whose staging fails is left untouched and counts against the budget when its batch comes).
        // Nothing is staged or started while an earlier apply's outcome is unknown.
        let mut halted = unsettled;
        // A resumed rollout already past its budget stages and starts nothing more.
        self.check_budget(failures, &mut halted);
        let to_stage: Vec<&NodeRef> = if matches!(self.spec.action, Action::Patch { .. }) && !halted
        {
            order
                .iter()
                .copied()
                .filter(|node| is_startable(states[&node.id].record.phase))
                .collect()
        } else {
            Vec::new()
        };
        let mut progress = StagingProgress {
            awaiting: to_stage.iter().map(|node| node.id.clone()).collect(),
            untouched: HashSet::new(),
            uncounted_failures: HashSet::new(),
        };
        if !to_stage.is_empty() {
            self.observer.event(&Event::StageStarted {
                nodes: to_stage.len(),
            });
        }
        let mut staging = futures::stream::iter(to_stage)
            .map(|node| async move { (node, self.stage(node).await) })
            .buffer_unordered(self.spec.stage_concurrency.max(1));
        if self.spec.staging == StagingMode::Upfront && !progress.awaiting.is_empty() {
            while !progress.awaiting.is_empty() {
                let next = tokio::select! {
                    next = staging.next() => next,
                    () = self.cancel.cancelled() => None,
                };
                let Some((node, staged)) = next else { break };
                self.staged(&mut states, &mut progress, node, staged?);
            }
            failures += progress.count_failures(order.iter().copied());
            if self.cancel.is_cancelled() {
                self.observer.event(&Event::Interrupting);
                return Ok(self.report(RolloutEnd::Interrupted, &order, states, failures));
            }
            self.check_budget(failures, &mut halted);
        }

        // 3. Batches, strictly one after the other.
        let mut end = None;
        for (position, batch) in self.spec.batches.iter().enumerate() {
            // Ahead: the batch waits for its own nodes' staging (later nodes stage meanwhile).
            while !halted
                && batch
                    .nodes
                    .iter()
                    .any(|node| progress.awaiting.contains(&node.id))
            {
                let next = tokio::select! {
                    next = staging.next() => next,
                    () = self.cancel.cancelled() => None,
                };
                let Some((node, staged)) = next else { break };
                self.staged(&mut states, &mut progress, node, staged?);
            }
            // Staging failures count when their batch comes, before any of its nodes starts: the budget rule
            // holds as with everything staged first, and a node's failure is accounted in plan order.
            failures += progress.count_failures(batch.nodes.iter());
            self.check_budget(failures, &mut halted);
            if halted {
                break;
            }
            if self.cancel.is_cancelled() {
                end = Some(RolloutEnd::Interrupted);
                break;
            }
            let mut queue: VecDeque<&NodeRef> = batch
                .nodes
                .iter()
                .filter(|node| is_startable(states[&node.id].record.phase))
                .collect();
            if !queue.is_empty() {
                self.observer.event(&Event::BatchStarted {
                    batch: batch.clone(),
                });
            }
            let mut running = FuturesUnordered::new();
            loop {
                while !halted
                    && !unsettled
                    && !self.cancel.is_cancelled()
                    && failures + (running.len() as u32)
                        < self.spec.failure_budget.saturating_add(1)
                {
                    let Some(node) = queue.pop_front() else { break };
                    let from = states[&node.id].record.phase;
                    running.push(async move { (node, self.turn(node, from, None).await) });
                }
                let next = tokio::select! {
                    next = running.next() => Progress::Turn(next),
                    next = staging.next(), if !progress.awaiting.is_empty() => Progress::Staged(next),
                };
                let (node, turn_end) = match next {
                    Progress::Turn(None) => break,
                    Progress::Turn(Some(turned)) => turned,
                    Progress::Staged(Some((node, staged))) => {
                        self.staged(&mut states, &mut progress, node, staged?);
                        continue;
                    }
                    Progress::Staged(None) => {
                        progress.awaiting.clear();
                        continue;
                    }
                };
                let turn_end = turn_end?;
                unsettled |= turn_end.phase == NodePhase::ApplyUnknown;
                if turn_end.phase.holds_budget() {
                    failures += 1;
                    self.check_budget(failures, &mut halted);
                }
                apply_end(&mut states, node, turn_end);
            }
            if self.cancel.is_cancelled() {
                self.observer.event(&Event::Interrupting);
                end = Some(RolloutEnd::Interrupted);
                break;
            }
            if halted || unsettled {
                break;
            }
            let later_started = self.spec.batches[position + 1..]
                .iter()
                .flat_map(|later| later.nodes.iter())
                .any(|node| {
                    // A node that staging skipped or failed in this run was never touched.
                    !progress.untouched.contains(&node.id)
                        && !matches!(
                            states[&node.id].record.phase,
                            NodePhase::Pending | NodePhase::Staged
                        )
                });
            let more_to_do = self.spec.batches[position + 1..]
                .iter()
                .flat_map(|later| later.nodes.iter())
                .any(|node| !states[&node.id].record.phase.is_terminal());
            if batch.pause_after && more_to_do && !later_started {
                // Staging goes on while the operator decides.
                let pause = self.observer.pause(batch);
                tokio::pin!(pause);
                let decision = loop {
                    tokio::select! {
                        decision = &mut pause => break Some(decision),
                        next = staging.next(), if !progress.awaiting.is_empty() => match next {
                            Some((node, staged)) => {
                                self.staged(&mut states, &mut progress, node, staged?);
                            }
                            None => progress.awaiting.clear(),
                        },
                        () = self.cancel.cancelled() => break None,
                    }
                };
                match decision {
                    Some(PauseDecision::Continue) => {}
                    Some(PauseDecision::Stop) => {
                        end = Some(RolloutEnd::Stopped);
                        break;
                    }
                    None => {
                        self.observer.event(&Event::Interrupting);
                        end = Some(RolloutEnd::Interrupted);
                        break;
                    }
                }
            }
        }
        // Nodes whose staging failed in batches never reached still ended failed.
        failures += progress.count_failures(order.iter().copied());
        let end = match end {
            Some(end) => end,
            None if unsettled => RolloutEnd::Interrupted,
            None if halted => RolloutEnd::Halted,
            None if failures > 0 => RolloutEnd::CompletedWithFailures,
            None => RolloutEnd::Completed,
        };
        Ok(self.report(end, &order, states, failures))
    }

    fn report(
        &self,
        end: RolloutEnd,
        order: &[&NodeRef],
        mut states: HashMap<String, NodeState>,
        failures: u32,
    ) -> RolloutReport {
        let nodes = order
            .iter()
            .map(|node| {
                let state = states.remove(&node.id).unwrap_or_else(pending_state);
                NodeReport {
                    node: (*node).clone(),
                    phase: state.record.phase,
                    reason: state.record.reason,
                    duration: state.duration,
                    downtime: state.downtime,
                }
            })
            .collect();
        RolloutReport {
            end,
            nodes,
            failures,
        }
    }

    /// Halts the rollout (once, with its event) when `failures` exceed the budget.
    fn check_budget(&self, failures: u32, halted: &mut bool) {
        if !*halted && failures > self.spec.failure_budget {
            *halted = true;
            self.observer.event(&Event::Halting {
                failures,
                budget: self.spec.failure_budget,
            });
        }
    }

    /// Records one node's staging result; a failure is counted against the budget by the caller
    /// ([`StagingProgress::count_failures`]) when the node's batch comes (or once all are staged, upfront).
    fn staged(
        &self,
        states: &mut HashMap<String, NodeState>,
        progress: &mut StagingProgress,
        node: &NodeRef,
        (phase, reason): (NodePhase, Option<String>),
    ) {
        progress.awaiting.remove(&node.id);
        if matches!(phase, NodePhase::Skipped | NodePhase::Failed) {
            progress.untouched.insert(node.id.clone());
        }
        if phase.is_failure() {
            progress.uncounted_failures.insert(node.id.clone());
        }
        let state = states.entry(node.id.clone()).or_insert_with(pending_state);
        state.record = NodeRecord { phase, reason };
    }

    /// Stages one node: `Staged`, `Skipped` (already runs the package) or `Failed` (untouched).
    async fn stage(
        &self,
        node: &NodeRef,
    ) -> Result<(NodePhase, Option<String>), RolloutJournalError> {
        self.step(node, Step::Stage, StepStatus::Started, "")?;
        match self.effects.stage(node).await {
            Ok(staged) if staged.already_running => {
                self.step(
                    node,
                    Step::Stage,
                    StepStatus::Skipped,
                    "the node already runs this package",
                )?;
                let reason = Some("already runs this package".to_string());
                self.finish(node, NodePhase::Skipped, reason.as_deref())?;
                Ok((NodePhase::Skipped, reason))
            }
            Ok(staged) => {
                let detail = if staged.bytes_pushed == 0 {
                    "agent held the package".to_string()
                } else {
                    format!("{} bytes uploaded", staged.bytes_pushed)
                };
                self.step(node, Step::Stage, StepStatus::Done, &detail)?;
                self.journal.node_phase(node, &NodePhase::Staged, None)?;
                Ok((NodePhase::Staged, None))
            }
            Err(error) => {
                let reason = format!("staging failed, node untouched: {error}");
                self.step(node, Step::Stage, StepStatus::Failed, &reason)?;
                self.finish(node, NodePhase::Failed, Some(&reason))?;
                Ok((NodePhase::Failed, Some(reason)))
            }
        }
    }

    /// Drives one node from `from` to a terminal phase (or back to `Pending` when interrupted before its apply).
    async fn turn(
        &self,
        node: &NodeRef,
        from: NodePhase,
        reason: Option<String>,
    ) -> Result<TurnEnd, RolloutJournalError> {
        let started = Instant::now();
        let hooks = self.spec.action.uses_hooks();
        let mut reason = reason;
        let mut downtime = None;
        let mut phase = from;
        // Resumed from `Applying`: the earlier run may have delivered that Apply before it died.
        let apply_maybe_delivered = from == NodePhase::Applying;
        loop {
            phase = match phase {
                NodePhase::Pending | NodePhase::Staged => {
                    if hooks {
                        NodePhase::Draining
                    } else {
                        NodePhase::Applying
                    }
                }
                NodePhase::Draining => {
                    self.journal.node_phase(node, &NodePhase::Draining, None)?;
                    match self.drain(node).await? {
                        Drain::Drained => NodePhase::Drained,
                        Drain::Failed(why) => {
                            reason = Some(why);
                            NodePhase::Returning(Verdict::Failed)
                        }
                        Drain::Cancelled => NodePhase::Returning(Verdict::Requeue),
                    }
                }
                NodePhase::Drained => {
                    self.journal.node_phase(node, &NodePhase::Drained, None)?;
                    if self.cancel.is_cancelled() {
                        NodePhase::Returning(Verdict::Requeue)
                    } else {
                        NodePhase::Applying
                    }
                }
                NodePhase::Applying => {
                    self.journal.node_phase(node, &NodePhase::Applying, None)?;
                    let (next, why, measured) = self.apply(node, apply_maybe_delivered).await?;
                    reason = why;
                    downtime = measured;
                    next
                }
                NodePhase::Applied => {
                    self.journal.node_phase(node, &NodePhase::Applied, None)?;
                    self.check_health(node, &mut reason).await?
                }
                NodePhase::Undoing => {
                    self.journal
                        .node_phase(node, &NodePhase::Undoing, reason.as_deref())?;
                    self.undo(node, &mut reason).await?
                }
                NodePhase::Returning(verdict) => {
                    self.journal.node_phase(
                        node,
                        &NodePhase::Returning(verdict),
                        reason.as_deref(),
                    )?;
                    let back = if hooks {
                        self.bring_back(node).await?
                    } else {
                        Ok(())
                    };
                    if verdict == Verdict::Patched {
                        self.step(node, Step::Mark, StepStatus::Started, "")?;
                        self.journal.mark(node)?;
                        self.step(node, Step::Mark, StepStatus::Done, "")?;
                    }
                    match back {
                        Err(why) => {
                            let what = match verdict {
                                Verdict::Patched => "patched".to_string(),
                                _ => reason.clone().unwrap_or_else(|| "not patched".to_string()),
                            };
                            reason = Some(format!(
                                "{what}; could not be put back into service ({why}): left offline"
                            ));
                            NodePhase::LeftOffline
                        }
                        Ok(()) => match verdict {
                            Verdict::Patched => NodePhase::Done,
                            Verdict::Reverted => NodePhase::Reverted,
                            Verdict::Failed => NodePhase::Failed,
                            Verdict::Requeue => NodePhase::Pending,
                        },
                    }
                }
                terminal => {
                    self.finish(node, terminal, reason.as_deref())?;
                    return Ok(TurnEnd {
                        phase: terminal,
                        reason,
                        duration: started.elapsed(),
                        downtime,
                    });
                }
            };
            // Not terminal, but the end of this turn: re-queued, or held until a resume settles the apply.
            if matches!(phase, NodePhase::Pending | NodePhase::ApplyUnknown) {
                self.journal.node_phase(node, &phase, reason.as_deref())?;
                self.observer.event(&Event::NodeFinished {
                    node: node.clone(),
                    phase,
                    reason: reason.clone(),
                });
                return Ok(TurnEnd {
                    phase,
                    reason,
                    duration: started.elapsed(),
                    downtime,
                });
            }
        }
    }
}

/// Where a node left in flight by an earlier run continues: a node that may be offline but was not applied is put
/// back online first (and re-queued); an apply in flight or of unknown outcome is asked again; an undo in flight is
/// sent again; later phases go on.
fn resume_phase(recorded: NodePhase) -> NodePhase {
    match recorded {
        NodePhase::Draining | NodePhase::Drained => NodePhase::Returning(Verdict::Requeue),
        NodePhase::ApplyUnknown => NodePhase::Applying,
        other => other,
    }
}

/// A node whose turn may start in this run (nothing of it in flight, not finished).
fn is_startable(phase: NodePhase) -> bool {
    matches!(phase, NodePhase::Pending | NodePhase::Staged)
}

fn apply_end(states: &mut HashMap<String, NodeState>, node: &NodeRef, end: TurnEnd) {
    let state = states.entry(node.id.clone()).or_insert_with(pending_state);
    state.record = NodeRecord {
        phase: end.phase,
        reason: end.reason,
    };
    state.duration = Some(end.duration);
    if end.downtime.is_some() {
        state.downtime = end.downtime;
    }
}

fn pending_state() -> NodeState {
    NodeState {
        record: NodeRecord {
            phase: NodePhase::Pending,
            reason: None,
        },
        duration: None,
        downtime: None,
    }
}
