//! The space ledger: free bytes of the state filesystem that uploads in progress have already claimed, so two
//! uploads cannot both count the same free bytes.

use super::TransferError;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    pub(super) fn written(&mut self, bytes: u64) {
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
