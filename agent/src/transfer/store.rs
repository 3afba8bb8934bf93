//! The blob store: complete blobs under `<state>/blobs`, partial uploads under `blobs/partial`, the upload loop
//! that parks idle uploads (and stages a package as it arrives, see [`super::unpacker`]), and the pruning of stale
//! partial uploads.

use super::ledger::{SpaceLedger, free_bytes};
use super::partial::{PartialBlob, PartialPaths, RECORD_LEN, RECORDS_HEADER_LEN, header_matches};
use super::unpacker::{UnpackGuard, Unpacking, unpack_budget};
use super::writer::queue_depth;
use super::{
    BlobRef, BlobState, Chunk, PARK_AFTER, TransferError, UploadBounds, UploadOutcome, io_err,
    is_digest,
};
use futures::{Stream, StreamExt};
use patchd_apply::digest_locks::DigestLocks;
use patchd_apply::layout::StateLayout;
use patchd_apply::prestage::PreStager;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The content-addressed blob cache under `<state>/blobs`.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    partial_dir: PathBuf,
    max_blob_bytes: u64,
    pub(super) locks: DigestLocks,
    space: Arc<SpaceLedger>,
    bounds: UploadBounds,
    upload_slots: Arc<tokio::sync::Semaphore>,
    /// Uploads whose disk threads run now (the others are parked or waiting for their digest's lock).
    receiving: Arc<std::sync::atomic::AtomicUsize>,
    /// Set: an upload that starts at chunk 0 stages its package as it arrives.
    prestage: Option<PreStager>,
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
        let partial_dir = StateLayout::partial_uploads_in(dir);
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
            prestage: None,
        })
    }

    /// Stages each package whose upload starts at its first chunk while it arrives (see [`super::unpacker`]).
    pub fn with_prestage(mut self, prestage: PreStager) -> Self {
        self.prestage = Some(prestage);
        self
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

    pub(super) fn part_path(&self, digest: &str) -> PathBuf {
        self.partial_dir.join(format!("{digest}.part"))
    }

    pub(super) fn records_path(&self, digest: &str) -> PathBuf {
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
    /// run one after the other. With [`BlobStore::with_prestage`], an upload that starts at chunk 0 also stages the
    /// package as it arrives; its result never depends on that.
    pub async fn upload<S>(
        self: &Arc<Self>,
        blob: BlobRef,
        chunks: S,
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
        let opened = blocking(move || {
            let partial = store.open_partial(&header)?;
            Ok(partial.map(|partial| {
                let prestage = store.prestage_for(&header, partial.held);
                (partial, prestage)
            }))
        })
        .await?;
        let Some((partial, prestage)) = opened else {
            return Ok(UploadOutcome {
                complete: true,
                ..UploadOutcome::default()
            });
        };
        let mut unpacking = UnpackGuard(None);
        let received = self
            .receive_stream(blob, partial, chunks, prestage, &mut unpacking.0)
            .await;
        // Whatever happened to the upload, its unpacker is published or dropped here, never left behind: on its
        // own task, so that a client going away (this future dropped) cannot stop it half-way.
        if let Some(unpacking) = unpacking.0.take() {
            let complete = received.as_ref().is_ok_and(|outcome| outcome.complete);
            if let Err(e) = tokio::spawn(unpacking.settle(complete)).await {
                tracing::warn!("the unpacker of an upload could not be settled: {e}");
            }
        }
        received
    }

    /// The upload loop of [`BlobStore::upload`], once the partial upload is open. The first burst of chunks also
    /// feeds the unpacker when `prestage` is set; it is then left in `unpacking` for the caller to settle.
    async fn receive_stream<S>(
        &self,
        blob: BlobRef,
        partial: PartialBlob,
        mut chunks: S,
        mut prestage: Option<(PreStager, u64)>,
        unpacking: &mut Option<Unpacking>,
    ) -> Result<UploadOutcome, TransferError>
    where
        S: Stream<Item = Result<Chunk, TransferError>> + Unpin,
    {
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
            // Only the first burst unpacks: a stream that parks is staged later, from the blob.
            let to_unpacker = prestage.take().map(|(prestager, budget)| {
                let (started, to_unpacker) = Unpacking::start(prestager, &blob, budget);
                *unpacking = Some(started);
                to_unpacker
            });
            let runtime = tokio::runtime::Handle::current();
            let receiving = Arc::clone(&self.receiving);
            receiving.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let worker = tokio::task::spawn_blocking(move || {
                let received = partial.receive(rx, &runtime, to_unpacker);
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

    /// Whether an upload of `blob` that holds `held` chunks at its start stages the package as it arrives, and
    /// within how many unpacked bytes: only a fresh upload (a resumed one cannot see the bytes it already has) of a
    /// package not staged yet, when the store stages at all and the disk has room (see [`unpack_budget`]).
    fn prestage_for(&self, blob: &BlobRef, held: u64) -> Option<(PreStager, u64)> {
        let prestager = self.prestage.as_ref()?;
        if held != 0 || blob.total_size == 0 || prestager.is_staged(&blob.digest) {
            return None;
        }
        let budget = unpack_budget(
            self.free_bytes(),
            self.space.reserved(),
            &prestager.limits(),
        );
        match budget {
            Some(budget) => Some((prestager.clone(), budget)),
            None => {
                tracing::debug!(digest = %blob.digest, "too little free space to stage during the upload");
                None
            }
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
        let paths = PartialPaths {
            part: self.part_path(&blob.digest),
            records: self.records_path(&blob.digest),
            complete: self.blob_path(&blob.digest),
            blobs_dir: self.dir.clone(),
        };
        PartialBlob::open(paths, blob, reservation).map(Some)
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

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Internal(format!("blocking task failed: {e}")))?
}
