//! The one place where agent errors become gRPC statuses: the code tells the controller what kind of failure it
//! is (retry a chunk, free disk, fix input), the message says what happened and what to do.

use crate::transfer::TransferError;
use tonic::{Code, Status};

impl From<TransferError> for Status {
    fn from(err: TransferError) -> Self {
        let code = match &err {
            TransferError::InvalidDigest(_)
            | TransferError::InvalidChunkSize(_)
            | TransferError::UnknownTreeVersion(_)
            | TransferError::Protocol(_) => Code::InvalidArgument,
            TransferError::TooLarge { .. }
            | TransferError::NoSpace { .. }
            | TransferError::TooManyUploads { .. } => Code::ResourceExhausted,
            TransferError::ChunkCorrupt { .. } | TransferError::DigestMismatch { .. } => {
                Code::DataLoss
            }
            TransferError::OutOfOrder { .. } => Code::FailedPrecondition,
            TransferError::IdleTimeout(_) => Code::DeadlineExceeded,
            TransferError::StreamBroken(_) => Code::Aborted,
            TransferError::Io { cause, .. } if cause.kind() == std::io::ErrorKind::StorageFull => {
                Code::ResourceExhausted
            }
            TransferError::Io { .. } | TransferError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %err, "internal error");
        }
        Status::new(code, err.to_string())
    }
}

/// A request field that is missing or malformed.
pub fn invalid_argument(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_tell_the_sender_what_to_do() {
        let corrupt: Status = TransferError::ChunkCorrupt {
            index: 3,
            offset: 3 << 20,
        }
        .into();
        assert_eq!(corrupt.code(), Code::DataLoss);
        assert!(corrupt.message().contains("offset 3145728"));
        let space: Status = TransferError::NoSpace {
            needed: 10,
            free: 5,
            reserved: 0,
            dir: "/var/lib/patchd/blobs".into(),
        }
        .into();
        assert_eq!(space.code(), Code::ResourceExhausted);
        assert!(space.message().contains("needs 10") && space.message().contains("only 5"));
    }
}
