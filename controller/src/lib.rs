//! patchctl library: everything the controller CLI uses, behind thiserror errors so it can be tested.
#![deny(unsafe_code)]

// First, so every module below can use `outln!`, `errln!` & co. (see `output`).
#[macro_use]
pub mod output;

pub mod agent;
pub mod demo;
pub mod executor;
pub mod exit;
pub mod home;
pub mod hooks;
pub mod node_status;
pub mod registered;
pub mod rollout;
pub mod signals;
pub mod store;
pub mod tls_files;
pub mod topology;
pub mod untrusted;
pub mod upgrade;
