//! The rollout runner shared by `patchctl patch` and `patchctl rollback`: plan from the observed cluster, journal
//! the rollout, drive the [`executor`](crate::executor) engine with live effects, show progress and the summary,
//! and resume an unfinished rollout after a crash or Ctrl-C.

mod journal;
mod observer;
mod planning;
mod runner;
mod summary;

pub use journal::{PHASE_STEP, StoreJournal, coarse_state, prior_records, rollout_state};
pub use planning::{batches_from_plan, observe, plan_input};
pub use runner::{Execution, NewRun, execute, journal_and_execute, report_takeover, resume};

use crate::agent::client::AgentClientError;
use crate::hooks::HookError;
use crate::registered::RegisteredError;
use crate::store::StoreError;
use std::path::PathBuf;

/// A rollout could not be started or recorded; the message says what to do. (A failing node is not an error:
/// it is in the summary and the exit code.)
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The journaled plan does not parse.
    #[error("rollout {rollout}: its stored plan cannot be read")]
    StoredPlan {
        /// Rollout id.
        rollout: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The journaled options do not parse.
    #[error("rollout {rollout}: its stored options cannot be read")]
    StoredOptions {
        /// Rollout id.
        rollout: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The topology was re-imported without a node the rollout planned.
    #[error(
        "rollout {rollout} planned node {node}, which the re-imported topology no longer has: re-import the topology \
         the rollout started with"
    )]
    PlannedNodeGone {
        /// Rollout id.
        rollout: String,
        /// The planned node's id.
        node: String,
    },
    /// A resumed patch cannot read its package again.
    #[error("rollout {rollout} needs its package {} again", path.display())]
    PackageUnreadable {
        /// Rollout id.
        rollout: String,
        /// The package file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: AgentClientError,
    },
    /// A journaled patch has no package digest (the store writes one for every patch: the row was edited).
    #[error(
        "rollout {rollout} is a patch without a package digest: its journal row is damaged; start a new patch"
    )]
    PatchWithoutPackage {
        /// Rollout id.
        rollout: String,
    },
    /// A resumed patch was journaled by a patchctl from before tree digest version 2: it names the same package by
    /// its version-1 digest, which the agents it staged on hold under that name.
    #[error(
        "rollout {rollout} was started by a patchctl older than this one (it names package {} by its version-1 \
         tree digest {then}, this patchctl by version 2): finish it with the patchctl that started it \
         (`patchctl patch --resume`), then use this one",
        path.display()
    )]
    JournaledByOlderPatchctl {
        /// The package file.
        path: PathBuf,
        /// Rollout id.
        rollout: String,
        /// The journaled digest (shortened).
        then: String,
    },
    /// A resumed patch's package is not the one the rollout started with.
    #[error(
        "package {} changed since rollout {rollout} started (digest {now} instead of {then}): put the original back",
        path.display()
    )]
    PackageChanged {
        /// The package file.
        path: PathBuf,
        /// Rollout id.
        rollout: String,
        /// Its digest now (shortened).
        now: String,
        /// Its digest when the rollout started (shortened).
        then: String,
    },
    /// The rollout was written but cannot be read back.
    #[error("the rollout just journaled is missing from the store")]
    JournaledRolloutMissing,
    /// SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot handle Ctrl-C during the rollout")]
    Signals(#[source] std::io::Error),
    /// The registered cluster cannot be used.
    #[error(transparent)]
    Registered(#[from] RegisteredError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hook client could not be built.
    #[error(transparent)]
    Hooks(#[from] HookError),
    /// A plan, options or summary could not be written as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}
