//! The `patchd.v1.Agent` gRPC service: Info, QueryBlob and Upload here; Stage, Apply, Rollback and Status are
//! delegated to [`ApplyService`]. Wire types are converted to domain types at this boundary.

use crate::apply_rpc::ApplyService;
use crate::config::Config;
use crate::status::invalid_argument;
use crate::transfer::{BlobRef, BlobStore, Chunk, IDLE_TIMEOUT, TransferError};
use futures::StreamExt;
use patchd_proto::v1::{self, agent_server::AgentServer, upload_message::Kind};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

/// State shared by all RPCs of one agent.
#[derive(Debug)]
pub struct AgentService {
    config: Arc<Config>,
    store: Arc<BlobStore>,
    apply: Arc<ApplyService>,
    started: Instant,
}

impl AgentService {
    pub fn new(config: Arc<Config>, store: Arc<BlobStore>, apply: Arc<ApplyService>) -> Self {
        Self {
            config,
            store,
            apply,
            started: Instant::now(),
        }
    }

    /// The blob cache uploads go to.
    pub fn store(&self) -> Arc<BlobStore> {
        Arc::clone(&self.store)
    }

    /// The tonic service, accepting messages up to [`patchd_proto::MAX_MESSAGE_BYTES`] (chunks up to 4 MiB).
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(patchd_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(patchd_proto::MAX_MESSAGE_BYTES)
    }
}

pub(crate) fn blob_from_wire(blob: Option<v1::BlobRef>) -> Result<BlobRef, Status> {
    let blob = blob.ok_or_else(|| {
        invalid_argument("missing `blob`: send the digest, total size and chunk size")
    })?;
    Ok(BlobRef::new(blob.digest, blob.total_size, blob.chunk_size)?)
}

fn chunk_from_wire(message: Result<v1::UploadMessage, Status>) -> Result<Chunk, TransferError> {
    let message =
        message.map_err(|status| TransferError::StreamBroken(status.message().to_string()))?;
    match message.kind {
        Some(Kind::Chunk(chunk)) => {
            let sha256: [u8; 32] = chunk.sha256.as_ref().try_into().map_err(|_| {
                TransferError::Protocol(format!(
                    "chunk {} carries a {}-byte sha256, expected 32",
                    chunk.index,
                    chunk.sha256.len()
                ))
            })?;
            Ok(Chunk {
                index: chunk.index,
                offset: chunk.offset,
                data: chunk.data,
                sha256,
            })
        }
        Some(Kind::Header(_)) => Err(TransferError::Protocol(
            "a second header: send one header, then chunks".into(),
        )),
        None => Err(TransferError::Protocol("empty upload message".into())),
    }
}

#[tonic::async_trait]
impl v1::agent_server::Agent for AgentService {
    async fn info(
        &self,
        _request: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::InfoResponse>, Status> {
        let state_dir = self.config.state_dir.clone();
        let services = self
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let started = self.started;
        let info = tokio::task::spawn_blocking(move || {
            crate::info::collect(&state_dir, started, services)
        })
        .await
        .map_err(|e| Status::internal(format!("collecting host info failed: {e}")))?;
        Ok(Response::new(v1::InfoResponse {
            agent_version: info.agent_version,
            hostname: info.hostname,
            os: info.os,
            arch: info.arch,
            cpu_count: info.cpu_count,
            memory_total_bytes: info.memory_total_bytes,
            memory_available_bytes: info.memory_available_bytes,
            state_dir_free_bytes: info.state_dir_free_bytes,
            host_uptime_seconds: info.host_uptime_seconds,
            agent_uptime_seconds: info.agent_uptime_seconds,
            services: info.services,
            protocol_version: patchd_proto::PROTOCOL_VERSION,
        }))
    }

    async fn query_blob(
        &self,
        request: Request<v1::QueryBlobRequest>,
    ) -> Result<Response<v1::QueryBlobResponse>, Status> {
        let blob = blob_from_wire(request.into_inner().blob)?;
        let store = Arc::clone(&self.store);
        let state = tokio::task::spawn_blocking(move || store.query(&blob))
            .await
            .map_err(|e| Status::internal(format!("query failed: {e}")))??;
        Ok(Response::new(v1::QueryBlobResponse {
            complete: state.complete,
            chunks_held: state.chunks_held,
            bytes_held: state.bytes_held,
        }))
    }

    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadMessage>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(IDLE_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::from(TransferError::IdleTimeout))??;
        let blob = match first.and_then(|m| m.kind) {
            Some(Kind::Header(header)) => blob_from_wire(header.blob)?,
            _ => {
                return Err(invalid_argument(
                    "the first upload message must be a header naming the blob",
                ));
            }
        };
        let digest = blob.digest.clone();
        let outcome = self.store.upload(blob, stream.map(chunk_from_wire)).await?;
        tracing::debug!(%digest, ?outcome, "upload call finished");
        Ok(Response::new(v1::UploadResponse {
            digest,
            complete: outcome.complete,
            chunks_received: outcome.chunks_received,
            bytes_received: outcome.bytes_received,
        }))
    }

    async fn stage(
        &self,
        request: Request<v1::StageRequest>,
    ) -> Result<Response<v1::StageResponse>, Status> {
        self.apply
            .stage(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        self.apply
            .apply(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        self.apply
            .rollback(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.apply
            .status(request.into_inner())
            .await
            .map(Response::new)
    }
}
