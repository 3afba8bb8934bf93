//! The upgrade journal in the store: every entry the step machine appends becomes one durable row
//! (`Store::append_upgrade_entry`), is added to the in-memory history the effects read (a `restore` finds the
//! backups its backup step recorded there), and is reported as a progress line. With the `fault-injection`
//! feature, `PATCHCTL_FAULT_UPGRADE_EXIT_AFTER=N` aborts the process right after its Nth append, before the next
//! effect (the crash tests kill `patchctl` at every journal write this way).

use crate::store::Store;
use patchd_runbook::machine::{Entry, JournalError, StepResult, UpgradeJournal};
use patchd_runbook::schedule::{Schedule, StepKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every entry of the upgrade so far (the stored ones, then those appended by this process).
#[derive(Debug, Clone, Default)]
pub struct SharedHistory(Arc<Mutex<Vec<Entry>>>);

impl SharedHistory {
    /// Starting from what the store holds.
    pub fn new(entries: Vec<Entry>) -> Self {
        Self(Arc::new(Mutex::new(entries)))
    }

    /// A copy of every entry.
    pub fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn push(&self, entry: Entry) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
    }
}

/// One progress line, printed by the caller.
pub type ProgressFn = Box<dyn FnMut(&str) + Send>;

/// The store journal of one upgrade.
pub struct StoreJournal {
    store: Arc<Store>,
    upgrade_id: String,
    history: SharedHistory,
    positions: HashMap<StepKey, (usize, String)>,
    total: usize,
    progress: ProgressFn,
    #[cfg(feature = "fault-injection")]
    appended: u64,
    #[cfg(feature = "fault-injection")]
    exit_after: Option<u64>,
}

impl StoreJournal {
    /// Appends to `upgrade_id`'s journal; `schedule` numbers the progress lines, `node_names` names the nodes.
    pub fn new(
        store: Arc<Store>,
        upgrade_id: &str,
        schedule: &Schedule,
        history: SharedHistory,
        progress: ProgressFn,
    ) -> Self {
        let positions = schedule
            .steps
            .iter()
            .enumerate()
            .map(|(index, instance)| {
                let shown = match &instance.node {
                    Some(node) => format!("{}@{}", instance.key.step, node.name),
                    None => instance.key.step.clone(),
                };
                (instance.key.clone(), (index + 1, shown))
            })
            .collect();
        Self {
            store,
            upgrade_id: upgrade_id.to_string(),
            history,
            positions,
            total: schedule.steps.len(),
            progress,
            #[cfg(feature = "fault-injection")]
            appended: 0,
            #[cfg(feature = "fault-injection")]
            exit_after: std::env::var("PATCHCTL_FAULT_UPGRADE_EXIT_AFTER")
                .ok()
                .and_then(|value| value.trim().parse().ok()),
        }
    }

    fn shown(&self, key: &StepKey) -> (String, String) {
        match self.positions.get(key) {
            Some((position, shown)) => (format!("[{position}/{}]", self.total), shown.clone()),
            None => ("[?]".to_string(), key.to_string()),
        }
    }

    fn report(&mut self, entry: &Entry) {
        let line = match entry {
            Entry::Started(_) | Entry::UndoStarted(_) => return,
            Entry::Finished { key, result } => {
                let (position, shown) = self.shown(key);
                match result {
                    StepResult::Done(output) => {
                        let mut detail = Vec::new();
                        if output.resolved {
                            detail.push("resolved after a crash".to_string());
                        }
                        if let Some(note) = &output.note {
                            detail.push(note.clone());
                        }
                        if detail.is_empty() {
                            format!("{position} {shown} ... done")
                        } else {
                            format!("{position} {shown} ... done ({})", detail.join(", "))
                        }
                    }
                    StepResult::Failed(message) => {
                        format!("{position} {shown} ... FAILED: {message}")
                    }
                }
            }
            Entry::NotTaken(key) => {
                let (position, shown) = self.shown(key);
                format!(
                    "{position} {shown} ... had not taken effect before the crash: running it again"
                )
            }
            Entry::RollbackStarted { cause } => {
                let (_, shown) = self.shown(cause);
                format!("Rolling back after {shown}: undoing the steps done, newest first")
            }
            Entry::FullUndoStarted => {
                "Undoing every done step of the upgrade, newest first".to_string()
            }
            Entry::UndoFinished { key, error } => {
                let (_, shown) = self.shown(key);
                match error {
                    None => format!("  undo {shown} ... done"),
                    Some(message) => format!("  undo {shown} ... FAILED: {message}"),
                }
            }
        };
        (self.progress)(&line);
    }
}

impl UpgradeJournal for StoreJournal {
    fn append(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let json = serde_json::to_string(entry).map_err(|error| JournalError(error.to_string()))?;
        self.store
            .append_upgrade_entry(&self.upgrade_id, &json)
            .map_err(|error| JournalError(error.to_string()))?;
        self.history.push(entry.clone());
        self.report(entry);
        #[cfg(feature = "fault-injection")]
        {
            self.appended += 1;
            if self.exit_after == Some(self.appended) {
                // A crash right after a durable write: what a SIGKILL there leaves, without a signal race.
                std::process::abort();
            }
        }
        Ok(())
    }
}

/// The stored journal of `upgrade_id`, parsed.
pub fn load_history(store: &Store, upgrade_id: &str) -> Result<Vec<Entry>, String> {
    store
        .upgrade_entries(upgrade_id)
        .map_err(|error| error.to_string())?
        .into_iter()
        .enumerate()
        .map(|(index, (_, json))| {
            serde_json::from_str(&json).map_err(|error| {
                format!(
                    "upgrade {upgrade_id}: journal entry {} cannot be read ({error}); was it written by a newer \
                     patchctl?",
                    index + 1
                )
            })
        })
        .collect()
}
