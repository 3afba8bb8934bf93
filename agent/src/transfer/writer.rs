//! The writer thread of an upload: `pwrite`s verified chunks into the part file, with direct I/O where the
//! filesystem allows it, and passes each batch of records on to the recorder once its data is written.

use super::ledger::Reservation;
use super::{QUEUE_BYTES, TransferError, io_err};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;

/// What the hasher sends the writer, in stream order.
pub(super) enum ToWriter {
    /// A verified chunk to write at its offset.
    Data { offset: u64, data: Bytes },
    /// The hashes of the chunks sent before: pass them to the recorder once written.
    Batch(Vec<[u8; 32]>),
}

/// Chunks held in one queue: about [`QUEUE_BYTES`], at least one.
pub(super) fn queue_depth(chunk_size: u32) -> usize {
    (QUEUE_BYTES / (chunk_size.max(1) as usize)).max(1)
}

/// Alignment of direct-I/O offsets, lengths and buffers: the largest logical block size in common use (the upload
/// path allocates chunk buffers with it, so they go to the disk as they are).
pub(crate) const DIRECT_IO_ALIGN: usize = 4096;
/// Largest direct write: a chunk is copied into one aligned buffer of this size piece by piece, so the buffer
/// stays small whatever the chunk size.
pub(super) const DIRECT_IO_PIECE: usize = 1024 * 1024;

/// Opens the part file for direct I/O (`O_DIRECT`), or `None` where the filesystem does not support it.
pub(super) fn open_direct(path: &Path) -> Option<File> {
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
pub(super) struct Writer {
    pub(super) part: File,
    pub(super) direct: Option<File>,
    pub(super) part_path: PathBuf,
    /// Reused buffer holding one aligned, padded piece of a chunk for direct I/O.
    pub(super) aligned: Vec<u8>,
    /// Given back chunk by chunk once written: from then on the file system's free figure counts the bytes.
    pub(super) reservation: Option<Reservation>,
}

impl Writer {
    /// Writes until the hasher is done; returns what is left of the reservation.
    pub(super) fn run(
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

    pub(super) fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
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
