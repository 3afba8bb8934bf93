//! One run of an upgrade (new, resumed, or its full undo): take the leases of every node's service, replay the
//! stored journal, drive the step machine on a blocking thread, release the leases, record the outcome.

use super::effects::{LiveUpgradeEffects, UpgradeContext};
use super::journal::{ProgressFn, SharedHistory, StoreJournal, load_history};
use crate::agent::client::PreparedBlob;
use crate::agent::lease::LeaseKeeper;
use crate::agent::ops::LeaseTicket;
use crate::executor::LeaseFailure;
use crate::store::{Store, StoreError, UpgradeOutcome};
use crate::tls_files::ControllerTls;
use crate::topology::Topology;
use patchd_runbook::Runbook;
use patchd_runbook::machine::{Decision, Entry, Outcome, StepResult, UndoRefused, UpgradeMachine};
use patchd_runbook::schedule::Schedule;
use std::collections::HashSet;
use std::sync::Arc;

/// Why an upgrade run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another rollout holds a node's lease: nothing was run.
    #[error(
        "node {node} is held by another rollout ({holder}); nothing was changed. Wait for it to finish, or run \
         again once its lease expired"
    )]
    LeaseHeld {
        /// The node.
        node: String,
        /// Who holds it.
        holder: String,
    },
    /// The journal could not be read or written; the upgrade stopped where the store says.
    #[error("{0}; the upgrade stopped: resume it with `--resume` once the store is writable")]
    Journal(String),
    /// The effects could not be set up, or the blocking thread failed.
    #[error("{0}")]
    Setup(String),
    /// `rollback --upgrade` refused before changing anything.
    #[error(transparent)]
    UndoRefused(#[from] UndoRefused),
}

/// What to do.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Run (or resume) the upgrade; `decisions` answer a halt that needs the operator.
    Run(Vec<Decision>),
    /// Undo every done step (`patchctl rollback --upgrade`).
    FullUndo,
}

/// Everything one run needs.
pub struct Execution {
    /// The store.
    pub store: Arc<Store>,
    /// The cluster's topology.
    pub topology: Arc<Topology>,
    /// The controller's TLS identity.
    pub tls: ControllerTls,
    /// The upgrade's id (recorded in the store already).
    pub upgrade_id: String,
    /// The runbook.
    pub runbook: Runbook,
    /// Its schedule.
    pub schedule: Schedule,
    /// The image package of container swaps.
    pub package: Option<Arc<PreparedBlob>>,
    /// Where progress lines go.
    pub progress: ProgressFn,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The machine's outcome.
    pub outcome: Outcome,
    /// Whether the upgrade changed anything at some point ([`changed_something`]).
    pub changed_something: bool,
}

/// A fresh upgrade id: `u` plus UTC time to the second and the PID (sorts by time, like rollout ids).
pub fn new_upgrade_id() -> String {
    let rollout_id = crate::store::new_rollout_id();
    format!("u{}", rollout_id.trim_start_matches('r'))
}

/// Runs `execution` in `mode`.
pub async fn execute(execution: Execution, mode: Mode) -> Result<Ending, UpgradeError> {
    let Execution {
        store,
        topology,
        tls,
        upgrade_id,
        runbook,
        schedule,
        package,
        progress,
    } = execution;
    let ticket = LeaseTicket {
        rollout_id: upgrade_id.clone(),
        holder: store.store_id()?,
    };
    let leases = LeaseKeeper::new(ticket.clone(), tls.clone());
    let mut seen = HashSet::new();
    for instance in &schedule.steps {
        let Some(node_ref) = &instance.node else {
            continue;
        };
        if !seen.insert(node_ref.id.clone()) {
            continue;
        }
        let Some(node) = topology.node_by_id(&node_ref.id) else {
            continue;
        };
        match leases.take(node).await {
            Ok(()) => {}
            Err(LeaseFailure::Held(holder)) => {
                leases.release_all().await;
                return Err(UpgradeError::LeaseHeld {
                    node: node.name.clone(),
                    holder,
                });
            }
            // Its own steps meet the same problem and fail there (as a patch rollout does).
            Err(LeaseFailure::Unanswered(why)) => errln!(
                "warning: no lease on {} ({why}); its steps will tell whether the agent answers",
                node.name
            ),
        }
    }
    let history = load_history(&store, &upgrade_id).map_err(UpgradeError::Journal)?;
    let shared = SharedHistory::new(history.clone());
    let context = UpgradeContext {
        upgrade_id: upgrade_id.clone(),
        lease: ticket,
        package,
    };
    let mut effects = LiveUpgradeEffects::new(
        tokio::runtime::Handle::current(),
        Arc::clone(&topology),
        tls,
        context,
        shared.clone(),
    )
    .map_err(UpgradeError::Setup)?;
    store.set_upgrade_outcome(&upgrade_id, UpgradeOutcome::Running)?;
    let journal_store = Arc::clone(&store);
    let journal_id = upgrade_id.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let mut journal = StoreJournal::new(
            journal_store,
            &journal_id,
            &schedule,
            shared.clone(),
            progress,
        );
        let machine = UpgradeMachine::new(&runbook, &schedule);
        let outcome = match mode {
            Mode::Run(decisions) => machine
                .run(&history, &decisions, &mut effects, &mut journal)
                .map_err(|error| UpgradeError::Journal(error.to_string())),
            Mode::FullUndo => machine
                .full_undo(&history, &mut effects, &mut journal)
                .map_err(|refused| match refused {
                    UndoRefused::Journal(error) => UpgradeError::Journal(error.to_string()),
                    other => UpgradeError::UndoRefused(other),
                }),
        };
        let changed = changed_something(&runbook, &shared.entries());
        outcome.map(|outcome| (outcome, changed))
    })
    .await;
    leases.release_all().await;
    let (outcome, changed_something) = worker.map_err(|error| {
        UpgradeError::Setup(format!("the upgrade's worker thread failed: {error}"))
    })??;
    let stored = match &outcome {
        Outcome::Completed => UpgradeOutcome::Completed,
        Outcome::RolledBack { .. } => UpgradeOutcome::RolledBack,
        Outcome::Undone => UpgradeOutcome::Undone,
        Outcome::Halted(_) => UpgradeOutcome::Halted,
    };
    store.set_upgrade_outcome(&upgrade_id, stored)?;
    Ok(Ending {
        outcome,
        changed_something,
    })
}

/// Whether the upgrade changed anything at some point: a step that changes something finished done, or was
/// started and has no result (its effect may have begun). A step that failed changed nothing (it restores by
/// itself), so a run that failed before any such step changed nothing at all.
pub fn changed_something(runbook: &Runbook, entries: &[Entry]) -> bool {
    let changes = |key: &patchd_runbook::schedule::StepKey| {
        runbook
            .steps
            .iter()
            .find(|step| step.id == key.step)
            .is_some_and(|step| step.changes_something())
    };
    let mut open: HashSet<&patchd_runbook::schedule::StepKey> = HashSet::new();
    for entry in entries {
        match entry {
            Entry::Started(key) if changes(key) => {
                open.insert(key);
            }
            Entry::Finished {
                key,
                result: StepResult::Done(_),
            } if changes(key) => return true,
            Entry::Finished { key, .. } | Entry::NotTaken(key) => {
                open.remove(key);
            }
            _ => {}
        }
    }
    !open.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_runbook::machine::StepOutput;
    use patchd_runbook::schedule::StepKey;
    use patchd_runbook::{ClusterFacts, parse_for_cluster};

    const RUNBOOK: &str = r#"
runbook: t
roles: [app]
steps:
  - id: look
    scope: cluster
    check:
      sql: { database: db, query: "SELECT 1 FROM t WHERE 0" }
      expect: { no_rows: true }
  - id: write
    scope: cluster
    sql: { database: db, statements: ["UPDATE t SET x = 1"] }
    undo: { sql: { database: db, statements: ["UPDATE t SET x = 0"] } }
"#;

    fn key(step: &str) -> StepKey {
        StepKey {
            step: step.into(),
            node: None,
        }
    }

    #[test]
    fn only_a_changing_step_done_or_left_open_counts_as_a_change() {
        let runbook = parse_for_cluster(
            RUNBOOK,
            &ClusterFacts {
                roles: vec!["app".into()],
                databases: vec!["db".into()],
            },
        )
        .expect("runbook");
        let done = |step: &str| Entry::Finished {
            key: key(step),
            result: StepResult::Done(StepOutput::default()),
        };
        let failed = |step: &str| Entry::Finished {
            key: key(step),
            result: StepResult::Failed("no".into()),
        };
        // A failed check, then nothing: unchanged.
        assert!(!changed_something(
            &runbook,
            &[Entry::Started(key("look")), failed("look")]
        ));
        // The changing step failed (it changes nothing when it fails): unchanged.
        assert!(!changed_something(
            &runbook,
            &[
                Entry::Started(key("look")),
                done("look"),
                Entry::Started(key("write")),
                failed("write"),
            ]
        ));
        // Started without a result: its effect may have begun.
        assert!(changed_something(&runbook, &[Entry::Started(key("write"))]));
        // Done, even if undone later: the cluster was changed (and put back).
        assert!(changed_something(
            &runbook,
            &[
                Entry::Started(key("write")),
                done("write"),
                Entry::UndoStarted(key("write")),
                Entry::UndoFinished {
                    key: key("write"),
                    error: None
                },
            ]
        ));
    }
}
