//! Engine tests with in-memory fakes: step order, failure budget, drains, interrupts, and resume after a
//! simulated crash at every journal write.

use super::*;
use patchd_package::digest::TreeDigest;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

const PATCH: &str = "p-1";

/// The package every fake rollout patches with.
fn package_digest() -> TreeDigest {
    "d1".repeat(32).parse().unwrap()
}

/// What a fake node does when its turn comes.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    stage_error: bool,
    /// Staging waits for this before answering.
    stage_gate: Option<Arc<Notify>>,
    already_running: bool,
    drain_timeout: bool,
    /// `wait_offline` never returns (until Ctrl-C).
    drain_hangs: bool,
    apply_outcome: Option<ApplyOutcome>,
    apply_not_sent: bool,
    /// The agent is unreachable for this many Apply calls, then reachable.
    apply_not_sent_times: u32,
    /// Apply answers are lost this many times before one arrives.
    apply_lost: u32,
    /// Apply waits for this before answering.
    apply_gate: Option<Arc<Notify>>,
    /// The cluster's `health` check fails while the node runs the patch (it passes once undone).
    health_fails: bool,
    online_fails: bool,
    /// Another rollout holds the node's lease (the agent's description of it).
    leased_by: Option<String>,
    /// The agent does not answer the lease call.
    lease_unanswered: bool,
}

/// The agents and the cluster: they outlive a controller crash.
#[derive(Default)]
struct World {
    log: Mutex<Vec<String>>,
    offline: Mutex<HashSet<String>>,
    applied: Mutex<HashMap<(String, String), NodeApplyResult>>,
    restarts: Mutex<BTreeMap<String, u32>>,
    lost_so_far: Mutex<HashMap<String, u32>>,
    not_sent_so_far: Mutex<HashMap<String, u32>>,
    /// Nodes whose patch the agent undid (the old version runs again).
    undone: Mutex<HashSet<String>>,
    undo_calls: Mutex<Vec<String>>,
    violations: Mutex<Vec<String>>,
    in_turn: Mutex<HashSet<String>>,
    max_in_turn: AtomicUsize,
    apply_calls: Mutex<Vec<ApplyCall>>,
    /// Nodes whose lease this rollout took, in order, and how often its leases were released.
    leased: Mutex<Vec<String>>,
    releases: AtomicUsize,
}

impl World {
    fn log(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }
    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn lines_of(&self, node: &str) -> Vec<String> {
        let prefix = format!("{node}:");
        self.lines()
            .into_iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
    fn restarts(&self, node: &str) -> u32 {
        self.restarts
            .lock()
            .unwrap()
            .get(node)
            .copied()
            .unwrap_or(0)
    }
}

struct FakeEffects {
    world: Arc<World>,
    behaviour: HashMap<String, Behaviour>,
    crashed: Arc<AtomicBool>,
    /// This run (this controller) performed an effect on a node: no lease may be taken after that.
    acted: AtomicBool,
}

impl FakeEffects {
    fn new(world: Arc<World>, behaviour: HashMap<String, Behaviour>) -> Self {
        Self {
            world,
            behaviour,
            crashed: Arc::new(AtomicBool::new(false)),
            acted: AtomicBool::new(false),
        }
    }
    fn of(&self, node: &NodeRef) -> Behaviour {
        self.behaviour.get(&node.id).cloned().unwrap_or_default()
    }
    /// A dead controller performs no more effects.
    async fn alive(&self) {
        if self.crashed.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

impl RolloutEffects for FakeEffects {
    async fn stage(&self, node: &NodeRef) -> Result<StageReport, CallError> {
        self.alive().await;
        self.acted.store(true, Ordering::SeqCst);
        self.world.log(format!("{}:stage", node.id));
        let behaviour = self.of(node);
        if let Some(gate) = &behaviour.stage_gate {
            gate.notified().await;
        }
        if behaviour.stage_error {
            return Err(CallError::NotSent("connection refused".into()));
        }
        Ok(StageReport {
            already_running: behaviour.already_running,
            bytes_pushed: 10,
        })
    }

    async fn hook(&self, node: &NodeRef, hook: HookKind) -> Result<HookOutcome, HookFailure> {
        self.alive().await;
        self.acted.store(true, Ordering::SeqCst);
        let behaviour = self.of(node);
        self.world.log(format!("{}:{}", node.id, hook.step()));
        match hook {
            HookKind::Offline => {
                self.world.offline.lock().unwrap().insert(node.id.clone());
                let mut in_turn = self.world.in_turn.lock().unwrap();
                in_turn.insert(node.id.clone());
                self.world
                    .max_in_turn
                    .fetch_max(in_turn.len(), Ordering::SeqCst);
                Ok(HookOutcome::Done)
            }
            HookKind::WaitOffline if behaviour.drain_hangs => std::future::pending().await,
            HookKind::WaitOffline if behaviour.drain_timeout => Err(HookFailure::Timeout {
                waited: Duration::from_secs(10),
                last: "state=Online".into(),
            }),
            HookKind::WaitOffline => Ok(HookOutcome::Done),
            HookKind::Health
                if behaviour.health_fails
                    && !self.world.undone.lock().unwrap().contains(&node.id) =>
            {
                Err(HookFailure::Failed("HTTP 503".into()))
            }
            HookKind::Health => Ok(HookOutcome::NotConfigured),
            HookKind::Online if behaviour.online_fails => {
                Err(HookFailure::Failed("HTTP 500".into()))
            }
            HookKind::Online => {
                self.world.offline.lock().unwrap().remove(&node.id);
                self.world.in_turn.lock().unwrap().remove(&node.id);
                Ok(HookOutcome::Done)
            }
            HookKind::WaitOnline => Ok(HookOutcome::Done),
        }
    }

    async fn apply(&self, node: &NodeRef, call: &ApplyCall) -> Result<NodeApplyResult, CallError> {
        self.alive().await;
        self.acted.store(true, Ordering::SeqCst);
        let behaviour = self.of(node);
        self.world.log(format!("{}:apply", node.id));
        self.world.apply_calls.lock().unwrap().push(call.clone());
        // A restart takes time: let the other nodes of the batch run meanwhile.
        tokio::task::yield_now().await;
        if behaviour.apply_not_sent {
            return Err(CallError::NotSent("connection refused".into()));
        }
        {
            let mut not_sent = self.world.not_sent_so_far.lock().unwrap();
            let count = not_sent.entry(node.id.clone()).or_default();
            if *count < behaviour.apply_not_sent_times {
                *count += 1;
                return Err(CallError::NotSent("connection refused".into()));
            }
        }
        if call.action.uses_hooks() && !self.world.offline.lock().unwrap().contains(&node.id) {
            self.world
                .violations
                .lock()
                .unwrap()
                .push(format!("{} applied while in service", node.id));
        }
        let key = (node.id.clone(), call.patch_id.clone());
        let recorded = self.world.applied.lock().unwrap().get(&key).cloned();
        let result = match recorded {
            Some(mut earlier) => {
                earlier.replayed = true;
                earlier
            }
            None => {
                *self
                    .world
                    .restarts
                    .lock()
                    .unwrap()
                    .entry(node.id.clone())
                    .or_default() += 1;
                let outcome = behaviour.apply_outcome.unwrap_or(match &call.action {
                    Action::Patch { offline: true, .. } => ApplyOutcome::OfflineSwapped,
                    _ => ApplyOutcome::Committed,
                });
                let result = NodeApplyResult {
                    outcome,
                    reason: if outcome == ApplyOutcome::Reverted {
                        "health probe failed".into()
                    } else {
                        String::new()
                    },
                    replayed: false,
                    downtime: Duration::from_millis(5),
                };
                self.world
                    .applied
                    .lock()
                    .unwrap()
                    .insert(key, result.clone());
                result
            }
        };
        if let Some(gate) = behaviour.apply_gate {
            gate.notified().await;
        }
        let mut lost = self.world.lost_so_far.lock().unwrap();
        let count = lost.entry(node.id.clone()).or_default();
        if *count < behaviour.apply_lost {
            *count += 1;
            return Err(CallError::Unknown("stream reset".into()));
        }
        Ok(result)
    }

    async fn undo(&self, node: &NodeRef, patch_id: &str) -> Result<NodeApplyResult, CallError> {
        self.alive().await;
        self.acted.store(true, Ordering::SeqCst);
        self.world.log(format!("{}:undo", node.id));
        self.world
            .undo_calls
            .lock()
            .unwrap()
            .push(format!("{patch_id}-undo"));
        // Idempotent per operation id, like the agent: a second call replays the first one's result.
        let replayed = !self.world.undone.lock().unwrap().insert(node.id.clone());
        Ok(NodeApplyResult {
            outcome: ApplyOutcome::Committed,
            reason: String::new(),
            replayed,
            downtime: Duration::from_millis(5),
        })
    }

    async fn sleep(&self, _duration: Duration) {
        self.alive().await;
        tokio::task::yield_now().await;
    }

    async fn lease(&self, node: &NodeRef) -> Result<(), LeaseFailure> {
        self.alive().await;
        let behaviour = self.of(node);
        if let Some(holder) = behaviour.leased_by {
            return Err(LeaseFailure::Held(holder));
        }
        if behaviour.lease_unanswered {
            return Err(LeaseFailure::Unanswered("connection refused".into()));
        }
        if self.acted.load(Ordering::SeqCst) {
            self.world
                .violations
                .lock()
                .unwrap()
                .push(format!("{} leased after the first effect", node.id));
        }
        self.world.leased.lock().unwrap().push(node.id.clone());
        Ok(())
    }

    async fn release_leases(&self) {
        self.world.releases.fetch_add(1, Ordering::SeqCst);
    }
}

/// The journal: what survives a crash is `persisted`; writes at and after `crash_at` are lost.
#[derive(Default)]
struct FakeJournal {
    persisted: Mutex<HashMap<String, NodeRecord>>,
    marks: Mutex<Vec<String>>,
    steps: Mutex<Vec<String>>,
    writes: AtomicUsize,
    crash_at: Option<usize>,
    crashed: Arc<AtomicBool>,
    crash_signal: Arc<Notify>,
}

impl FakeJournal {
    fn crashing_at(write: usize, crashed: Arc<AtomicBool>) -> Self {
        Self {
            crash_at: Some(write),
            crashed,
            ..Default::default()
        }
    }
    fn resumed_from(records: HashMap<String, NodeRecord>, marks: Vec<String>) -> Self {
        Self {
            persisted: Mutex::new(records),
            marks: Mutex::new(marks),
            ..Default::default()
        }
    }
    /// Counts a write; false when the process is (now) dead and nothing may be persisted.
    fn write(&self) -> bool {
        let index = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.crashed.load(Ordering::SeqCst) {
            return false;
        }
        if Some(index) == self.crash_at {
            self.crashed.store(true, Ordering::SeqCst);
            self.crash_signal.notify_one();
            return false;
        }
        true
    }
    fn phase(&self, node: &str) -> Option<NodePhase> {
        self.persisted.lock().unwrap().get(node).map(|r| r.phase)
    }
}

impl RolloutJournal for FakeJournal {
    fn node_phase(
        &self,
        node: &NodeRef,
        phase: &NodePhase,
        reason: Option<&str>,
    ) -> Result<(), RolloutJournalError> {
        if self.write() {
            self.persisted.lock().unwrap().insert(
                node.id.clone(),
                NodeRecord {
                    phase: *phase,
                    reason: reason.map(str::to_string),
                },
            );
        }
        Ok(())
    }
    fn step(
        &self,
        node: &NodeRef,
        step: Step,
        status: StepStatus,
        _detail: &str,
    ) -> Result<(), RolloutJournalError> {
        if self.write() {
            self.steps
                .lock()
                .unwrap()
                .push(format!("{}:{step}:{status}", node.id));
        }
        Ok(())
    }
    fn mark(&self, node: &NodeRef) -> Result<(), RolloutJournalError> {
        if self.write() {
            self.marks.lock().unwrap().push(node.id.clone());
        }
        Ok(())
    }
}

#[derive(Default)]
struct FakeObserver {
    events: Mutex<Vec<Event>>,
    decision: Option<PauseDecision>,
    pauses: AtomicUsize,
}

impl Observer for FakeObserver {
    fn event(&self, event: &Event) {
        self.events.lock().unwrap().push(event.clone());
    }
    async fn pause(&self, _batch: &BatchSpec) -> PauseDecision {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        self.decision.unwrap_or(PauseDecision::Continue)
    }
}

fn node(id: &str) -> NodeRef {
    NodeRef {
        id: id.into(),
        name: format!("name-{id}"),
        role: "worker".into(),
    }
}

/// Batches given as lists of node ids.
fn spec(batches: &[&[&str]], budget: u32) -> RolloutSpec {
    RolloutSpec {
        patch_id: PATCH.into(),
        action: Action::Patch {
            digest: package_digest(),
            offline: false,
        },
        batches: batches
            .iter()
            .enumerate()
            .map(|(index, ids)| BatchSpec {
                index,
                role: "worker".into(),
                canary: false,
                pause_after: false,
                nodes: ids.iter().map(|id| node(id)).collect(),
            })
            .collect(),
        failure_budget: budget,
        stage_concurrency: 4,
        staging: StagingMode::Upfront,
        apply_retry: ApplyRetryPolicy {
            retries: 3,
            delay: Duration::from_millis(1),
        },
        prior: HashMap::new(),
    }
}

fn behaviours(list: &[(&str, Behaviour)]) -> HashMap<String, Behaviour> {
    list.iter()
        .map(|(id, b)| (id.to_string(), b.clone()))
        .collect()
}

async fn run(spec: &RolloutSpec, effects: &FakeEffects, journal: &FakeJournal) -> RolloutReport {
    let observer = FakeObserver::default();
    let (_handle, cancel) = Cancel::new();
    RolloutEngine::new(spec, effects, journal, &observer, cancel)
        .run()
        .await
        .unwrap()
}

fn phases(report: &RolloutReport) -> Vec<(String, NodePhase)> {
    report
        .nodes
        .iter()
        .map(|n| (n.node.id.clone(), n.phase))
        .collect()
}

#[tokio::test]
async fn every_node_goes_through_the_steps_in_order() {
    let world = Arc::new(World::default());
    let effects = FakeEffects::new(world.clone(), HashMap::new());
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b", "c"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert!(
        report.nodes.iter().all(|n| n.phase == NodePhase::Done),
        "{report:?}"
    );
    for id in ["a", "b", "c"] {
        assert_eq!(
            world.lines_of(id),
            [
                "stage",
                "offline",
                "wait_offline",
                "apply",
                "health",
                "online",
                "wait_online"
            ],
            "steps of {id}"
        );
        assert_eq!(world.restarts(id), 1);
        assert_eq!(journal.phase(id), Some(NodePhase::Done));
    }
    // Staging of every node happens before the first node is taken offline.
    let lines = world.lines();
    let first_offline = lines.iter().position(|l| l.ends_with(":offline")).unwrap();
    assert_eq!(
        lines[..first_offline]
            .iter()
            .filter(|l| l.ends_with(":stage"))
            .count(),
        3
    );
    // Budget 0: one node at a time, even in a batch of two.
    assert_eq!(world.max_in_turn.load(Ordering::SeqCst), 1);
    assert!(world.violations.lock().unwrap().is_empty());
    assert_eq!(*journal.marks.lock().unwrap(), ["a", "b", "c"]);
    let steps = journal.steps.lock().unwrap();
    let a_apply = steps.iter().position(|s| s == "a:apply:started").unwrap();
    assert_eq!(steps[a_apply + 1], "a:apply:done");
    assert!(steps.contains(&"a:health:skipped".to_string()));
}

#[tokio::test]
async fn leases_are_taken_before_any_effect_and_released_at_the_end() {
    let world = Arc::new(World::default());
    let unreachable = Behaviour {
        lease_unanswered: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("c", unreachable)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a", "b"], &["c"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    let mut leased = world.leased.lock().unwrap().clone();
    leased.sort();
    assert_eq!(
        leased,
        ["a", "b"],
        "c's agent did not answer the lease call"
    );
    assert_eq!(world.releases.load(Ordering::SeqCst), 1);
    assert!(world.violations.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_node_leased_by_another_rollout_refuses_the_rollout_before_anything_changes() {
    let world = Arc::new(World::default());
    let held = Behaviour {
        leased_by: Some("rollout `p-other` of controller `ops-b` (store s-b), until …".into()),
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("b", held)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b", "c"]], 3), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Refused);
    assert_eq!(report.failures, 0);
    assert_eq!(
        *world.leased.lock().unwrap(),
        ["a"],
        "leases are taken in id order and the first refusal stops the rest"
    );
    assert!(
        world.lines().is_empty(),
        "nothing staged, drained or applied: {:?}",
        world.lines()
    );
    assert_eq!(
        world.releases.load(Ordering::SeqCst),
        1,
        "the leases taken are given back"
    );
    let b = report.nodes.iter().find(|n| n.node.id == "b").unwrap();
    assert_eq!(b.phase, NodePhase::Pending);
    assert!(
        b.reason.as_deref().unwrap().contains("rollout `p-other`"),
        "{b:?}"
    );
    let journaled = journal.persisted.lock().unwrap().get("b").cloned().unwrap();
    assert!(journaled.reason.unwrap().contains("controller `ops-b`"));
    let a = report.nodes.iter().find(|n| n.node.id == "a").unwrap();
    assert_eq!((a.phase, a.reason.clone()), (NodePhase::Pending, None));
}

#[tokio::test]
async fn a_resume_leases_only_the_nodes_it_has_left() {
    let world = Arc::new(World::default());
    let effects = FakeEffects::new(world.clone(), HashMap::new());
    let mut resumed = spec(&[&["a", "b"]], 0);
    resumed.prior.insert(
        "a".into(),
        NodeRecord {
            phase: NodePhase::Done,
            reason: None,
        },
    );
    let journal = FakeJournal::resumed_from(resumed.prior.clone(), vec!["a".into()]);
    let report = run(&resumed, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(*world.leased.lock().unwrap(), ["b"]);
    assert_eq!(world.releases.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_batch_runs_in_parallel_within_the_budget() {
    let world = Arc::new(World::default());
    let effects = FakeEffects::new(world.clone(), HashMap::new());
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a", "b", "c", "d"]], 3), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(world.max_in_turn.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_reverted_node_counts_against_the_budget_and_the_rollout_halts() {
    let world = Arc::new(World::default());
    let revert = Behaviour {
        apply_outcome: Some(ApplyOutcome::Reverted),
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", revert)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b"], &["c"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Halted);
    assert_eq!(report.failures, 1);
    assert_eq!(
        phases(&report),
        [
            ("a".into(), NodePhase::Reverted),
            ("b".into(), NodePhase::Staged),
            ("c".into(), NodePhase::Staged)
        ]
    );
    // The reverted node went back online; nothing else was touched.
    assert_eq!(
        world.lines_of("a"),
        [
            "stage",
            "offline",
            "wait_offline",
            "apply",
            "online",
            "wait_online"
        ]
    );
    assert_eq!(world.lines_of("b"), ["stage"]);
    assert!(world.offline.lock().unwrap().is_empty());
    assert!(
        report.nodes[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("health probe failed")
    );
    assert!(journal.marks.lock().unwrap().is_empty());
}

/// Whatever fails, never more than budget + 1 nodes end failed and never more than that are in their turn at once.
#[tokio::test]
async fn the_failure_budget_is_never_overshot() {
    let ids: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    for budget in 0..4u32 {
        for failing_mask in [0b1111_1111u32, 0b0101_0101, 0b1000_0001, 0b0000_0110] {
            let world = Arc::new(World::default());
            let list: Vec<(&str, Behaviour)> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| failing_mask & (1 << i) != 0)
                .map(|(_, id)| {
                    (
                        id.as_str(),
                        Behaviour {
                            apply_outcome: Some(ApplyOutcome::Reverted),
                            ..Default::default()
                        },
                    )
                })
                .collect();
            let effects = FakeEffects::new(world.clone(), behaviours(&list));
            let journal = FakeJournal::default();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let report = run(&spec(&[&refs[..5], &refs[5..]], budget), &effects, &journal).await;
            let failed = report.nodes.iter().filter(|n| n.phase.is_failure()).count() as u32;
            assert!(
                failed <= budget + 1,
                "budget {budget}, mask {failing_mask:b}: {failed} failed"
            );
            assert_eq!(failed, report.failures);
            assert!(world.max_in_turn.load(Ordering::SeqCst) as u32 <= budget + 1);
            let expected_failures = failing_mask.count_ones();
            if expected_failures > budget {
                assert_eq!(
                    report.end,
                    RolloutEnd::Halted,
                    "budget {budget}, mask {failing_mask:b}"
                );
                assert_eq!(failed, budget + 1);
            } else {
                assert_ne!(report.end, RolloutEnd::Halted);
            }
        }
    }
}

#[tokio::test]
async fn a_drain_timeout_leaves_the_node_unrestarted_and_back_online() {
    let world = Arc::new(World::default());
    let slow = Behaviour {
        drain_timeout: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", slow)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b"]], 1), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::CompletedWithFailures);
    assert_eq!(report.nodes[0].phase, NodePhase::Failed);
    assert!(
        report.nodes[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("drain timed out")
    );
    assert_eq!(
        world.lines_of("a"),
        ["stage", "offline", "wait_offline", "online", "wait_online"]
    );
    assert_eq!(world.restarts("a"), 0);
    assert_eq!(report.nodes[1].phase, NodePhase::Done);
    assert!(world.offline.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_agent_fails_the_node_without_restarting_it() {
    let world = Arc::new(World::default());
    let dead = Behaviour {
        apply_not_sent: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("b", dead)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b"], &["c"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Halted);
    assert_eq!(report.nodes[1].phase, NodePhase::Failed);
    assert!(
        report.nodes[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("unreachable")
    );
    assert_eq!(
        world.lines_of("b"),
        [
            "stage",
            "offline",
            "wait_offline",
            "apply",
            "online",
            "wait_online"
        ]
    );
    assert_eq!(world.lines_of("c"), ["stage"]);
    assert!(world.offline.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_lost_apply_answer_is_asked_again_with_the_same_patch_id() {
    let world = Arc::new(World::default());
    let flaky = Behaviour {
        apply_lost: 2,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", flaky)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(world.restarts("a"), 1);
    let calls = world.apply_calls.lock().unwrap();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.patch_id == PATCH));
}

#[tokio::test]
async fn an_apply_that_never_answers_holds_the_rollout_unfinished_until_a_resume_settles_it() {
    let world = Arc::new(World::default());
    // Four answers lost: every attempt of the first run (1 + 3 retries); the resume gets the answer.
    let lost = Behaviour {
        apply_lost: 4,
        ..Default::default()
    };
    let behaviour = behaviours(&[("a", lost)]);
    let rollout = spec(&[&["a"], &["b"]], 0);
    let effects = FakeEffects::new(world.clone(), behaviour.clone());
    let journal = FakeJournal::default();
    let report = run(&rollout, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Interrupted, "{report:?}");
    assert_eq!(report.nodes[0].phase, NodePhase::ApplyUnknown);
    assert!(!NodePhase::ApplyUnknown.is_terminal());
    let reason = report.nodes[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("left out of") && reason.contains("patchctl patch --resume"),
        "{reason}"
    );
    assert_eq!(journal.phase("a"), Some(NodePhase::ApplyUnknown));
    assert!(world.offline.lock().unwrap().contains("a"));
    assert_eq!(world.apply_calls.lock().unwrap().len(), 4);
    assert_eq!(world.lines_of("b"), ["stage"], "nothing else starts");

    let mut resumed = rollout.clone();
    resumed.prior = journal.persisted.lock().unwrap().clone();
    let effects = FakeEffects::new(world.clone(), behaviour);
    let journal = FakeJournal::resumed_from(resumed.prior.clone(), Vec::new());
    let report = run(&resumed, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed, "{report:?}");
    assert_eq!(report.nodes[0].phase, NodePhase::Done);
    assert_eq!(world.restarts("a"), 1, "the agent replayed its result");
    let calls = world.apply_calls.lock().unwrap();
    assert_eq!(calls.len(), 6, "one more for a, one for b");
    assert!(calls.iter().all(|c| c.patch_id == PATCH));
    drop(calls);
    assert!(world.offline.lock().unwrap().is_empty());
    assert_eq!(*journal.marks.lock().unwrap(), ["a", "b"]);
}

/// A crash after `Applying` was journaled: the resumed run cannot tell whether that Apply was delivered.
fn resumed_from_applying(world: &World, delivered: bool) -> RolloutSpec {
    let mut rollout = spec(&[&["a"], &["b"]], 0);
    rollout.prior = HashMap::from([(
        "a".to_string(),
        NodeRecord {
            phase: NodePhase::Applying,
            reason: None,
        },
    )]);
    world.offline.lock().unwrap().insert("a".into());
    if delivered {
        world.restarts.lock().unwrap().insert("a".into(), 1);
        world.applied.lock().unwrap().insert(
            ("a".into(), PATCH.into()),
            NodeApplyResult {
                outcome: ApplyOutcome::Committed,
                reason: String::new(),
                replayed: false,
                downtime: Duration::from_millis(5),
            },
        );
    }
    rollout
}

#[tokio::test]
async fn a_resumed_apply_retries_an_agent_unreachable_once_instead_of_failing_the_node() {
    let world = Arc::new(World::default());
    let rollout = resumed_from_applying(&world, true);
    let flaky = Behaviour {
        apply_not_sent_times: 1,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", flaky)]));
    let journal = FakeJournal::resumed_from(rollout.prior.clone(), Vec::new());
    let report = run(&rollout, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed, "{report:?}");
    assert_eq!(phases(&report)[0], ("a".into(), NodePhase::Done));
    assert_eq!(world.restarts("a"), 1);
    assert_eq!(*journal.marks.lock().unwrap(), ["a", "b"]);
    assert!(world.offline.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_resumed_apply_whose_agent_stays_unreachable_is_held_as_unknown_not_failed() {
    let world = Arc::new(World::default());
    let rollout = resumed_from_applying(&world, true);
    let dead = Behaviour {
        apply_not_sent: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", dead)]));
    let journal = FakeJournal::resumed_from(rollout.prior.clone(), Vec::new());
    let report = run(&rollout, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Interrupted, "{report:?}");
    assert_eq!(report.nodes[0].phase, NodePhase::ApplyUnknown);
    assert_eq!(journal.phase("a"), Some(NodePhase::ApplyUnknown));
    assert!(journal.marks.lock().unwrap().is_empty());
    // Never put back with "not restarted": it may run the new version, and it was not health-checked.
    assert!(!world.lines_of("a").iter().any(|l| l == "online"));
    assert_eq!(world.lines_of("b"), Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_cluster_health_check_rolls_the_node_back() {
    let world = Arc::new(World::default());
    let sick = Behaviour {
        health_fails: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", sick)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"]], 0), &effects, &journal).await;
    assert_eq!(report.nodes[0].phase, NodePhase::Reverted);
    assert_eq!(
        world.lines_of("a"),
        [
            "stage",
            "offline",
            "wait_offline",
            "apply",
            "health",
            "undo",
            "online",
            "wait_online"
        ]
    );
    assert!(journal.marks.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_node_that_cannot_go_back_online_is_reported_left_offline() {
    let world = Arc::new(World::default());
    let stuck = Behaviour {
        online_fails: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", stuck)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"]], 0), &effects, &journal).await;
    assert_eq!(report.nodes[0].phase, NodePhase::LeftOffline);
    let reason = report.nodes[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("patched") && reason.contains("left offline"),
        "{reason}"
    );
    // It does run the new version: marked.
    assert_eq!(*journal.marks.lock().unwrap(), ["a"]);
}

#[tokio::test]
async fn staging_skips_nodes_already_running_the_package() {
    let world = Arc::new(World::default());
    let done = Behaviour {
        already_running: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", done)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(report.nodes[0].phase, NodePhase::Skipped);
    assert_eq!(world.lines_of("a"), ["stage"]);
}

#[tokio::test]
async fn staging_failures_beyond_the_budget_halt_before_any_node_is_touched() {
    let world = Arc::new(World::default());
    let dead = Behaviour {
        stage_error: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("c", dead)]));
    let journal = FakeJournal::default();
    let report = run(&spec(&[&["a"], &["b"], &["c"]], 0), &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Halted);
    assert_eq!(report.nodes[2].phase, NodePhase::Failed);
    assert!(
        world.lines().iter().all(|l| l.ends_with(":stage")),
        "{:?}",
        world.lines()
    );
}

#[tokio::test]
async fn offline_mode_swaps_files_without_hooks() {
    let world = Arc::new(World::default());
    let effects = FakeEffects::new(world.clone(), HashMap::new());
    let journal = FakeJournal::default();
    let mut offline = spec(&[&["a", "b"]], 0);
    offline.action = Action::Patch {
        digest: package_digest(),
        offline: true,
    };
    let report = run(&offline, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(world.lines_of("a"), ["stage", "apply"]);
    assert_eq!(*journal.marks.lock().unwrap(), ["a", "b"]);
}

/// Waits (polling the fake world, at most 5 s) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn staging_ahead_runs_a_batch_while_later_nodes_are_still_staging() {
    let world = Arc::new(World::default());
    let gate = Arc::new(Notify::new());
    let slow = Behaviour {
        stage_gate: Some(gate.clone()),
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("b", slow)]));
    let journal = FakeJournal::default();
    let mut ahead = spec(&[&["a"], &["b"]], 0);
    ahead.staging = StagingMode::Ahead;
    let (report, ()) = tokio::join!(run(&ahead, &effects, &journal), async {
        until("a is patched", || {
            journal.marks.lock().unwrap().contains(&"a".to_string())
        })
        .await;
        // a went through its whole turn while b's staging was still in flight: b is untouched so far.
        assert_eq!(world.lines_of("b"), ["stage"]);
        gate.notify_one();
    });
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(*journal.marks.lock().unwrap(), ["a", "b"]);
    // Every node was staged before its own first live step.
    for id in ["a", "b"] {
        assert_eq!(
            world.lines_of(id).first().map(String::as_str),
            Some("stage"),
            "{id}"
        );
    }
}

#[tokio::test]
async fn staging_ahead_a_later_node_that_cannot_stage_is_untouched_and_halts_the_rollout() {
    let world = Arc::new(World::default());
    let gate = Arc::new(Notify::new());
    let broken = Behaviour {
        stage_gate: Some(gate.clone()),
        stage_error: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("c", broken)]));
    let journal = FakeJournal::default();
    let mut ahead = spec(&[&["a"], &["b"], &["c"], &["d"]], 0);
    ahead.staging = StagingMode::Ahead;
    let (report, ()) = tokio::join!(run(&ahead, &effects, &journal), async {
        until("a and b are patched", || {
            journal.marks.lock().unwrap().len() == 2
        })
        .await;
        gate.notify_one();
    });
    assert_eq!(report.end, RolloutEnd::Halted);
    assert_eq!(
        phases(&report),
        [
            ("a".to_string(), NodePhase::Done),
            ("b".to_string(), NodePhase::Done),
            ("c".to_string(), NodePhase::Failed),
            ("d".to_string(), NodePhase::Staged),
        ]
    );
    assert_eq!(world.lines_of("c"), ["stage"], "c was never touched");
    assert_eq!(world.lines_of("d"), ["stage"], "d was never touched");
    assert_eq!(report.failures, 1);
}

#[tokio::test]
async fn staging_upfront_touches_nothing_until_every_node_is_staged() {
    let world = Arc::new(World::default());
    let gate = Arc::new(Notify::new());
    let slow = Behaviour {
        stage_gate: Some(gate.clone()),
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("b", slow)]));
    let journal = FakeJournal::default();
    let upfront = spec(&[&["a"], &["b"]], 0);
    let (report, ()) = tokio::join!(run(&upfront, &effects, &journal), async {
        until("both nodes are staging", || world.lines().len() == 2).await;
        // Give the engine every chance to start a's turn early; it must not.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(world.lines_of("a"), ["stage"]);
        gate.notify_one();
    });
    assert_eq!(report.end, RolloutEnd::Completed);
    let lines = world.lines();
    let last_stage = lines.iter().rposition(|l| l.ends_with(":stage")).unwrap();
    let first_live = lines.iter().position(|l| !l.ends_with(":stage")).unwrap();
    assert!(last_stage < first_live, "{lines:?}");
}

#[tokio::test]
async fn staging_ahead_still_pauses_after_the_canary_when_a_later_node_failed_to_stage() {
    let world = Arc::new(World::default());
    let broken = Behaviour {
        stage_error: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("c", broken)]));
    let journal = FakeJournal::default();
    let mut canary = spec(&[&["a"], &["b"], &["c"]], 1);
    canary.staging = StagingMode::Ahead;
    canary.batches[0].canary = true;
    canary.batches[0].pause_after = true;
    let observer = FakeObserver {
        decision: Some(PauseDecision::Stop),
        ..Default::default()
    };
    let (_handle, cancel) = Cancel::new();
    let report = RolloutEngine::new(&canary, &effects, &journal, &observer, cancel)
        .run()
        .await
        .unwrap();
    // c's staging failure (within the budget) does not count as a later node started: the operator is asked.
    assert_eq!(observer.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(report.end, RolloutEnd::Stopped);
    assert_eq!(world.restarts("b"), 0);
    assert_eq!(world.lines_of("c"), ["stage"]);
}

#[tokio::test]
async fn a_resumed_rollout_already_past_its_budget_stages_and_starts_nothing() {
    for staging in [StagingMode::Upfront, StagingMode::Ahead] {
        let world = Arc::new(World::default());
        let effects = FakeEffects::new(world.clone(), HashMap::new());
        let journal = FakeJournal::default();
        let mut resumed = spec(&[&["a"], &["b"], &["c"]], 0);
        resumed.staging = staging;
        resumed.prior.insert(
            "a".into(),
            NodeRecord {
                phase: NodePhase::Reverted,
                reason: Some("the new version crashed".into()),
            },
        );
        let report = run(&resumed, &effects, &journal).await;
        assert_eq!(report.end, RolloutEnd::Halted, "{staging:?}");
        assert!(world.lines().is_empty(), "{staging:?}: {:?}", world.lines());
    }
}

#[tokio::test]
async fn a_rollback_sends_rollback_calls_without_staging() {
    let world = Arc::new(World::default());
    let effects = FakeEffects::new(world.clone(), HashMap::new());
    let journal = FakeJournal::default();
    let mut rollback = spec(&[&["a"]], 0);
    rollback.action = Action::Rollback {
        to_patch_id: Some("p-0".into()),
    };
    let report = run(&rollback, &effects, &journal).await;
    assert_eq!(report.end, RolloutEnd::Completed);
    assert_eq!(
        world.lines_of("a"),
        [
            "offline",
            "wait_offline",
            "apply",
            "health",
            "online",
            "wait_online"
        ]
    );
    assert_eq!(
        world.apply_calls.lock().unwrap()[0].action,
        Action::Rollback {
            to_patch_id: Some("p-0".into())
        }
    );
}

#[tokio::test]
async fn the_canary_pause_can_stop_the_rollout() {
    for (decision, end, staging) in [
        (
            PauseDecision::Stop,
            RolloutEnd::Stopped,
            StagingMode::Upfront,
        ),
        (
            PauseDecision::Continue,
            RolloutEnd::Completed,
            StagingMode::Upfront,
        ),
        (PauseDecision::Stop, RolloutEnd::Stopped, StagingMode::Ahead),
        (
            PauseDecision::Continue,
            RolloutEnd::Completed,
            StagingMode::Ahead,
        ),
    ] {
        let world = Arc::new(World::default());
        let effects = FakeEffects::new(world.clone(), HashMap::new());
        let journal = FakeJournal::default();
        let mut canary = spec(&[&["a"], &["b"]], 0);
        canary.staging = staging;
        canary.batches[0].canary = true;
        canary.batches[0].pause_after = true;
        let observer = FakeObserver {
            decision: Some(decision),
            ..Default::default()
        };
        let (_handle, cancel) = Cancel::new();
        let report = RolloutEngine::new(&canary, &effects, &journal, &observer, cancel)
            .run()
            .await
            .unwrap();
        assert_eq!(report.end, end, "{staging:?}");
        assert_eq!(observer.pauses.load(Ordering::SeqCst), 1, "{staging:?}");
        assert_eq!(
            world.restarts("b"),
            u32::from(decision == PauseDecision::Continue),
            "{staging:?}"
        );
    }
}

#[tokio::test]
async fn ctrl_c_during_a_drain_puts_the_node_back_and_starts_nothing_else() {
    for staging in [StagingMode::Upfront, StagingMode::Ahead] {
        ctrl_c_during_a_drain_when(staging).await;
    }
}

async fn ctrl_c_during_a_drain_when(staging: StagingMode) {
    let world = Arc::new(World::default());
    let hanging = Behaviour {
        drain_hangs: true,
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", hanging)]));
    let journal = FakeJournal::default();
    let observer = FakeObserver::default();
    let (handle, cancel) = Cancel::new();
    let mut rollout = spec(&[&["a"], &["b"]], 0);
    rollout.staging = staging;
    let engine = RolloutEngine::new(&rollout, &effects, &journal, &observer, cancel);
    let world_watch = world.clone();
    let interrupter = async move {
        while !world_watch.lines().iter().any(|l| l == "a:wait_offline") {
            tokio::task::yield_now().await;
        }
        handle.cancel();
        std::future::pending::<()>().await
    };
    let report = tokio::select! { report = engine.run() => report.unwrap(), () = interrupter => unreachable!() };
    assert_eq!(report.end, RolloutEnd::Interrupted, "{staging:?}");
    assert_eq!(report.nodes[0].phase, NodePhase::Pending, "{staging:?}");
    assert_eq!(
        world.lines_of("a"),
        ["stage", "offline", "wait_offline", "online", "wait_online"],
        "{staging:?}"
    );
    assert_eq!(world.lines_of("b"), ["stage"], "{staging:?}");
    assert!(world.offline.lock().unwrap().is_empty());
    assert_eq!(journal.phase("a"), Some(NodePhase::Pending));
}

#[tokio::test]
async fn ctrl_c_during_an_apply_finishes_that_node() {
    for staging in [StagingMode::Upfront, StagingMode::Ahead] {
        ctrl_c_during_an_apply_when(staging).await;
    }
}

async fn ctrl_c_during_an_apply_when(staging: StagingMode) {
    let world = Arc::new(World::default());
    let gate = Arc::new(Notify::new());
    let slow = Behaviour {
        apply_gate: Some(gate.clone()),
        ..Default::default()
    };
    let effects = FakeEffects::new(world.clone(), behaviours(&[("a", slow)]));
    let journal = FakeJournal::default();
    let observer = FakeObserver::default();
    let (handle, cancel) = Cancel::new();
    let mut rollout = spec(&[&["a"], &["b"]], 0);
    rollout.staging = staging;
    let engine = RolloutEngine::new(&rollout, &effects, &journal, &observer, cancel);
    let world_watch = world.clone();
    let interrupter = async move {
        while !world_watch.lines().iter().any(|l| l == "a:apply") {
            tokio::task::yield_now().await;
        }
        handle.cancel();
        gate.notify_one();
        std::future::pending::<()>().await
    };
    let report = tokio::select! { report = engine.run() => report.unwrap(), () = interrupter => unreachable!() };
    assert_eq!(report.end, RolloutEnd::Interrupted, "{staging:?}");
    assert_eq!(report.nodes[0].phase, NodePhase::Done, "{staging:?}");
    assert_eq!(report.nodes[1].phase, NodePhase::Staged, "{staging:?}");
    assert_eq!(world.lines_of("b"), ["stage"], "{staging:?}");
}

/// Runs `rollout` with a crash at journal write `crash_at`; returns whether the crash happened, with the journal.
async fn run_until_crash(
    rollout: &RolloutSpec,
    world: &Arc<World>,
    behaviour: &HashMap<String, Behaviour>,
    crash_at: usize,
) -> (bool, FakeJournal) {
    let crashed = Arc::new(AtomicBool::new(false));
    let mut effects = FakeEffects::new(world.clone(), behaviour.clone());
    effects.crashed = crashed.clone();
    let journal = FakeJournal::crashing_at(crash_at, crashed.clone());
    let observer = FakeObserver::default();
    let (_handle, cancel) = Cancel::new();
    let signal = journal.crash_signal.clone();
    let engine = RolloutEngine::new(rollout, &effects, &journal, &observer, cancel);
    tokio::select! {
        biased;
        () = signal.notified() => {}
        report = engine.run() => { report.unwrap(); }
    }
    (crashed.load(Ordering::SeqCst), journal)
}

/// SIGKILL at every journal write (before it persisted), then resume: no node is restarted twice, every node ends
/// where a crash-free run would, and no node is left out of service.
#[tokio::test]
async fn resume_after_a_crash_at_any_write_repeats_no_node() {
    for staging in [StagingMode::Upfront, StagingMode::Ahead] {
        resume_after_a_crash_at_any_write_repeats_no_node_when(staging).await;
    }
}

async fn resume_after_a_crash_at_any_write_repeats_no_node_when(staging: StagingMode) {
    let behaviour = behaviours(&[
        (
            "c",
            Behaviour {
                apply_outcome: Some(ApplyOutcome::Reverted),
                ..Default::default()
            },
        ),
        (
            "e",
            Behaviour {
                health_fails: true,
                ..Default::default()
            },
        ),
    ]);
    let mut rollout = spec(&[&["a", "b"], &["c"], &["d"], &["e"]], 2);
    rollout.staging = staging;
    let mut crash_at = 1;
    loop {
        let world = Arc::new(World::default());
        let (crashed, journal) = run_until_crash(&rollout, &world, &behaviour, crash_at).await;
        if !crashed {
            break;
        }
        let records = journal.persisted.lock().unwrap().clone();
        let marks = journal.marks.lock().unwrap().clone();
        let mut resumed = rollout.clone();
        resumed.prior = records.clone();
        let effects = FakeEffects::new(world.clone(), behaviour.clone());
        let journal = FakeJournal::resumed_from(records, marks);
        let report = run(&resumed, &effects, &journal).await;
        let context = format!(
            "{staging:?}, crash at write {crash_at}: {report:?}\nlog: {:?}",
            world.lines()
        );
        assert_eq!(
            phases(&report),
            [
                ("a".into(), NodePhase::Done),
                ("b".into(), NodePhase::Done),
                ("c".into(), NodePhase::Reverted),
                ("d".into(), NodePhase::Done),
                ("e".into(), NodePhase::Reverted)
            ],
            "{context}"
        );
        assert!(
            world.undone.lock().unwrap().contains("e"),
            "e runs its old version; {context}"
        );
        assert!(
            world
                .undo_calls
                .lock()
                .unwrap()
                .iter()
                .all(|id| id == &format!("{PATCH}-undo")),
            "{context}"
        );
        for id in ["a", "b", "c", "d", "e"] {
            assert_eq!(world.restarts(id), 1, "{id} restarted once; {context}");
        }
        assert!(world.offline.lock().unwrap().is_empty(), "{context}");
        assert!(world.violations.lock().unwrap().is_empty(), "{context}");
        let mut marks = journal.marks.lock().unwrap().clone();
        marks.sort();
        marks.dedup();
        assert_eq!(marks, ["a", "b", "d"], "{context}");
        crash_at += 1;
    }
    assert!(
        crash_at > 40,
        "the scenario has many journal writes ({crash_at})"
    );
}

#[test]
fn node_phases_round_trip_through_text() {
    for phase in NodePhase::ALL {
        assert_eq!(phase.as_str().parse::<NodePhase>(), Ok(phase));
    }
    assert!("exploded".parse::<NodePhase>().is_err());
}
