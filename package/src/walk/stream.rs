//! The byte layers under the tar reader: the raw package bytes (a file, or any reader such as an upload's verified
//! chunks; hashed as they are read when asked), the gzip decoder with the metadata budget, and telling which layer
//! an I/O error came from.

use crate::PackageError;
use crate::digest::StreamingTreeDigest;
use ring::digest::Context;
use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::path::Path;
use std::rc::Rc;

/// Largest tar extension data (GNU long name/link, pax records) read for one entry. tar-rs keeps these in
/// memory, so without this cap a long-name entry of a few GiB of zeros would be a memory bomb.
pub(crate) const MAX_METADATA_BYTES: u64 = 1024 * 1024;
/// Zero padding accepted after the end-of-archive marker (tar pads to its record size, 10 KiB by default;
/// large blocking factors reach a few MiB).
const MAX_TRAILER_BYTES: u64 = 16 * 1024 * 1024;

/// What the readers below observed, so an `io::Error` coming out of tar can be told apart by its layer.
#[derive(Default)]
pub(super) struct StreamState {
    pub(super) source_failed: Cell<bool>,
    pub(super) decoder_failed: Cell<bool>,
    /// Bytes tar may still pull out of the decompressor before the next entry starts (`None`: no cap, tar is
    /// reading content whose size was already checked against the limits).
    pub(super) metadata_budget: Cell<Option<u64>>,
    pub(super) budget_exceeded: Cell<bool>,
}

/// The two digests of the raw `.tar.gz` file that `inspect` reports.
pub(super) struct RawHashes {
    pub(super) sha256: Context,
    pub(super) tree: StreamingTreeDigest,
}

/// The raw `.tar.gz` bytes: counts every byte the decoder consumes, and hashes it when asked to. A buffered reader
/// itself, over the caller's: the decoder reads the caller's buffer in place (for the agent, the verified chunks
/// themselves), with no copy into a buffer of its own.
pub(super) struct Source<'r> {
    pub(super) raw: &'r mut dyn BufRead,
    /// `None` when the caller already trusts the file's identity (a blob the agent verified as it arrived).
    pub(super) hashes: Option<RawHashes>,
    pub(super) read: u64,
    pub(super) state: Rc<StreamState>,
}

impl BufRead for Source<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self.raw.fill_buf() {
            Ok(buf) => Ok(buf),
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.state.source_failed.set(true);
                }
                Err(e)
            }
        }
    }

    fn consume(&mut self, amount: usize) {
        if amount == 0 {
            return;
        }
        // The bytes consumed are still in the caller's buffer: `fill_buf` hands them again without reading.
        if let Some(hashes) = &mut self.hashes {
            match self.raw.fill_buf() {
                Ok(buf) => {
                    let consumed = &buf[..amount.min(buf.len())];
                    hashes.sha256.update(consumed);
                    hashes.tree.update(consumed);
                }
                // Not hashed: the digests will not add up to the length, and the walk refuses the package.
                Err(_) => self.state.source_failed.set(true),
            }
        }
        self.raw.consume(amount);
        self.read += amount as u64;
    }
}

impl Read for Source<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The decompressed tar stream: records decoder failures and enforces the metadata budget.
pub(super) struct Decompressed<R> {
    pub(super) inner: R,
    pub(super) state: Rc<StreamState>,
}

impl<R: Read> Read for Decompressed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let budget = self.state.metadata_budget.get();
        let want = match budget {
            Some(0) if !buf.is_empty() => {
                self.state.budget_exceeded.set(true);
                return Err(io::Error::other("tar extension header over the size limit"));
            }
            Some(left) => buf.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        match self.inner.read(&mut buf[..want]) {
            Ok(n) => {
                if let Some(left) = budget {
                    self.state.metadata_budget.set(Some(left - n as u64));
                }
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.state.decoder_failed.set(true);
                }
                Err(e)
            }
        }
    }
}

pub(super) type Decoder<'r> = flate2::bufread::MultiGzDecoder<Source<'r>>;

/// Reads what follows the end-of-archive marker to the end of the gzip stream: zeros only, bounded. Reaching
/// the end also makes the decoder check the gzip CRC and length, which catches corruption near the end.
pub(super) fn drain_trailer(
    rest: &mut Decompressed<Decoder<'_>>,
    path: &Path,
    state: &StreamState,
) -> Result<(), PackageError> {
    state.metadata_budget.set(None);
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = 0u64;
    loop {
        let n = rest
            .read(&mut buf)
            .map_err(|e| classify(e, state, path, None))?;
        if n == 0 {
            return Ok(());
        }
        seen += n as u64;
        if seen > MAX_TRAILER_BYTES || buf[..n].iter().any(|&b| b != 0) {
            return Err(PackageError::TrailingData {
                path: path.to_owned(),
            });
        }
    }
}

/// Names the layer an I/O error came from: the file, gzip, the metadata cap, or tar itself.
pub(super) fn classify(
    err: io::Error,
    state: &StreamState,
    path: &Path,
    after: Option<&str>,
) -> PackageError {
    let after = after.map(str::to_owned);
    if state.source_failed.get() {
        PackageError::io("cannot read package", path, err)
    } else if state.budget_exceeded.get() {
        PackageError::MetadataTooLarge {
            path: path.to_owned(),
            after,
            limit: MAX_METADATA_BYTES,
        }
    } else if state.decoder_failed.get() {
        let detail = error_detail(&err);
        PackageError::CorruptGzip {
            path: path.to_owned(),
            detail,
        }
    } else {
        let detail = error_detail(&err);
        PackageError::CorruptTar {
            path: path.to_owned(),
            after,
            detail,
        }
    }
}

/// An error's text, saying "truncated" when the stream ended early (the common case of a cut download).
fn error_detail(err: &io::Error) -> String {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        format!("truncated: {err}")
    } else {
        err.to_string()
    }
}
