//! The controller's records in one SQLite file (`$PATCHCTL_HOME/patchctl.db`): clusters, per-node `(patched)`
//! marks, `--overwrite` packages per role, the rollout lock, and every rollout's journal and audit trail.
//!
//! Why SQLite and not redb: `patchctl display` and `patchctl audit` must read the store while another
//! `patchctl patch` process is writing its journal, and two processes must be able to race for the rollout lock.
//! redb allows one process per database file; SQLite in WAL mode gives many readers plus one writer across
//! processes, with a busy timeout instead of an error when two writers meet.
//!
//! Every public call is one transaction, so a process killed at any point leaves a consistent database: the last
//! committed journal row is the truth the next `patchctl patch --resume` starts from.
//!
//! The schema version lives in `PRAGMA user_version`; [`MIGRATIONS`] upgrades older files in place, and a file
//! written by a newer `patchctl` is refused rather than misread.

use crate::home::Home;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How long a call waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Schema migrations, in order; migration `i` brings `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// Errors of the store. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The home directory could not be created.
    #[error(
        "cannot create the patchctl home {path}: {source}; check its permissions or set --home"
    )]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was written by a newer patchctl.
    #[error(
        "store {path} has schema version {found}, this patchctl knows up to {known}: use the newer patchctl that \
         wrote it"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// Another live process holds the rollout lock of this cluster.
    #[error(
        "cluster {cluster} is locked by a rollout of patchctl pid {pid} on host {host}, started {started_at}; wait \
         for it to finish (`patchctl audit {cluster}` shows it), or, if that process is gone, remove the lock with \
         `patchctl cluster unlock {cluster}`"
    )]
    Locked {
        /// The cluster.
        cluster: String,
        /// PID of the holder.
        pid: u32,
        /// When the holder took the lock.
        started_at: Timestamp,
        /// Hostname of the holder.
        host: String,
    },
    /// `patchctl cluster unlock` without `--force` while the holder still runs on this host.
    #[error(
        "the rollout lock of cluster {cluster} is held by patchctl pid {pid} on this host ({host}), started \
         {started_at}, and that process is still running; wait for it to finish or stop it (Ctrl-C records its \
         state; continue with `patchctl patch --resume {cluster}`), or pass `--force` to remove the lock anyway"
    )]
    HolderAlive {
        /// The cluster.
        cluster: String,
        /// PID of the holder.
        pid: u32,
        /// When the holder took the lock.
        started_at: Timestamp,
        /// Hostname of the holder (this host).
        host: String,
    },
    /// A referenced record does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, e.g. `rollout r-…`.
        what: String,
    },
    /// A stored value is not one this build understands (a newer or a damaged file).
    #[error("store {path}: unexpected value {value:?} in {column}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Table and column.
        column: String,
        /// The value.
        value: String,
    },
}

/// A point in time, stored as Unix milliseconds, shown and serialized as RFC 3339 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(self) -> i64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = i128::from(self.0) * 1_000_000;
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&format).ok())
        {
            Some(text) => f.write_str(&text),
            None => write!(f, "@{}ms", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A registered cluster: its topology file as imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredCluster {
    /// Cluster name (the import name).
    pub name: String,
    /// The topology YAML text, verbatim.
    pub yaml: String,
    /// Where it was imported from.
    pub source_path: String,
    /// First import.
    pub created_at: Timestamp,
    /// Last (re-)import.
    pub imported_at: Timestamp,
}

/// The `(patched)` marker of one node: the package it last received through a successful rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeMark {
    /// Node ID.
    pub node_id: String,
    /// The rollout that patched it.
    pub rollout_id: String,
    /// Tree digest of the package.
    pub digest: String,
    /// Package version label.
    pub version: String,
    /// When.
    pub patched_at: Timestamp,
}

/// The package recorded for a role by `patch --overwrite` (what a scale-out deploys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolePackage {
    /// Role name.
    pub role: String,
    /// Tree digest.
    pub digest: String,
    /// Package file path on the controller.
    pub path: String,
    /// Version label.
    pub version: String,
    /// When it was recorded.
    pub set_at: Timestamp,
}

/// Who holds (or held) a rollout lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockHolder {
    /// PID.
    pub pid: u32,
    /// Hostname.
    pub host: String,
    /// When the lock was taken.
    pub started_at: Timestamp,
}

/// The right to run a rollout on one cluster. Released when dropped (or by [`RolloutLock::release`]); a holder
/// killed with SIGKILL leaves a stale row that the next [`Store::acquire_rollout_lock`] on the same host detects
/// (the PID is gone, or it belongs to a different process) and takes over.
#[derive(Debug)]
pub struct RolloutLock {
    cluster: String,
    token: String,
    path: PathBuf,
    released: bool,
    /// Set when a stale lock of a dead process was taken over (the caller may tell the operator).
    pub taken_over_from: Option<LockHolder>,
}

/// Whether a rollout patches or rolls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    /// `patchctl patch`.
    Patch,
    /// `patchctl rollback`.
    Rollback,
}

impl RolloutKind {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::Patch => "patch",
            RolloutKind::Rollback => "rollback",
        }
    }
}

impl fmt::Display for RolloutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutKind {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "patch" => Ok(RolloutKind::Patch),
            "rollback" => Ok(RolloutKind::Rollback),
            other => Err(UnknownValue(other.to_string())),
        }
    }
}

/// A string that names no variant of a stored enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value `{0}`")]
pub struct UnknownValue(pub String);

/// State of a whole rollout.
///
/// Unfinished (a `--resume` picks it up): `Planned`, `Running`, `Paused`, `Interrupted`.
/// Finished: `Succeeded`, `Halted`, `Failed`, `Cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Journaled, nothing done yet.
    Planned,
    /// Staging or rolling through batches (also what a SIGKILLed process leaves behind).
    Running,
    /// Waiting after the canary batch.
    Paused,
    /// Stopped by Ctrl-C after finishing the steps in flight; resumable.
    Interrupted,
    /// Every planned node done.
    Succeeded,
    /// Stopped because the failure budget was spent; every node is on a working version.
    Halted,
    /// Ended by an error that is not a node failure (reported in the journal).
    Failed,
    /// Abandoned by the operator (e.g. declined after the canary); not resumable.
    Cancelled,
}

impl RolloutState {
    /// Every state, in lifecycle order.
    pub const ALL: [RolloutState; 8] = [
        RolloutState::Planned,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Interrupted,
        RolloutState::Succeeded,
        RolloutState::Halted,
        RolloutState::Failed,
        RolloutState::Cancelled,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Planned => "planned",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Interrupted => "interrupted",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Halted => "halted",
            RolloutState::Failed => "failed",
            RolloutState::Cancelled => "cancelled",
        }
    }

    /// Whether `--resume` may continue a rollout in this state.
    pub fn is_unfinished(self) -> bool {
        matches!(
            self,
            RolloutState::Planned
                | RolloutState::Running
                | RolloutState::Paused
                | RolloutState::Interrupted
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutState {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        RolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownValue(text.into()))
    }
}

/// The one state machine of a node inside a rollout (patch or rollback). The executor moves a node forward
/// through it and journals every move with [`Store::set_node_state`] *before* doing the step's effect where that
/// matters for a crash, so a resumed controller knows what may be half-done:
///
/// ```text
/// Pending → Staged → Draining → Drained → Applying → Applied → Done
///                        │           │          ├──────→ Reverted   (agent reverted: failed probation)
///                        └───────────┴──────────┴──────→ Failed     (drain timeout, unreachable, error)
/// Pending/Staged ─────────────────────────────────────→ Skipped    (halted before its turn, or nothing to do)
/// ```
///
/// * `Draining`/`Drained`: the node may be offline in the cluster; a resume must finish or undo that.
/// * `Applying`: the outcome is known only to the agent; a resume asks it.
/// * `Applied`: new version running and healthy; `online`/`wait_online` may still be owed.
/// * Terminal: `Done`, `Reverted`, `Failed`, `Skipped` (a resume never touches such a node again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRolloutState {
    /// In the plan, nothing done.
    Pending,
    /// The package is staged on the node's agent; nothing live changed.
    Staged,
    /// The `offline` hook was (or is being) called; waiting for the cluster to report the node out.
    Draining,
    /// The cluster reports the node out.
    Drained,
    /// The agent was asked to apply (stop, swap, start, probation).
    Applying,
    /// The agent reports the new files running and healthy; bringing the node back online.
    Applied,
    /// The agent reverted the node to its previous files (probation failed); counts against the budget.
    Reverted,
    /// A step failed and the node was left on its previous files (drain timeout, unreachable agent, hook error).
    Failed,
    /// Not processed: the rollout halted before its turn, or it already ran the package.
    Skipped,
    /// Patched, back online and healthy.
    Done,
}

impl NodeRolloutState {
    /// Every state, in lifecycle order.
    pub const ALL: [NodeRolloutState; 10] = [
        NodeRolloutState::Pending,
        NodeRolloutState::Staged,
        NodeRolloutState::Draining,
        NodeRolloutState::Drained,
        NodeRolloutState::Applying,
        NodeRolloutState::Applied,
        NodeRolloutState::Reverted,
        NodeRolloutState::Failed,
        NodeRolloutState::Skipped,
        NodeRolloutState::Done,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRolloutState::Pending => "pending",
            NodeRolloutState::Staged => "staged",
            NodeRolloutState::Draining => "draining",
            NodeRolloutState::Drained => "drained",
            NodeRolloutState::Applying => "applying",
            NodeRolloutState::Applied => "applied",
            NodeRolloutState::Reverted => "reverted",
            NodeRolloutState::Failed => "failed",
            NodeRolloutState::Skipped => "skipped",
            NodeRolloutState::Done => "done",
        }
    }

    /// A resume never touches a node in a terminal state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            NodeRolloutState::Done
                | NodeRolloutState::Reverted
                | NodeRolloutState::Failed
                | NodeRolloutState::Skipped
        )
    }

    /// Counts against the failure budget.
    pub fn is_failure(self) -> bool {
        matches!(self, NodeRolloutState::Reverted | NodeRolloutState::Failed)
    }
}

impl fmt::Display for NodeRolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeRolloutState {
    type Err = UnknownValue;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        NodeRolloutState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownValue(text.into()))
    }
}

/// Options a rollout needs again when resumed, stored as JSON with the rollout (`options_json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// The agent idempotency key of this rollout.
    pub patch_id: String,
    /// `--offline`.
    pub offline: bool,
    /// `--overwrite`.
    pub overwrite: bool,
    /// `--concurrency` (parallel stagings).
    pub concurrency: usize,
    /// `--canary-wait` in milliseconds.
    pub canary_wait_ms: Option<u64>,
    /// `rollback --to`.
    pub to_patch_id: Option<String>,
    /// Component of the package (patch only).
    pub component: String,
}

/// What [`Store::create_rollout`] journals before anything is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    /// Unique ID ([`new_rollout_id`] makes one).
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Patch or rollback.
    pub kind: RolloutKind,
    /// Tree digest of the package (empty for a rollback without one).
    pub package_digest: String,
    /// Package file on the controller.
    pub package_path: String,
    /// Package version label.
    pub version: String,
    /// The `patchd_planner::Plan` as JSON.
    pub plan_json: String,
    /// The command-line options needed to resume, as JSON.
    pub options_json: String,
}

/// A journaled rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollout {
    /// ID.
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Patch or rollback.
    pub kind: RolloutKind,
    /// Current state.
    pub state: RolloutState,
    /// Tree digest of the package.
    pub package_digest: String,
    /// Package file on the controller.
    pub package_path: String,
    /// Package version label.
    pub version: String,
    /// The plan, as JSON.
    pub plan_json: String,
    /// The options, as JSON.
    pub options_json: String,
    /// When it was journaled.
    pub created_at: Timestamp,
    /// Last state change.
    pub updated_at: Timestamp,
}

/// A node's current state in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeState {
    /// Node ID.
    pub node_id: String,
    /// State.
    pub state: NodeRolloutState,
    /// When it was set.
    pub updated_at: Timestamp,
}

/// One row of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// Step name (`stage`, `offline`, `wait_offline`, `apply`, `online`, …).
    pub step: String,
    /// `started`, or the step's result (`ok`, `failed`, `timeout`, …).
    pub state: String,
    /// Free text: the reason of a failure, a version, a URL.
    pub detail: String,
    /// When it was recorded.
    pub at: Timestamp,
    /// For a result row: time since the matching `started` row of the same node and step, else since the node's
    /// previous row. `None` for a `started` row and for a node's first row.
    pub duration_ms: Option<u64>,
}

/// Everything one node went through in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    /// Node ID.
    pub node_id: String,
    /// Final (or current) state; `None` if only steps were recorded.
    pub state: Option<NodeRolloutState>,
    /// Steps in order.
    pub steps: Vec<StepRecord>,
    /// Time from the node's first to its last row.
    pub duration_ms: u64,
    /// The detail of the last failed/timed-out/reverted step, if any.
    pub reason: Option<String>,
}

/// A rollout with its per-node history (`patchctl audit --rollout ID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutReport {
    /// The rollout.
    pub rollout: Rollout,
    /// Nodes in the order they were first recorded.
    pub nodes: Vec<NodeReport>,
}

/// A fresh rollout ID: UTC time to the second plus the PID, e.g. `r20261121-153012-4242`. Sorts by time.
pub fn new_rollout_id() -> String {
    let format = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    let now = time::OffsetDateTime::now_utc();
    let stamp = now
        .format(&format)
        .unwrap_or_else(|_| Timestamp::now().0.to_string());
    format!("r{stamp}-{}", std::process::id())
}

/// The controller's database. Cheap to share (`Arc<Store>`): calls serialize on one connection.
#[derive(Debug)]
pub struct Store {
    connection: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store of a patchctl home.
    pub fn open_home(home: &Home) -> Result<Store, StoreError> {
        std::fs::create_dir_all(home.root()).map_err(|source| StoreError::Io {
            path: home.root().to_path_buf(),
            source,
        })?;
        Store::open(&home.store_path())
    }

    /// Opens (creating if needed) a store file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let connection = open_connection(path)?;
        migrate(&connection, path)?;
        Ok(Store {
            connection: Mutex::new(connection),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the guard cannot leave SQLite inconsistent (every call is one transaction).
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, column: &str, value: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            column: column.to_string(),
            value: value.to_string(),
        }
    }

    // ----- clusters -----

    /// Registers a cluster, or replaces its topology (re-import). Returns `true` when it was new.
    pub fn save_cluster(
        &self,
        name: &str,
        topology_yaml: &str,
        source_path: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        let now = Timestamp::now().0;
        let existed: bool = tx
            .query_row("SELECT 1 FROM clusters WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map_err(|e| self.sql(e))?
            .is_some();
        if existed {
            tx.execute(
                "UPDATE clusters SET yaml = ?2, source_path = ?3, imported_at = ?4 WHERE name = ?1",
                params![name, topology_yaml, source_path, now],
            )
        } else {
            tx.execute(
                "INSERT INTO clusters (name, yaml, source_path, created_at, imported_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                params![name, topology_yaml, source_path, now],
            )
        }
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(!existed)
    }

    /// A registered cluster, if any.
    pub fn load_cluster(&self, name: &str) -> Result<Option<StoredCluster>, StoreError> {
        self.conn()
            .query_row(
                "SELECT name, yaml, source_path, created_at, imported_at FROM clusters WHERE name = ?1",
                [name],
                cluster_from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Every registered cluster, by name.
    pub fn list_clusters(&self) -> Result<Vec<StoredCluster>, StoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare("SELECT name, yaml, source_path, created_at, imported_at FROM clusters ORDER BY name")
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], cluster_from_row)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    // ----- node marks and role packages -----

    /// Records that a rollout patched a node (the `(patched)` marker).
    pub fn mark_patched(
        &self,
        cluster: &str,
        node_id: &str,
        rollout_id: &str,
        digest: &str,
        version: &str,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO node_marks (cluster, node_id, rollout_id, digest, version, patched_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (cluster, node_id) DO UPDATE SET rollout_id = excluded.rollout_id,
                   digest = excluded.digest, version = excluded.version, patched_at = excluded.patched_at",
                params![cluster, node_id, rollout_id, digest, version, Timestamp::now().0],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Removes a node's `(patched)` marker (a rollback brought it back to its deployed version).
    pub fn unmark_patched(&self, cluster: &str, node_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM node_marks WHERE cluster = ?1 AND node_id = ?2",
                params![cluster, node_id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The `(patched)` markers of a cluster, by node ID.
    pub fn node_marks(&self, cluster: &str) -> Result<Vec<NodeMark>, StoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare(
                "SELECT node_id, rollout_id, digest, version, patched_at FROM node_marks WHERE cluster = ?1
                 ORDER BY node_id",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([cluster], |row| {
                Ok(NodeMark {
                    node_id: row.get(0)?,
                    rollout_id: row.get(1)?,
                    digest: row.get(2)?,
                    version: row.get(3)?,
                    patched_at: Timestamp(row.get(4)?),
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    /// Records the package of a role (`patch --overwrite`): what a future scale-out deploys.
    pub fn set_role_package(
        &self,
        cluster: &str,
        role: &str,
        digest: &str,
        path: &str,
        version: &str,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO role_packages (cluster, role, digest, path, version, set_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (cluster, role) DO UPDATE SET digest = excluded.digest, path = excluded.path,
                   version = excluded.version, set_at = excluded.set_at",
                params![cluster, role, digest, path, version, Timestamp::now().0],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The `--overwrite` packages of a cluster, by role.
    pub fn role_packages(&self, cluster: &str) -> Result<Vec<RolePackage>, StoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare("SELECT role, digest, path, version, set_at FROM role_packages WHERE cluster = ?1 ORDER BY role")
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([cluster], |row| {
                Ok(RolePackage {
                    role: row.get(0)?,
                    digest: row.get(1)?,
                    path: row.get(2)?,
                    version: row.get(3)?,
                    set_at: Timestamp(row.get(4)?),
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    // ----- rollout lock -----

    /// Takes the rollout lock of a cluster for this process. Refused with [`StoreError::Locked`] while another
    /// live process holds it; a lock left by a dead process on this host is taken over (with a warning, and
    /// [`RolloutLock::taken_over_from`] set).
    pub fn acquire_rollout_lock(&self, cluster: &str) -> Result<RolloutLock, StoreError> {
        let me = ProcessIdentity::current();
        let token = format!("{}-{}-{}", me.host, me.pid, Timestamp::now().0);
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        let existing = self.read_lock_row(&tx, cluster)?;
        let mut taken_over_from = None;
        if let Some((holder, started_at)) = existing {
            if !holder.is_stale(&me) {
                return Err(StoreError::Locked {
                    cluster: cluster.to_string(),
                    pid: holder.pid,
                    started_at,
                    host: holder.host,
                });
            }
            tracing::warn!(
                cluster,
                pid = holder.pid,
                host = %holder.host,
                started_at = %started_at,
                "taking over the rollout lock of a patchctl process that no longer runs"
            );
            taken_over_from = Some(LockHolder {
                pid: holder.pid,
                host: holder.host,
                started_at,
            });
            tx.execute("DELETE FROM rollout_locks WHERE cluster = ?1", [cluster])
                .map_err(|e| self.sql(e))?;
        }
        tx.execute(
            "INSERT INTO rollout_locks (cluster, token, pid, host, boot_id, proc_start, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                cluster,
                token,
                me.pid,
                me.host,
                me.boot_id,
                me.proc_start,
                Timestamp::now().0
            ],
        )
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(RolloutLock {
            cluster: cluster.to_string(),
            token,
            path: self.path.clone(),
            released: false,
            taken_over_from,
        })
    }

    /// The holder's identity and start time from a cluster's rollout-lock row, read inside `tx`.
    fn read_lock_row(
        &self,
        tx: &rusqlite::Transaction<'_>,
        cluster: &str,
    ) -> Result<Option<(ProcessIdentity, Timestamp)>, StoreError> {
        tx.query_row(
            "SELECT pid, host, boot_id, proc_start, started_at FROM rollout_locks WHERE cluster = ?1",
            [cluster],
            |row| {
                Ok((
                    ProcessIdentity {
                        pid: row.get(0)?,
                        host: row.get(1)?,
                        boot_id: row.get(2)?,
                        proc_start: row.get(3)?,
                    },
                    Timestamp(row.get(4)?),
                ))
            },
        )
        .optional()
        .map_err(|e| self.sql(e))
    }

    /// Who holds the rollout lock of a cluster, if anyone (alive or not).
    pub fn rollout_lock_holder(&self, cluster: &str) -> Result<Option<LockHolder>, StoreError> {
        self.conn()
            .query_row(
                "SELECT pid, host, started_at FROM rollout_locks WHERE cluster = ?1",
                [cluster],
                |row| {
                    Ok(LockHolder {
                        pid: row.get(0)?,
                        host: row.get(1)?,
                        started_at: Timestamp(row.get(2)?),
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Removes a cluster's rollout lock (`patchctl cluster unlock`, for a holder on another host that is known to
    /// be gone). Refused with [`StoreError::HolderAlive`] when the holder is a live process on this host, unless
    /// `force`. Returns the holder that was removed.
    pub fn force_unlock(
        &self,
        cluster: &str,
        force: bool,
    ) -> Result<Option<LockHolder>, StoreError> {
        let me = ProcessIdentity::current();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        let existing = self.read_lock_row(&tx, cluster)?;
        let Some((holder, started_at)) = existing else {
            return Ok(None);
        };
        if !force && holder.host == me.host && !holder.is_stale(&me) {
            return Err(StoreError::HolderAlive {
                cluster: cluster.to_string(),
                pid: holder.pid,
                started_at,
                host: holder.host,
            });
        }
        tx.execute("DELETE FROM rollout_locks WHERE cluster = ?1", [cluster])
            .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(Some(LockHolder {
            pid: holder.pid,
            host: holder.host,
            started_at,
        }))
    }

    // ----- rollout journal -----

    /// Journals a new rollout in state `Planned`.
    pub fn create_rollout(&self, rollout: &NewRollout) -> Result<(), StoreError> {
        let now = Timestamp::now().0;
        self.conn()
            .execute(
                "INSERT INTO rollouts (id, cluster, kind, state, package_digest, package_path, version, plan_json,
                   options_json, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
                params![
                    rollout.id,
                    rollout.cluster,
                    rollout.kind.as_str(),
                    RolloutState::Planned.as_str(),
                    rollout.package_digest,
                    rollout.package_path,
                    rollout.version,
                    rollout.plan_json,
                    rollout.options_json,
                    now
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Moves a rollout to a new state.
    pub fn set_rollout_state(&self, id: &str, state: RolloutState) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute(
                "UPDATE rollouts SET state = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, state.as_str(), Timestamp::now().0],
            )
            .map_err(|e| self.sql(e))?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                what: format!("rollout {id}"),
            });
        }
        Ok(())
    }

    /// Appends one row to the audit trail of a node (timestamped now). Rows are never changed or deleted.
    /// Convention: a step's start is recorded with state `started`, its end with its result (`ok`, `failed`,
    /// `timeout`, `reverted`, …) and the reason in `detail`.
    pub fn record_node_step(
        &self,
        rollout_id: &str,
        node_id: &str,
        step: &str,
        state: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO rollout_steps (rollout_id, node_id, step, state, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![rollout_id, node_id, step, state, detail, Timestamp::now().0],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Sets a node's state in a rollout (inserting it the first time).
    pub fn set_node_state(
        &self,
        rollout_id: &str,
        node_id: &str,
        state: NodeRolloutState,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO rollout_nodes (rollout_id, node_id, state, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rollout_id, node_id) DO UPDATE SET state = excluded.state,
                   updated_at = excluded.updated_at",
                params![rollout_id, node_id, state.as_str(), Timestamp::now().0],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The current state of every node recorded in a rollout, in the order they were first set.
    pub fn node_states(&self, rollout_id: &str) -> Result<Vec<NodeState>, StoreError> {
        let raw: Vec<(String, String, i64)> = {
            let conn = self.conn();
            let mut statement = conn
                .prepare("SELECT node_id, state, updated_at FROM rollout_nodes WHERE rollout_id = ?1 ORDER BY rowid")
                .map_err(|e| self.sql(e))?;
            let rows = statement
                .query_map([rollout_id], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(|e| self.sql(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.sql(e))?
        };
        raw.into_iter()
            .map(|(node_id, state, updated_at)| {
                let state = state
                    .parse()
                    .map_err(|_| self.corrupt("rollout_nodes.state", &state))?;
                Ok(NodeState {
                    node_id,
                    state,
                    updated_at: Timestamp(updated_at),
                })
            })
            .collect()
    }

    /// One rollout by ID.
    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
                [id],
                RawRollout::from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        raw.map(|raw| raw.into_rollout(self)).transpose()
    }

    /// The newest rollout of a cluster that is not finished (see [`RolloutState::is_unfinished`]), for `--resume`.
    pub fn unfinished_rollout(&self, cluster: &str) -> Result<Option<Rollout>, StoreError> {
        let unfinished: Vec<&str> = RolloutState::ALL
            .into_iter()
            .filter(|s| s.is_unfinished())
            .map(RolloutState::as_str)
            .collect();
        let raw = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE cluster = ?1 AND state IN (?2, ?3, ?4, ?5)
                     ORDER BY created_at DESC, rowid DESC LIMIT 1"
                ),
                params![cluster, unfinished[0], unfinished[1], unfinished[2], unfinished[3]],
                RawRollout::from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        raw.map(|raw| raw.into_rollout(self)).transpose()
    }

    /// Rollouts, oldest first, of one cluster or of all.
    pub fn list_rollouts(&self, cluster: Option<&str>) -> Result<Vec<Rollout>, StoreError> {
        let raw: Vec<RawRollout> = {
            let conn = self.conn();
            let mut statement = conn
                .prepare(&format!(
                    "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE ?1 IS NULL OR cluster = ?1
                     ORDER BY created_at, rowid"
                ))
                .map_err(|e| self.sql(e))?;
            let rows = statement
                .query_map([cluster], RawRollout::from_row)
                .map_err(|e| self.sql(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.sql(e))?
        };
        raw.into_iter().map(|raw| raw.into_rollout(self)).collect()
    }

    /// A rollout with every node's state and steps (the audit report). `None` if there is no such rollout.
    pub fn rollout_report(&self, id: &str) -> Result<Option<RolloutReport>, StoreError> {
        let Some(rollout) = self.rollout(id)? else {
            return Ok(None);
        };
        let states = self.node_states(id)?;
        let steps: Vec<(String, String, String, String, i64)> = {
            let conn = self.conn();
            let mut statement = conn
                .prepare(
                    "SELECT node_id, step, state, detail, at FROM rollout_steps WHERE rollout_id = ?1 ORDER BY seq",
                )
                .map_err(|e| self.sql(e))?;
            let rows = statement
                .query_map([id], |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                })
                .map_err(|e| self.sql(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.sql(e))?
        };
        Ok(Some(build_report(rollout, states, steps)))
    }
}

fn build_report(
    rollout: Rollout,
    states: Vec<NodeState>,
    steps: Vec<(String, String, String, String, i64)>,
) -> RolloutReport {
    let mut nodes: Vec<NodeReport> = Vec::new();
    let mut index_of = std::collections::HashMap::new();
    let mut node_entry = |node_id: &str, nodes: &mut Vec<NodeReport>| -> usize {
        *index_of.entry(node_id.to_string()).or_insert_with(|| {
            nodes.push(NodeReport {
                node_id: node_id.to_string(),
                state: None,
                steps: Vec::new(),
                duration_ms: 0,
                reason: None,
            });
            nodes.len() - 1
        })
    };
    for state in &states {
        let index = node_entry(&state.node_id, &mut nodes);
        nodes[index].state = Some(state.state);
    }
    for (node_id, step, state, detail, at) in steps {
        let index = node_entry(&node_id, &mut nodes);
        let node = &mut nodes[index];
        let at = Timestamp(at);
        let duration_ms = if state == "started" {
            None
        } else {
            let started = node
                .steps
                .iter()
                .rev()
                .find(|previous| previous.step == step && previous.state == "started");
            started
                .or(node.steps.last())
                .map(|previous| millis(at.since(previous.at)))
        };
        if is_failure_result(&state) {
            node.reason = Some(if detail.is_empty() {
                format!("{step} {state}")
            } else {
                detail.clone()
            });
        }
        node.steps.push(StepRecord {
            step,
            state,
            detail,
            at,
            duration_ms,
        });
    }
    for node in &mut nodes {
        if let (Some(first), Some(last)) = (node.steps.first(), node.steps.last()) {
            node.duration_ms = millis(last.at.since(first.at));
        }
    }
    RolloutReport { rollout, nodes }
}

fn is_failure_result(state: &str) -> bool {
    matches!(
        state,
        "failed" | "timeout" | "reverted" | "error" | "unreachable"
    )
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

const ROLLOUT_COLUMNS: &str = "id, cluster, kind, state, package_digest, package_path, version, plan_json, \
                               options_json, created_at, updated_at";

/// A `rollouts` row before its enums are checked.
struct RawRollout {
    id: String,
    cluster: String,
    kind: String,
    state: String,
    package_digest: String,
    package_path: String,
    version: String,
    plan_json: String,
    options_json: String,
    created_at: i64,
    updated_at: i64,
}

impl RawRollout {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            cluster: row.get(1)?,
            kind: row.get(2)?,
            state: row.get(3)?,
            package_digest: row.get(4)?,
            package_path: row.get(5)?,
            version: row.get(6)?,
            plan_json: row.get(7)?,
            options_json: row.get(8)?,
            created_at: row.get(9)?,
            updated_at: row.get(10)?,
        })
    }

    fn into_rollout(self, store: &Store) -> Result<Rollout, StoreError> {
        let kind = self
            .kind
            .parse()
            .map_err(|_| store.corrupt("rollouts.kind", &self.kind))?;
        let state = self
            .state
            .parse()
            .map_err(|_| store.corrupt("rollouts.state", &self.state))?;
        Ok(Rollout {
            id: self.id,
            cluster: self.cluster,
            kind,
            state,
            package_digest: self.package_digest,
            package_path: self.package_path,
            version: self.version,
            plan_json: self.plan_json,
            options_json: self.options_json,
            created_at: Timestamp(self.created_at),
            updated_at: Timestamp(self.updated_at),
        })
    }
}

fn cluster_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCluster> {
    Ok(StoredCluster {
        name: row.get(0)?,
        yaml: row.get(1)?,
        source_path: row.get(2)?,
        created_at: Timestamp(row.get(3)?),
        imported_at: Timestamp(row.get(4)?),
    })
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
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

fn migrate(connection: &Connection, path: &Path) -> Result<(), StoreError> {
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

/// Identifies a process well enough to tell a live lock holder from a dead one whose PID was reused.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcessIdentity {
    pid: u32,
    host: String,
    /// `/proc/sys/kernel/random/boot_id`: a reboot kills every holder.
    boot_id: Option<String>,
    /// Start time of the process in clock ticks since boot (`/proc/<pid>/stat` field 22): tells PID reuse.
    proc_start: Option<i64>,
}

impl ProcessIdentity {
    fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            host: hostname(),
            boot_id: boot_id(),
            proc_start: process_start_ticks(pid),
        }
    }

    /// A holder is stale only when we can tell from this host: same host and (other boot, or its PID is gone, or
    /// the PID now belongs to a process that started at another time). A holder on another host is never
    /// presumed dead.
    fn is_stale(&self, me: &ProcessIdentity) -> bool {
        if self.host != me.host {
            return false;
        }
        if let (Some(theirs), Some(mine)) = (&self.boot_id, &me.boot_id)
            && theirs != mine
        {
            return true;
        }
        if !pid_alive(self.pid) {
            return true;
        }
        match (self.proc_start, process_start_ticks(self.pid)) {
            (Some(recorded), Some(current)) => recorded != current,
            _ => false,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
}

fn process_start_ticks(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: fields after it start after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // after_name starts at field 3 (state); field 22 (starttime) is the 20th from there.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        // EPERM: it exists but belongs to someone else.
        Err(errno) => errno != nix::errno::Errno::ESRCH,
    }
}

impl RolloutLock {
    /// The cluster this lock is for.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Releases the lock now (dropping it does the same, logging instead of returning an error).
    pub fn release(mut self) -> Result<(), StoreError> {
        self.released = true;
        self.delete_row()
    }

    fn delete_row(&self) -> Result<(), StoreError> {
        let connection = open_connection(&self.path)?;
        connection
            .execute(
                "DELETE FROM rollout_locks WHERE cluster = ?1 AND token = ?2",
                params![self.cluster, self.token],
            )
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                source,
            })?;
        Ok(())
    }
}

impl Drop for RolloutLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(error) = self.delete_row() {
            tracing::warn!(cluster = %self.cluster, %error, "could not release the rollout lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open_home(&Home::at(dir.path().join("home"))).expect("open store");
        (dir, store)
    }

    fn new_rollout(id: &str, cluster: &str) -> NewRollout {
        NewRollout {
            id: id.into(),
            cluster: cluster.into(),
            kind: RolloutKind::Patch,
            package_digest: "abc".into(),
            package_path: "/tmp/p.tar.gz".into(),
            version: "v1.0.1".into(),
            plan_json: "{}".into(),
            options_json: "{}".into(),
        }
    }

    #[test]
    fn schema_is_created_once_and_newer_files_are_refused() {
        let (dir, store) = temp_store();
        let path = store.path().to_path_buf();
        drop(store);
        let reopened = Store::open(&path).expect("reopen");
        let version: i64 = reopened
            .conn()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("user_version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mode: String = reopened
            .conn()
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        reopened
            .conn()
            .pragma_update(None, "user_version", 99)
            .expect("bump");
        drop(reopened);
        let error = Store::open(&path).expect_err("newer schema refused");
        assert!(
            matches!(error, StoreError::NewerSchema { found: 99, .. }),
            "{error}"
        );
        drop(dir);
    }

    #[test]
    fn clusters_are_saved_updated_and_listed() {
        let (_dir, store) = temp_store();
        assert!(store.load_cluster("demo").expect("load").is_none());
        assert!(
            store
                .save_cluster("demo", "roles: {}\n", "/a.yaml")
                .expect("save")
        );
        assert!(store.save_cluster("alpha", "x", "/b.yaml").expect("save"));
        let first = store.load_cluster("demo").expect("load").expect("exists");
        assert!(
            !store
                .save_cluster("demo", "version: v2\n", "/c.yaml")
                .expect("re-import")
        );
        let updated = store.load_cluster("demo").expect("load").expect("exists");
        assert_eq!(updated.yaml, "version: v2\n");
        assert_eq!(updated.source_path, "/c.yaml");
        assert_eq!(updated.created_at, first.created_at);
        assert!(updated.imported_at >= first.imported_at);
        let names: Vec<String> = store
            .list_clusters()
            .expect("list")
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, vec!["alpha", "demo"]);
    }

    #[test]
    fn marks_and_role_packages_upsert() {
        let (_dir, store) = temp_store();
        store
            .mark_patched("demo", "n1", "r1", "d1", "v1")
            .expect("mark");
        store
            .mark_patched("demo", "n1", "r2", "d2", "v2")
            .expect("mark again");
        store
            .mark_patched("demo", "n2", "r2", "d2", "v2")
            .expect("mark");
        store
            .mark_patched("other", "n1", "r9", "d9", "v9")
            .expect("mark");
        let marks = store.node_marks("demo").expect("marks");
        assert_eq!(marks.len(), 2);
        assert_eq!(
            (marks[0].node_id.as_str(), marks[0].rollout_id.as_str()),
            ("n1", "r2")
        );
        store.unmark_patched("demo", "n1").expect("unmark");
        assert_eq!(store.node_marks("demo").expect("marks").len(), 1);

        store
            .set_role_package("demo", "worker", "d1", "/p1", "v1")
            .expect("set");
        store
            .set_role_package("demo", "worker", "d2", "/p2", "v2")
            .expect("overwrite");
        let packages = store.role_packages("demo").expect("packages");
        assert_eq!(packages.len(), 1);
        assert_eq!(
            (packages[0].digest.as_str(), packages[0].path.as_str()),
            ("d2", "/p2")
        );
        assert!(store.role_packages("other").expect("packages").is_empty());
    }

    #[test]
    fn journal_report_and_resume_lookup() {
        let (_dir, store) = temp_store();
        store
            .create_rollout(&new_rollout("r1", "demo"))
            .expect("create");
        store
            .create_rollout(&new_rollout("r2", "other"))
            .expect("create");
        assert!(
            store.create_rollout(&new_rollout("r1", "demo")).is_err(),
            "IDs are unique"
        );
        assert_eq!(
            store.rollout("r1").expect("get").expect("exists").state,
            RolloutState::Planned
        );
        assert_eq!(
            store
                .unfinished_rollout("demo")
                .expect("lookup")
                .map(|r| r.id),
            Some("r1".into())
        );

        store
            .set_rollout_state("r1", RolloutState::Running)
            .expect("state");
        store
            .set_node_state("r1", "n2", NodeRolloutState::Pending)
            .expect("node");
        store
            .set_node_state("r1", "n1", NodeRolloutState::Pending)
            .expect("node");
        store
            .record_node_step("r1", "n2", "offline", "started", "")
            .expect("step");
        std::thread::sleep(Duration::from_millis(20));
        store
            .record_node_step("r1", "n2", "offline", "ok", "")
            .expect("step");
        store
            .record_node_step("r1", "n2", "apply", "started", "")
            .expect("step");
        std::thread::sleep(Duration::from_millis(20));
        store
            .record_node_step("r1", "n2", "apply", "reverted", "health check failed: 503")
            .expect("step");
        store
            .set_node_state("r1", "n2", NodeRolloutState::Reverted)
            .expect("node");
        store
            .record_node_step("r1", "n1", "apply", "ok", "")
            .expect("step");
        store
            .set_node_state("r1", "n1", NodeRolloutState::Done)
            .expect("node");

        let states = store.node_states("r1").expect("states");
        let summary: Vec<(&str, NodeRolloutState)> = states
            .iter()
            .map(|state| (state.node_id.as_str(), state.state))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("n2", NodeRolloutState::Reverted),
                ("n1", NodeRolloutState::Done)
            ]
        );

        let report = store.rollout_report("r1").expect("report").expect("exists");
        assert_eq!(report.rollout.state, RolloutState::Running);
        assert_eq!(report.nodes.len(), 2);
        let n2 = &report.nodes[0];
        assert_eq!(n2.node_id, "n2");
        assert_eq!(n2.state, Some(NodeRolloutState::Reverted));
        assert_eq!(n2.steps.len(), 4);
        assert_eq!(n2.steps[0].duration_ms, None);
        assert!(n2.steps[1].duration_ms.expect("offline took time") >= 20);
        assert!(n2.steps[3].duration_ms.expect("apply took time") >= 20);
        assert!(n2.duration_ms >= 40);
        assert_eq!(n2.reason.as_deref(), Some("health check failed: 503"));
        assert_eq!(report.nodes[1].reason, None);
        assert!(store.rollout_report("nope").expect("report").is_none());

        store
            .set_rollout_state("r1", RolloutState::Halted)
            .expect("state");
        assert!(store.unfinished_rollout("demo").expect("lookup").is_none());
        assert!(matches!(
            store.set_rollout_state("nope", RolloutState::Running),
            Err(StoreError::NotFound { .. })
        ));
        let all: Vec<String> = store
            .list_rollouts(None)
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(all, vec!["r1", "r2"]);
        let demo: Vec<String> = store
            .list_rollouts(Some("demo"))
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(demo, vec!["r1"]);
    }

    #[test]
    fn enums_round_trip_through_their_names() {
        for state in NodeRolloutState::ALL {
            assert_eq!(state.as_str().parse::<NodeRolloutState>(), Ok(state));
        }
        for state in RolloutState::ALL {
            assert_eq!(state.as_str().parse::<RolloutState>(), Ok(state));
        }
        assert!("bogus".parse::<NodeRolloutState>().is_err());
        assert!(new_rollout_id().starts_with('r'));
    }

    #[test]
    fn second_connection_is_refused_with_the_holder_named() {
        let (_dir, first) = temp_store();
        let second = Store::open(first.path()).expect("second connection");
        let lock = first.acquire_rollout_lock("demo").expect("first lock");
        assert!(lock.taken_over_from.is_none());
        let error = second
            .acquire_rollout_lock("demo")
            .expect_err("second refused");
        let StoreError::Locked { pid, .. } = &error else {
            panic!("expected Locked, got {error}");
        };
        assert_eq!(*pid, std::process::id());
        let message = error.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("started 20"), "{message}");
        assert!(
            message.contains("patchctl cluster unlock demo"),
            "{message}"
        );
        // Another cluster is independent.
        let other = second.acquire_rollout_lock("other").expect("other cluster");
        drop(lock);
        let again = second
            .acquire_rollout_lock("demo")
            .expect("released on drop");
        again.release().expect("explicit release");
        assert!(first.rollout_lock_holder("demo").expect("holder").is_none());
        drop(other);
    }

    #[test]
    fn lock_of_a_dead_process_is_taken_over() {
        let (_dir, store) = temp_store();
        let mut child = Command::new("true").spawn().expect("spawn true");
        let dead_pid = child.id();
        child.wait().expect("reap");
        let me = ProcessIdentity::current();
        store
            .conn()
            .execute(
                "INSERT INTO rollout_locks (cluster, token, pid, host, boot_id, proc_start, started_at)
                 VALUES ('demo', 'old', ?1, ?2, ?3, NULL, 1)",
                params![dead_pid, me.host, me.boot_id],
            )
            .expect("plant stale lock");
        let lock = store
            .acquire_rollout_lock("demo")
            .expect("stale lock taken over");
        assert_eq!(
            lock.taken_over_from.as_ref().map(|holder| holder.pid),
            Some(dead_pid)
        );

        // A holder on another host is never presumed dead.
        store
            .conn()
            .execute(
                "INSERT INTO rollout_locks (cluster, token, pid, host, boot_id, proc_start, started_at)
                 VALUES ('remote', 't', ?1, 'some-other-host', NULL, NULL, 1)",
                params![dead_pid],
            )
            .expect("plant remote lock");
        let error = store
            .acquire_rollout_lock("remote")
            .expect_err("remote holder respected");
        assert!(error.to_string().contains("some-other-host"), "{error}");
        assert_eq!(
            store
                .force_unlock("remote", false)
                .expect("unlock")
                .map(|holder| holder.pid),
            Some(dead_pid)
        );
        let remote = store.acquire_rollout_lock("remote").expect("after unlock");

        // A live holder on this host (this very process) is respected unless forced.
        let error = store
            .force_unlock("remote", false)
            .expect_err("live local holder respected");
        assert!(
            matches!(error, StoreError::HolderAlive { pid, .. } if pid == me.pid),
            "{error}"
        );
        assert!(error.to_string().contains("--force"), "{error}");
        assert!(
            store
                .rollout_lock_holder("remote")
                .expect("holder")
                .is_some()
        );
        assert_eq!(
            store
                .force_unlock("remote", true)
                .expect("forced unlock")
                .map(|holder| holder.pid),
            Some(me.pid)
        );
        drop(remote);
    }

    /// Not a test on its own: the child process of `lock_between_processes` (holds the lock until stdin closes).
    #[test]
    #[ignore = "helper process for lock_between_processes"]
    fn lock_holder_child() {
        let Some(path) = std::env::var_os("PATCHCTL_STORE_LOCK_CHILD") else {
            return;
        };
        let store = Store::open(Path::new(&path)).expect("child opens store");
        let _lock = store.acquire_rollout_lock("demo").expect("child locks");
        println!("\nlocked");
        std::io::stdout().flush().expect("flush");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }

    #[test]
    fn lock_between_processes() {
        let (_dir, store) = temp_store();
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "store::tests::lock_holder_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PATCHCTL_STORE_LOCK_CHILD", store.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let child_pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let (said_locked, locked) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The harness may print `test … ... ` on the same line before the child's output.
                if line.trim_end().ends_with("locked") {
                    let _ = said_locked.send(());
                }
            }
        });
        if locked.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child process did not take the lock within 120 s");
        }
        let error = store
            .acquire_rollout_lock("demo")
            .expect_err("refused while the child runs");
        assert!(
            matches!(&error, StoreError::Locked { pid, .. } if *pid == child_pid),
            "{error}"
        );
        assert!(
            error.to_string().contains(&format!("pid {child_pid}")),
            "{error}"
        );

        // SIGKILL: the child cannot release; its row stays and must be recognised as stale.
        child.kill().expect("kill child");
        child.wait().expect("reap child");
        assert_eq!(
            store
                .rollout_lock_holder("demo")
                .expect("holder")
                .map(|h| h.pid),
            Some(child_pid)
        );
        let lock = store
            .acquire_rollout_lock("demo")
            .expect("taken over after SIGKILL");
        assert_eq!(
            lock.taken_over_from.as_ref().map(|holder| holder.pid),
            Some(child_pid)
        );
    }
}
