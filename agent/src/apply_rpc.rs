//! RPC glue between the gRPC service and `patchd-apply`: Stage, Apply, Rollback, Status (filled in by the apply work).

use patchd_proto::v1;
use tonic::Status;

/// The apply side of the agent, created once at start-up (after crash recovery) and shared by all RPCs.
#[derive(Debug, Default)]
pub struct ApplyService {}

impl ApplyService {
    pub async fn stage(&self, _req: v1::StageRequest) -> Result<v1::StageResponse, Status> {
        Err(Status::unimplemented("Stage is not implemented by this agent yet"))
    }

    pub async fn apply(&self, _req: v1::ApplyRequest) -> Result<v1::ApplyResponse, Status> {
        Err(Status::unimplemented("Apply is not implemented by this agent yet"))
    }

    pub async fn rollback(&self, _req: v1::RollbackRequest) -> Result<v1::ApplyResponse, Status> {
        Err(Status::unimplemented("Rollback is not implemented by this agent yet"))
    }

    pub async fn status(&self, _req: v1::StatusRequest) -> Result<v1::StatusResponse, Status> {
        Err(Status::unimplemented("Status is not implemented by this agent yet"))
    }
}
