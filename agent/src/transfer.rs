//! The blob cache and the chunked, resumable upload: `<state>/blobs/<digest>` holds complete, verified blobs;
//! `<state>/blobs/partial/<digest>.part` holds the data of an upload in progress and `<digest>.chunks` the sha256
//! of every chunk verified and synced so far (a 28-byte header, then 32 bytes per chunk, append-only).
//!
//! Durability order: chunk data is `fdatasync`ed before its record is appended, so after any crash every record
//! describes data on disk and an upload resumes at the first chunk without a record. Records are written in
//! batches (every [`FLUSH_BYTES`] or after [`FLUSH_IDLE`] without a new chunk, and when the stream ends) so a
//! fast upload does not pay one fsync per chunk; a crash loses at most one batch of progress, never correctness.
//! A blob becomes complete only by renaming the synced part file after the tree digest of all records matched.
//!
//! Bounds: at most `max_concurrent_uploads` uploads run at once (one more is refused, not queued: a waiting one
//! would still hold its connection's buffers), and each holds a reservation of the bytes it still needs against the
//! free space of the state filesystem ([`SpaceLedger`]), so two uploads cannot both count the same free bytes.
//!
//! Each byte is hashed once (its chunk's sha256, on a blocking thread); the tree digest is built from the records.
//! Three threads per upload keep the hashing thread (the bottleneck) busy: the hasher verifies each chunk, a writer
//! `pwrite`s it, a recorder fsyncs and appends records. They run only while chunks come: after [`PARK_AFTER`] of
//! silence they record what they have and end, and the parked upload waits for its next message on the async side
//! alone (so idle uploads hold no threads, and an apply never waits behind them). Memory stays flat: each queue
//! between them holds at most [`QUEUE_BYTES`] of chunks.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use patchd_package::digest::{
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TreeHasher, chunk_count, chunk_sha256,
};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Bytes of chunks allowed to wait in each queue (network → hasher, hasher → writer): memory stays flat.
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Verified data written but not yet recorded before the worker syncs and records it.
pub const FLUSH_BYTES: u64 = 32 * 1024 * 1024;
/// A pause in the stream longer than this makes the worker sync and record what it has.
pub const FLUSH_IDLE: Duration = Duration::from_millis(100);
/// Default for an upload that sends nothing: after this long it is abandoned (its verified chunks are kept).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A stream silent for this long parks its upload: the hasher, writer and recorder threads record what they have
/// and end, so an idle upload holds no thread; the next message starts them again.
pub const PARK_AFTER: Duration = Duration::from_secs(1);
/// Default number of uploads receiving at once.
pub const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 8;

const RECORDS_MAGIC: &[u8; 16] = b"patchd-chunks-v1";
const RECORDS_HEADER_LEN: u64 = 16 + 4 + 8;
const RECORD_LEN: u64 = 32;

/// What can go wrong receiving a blob. Mapped to gRPC codes in `status.rs`.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(
        "invalid digest `{0}`: expected 64 lower-case hex characters (the package's tree digest)"
    )]
    InvalidDigest(String),
    #[error(
        "invalid chunk size {0}: use a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
    )]
    InvalidChunkSize(u32),
    #[error("invalid upload: {0}")]
    Protocol(String),
    #[error("upload stream broken: {0} (verified chunks are kept; push again to resume)")]
    StreamBroken(String),
    #[error(
        "package of {size} bytes exceeds this agent's limits.max_blob_bytes ({max} bytes): raise the limit in \
         patchd.toml or ship a smaller package"
    )]
    TooLarge { size: u64, max: u64 },
    #[error(
        "not enough disk space for this package: it needs {needed} more bytes ({}) in {} but only {free} bytes ({}) \
         are free there{}; free space on that filesystem or move state_dir to a bigger one",
        mib(*needed), dir.display(), mib(*free), reserved_note(*reserved)
    )]
    NoSpace {
        needed: u64,
        /// Free bytes not reserved by other uploads.
        free: u64,
        /// Bytes reserved by uploads in progress (already subtracted from `free`).
        reserved: u64,
        dir: PathBuf,
    },
    #[error(
        "sha256 mismatch for chunk {index} at offset {offset}: the chunk was corrupted in transit; resend it"
    )]
    ChunkCorrupt { index: u64, offset: u64 },
    #[error(
        "expected chunk {expected}, got chunk {got}: query the blob (QueryBlob) and resume at the first missing chunk"
    )]
    OutOfOrder { expected: u64, got: u64 },
    #[error(
        "every chunk verified but the tree digest is {actual}, not the announced {expected}: the partial upload \
         was discarded; check the package digest and push again"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error(
        "no message for {}s: upload abandoned (verified chunks are kept; push again to resume)",
        .0.as_secs()
    )]
    IdleTimeout(Duration),
    #[error(
        "{limit} uploads are already in progress on this agent (bounds.max_concurrent_uploads): push again once \
         they have finished, or raise the limit in patchd.toml"
    )]
    TooManyUploads { limit: usize },
    #[error("I/O error on {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

fn reserved_note(reserved: u64) -> String {
    if reserved == 0 {
        String::new()
    } else {
        format!(
            " ({reserved} more bytes, {}, are reserved by uploads in progress)",
            mib(reserved)
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |cause| TransferError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// A blob as announced by the sender: its tree digest, size and chunk size (all three fix the digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub digest: String,
    pub total_size: u64,
    pub chunk_size: u32,
}

impl BlobRef {
    /// Checks the fields; the digest becomes a file name, so it must be exactly 64 hex characters.
    pub fn new(digest: String, total_size: u64, chunk_size: u32) -> Result<Self, TransferError> {
        if !is_digest(&digest) {
            return Err(TransferError::InvalidDigest(digest));
        }
        if !patchd_package::digest::is_valid_chunk_size(chunk_size) {
            return Err(TransferError::InvalidChunkSize(chunk_size));
        }
        Ok(Self {
            digest,
            total_size,
            chunk_size,
        })
    }

    fn chunk_count(&self) -> u64 {
        chunk_count(self.total_size, self.chunk_size)
    }

    fn held_bytes(&self, chunks: u64) -> u64 {
        chunks
            .saturating_mul(u64::from(self.chunk_size))
            .min(self.total_size)
    }
}

/// Whether `s` is a tree digest (64 lower-case hex characters).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One chunk as received: already converted from the wire type.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub index: u64,
    pub offset: u64,
    pub data: Bytes,
    pub sha256: [u8; 32],
}

/// What the agent holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlobState {
    pub complete: bool,
    /// Verified chunks held, always a prefix.
    pub chunks_held: u64,
    pub bytes_held: u64,
}

/// The result of one upload call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadOutcome {
    pub complete: bool,
    /// Chunks received, verified and written in this call.
    pub chunks_received: u64,
    pub bytes_received: u64,
}

/// Bytes promised to uploads in progress and not yet written: free space minus this is what a new upload may
/// claim. Each [`Reservation`] gives its bytes back as its chunks are written (they then show in `statvfs`),
/// and the rest when it ends.
#[derive(Debug, Default)]
pub struct SpaceLedger {
    outstanding: Mutex<u64>,
}

/// Bytes one upload may still write; see [`SpaceLedger`].
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<SpaceLedger>,
    remaining: u64,
}

impl SpaceLedger {
    fn outstanding(&self) -> std::sync::MutexGuard<'_, u64> {
        self.outstanding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `needed` of the free bytes `free` measures unless uploads in progress already hold too many of
    /// them. Measuring, checking and reserving happen under one lock.
    pub fn reserve(
        self: &Arc<Self>,
        needed: u64,
        free: impl FnOnce() -> Result<u64, TransferError>,
        dir: &Path,
    ) -> Result<Reservation, TransferError> {
        let mut outstanding = self.outstanding();
        let free = free()?;
        let available = free.saturating_sub(*outstanding);
        if needed > available {
            return Err(TransferError::NoSpace {
                needed,
                free: available,
                reserved: *outstanding,
                dir: dir.to_path_buf(),
            });
        }
        *outstanding += needed;
        Ok(Reservation {
            ledger: Arc::clone(self),
            remaining: needed,
        })
    }

    /// Bytes reserved and not yet written.
    pub fn reserved(&self) -> u64 {
        *self.outstanding()
    }
}

impl Reservation {
    /// `bytes` of this upload were written: they now count in the filesystem's own free figure.
    fn written(&mut self, bytes: u64) {
        let taken = bytes.min(self.remaining);
        self.remaining -= taken;
        let mut outstanding = self.ledger.outstanding();
        *outstanding = outstanding.saturating_sub(taken);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut outstanding = self.ledger.outstanding();
        *outstanding = outstanding.saturating_sub(self.remaining);
    }
}

/// How many uploads may run at once and how long one may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct UploadBounds {
    pub max_concurrent: usize,
    pub idle_timeout: Duration,
}

impl Default for UploadBounds {
    fn default() -> Self {
        Self {
            max_concurrent: DEFAULT_MAX_CONCURRENT_UPLOADS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The content-addressed blob cache under `<state>/blobs`.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    partial_dir: PathBuf,
    max_blob_bytes: u64,
    locks: DigestLocks,
    space: Arc<SpaceLedger>,
    bounds: UploadBounds,
    upload_slots: Arc<tokio::sync::Semaphore>,
    /// Uploads whose disk threads run now (the others are parked or waiting for their digest's lock).
    receiving: Arc<std::sync::atomic::AtomicUsize>,
}

impl BlobStore {
    /// Opens (creating if needed) the cache in `dir`, with the default [`UploadBounds`].
    pub fn open(dir: &Path, max_blob_bytes: u64) -> Result<Self, TransferError> {
        Self::open_bounded(dir, max_blob_bytes, UploadBounds::default())
    }

    /// Opens (creating if needed) the cache in `dir`.
    pub fn open_bounded(
        dir: &Path,
        max_blob_bytes: u64,
        bounds: UploadBounds,
    ) -> Result<Self, TransferError> {
        let partial_dir = dir.join("partial");
        std::fs::create_dir_all(&partial_dir).map_err(io_err(&partial_dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            partial_dir,
            max_blob_bytes,
            locks: DigestLocks::default(),
            space: Arc::default(),
            bounds,
            upload_slots: Arc::new(tokio::sync::Semaphore::new(bounds.max_concurrent.max(1))),
            receiving: Arc::default(),
        })
    }

    /// How long an upload may stay silent.
    pub fn idle_timeout(&self) -> Duration {
        self.bounds.idle_timeout
    }

    /// Uploads holding threads right now: receiving chunks, not parked.
    pub fn receiving_uploads(&self) -> usize {
        self.receiving.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes reserved by uploads in progress and not yet written.
    pub fn reserved_bytes(&self) -> u64 {
        self.space.reserved()
    }

    /// Removes partial uploads (`partial/<digest>.part` and `.chunks`) untouched (later of mtime and ctime) for
    /// `max_age`, skipping any digest an upload holds right now: its lock is taken without waiting, so an upload
    /// that starts meanwhile waits and then begins afresh. Returns the paths removed.
    pub fn prune_partials(&self, max_age: Duration) -> Vec<PathBuf> {
        let now = std::time::SystemTime::now();
        let Ok(listing) = std::fs::read_dir(&self.partial_dir) else {
            return Vec::new();
        };
        let mut by_digest: HashMap<String, Vec<(PathBuf, std::fs::Metadata)>> = HashMap::new();
        for entry in listing.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name
                .strip_suffix(".part")
                .or_else(|| name.strip_suffix(".chunks"))
                .unwrap_or(&name)
                .to_string();
            if let Ok(meta) = entry.metadata() {
                by_digest
                    .entry(digest)
                    .or_default()
                    .push((entry.path(), meta));
            }
        }
        let mut removed = Vec::new();
        for (digest, files) in by_digest {
            // Both files of an upload go together, and only when both are old.
            if !files
                .iter()
                .all(|(_, meta)| is_untouched_for(meta, max_age, now))
            {
                continue;
            }
            let Some(_held) = self.locks.try_acquire(&digest) else {
                continue;
            };
            for (path, meta) in files {
                // Re-checked under the lock: an upload may have written it since the listing.
                let still_old = std::fs::symlink_metadata(&path)
                    .is_ok_and(|now_meta| is_untouched_for(&now_meta, max_age, now));
                if !still_old || !meta.is_file() {
                    continue;
                }
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), bytes = meta.len(), "removed an old partial upload");
                        removed.push(path);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "cannot remove a partial upload: {e}")
                    }
                }
            }
        }
        removed
    }

    /// Where the complete blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// The path of the complete blob `digest`, if the agent holds it.
    pub fn complete_blob(&self, digest: &str) -> Option<PathBuf> {
        if !is_digest(digest) {
            return None;
        }
        let path = self.blob_path(digest);
        path.is_file().then_some(path)
    }

    fn part_path(&self, digest: &str) -> PathBuf {
        self.partial_dir.join(format!("{digest}.part"))
    }

    fn records_path(&self, digest: &str) -> PathBuf {
        self.partial_dir.join(format!("{digest}.chunks"))
    }

    /// Free bytes for unprivileged writers on the filesystem of the cache.
    pub fn free_bytes(&self) -> Result<u64, TransferError> {
        free_bytes(&self.partial_dir)
    }

    /// What the agent holds of `blob`. Cheap (a few `stat`s, and a touch of a complete blob); takes no lock, so it can run during an upload and
    /// then reports the chunks recorded so far.
    pub fn query(&self, blob: &BlobRef) -> Result<BlobState, TransferError> {
        let path = self.blob_path(&blob.digest);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == blob.total_size => {
                // The controller skips the upload and stages next: keep the blob young for the cache pruning.
                patchd_apply::prune::touch(&path);
                let n = blob.chunk_count();
                return Ok(BlobState {
                    complete: true,
                    chunks_held: n,
                    bytes_held: blob.total_size,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let records = self.records_path(&blob.digest);
        let file = match File::open(&records) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BlobState::default()),
            Err(e) => return Err(io_err(&records)(e)),
        };
        let len = file.metadata().map_err(io_err(&records))?.len();
        if !header_matches(&file, blob) {
            return Ok(BlobState::default());
        }
        let held = (len.saturating_sub(RECORDS_HEADER_LEN) / RECORD_LEN).min(blob.chunk_count());
        Ok(BlobState {
            complete: false,
            chunks_held: held,
            bytes_held: blob.held_bytes(held),
        })
    }

    /// Receives chunks of `blob` from `chunks` (in order, starting at any index up to the first missing chunk;
    /// chunks already held are skipped). Verifies, writes and records each; completes the blob when the last
    /// chunk arrived and the tree digest matched. Holds a per-digest lock so concurrent uploads of the same blob
    /// run one after the other.
    pub async fn upload<S>(
        self: &Arc<Self>,
        blob: BlobRef,
        mut chunks: S,
    ) -> Result<UploadOutcome, TransferError>
    where
        S: Stream<Item = Result<Chunk, TransferError>> + Unpin,
    {
        if blob.total_size > self.max_blob_bytes {
            return Err(TransferError::TooLarge {
                size: blob.total_size,
                max: self.max_blob_bytes,
            });
        }
        // Refused rather than queued: a waiting upload would still hold its connection's buffers.
        let _slot = Arc::clone(&self.upload_slots)
            .try_acquire_owned()
            .map_err(|_| TransferError::TooManyUploads {
                limit: self.bounds.max_concurrent,
            })?;
        let _guard = self.locks.acquire(&blob.digest).await;

        let store = Arc::clone(self);
        let header = blob.clone();
        let partial = blocking(move || store.open_partial(&header)).await?;
        let Some(partial) = partial else {
            return Ok(UploadOutcome {
                complete: true,
                ..UploadOutcome::default()
            });
        };
        let held_at_start = partial.held;
        let mut partial = partial;
        let mut outcome = UploadOutcome::default();
        let mut stream_error = None;
        let mut ended = false;
        while !ended {
            // Parked: the disk threads are gone and the next message is awaited without holding any thread.
            let first = match tokio::time::timeout(self.bounds.idle_timeout, chunks.next()).await {
                Err(_) => {
                    stream_error = Some(TransferError::IdleTimeout(self.bounds.idle_timeout));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    stream_error = Some(e);
                    break;
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let (tx, rx) = mpsc::channel::<Chunk>(queue_depth(blob.chunk_size));
            let runtime = tokio::runtime::Handle::current();
            let receiving = Arc::clone(&self.receiving);
            receiving.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let worker = tokio::task::spawn_blocking(move || {
                let received = partial.receive(rx, &runtime);
                receiving.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                (partial, received)
            });
            let mut next = Some(first);
            loop {
                if let Some(chunk) = next.take()
                    // Chunks another upload of this digest finished while this one waited for the lock.
                    && chunk.index >= held_at_start
                    && tx.send(chunk).await.is_err()
                {
                    break; // the worker stopped; its result says why
                }
                match tokio::time::timeout(PARK_AFTER, chunks.next()).await {
                    // A pause: the worker records what it has and ends; the upload parks.
                    Err(_) => break,
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        stream_error = Some(e);
                        ended = true;
                        break;
                    }
                    Ok(Some(Ok(chunk))) => next = Some(chunk),
                }
            }
            drop(tx);
            let (back, received) = worker
                .await
                .map_err(|e| TransferError::Internal(format!("upload worker failed: {e}")))?;
            let received = received?;
            outcome.chunks_received += received.chunks_received;
            outcome.bytes_received += received.bytes_received;
            partial = back;
        }
        if partial.held == blob.chunk_count() {
            blocking(move || partial.finish()).await?;
            outcome.complete = true;
        }
        match stream_error {
            Some(e) if !outcome.complete => Err(e),
            _ => Ok(outcome),
        }
    }

    /// Opens (or creates) the partial upload of `blob`; `None` when the blob is already complete.
    fn open_partial(&self, blob: &BlobRef) -> Result<Option<PartialBlob>, TransferError> {
        let state = self.query(blob)?;
        if state.complete {
            return Ok(None);
        }
        let needed = blob.total_size - state.bytes_held;
        let reservation = self
            .space
            .reserve(needed, || self.free_bytes(), &self.dir)?;
        PartialBlob::open(self, blob, reservation).map(Some)
    }
}

/// Untouched (neither written nor renamed: the later of mtime and ctime) for at least `min_age` before `now`.
fn is_untouched_for(
    meta: &std::fs::Metadata,
    min_age: Duration,
    now: std::time::SystemTime,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let seconds = u64::try_from(meta.mtime().max(meta.ctime())).unwrap_or(0);
    let touched = std::time::UNIX_EPOCH + Duration::from_secs(seconds);
    now.duration_since(touched).is_ok_and(|age| age >= min_age)
}

/// Available bytes (for unprivileged users) on the filesystem holding `path`.
// The statvfs field types are platform-dependent (32-bit on some targets): the conversions are not useless there.
#[allow(clippy::useless_conversion)]
pub fn free_bytes(path: &Path) -> Result<u64, TransferError> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(|e| TransferError::Io {
        path: path.to_path_buf(),
        cause: std::io::Error::from(e),
    })?;
    Ok(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Internal(format!("blocking task failed: {e}")))?
}

fn records_header(blob: &BlobRef) -> [u8; RECORDS_HEADER_LEN as usize] {
    let mut header = [0u8; RECORDS_HEADER_LEN as usize];
    header[..16].copy_from_slice(RECORDS_MAGIC);
    header[16..20].copy_from_slice(&blob.chunk_size.to_be_bytes());
    header[20..].copy_from_slice(&blob.total_size.to_be_bytes());
    header
}

fn header_matches(mut file: &File, blob: &BlobRef) -> bool {
    let mut found = [0u8; RECORDS_HEADER_LEN as usize];
    file.read_exact(&mut found).is_ok() && found == records_header(blob)
}

/// An upload in progress: the part file, the record file and the tree built from the records so far.
struct PartialBlob {
    blob: BlobRef,
    final_path: PathBuf,
    dir: PathBuf,
    part_path: PathBuf,
    records_path: PathBuf,
    part: File,
    records: File,
    tree: TreeHasher,
    held: u64,
    pending: Vec<[u8; 32]>,
    pending_bytes: u64,
    /// The bytes this upload may still write; handed to the writer, which gives them back as it writes.
    reservation: Option<Reservation>,
}

impl PartialBlob {
    fn open(
        store: &BlobStore,
        blob: &BlobRef,
        reservation: Reservation,
    ) -> Result<Self, TransferError> {
        let part_path = store.part_path(&blob.digest);
        let records_path = store.records_path(&blob.digest);
        let mut tree = TreeHasher::new(blob.chunk_size, blob.total_size);
        let mut held = 0u64;
        let resumed = match File::open(&records_path) {
            Ok(file) if header_matches(&file, blob) && part_path.exists() => {
                let part_len = std::fs::metadata(&part_path)
                    .map_err(io_err(&part_path))?
                    .len();
                let recorded = (file.metadata().map_err(io_err(&records_path))?.len()
                    - RECORDS_HEADER_LEN)
                    / RECORD_LEN;
                let recorded = recorded.min(blob.chunk_count());
                // Records follow synced data, so the part file covers them; the check guards against tampering.
                let covered = if part_len >= blob.held_bytes(recorded) {
                    recorded
                } else {
                    part_len / u64::from(blob.chunk_size)
                };
                let mut reader = BufReader::new(file);
                let mut record = [0u8; RECORD_LEN as usize];
                while held < covered {
                    reader
                        .read_exact(&mut record)
                        .map_err(io_err(&records_path))?;
                    tree.push_chunk_hash(&record);
                    held += 1;
                }
                true
            }
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&records_path)(e)),
        };
        if resumed {
            // Drop a torn trailing record (or records not covered by data) so appends stay aligned.
            let records = OpenOptions::new()
                .write(true)
                .open(&records_path)
                .map_err(io_err(&records_path))?;
            records
                .set_len(RECORDS_HEADER_LEN + held * RECORD_LEN)
                .map_err(io_err(&records_path))?;
        } else {
            let mut records = File::create(&records_path).map_err(io_err(&records_path))?;
            records
                .write_all(&records_header(blob))
                .map_err(io_err(&records_path))?;
            records.sync_all().map_err(io_err(&records_path))?;
            File::create(&part_path).map_err(io_err(&part_path))?;
        }
        let part = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&part_path)
            .map_err(io_err(&part_path))?;
        let records = OpenOptions::new()
            .append(true)
            .open(&records_path)
            .map_err(io_err(&records_path))?;
        if resumed {
            tracing::info!(digest = %blob.digest, chunks_held = held, "resuming partial upload");
        }
        Ok(Self {
            blob: blob.clone(),
            final_path: store.blob_path(&blob.digest),
            dir: store.dir.clone(),
            part_path,
            records_path,
            part,
            records,
            tree,
            held,
            pending: Vec::new(),
            pending_bytes: 0,
            reservation: Some(reservation),
        })
    }

    /// The disk side of an upload, on a blocking thread: hashes chunks until the channel closes or one is bad,
    /// while a writer thread writes them and a recorder thread makes them durable (so neither `pwrite` nor fsync
    /// latency stalls hashing).
    fn receive(
        &mut self,
        rx: mpsc::Receiver<Chunk>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<UploadOutcome, TransferError> {
        let writer = Writer {
            part: self.part.try_clone().map_err(io_err(&self.part_path))?,
            direct: open_direct(&self.part_path),
            part_path: self.part_path.clone(),
            aligned: Vec::new(),
            reservation: self.reservation.take(),
        };
        let recorder = Recorder {
            part: self.part.try_clone().map_err(io_err(&self.part_path))?,
            records: self
                .records
                .try_clone()
                .map_err(io_err(&self.records_path))?,
            part_path: self.part_path.clone(),
            records_path: self.records_path.clone(),
        };
        let (to_writer, writer_rx) =
            std::sync::mpsc::sync_channel::<ToWriter>(queue_depth(self.blob.chunk_size));
        // One batch waiting: if the disk falls behind, writing waits instead of piling up unsynced data.
        let (to_recorder, recorder_rx) = std::sync::mpsc::sync_channel::<Vec<[u8; 32]>>(1);
        let (outcome, result) = std::thread::scope(|scope| {
            let writing = scope.spawn(move || writer.run(writer_rx, to_recorder));
            let recording = scope.spawn(move || recorder.run(recorder_rx));
            let (outcome, received) = self.receive_chunks(rx, runtime, &to_writer);
            // Keep what verified before a bad chunk: the retry resumes right at it.
            let handed = self.hand_over(&to_writer);
            drop(to_writer);
            fn panicked<T>(what: &str) -> Result<T, TransferError> {
                Err(TransferError::Internal(format!(
                    "the {what} thread panicked"
                )))
            }
            let written = writing
                .join()
                .unwrap_or_else(|_| panicked("writer"))
                // The writer hands the rest of the reservation back for the next burst of chunks.
                .map(|reservation| self.reservation = reservation);
            let recorded = recording.join().unwrap_or_else(|_| panicked("recorder"));
            // A disk error explains a stopped writer better than the hasher's view of it.
            (outcome, written.and(recorded).and(received).and(handed))
        });
        result?;
        Ok(outcome)
    }

    fn receive_chunks(
        &mut self,
        mut rx: mpsc::Receiver<Chunk>,
        runtime: &tokio::runtime::Handle,
        to_writer: &SyncSender<ToWriter>,
    ) -> (UploadOutcome, Result<(), TransferError>) {
        let mut outcome = UploadOutcome::default();
        let result = loop {
            let next = if self.pending.is_empty() {
                Some(runtime.block_on(rx.recv()))
            } else {
                runtime.block_on(async { tokio::time::timeout(FLUSH_IDLE, rx.recv()).await.ok() })
            };
            match next {
                Some(Some(chunk)) => {
                    let len = chunk.data.len() as u64;
                    let hash = chunk_sha256(&chunk.data);
                    if let Err(e) = self.accept(chunk, hash, to_writer) {
                        break Err(e);
                    }
                    outcome.chunks_received += 1;
                    outcome.bytes_received += len;
                    if self.pending_bytes >= FLUSH_BYTES
                        && let Err(e) = self.hand_over(to_writer)
                    {
                        break Err(e);
                    }
                }
                Some(None) => break Ok(()),
                None => {
                    if let Err(e) = self.hand_over(to_writer) {
                        break Err(e);
                    }
                }
            }
        };
        (outcome, result)
    }

    /// Hands the hashes of the chunks verified since the last batch on, behind their data: the writer passes
    /// them to the recorder once it wrote that data.
    fn hand_over(&mut self, to_writer: &SyncSender<ToWriter>) -> Result<(), TransferError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.pending_bytes = 0;
        to_writer
            .send(ToWriter::Batch(std::mem::take(&mut self.pending)))
            .map_err(|_| TransferError::Internal("the writer stopped".into()))
    }

    /// Accepts the next chunk of the stream, given the sha256 of its data.
    fn accept(
        &mut self,
        chunk: Chunk,
        hash: [u8; 32],
        to_writer: &SyncSender<ToWriter>,
    ) -> Result<(), TransferError> {
        if chunk.index != self.held {
            return Err(TransferError::OutOfOrder {
                expected: self.held,
                got: chunk.index,
            });
        }
        let chunk_count = self.blob.chunk_count();
        if chunk.index >= chunk_count {
            return Err(TransferError::Protocol(format!(
                "chunk {} is past the end: a blob of {} bytes in chunks of {} bytes has {chunk_count} chunks \
                 (indexes 0..{chunk_count}); stop the stream after the last chunk",
                chunk.index, self.blob.total_size, self.blob.chunk_size
            )));
        }
        let offset = chunk
            .index
            .checked_mul(u64::from(self.blob.chunk_size))
            .ok_or_else(|| {
                TransferError::Internal(format!("chunk {} lies outside the blob", chunk.index))
            })?;
        if chunk.offset != offset {
            return Err(TransferError::Protocol(format!(
                "chunk {} has offset {}, expected {offset} (index × chunk size)",
                chunk.index, chunk.offset
            )));
        }
        let expected_len = self
            .blob
            .total_size
            .saturating_sub(offset)
            .min(u64::from(self.blob.chunk_size));
        if chunk.data.len() as u64 != expected_len {
            return Err(TransferError::Protocol(format!(
                "chunk {} at offset {offset} has {} bytes, expected {expected_len}",
                chunk.index,
                chunk.data.len()
            )));
        }
        if hash != chunk.sha256 {
            return Err(TransferError::ChunkCorrupt {
                index: chunk.index,
                offset,
            });
        }
        to_writer
            .send(ToWriter::Data {
                offset,
                data: chunk.data,
            })
            .map_err(|_| TransferError::Internal("the writer stopped".into()))?;
        self.tree.push_chunk_hash(&hash);
        self.pending.push(hash);
        self.pending_bytes += expected_len;
        self.held += 1;
        Ok(())
    }

    /// Checks the tree digest, then publishes the blob by renaming the synced part file.
    fn finish(self) -> Result<(), TransferError> {
        let actual = self.tree.clone().finish().ok_or_else(|| {
            TransferError::Internal("chunk count does not match the blob size".into())
        })?;
        if actual != self.blob.digest {
            let _ = std::fs::remove_file(&self.part_path);
            let _ = std::fs::remove_file(&self.records_path);
            return Err(TransferError::DigestMismatch {
                expected: self.blob.digest.clone(),
                actual,
            });
        }
        // Only the blob's own bytes: a part file left longer (by an older agent or a stale upload) must not
        // carry trailing bytes into the complete blob.
        self.part
            .set_len(self.blob.total_size)
            .map_err(io_err(&self.part_path))?;
        self.part.sync_all().map_err(io_err(&self.part_path))?;
        std::fs::rename(&self.part_path, &self.final_path).map_err(io_err(&self.final_path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        let _ = std::fs::remove_file(&self.records_path);
        tracing::info!(digest = %self.blob.digest, bytes = self.blob.total_size, "blob complete");
        Ok(())
    }
}

/// What the hasher sends the writer, in stream order.
enum ToWriter {
    /// A verified chunk to write at its offset.
    Data { offset: u64, data: Bytes },
    /// The hashes of the chunks sent before: pass them to the recorder once written.
    Batch(Vec<[u8; 32]>),
}

/// Chunks held in one queue: about [`QUEUE_BYTES`], at least one.
fn queue_depth(chunk_size: u32) -> usize {
    (QUEUE_BYTES / (chunk_size.max(1) as usize)).max(1)
}

/// Alignment of direct-I/O offsets, lengths and buffers: the largest logical block size in common use (the upload
/// path allocates chunk buffers with it, so they go to the disk as they are).
pub(crate) const DIRECT_IO_ALIGN: usize = 4096;
/// Largest direct write: a chunk is copied into one aligned buffer of this size piece by piece, so the buffer
/// stays small whatever the chunk size.
const DIRECT_IO_PIECE: usize = 1024 * 1024;

/// Opens the part file for direct I/O (`O_DIRECT`), or `None` where the filesystem does not support it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .ok()
}

/// Writes verified chunks into the part file.
///
/// Chunks go to disk with direct I/O when the filesystem allows it: a package is written once and read once
/// (at stage), so routing it through the page cache would only cost a copy, writeback work and the eviction of
/// pages the host's own services (a database) are using. Durability does not change: the recorder's
/// `fdatasync` still comes before a chunk's record. The last chunk is padded to the alignment; `finish`
/// truncates the blob to its size.
struct Writer {
    part: File,
    direct: Option<File>,
    part_path: PathBuf,
    /// Reused buffer holding one aligned, padded piece of a chunk for direct I/O.
    aligned: Vec<u8>,
    /// Given back chunk by chunk once written: from then on the file system's free figure counts the bytes.
    reservation: Option<Reservation>,
}

impl Writer {
    /// Writes until the hasher is done; returns what is left of the reservation.
    fn run(
        mut self,
        from_hasher: std::sync::mpsc::Receiver<ToWriter>,
        to_recorder: SyncSender<Vec<[u8; 32]>>,
    ) -> Result<Option<Reservation>, TransferError> {
        for message in from_hasher {
            match message {
                ToWriter::Data { offset, data } => {
                    self.write(offset, &data)?;
                    if let Some(reservation) = &mut self.reservation {
                        reservation.written(data.len() as u64);
                    }
                }
                ToWriter::Batch(batch) => {
                    // A closed recorder has failed: its own result carries the error.
                    if to_recorder.send(batch).is_err() {
                        return Ok(self.reservation);
                    }
                }
            }
        }
        Ok(self.reservation)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        let mut done = 0;
        while let Some(direct) = &self.direct
            && offset.is_multiple_of(DIRECT_IO_ALIGN as u64)
            && done < data.len()
        {
            let rest = &data[done..];
            // Data already in aligned memory (the upload path's buffers) goes to the disk as it is, whole blocks
            // at once; anything else (and a partial last block) is copied into the aligned buffer and padded.
            let (block, taken) = if (rest.as_ptr() as usize).is_multiple_of(DIRECT_IO_ALIGN)
                && rest.len() >= DIRECT_IO_ALIGN
            {
                let whole = rest.len() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
                (&rest[..whole], whole)
            } else {
                let piece = &rest[..rest.len().min(DIRECT_IO_PIECE)];
                let padded = piece.len().div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN;
                if self.aligned.len() < DIRECT_IO_PIECE + DIRECT_IO_ALIGN {
                    self.aligned = vec![0; DIRECT_IO_PIECE + DIRECT_IO_ALIGN];
                }
                let start = self.aligned.as_ptr().align_offset(DIRECT_IO_ALIGN);
                let block = &mut self.aligned[start..start + padded];
                block[..piece.len()].copy_from_slice(piece);
                block[piece.len()..].fill(0);
                (&*block, piece.len())
            };
            match direct.write_all_at(block, offset + done as u64) {
                Ok(()) => done += taken,
                // The filesystem accepted O_DIRECT at open but not this write: buffered from here on.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    tracing::debug!(path = %self.part_path.display(), "direct I/O refused, writing buffered");
                    self.direct = None;
                }
                Err(e) => return Err(io_err(&self.part_path)(e)),
            }
        }
        if done < data.len() {
            self.part
                .write_all_at(&data[done..], offset + done as u64)
                .map_err(io_err(&self.part_path))?;
        }
        Ok(())
    }
}

/// Makes verified chunks durable: syncs the part file, then appends the batch's records (see the module doc).
struct Recorder {
    part: File,
    records: File,
    part_path: PathBuf,
    records_path: PathBuf,
}

impl Recorder {
    fn run(
        mut self,
        batches: std::sync::mpsc::Receiver<Vec<[u8; 32]>>,
    ) -> Result<(), TransferError> {
        for batch in batches {
            self.part.sync_data().map_err(io_err(&self.part_path))?;
            let records: Vec<u8> = batch.iter().flatten().copied().collect();
            self.records
                .write_all(&records)
                .map_err(io_err(&self.records_path))?;
            self.records
                .sync_data()
                .map_err(io_err(&self.records_path))?;
        }
        Ok(())
    }
}

/// One async mutex per digest, created on demand and dropped when nobody holds or waits for it.
#[derive(Debug, Default)]
struct DigestLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct DigestGuard<'a> {
    locks: &'a DigestLocks,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl DigestLocks {
    /// The lock of `digest` if nobody holds it now.
    fn try_acquire(&self, digest: &str) -> Option<DigestGuard<'_>> {
        let lock = {
            let mut map = self
                .map
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(map.entry(digest.to_string()).or_default())
        };
        let guard = lock.try_lock_owned().ok();
        let acquired = DigestGuard { locks: self, guard };
        // Dropping a guard that holds nothing still cleans the map entry made above.
        acquired.guard.is_some().then_some(acquired)
    }

    async fn acquire(&self, digest: &str) -> DigestGuard<'_> {
        let lock = {
            let mut map = self
                .map
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(map.entry(digest.to_string()).or_default())
        };
        DigestGuard {
            locks: self,
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for DigestGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self
            .locks
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_package::digest::tree_digest_reader;

    fn chunks_of(data: &[u8], chunk_size: u32) -> Vec<Chunk> {
        data.chunks(chunk_size as usize)
            .enumerate()
            .map(|(i, c)| Chunk {
                index: i as u64,
                offset: i as u64 * u64::from(chunk_size),
                data: Bytes::copy_from_slice(c),
                sha256: chunk_sha256(c),
            })
            .collect()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn writer_uses_direct_io_where_allowed_and_pads_only_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.part");
        File::create(&path).unwrap();
        let direct = open_direct(&path);
        let supported = direct.is_some();
        let mut writer = Writer {
            part: OpenOptions::new().write(true).open(&path).unwrap(),
            direct,
            part_path: path.clone(),
            aligned: Vec::new(),
            reservation: None,
        };
        // Two chunks of 2 MiB (each written in pieces) and a tail that is not a whole block.
        let chunk = 2 * DIRECT_IO_PIECE;
        let data = sample(chunk * 2 + 100);
        // Out of order on purpose: each chunk lands at its own offset.
        writer.write(chunk as u64 * 2, &data[chunk * 2..]).unwrap();
        writer.write(chunk as u64, &data[chunk..chunk * 2]).unwrap();
        writer.write(0, &data[..chunk]).unwrap();
        assert_eq!(
            writer.direct.is_some(),
            supported,
            "direct I/O was refused mid-way"
        );
        let written = std::fs::read(&path).unwrap();
        assert_eq!(&written[..data.len()], &data[..]);
        if supported {
            // The tail block is padded with zeros; `finish` truncates the blob to its size.
            assert_eq!(written.len(), chunk * 2 + DIRECT_IO_ALIGN);
            assert!(written[data.len()..].iter().all(|&b| b == 0));
        } else {
            assert_eq!(written.len(), data.len());
        }
        // The ext4 of the test machines supports direct I/O: make sure this test exercised it there.
        let on_tmpfs = nix::sys::statfs::statfs(dir.path())
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
            .unwrap_or(true);
        if !on_tmpfs {
            assert!(supported, "O_DIRECT refused on {}", dir.path().display());
        }
    }

    #[test]
    fn writer_takes_aligned_memory_as_is_and_pads_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.part");
        File::create(&path).unwrap();
        let mut writer = Writer {
            part: OpenOptions::new().write(true).open(&path).unwrap(),
            direct: open_direct(&path),
            part_path: path.clone(),
            aligned: Vec::new(),
            reservation: None,
        };
        let supported = writer.direct.is_some();
        let data = sample(DIRECT_IO_ALIGN * 3 + 123);
        let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_IO_ALIGN);
        let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
        buf.resize(start, 0);
        buf.extend_from_slice(&data);
        let aligned = &buf[start..];
        assert_eq!(aligned.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        writer.write(0, aligned).unwrap();
        assert_eq!(writer.direct.is_some(), supported);
        let written = std::fs::read(&path).unwrap();
        assert_eq!(&written[..data.len()], &data[..]);
        if supported {
            assert_eq!(written.len(), DIRECT_IO_ALIGN * 4);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_in_two_parts_resumes_and_completes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let cs = MIN_CHUNK_SIZE;
        let data = sample(cs as usize * 5 + 100);
        let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
        let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
        let chunks = chunks_of(&data, cs);

        let first = store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks[..3].iter().cloned().map(Ok)),
            )
            .await
            .unwrap();
        assert_eq!(
            first,
            UploadOutcome {
                complete: false,
                chunks_received: 3,
                bytes_received: 3 * u64::from(cs)
            }
        );
        assert_eq!(store.query(&blob).unwrap().chunks_held, 3);

        // A restarted sender may resend held chunks: they are skipped.
        let second = store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks[2..].iter().cloned().map(Ok)),
            )
            .await
            .unwrap();
        assert!(second.complete);
        assert_eq!(second.chunks_received, 3);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
        // An old complete blob is touched when reported complete, so the cache pruning keeps it for a while.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 24 * 3600);
        std::fs::File::options()
            .write(true)
            .open(store.blob_path(&digest))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(store.query(&blob).unwrap().complete);
        let modified = std::fs::metadata(store.blob_path(&digest))
            .unwrap()
            .modified()
            .unwrap();
        assert!(modified > old + std::time::Duration::from_secs(24 * 3600));
        assert!(!store.records_path(&digest).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_chunk_keeps_the_prefix_and_wrong_digest_discards() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let cs = MIN_CHUNK_SIZE;
        let data = sample(cs as usize * 4);
        let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
        let blob = BlobRef::new(digest, data.len() as u64, cs).unwrap();
        let mut chunks = chunks_of(&data, cs);
        chunks[2].sha256[0] ^= 1;
        let err = store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks.into_iter().map(Ok)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::ChunkCorrupt { index: 2, offset } if offset == 2 * u64::from(cs)),
            "{err}"
        );
        assert_eq!(store.query(&blob).unwrap().chunks_held, 2);

        let wrong = BlobRef::new("ab".repeat(32), data.len() as u64, cs).unwrap();
        let err = store
            .upload(
                wrong.clone(),
                futures::stream::iter(chunks_of(&data, cs).into_iter().map(Ok)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransferError::DigestMismatch { .. }), "{err}");
        assert_eq!(store.query(&wrong).unwrap(), BlobState::default());
        assert!(!store.part_path(&wrong.digest).exists());
        assert!(!store.blob_path(&wrong.digest).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extra_chunk_is_refused_and_the_blob_has_its_exact_length() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let cs = MIN_CHUNK_SIZE;
        let data = sample(cs as usize * 2 + 100);
        let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
        let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
        let mut chunks = chunks_of(&data, cs);
        store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks[..1].iter().cloned().map(Ok)),
            )
            .await
            .unwrap();
        // A part file longer than the blob (e.g. left by an older agent) must not leak into the blob.
        let part = std::fs::File::options()
            .write(true)
            .open(store.part_path(&digest))
            .unwrap();
        part.write_all_at(b"trailing garbage", 3 * u64::from(cs))
            .unwrap();
        drop(part);

        let garbage = vec![0xEE_u8; cs as usize];
        chunks.push(Chunk {
            index: 3,
            offset: 3 * u64::from(cs),
            sha256: chunk_sha256(&garbage),
            data: Bytes::from(garbage),
        });
        let err = store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks[1..].iter().cloned().map(Ok)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Protocol(message) if message.contains("past the end")),
            "{err}"
        );
        assert!(!store.blob_path(&digest).exists());
        assert_eq!(store.query(&blob).unwrap().chunks_held, 3);

        // Resuming with nothing left to send completes the verified chunks.
        let outcome = store
            .upload(blob.clone(), futures::stream::empty())
            .await
            .unwrap();
        assert!(outcome.complete);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_and_empty_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path(), 1000).unwrap());
        let big = BlobRef::new("00".repeat(32), 1001, MIN_CHUNK_SIZE).unwrap();
        assert!(matches!(
            store.upload(big, futures::stream::empty()).await,
            Err(TransferError::TooLarge { .. })
        ));
        let digest = tree_digest_reader(&[][..], MIN_CHUNK_SIZE, 0).unwrap();
        let empty = BlobRef::new(digest.clone(), 0, MIN_CHUNK_SIZE).unwrap();
        let outcome = store.upload(empty, futures::stream::empty()).await.unwrap();
        assert!(outcome.complete);
        assert_eq!(
            std::fs::metadata(store.blob_path(&digest)).unwrap().len(),
            0
        );
        assert!(BlobRef::new("../etc".into(), 1, MIN_CHUNK_SIZE).is_err());
    }

    #[test]
    fn reservations_share_the_free_bytes_and_are_given_back() {
        let ledger = Arc::new(SpaceLedger::default());
        let dir = Path::new("/state/blobs");
        let mut first = ledger.reserve(60, || Ok(100), dir).unwrap();
        let err = ledger.reserve(50, || Ok(100), dir).unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::NoSpace {
                    needed: 50,
                    free: 40,
                    reserved: 60,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("reserved by uploads in progress"),
            "{err}"
        );
        // Written bytes leave the ledger (the file system's own free figure now counts them).
        first.written(30);
        assert_eq!(ledger.reserved(), 30);
        drop(first);
        assert_eq!(ledger.reserved(), 0);
        let _second = ledger.reserve(50, || Ok(100), dir).unwrap();
        assert_eq!(ledger.reserved(), 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_over_the_limit_is_refused_and_its_reservation_freed() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = UploadBounds {
            max_concurrent: 1,
            idle_timeout: Duration::from_secs(60),
        };
        let store = Arc::new(BlobStore::open_bounded(dir.path(), 1 << 30, bounds).unwrap());
        let cs = MIN_CHUNK_SIZE;
        let data = sample(cs as usize * 3);
        let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
        let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();

        // A silent upload holds the only slot and a reservation for what it has not written.
        let (tx, rx) = mpsc::channel::<Result<Chunk, TransferError>>(4);
        tx.send(Ok(chunks_of(&data, cs)[0].clone())).await.unwrap();
        let silent = {
            let store = Arc::clone(&store);
            let blob = blob.clone();
            tokio::spawn(async move {
                let chunks = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (c, rx))
                });
                store.upload(blob, Box::pin(chunks)).await
            })
        };
        while store.query(&blob).unwrap().chunks_held < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.reserved_bytes(), 2 * u64::from(cs));

        let other = BlobRef::new("ab".repeat(32), 10, cs).unwrap();
        let err = store
            .upload(other.clone(), futures::stream::empty())
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::TooManyUploads { limit: 1 }),
            "{err}"
        );
        assert!(!store.part_path(&other.digest).exists());

        drop(tx);
        assert!(!silent.await.unwrap().unwrap().complete);
        assert_eq!(store.reserved_bytes(), 0);
        let rest = chunks_of(&data, cs).into_iter().skip(1).map(Ok);
        let done = store
            .upload(blob, futures::stream::iter(rest))
            .await
            .unwrap();
        assert!(done.complete);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_partial_uploads_are_pruned_unless_an_upload_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let cs = MIN_CHUNK_SIZE;
        let data = sample(cs as usize * 3);
        let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
        let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
        let first = chunks_of(&data, cs).into_iter().take(1).map(Ok);
        store
            .upload(blob.clone(), futures::stream::iter(first))
            .await
            .unwrap();
        assert!(store.part_path(&digest).exists() && store.records_path(&digest).exists());

        let held = store.locks.acquire(&digest).await;
        assert!(store.prune_partials(Duration::ZERO).is_empty());
        assert!(store.prune_partials(Duration::from_secs(3600)).is_empty());
        drop(held);
        assert!(
            store.prune_partials(Duration::from_secs(3600)).is_empty(),
            "young partial uploads are kept"
        );
        let removed = store.prune_partials(Duration::ZERO);
        assert_eq!(removed.len(), 2);
        assert_eq!(store.query(&blob).unwrap(), BlobState::default());
        assert!(store.locks.map.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_upload_parks_without_threads_and_goes_on_when_chunks_come() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let cs = MIN_CHUNK_SIZE;
        let data = sample(cs as usize * 3 + 10);
        let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
        let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
        let chunks = chunks_of(&data, cs);

        let (tx, rx) = mpsc::channel::<Result<Chunk, TransferError>>(4);
        let upload = {
            let store = Arc::clone(&store);
            let blob = blob.clone();
            tokio::spawn(async move {
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (c, rx))
                });
                store.upload(blob, Box::pin(stream)).await
            })
        };
        tx.send(Ok(chunks[0].clone())).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while store.query(&blob).unwrap().chunks_held < 1 || store.receiving_uploads() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the silent upload never parked (receiving: {})",
                store.receiving_uploads()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!upload.is_finished(), "parked, not ended");

        for chunk in &chunks[1..] {
            tx.send(Ok(chunk.clone())).await.unwrap();
        }
        drop(tx);
        let outcome = upload.await.unwrap().unwrap();
        assert!(outcome.complete);
        assert_eq!(outcome.chunks_received, 4);
        assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
        assert_eq!(store.reserved_bytes(), 0);
        assert_eq!(store.receiving_uploads(), 0);
    }
}
