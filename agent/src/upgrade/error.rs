//! [`UpgradeError`]: why an upgrade step was refused, one gRPC code each.

/// Why a step was refused; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// Undeclared action, path outside the roots, symlink, undeclared container: `PERMISSION_DENIED`.
    #[error("{0}")]
    Denied(String),
    /// Wrong argument count or type, malformed request: `INVALID_ARGUMENT`.
    #[error("{0}")]
    Invalid(String),
    /// A backup too small, a failed dump, a changed backup, a missing file: `FAILED_PRECONDITION`.
    #[error("{0}")]
    Precondition(String),
    /// An action killed at its timeout: `DEADLINE_EXCEEDED`.
    #[error("{0}")]
    Timeout(String),
    /// `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

impl From<UpgradeError> for tonic::Status {
    fn from(error: UpgradeError) -> Self {
        match error {
            UpgradeError::Denied(m) => tonic::Status::permission_denied(m),
            UpgradeError::Invalid(m) => tonic::Status::invalid_argument(m),
            UpgradeError::Precondition(m) => tonic::Status::failed_precondition(m),
            UpgradeError::Timeout(m) => tonic::Status::deadline_exceeded(m),
            UpgradeError::Internal(m) => tonic::Status::internal(m),
        }
    }
}
