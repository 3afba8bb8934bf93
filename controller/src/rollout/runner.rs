//! Running a rollout: journal a new one or pick up an unfinished one, then drive the engine with live effects,
//! progress, Ctrl-C handling, and the final summary; returns the process exit code.

use super::RunnerError;
use super::journal::{StoreJournal, prior_records, rollout_state};
use super::observer::CliObserver;
use super::planning::batches_from_plan;
use super::summary::print_summary;
use crate::agent::client::PreparedBlob;
use crate::agent::client::PushProgress;
use crate::agent::effects::{LiveEffects, PushProgressFn};
use crate::agent::lease::LeaseKeeper;
use crate::agent::ops::LeaseTicket;
use crate::executor::{
    Action, ApplyRetryPolicy, Cancel, NodePhase, NodeRecord, NodeRef, RolloutEnd, RolloutEngine,
    RolloutSpec, StagingMode,
};
use crate::exit;
use crate::home::Home;
use crate::hooks::{ClusterHooks, HookClient};
use crate::output::Format;
use crate::registered::{load_tls, load_topology};
use crate::store::RolloutOptions;
use crate::store::{
    NewRollout, NodeRolloutState, Rollout, RolloutKind, RolloutLock, RolloutState, Store,
};
use crate::tls_files::ControllerTls;
use crate::topology::Topology;
use patchd_package::digest::TreeDigest;
use patchd_planner::Plan;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tells the operator when the cluster's rollout lock was taken over from a process that is gone.
pub fn report_takeover(lock: &RolloutLock) {
    if let Some(previous) = &lock.taken_over_from {
        errln!(
            "Note: took over the rollout lock left by process {} on {} (started {}), which is gone.",
            previous.pid,
            previous.host,
            previous.started_at
        );
    }
}

/// Continues an unfinished rollout from its journal.
pub async fn resume(
    home: &Home,
    format: Format,
    store: Arc<Store>,
    rollout: Rollout,
) -> Result<u8, RunnerError> {
    let lock = store.acquire_rollout_lock(&rollout.cluster)?;
    report_takeover(&lock);
    let topology = Arc::new(load_topology(&store, &rollout.cluster)?);
    let plan: Plan =
        serde_json::from_str(&rollout.plan_json).map_err(|source| RunnerError::StoredPlan {
            rollout: rollout.id.clone(),
            source,
        })?;
    let options: RolloutOptions =
        serde_json::from_str(&rollout.options_json).map_err(|source| {
            RunnerError::StoredOptions {
                rollout: rollout.id.clone(),
                source,
            }
        })?;
    if let Some((_, missing)) = plan
        .nodes()
        .find(|(_, node)| topology.node_by_id(&node.id).is_none())
    {
        return Err(RunnerError::PlannedNodeGone {
            rollout: rollout.id.clone(),
            node: missing.id.clone(),
        });
    }
    let blob = match rollout.kind {
        RolloutKind::Patch => {
            let path = PathBuf::from(&rollout.package_path);
            let blob = PreparedBlob::prepare(&path, patchd_package::digest::DEFAULT_CHUNK_SIZE)
                .await
                .map_err(|source| RunnerError::PackageUnreadable {
                    rollout: rollout.id.clone(),
                    path: path.clone(),
                    source,
                })?;
            if rollout.package_digest.as_ref() != Some(&blob.digest) {
                let then = rollout
                    .package_digest
                    .as_ref()
                    .map_or("", |digest| digest.short(16))
                    .to_string();
                if named_by_version_1(&path, rollout.package_digest.as_ref()).await {
                    return Err(RunnerError::JournaledByOlderPatchctl {
                        path,
                        rollout: rollout.id.clone(),
                        then,
                    });
                }
                return Err(RunnerError::PackageChanged {
                    path,
                    rollout: rollout.id.clone(),
                    now: blob.digest.short(16).to_string(),
                    then,
                });
            }
            Some(Arc::new(blob))
        }
        RolloutKind::Rollback => None,
    };
    let prior = prior_records(&store, &rollout.id)?;
    let finished = prior
        .values()
        .filter(|record| record.phase.is_terminal())
        .count();
    errln!(
        "Resuming {} {} on cluster `{}`: {} of {} node(s) finished earlier and will not be touched.",
        rollout.kind,
        rollout.id,
        rollout.cluster,
        finished,
        plan.summary().total_nodes
    );
    let tls = load_tls(home, &topology)?;
    let code = execute(
        format,
        Execution {
            store,
            rollout,
            options,
            plan,
            topology,
            tls,
            blob,
            prior,
        },
    )
    .await;
    drop(lock);
    code
}

/// Everything a run of the engine needs.
pub struct Execution {
    /// The store the rollout is journaled in.
    pub store: Arc<Store>,
    /// The journaled rollout.
    pub rollout: Rollout,
    /// Its options (as journaled).
    pub options: RolloutOptions,
    /// Its plan (as journaled).
    pub plan: Plan,
    /// The cluster.
    pub topology: Arc<Topology>,
    /// The controller's identity for the cluster's agents.
    pub tls: ControllerTls,
    /// The package to stage (patch only).
    pub blob: Option<Arc<PreparedBlob>>,
    /// Each node's record from an earlier run (resume); empty for a new rollout.
    pub prior: HashMap<String, NodeRecord>,
}

/// Whether `journaled` is the version-1 tree digest of the file at `path` (a rollout journaled by a patchctl before
/// version 2). Reads the file once more; only asked when the version-2 digest did not match.
async fn named_by_version_1(path: &std::path::Path, journaled: Option<&TreeDigest>) -> bool {
    let Some(journaled) = journaled.cloned() else {
        return false;
    };
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        patchd_package::digest::TreeVersion::V1
            .tree_digest_file(&path, patchd_package::digest::DEFAULT_CHUNK_SIZE)
            .is_ok_and(|digest| journaled == digest)
    })
    .await
    .unwrap_or(false)
}

/// Runs the engine with progress and Ctrl-C handling, records the end, prints the summary; returns the exit code.
pub async fn execute(format: Format, run: Execution) -> Result<u8, RunnerError> {
    let Execution {
        store,
        rollout,
        options,
        plan,
        topology,
        tls,
        blob,
        prior,
    } = run;
    let action = match (rollout.kind, &rollout.package_digest) {
        (RolloutKind::Patch, Some(digest)) => Action::Patch {
            digest: digest.clone(),
            offline: options.offline,
        },
        (RolloutKind::Patch, None) => {
            return Err(RunnerError::PatchWithoutPackage {
                rollout: rollout.id.clone(),
            });
        }
        (RolloutKind::Rollback, _) => Action::Rollback {
            to_patch_id: options.to_patch_id.clone(),
        },
    };
    let patched_digest = match &action {
        Action::Patch { digest, .. } => Some(digest.clone()),
        Action::Rollback { .. } => None,
    };
    let spec = RolloutSpec {
        patch_id: options.patch_id.clone(),
        action,
        batches: batches_from_plan(&plan, &topology),
        failure_budget: plan.policy().failure_budget,
        stage_concurrency: options.concurrency.max(1),
        staging: if options.stage_all_first {
            StagingMode::Upfront
        } else {
            StagingMode::Ahead
        },
        apply_retry: ApplyRetryPolicy::default(),
        prior,
    };
    let observer = Arc::new(CliObserver::new(
        &rollout,
        blob.as_ref().map_or(0, |blob| blob.total_size),
        spec.batches.len(),
        options.canary_wait_ms.map(Duration::from_millis),
    ));
    let push_observer = Arc::clone(&observer);
    let on_push: PushProgressFn = Arc::new(move |node: &NodeRef, progress: PushProgress| {
        push_observer.pushed(node, progress)
    });
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::for_cluster(&tls)?);
    let ticket = LeaseTicket {
        rollout_id: rollout.id.clone(),
        holder: store.store_id()?,
    };
    let leases = LeaseKeeper::new(ticket, tls.clone());
    let effects = LiveEffects::new(Arc::clone(&topology), hooks, tls, blob, on_push, leases);
    let journal = StoreJournal {
        store: Arc::clone(&store),
        cluster: rollout.cluster.clone(),
        rollout_id: rollout.id.clone(),
        patched_digest,
        version: rollout.version.clone(),
    };
    store.set_rollout_state(&rollout.id, RolloutState::Running)?;

    let (cancel_handle, cancel) = Cancel::new();
    let cluster = rollout.cluster.clone();
    let interrupt_observer = Arc::clone(&observer);
    // Registered before the engine starts, so no SIGINT/SIGTERM falls back to the default (kill) action.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(RunnerError::Signals)?;
    let mut terminates = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunnerError::Signals)?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            received = interrupts.recv() => if received.is_none() { return },
            received = terminates.recv() => if received.is_none() { return },
        }
        interrupt_observer.line(
            "Interrupted: finishing the steps in flight and putting drained nodes back online (again to quit at once)",
        );
        cancel_handle.cancel();
        tokio::select! {
            _ = interrupts.recv() => {}
            _ = terminates.recv() => {}
        }
        errln!("Quit at once: resume with `patchctl patch --resume {cluster}`.");
        std::process::exit(i32::from(exit::INTERRUPTED));
    });
    let started = Instant::now();
    let outcome = RolloutEngine::new(&spec, &effects, &journal, observer.as_ref(), cancel)
        .run()
        .await;
    signals.abort();
    observer.finish();
    let report = match outcome {
        Ok(report) => report,
        Err(error) => {
            errln!(
                "error: {error}\nThe rollout stopped where it was; resume it with `patchctl patch --resume {}`.",
                rollout.cluster
            );
            return Ok(exit::ERROR);
        }
    };
    // A resume refused for a lease another rollout took meanwhile stays resumable: its nodes may be mid-turn.
    let state = if report.end == RolloutEnd::Refused && !spec.prior.is_empty() {
        RolloutState::Interrupted
    } else {
        rollout_state(&report.end)
    };
    if !state.is_unfinished() {
        for node in &report.nodes {
            if matches!(node.phase, NodePhase::Pending | NodePhase::Staged) {
                store.set_node_state(&rollout.id, &node.node.id, NodeRolloutState::Skipped)?;
            }
        }
    }
    store.set_rollout_state(&rollout.id, state)?;
    if options.overwrite
        && report.end == RolloutEnd::Completed
        && rollout.kind == RolloutKind::Patch
        && let Some(digest) = &rollout.package_digest
    {
        for role in &plan.summary().roles {
            store.set_role_package(
                &rollout.cluster,
                &role.role,
                digest,
                &rollout.package_path,
                &rollout.version,
            )?;
        }
    }
    print_summary(format, &rollout, &report, started.elapsed())?;
    Ok(match report.end {
        RolloutEnd::Completed => exit::OK,
        RolloutEnd::CompletedWithFailures | RolloutEnd::Halted => exit::ROLLOUT_FAILED,
        RolloutEnd::Interrupted => exit::INTERRUPTED,
        RolloutEnd::Stopped => exit::DECLINED,
        RolloutEnd::Refused => exit::ERROR,
    })
}

/// A rollout `patch` or `rollback` decided on, not journaled yet.
pub struct NewRun {
    /// Patch or rollback.
    pub kind: RolloutKind,
    /// Tree digest of the package (`None` for a rollback).
    pub package_digest: Option<TreeDigest>,
    /// Where the package is, to read it again on resume (empty for a rollback).
    pub package_path: String,
    /// The package's version, or the rollback's `--to`.
    pub version: String,
    /// Options journaled with the rollout; `options.patch_id` is its id.
    pub options: RolloutOptions,
    /// The plan.
    pub plan: Plan,
    /// The cluster.
    pub topology: Arc<Topology>,
    /// The controller's identity for the cluster's agents.
    pub tls: ControllerTls,
    /// The package to stage (patch only).
    pub blob: Option<Arc<PreparedBlob>>,
}

/// Journals a new rollout of `cluster` (its id is `options.patch_id`) and runs it; returns the exit code. The
/// caller holds the cluster's rollout lock.
pub async fn journal_and_execute(
    format: Format,
    store: Arc<Store>,
    cluster: &str,
    run: NewRun,
) -> Result<u8, RunnerError> {
    let rollout_id = run.options.patch_id.clone();
    store.create_rollout(&NewRollout {
        id: rollout_id.clone(),
        cluster: cluster.to_string(),
        kind: run.kind,
        package_digest: run.package_digest,
        package_path: run.package_path,
        version: run.version,
        plan_json: serde_json::to_string(&run.plan)?,
        options_json: serde_json::to_string(&run.options)?,
    })?;
    let rollout = store
        .rollout(&rollout_id)?
        .ok_or(RunnerError::JournaledRolloutMissing)?;
    execute(
        format,
        Execution {
            store,
            rollout,
            options: run.options,
            plan: run.plan,
            topology: run.topology,
            tls: run.tls,
            blob: run.blob,
            prior: HashMap::new(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_package::digest::{DEFAULT_CHUNK_SIZE, TreeVersion};

    #[tokio::test]
    async fn a_journaled_digest_is_recognised_as_the_version_1_name_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg.tar.gz");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let digest_in = |version: TreeVersion| -> TreeDigest {
            version
                .tree_digest_file(&path, DEFAULT_CHUNK_SIZE)
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(named_by_version_1(&path, Some(&digest_in(TreeVersion::V1))).await);
        assert!(!named_by_version_1(&path, Some(&digest_in(TreeVersion::V2))).await);
        assert!(!named_by_version_1(&path, None).await);
        assert!(
            !named_by_version_1(&dir.path().join("gone"), Some(&digest_in(TreeVersion::V1))).await
        );
    }
}
