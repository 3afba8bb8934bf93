//! patchd host-side apply engine: staging, journaled atomic swap, service backends, health probation, recovery.
#![forbid(unsafe_code)]

pub mod spec;
