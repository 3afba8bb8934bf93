//! The `patchd.v1.Agent` gRPC service: Info, QueryBlob and Lease here (Upload in [`crate::upload_receiver`], the
//! lease rules in [`crate::lease`]); Stage, Apply, Rollback and Status are delegated to [`ApplyService`], Apply and
//! Rollback after the lease check; UpgradeStep in [`crate::upgrade`] (after the same lease check). Wire types are converted to domain types at this boundary.

use crate::apply_rpc::ApplyService;
use crate::config::Config;
use crate::lease::{self, LeaseBook, Ticket};
use crate::status::invalid_argument;
use crate::transfer::{BlobRef, BlobStore};
use crate::upgrade::Upgrades;
use patchd_proto::v1::{self, agent_server::AgentServer};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};

/// State shared by all RPCs of one agent.
#[derive(Debug)]
pub struct AgentService {
    config: Arc<Config>,
    store: Arc<BlobStore>,
    apply: Arc<ApplyService>,
    leases: Arc<LeaseBook>,
    upgrades: Arc<Upgrades>,
    started: Instant,
}

impl AgentService {
    pub fn new(
        config: Arc<Config>,
        store: Arc<BlobStore>,
        apply: Arc<ApplyService>,
        leases: Arc<LeaseBook>,
    ) -> Self {
        let upgrades = Arc::new(Upgrades::new(&config));
        Self {
            config,
            store,
            apply,
            leases,
            upgrades,
            started: Instant::now(),
        }
    }

    /// Refuses a change of `service` while another rollout holds its lease (see [`crate::lease`]).
    fn check_lease(
        &self,
        service: &str,
        ticket: Option<v1::LeaseTicket>,
        caller: &str,
    ) -> Result<(), Status> {
        let ticket = Ticket::from_wire(ticket)?;
        self.leases
            .check(service, ticket.as_ref(), caller, lease::now_unix_ms())
            .map_err(|error| {
                tracing::warn!(service, caller, "refused a change: {error}");
                Status::from(error)
            })
    }

    /// The blob cache uploads go to.
    pub fn store(&self) -> Arc<BlobStore> {
        Arc::clone(&self.store)
    }

    /// The tonic service, accepting messages up to [`patchd_proto::MAX_MESSAGE_BYTES`] (chunks up to 4 MiB).
    pub(crate) fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(patchd_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(patchd_proto::MAX_MESSAGE_BYTES)
    }
}

pub(crate) fn blob_from_wire(blob: Option<v1::BlobRef>) -> Result<BlobRef, Status> {
    let blob = blob.ok_or_else(|| {
        invalid_argument("missing `blob`: send the digest, total size and chunk size")
    })?;
    Ok(BlobRef::new(
        blob.digest,
        blob.total_size,
        blob.chunk_size,
        blob.tree_version,
    )?)
}

/// The caller [`crate::access::authorize`] put on the request: as Status shows it (CN, operator, serial) and its
/// common name alone, which names a lease holder. Both "" without a certificate (unit tests call without TLS).
fn caller_of<T>(request: &Request<T>) -> (String, String) {
    request
        .extensions()
        .get::<patchd_tls::PeerIdentity>()
        .map(|peer| (peer.describe(), peer.common_name.clone()))
        .unwrap_or_default()
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
        let tree_version = blob.version.wire();
        let store = Arc::clone(&self.store);
        let state = tokio::task::spawn_blocking(move || store.query(&blob))
            .await
            .map_err(|e| Status::internal(format!("query failed: {e}")))??;
        Ok(Response::new(v1::QueryBlobResponse {
            complete: state.complete,
            chunks_held: state.chunks_held,
            bytes_held: state.bytes_held,
            tree_version,
            manifest_format: patchd_package::MANIFEST_FORMAT,
        }))
    }

    /// Never reached: [`crate::upload_receiver::AgentRoutes`] serves Upload straight from the HTTP/2 frames and is the
    /// only way this service is registered (`into_server` is crate-private).
    async fn upload(
        &self,
        _request: Request<Streaming<v1::UploadMessage>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        Err(Status::internal(
            "Upload reached the generated service instead of the agent's upload route: a wiring bug in patchd; \
             report it",
        ))
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
        let (caller, lease_holder) = caller_of(&request);
        let mut request = request.into_inner();
        self.check_lease(&request.service, request.lease.take(), &lease_holder)?;
        self.apply.apply(request, caller).await.map(Response::new)
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let (caller, lease_holder) = caller_of(&request);
        let mut request = request.into_inner();
        self.check_lease(&request.service, request.lease.take(), &lease_holder)?;
        self.apply
            .rollback(request, caller)
            .await
            .map(Response::new)
    }

    async fn lease(
        &self,
        request: Request<v1::LeaseRequest>,
    ) -> Result<Response<v1::LeaseResponse>, Status> {
        let (_, caller) = caller_of(&request);
        let request = request.into_inner();
        if !self
            .config
            .services
            .iter()
            .any(|s| s.name == request.service)
        {
            return Err(lease::LeaseError::UnknownService(request.service).into());
        }
        let ticket = Ticket::from_wire(request.ticket)?.ok_or_else(|| {
            invalid_argument(
                "missing `ticket`: a lease needs the rollout id and the controller's store id",
            )
        })?;
        let leases = Arc::clone(&self.leases);
        let action = v1::LeaseAction::try_from(request.action).unwrap_or_default();
        let ttl = std::time::Duration::from_millis(request.ttl_ms);
        let service = request.service;
        let answer = tokio::task::spawn_blocking(move || match action {
            v1::LeaseAction::Acquire => leases
                .acquire(&service, &ticket, &caller, ttl, lease::now_unix_ms())
                .map(|granted| v1::LeaseResponse {
                    held: true,
                    expires_unix_ms: granted.expires_unix_ms,
                    taken_over: granted.taken_over.unwrap_or_default(),
                })
                .map_err(Status::from),
            v1::LeaseAction::Release => leases
                .release(&service, &ticket, &caller)
                .map(|_| v1::LeaseResponse::default())
                .map_err(Status::from),
            v1::LeaseAction::Unspecified => Err(invalid_argument(
                "missing `action`: ACQUIRE (take or renew) or RELEASE",
            )),
        })
        .await
        .map_err(|e| Status::internal(format!("lease task failed: {e}")))??;
        Ok(Response::new(answer))
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

    /// Upgrade runbook steps ([`crate::upgrade`]); a step naming a service needs the caller's lease on it.
    async fn upgrade_step(
        &self,
        request: Request<v1::UpgradeStepRequest>,
    ) -> Result<Response<v1::UpgradeStepResponse>, Status> {
        let (caller, lease_holder) = caller_of(&request);
        let mut request = request.into_inner();
        if !request.service.is_empty() {
            if !self
                .config
                .services
                .iter()
                .any(|s| s.name == request.service)
            {
                return Err(invalid_argument(format!(
                    "service `{}` is not managed by this agent: name a [[service]] of its patchd.toml, or \"\" \
                     for a step no lease covers",
                    request.service
                )));
            }
            self.check_lease(&request.service, request.lease.take(), &lease_holder)?;
        }
        // Debug-quoted: both are the caller's text, checked only later, and must not forge log lines.
        tracing::info!(
            upgrade = ?request.upgrade_id,
            step = ?request.step,
            caller = %caller,
            "upgrade step"
        );
        let upgrades = Arc::clone(&self.upgrades);
        upgrades
            .step(request)
            .await
            .map(Response::new)
            .map_err(|error| {
                tracing::warn!(caller = %caller, "upgrade step refused or failed: {error}");
                Status::from(error)
            })
    }
}
