//! patchd agent library: config, mTLS gRPC server, blob transfer, host info, and the RPC glue to the apply engine.
#![forbid(unsafe_code)]

pub mod apply_rpc;
pub mod config;
pub mod info;
pub mod server;
pub mod status;
pub mod transfer;
pub mod upload_path;

use crate::apply_rpc::ApplyService;
use crate::config::Config;
use crate::server::AgentService;
use crate::transfer::BlobStore;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// HTTP/2 flow-control windows of the server: uploads are server-bound, so these bound throughput per RTT.
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Idle time before TCP keepalive probes start on an agent connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Largest HTTP/2 frame the agent accepts (the default is 16 KiB): a chunk upload arrives in 256 KiB DATA frames,
/// so the sender writes 16 TLS records per system call and both sides handle 16 times fewer frames.
const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Why the agent could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] patchd_tls::TlsError),
    #[error("blob cache: {0}")]
    Transfer(#[from] transfer::TransferError),
    #[error("cannot create the state directory {}: {cause}", path.display())]
    StateDir {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("apply engine failed to start: {0}")]
    Apply(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// An agent ready to serve: config checked, TLS loaded, blob cache open, apply engine started (after crash
/// recovery). Nothing accepts connections until [`Agent::serve`].
#[derive(Debug)]
pub struct Agent {
    config: Arc<Config>,
    tls: patchd_tls::TlsMaterial,
    store: Arc<BlobStore>,
    apply: Arc<ApplyService>,
}

impl Agent {
    /// Prepares everything that must be in place before the first connection.
    pub async fn prepare(config: Arc<Config>) -> Result<Self, AgentError> {
        config
            .prepare_state_dir()
            .map_err(|cause| AgentError::StateDir {
                path: config.state_dir.clone(),
                cause,
            })?;
        let tls = patchd_tls::TlsMaterial::load(&config.tls.files())?;
        let store = Arc::new(BlobStore::open(
            &config.blobs_dir(),
            config.limits.max_blob_bytes,
        )?);
        let apply = Arc::new(start_apply_service(&config).await?);
        Ok(Self {
            config,
            tls,
            store,
            apply,
        })
    }

    /// The blob cache (the apply engine reads complete blobs from it).
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// Serves on `listener` (mutual TLS only) until `shutdown` completes, then drains in-flight calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AgentError> {
        let service = AgentService::new(Arc::clone(&self.config), self.store, self.apply);
        tonic::transport::Server::builder()
            .tls_config(self.tls.server_config())?
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(upload_path::AgentRoutes::new(service))
            .serve_with_incoming_shutdown(accepted_connections(listener), shutdown)
            .await?;
        Ok(())
    }
}

/// Connections accepted on `listener`, with `TCP_NODELAY` (HTTP/2 frames go out as soon as they are written:
/// with Nagle, the agent's flow-control updates waited for the sender's delayed ACKs) and TCP keepalive.
/// The server builder's socket settings are ignored for a caller-supplied listener, so they are set here.
fn accepted_connections(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
}

/// The single place the apply engine is constructed (it runs crash recovery before the server starts).
async fn start_apply_service(config: &Arc<Config>) -> Result<ApplyService, AgentError> {
    ApplyService::start(config)
        .await
        .map_err(|e| AgentError::Apply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = accepted_connections(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "TCP_NODELAY is set on accepted connections"
        );
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap(), "TCP keepalive is on");
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE);
    }
}
