//! The recorder thread of an upload: makes written chunks durable (data first, then their records).

use super::{TransferError, io_err};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

/// Makes verified chunks durable: syncs the part file, then appends the batch's records (see the module doc).
pub(super) struct Recorder {
    pub(super) part: File,
    pub(super) records: File,
    pub(super) part_path: PathBuf,
    pub(super) records_path: PathBuf,
}

impl Recorder {
    pub(super) fn run(
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
