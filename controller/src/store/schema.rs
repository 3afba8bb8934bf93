//! The store's schema: the migrations that bring a file from any older `user_version` to this one, and opening a
//! connection (WAL, busy timeout).

use super::StoreError;
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;
use std::time::Duration;

/// How long a call waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Schema migrations, in order; migration `i` brings `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE clusters (
    name        TEXT PRIMARY KEY,
    yaml        TEXT NOT NULL,
    source_path TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    imported_at INTEGER NOT NULL
);
CREATE TABLE node_marks (
    cluster    TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    digest     TEXT NOT NULL,
    version    TEXT NOT NULL,
    patched_at INTEGER NOT NULL,
    PRIMARY KEY (cluster, node_id)
);
CREATE TABLE role_packages (
    cluster TEXT NOT NULL,
    role    TEXT NOT NULL,
    digest  TEXT NOT NULL,
    path    TEXT NOT NULL,
    version TEXT NOT NULL,
    set_at  INTEGER NOT NULL,
    PRIMARY KEY (cluster, role)
);
CREATE TABLE rollout_locks (
    cluster    TEXT PRIMARY KEY,
    token      TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    boot_id    TEXT,
    proc_start INTEGER,
    started_at INTEGER NOT NULL
);
CREATE TABLE rollouts (
    id             TEXT PRIMARY KEY,
    cluster        TEXT NOT NULL,
    kind           TEXT NOT NULL,
    state          TEXT NOT NULL,
    package_digest TEXT NOT NULL,
    package_path   TEXT NOT NULL,
    version        TEXT NOT NULL,
    plan_json      TEXT NOT NULL,
    options_json   TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX rollouts_by_cluster ON rollouts (cluster, created_at);
CREATE TABLE rollout_nodes (
    rollout_id TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    state      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, node_id)
);
CREATE TABLE rollout_steps (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    state      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    at         INTEGER NOT NULL
);
CREATE INDEX rollout_steps_by_rollout ON rollout_steps (rollout_id, seq);
"#,
    r#"
CREATE TABLE store_identity (
    id TEXT NOT NULL
);
INSERT INTO store_identity (id) VALUES ('store-' || lower(hex(randomblob(8))));
"#,
    r#"
CREATE TABLE upgrades (
    id             TEXT PRIMARY KEY,
    cluster        TEXT NOT NULL,
    runbook_name   TEXT NOT NULL,
    runbook_sha256 TEXT NOT NULL,
    runbook_text   TEXT NOT NULL,
    package_digest TEXT NOT NULL,
    package_path   TEXT NOT NULL,
    schedule_json  TEXT NOT NULL,
    started_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    outcome        TEXT NOT NULL
);
CREATE INDEX upgrades_by_cluster ON upgrades (cluster, started_at);
CREATE TABLE upgrade_journal (
    upgrade_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    entry_json TEXT NOT NULL,
    at         INTEGER NOT NULL,
    PRIMARY KEY (upgrade_id, seq)
);
"#,
];

pub(super) fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let connection = Connection::open(path).map_err(sql)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    // WAL: readers (display, audit) never block the rollout's writer, across processes.
    let _mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sql)?;
    // In WAL mode NORMAL is still crash-consistent (a commit may be lost on power failure, never half-applied).
    connection
        .pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    connection
        .pragma_update(None, "foreign_keys", "ON")
        .map_err(sql)?;
    Ok(connection)
}

pub(super) fn migrate(connection: &Connection, path: &Path) -> Result<(), StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    loop {
        // IMMEDIATE: two processes opening a fresh file at once must not both run migration 0.
        let tx = rusqlite::Transaction::new_unchecked(connection, TransactionBehavior::Immediate)
            .map_err(sql)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(sql)?;
        if version > known {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        let Some(migration) = usize::try_from(version)
            .ok()
            .and_then(|index| MIGRATIONS.get(index))
        else {
            return Ok(());
        };
        tx.execute_batch(migration).map_err(sql)?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
}
