//! A file written once and not read back soon (a staged package file): its data goes to the disk with direct I/O
//! (`O_DIRECT`) where the file system allows it, so it is never copied into the page cache.
//!
//! Why: on a fleet agent, staging writes every byte of a package once; through the page cache that copy (and the
//! writeback that follows) cost more CPU than inflating and hashing the same bytes. Data is gathered into one
//! aligned buffer and written in whole blocks; the last partial block goes through an ordinary descriptor, and
//! `sync_all` on that descriptor makes both durable. Small files (under one buffer) never use direct I/O. A caller
//! that hands over whole buffers from aligned memory ([`WRITE_BUFFER_BYTES`] or more at a time, as the package walk
//! does) has them written from there, without the copy into the gathering buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of direct-I/O offsets, lengths and buffers: the largest logical block size in common use.
pub const DIRECT_IO_ALIGN: usize = 4096;
/// Bytes gathered before one direct write; a caller's aligned piece of at least this size is written without a copy.
pub const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// Writes one file sequentially; see the module docs.
pub struct DirectWriter {
    file: File,
    /// Opened on the first full buffer; `None` before, or for good where the file system refuses direct I/O.
    direct: Option<File>,
    direct_refused: bool,
    storage: Vec<u8>,
    /// Start of the aligned region inside `storage`.
    start: usize,
    /// Bytes gathered in the aligned region.
    filled: usize,
    /// Bytes already written to the file.
    written: u64,
    /// Bytes that went through `storage` (the rest went to the disk from the caller's memory).
    copied: u64,
}

impl DirectWriter {
    /// Takes over `file`, freshly created (empty) and opened for writing at `path`.
    pub fn new(file: File) -> Self {
        Self {
            file,
            direct: None,
            direct_refused: false,
            storage: Vec::new(),
            start: 0,
            filled: 0,
            written: 0,
            copied: 0,
        }
    }

    /// Bytes copied into the gathering buffer so far (the rest were written from the caller's memory).
    pub fn bytes_copied(&self) -> u64 {
        self.copied
    }

    /// Appends `data`.
    pub fn write_all(&mut self, path: &Path, mut data: &[u8]) -> io::Result<()> {
        if self.direct_refused {
            return self.write_buffered(data);
        }
        while !data.is_empty() {
            // Nothing gathered and a whole buffer's worth in aligned memory: its whole blocks go to the disk from
            // the caller's memory. A file system that refuses direct I/O gets everything buffered from here on.
            if self.filled == 0
                && data.len() >= WRITE_BUFFER_BYTES
                && data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0
            {
                let whole = data.len() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
                if !self.write_direct(path, &data[..whole])? {
                    return self.write_buffered(data);
                }
                data = &data[whole..];
                continue;
            }
            if self.storage.is_empty() {
                self.storage = vec![0; WRITE_BUFFER_BYTES + DIRECT_IO_ALIGN];
                self.start = self.storage.as_ptr().align_offset(DIRECT_IO_ALIGN);
            }
            let room = WRITE_BUFFER_BYTES - self.filled;
            let taken = room.min(data.len());
            let at = self.start + self.filled;
            self.storage[at..at + taken].copy_from_slice(&data[..taken]);
            self.filled += taken;
            self.copied += taken as u64;
            data = &data[taken..];
            if self.filled == WRITE_BUFFER_BYTES {
                self.flush_blocks(path)?;
                if self.direct_refused {
                    return self.write_buffered(data);
                }
            }
        }
        Ok(())
    }

    /// Writes what is gathered; returns the file, for the caller to set its mode and `sync_all` it (which makes
    /// the direct writes durable too).
    pub fn finish(mut self, path: &Path) -> io::Result<File> {
        if self.filled >= DIRECT_IO_ALIGN && self.written > 0 && !self.direct_refused {
            self.flush_blocks(path)?;
        }
        if self.filled > 0 {
            let rest = self.storage[self.start..self.start + self.filled].to_vec();
            self.filled = 0;
            self.write_buffered(&rest)?;
        }
        Ok(self.file)
    }

    /// Writes the whole blocks gathered with direct I/O (keeping a partial block for later), or everything
    /// buffered once the file system refused direct I/O.
    fn flush_blocks(&mut self, path: &Path) -> io::Result<()> {
        let whole = self.filled / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN;
        if whole == 0 {
            return Ok(());
        }
        let storage = std::mem::take(&mut self.storage);
        let written = self.write_direct(path, &storage[self.start..self.start + whole]);
        self.storage = storage;
        if !written? {
            let all = self.storage[self.start..self.start + self.filled].to_vec();
            self.filled = 0;
            return self.write_buffered(&all);
        }
        let left = self.filled - whole;
        let from = self.start + whole;
        self.storage.copy_within(from..from + left, self.start);
        self.filled = left;
        Ok(())
    }

    /// Writes `block` (whole blocks, aligned in memory) at the end of the file with direct I/O. `false` when the
    /// file system refuses direct I/O: nothing counts as written, and every later write goes buffered.
    fn write_direct(&mut self, path: &Path, block: &[u8]) -> io::Result<bool> {
        if self.direct.is_none() {
            self.direct = open_direct(path);
        }
        let Some(direct) = &self.direct else {
            self.direct_refused = true;
            return Ok(false);
        };
        match direct.write_all_at(block, self.written) {
            Ok(()) => {
                self.written += block.len() as u64;
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                self.direct = None;
                self.direct_refused = true;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn write_buffered(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, self.written)?;
        self.written += data.len() as u64;
        Ok(())
    }
}

/// The same file opened for direct I/O, or `None` where the file system does not support it (tmpfs).
fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        // Never through a symlink planted in its place since it was created.
        .custom_flags((nix::fcntl::OFlag::O_DIRECT | nix::fcntl::OFlag::O_NOFOLLOW).bits())
        .open(path)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `pieces` in order to a new file `name` in `dir`, checks that the file holds exactly their bytes, and
    /// returns the bytes the writer copied into its gathering buffer.
    fn write_through(dir: &Path, name: &str, pieces: &[&[u8]]) -> u64 {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut writer = DirectWriter::new(file);
        for piece in pieces {
            writer.write_all(&path, piece).unwrap();
        }
        let copied = writer.bytes_copied();
        writer.finish(&path).unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), pieces.concat(), "{name}");
        copied
    }

    fn roundtrip(dir: &Path, lengths: &[usize]) {
        let pieces: Vec<Vec<u8>> = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|b| (b * 31 + i * 7) as u8).collect())
            .collect();
        let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let total: usize = lengths.iter().sum();
        write_through(dir, &format!("f-{}-{total}", lengths.len()), &pieces);
    }

    #[test]
    fn every_size_reads_back_exactly() {
        // On the project's disk (direct I/O) and wherever the temp dir is (maybe tmpfs: buffered).
        let here = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for dir in [here.path(), tmp.path()] {
            roundtrip(dir, &[]);
            roundtrip(dir, &[1]);
            roundtrip(dir, &[4096]);
            roundtrip(dir, &[WRITE_BUFFER_BYTES]);
            roundtrip(dir, &[WRITE_BUFFER_BYTES + 1]);
            roundtrip(dir, &[100_000; 30]);
            roundtrip(dir, &[262_144, 7, 262_144, 262_144, 262_144, 262_144, 4095]);
            roundtrip(dir, &[3 * WRITE_BUFFER_BYTES + 12_345]);
        }
    }

    /// Whole aligned buffers (as the package walk hands them over) go to the disk without a copy; the pieces
    /// around them are gathered; the file is exact either way.
    #[test]
    fn aligned_whole_buffers_are_written_without_a_copy() {
        let here = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut memory = vec![0u8; 2 * WRITE_BUFFER_BYTES + DIRECT_IO_ALIGN];
        let start = memory.as_ptr().align_offset(DIRECT_IO_ALIGN);
        let aligned = &mut memory[start..start + 2 * WRITE_BUFFER_BYTES];
        for (i, byte) in aligned.iter_mut().enumerate() {
            *byte = (i * 13 % 251) as u8;
        }
        let aligned = &aligned[..];
        for dir in [here.path(), tmp.path()] {
            // Aligned whole buffers, a short tail, then an aligned buffer after the tail (gathered: something is
            // pending, so its blocks would not line up with the file's).
            let copied = write_through(
                dir,
                "aligned",
                &[
                    &aligned[..WRITE_BUFFER_BYTES],
                    &aligned[..2 * WRITE_BUFFER_BYTES],
                    &aligned[..100],
                    &aligned[..WRITE_BUFFER_BYTES],
                ],
            );
            if open_direct(&dir.join("aligned")).is_some() {
                assert_eq!(
                    copied,
                    100 + WRITE_BUFFER_BYTES as u64,
                    "only the tail and the buffer after it were copied"
                );
            }
        }
    }
}
