//! The per-cluster rollout lock: one row per cluster naming its holder's host, PID and start time (from
//! `/proc/<pid>/stat`), so a lock left by a killed process is told apart from a live one and taken over.

use super::records::Timestamp;
use super::schema::open_connection;
use super::{Store, StoreError};
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use std::path::PathBuf;

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

impl Store {
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
}

/// Identifies a process well enough to tell a live lock holder from a dead one whose PID was reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ProcessIdentity {
    pub(super) pid: u32,
    pub(super) host: String,
    /// `/proc/sys/kernel/random/boot_id`: a reboot kills every holder.
    pub(super) boot_id: Option<String>,
    /// Start time of the process in clock ticks since boot (`/proc/<pid>/stat` field 22): tells PID reuse.
    proc_start: Option<i64>,
}

impl ProcessIdentity {
    pub(super) fn current() -> Self {
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

/// Stored as SQLite's i64 (clock ticks since boot never come near its limit).
fn process_start_ticks(pid: u32) -> Option<i64> {
    patchd_procstat::start_ticks(pid).and_then(|ticks| i64::try_from(ticks).ok())
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
