//! Talking to one agent over mutual TLS: connect (the agent's certificate must name the dialed host), Info, and
//! the resumable chunked push of a package.
//!
//! A push needs the package's tree digest before the first byte is sent (it is the agent's cache key), so a file
//! is first read once to compute every chunk's hash ([`PreparedBlob`], BLAKE3: tree version 2: 32 bytes kept per chunk, so 32 KiB per
//! GiB at 1 MiB chunks), on up to four threads (the chunks are independent), or not at all when the sender's
//! digest cache remembers this very file (`super::digest_cache`). The push then maps the chunks the agent lacks from the page cache, one at a time (no copy
//! out of it), and sends them with those hashes, so the sender hashes each byte once however many agents it pushes
//! to. Mapping runs on a blocking thread feeding a bounded channel: memory stays flat whatever the package size.

use crate::agent::digest_cache::{CachedDigest, DigestCache, FileIdentity};
use crate::tls_files::ControllerTls;
use crate::untrusted::escaped;
use bytes::Bytes;
use futures::StreamExt;
use patchd_package::MANIFEST_FORMAT;
use patchd_package::digest::{
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TreeDigest, TreeHasher, TreeVersion, chunk_count, chunk_hash,
};
use patchd_proto::v1;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The generated gRPC client, for calls this module does not wrap.
pub type RawAgentClient = v1::agent_client::AgentClient<Channel>;

/// Time allowed for TCP connect plus TLS and HTTP/2 handshakes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a short call (Info, QueryBlob).
pub const SHORT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of chunks read ahead of the network (at least one chunk).
const SEND_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// What went wrong talking to an agent. Messages name the agent and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("invalid agent address `{0}`: use HOST:PORT (e.g. 127.0.1.3:7480)")]
    BadAddress(String),
    #[error("cannot connect to agent {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("agent {addr}: {call} failed: {code:?}: {detail}")]
    Rpc {
        addr: String,
        call: &'static str,
        code: Code,
        detail: String,
    },
    #[error("cannot read {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "invalid chunk size {0}: use a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
    )]
    BadChunkSize(u32),
    #[error(
        "agent {addr} is older than this patchctl: it does not read tree digest version 2 (BLAKE3), so it would \
         check every chunk as sha256 and refuse the upload. Upgrade patchd on that host (`patchctl agent info \
         {addr}` shows its version), then run the command again"
    )]
    TreeVersionUnsupported { addr: String },
    #[error(
        "agent {addr} is older than this patchctl: it reads package manifests up to format {read}, and packages \
         built since format {MANIFEST_FORMAT} (BLAKE3 file digests) would be refused at stage, after the whole \
         upload. Upgrade patchd on that host (`patchctl agent info {addr}` shows its version), then run the command \
         again"
    )]
    ManifestFormatUnsupported { addr: String, read: u32 },
    #[error("{} changed since its digest was computed: push again", path.display())]
    FileChanged { path: PathBuf },
    #[error(
        "agent {addr} accepted the upload but does not report the blob complete: push again to resume"
    )]
    Incomplete { addr: String },
    /// The signature files beside the package cannot be read.
    #[error("package signature: {0}")]
    Signature(#[from] patchd_package::signing::SignatureError),
}

impl AgentClientError {
    /// The gRPC code, when the agent (or the transport) answered with a status.
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `err` and every source below it, joined; tonic's top-level messages ("transport error") say little.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

fn rpc_error(addr: &str, call: &'static str, status: &Status) -> AgentClientError {
    let mut detail = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        let chain = error_chain(source);
        if chain.starts_with(&detail) {
            detail = chain;
        } else if !detail.contains(&chain) {
            detail = format!("{detail}: {chain}");
        }
    }
    AgentClientError::Rpc {
        addr: addr.to_string(),
        call,
        code: status.code(),
        detail: escaped(&detail),
    }
}

/// The host part of `host:port` (IPv6 without brackets), used as the TLS server name.
pub fn split_host_port(addr: &str) -> Result<(String, u16), AgentClientError> {
    let bad = || AgentClientError::BadAddress(addr.to_string());
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        return Ok((sock.ip().to_string(), sock.port()));
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || host.contains(':') || host.contains('/') {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// What an agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentInfo {
    pub agent: String,
    pub agent_version: String,
    pub protocol_version: u32,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub state_dir_free_bytes: u64,
    pub host_uptime_seconds: u64,
    pub agent_uptime_seconds: u64,
    pub services: Vec<String>,
}

/// What an agent holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlobHeld {
    pub complete: bool,
    pub chunks_held: u64,
    pub bytes_held: u64,
}

/// A file with its tree digest and chunk hashes computed, ready to push to any number of agents.
#[derive(Debug, Clone)]
pub struct PreparedBlob {
    pub path: PathBuf,
    pub digest: TreeDigest,
    pub total_size: u64,
    pub chunk_size: u32,
    chunk_hashes: Arc<Vec<[u8; 32]>>,
    modified: Option<SystemTime>,
    identity: FileIdentity,
    from_cache: bool,
    /// Time spent reading and hashing the file (or finding its hashes in the digest cache).
    pub prepare_elapsed: Duration,
    /// Texts of the minisign signature files beside the package (`<package>.minisig`, `<package>.*.minisig`),
    /// sent with Stage and Apply; agents that trust keys refuse the package without enough valid ones.
    pub signatures: Arc<Vec<String>>,
}

impl PreparedBlob {
    /// Reads and hashes `path` once (blocking: run it on a blocking thread, or use [`PreparedBlob::prepare`]).
    pub fn prepare_blocking(path: &Path, chunk_size: u32) -> Result<Self, AgentClientError> {
        Self::prepare_blocking_cached(path, chunk_size, None)
    }

    /// Hashes the file at `path` (just written, e.g. by `package build`) into `cache` at `chunk_size`, so that its
    /// first push sends at once. Waits out the rest of the cache's racy window after its last change first (else it
    /// would not be remembered). Best effort: a failure only means the push hashes it.
    pub fn remember_new_file(cache: &DigestCache, path: &Path, chunk_size: u32) {
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && let Some(wait) = DigestCache::settle_wait(&FileIdentity::of(&meta))
        {
            std::thread::sleep(wait);
        }
        if let Err(error) = PreparedBlob::prepare_blocking_cached(path, chunk_size, Some(cache)) {
            tracing::debug!(path = %path.display(), %error, "digest cache not filled");
        }
    }

    /// Like [`PreparedBlob::prepare_blocking`], but takes the chunk hashes from `cache` when it remembers this very
    /// file (same device, inode, size, modification and change times), and remembers them there otherwise.
    pub fn prepare_blocking_cached(
        path: &Path,
        chunk_size: u32,
        cache: Option<&DigestCache>,
    ) -> Result<Self, AgentClientError> {
        if !patchd_package::digest::is_valid_chunk_size(chunk_size) {
            return Err(AgentClientError::BadChunkSize(chunk_size));
        }
        let started = Instant::now();
        let io = |cause| AgentClientError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let changed = || AgentClientError::FileChanged {
            path: path.to_path_buf(),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let identity = FileIdentity::of(&meta);
        let remembered = cache.and_then(|cache| cache.lookup(&identity, chunk_size));
        let from_cache = remembered.is_some();
        let CachedDigest {
            digest,
            chunk_hashes,
        } = match remembered {
            Some(remembered) => remembered,
            None => {
                let chunk_hashes =
                    hash_chunks(&file, identity.size(), chunk_size).map_err(|cause| match cause
                        .kind()
                    {
                        std::io::ErrorKind::UnexpectedEof => changed(),
                        _ => io(cause),
                    })?;
                if FileIdentity::of(&file.metadata().map_err(io)?) != identity {
                    return Err(changed());
                }
                let mut tree = TreeHasher::new(chunk_size, identity.size());
                for hash in &chunk_hashes {
                    tree.push_chunk_hash(hash);
                }
                let hashed = CachedDigest {
                    digest: tree.finish_digest().ok_or_else(changed)?,
                    chunk_hashes,
                };
                if let Some(cache) = cache {
                    cache.store(&identity, chunk_size, &hashed);
                }
                hashed
            }
        };
        let signatures = patchd_package::signing::read_signatures(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            digest,
            total_size: identity.size(),
            chunk_size,
            chunk_hashes: Arc::new(chunk_hashes),
            modified: meta.modified().ok(),
            identity,
            from_cache,
            prepare_elapsed: started.elapsed(),
            signatures: Arc::new(signatures),
        })
    }

    /// [`PreparedBlob::prepare_blocking`] on a blocking thread.
    pub async fn prepare(path: &Path, chunk_size: u32) -> Result<Self, AgentClientError> {
        Self::prepare_cached(path, chunk_size, None).await
    }

    /// [`PreparedBlob::prepare_blocking_cached`] on a blocking thread.
    pub async fn prepare_cached(
        path: &Path,
        chunk_size: u32,
        cache: Option<DigestCache>,
    ) -> Result<Self, AgentClientError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            Self::prepare_blocking_cached(&path, chunk_size, cache.as_ref())
        })
        .await
        .map_err(|e| AgentClientError::Io {
            path: PathBuf::new(),
            cause: std::io::Error::other(e.to_string()),
        })?
    }

    /// Whether the chunk hashes came from the sender's digest cache instead of a read of the file.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// The file's identity when it was prepared (the digest cache's key).
    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_hashes.len() as u64
    }

    fn wire_ref(&self) -> v1::BlobRef {
        v1::BlobRef {
            digest: self.digest.to_string(),
            total_size: self.total_size,
            chunk_size: self.chunk_size,
            tree_version: TreeVersion::CURRENT.wire(),
        }
    }

    fn check_unchanged(&self) -> Result<(), AgentClientError> {
        let meta = std::fs::metadata(&self.path).map_err(|cause| AgentClientError::Io {
            path: self.path.clone(),
            cause,
        })?;
        if meta.len() != self.total_size || meta.modified().ok() != self.modified {
            return Err(AgentClientError::FileChanged {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// Refuses, on QueryBlob and before anything is sent, an agent older than this patchctl. One before tree version 2
/// ignores the request's `tree_version` and answers without its own: it would read the chunk hashes as sha256 and
/// refuse every chunk. One before manifest format 2 answers without `manifest_format`: it would refuse a package
/// of the current format at stage, after the whole upload.
fn check_agent_reads(addr: &str, held: &v1::QueryBlobResponse) -> Result<(), AgentClientError> {
    if held.tree_version != TreeVersion::CURRENT.wire() {
        return Err(AgentClientError::TreeVersionUnsupported {
            addr: addr.to_string(),
        });
    }
    if held.manifest_format < MANIFEST_FORMAT {
        return Err(AgentClientError::ManifestFormatUnsupported {
            addr: addr.to_string(),
            // An agent from before the field read format 1 only.
            read: held.manifest_format.max(1),
        });
    }
    Ok(())
}

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// How many times a refused chunk (DATA_LOSS) is resent, each time on a new upload stream.
    pub max_retries: u32,
    /// TEST HOOK ONLY: corrupt the hash sent with this chunk index on the first attempt, to exercise the
    /// agent's refusal and the retry. Never set outside tests.
    #[doc(hidden)]
    pub corrupt_chunk_once: Option<u64>,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            max_retries: 3,
            corrupt_chunk_once: None,
        }
    }
}

/// Progress of a push, reported about ten times a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushProgress {
    /// Bytes the agent holds or that were handed to the connection in this push.
    pub bytes_done: u64,
    pub total_bytes: u64,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushReport {
    pub agent: String,
    pub digest: TreeDigest,
    pub total_bytes: u64,
    pub chunk_size: u32,
    pub chunks_total: u64,
    /// Chunks the agent already held when the push started (not sent).
    pub chunks_skipped: u64,
    /// Chunks and chunk bytes actually sent in this push (including resent chunks).
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// Upload streams restarted after the agent refused a chunk.
    pub retries: u32,
    /// Seconds spent in the transfer (query to completion).
    pub transfer_seconds: f64,
    /// Seconds spent reading and hashing the file beforehand (or finding its hashes in the digest cache).
    pub digest_seconds: f64,
    /// Whether the chunk hashes came from the sender's digest cache (no read of the file before sending).
    pub digest_cached: bool,
    /// Transfer throughput in MB/s (10^6 bytes per second) of the bytes actually sent.
    pub mb_per_s: f64,
}

/// A connection to one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    addr: String,
    client: RawAgentClient,
    /// The channel under `client`: Upload is sent on it directly ([`crate::agent::upload`]).
    channel: Channel,
}

impl AgentClient {
    /// Connects to `host_port` over mutual TLS. The agent's certificate must name `host` (DNS or IP SAN).
    pub async fn connect(host_port: &str, tls: &ControllerTls) -> Result<Self, AgentClientError> {
        let (host, _) = split_host_port(host_port)?;
        let connect_err = |detail: String| AgentClientError::Connect {
            addr: host_port.to_string(),
            detail,
        };
        let endpoint = Endpoint::from_shared(format!("https://{host_port}"))
            .map_err(|_| AgentClientError::BadAddress(host_port.to_string()))?
            .tls_config(tls.client_config(&host))
            .map_err(|e| connect_err(error_chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let channel = tokio::time::timeout(CONNECT_TIMEOUT * 2, endpoint.connect())
            .await
            .map_err(|_| {
                connect_err(format!(
                    "no answer within {}s",
                    (CONNECT_TIMEOUT * 2).as_secs()
                ))
            })?
            .map_err(|e| connect_err(error_chain(&e)))?;
        let client = RawAgentClient::new(channel.clone())
            .max_decoding_message_size(patchd_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(patchd_proto::MAX_MESSAGE_BYTES);
        Ok(Self {
            addr: host_port.to_string(),
            client,
            channel,
        })
    }

    /// The address this client dialed.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The generated client, for calls not wrapped here (Stage, Apply, Rollback, Status).
    pub fn raw(&mut self) -> &mut RawAgentClient {
        &mut self.client
    }

    /// The agent's Info.
    pub async fn info(&mut self) -> Result<AgentInfo, AgentClientError> {
        let mut request = tonic::Request::new(v1::InfoRequest {});
        request.set_timeout(SHORT_CALL_TIMEOUT);
        let info = self
            .client
            .info(request)
            .await
            .map_err(|s| rpc_error(&self.addr, "Info", &s))?
            .into_inner();
        Ok(AgentInfo {
            agent: self.addr.clone(),
            agent_version: escaped(&info.agent_version),
            protocol_version: info.protocol_version,
            hostname: escaped(&info.hostname),
            os: escaped(&info.os),
            arch: escaped(&info.arch),
            cpu_count: info.cpu_count,
            memory_total_bytes: info.memory_total_bytes,
            memory_available_bytes: info.memory_available_bytes,
            state_dir_free_bytes: info.state_dir_free_bytes,
            host_uptime_seconds: info.host_uptime_seconds,
            agent_uptime_seconds: info.agent_uptime_seconds,
            services: info.services.iter().map(|name| escaped(name)).collect(),
        })
    }

    /// What the agent holds of `blob`.
    pub async fn query_blob(&mut self, blob: &PreparedBlob) -> Result<BlobHeld, AgentClientError> {
        let mut request = tonic::Request::new(v1::QueryBlobRequest {
            blob: Some(blob.wire_ref()),
        });
        request.set_timeout(SHORT_CALL_TIMEOUT);
        let held = self
            .client
            .query_blob(request)
            .await
            .map_err(|s| rpc_error(&self.addr, "QueryBlob", &s))?
            .into_inner();
        check_agent_reads(&self.addr, &held)?;
        Ok(BlobHeld {
            complete: held.complete,
            chunks_held: held.chunks_held,
            bytes_held: held.bytes_held,
        })
    }

    /// Reads, hashes and pushes the file at `path` (see [`AgentClient::push`]).
    pub async fn push_file(
        &mut self,
        path: &Path,
        chunk_size: u32,
        on_progress: impl FnMut(PushProgress),
    ) -> Result<PushReport, AgentClientError> {
        let blob = PreparedBlob::prepare(path, chunk_size).await?;
        self.push(&blob, &PushOptions::default(), on_progress).await
    }

    /// Sends the chunks of `blob` the agent does not hold yet, resuming at its first missing chunk. A chunk the
    /// agent refuses as corrupt is resent (on a new stream) up to `options.max_retries` times.
    pub async fn push(
        &mut self,
        blob: &PreparedBlob,
        options: &PushOptions,
        mut on_progress: impl FnMut(PushProgress),
    ) -> Result<PushReport, AgentClientError> {
        let started = Instant::now();
        let sent = Arc::new(SentCounter::default());
        let mut retries = 0u32;
        let mut skipped = None;
        let mut corrupt_next = options.corrupt_chunk_once;
        loop {
            let held = self.query_blob(blob).await?;
            skipped.get_or_insert(held.chunks_held);
            if held.complete {
                break;
            }
            blob.check_unchanged()?;
            let result = {
                let upload = self.upload_from(
                    blob,
                    held.chunks_held,
                    corrupt_next.take(),
                    Arc::clone(&sent),
                );
                tokio::pin!(upload);
                let mut ticker = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        result = &mut upload => break result,
                        _ = ticker.tick() => on_progress(PushProgress {
                            bytes_done: (held.bytes_held + sent.bytes_this_stream()).min(blob.total_size),
                            total_bytes: blob.total_size,
                        }),
                    }
                }
            };
            match result {
                Ok(true) => break,
                Ok(false) => {
                    return Err(AgentClientError::Incomplete {
                        addr: self.addr.clone(),
                    });
                }
                Err(UploadFailure::Rpc(status))
                    if status.code() == Code::DataLoss && retries < options.max_retries =>
                {
                    retries += 1;
                    tracing::warn!(agent = %self.addr, retry = retries, reason = %status.message(), "agent refused a chunk: resending");
                }
                Err(UploadFailure::Rpc(status)) => {
                    return Err(rpc_error(&self.addr, "Upload", &status));
                }
                Err(UploadFailure::Local(e)) => return Err(e),
            }
        }
        on_progress(PushProgress {
            bytes_done: blob.total_size,
            total_bytes: blob.total_size,
        });
        let elapsed = started.elapsed();
        let bytes_sent = sent.bytes.load(Ordering::Relaxed);
        Ok(PushReport {
            agent: self.addr.clone(),
            digest: blob.digest.clone(),
            total_bytes: blob.total_size,
            chunk_size: blob.chunk_size,
            chunks_total: blob.chunk_count(),
            chunks_skipped: skipped.unwrap_or(0),
            chunks_sent: sent.chunks.load(Ordering::Relaxed),
            bytes_sent,
            retries,
            transfer_seconds: elapsed.as_secs_f64(),
            digest_seconds: blob.prepare_elapsed.as_secs_f64(),
            digest_cached: blob.from_cache,
            mb_per_s: if elapsed.is_zero() {
                0.0
            } else {
                bytes_sent as f64 / elapsed.as_secs_f64() / 1e6
            },
        })
    }

    /// One upload stream from chunk `start` to the end. `Ok(complete)`.
    async fn upload_from(
        &mut self,
        blob: &PreparedBlob,
        start: u64,
        corrupt: Option<u64>,
        sent: Arc<SentCounter>,
    ) -> Result<bool, UploadFailure> {
        sent.stream_bytes.store(0, Ordering::Relaxed);
        let depth = (SEND_QUEUE_BYTES / blob.chunk_size as usize).max(1);
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::UploadMessage>(depth);
        let reader_blob = blob.clone();
        let reader =
            tokio::task::spawn_blocking(move || read_chunks(&reader_blob, start, corrupt, &tx));
        let header = v1::UploadMessage {
            kind: Some(v1::upload_message::Kind::Header(v1::UploadHeader {
                blob: Some(blob.wire_ref()),
            })),
        };
        let counter = Arc::clone(&sent);
        let body = futures::stream::once(async move { header }).chain(
            tokio_stream::wrappers::ReceiverStream::new(rx).inspect(move |message| {
                if let Some(v1::upload_message::Kind::Chunk(chunk)) = &message.kind {
                    counter.add(chunk.data.len() as u64);
                }
            }),
        );
        let response = crate::agent::upload::upload(self.channel.clone(), body).await;
        let read_result = reader.await.map_err(|e| {
            UploadFailure::Local(AgentClientError::Io {
                path: blob.path.clone(),
                cause: std::io::Error::other(e.to_string()),
            })
        })?;
        // A local read error explains an early end of stream better than the agent's view of it.
        if let Err(cause) = read_result {
            return Err(UploadFailure::Local(AgentClientError::Io {
                path: blob.path.clone(),
                cause,
            }));
        }
        let response = response.map_err(UploadFailure::Rpc)?;
        Ok(response.complete)
    }
}

enum UploadFailure {
    Rpc(Status),
    Local(AgentClientError),
}

#[derive(Debug, Default)]
struct SentCounter {
    bytes: AtomicU64,
    chunks: AtomicU64,
    stream_bytes: AtomicU64,
}

impl SentCounter {
    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stream_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    fn bytes_this_stream(&self) -> u64 {
        self.stream_bytes.load(Ordering::Relaxed)
    }
}

/// Threads that hash a file's chunks at most: the chunks are independent (the tree digest only combines their
/// hashes in order), so on an idle machine the digest pass takes 1/n of a single thread's time.
const MAX_HASH_THREADS: usize = 4;

/// The hash of every chunk of the first `size` bytes of `file`, in order: the file is cut into one contiguous
/// range of chunks per thread, each read with `pread` into its own buffer. `UnexpectedEof` when the file is shorter.
fn hash_chunks(file: &std::fs::File, size: u64, chunk_size: u32) -> std::io::Result<Vec<[u8; 32]>> {
    let chunks = chunk_count(size, chunk_size);
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_HASH_THREADS)
        .min(usize::try_from(chunks).unwrap_or(1))
        .max(1) as u64;
    let per_thread = chunks.div_ceil(threads);
    let hash_range = |first: u64, end: u64| -> std::io::Result<Vec<[u8; 32]>> {
        let mut buf = vec![0u8; chunk_size as usize];
        let mut hashes = Vec::with_capacity(usize::try_from(end - first).unwrap_or(0));
        for index in first..end {
            let offset = index * u64::from(chunk_size);
            let len = (size - offset).min(u64::from(chunk_size)) as usize;
            std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..len], offset)?;
            hashes.push(chunk_hash(&buf[..len]));
        }
        Ok(hashes)
    };
    if threads == 1 {
        return hash_range(0, chunks);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let first = (thread * per_thread).min(chunks);
                let end = (first + per_thread).min(chunks);
                scope.spawn(move || hash_range(first, end))
            })
            .collect();
        let mut hashes = Vec::with_capacity(usize::try_from(chunks).unwrap_or(0));
        for worker in workers {
            let part = worker
                .join()
                .map_err(|_| std::io::Error::other("a hashing thread panicked"))??;
            hashes.extend(part);
        }
        Ok(hashes)
    })
}

/// Reads chunks `start..` of the blob's file and queues them; stops quietly when the stream is dropped.
fn read_chunks(
    blob: &PreparedBlob,
    start: u64,
    corrupt: Option<u64>,
    tx: &tokio::sync::mpsc::Sender<v1::UploadMessage>,
) -> std::io::Result<()> {
    let chunk_size = u64::from(blob.chunk_size);
    let file = std::fs::File::open(&blob.path)?;
    for index in start..blob.chunk_count() {
        let offset = index * chunk_size;
        let len = (blob.total_size - offset).min(chunk_size) as usize;
        // A file cut short is refused here; only a truncation racing this very chunk reaches the mapping.
        if file.metadata()?.len() < offset + len as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank during the push",
            ));
        }
        let data = chunk_bytes(&file, offset, len)?;
        let mut hash = blob.chunk_hashes[index as usize];
        if corrupt == Some(index) {
            hash[0] ^= 0xff;
        }
        let message = v1::UploadMessage {
            kind: Some(v1::upload_message::Kind::Chunk(v1::UploadChunk {
                index,
                offset,
                data,
                hash: Bytes::copy_from_slice(&hash),
            })),
        };
        if tx.blocking_send(message).is_err() {
            break; // the call ended (agent answered or failed): its status tells why
        }
    }
    Ok(())
}

/// Chunks at least this large are mapped ([`map_chunk`]); smaller ones are read: for them a mapping costs more
/// system calls than the copy it saves.
const MAP_MIN_BYTES: usize = 64 * 1024;

/// Bytes `offset..offset + len` of the file: mapped from the page cache when the chunk is large enough, read
/// otherwise (or when the file system cannot map it).
fn chunk_bytes(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    if len >= MAP_MIN_BYTES
        && let Ok(mapped) = map_chunk(file, offset, len)
    {
        return Ok(mapped);
    }
    let mut data = vec![0; len];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut data, offset)?;
    Ok(Bytes::from(data))
}

/// One chunk of the file, mapped from the page cache instead of copied out of it: that copy was a third of the
/// sender's CPU during a push (BENCHMARKS.md, "Transfer"). The mapping lives as long as the chunk's `Bytes`, i.e.
/// until TLS has encrypted it, so memory stays bounded by the chunks in flight.
#[allow(unsafe_code)]
pub(crate) fn map_chunk(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    // SAFETY: a read-only mapping that patchctl never writes through. It is a shared mapping of the file, so
    // another process could change the bytes under the `Bytes` while TLS copies them: patchctl only copies them
    // (no decision depends on them twice), and the agent checks every chunk's sha256, so such a change ends as a
    // refused chunk. A truncation racing the size check before this call makes the next read of the mapping raise
    // SIGBUS, which `crate::signals` turns into an error message and exit code 1.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .populate()
            .map(file)?
    };
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_that_does_not_echo_tree_version_2_is_refused_before_anything_is_sent() {
        let answer = |tree_version| v1::QueryBlobResponse {
            tree_version,
            manifest_format: MANIFEST_FORMAT,
            ..Default::default()
        };
        assert!(check_agent_reads("10.0.0.1:7480", &answer(2)).is_ok());
        for old in [0, 1] {
            let error = check_agent_reads("10.0.0.1:7480", &answer(old)).unwrap_err();
            assert!(
                matches!(error, AgentClientError::TreeVersionUnsupported { .. }),
                "{error}"
            );
            let text = error.to_string();
            assert!(
                text.contains("10.0.0.1:7480") && text.contains("Upgrade patchd on that host"),
                "{text}"
            );
        }
    }

    #[test]
    fn an_agent_that_does_not_read_manifest_format_2_is_refused_before_anything_is_sent() {
        // What an agent from before manifest format 2 answers: tree version 2, no `manifest_format`.
        let old = v1::QueryBlobResponse {
            tree_version: 2,
            ..Default::default()
        };
        let error = check_agent_reads("10.0.0.1:7480", &old).unwrap_err();
        assert!(
            matches!(
                error,
                AgentClientError::ManifestFormatUnsupported { read: 1, .. }
            ),
            "{error}"
        );
        let text = error.to_string();
        assert!(
            text.contains("10.0.0.1:7480")
                && text.contains("up to format 1")
                && text.contains("Upgrade patchd on that host"),
            "{text}"
        );
    }

    #[test]
    fn chunks_are_read_whole_and_a_shrunk_file_is_refused() {
        // 4 KiB chunks are read, 64 KiB ones mapped: both give the same bytes.
        for chunk_size in [MIN_CHUNK_SIZE, MAP_MIN_BYTES as u32] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let data: Vec<u8> = (0..(3 * chunk_size + 100))
                .map(|i| (i % 251) as u8)
                .collect();
            std::fs::write(&path, &data).unwrap();
            let blob = PreparedBlob::prepare_blocking(&path, chunk_size).unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            read_chunks(&blob, 1, None, &tx).unwrap();
            drop(tx);
            let mut sent = Vec::new();
            while let Some(message) = rx.blocking_recv() {
                let Some(v1::upload_message::Kind::Chunk(chunk)) = message.kind else {
                    panic!("only chunks are queued");
                };
                assert_eq!(chunk.offset, chunk.index * u64::from(chunk_size));
                assert_eq!(chunk.hash.as_ref(), blob.chunk_hashes[chunk.index as usize]);
                sent.extend_from_slice(&chunk.data);
            }
            assert_eq!(
                sent,
                data[chunk_size as usize..],
                "chunks 1.. byte for byte"
            );

            std::fs::write(&path, &data[..chunk_size as usize + 10]).unwrap();
            let (tx, _rx) = tokio::sync::mpsc::channel(8);
            let err = read_chunks(&blob, 0, None, &tx).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
            assert!(err.to_string().contains("shrank"), "{err}");
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.1.3:7480").unwrap(),
            ("127.0.1.3".into(), 7480)
        );
        assert_eq!(split_host_port("[::1]:7480").unwrap(), ("::1".into(), 7480));
        assert_eq!(
            split_host_port("node-1.example:80").unwrap(),
            ("node-1.example".into(), 80)
        );
        assert!(split_host_port("node-1").is_err());
        assert!(split_host_port("node:x").is_err());
    }

    #[test]
    fn prepared_digest_matches_the_package_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let blob = PreparedBlob::prepare_blocking(&path, MIN_CHUNK_SIZE).unwrap();
        let expected = patchd_package::digest::tree_digest_file(&path, MIN_CHUNK_SIZE).unwrap();
        assert_eq!(blob.digest, expected);
        assert_eq!(blob.chunk_count(), 5);
        assert!(PreparedBlob::prepare_blocking(&path, 1).is_err());
    }

    #[test]
    fn chunks_hashed_on_several_threads_give_the_single_pass_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let chunk = MIN_CHUNK_SIZE as usize;
        for len in [0, 1, chunk, chunk + 1, 4 * chunk, 7 * chunk - 3, 13 * chunk] {
            let data: Vec<u8> = (0..len).map(|i| (i % 247) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let hashes = hash_chunks(&file, len as u64, MIN_CHUNK_SIZE).unwrap();
            let expected: Vec<[u8; 32]> = data.chunks(chunk).map(chunk_hash).collect();
            assert_eq!(hashes, expected, "{len} bytes");
            if len > 0 {
                let err = hash_chunks(&file, len as u64 + 1, MIN_CHUNK_SIZE).unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{len} bytes");
            }
        }
    }

    #[test]
    fn a_prepared_file_is_remembered_and_a_rewritten_one_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::at(dir.path().join("digests"));
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3u8; 3 * MIN_CHUNK_SIZE as usize]).unwrap();
        let racy_window_over = || loop {
            let blob = PreparedBlob::prepare_blocking(&path, MIN_CHUNK_SIZE).unwrap();
            let changed = std::fs::metadata(&path).unwrap().modified().unwrap();
            if changed.elapsed().unwrap_or_default() > 2 * crate::agent::digest_cache::RACY_WINDOW {
                return blob;
            }
            std::thread::sleep(crate::agent::digest_cache::RACY_WINDOW / 4);
        };
        let plain = racy_window_over();
        let first =
            PreparedBlob::prepare_blocking_cached(&path, MIN_CHUNK_SIZE, Some(&cache)).unwrap();
        assert!(!first.from_cache());
        let second =
            PreparedBlob::prepare_blocking_cached(&path, MIN_CHUNK_SIZE, Some(&cache)).unwrap();
        assert!(second.from_cache());
        assert_eq!(second.digest, plain.digest);
        assert_eq!(second.chunk_hashes, plain.chunk_hashes);

        std::fs::write(&path, vec![4u8; 3 * MIN_CHUNK_SIZE as usize]).unwrap();
        let rewritten =
            PreparedBlob::prepare_blocking_cached(&path, MIN_CHUNK_SIZE, Some(&cache)).unwrap();
        assert!(!rewritten.from_cache());
        assert_ne!(rewritten.digest, plain.digest);
    }
}
