//! What the engine is built from: the agent config's part, the host effects and the backend factory.

use super::error::ApplyError;
use crate::backend::{BackendError, ServiceBackend};
use crate::effects::{Clock, FaultHook, HealthProbe, NetProbe, SystemClock, default_fault_hook};
use crate::spec::ServiceSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the engine needs from the agent config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub state_dir: PathBuf,
    pub deploy_roots: Vec<PathBuf>,
    pub services: Vec<ServiceSpec>,
    /// Committed patches whose backups are kept (at least 1).
    pub keep_backups: usize,
    pub package_limits: patchd_package::Limits,
    /// Cached blobs and staged packages touched more recently are never pruned, referenced or not.
    pub cache_min_age: std::time::Duration,
}

/// The host effects besides files: clock, probe, faults.
#[derive(Debug, Clone)]
pub struct Effects {
    pub clock: Arc<dyn Clock>,
    pub probe: Arc<dyn HealthProbe>,
    pub faults: Arc<dyn FaultHook>,
}

impl Effects {
    /// The real ones: system clock, network probe, and this build's fault hook.
    pub fn real() -> Result<Self, ApplyError> {
        Ok(Effects {
            clock: Arc::new(SystemClock),
            probe: Arc::new(NetProbe::new().map_err(ApplyError::Internal)?),
            faults: default_fault_hook(),
        })
    }
}

/// Builds the backend of a service.
pub type BackendFactory =
    Box<dyn Fn(&ServiceSpec, &Path) -> Result<Arc<dyn ServiceBackend>, BackendError> + Send + Sync>;
