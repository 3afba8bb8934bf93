//! A partial upload: the part file and its append-only chunk records (`<digest>.part`, `<digest>.chunks`), resumed
//! from the records after a crash, and the hashing side of the threads that receive chunks into it (the hasher also
//! hands each verified chunk to the unpacker, when one stages the package as it arrives).

use super::ledger::Reservation;
use super::recorder::Recorder;
use super::writer::{ToWriter, Writer, open_direct, queue_depth};
use super::{BlobRef, Chunk, FLUSH_BYTES, FLUSH_IDLE, TransferError, UploadOutcome, io_err};
use bytes::Bytes;
use patchd_package::digest::{TreeHasher, TreeVersion};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use tokio::sync::mpsc;

/// The record file's first bytes, per tree version: a part file resumes only in the version it was started in.
fn records_magic(version: TreeVersion) -> &'static [u8; 16] {
    match version {
        // What agents wrote before tree versions, so their partial uploads of version-1 blobs still resume.
        TreeVersion::V1 => b"patchd-chunks-v1",
        TreeVersion::V2 => b"patchd-chunks-v2",
    }
}
pub(super) const RECORDS_HEADER_LEN: u64 = 16 + 4 + 8;
pub(super) const RECORD_LEN: u64 = 32;

/// Where one upload's files live: the part and record files, and the complete blob the part file becomes.
pub(super) struct PartialPaths {
    pub(super) part: PathBuf,
    pub(super) records: PathBuf,
    pub(super) complete: PathBuf,
    /// The directory of complete blobs, synced after the rename that publishes one.
    pub(super) blobs_dir: PathBuf,
}

fn records_header(blob: &BlobRef) -> [u8; RECORDS_HEADER_LEN as usize] {
    let mut header = [0u8; RECORDS_HEADER_LEN as usize];
    header[..16].copy_from_slice(records_magic(blob.version));
    header[16..20].copy_from_slice(&blob.chunk_size.to_be_bytes());
    header[20..].copy_from_slice(&blob.total_size.to_be_bytes());
    header
}

pub(super) fn header_matches(mut file: &File, blob: &BlobRef) -> bool {
    let mut found = [0u8; RECORDS_HEADER_LEN as usize];
    file.read_exact(&mut found).is_ok() && found == records_header(blob)
}

/// An upload in progress: the part file, the record file and the tree built from the records so far.
pub(super) struct PartialBlob {
    blob: BlobRef,
    final_path: PathBuf,
    dir: PathBuf,
    part_path: PathBuf,
    records_path: PathBuf,
    part: File,
    records: File,
    tree: TreeHasher,
    pub(super) held: u64,
    pending: Vec<[u8; 32]>,
    pending_bytes: u64,
    /// The bytes this upload may still write; handed to the writer, which gives them back as it writes.
    reservation: Option<Reservation>,
}

impl PartialBlob {
    pub(super) fn open(
        paths: PartialPaths,
        blob: &BlobRef,
        reservation: Reservation,
    ) -> Result<Self, TransferError> {
        let PartialPaths {
            part: part_path,
            records: records_path,
            complete: final_path,
            blobs_dir: dir,
        } = paths;
        let mut tree = TreeHasher::versioned(blob.version, blob.chunk_size, blob.total_size);
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
            final_path,
            dir,
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
    /// latency stalls hashing). Each verified chunk also goes to `to_unpacker`, if set, until the unpacker stops
    /// taking them; it is dropped on return, which tells the unpacker the stream ended.
    pub(super) fn receive(
        &mut self,
        rx: mpsc::Receiver<Chunk>,
        runtime: &tokio::runtime::Handle,
        mut to_unpacker: Option<SyncSender<Bytes>>,
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
            let (outcome, received) =
                self.receive_chunks(rx, runtime, &to_writer, &mut to_unpacker);
            drop(to_unpacker);
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
        to_unpacker: &mut Option<SyncSender<Bytes>>,
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
                    let hash = self.blob.version.chunk_hash(&chunk.data);
                    if let Err(e) = self.accept(chunk, hash, to_writer, to_unpacker) {
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

    /// Accepts the next chunk of the stream, given the hash of its data.
    fn accept(
        &mut self,
        chunk: Chunk,
        hash: [u8; 32],
        to_writer: &SyncSender<ToWriter>,
        to_unpacker: &mut Option<SyncSender<Bytes>>,
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
        if hash != chunk.hash {
            return Err(TransferError::ChunkCorrupt {
                index: chunk.index,
                offset,
            });
        }
        // A clone shares the buffer. An unpacker that stopped (it refused the package) is fed no more; the upload
        // goes on regardless.
        if let Some(unpacker) = to_unpacker
            && unpacker.send(chunk.data.clone()).is_err()
        {
            *to_unpacker = None;
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
    pub(super) fn finish(self) -> Result<(), TransferError> {
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
