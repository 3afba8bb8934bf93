//! The controller's records in one SQLite file (`$PATCHCTL_HOME/patchctl.db`): clusters, per-node `(patched)`
//! marks, `--overwrite` packages per role, the rollout lock, every rollout's journal and audit trail, and every
//! upgrade (runbook) with its step journal (`upgrades.rs`).
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

mod lock;
mod queries;
mod records;
mod schema;
#[cfg(test)]
mod tests;
mod upgrades;

pub use lock::{LockHolder, RolloutLock};
pub use records::*;
pub use schema::MIGRATIONS;
use schema::{migrate, open_connection};
pub use upgrades::{NewUpgrade, UpgradeOutcome, UpgradeRecord};

use crate::home::Home;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

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

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the guard cannot leave SQLite inconsistent (every call is one transaction).
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn corrupt(&self, column: &str, value: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            column: column.to_string(),
            value: value.to_string(),
        }
    }

    // ----- clusters -----
}
