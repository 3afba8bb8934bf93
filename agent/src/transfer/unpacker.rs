//! The unpacker of an upload, its fourth thread: stages the package while it arrives, so Stage finds it staged
//! instead of reading the whole blob back from disk and unpacking it then (see `patchd_apply::prestage`).
//!
//! The hasher hands it each verified chunk (a clone of the chunk's `Bytes`: no copy) through a bounded queue, so
//! memory stays flat and a slow unpack slows the stream rather than piling chunks up. It runs Stage's walk over
//! them into `staging/.tmp-*`; once the blob is complete and its tree digest matched, the tree is published as
//! `staging/<digest>` under the stage lock of the digest. It runs with the first burst of chunks only (an upload
//! that resumes, or parks mid-way, is staged later from the blob), and nothing it meets changes the upload's
//! result: a refused package, a full disk or a broken stream only drop its directory, and Stage then unpacks the
//! blob as before, reporting errors as before.

use super::BlobRef;
use super::writer::queue_depth;
use bytes::{Buf, Bytes};
use patchd_apply::prestage::{PreStager, discard};
use patchd_package::{Limits, Manifest, PackageError};
use std::io::{self, BufRead, Read};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Bytes a file or directory may take on disk beyond its content (its last partial block).
const BLOCK_SLACK: u64 = 4096;

/// Most bytes the unpack may write while the upload still needs its own: the free space not reserved by uploads
/// in progress (this one's remaining bytes included), less one block of slack per entry the package may hold.
/// The walk refuses a package past it before writing the file that would exceed it, so an unpack can never take
/// the space its upload reserved. `None`: too little room to try.
pub(super) fn unpack_budget(
    free: Result<u64, super::TransferError>,
    reserved: u64,
    limits: &Limits,
) -> Option<u64> {
    let available = free.ok()?.saturating_sub(reserved);
    let slack = limits
        .max_files
        .saturating_mul(2)
        .saturating_mul(BLOCK_SLACK);
    let budget = available.saturating_sub(slack);
    (budget > 0).then_some(budget)
}

/// The verified chunks, in order, as one stream of the blob's bytes. The queue closing before the last byte (the
/// upload broke or parked) is an error, never an early end, so a prefix can never pass for the package.
struct ChunkReader {
    chunks: Receiver<Bytes>,
    current: Bytes,
    left: u64,
}

impl BufRead for ChunkReader {
    /// The rest of the current chunk, in place (the decoder reads the verified chunk itself, not a copy).
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            if self.left == 0 {
                return Ok(&[]);
            }
            self.current = self.chunks.recv().map_err(|_| {
                io::Error::other(format!(
                    "the upload stopped {} bytes before the end",
                    self.left
                ))
            })?;
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amount: usize) {
        let amount = amount.min(self.current.len());
        self.current.advance(amount);
        self.left = self.left.saturating_sub(amount as u64);
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// A package being staged as it arrives: the unpacker thread and the directory it writes.
pub(super) struct Unpacking {
    prestager: PreStager,
    digest: String,
    temp: PathBuf,
    thread: tokio::task::JoinHandle<Result<Manifest, PackageError>>,
}

impl Unpacking {
    /// Starts the unpacker of `blob`, writing at most `budget` unpacked bytes; returns it and the queue the hasher
    /// feeds (dropping the sender ends the stream).
    pub(super) fn start(
        prestager: PreStager,
        blob: &BlobRef,
        budget: u64,
    ) -> (Self, SyncSender<Bytes>) {
        let (to_unpacker, chunks) = sync_channel(queue_depth(blob.chunk_size));
        let temp = prestager.temp_dir(&blob.digest);
        let mut limits = prestager.limits();
        limits.max_unpacked_bytes = limits.max_unpacked_bytes.min(budget);
        let (digest, size, dir) = (blob.digest.clone(), blob.total_size, temp.clone());
        let unpacker = prestager.clone();
        let thread = tokio::task::spawn_blocking(move || {
            let mut source = ChunkReader {
                chunks,
                current: Bytes::new(),
                left: size,
            };
            unpacker.unpack(&digest, &mut source, size, &dir, &limits)
        });
        let unpacking = Self {
            prestager,
            digest: blob.digest.clone(),
            temp,
            thread,
        };
        (unpacking, to_unpacker)
    }

    /// Waits for the unpacker (the hasher has dropped its queue by now), then publishes the staged tree when the
    /// upload completed the blob (`blob_complete`: tree digest matched, blob renamed into place) and the unpack
    /// succeeded; otherwise drops it. Never fails: the upload's result does not depend on it.
    pub(super) async fn settle(self, blob_complete: bool) {
        let Self {
            prestager,
            digest,
            temp,
            thread,
        } = self;
        let unpacked = match thread.await {
            Ok(unpacked) => unpacked,
            Err(e) => {
                tracing::warn!(%digest, "the unpacker of the upload failed: {e}");
                drop_temp(temp).await;
                return;
            }
        };
        match unpacked {
            Ok(manifest) if blob_complete => match prestager.publish(&digest, temp, manifest).await
            {
                Ok(true) => tracing::info!(%digest, "package staged during its upload"),
                Ok(false) => {
                    tracing::debug!(%digest, "package staged meanwhile; the copy unpacked during the upload was dropped")
                }
                Err(e) => {
                    tracing::info!(%digest, "cannot stage the package during its upload ({e}); Stage unpacks the blob")
                }
            },
            Ok(_) => {
                tracing::debug!(%digest, "the upload did not complete the blob; the copy unpacked meanwhile was dropped");
                drop_temp(temp).await;
            }
            // The unpack removed its directory; Stage unpacks the blob and reports whatever this was.
            Err(e) => {
                tracing::debug!(%digest, "not staged during the upload ({e}); Stage unpacks the blob")
            }
        }
    }
}

/// Holds an upload's unpacker until it is settled; if the upload's future is dropped first (the client went away
/// mid-stream), the unpacker is settled as incomplete on its own task, so its directory does not stay behind.
pub(super) struct UnpackGuard(pub(super) Option<Unpacking>);

impl Drop for UnpackGuard {
    fn drop(&mut self) {
        if let Some(unpacking) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            drop(runtime.spawn(unpacking.settle(false)));
        }
    }
}

async fn drop_temp(temp: PathBuf) {
    if let Err(e) = tokio::task::spawn_blocking(move || discard(&temp)).await {
        tracing::warn!("cannot remove an unpack directory: {e}");
    }
}
