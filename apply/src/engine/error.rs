//! The engine's errors and how each maps onto an RPC status.

use crate::backend::BackendError;
use crate::confine::ConfinementError;
use crate::effects::SimulatedCrash;
use crate::file_plan::PlanError;
use crate::fsutil::FsError;
use crate::journal::JournalError;
use crate::spec::SpecError;
use crate::stage::StageError;

/// How an engine error maps onto an RPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    PermissionDenied,
    /// Not enough disk space (or another bound) for the operation now: free some, then retry.
    ResourceExhausted,
    Internal,
}

/// An operation was refused or could not run. Failures after an apply began are not errors: they are
/// reported as `Failed` or `Reverted` results.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("unknown service {name:?}; this agent manages: {known}")]
    UnknownService { name: String, known: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(
        "package {digest} is not staged on this agent; call Stage for service {service:?} first"
    )]
    NotStaged { digest: String, service: String },
    #[error(transparent)]
    Confinement(#[from] ConfinementError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "patch id {patch_id:?} was already used on service {service:?} ({earlier}); use a new patch id"
    )]
    PatchIdReused {
        patch_id: String,
        service: String,
        earlier: String,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Crash(#[from] SimulatedCrash),
    #[error("service {service:?} is quarantined: {reason}")]
    Quarantined { service: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
    #[error(
        "service {service:?}: container {container:?} does not exist; create it (docker run --name {container} ...) \
         or fix `container` in the agent config"
    )]
    ContainerMissing { service: String, container: String },
    #[error(
        "package {digest} is not an image package (its manifest has no `image`), but service {service:?} runs a \
         container; build one with `patchctl package build --image <docker-save.tar | image>`"
    )]
    NotAnImage { digest: String, service: String },
}

impl ApplyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::UnknownService { .. } | ApplyError::NotStaged { .. } => ErrorKind::NotFound,
            ApplyError::InvalidRequest(_) | ApplyError::Spec(_) => ErrorKind::InvalidArgument,
            ApplyError::Confinement(_) | ApplyError::Plan(PlanError::Confinement(_)) => {
                ErrorKind::PermissionDenied
            }
            ApplyError::Stage(StageError::BadDigest { .. }) => ErrorKind::InvalidArgument,
            ApplyError::Stage(StageError::NoSpace { .. }) => ErrorKind::ResourceExhausted,
            ApplyError::Stage(StageError::BlobMissing { .. }) => ErrorKind::NotFound,
            ApplyError::Stage(StageError::Fs(_)) => ErrorKind::Internal,
            ApplyError::Stage(_) => ErrorKind::FailedPrecondition,
            ApplyError::Plan(PlanError::Fs(_)) => ErrorKind::Internal,
            ApplyError::Plan(PlanError::UnknownPatch { .. }) => ErrorKind::NotFound,
            ApplyError::Plan(_)
            | ApplyError::PatchIdReused { .. }
            | ApplyError::Quarantined { .. }
            | ApplyError::Container(_)
            | ApplyError::ContainerMissing { .. }
            | ApplyError::NotAnImage { .. } => ErrorKind::FailedPrecondition,
            ApplyError::Fs(_)
            | ApplyError::Journal(_)
            | ApplyError::Backend(_)
            | ApplyError::Crash(_)
            | ApplyError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<crate::file_plan::StepError> for ApplyError {
    fn from(error: crate::file_plan::StepError) -> Self {
        match error {
            crate::file_plan::StepError::Fs(e) => e.into(),
            crate::file_plan::StepError::Crash(crash) => crash.into(),
        }
    }
}
