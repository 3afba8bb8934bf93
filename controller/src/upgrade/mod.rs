//! Running upgrade runbooks (`patchctl upgrade`, `patchctl rollback --upgrade`): the runbook laid over the
//! planner's node order (`layout`), the step machine of `patchd_runbook::machine` driven on a blocking thread
//! (`run`) with the real effects (`effects`: `http` and `sql` from here, node steps through the agent's
//! `UpgradeStep`, the container swap through Stage and Apply), the journal in the store (`journal`), and the
//! answers checks compare (`expect`).
//!
//! An upgrade is recorded in the store (`upgrades`, `upgrade_journal`) under an id that is also its lease's
//! rollout id on every node and the `upgrade_id` agents file backups under. Resume (`--resume ID`) runs the
//! stored runbook text over the stored node order, whatever the file and the cluster say now.

pub mod effects;
pub mod expect;
pub mod http;
pub mod journal;
pub mod layout;
pub mod report;
pub mod run;
pub mod sql;

pub use run::{Ending, Execution, Mode, UpgradeError, execute, new_upgrade_id};
