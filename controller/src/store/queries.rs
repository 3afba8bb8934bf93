//! The store's queries: clusters, `(patched)` marks, role packages, and the rollout journal and its reports.
//! Every public call is one transaction.

use super::records::*;
use super::{Store, StoreError};
use patchd_package::digest::TreeDigest;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use std::time::Duration;

impl Store {
    /// This store's id, made once when the store was created: names the controller (one per `PATCHCTL_HOME`)
    /// in the leases it takes on agents.
    pub fn store_id(&self) -> Result<String, StoreError> {
        self.conn()
            .query_row("SELECT id FROM store_identity LIMIT 1", [], |row| {
                row.get(0)
            })
            .map_err(|e| self.sql(e))
    }

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
        digest: &TreeDigest,
        version: &str,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO node_marks (cluster, node_id, rollout_id, digest, version, patched_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (cluster, node_id) DO UPDATE SET rollout_id = excluded.rollout_id,
                   digest = excluded.digest, version = excluded.version, patched_at = excluded.patched_at",
                params![cluster, node_id, rollout_id, digest.as_str(), version, Timestamp::now().0],
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

    /// Forgets what earlier rollouts left on a cluster that was deployed afresh (`demo up`): its `(patched)` markers
    /// and `--overwrite` role packages describe binaries that no longer run. The rollout history stays for `audit`.
    pub fn forget_deployment(&self, cluster: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sql(e))?;
        for table in ["node_marks", "role_packages"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE cluster = ?1"),
                [cluster],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))
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
                    digest: digest_column(row, 2)?,
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
        digest: &TreeDigest,
        path: &str,
        version: &str,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO role_packages (cluster, role, digest, path, version, set_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (cluster, role) DO UPDATE SET digest = excluded.digest, path = excluded.path,
                   version = excluded.version, set_at = excluded.set_at",
                params![cluster, role, digest.as_str(), path, version, Timestamp::now().0],
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
                    digest: digest_column(row, 1)?,
                    path: row.get(2)?,
                    version: row.get(3)?,
                    set_at: Timestamp(row.get(4)?),
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

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
                    rollout.package_digest.as_ref().map_or("", TreeDigest::as_str),
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
            package_digest: match self.package_digest.as_str() {
                "" => None,
                text => Some(
                    text.parse()
                        .map_err(|_| store.corrupt("rollouts.package_digest", text))?,
                ),
            },
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

/// Reads a digest column, refusing a row whose text is not a tree digest (the store only ever writes real ones).
fn digest_column(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<TreeDigest> {
    let text: String = row.get(index)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}
