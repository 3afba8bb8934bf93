//! What `patchctl audit --rollout <upgrade id>` shows of an upgrade, built from its stored journal: each step
//! instance with its outcome and note, the backups (path, size, sha256), the saved values (those whose name
//! says password, secret, token or key redacted), the marks and the windows between them (T2 − T1).

use crate::store::{Timestamp, UpgradeRecord};
use patchd_runbook::machine::{Entry, StepResult};
use patchd_runbook::schedule::{NodeRef, StepKey};
use serde::Serialize;
use std::collections::HashMap;

/// One step instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRow {
    /// `step@node-name`, or the step id for the controller.
    pub step: String,
    /// `done`, `failed`, `started` (no result), `undone`, `undo_failed`.
    pub outcome: String,
    /// What it did, or why it failed.
    pub note: String,
    /// Its result came from a resolve check or the operator after a crash.
    pub resolved: bool,
    /// When its last entry was written.
    pub at: Timestamp,
}

/// A file a step saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupRow {
    /// The step instance.
    pub step: String,
    /// Where the copy is (on the node).
    pub path: String,
    /// What it copied, when a path backup.
    pub source: Option<String>,
    /// Bytes.
    pub size: u64,
    /// sha256.
    pub sha256: String,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpgradeReport {
    /// The upgrade.
    pub upgrade: UpgradeRecord,
    /// Step instances in the order first journaled.
    pub steps: Vec<StepRow>,
    /// Backups.
    pub backups: Vec<BackupRow>,
    /// Saved values by name (redacted where the name says secret).
    pub saved: Vec<(String, String)>,
    /// Marks: name and Unix seconds (the earliest when several nodes marked).
    pub marks: Vec<(String, i64)>,
    /// Windows between consecutive marks: `T2 - T1` and seconds.
    pub windows: Vec<(String, i64)>,
}

/// Whether a saved value's name says it is a secret.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|word| lower.contains(word))
}

/// Builds the report from the upgrade and its journal (time, entry).
pub fn build(upgrade: UpgradeRecord, entries: &[(Timestamp, Entry)]) -> UpgradeReport {
    let names: HashMap<String, String> =
        serde_json::from_str::<Vec<NodeRef>>(&upgrade.schedule_json)
            .unwrap_or_default()
            .into_iter()
            .map(|node| (node.id, node.name))
            .collect();
    let show = |key: &StepKey| match &key.node {
        Some(node) => format!("{}@{}", key.step, names.get(node).unwrap_or(node)),
        None => key.step.clone(),
    };
    let mut order: Vec<String> = Vec::new();
    let mut rows: HashMap<String, StepRow> = HashMap::new();
    let mut backups = Vec::new();
    let mut saved: Vec<(String, String)> = Vec::new();
    let mut marks: Vec<(String, i64)> = Vec::new();
    for (at, entry) in entries {
        let (key, outcome, note, resolved) = match entry {
            Entry::Started(key) => (key, "started", String::new(), false),
            Entry::NotTaken(key) => (
                key,
                "started",
                "had not taken effect: run again".to_string(),
                false,
            ),
            Entry::Finished {
                key,
                result: StepResult::Failed(message),
            } => (key, "failed", message.clone(), false),
            Entry::Finished {
                key,
                result: StepResult::Done(output),
            } => {
                let shown = show(key);
                backups.extend(output.backups.iter().map(|backup| BackupRow {
                    step: shown.clone(),
                    path: backup.path.clone(),
                    source: backup.source.clone(),
                    size: backup.size,
                    sha256: backup.sha256.clone(),
                }));
                if let Some((name, value)) = &output.saved {
                    let value = if is_secret_name(name) {
                        "(redacted)".to_string()
                    } else {
                        value.clone()
                    };
                    saved.retain(|(known, _)| known != name);
                    saved.push((name.clone(), value));
                }
                if let Some((name, when)) = &output.mark {
                    match marks.iter_mut().find(|(known, _)| known == name) {
                        Some((_, earliest)) => *earliest = (*earliest).min(*when),
                        None => marks.push((name.clone(), *when)),
                    }
                }
                (
                    key,
                    "done",
                    output.note.clone().unwrap_or_default(),
                    output.resolved,
                )
            }
            Entry::UndoStarted(_) | Entry::RollbackStarted { .. } | Entry::FullUndoStarted => {
                continue;
            }
            Entry::UndoFinished { key, error } => {
                let shown = show(key);
                if let Some(row) = rows.get_mut(&shown) {
                    match error {
                        None => row.outcome = "undone".to_string(),
                        Some(message) => {
                            row.outcome = "undo_failed".to_string();
                            row.note = message.clone();
                        }
                    }
                    row.at = *at;
                }
                continue;
            }
        };
        let shown = show(key);
        if !rows.contains_key(&shown) {
            order.push(shown.clone());
        }
        rows.insert(
            shown.clone(),
            StepRow {
                step: shown,
                outcome: outcome.to_string(),
                note,
                resolved,
                at: *at,
            },
        );
    }
    marks.sort_by_key(|(_, when)| *when);
    let windows = marks
        .windows(2)
        .map(|pair| {
            (
                format!("{} - {}", pair[1].0, pair[0].0),
                pair[1].1 - pair[0].1,
            )
        })
        .collect();
    UpgradeReport {
        upgrade,
        steps: order
            .into_iter()
            .filter_map(|key| rows.remove(&key))
            .collect(),
        backups,
        saved,
        marks,
        windows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UpgradeOutcome;
    use patchd_runbook::machine::{BackupRecord, StepOutput};

    fn key(step: &str, node: Option<&str>) -> StepKey {
        StepKey {
            step: step.into(),
            node: node.map(str::to_string),
        }
    }

    fn done(key: StepKey, output: StepOutput) -> (Timestamp, Entry) {
        (
            Timestamp(0),
            Entry::Finished {
                key,
                result: StepResult::Done(output),
            },
        )
    }

    #[test]
    fn secrets_are_redacted_marks_give_windows_and_undos_show() {
        let upgrade = UpgradeRecord {
            id: "u1".into(),
            cluster: "c".into(),
            runbook_name: "rb".into(),
            runbook_sha256: String::new(),
            runbook_text: String::new(),
            package_digest: String::new(),
            package_path: String::new(),
            schedule_json: r#"[{"id":"h:1","name":"n1","host":"h","role":"r","batch":0}]"#.into(),
            started_at: Timestamp(0),
            finished_at: None,
            outcome: UpgradeOutcome::Completed,
        };
        let entries = vec![
            done(
                key("read", None),
                StepOutput {
                    saved: Some(("ha_config".into(), "on".into())),
                    ..StepOutput::default()
                },
            ),
            done(
                key("token", None),
                StepOutput {
                    saved: Some(("api_Token".into(), "s3cret".into())),
                    ..StepOutput::default()
                },
            ),
            done(
                key("t1", Some("h:1")),
                StepOutput {
                    mark: Some(("T1".into(), 100)),
                    ..StepOutput::default()
                },
            ),
            done(
                key("dump", Some("h:1")),
                StepOutput {
                    backups: vec![BackupRecord {
                        path: "/b/rm.sql".into(),
                        source: None,
                        size: 10,
                        sha256: "ab".into(),
                    }],
                    ..StepOutput::default()
                },
            ),
            done(
                key("t2", None),
                StepOutput {
                    mark: Some(("T2".into(), 142)),
                    ..StepOutput::default()
                },
            ),
            (
                Timestamp(1),
                Entry::UndoFinished {
                    key: key("dump", Some("h:1")),
                    error: None,
                },
            ),
        ];
        let report = build(upgrade, &entries);
        assert_eq!(
            report.saved,
            vec![
                ("ha_config".to_string(), "on".to_string()),
                ("api_Token".to_string(), "(redacted)".to_string())
            ]
        );
        assert_eq!(report.windows, vec![("T2 - T1".to_string(), 42)]);
        assert_eq!(report.backups[0].step, "dump@n1");
        let dump = report
            .steps
            .iter()
            .find(|row| row.step == "dump@n1")
            .expect("dump");
        assert_eq!(dump.outcome, "undone");
        assert!(
            !serde_json::to_string(&report)
                .expect("json")
                .contains("s3cret")
        );
    }
}
