//! Exit codes of `patchctl`, documented in ARCHITECTURE.md; scripts rely on them.

/// Success.
pub const OK: u8 = 0;
/// Error: bad input, unreachable agent, refused operation.
pub const ERROR: u8 = 1;
/// Usage error (clap's own code).
pub const USAGE: u8 = 2;
/// A rollout ran and ended with failures (reverted nodes, halted at the failure budget, drain timeouts); an upgrade
/// rolled back after changes, failed past its point of no return, or halted on a failed undo.
pub const ROLLOUT_FAILED: u8 = 3;
/// Declined at the confirmation prompt, or `--resume` with nothing to resume (a rollout with nothing to change is OK).
pub const DECLINED: u8 = 4;
/// Interrupted by Ctrl-C, or an upgrade halted on a step only the operator can resolve; state recorded, resumable.
pub const INTERRUPTED: u8 = 130;
