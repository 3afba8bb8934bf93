//! patchctl library: everything the controller CLI uses, behind thiserror errors so it can be tested.
#![forbid(unsafe_code)]

pub mod exit;
pub mod home;
pub mod store;
pub mod topology;
pub mod executor;
pub mod hooks;
pub mod agent_ops;
pub mod agent_client;
pub mod tls_files;
pub mod status;
pub mod demo;
