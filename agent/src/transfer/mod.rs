//! The blob cache and the chunked, resumable upload: `<state>/blobs/<digest>` holds complete, verified blobs;
//! `<state>/blobs/partial/<digest>.part` holds the data of an upload in progress and `<digest>.chunks` the hash
//! of every chunk verified and synced so far (a 28-byte header naming the tree version, then 32 bytes per chunk,
//! append-only). A blob is named by a version-2 (BLAKE3) tree digest, or a version-1 (sha256) one when a
//! controller older than version 2 sends it (`patchd_package::digest::TreeVersion`).
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
//! Each byte is hashed once (its chunk's hash, on a blocking thread); the tree digest is built from the records.
//! Three threads per upload keep the hashing thread (the bottleneck) busy: the hasher verifies each chunk, a writer
//! `pwrite`s it, a recorder fsyncs and appends records. They run only while chunks come: after [`PARK_AFTER`] of
//! silence they record what they have and end, and the parked upload waits for its next message on the async side
//! alone (so idle uploads hold no threads, and an apply never waits behind them). Memory stays flat: each queue
//! between them holds at most [`QUEUE_BYTES`] of chunks.
//!
//! A fourth thread, the unpacker, stages the package as it arrives when the agent allows it
//! ([`BlobStore::with_prestage`]) and the upload starts at chunk 0: the hasher hands it each verified chunk and it
//! unpacks them as Stage would, published as `staging/<digest>` once the blob is complete (`unpacker.rs`).

mod ledger;
mod partial;
mod recorder;
mod store;
mod unpacker;
mod writer;

pub use ledger::{Reservation, SpaceLedger, free_bytes};
pub use store::BlobStore;
pub(crate) use writer::DIRECT_IO_ALIGN;

use bytes::Bytes;
use patchd_apply::layout::is_digest;
use patchd_package::digest::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TreeVersion, chunk_count};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes of chunks allowed to wait in each queue (network → hasher, hasher → writer, hasher → unpacker): memory
/// stays flat.
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
    #[error(
        "unknown tree digest version {0}: this agent reads versions 1 and 2; upgrade patchd on this host to one \
         as new as the controller"
    )]
    UnknownTreeVersion(u32),
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
        "hash mismatch for chunk {index} at offset {offset}: the chunk was corrupted in transit; resend it"
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

/// A blob as announced by the sender: its tree digest, size, chunk size and tree version (all four fix the digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub digest: String,
    pub total_size: u64,
    pub chunk_size: u32,
    /// Which hash the chunks and the digest are made with.
    pub version: TreeVersion,
}

impl BlobRef {
    /// Checks the fields; the digest becomes a file name, so it must be exactly 64 hex characters. `tree_version`
    /// is the wire number (0 from a sender older than the field: version 1).
    pub fn new(
        digest: String,
        total_size: u64,
        chunk_size: u32,
        tree_version: u32,
    ) -> Result<Self, TransferError> {
        if !is_digest(&digest) {
            return Err(TransferError::InvalidDigest(digest));
        }
        if !patchd_package::digest::is_valid_chunk_size(chunk_size) {
            return Err(TransferError::InvalidChunkSize(chunk_size));
        }
        let version = TreeVersion::from_wire(tree_version)
            .ok_or(TransferError::UnknownTreeVersion(tree_version))?;
        Ok(Self {
            digest,
            total_size,
            chunk_size,
            version,
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

/// One chunk as received: already converted from the wire type.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub index: u64,
    pub offset: u64,
    pub data: Bytes,
    /// The chunk's hash in the blob's tree version, as the sender claims it.
    pub hash: [u8; 32],
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

#[cfg(test)]
mod tests;
