//! patchd agent library: config, mTLS gRPC server, blob transfer, host info, and the RPC glue to the apply engine.
#![forbid(unsafe_code)]

pub mod access;
pub mod apply_rpc;
pub mod config;
pub mod info;
pub mod lease;
pub mod server;
pub mod status;
pub mod tls_listener;
pub mod transfer;
pub mod trust;
pub mod upgrade;
pub mod upload_receiver;

use crate::apply_rpc::ApplyService;
use crate::config::Config;
use crate::server::AgentService;
use crate::tls_listener::ReloadingTls;
use crate::transfer::{BlobStore, UploadBounds};
use futures::{Stream, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

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
    tls: Arc<ReloadingTls>,
    store: Arc<BlobStore>,
    apply: Arc<ApplyService>,
    leases: Arc<lease::LeaseBook>,
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
        let tls = Arc::new(ReloadingTls::new(
            patchd_tls::TlsMaterial::load(&config.tls.files())?,
            config.tls.crl.clone(),
        )?);
        let store = BlobStore::open_bounded(
            &config.blobs_dir(),
            config.limits.max_blob_bytes,
            UploadBounds {
                max_concurrent: usize::try_from(config.bounds.max_concurrent_uploads)
                    .unwrap_or(usize::MAX),
                idle_timeout: config.bounds.upload_idle_timeout,
            },
        )?;
        let apply = Arc::new(start_apply_service(&config).await?);
        // Uploads stage their package as it arrives, in step with the engine's stages (see `transfer`).
        let store = Arc::new(match apply.prestager() {
            Some(prestager) => store.with_prestage(prestager),
            None => store,
        });
        let leases = Arc::new(lease::LeaseBook::open(
            patchd_apply::layout::StateLayout::new(&config.state_dir),
            config.services.iter().map(|service| service.name.as_str()),
        ));
        Ok(Self {
            config,
            tls,
            store,
            apply,
            leases,
        })
    }

    /// The blob cache (the apply engine reads complete blobs from it).
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// Serves on `listener` (mutual TLS 1.3 only, see [`tls_listener`]) until `shutdown` completes, then drains
    /// in-flight calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AgentError> {
        let pruning = tokio::spawn(prune_periodically(
            Arc::clone(&self.store),
            Arc::clone(&self.apply),
            self.config.bounds.prune_interval,
            self.config.partial_max_age(),
        ));
        let bounds = &self.config.bounds;
        let connections = tls_handshakes(
            limit_connections(
                accepted_connections(listener),
                usize::try_from(bounds.max_connections).unwrap_or(usize::MAX),
            ),
            Arc::clone(&self.tls),
        );
        let service = AgentService::new(
            Arc::clone(&self.config),
            self.store,
            self.apply,
            self.leases,
        );
        let served = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .max_concurrent_streams(Some(bounds.max_streams_per_connection))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(upload_receiver::AgentRoutes::new(service))
            .serve_with_incoming_shutdown(connections, shutdown)
            .await;
        pruning.abort();
        served?;
        Ok(())
    }
}

/// Prunes old partial uploads, then unused blobs and staged packages, every `interval` while the agent serves
/// (at start, recovery already pruned, so the first pass waits one interval).
async fn prune_periodically(
    store: Arc<BlobStore>,
    apply: Arc<ApplyService>,
    interval: Duration,
    partial_max_age: Duration,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let partials = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || partials.prune_partials(partial_max_age)).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(removed = removed.len(), "pruned old partial uploads");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning partial uploads failed: {e}"),
        }
        if let Err(status) = apply.prune_cache().await {
            tracing::warn!("pruning the blob cache failed: {}", status.message());
        }
    }
}

/// Bytes one `recv` may bring into a connection's read buffer. rustls asks the socket for at most one TLS record
/// (about 16 KiB) per read: unbuffered, an upload of 1 GiB took ~70,000 `recv` calls, and a call can make the kernel
/// send an ACK or window update. One large read serves several records from memory instead (BENCHMARKS.md,
/// "The push command end to end").
const READ_BUFFER_BYTES: usize = 128 * 1024;

/// A connection that holds one of the agent's connection slots until it is closed.
struct BoundedConnection {
    stream: BufReader<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for BoundedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.get_ref().connect_info()
    }
}

impl AsyncRead for BoundedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections of `incoming` once their TLS handshake succeeded. Each handshake runs in its own task, so a slow
/// or silent client never delays the others; a refused one is logged with its peer address and the reason (a
/// revoked certificate shows up here). Accepting stops when the server drops the stream.
fn tls_handshakes(
    incoming: impl Stream<Item = std::io::Result<BoundedConnection>> + Send + 'static,
    tls: Arc<ReloadingTls>,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<BoundedConnection>>> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let accepted = tokio::select! {
                () = ready_tx.closed() => break,
                accepted = incoming.next() => accepted,
            };
            let connection = match accepted {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    continue;
                }
                Some(Ok(connection)) => connection,
            };
            let tls = Arc::clone(&tls);
            let ready_tx = ready_tx.clone();
            tokio::spawn(async move {
                let peer = connection.stream.get_ref().peer_addr().ok();
                match tls.handshake(connection).await {
                    Ok(stream) => {
                        let _ = ready_tx.send(Ok(stream)).await;
                    }
                    Err(reason) => tracing::warn!(?peer, "refused a connection: {reason}"),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| ready_rx.poll_recv(cx))
}

/// At most `max` connections open at once: one more is closed as soon as it is accepted (a refusal the caller
/// sees at once, where leaving it in the listen backlog would only make it time out), and logged.
fn limit_connections(
    incoming: TcpIncoming,
    max: usize,
) -> impl Stream<Item = std::io::Result<BoundedConnection>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    incoming.filter_map(move |accepted| {
        let slots = Arc::clone(&slots);
        async move {
            match accepted {
                Err(e) => Some(Err(e)),
                Ok(stream) => match slots.try_acquire_owned() {
                    Ok(slot) => Some(Ok(BoundedConnection {
                        stream: BufReader::with_capacity(READ_BUFFER_BYTES, stream),
                        _slot: slot,
                    })),
                    Err(_) => {
                        tracing::warn!(
                            peer = ?stream.peer_addr().ok(),
                            "refused a connection: {max} are open (bounds.max_connections)"
                        );
                        None
                    }
                },
            }
        }
    })
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
    async fn connections_over_the_limit_are_closed_and_a_closed_one_frees_its_slot() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(limit_connections(accepted_connections(listener), 1));
        let _first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let held = incoming.next().await.unwrap().unwrap();
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The second is accepted and closed while the first holds the only slot; once the first is closed,
        // a third gets the slot.
        let next = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        let mut byte = [0u8; 1];
        assert_eq!(
            second.read(&mut byte).await.unwrap(),
            0,
            "closed by the agent"
        );
        drop(held);
        let _third = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(next.await.unwrap(), Some(true));
    }

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
