//! Machine tests over fake effects and journal: the happy path, rollback scopes, the point of no return, and a
//! crash at every journal write (entry stored or lost) followed by resumes, counting each step's invocations.

use super::*;
use crate::schedule::{NodeRef, schedule};
use std::collections::{BTreeMap, BTreeSet};

const RUNBOOK: &str = r#"
runbook: machine-test
roles: [oms]
params: { refetch_min: 30 }
point_of_no_return: upgrade
steps:
  - id: no-tasks
    scope: cluster
    check: { sql: { database: cm, query: "SELECT 1" }, expect: { no_rows: true } }
  - id: ha-read
    scope: cluster
    http: { url: "http://master/ha", save: "ha = value" }
  - id: ha-off
    scope: cluster
    http: { method: PUT, url: "http://master/ha", body: "off" }
    undo: { http: { method: PUT, url: "http://master/ha", restore: ha } }
  - id: stop
    scope: node
    container: { name: oms, stop: true }
  - id: t1
    scope: node
    mark: T1
  - id: rotate
    scope: node
    sql: { database: cm_hb, statements: ["RENAME TABLE a TO b"] }
    resolve: { sql: { database: cm_hb, query: "SHOW TABLES LIKE 'a'" }, expect: { no_rows: true } }
    undo: { sql: { database: cm_hb, statements: ["RENAME TABLE b TO a"] } }
  - id: dump
    scope: node
    backup: { command: [dump, cm], output: "/backup/{host}.sql" }
  - id: config
    scope: node
    yaml_edit: { file: /data/config.yaml, edits: [ { delete: "oms_meta_*" } ] }
  - id: swap
    scope: node
    container: { name: oms, swap: { env_add: { IS_UPGRADE: "true" } } }
  - id: upgrade
    scope: node
    once: true
    container: { name: oms, exec: [sh, /root/docker_upgrade.sh] }
    undo: none
  - id: ha-on
    scope: cluster
    http: { method: PUT, url: "http://master/ha", restore: ha }
    undo: { http: { method: PUT, url: "http://master/ha", body: "off" } }
  - id: t2
    scope: cluster
    mark: T2
  - id: window
    scope: cluster
    assert: "T2 - T1 < {refetch_min}m"
"#;

fn nodes() -> Vec<NodeRef> {
    (1..=3)
        .map(|n| NodeRef {
            id: format!("n{n}"),
            name: format!("n{n}"),
            host: format!("h{n}"),
            role: "oms".into(),
            deploy_dir: "/data/oms".into(),
            service: "oms".into(),
            batch: n - 1,
        })
        .collect()
}

/// The world: which effects took place, how often each was invoked, which undos ran.
#[derive(Default)]
struct World {
    applied: BTreeSet<StepKey>,
    runs: BTreeMap<StepKey, usize>,
    undos: Vec<StepKey>,
    fail: Option<StepKey>,
    clock: i64,
}

impl UpgradeEffects for World {
    fn run(
        &mut self,
        step: &ScheduledStep,
        action: &Action,
        _: &Values,
    ) -> Result<StepOutput, String> {
        *self.runs.entry(step.key.clone()).or_default() += 1;
        if self.fail.as_ref() == Some(&step.key) {
            return Err("injected failure".into());
        }
        self.applied.insert(step.key.clone());
        let mut output = StepOutput::default();
        if let Action::Http(HttpCall {
            save: Some(save), ..
        }) = action
        {
            output.saved = Some((save.name.clone(), "enable=true".into()));
        }
        if let Action::Backup(_) = action {
            output.backups.push(BackupRecord {
                path: format!("/backup/{}.sql", step.key),
                source: None,
                size: 10,
                sha256: "00".repeat(32),
            });
        }
        Ok(output)
    }

    fn resolve(
        &mut self,
        step: &ScheduledStep,
        _: &Check,
        _: &Values,
    ) -> Result<Resolution, String> {
        Ok(if self.applied.contains(&step.key) {
            Resolution::TookEffect(StepOutput::default())
        } else {
            Resolution::NotTaken
        })
    }

    fn undo(
        &mut self,
        step: &ScheduledStep,
        _: &Action,
        _: Option<&Action>,
        _: &StepOutput,
        _: &Values,
    ) -> Result<(), String> {
        self.undos.push(step.key.clone());
        self.applied.remove(&step.key);
        Ok(())
    }

    fn now(&mut self) -> i64 {
        self.clock += 60;
        self.clock
    }
}

/// A journal that dies at write `crash_at` (counting from 0), storing that entry or not.
struct Journal {
    entries: Vec<Entry>,
    writes: usize,
    crash_at: Option<usize>,
    stored_at_crash: bool,
}

impl Journal {
    fn new(entries: Vec<Entry>) -> Self {
        Self {
            entries,
            writes: 0,
            crash_at: None,
            stored_at_crash: false,
        }
    }
}

impl UpgradeJournal for Journal {
    fn append(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let this = self.writes;
        self.writes += 1;
        if Some(this) == self.crash_at {
            if self.stored_at_crash {
                self.entries.push(entry.clone());
            }
            return Err(JournalError("killed".into()));
        }
        self.entries.push(entry.clone());
        Ok(())
    }
}

fn key(step: &str, node: Option<&str>) -> StepKey {
    StepKey {
        step: step.into(),
        node: node.map(Into::into),
    }
}

/// Resumes until the run ends, answering operator questions from the world as an operator would look.
fn resume_to_end(
    machine: &UpgradeMachine<'_>,
    world: &mut World,
    entries: Vec<Entry>,
) -> (Outcome, Vec<Entry>) {
    let mut journal = Journal::new(entries);
    let mut decisions = Vec::new();
    for _ in 0..10 {
        let history = journal.entries.clone();
        match machine
            .run(&history, &decisions, world, &mut journal)
            .unwrap()
        {
            Outcome::Halted(Halt::NeedsOperator(key)) => decisions.push(Decision {
                took_effect: world.applied.contains(&key),
                key,
            }),
            outcome => return (outcome, journal.entries),
        }
    }
    panic!("the machine kept asking");
}

/// After a complete undo only steps that change nothing (checks, reads, backups) remain in effect.
fn assert_only_read_only_left(runbook: &Runbook, world: &World) {
    for key in &world.applied {
        let step = runbook
            .steps
            .iter()
            .find(|step| step.id == key.step)
            .unwrap();
        assert!(
            !step.changes_something(),
            "{key} is still in effect after the undo"
        );
    }
}

#[test]
fn happy_path_runs_every_step_once_in_order() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let mut world = World::default();
    let mut journal = Journal::new(Vec::new());
    let outcome = machine.run(&[], &[], &mut world, &mut journal).unwrap();
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(journal.entries.len(), 2 * schedule.steps.len());
    // `once` ran on the first node only.
    assert_eq!(world.runs.get(&key("upgrade", Some("n1"))), Some(&1));
    assert!(!world.runs.contains_key(&key("upgrade", Some("n2"))));
    for instance in &schedule.steps {
        let step = &runbook.steps[instance.step_index];
        if !matches!(step.action, Action::Mark(_) | Action::Assert(_)) {
            assert_eq!(world.runs.get(&instance.key), Some(&1), "{}", instance.key);
        }
    }
    // A resume of a finished journal does nothing more.
    let again = machine
        .run(&journal.entries.clone(), &[], &mut world, &mut journal)
        .unwrap();
    assert_eq!(again, Outcome::Completed);
    assert_eq!(journal.entries.len(), 2 * schedule.steps.len());
}

#[test]
fn crash_at_every_journal_write_then_resume_runs_each_step_exactly_once() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let total = 2 * schedule.steps.len();
    for stored in [false, true] {
        for crash_at in 0..total {
            let mut world = World::default();
            let mut journal = Journal::new(Vec::new());
            journal.crash_at = Some(crash_at);
            journal.stored_at_crash = stored;
            assert!(machine.run(&[], &[], &mut world, &mut journal).is_err());
            let (outcome, entries) = resume_to_end(&machine, &mut world, journal.entries);
            assert_eq!(
                outcome,
                Outcome::Completed,
                "crash at {crash_at} (stored {stored})"
            );
            for instance in &schedule.steps {
                let step = &runbook.steps[instance.step_index];
                let runs = world.runs.get(&instance.key).copied().unwrap_or(0);
                let context = format!(
                    "{} after a crash at write {crash_at} (stored {stored})",
                    instance.key
                );
                match step.action {
                    Action::Mark(_) | Action::Assert(_) => {}
                    _ if step.idempotent => {
                        assert!((1..=2).contains(&runs), "{context}: {runs} runs")
                    }
                    _ => assert_eq!(runs, 1, "{context}: a non-idempotent step ran {runs} times"),
                }
                if !matches!(step.action, Action::Mark(_) | Action::Assert(_)) {
                    assert!(world.applied.contains(&instance.key), "{context}: skipped");
                }
                let finished = entries
                    .iter()
                    .filter(|entry| matches!(entry, Entry::Finished { key, result: StepResult::Done(_) } if *key == instance.key))
                    .count();
                assert_eq!(finished, 1, "{context}: recorded done {finished} times");
            }
        }
    }
}

#[test]
fn a_started_dump_without_resolve_asks_the_operator() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let dump = key("dump", Some("n1"));
    let position = schedule.steps.iter().position(|s| s.key == dump).unwrap();
    let mut world = World::default();
    let mut journal = Journal::new(Vec::new());
    journal.crash_at = Some(2 * position + 1);
    assert!(machine.run(&[], &[], &mut world, &mut journal).is_err());
    let history = journal.entries.clone();
    let mut resumed = Journal::new(history.clone());
    let outcome = machine
        .run(&history, &[], &mut world, &mut resumed)
        .unwrap();
    assert_eq!(outcome, Outcome::Halted(Halt::NeedsOperator(dump.clone())));
    assert_eq!(
        resumed.entries.len(),
        history.len(),
        "nothing journaled while asking"
    );
    let decision = Decision {
        key: dump.clone(),
        took_effect: true,
    };
    let outcome = machine
        .run(&history, &[decision], &mut world, &mut resumed)
        .unwrap();
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(world.runs[&dump], 1);
}

#[test]
fn a_failed_node_step_undoes_that_node_then_the_cluster_steps() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    // Node 1's swap fails before `upgrade`, the point of no return, ran anywhere.
    let mut world = World {
        fail: Some(key("swap", Some("n1"))),
        ..World::default()
    };
    let mut journal = Journal::new(Vec::new());
    let outcome = machine.run(&[], &[], &mut world, &mut journal).unwrap();
    assert_eq!(
        outcome,
        Outcome::RolledBack {
            failed: key("swap", Some("n1")),
            message: "injected failure".into()
        }
    );
    // Reverse order; steps without an undo (checks, marks, backups) are skipped.
    assert_eq!(
        world.undos,
        vec![
            key("config", Some("n1")),
            key("rotate", Some("n1")),
            key("stop", Some("n1")),
            key("ha-off", None),
        ]
    );
    // Crash at every write of the rollback, then resume: every undo completes, each step undone once or twice.
    let clean = journal.entries.clone();
    let rollback_start = clean
        .iter()
        .position(|entry| matches!(entry, Entry::RollbackStarted { .. }))
        .unwrap();
    for crash_at in 0..clean.len() - rollback_start {
        let mut world = World {
            fail: Some(key("swap", Some("n1"))),
            ..World::default()
        };
        let mut journal = Journal::new(Vec::new());
        journal.crash_at = Some(rollback_start + crash_at);
        assert!(machine.run(&[], &[], &mut world, &mut journal).is_err());
        let (outcome, _) = resume_to_end(&machine, &mut world, journal.entries);
        assert!(matches!(outcome, Outcome::RolledBack { .. }), "{outcome:?}");
        assert_only_read_only_left(&runbook, &world);
        assert_eq!(world.runs[&key("swap", Some("n1"))], 1);
    }
}

#[test]
fn past_the_point_of_no_return_a_failure_halts_and_full_undo_refuses() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let mut world = World {
        fail: Some(key("swap", Some("n2"))),
        ..World::default()
    };
    let mut journal = Journal::new(Vec::new());
    let outcome = machine.run(&[], &[], &mut world, &mut journal).unwrap();
    assert!(
        matches!(
            outcome,
            Outcome::Halted(Halt::FailedPastPointOfNoReturn { .. })
        ),
        "{outcome:?}"
    );
    assert!(world.undos.is_empty());
    let history = journal.entries.clone();
    let refused = machine
        .full_undo(&history, &mut world, &mut journal)
        .unwrap_err();
    assert_eq!(
        refused,
        UndoRefused::CannotUndo(vec![key("upgrade", Some("n1"))])
    );
}

#[test]
fn full_undo_after_success_undoes_every_node_and_cluster_step_in_reverse() {
    let text = RUNBOOK
        .replace("point_of_no_return: upgrade\n", "")
        .replace(
            "    undo: none\n",
            "    undo: { container: { name: oms, exec: [sh, /root/docker_downgrade.sh] } }\n",
        );
    let runbook = crate::parse(&text).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let mut world = World::default();
    let mut journal = Journal::new(Vec::new());
    assert_eq!(
        machine.run(&[], &[], &mut world, &mut journal).unwrap(),
        Outcome::Completed
    );
    let history = journal.entries.clone();
    assert_eq!(
        machine
            .full_undo(&history, &mut world, &mut journal)
            .unwrap(),
        Outcome::Undone
    );
    assert_eq!(world.undos.first(), Some(&key("ha-on", None)));
    assert_eq!(world.undos.last(), Some(&key("ha-off", None)));
    assert_only_read_only_left(&runbook, &world);
    // Resuming a finished full undo does nothing more.
    let undos = world.undos.len();
    let history = journal.entries.clone();
    assert_eq!(
        machine
            .full_undo(&history, &mut world, &mut journal)
            .unwrap(),
        Outcome::Undone
    );
    assert_eq!(world.undos.len(), undos);
}

#[test]
fn the_window_assertion_reads_marks_and_fails_the_step_when_too_long() {
    let runbook = crate::parse(&RUNBOOK.replace("refetch_min: 30", "refetch_min: 1")).unwrap();
    let schedule = schedule(&runbook, &nodes()[..1]).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let mut world = World::default();
    let mut journal = Journal::new(Vec::new());
    let outcome = machine.run(&[], &[], &mut world, &mut journal).unwrap();
    // Past the point of no return (upgrade ran on n1): the failed assertion halts, naming the values.
    match outcome {
        Outcome::Halted(Halt::FailedPastPointOfNoReturn {
            key: failed,
            message,
        }) => {
            assert_eq!(failed, key("window", None));
            assert!(
                message.contains("T2 - T1 < {refetch_min}m") && message.contains("refetch_min = 1"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn full_undo_refuses_while_a_step_outcome_is_unknown() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    let dump = key("dump", Some("n1"));
    let position = schedule.steps.iter().position(|s| s.key == dump).unwrap();
    let mut world = World::default();
    let mut journal = Journal::new(Vec::new());
    journal.crash_at = Some(2 * position + 1);
    assert!(machine.run(&[], &[], &mut world, &mut journal).is_err());
    let history = journal.entries.clone();
    let mut after = Journal::new(history.clone());
    let refused = machine
        .full_undo(&history, &mut world, &mut after)
        .unwrap_err();
    assert_eq!(refused, UndoRefused::Unresolved(dump));
    assert_eq!(after.entries.len(), history.len());
    assert!(world.undos.is_empty());
}

#[test]
fn what_a_failure_undoes_table() {
    let runbook = crate::parse(RUNBOOK).unwrap();
    let schedule = schedule(&runbook, &nodes()).unwrap();
    let machine = UpgradeMachine::new(&runbook, &schedule);
    // (failing step, undos run in order, or None when the run halts past the point of no return)
    let cases: Vec<(StepKey, Option<Vec<StepKey>>)> = vec![
        // A failed first check: nothing was changed, nothing to undo, nothing else ran.
        (key("no-tasks", None), Some(vec![])),
        (key("ha-off", None), Some(vec![])),
        (key("stop", Some("n1")), Some(vec![key("ha-off", None)])),
        (
            key("rotate", Some("n1")),
            Some(vec![key("stop", Some("n1")), key("ha-off", None)]),
        ),
        (
            key("dump", Some("n1")),
            Some(vec![
                key("rotate", Some("n1")),
                key("stop", Some("n1")),
                key("ha-off", None),
            ]),
        ),
        (key("swap", Some("n2")), None),
        (key("ha-on", None), None),
    ];
    for (failing, expected) in cases {
        let mut world = World {
            fail: Some(failing.clone()),
            ..World::default()
        };
        let mut journal = Journal::new(Vec::new());
        let outcome = machine.run(&[], &[], &mut world, &mut journal).unwrap();
        match expected {
            Some(undos) => {
                assert_eq!(
                    outcome,
                    Outcome::RolledBack {
                        failed: failing.clone(),
                        message: "injected failure".into()
                    }
                );
                assert_eq!(world.undos, undos, "undos after {failing} failed");
                let position = schedule
                    .steps
                    .iter()
                    .position(|s| s.key == failing)
                    .unwrap();
                for later in &schedule.steps[position + 1..] {
                    assert!(
                        !world.runs.contains_key(&later.key),
                        "{} ran after {failing} failed",
                        later.key
                    );
                }
            }
            None => {
                assert!(
                    matches!(
                        outcome,
                        Outcome::Halted(Halt::FailedPastPointOfNoReturn { .. })
                    ),
                    "{failing}: {outcome:?}"
                );
                assert!(world.undos.is_empty());
            }
        }
    }
}
