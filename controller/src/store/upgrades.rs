//! Upgrades (runbooks run by `patchctl upgrade`) and their step journals. The journal holds
//! `patchd_runbook::machine::Entry` values as JSON, one row per entry, each appended in its own transaction with
//! `synchronous = FULL`: the machine writes an entry before the effect it announces, so the row must be on disk
//! before the effect starts. Nothing here ever holds a database password (the topology names only where to read
//! one, and SQL steps read it at the moment they connect).

use super::records::Timestamp;
use super::{Store, StoreError};
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

/// How an upgrade stands, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeOutcome {
    /// Started and not finished (running, killed, or halted waiting for the operator).
    Running,
    /// Every step done.
    Completed,
    /// A step failed and the undos ran.
    RolledBack,
    /// Stopped needing the operator (`--resume` continues).
    Halted,
    /// Undone by `patchctl rollback --upgrade`.
    Undone,
}

impl UpgradeOutcome {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeOutcome::Running => "running",
            UpgradeOutcome::Completed => "completed",
            UpgradeOutcome::RolledBack => "rolled_back",
            UpgradeOutcome::Halted => "halted",
            UpgradeOutcome::Undone => "undone",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "running" => UpgradeOutcome::Running,
            "completed" => UpgradeOutcome::Completed,
            "rolled_back" => UpgradeOutcome::RolledBack,
            "halted" => UpgradeOutcome::Halted,
            "undone" => UpgradeOutcome::Undone,
            _ => return None,
        })
    }
}

impl std::fmt::Display for UpgradeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An upgrade to record.
#[derive(Debug, Clone)]
pub struct NewUpgrade {
    /// Its id (also the lease's rollout id and the agents' `upgrade_id`).
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// The runbook's `runbook:` name.
    pub runbook_name: String,
    /// sha256 of the runbook text.
    pub runbook_sha256: String,
    /// The runbook as run (a resume runs exactly this text, whatever the file says now).
    pub runbook_text: String,
    /// The package's tree digest ("" without `--package`).
    pub package_digest: String,
    /// The package file ("" without `--package`).
    pub package_path: String,
    /// The node order it was laid over (JSON of the schedule's nodes).
    pub schedule_json: String,
}

/// A recorded upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpgradeRecord {
    /// Id.
    pub id: String,
    /// Cluster.
    pub cluster: String,
    /// Runbook name.
    pub runbook_name: String,
    /// Runbook sha256.
    pub runbook_sha256: String,
    /// Runbook text.
    #[serde(skip)]
    pub runbook_text: String,
    /// Package digest ("" when none).
    pub package_digest: String,
    /// Package file ("" when none).
    pub package_path: String,
    /// Node order (JSON).
    #[serde(skip)]
    pub schedule_json: String,
    /// Started.
    pub started_at: Timestamp,
    /// Last finished (a resumed or undone upgrade finishes again).
    pub finished_at: Option<Timestamp>,
    /// Outcome.
    pub outcome: UpgradeOutcome,
}

const COLUMNS: &str = "id, cluster, runbook_name, runbook_sha256, runbook_text, package_digest, package_path, \
                       schedule_json, started_at, finished_at, outcome";

impl Store {
    /// Records a new upgrade, outcome `running`.
    pub fn create_upgrade(&self, upgrade: &NewUpgrade) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!("INSERT INTO upgrades ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10)"),
                params![
                    upgrade.id,
                    upgrade.cluster,
                    upgrade.runbook_name,
                    upgrade.runbook_sha256,
                    upgrade.runbook_text,
                    upgrade.package_digest,
                    upgrade.package_path,
                    upgrade.schedule_json,
                    Timestamp::now().0,
                    UpgradeOutcome::Running.as_str()
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Sets an upgrade's outcome (`running` clears its finish time).
    pub fn set_upgrade_outcome(&self, id: &str, outcome: UpgradeOutcome) -> Result<(), StoreError> {
        let finished = (outcome != UpgradeOutcome::Running).then(|| Timestamp::now().0);
        let changed = self
            .conn()
            .execute(
                "UPDATE upgrades SET outcome = ?2, finished_at = ?3 WHERE id = ?1",
                params![id, outcome.as_str(), finished],
            )
            .map_err(|e| self.sql(e))?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                what: format!("upgrade {id}"),
            });
        }
        Ok(())
    }

    /// One upgrade.
    pub fn upgrade(&self, id: &str) -> Result<Option<UpgradeRecord>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM upgrades WHERE id = ?1"),
                [id],
                raw_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        drop(conn);
        row.map(|raw| self.record(raw)).transpose()
    }

    /// Upgrades, oldest first; of one cluster when given.
    pub fn list_upgrades(&self, cluster: Option<&str>) -> Result<Vec<UpgradeRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM upgrades WHERE ?1 IS NULL OR cluster = ?1 ORDER BY started_at, id"
            ))
            .map_err(|e| self.sql(e))?;
        let raws = statement
            .query_map([cluster], raw_row)
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        drop(statement);
        drop(conn);
        raws.into_iter().map(|raw| self.record(raw)).collect()
    }

    /// Appends one journal entry (JSON) durably; returns its 1-based sequence number.
    pub fn append_upgrade_entry(&self, id: &str, entry_json: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.sql(e))?;
        let appended = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let seq: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM upgrade_journal WHERE upgrade_id = ?1",
                [id],
                |row| row.get(0),
            )?;
            tx.execute(
                "INSERT INTO upgrade_journal (upgrade_id, seq, entry_json, at) VALUES (?1, ?2, ?3, ?4)",
                params![id, seq, entry_json, Timestamp::now().0],
            )?;
            tx.commit()?;
            Ok(seq)
        })();
        let restored = conn.pragma_update(None, "synchronous", "NORMAL");
        let seq = appended.map_err(|e| self.sql(e))?;
        restored.map_err(|e| self.sql(e))?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// The journal of an upgrade in order: (time, entry JSON).
    pub fn upgrade_entries(&self, id: &str) -> Result<Vec<(Timestamp, String)>, StoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare(
                "SELECT at, entry_json FROM upgrade_journal WHERE upgrade_id = ?1 ORDER BY seq",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([id], |row| Ok((Timestamp(row.get(0)?), row.get(1)?)))
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        Ok(rows)
    }

    fn record(&self, raw: RawUpgrade) -> Result<UpgradeRecord, StoreError> {
        let outcome = UpgradeOutcome::parse(&raw.outcome)
            .ok_or_else(|| self.corrupt("upgrades.outcome", &raw.outcome))?;
        Ok(UpgradeRecord {
            id: raw.id,
            cluster: raw.cluster,
            runbook_name: raw.runbook_name,
            runbook_sha256: raw.runbook_sha256,
            runbook_text: raw.runbook_text,
            package_digest: raw.package_digest,
            package_path: raw.package_path,
            schedule_json: raw.schedule_json,
            started_at: Timestamp(raw.started_at),
            finished_at: raw.finished_at.map(Timestamp),
            outcome,
        })
    }
}

struct RawUpgrade {
    id: String,
    cluster: String,
    runbook_name: String,
    runbook_sha256: String,
    runbook_text: String,
    package_digest: String,
    package_path: String,
    schedule_json: String,
    started_at: i64,
    finished_at: Option<i64>,
    outcome: String,
}

fn raw_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawUpgrade> {
    Ok(RawUpgrade {
        id: row.get(0)?,
        cluster: row.get(1)?,
        runbook_name: row.get(2)?,
        runbook_sha256: row.get(3)?,
        runbook_text: row.get(4)?,
        package_digest: row.get(5)?,
        package_path: row.get(6)?,
        schedule_json: row.get(7)?,
        started_at: row.get(8)?,
        finished_at: row.get(9)?,
        outcome: row.get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_and_its_journal_round_trip_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.db")).expect("open");
        store
            .create_upgrade(&NewUpgrade {
                id: "u1".into(),
                cluster: "c".into(),
                runbook_name: "rb".into(),
                runbook_sha256: "ab".into(),
                runbook_text: "runbook: rb".into(),
                package_digest: String::new(),
                package_path: String::new(),
                schedule_json: "[]".into(),
            })
            .expect("create");
        assert_eq!(store.append_upgrade_entry("u1", "\"a\"").expect("a"), 1);
        assert_eq!(store.append_upgrade_entry("u1", "\"b\"").expect("b"), 2);
        let entries: Vec<String> = store
            .upgrade_entries("u1")
            .expect("entries")
            .into_iter()
            .map(|(_, json)| json)
            .collect();
        assert_eq!(entries, vec!["\"a\"", "\"b\""]);
        store
            .set_upgrade_outcome("u1", UpgradeOutcome::Completed)
            .expect("outcome");
        let record = store.upgrade("u1").expect("read").expect("there");
        assert_eq!(record.outcome, UpgradeOutcome::Completed);
        assert!(record.finished_at.is_some());
        assert_eq!(store.list_upgrades(Some("c")).expect("list").len(), 1);
        assert!(store.list_upgrades(Some("other")).expect("list").is_empty());
        assert!(
            store
                .set_upgrade_outcome("nope", UpgradeOutcome::Halted)
                .is_err()
        );
    }
}
