//! Everything that talks to agents: the mutual-TLS client and its chunked push (`client`, with the zero-copy
//! Upload call in `upload` and the sender's chunk-hash cache in `digest_cache`), the typed rollout calls (`ops`), the
//! rollout's leases (`lease`), the rollout engine's live effects (`effects`), and the agent-side steps of upgrade
//! runbooks (`upgrade_step`).

pub mod client;
pub mod digest_cache;
pub mod effects;
pub mod lease;
pub mod ops;
pub mod upgrade_step;
pub mod upload;
