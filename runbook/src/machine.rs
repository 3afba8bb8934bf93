//! The upgrade step machine: walks a [`Schedule`], journaling each step's start **before** its effect and its
//! result **after**, and decides from any journal prefix what to do next. Pure: hosts, databases, HTTP and the
//! clock are reached through [`UpgradeEffects`], the journal through [`UpgradeJournal`].
//!
//! # Resume rule (no step twice, none skipped)
//!
//! The journal is replayed into one state per step instance: not started, started (a `Started` entry with no
//! result after it), done, or failed. Steps run in schedule order, so at most one instance is *started*. For it:
//!
//! * an **idempotent** step is run again (running it twice equals running it once);
//! * a **non-idempotent** step (a dump, an SQL rename, an `exec`, a `once` step) is never run again blindly:
//!   * with a `resolve:` check, the check is asked whether the step took effect. Yes: its result is recorded
//!     (`resolved`, with what the effects could recover, e.g. a dump's size and sha256) and it is not run again.
//!     No: `Resolved { took_effect: false }` is recorded and the step runs;
//!   * without one, the machine **halts** ([`Halt::NeedsOperator`]) naming the step; the operator looks and
//!     resumes with a [`Decision`] (took effect or not), which is journaled like a resolve answer.
//!
//! `mark` and `assert` are evaluated by the machine (`assert` reads marks, saved values and params from the
//! journal), so they are idempotent; a mark re-taken after a crash mid-step is later by the downtime.
//!
//! # Failure and undo
//!
//! A failed step (check not met, effect error, assertion false) is journaled `Failed`; unless the point of no
//! return was passed, `RollbackStarted` is journaled and the undos of the steps already done run in reverse order:
//! for a node step, that node's done steps, then the cluster steps done before the nodes; for a cluster step after
//! the nodes, the done cluster steps after then before the nodes. Nodes already finished stay upgraded (like a
//! patch rollout); [`UpgradeMachine::full_undo`] (`patchctl rollback --upgrade`) undoes every done step later. A
//! step that fails must leave nothing changed (the container swap and `yaml_edit` restore by themselves), so it is
//! not itself undone. Each undo is journaled `UndoStarted`/`UndoFinished`; undos restore a recorded state, so one
//! started without a result is run again. An undo that fails halts ([`Halt::UndoFailed`]); resume tries it again.
//!
//! **Point of no return**: once any instance of the step named by `point_of_no_return` succeeded, a failure halts
//! ([`Halt::FailedPastPointOfNoReturn`]) without undoing anything; `full_undo` still undoes what has an undo and
//! refuses when a done step has `undo: none`.

use crate::assert::AssertError;
use crate::model::*;
use crate::placeholder::{Placeholder, render};
use crate::schedule::{Schedule, ScheduledStep, StepKey, render_node_placeholders};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A file a backup step saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// Where the copy is.
    pub path: String,
    /// What was copied (a path backup, a `yaml_edit`'s original), put back there by a restore; `None` for a
    /// command's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lower-case hex.
    pub sha256: String,
}

/// What a step produced, kept in the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutput {
    /// `save: NAME = field` of an `http` step: (NAME, value).
    pub saved: Option<(String, String)>,
    /// `mark: NAME`: (NAME, Unix seconds).
    pub mark: Option<(String, i64)>,
    /// Files a `backup` (or a `yaml_edit`, of the original) saved.
    pub backups: Vec<BackupRecord>,
    /// A short account for `audit` (what changed).
    pub note: Option<String>,
    /// Recorded from a resolve check or an operator's decision after a crash, not from the run itself.
    pub resolved: bool,
}

/// A step's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepResult {
    /// It did what it says.
    Done(StepOutput),
    /// It failed (changing nothing), with why.
    Failed(String),
}

/// One journal entry. Appended in order; a journal prefix is any state the machine can resume from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// Written before a step's effect.
    Started(StepKey),
    /// Written after it.
    Finished {
        /// The step.
        key: StepKey,
        /// Its result.
        result: StepResult,
    },
    /// A started non-idempotent step that did not take effect (resolve check or operator): it runs again.
    NotTaken(StepKey),
    /// Automatic rollback begins after this failed step.
    RollbackStarted {
        /// The failed step.
        cause: StepKey,
    },
    /// `rollback --upgrade` begins.
    FullUndoStarted,
    /// Written before an undo's effect.
    UndoStarted(StepKey),
    /// Written after it.
    UndoFinished {
        /// Whose undo.
        key: StepKey,
        /// `None` when it succeeded, else why it failed.
        error: Option<String>,
    },
}

/// The operator's answer about a started non-idempotent step that has no `resolve:` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The step.
    pub key: StepKey,
    /// Whether it took effect.
    pub took_effect: bool,
}

/// What a resolve check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The step took effect; what could be recovered of its output.
    TookEffect(StepOutput),
    /// It did not.
    NotTaken,
}

/// Values templates may read, replayed from the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    /// The runbook's params.
    pub params: BTreeMap<String, String>,
    /// Saved values by name.
    pub saved: BTreeMap<String, String>,
    /// Marks by name (Unix seconds; the earliest when a node step marks on several nodes).
    pub marks: BTreeMap<String, i64>,
}

impl Values {
    /// Renders `template` for `step`: node placeholders, params, `{saved.X}`, `{mark.X}`.
    pub fn render(&self, template: &str, step: &ScheduledStep) -> String {
        render(template, &|name| self.lookup(name, step))
    }

    fn lookup(&self, name: &str, step: &ScheduledStep) -> Option<String> {
        match Placeholder::parse(name) {
            Placeholder::Node(node) => step.node_value(node),
            Placeholder::Saved(saved) => self.saved.get(saved).cloned(),
            Placeholder::Mark(mark) => self.marks.get(mark).map(i64::to_string),
            Placeholder::Param(param) => self
                .params
                .get(param)
                .map(|value| render_node_placeholders(value, step)),
        }
    }
}

/// How the machine reaches the world. Every call may fail with a message (the step then fails).
pub trait UpgradeEffects {
    /// Runs `action` of `step` (never `mark` or `assert`: the machine does those).
    fn run(
        &mut self,
        step: &ScheduledStep,
        action: &Action,
        values: &Values,
    ) -> Result<StepOutput, String>;
    /// Asks `check` whether the non-idempotent `step` took effect before a crash.
    fn resolve(
        &mut self,
        step: &ScheduledStep,
        check: &Check,
        values: &Values,
    ) -> Result<Resolution, String>;
    /// Undoes `step`: `undo` is one undo body (called for each, in order), or `None` for a built-in undo of
    /// `action`; `output` is what the step recorded (a `yaml_edit`'s backup of the original, …).
    fn undo(
        &mut self,
        step: &ScheduledStep,
        action: &Action,
        undo: Option<&Action>,
        output: &StepOutput,
        values: &Values,
    ) -> Result<(), String>;
    /// The time now, Unix seconds (for `mark`).
    fn now(&mut self) -> i64;
}

/// Where entries go. An error means the entry may or may not be stored; the machine stops at once.
pub trait UpgradeJournal {
    /// Appends durably.
    fn append(&mut self, entry: &Entry) -> Result<(), JournalError>;
}

/// The journal could not be written: the machine stopped; resume from what was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot write the upgrade journal: {0}")]
pub struct JournalError(pub String);

/// Why the machine stopped without finishing or rolling back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// A non-idempotent step was started and has no result and no `resolve:` check: did it take effect?
    NeedsOperator(StepKey),
    /// A step failed after the point of no return: nothing was undone.
    FailedPastPointOfNoReturn {
        /// The step.
        key: StepKey,
        /// Why.
        message: String,
    },
    /// An undo failed; the rollback stopped there.
    UndoFailed {
        /// Whose undo.
        key: StepKey,
        /// Why.
        message: String,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step done.
    Completed,
    /// A step failed and the undos ran.
    RolledBack {
        /// The failed step.
        failed: StepKey,
        /// Why it failed.
        message: String,
    },
    /// Every done step undone (`full_undo`).
    Undone,
    /// Stopped; see [`Halt`].
    Halted(Halt),
}

/// `full_undo` refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndoRefused {
    /// Done steps declared `undo: none`.
    #[error(
        "these done steps cannot be undone (`undo: none`, after the point of no return): {}; restore them by hand \
         first",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    CannotUndo(Vec<StepKey>),
    /// A step was started and its outcome is unknown: undoing around it could leave its effect behind.
    #[error(
        "step {0} was started and its outcome is unknown; resume the upgrade first (it resolves the step or asks          whether it took effect), then undo"
    )]
    Unresolved(StepKey),
    /// The journal could not be written.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    NotStarted,
    Started,
    Done(StepOutput),
    Failed(String),
}

/// The journal replayed.
struct Replay {
    states: HashMap<StepKey, State>,
    rollback: Option<StepKey>,
    full_undo: bool,
    undo_started: HashMap<StepKey, bool>,
    undone: HashMap<StepKey, Option<String>>,
}

impl Replay {
    fn new(history: &[Entry]) -> Self {
        let mut replay = Replay {
            states: HashMap::new(),
            rollback: None,
            full_undo: false,
            undo_started: HashMap::new(),
            undone: HashMap::new(),
        };
        for entry in history {
            match entry {
                Entry::Started(key) => {
                    replay.states.insert(key.clone(), State::Started);
                }
                Entry::Finished { key, result } => {
                    let state = match result {
                        StepResult::Done(output) => State::Done(output.clone()),
                        StepResult::Failed(message) => State::Failed(message.clone()),
                    };
                    replay.states.insert(key.clone(), state);
                }
                Entry::NotTaken(key) => {
                    replay.states.insert(key.clone(), State::NotStarted);
                }
                Entry::RollbackStarted { cause } => replay.rollback = Some(cause.clone()),
                Entry::FullUndoStarted => replay.full_undo = true,
                Entry::UndoStarted(key) => {
                    replay.undo_started.insert(key.clone(), true);
                    replay.undone.remove(key);
                }
                Entry::UndoFinished { key, error } => {
                    replay.undone.insert(key.clone(), error.clone());
                }
            }
        }
        replay
    }

    fn state(&self, key: &StepKey) -> &State {
        self.states.get(key).unwrap_or(&State::NotStarted)
    }

    fn output(&self, key: &StepKey) -> Option<&StepOutput> {
        match self.states.get(key) {
            Some(State::Done(output)) => Some(output),
            _ => None,
        }
    }

    fn undone_ok(&self, key: &StepKey) -> bool {
        matches!(self.undone.get(key), Some(None))
    }
}

/// The machine for one upgrade.
pub struct UpgradeMachine<'r> {
    runbook: &'r Runbook,
    schedule: &'r Schedule,
}

impl<'r> UpgradeMachine<'r> {
    /// Over a validated runbook and its schedule.
    pub fn new(runbook: &'r Runbook, schedule: &'r Schedule) -> Self {
        Self { runbook, schedule }
    }

    fn step(&self, instance: &ScheduledStep) -> &'r Step {
        &self.runbook.steps[instance.step_index]
    }

    fn values(&self, replay: &Replay) -> Values {
        let mut values = Values {
            params: self.runbook.params.clone(),
            ..Values::default()
        };
        for instance in &self.schedule.steps {
            if let Some(output) = replay.output(&instance.key) {
                if let Some((name, value)) = &output.saved {
                    values.saved.insert(name.clone(), value.clone());
                }
                if let Some((name, at)) = &output.mark {
                    let entry = values.marks.entry(name.clone()).or_insert(*at);
                    *entry = (*entry).min(*at);
                }
            }
        }
        values
    }

    /// Runs (or resumes, from `history`: everything the journal holds) the upgrade. `decisions` answer
    /// [`Halt::NeedsOperator`].
    pub fn run(
        &self,
        history: &[Entry],
        decisions: &[Decision],
        effects: &mut dyn UpgradeEffects,
        journal: &mut dyn UpgradeJournal,
    ) -> Result<Outcome, JournalError> {
        let mut replay = Replay::new(history);
        if replay.full_undo {
            return self.undo_all(&mut replay, effects, journal);
        }
        if let Some(cause) = replay.rollback.clone() {
            return self.roll_back(&mut replay, &cause, effects, journal);
        }
        for instance in &self.schedule.steps {
            let step = self.step(instance);
            let key = &instance.key;
            match replay.state(key).clone() {
                State::Done(_) => continue,
                State::Failed(message) => {
                    return self.after_failure(&mut replay, key, message, effects, journal);
                }
                State::Started if !step.idempotent => {
                    let answer = match (&step.resolve, decisions.iter().find(|d| &d.key == key)) {
                        (_, Some(decision)) if decision.took_effect => {
                            Some(Resolution::TookEffect(StepOutput::default()))
                        }
                        (_, Some(_)) => Some(Resolution::NotTaken),
                        (Some(check), None) => {
                            let values = self.values(&replay);
                            // A check that cannot answer leaves it unknown: ask the operator rather than guess.
                            effects.resolve(instance, check, &values).ok()
                        }
                        (None, None) => None,
                    };
                    match answer {
                        None => return Ok(Outcome::Halted(Halt::NeedsOperator(key.clone()))),
                        Some(Resolution::TookEffect(mut output)) => {
                            output.resolved = true;
                            let result = StepResult::Done(output.clone());
                            journal.append(&Entry::Finished {
                                key: key.clone(),
                                result,
                            })?;
                            replay.states.insert(key.clone(), State::Done(output));
                            continue;
                        }
                        Some(Resolution::NotTaken) => {
                            journal.append(&Entry::NotTaken(key.clone()))?;
                            replay.states.insert(key.clone(), State::NotStarted);
                        }
                    }
                }
                State::Started | State::NotStarted => {}
            }
            journal.append(&Entry::Started(key.clone()))?;
            replay.states.insert(key.clone(), State::Started);
            let values = self.values(&replay);
            let result = match &step.action {
                Action::Mark(name) => Ok(StepOutput {
                    mark: Some((name.clone(), effects.now())),
                    ..StepOutput::default()
                }),
                Action::Assert(assertion) => {
                    match assertion.holds(&|name| {
                        values
                            .marks
                            .get(name)
                            .map(i64::to_string)
                            .or_else(|| values.saved.get(name).cloned())
                            .or_else(|| values.params.get(name).cloned())
                    }) {
                        Ok(true) => Ok(StepOutput::default()),
                        Ok(false) => Err(format!(
                            "assertion `{}` does not hold ({})",
                            assertion.text,
                            explain(assertion, &values)
                        )),
                        Err(error) => Err(error.to_string()),
                    }
                }
                action => effects.run(instance, action, &values),
            };
            match result {
                Ok(output) => {
                    journal.append(&Entry::Finished {
                        key: key.clone(),
                        result: StepResult::Done(output.clone()),
                    })?;
                    replay.states.insert(key.clone(), State::Done(output));
                }
                Err(message) => {
                    journal.append(&Entry::Finished {
                        key: key.clone(),
                        result: StepResult::Failed(message.clone()),
                    })?;
                    replay
                        .states
                        .insert(key.clone(), State::Failed(message.clone()));
                    return self.after_failure(&mut replay, key, message, effects, journal);
                }
            }
        }
        Ok(Outcome::Completed)
    }

    fn point_of_no_return_passed(&self, replay: &Replay) -> bool {
        let Some(ponr) = &self.runbook.point_of_no_return else {
            return false;
        };
        self.schedule
            .steps
            .iter()
            .any(|instance| &instance.key.step == ponr && replay.output(&instance.key).is_some())
    }

    fn after_failure(
        &self,
        replay: &mut Replay,
        key: &StepKey,
        message: String,
        effects: &mut dyn UpgradeEffects,
        journal: &mut dyn UpgradeJournal,
    ) -> Result<Outcome, JournalError> {
        if self.point_of_no_return_passed(replay) {
            return Ok(Outcome::Halted(Halt::FailedPastPointOfNoReturn {
                key: key.clone(),
                message,
            }));
        }
        journal.append(&Entry::RollbackStarted { cause: key.clone() })?;
        replay.rollback = Some(key.clone());
        self.roll_back(replay, key, effects, journal)
    }

    /// The done steps a failure of `cause` undoes, in undo order.
    fn rollback_list(&self, replay: &Replay, cause: &StepKey) -> Vec<&'r ScheduledStep> {
        let Some(failed) = self.schedule.steps.iter().find(|s| &s.key == cause) else {
            return Vec::new();
        };
        let schedule: &'r Schedule = self.schedule;
        schedule
            .steps
            .iter()
            .rev()
            .filter(|instance| replay.output(&instance.key).is_some())
            .filter(|instance| match failed.scope {
                Scope::Node => {
                    instance.scope == Scope::ClusterBefore
                        || (instance.scope == Scope::Node && instance.key.node == failed.key.node)
                }
                Scope::ClusterBefore => instance.scope == Scope::ClusterBefore,
                Scope::ClusterAfter => instance.scope != Scope::Node,
            })
            .collect()
    }

    fn roll_back(
        &self,
        replay: &mut Replay,
        cause: &StepKey,
        effects: &mut dyn UpgradeEffects,
        journal: &mut dyn UpgradeJournal,
    ) -> Result<Outcome, JournalError> {
        let list = self.rollback_list(replay, cause);
        if let Some(halt) = self.undo_list(replay, &list, effects, journal)? {
            return Ok(Outcome::Halted(halt));
        }
        let message = match replay.state(cause) {
            State::Failed(message) => message.clone(),
            _ => String::new(),
        };
        Ok(Outcome::RolledBack {
            failed: cause.clone(),
            message,
        })
    }

    fn undo_list(
        &self,
        replay: &mut Replay,
        list: &[&ScheduledStep],
        effects: &mut dyn UpgradeEffects,
        journal: &mut dyn UpgradeJournal,
    ) -> Result<Option<Halt>, JournalError> {
        for instance in list {
            let step = self.step(instance);
            let undos: Vec<Option<&Action>> = match &step.undo {
                Undo::NothingToUndo | Undo::None => continue,
                Undo::BuiltIn => vec![None],
                Undo::Actions(actions) => actions.iter().map(Some).collect(),
            };
            if replay.undone_ok(&instance.key) {
                continue;
            }
            let output = replay.output(&instance.key).cloned().unwrap_or_default();
            journal.append(&Entry::UndoStarted(instance.key.clone()))?;
            let values = self.values(replay);
            let error = undos.into_iter().find_map(|undo| {
                effects
                    .undo(instance, &step.action, undo, &output, &values)
                    .err()
            });
            journal.append(&Entry::UndoFinished {
                key: instance.key.clone(),
                error: error.clone(),
            })?;
            replay.undone.insert(instance.key.clone(), error.clone());
            if let Some(message) = error {
                return Ok(Some(Halt::UndoFailed {
                    key: instance.key.clone(),
                    message,
                }));
            }
        }
        Ok(None)
    }

    /// `rollback --upgrade`: undoes every done step (all nodes and the cluster) in reverse order, skipping those
    /// already undone. Refused, before anything is journaled, when a done step has `undo: none` or a started step
    /// has no result yet.
    pub fn full_undo(
        &self,
        history: &[Entry],
        effects: &mut dyn UpgradeEffects,
        journal: &mut dyn UpgradeJournal,
    ) -> Result<Outcome, UndoRefused> {
        let mut replay = Replay::new(history);
        if !replay.full_undo {
            if let Some(started) = self
                .schedule
                .steps
                .iter()
                .find(|instance| *replay.state(&instance.key) == State::Started)
            {
                return Err(UndoRefused::Unresolved(started.key.clone()));
            }
            let stuck: Vec<StepKey> = self
                .schedule
                .steps
                .iter()
                .filter(|instance| {
                    replay.output(&instance.key).is_some() && self.step(instance).undo == Undo::None
                })
                .map(|instance| instance.key.clone())
                .collect();
            if !stuck.is_empty() {
                return Err(UndoRefused::CannotUndo(stuck));
            }
            journal.append(&Entry::FullUndoStarted)?;
            replay.full_undo = true;
        }
        Ok(self.undo_all(&mut replay, effects, journal)?)
    }

    fn undo_all(
        &self,
        replay: &mut Replay,
        effects: &mut dyn UpgradeEffects,
        journal: &mut dyn UpgradeJournal,
    ) -> Result<Outcome, JournalError> {
        let schedule: &'r Schedule = self.schedule;
        let list: Vec<&ScheduledStep> = schedule
            .steps
            .iter()
            .rev()
            .filter(|instance| replay.output(&instance.key).is_some())
            .collect();
        Ok(match self.undo_list(replay, &list, effects, journal)? {
            Some(halt) => Outcome::Halted(halt),
            None => Outcome::Undone,
        })
    }
}

fn explain(assertion: &crate::assert::Assertion, values: &Values) -> String {
    let mut parts = Vec::new();
    for operand in assertion.operands() {
        let shown = match operand {
            crate::assert::Operand::Name(name) => values
                .marks
                .get(name)
                .map(i64::to_string)
                .or_else(|| values.saved.get(name).cloned())
                .map(|value| format!("{name} = {value}")),
            crate::assert::Operand::Param { name, .. } => values
                .params
                .get(name)
                .map(|value| format!("{name} = {value}")),
            crate::assert::Operand::Seconds(_) => None,
        };
        parts.extend(shown);
    }
    if parts.is_empty() {
        AssertError::Syntax(assertion.text.clone()).to_string()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests;
