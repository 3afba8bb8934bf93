//! patchd host-side apply engine: staging, journaled atomic swap, service backends, health probation, recovery.
//!
//! The agent creates one [`Engine`] at start ([`Engine::start`] recovers interrupted applies before returning)
//! and calls [`Engine::stage`], [`Engine::apply`], [`Engine::rollback`] and [`Engine::status`] from its RPCs.
//! Every host effect sits behind a small trait (service [`backend`], the Docker Engine in [`container`], clock,
//! health probe, fault hook in [`effects`]) so the engine is unit-tested with fakes; files are real (temporary directories in tests).
#![forbid(unsafe_code)]

pub mod backend;
pub mod confine;
pub mod container;
pub mod digest_locks;
pub mod effects;
mod engine;
pub mod file_plan;
pub mod fsutil;
pub mod journal;
pub mod layout;
pub mod prestage;
pub mod prune;
pub mod reserve;
mod run;
pub mod space;
pub mod spec;
pub mod stage;
pub mod staged_identity;

pub use engine::{
    ApplyCommand, ApplyError, ApplyReport, BackendFactory, DEFAULT_KEEP_BACKUPS, Effects, Engine,
    EngineConfig, ErrorKind, RollbackCommand, ServiceReport,
};
pub use journal::{ApplyKind, ApplyPhase, ApplyResult, HistoryEntry, Outcome};
pub use stage::Staged;

#[cfg(test)]
mod tests;
