//! The apply journal: one file per service (`<state>/journal/<service>.json`), rewritten durably (temp, fsync,
//! rename, directory fsync) at every transition of [`ApplyPhase`], the one enum that says where an apply is.
//!
//! The file also keeps the service's committed-patch history (the rollback stack, whose backups are kept) and
//! the recent results by patch id (so a repeated Apply or Rollback replays the earlier answer).

use crate::fsutil::{self, FsError};
use crate::layout::StateLayout;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where an apply (or a rollback, which is an apply whose new files are an earlier backup) stands.
///
/// ```text
/// Prepared ──► Stopping ──► Swapping{done} ──► Starting ──► Probation ──► Committed
///    │  (offline: Prepared ──► Swapping{done} ─────────────────────────► Committed)
///    │              └──────────────┴───────────────┴────────────┴──► Reverting{restored} ──► Reverted
///    └──► Failed  (nothing live changed)
/// ```
///
/// Recovery at agent start (ARCHITECTURE.md, "Apply state machine"): `Prepared` → drop temporaries, `Failed`;
/// `Stopping`, `Swapping`, `Starting`, `Probation`, `Reverting` → restore every backed-up file (idempotent),
/// start the old version, `Reverted`; `Committed`, `Reverted`, `Failed` are final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum ApplyPhase {
    /// The plan is recorded; backups and temporaries are being written. Nothing live changed.
    Prepared,
    /// The service is being stopped (online applies only).
    Stopping,
    /// `done` files of the plan have been renamed into place.
    Swapping { done: usize },
    /// Every file is new; the service is being started.
    Starting,
    /// The new version runs and is being watched.
    Probation,
    /// Final: the new files stay.
    Committed,
    /// The old files are being put back; `restored` of them are done. `reason` is why.
    Reverting { restored: usize, reason: String },
    /// Final: the old files are back.
    Reverted,
    /// Final: the apply stopped before anything live changed.
    Failed,
}

impl ApplyPhase {
    /// True for `Committed`, `Reverted` and `Failed`: nothing to recover.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ApplyPhase::Committed | ApplyPhase::Reverted | ApplyPhase::Failed
        )
    }

    /// Short name for logs and reasons.
    pub fn name(&self) -> &'static str {
        match self {
            ApplyPhase::Prepared => "prepared",
            ApplyPhase::Stopping => "stopping",
            ApplyPhase::Swapping { .. } => "swapping",
            ApplyPhase::Starting => "starting",
            ApplyPhase::Probation => "probation",
            ApplyPhase::Committed => "committed",
            ApplyPhase::Reverting { .. } => "reverting",
            ApplyPhase::Reverted => "reverted",
            ApplyPhase::Failed => "failed",
        }
    }
}

/// One file an apply changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    /// Path relative to the service's deploy_dir.
    pub rel: PathBuf,
    /// Absolute target path.
    pub target: PathBuf,
    /// Where the new content comes from (a staged file or an earlier backup); `None` removes the target.
    pub source: Option<PathBuf>,
    /// Digest of the new content ([`patchd_package::content`]: it names its algorithm); `None` when the file is
    /// removed. Kept under its JSON name from before manifest format 2, `new_sha256`: an older agent reading this
    /// journal (a downgrade) then sees a digest it cannot match and refuses, instead of a missing one it would skip.
    #[serde(rename = "new_sha256")]
    pub new_digest: Option<String>,
    /// File mode for the new content.
    pub mode: Option<u32>,
    /// Digest of the content before the apply, in the algorithm the plan compared it in; `None` when the file did
    /// not exist. JSON name `old_sha256`, as `new_digest`'s.
    #[serde(rename = "old_sha256")]
    pub old_digest: Option<String>,
    /// Where the old content is kept while the apply can still be undone (`None` when it did not exist).
    pub backup: Option<PathBuf>,
    /// The temporary next to `target` that holds the new content until it is renamed over `target`.
    pub temp: PathBuf,
}

/// What kind of operation a record is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ApplyKind {
    /// A staged package.
    Patch,
    /// Undoes these committed patches (newest last, as in the history).
    Rollback { undoes: Vec<String> },
}

/// The outcome of a finished apply or rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    Reverted,
    OfflineSwapped,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Reverted => "reverted",
            Outcome::OfflineSwapped => "offline_swapped",
            Outcome::Failed => "failed",
        }
    }
}

/// The report of a finished apply, kept for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    pub patch_id: String,
    pub kind: ApplyKind,
    pub digest: String,
    pub version: String,
    pub outcome: Outcome,
    pub reason: String,
    pub log_tail: Vec<String>,
    pub downtime_ms: u64,
    pub binary_sha256: String,
    pub steps: Vec<(String, u64)>,
    pub finished_unix: i64,
    /// Who asked for it: the client certificate's CN, operator and serial (empty in journals written before
    /// callers were recorded).
    #[serde(default)]
    pub caller: String,
}

/// An apply in progress or the last one, with everything recovery needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRecord {
    pub patch_id: String,
    pub kind: ApplyKind,
    /// Staged package digest (empty for rollbacks).
    pub digest: String,
    /// Version label after this apply commits.
    pub version: String,
    pub offline: bool,
    /// Whether the service was running when the apply began (recovery restores that).
    pub was_running: bool,
    pub files: Vec<FileChange>,
    /// Directories this apply created in the deploy dir (removed again on revert when empty), parents first.
    pub created_dirs: Vec<PathBuf>,
    /// The backup set of this apply: `<state>/backups/<patch-id>`.
    pub backup_dir: PathBuf,
    pub phase: ApplyPhase,
    pub started_unix: i64,
    /// Backend `docker`: the container swap this apply makes instead of swapping files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSwap>,
    /// Who asked for it: the client certificate's CN, operator and serial (empty in journals written before
    /// callers were recorded).
    #[serde(default)]
    pub caller: String,
}

/// One container swap (backend `docker`), journaled with its apply: which container ran before, what the new one
/// runs and the names each has along the way, so recovery can put the old container back under its name or
/// finish the committed one.
///
/// Along the phases: `Prepared` the image is loaded and the new container created as `new_name` (`new_id` set
/// once created); `Stopping` the old one is stopped; `Swapping{done: 1}` the old one is renamed to `aside_name`,
/// `Swapping{done: 2}` the new one to `container`; `Starting`, `Probation`; `Committed` the old container is
/// removed (its image kept for rollback). A revert removes the new container, renames the old one back and
/// starts it: the same container ID runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSwap {
    /// The declared container name.
    pub container: String,
    /// The container that ran before the apply.
    pub old_id: String,
    /// Its image (an ID), kept for rollback once the apply commits.
    pub old_image: String,
    /// The image the new container runs (an ID).
    pub new_image: String,
    /// The staged `docker save` archive to load (`None` for a rollback: the earlier image was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<PathBuf>,
    /// The new container, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_id: Option<String>,
    /// The new container's name until it takes `container`.
    pub new_name: String,
    /// The old container's name while the new one runs under `container`.
    pub aside_name: String,
    /// `K=V` the apply request added on top of the spec's `env_add` (set last, so they win).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_add: Vec<String>,
}

/// A committed patch whose backup is kept, so it can be rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub patch_id: String,
    pub digest: String,
    pub version: String,
    pub outcome: Outcome,
    pub finished_unix: i64,
    pub backup_dir: PathBuf,
    /// False once the backup was pruned (beyond `keep_backups`): the patch can no longer be rolled back.
    #[serde(default = "yes")]
    pub backup_kept: bool,
    /// The files the patch changed, with where their previous content is kept (emptied when pruned).
    pub files: Vec<FileChange>,
    /// Directories the patch created in the deploy dir, parents first: rolling it back removes them when they are
    /// empty again (emptied when pruned). Absent from journals written before it existed.
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
    /// Backend `docker`: the image (an ID) the container ran before this patch, kept for rollback until pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_image: Option<String>,
    /// Who asked for it: the client certificate's CN, operator and serial (empty in journals written before
    /// callers were recorded).
    #[serde(default)]
    pub caller: String,
}

fn yes() -> bool {
    true
}

/// How many history entries are kept (pruned ones only keep the version label for display).
pub const MAX_HISTORY: usize = 64;

/// Everything persisted for one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceJournal {
    /// The apply in flight, or the last one (final phase).
    pub current: Option<ApplyRecord>,
    /// Committed patches, oldest first; the last is what runs. Only entries with a kept backup.
    pub history: Vec<HistoryEntry>,
    /// Recent results by patch id, oldest first (bounded).
    pub results: Vec<ApplyResult>,
}

/// How many results are kept for replay (the journal is rewritten at every transition: keep it small).
pub const MAX_RESULTS: usize = 64;

/// The journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "journal {0} is not valid: {source}; to start this service's history afresh, move it aside (`mv {0} {0}.bad`) \
         and restart patchd: the deployed files are left as they are and the service's backup sets are kept (moved \
         to {1} and listed by Status and `patchctl display`); if the journal described an interrupted apply, the \
         previous files are in its backup set there",
        path.display(),
        quarantine_dir_of(path).display()
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "journal {0} cannot be read: {source}; make it a readable journal file again, or move it aside \
         (`mv {0} {0}.bad`) to start this service's history afresh, then restart patchd (moved aside: the deployed \
         files are left as they are and the service's backup sets are kept, moved to {1} and listed by Status and \
         `patchctl display`)",
        path.display(),
        quarantine_dir_of(path).display()
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encode journal: {0}")]
    Encode(#[source] serde_json::Error),
}

/// `<state>/quarantine/<service>` for the journal `<state>/journal/<service>.json`: where backup sets that no
/// journal refers to are moved at start instead of being deleted.
pub fn quarantine_dir_of(journal: &Path) -> PathBuf {
    let service = journal
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let state = journal.parent().and_then(Path::parent).unwrap_or(journal);
    quarantine_dir(state, &service)
}

/// `<state>/quarantine/<service>`.
pub fn quarantine_dir(state_dir: &Path, service: &str) -> PathBuf {
    StateLayout::new(state_dir).quarantine_of(service)
}

impl ServiceJournal {
    /// `<state>/journal/<service>.json`.
    pub fn path(state_dir: &Path, service: &str) -> PathBuf {
        StateLayout::new(state_dir).journal_of(service)
    }

    /// Loads the journal; an absent file is an empty journal.
    pub fn load(path: &Path) -> Result<Self, JournalError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt {
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(JournalError::Unreadable {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes the journal durably (temp, fsync, rename, directory fsync). A full disk releases the space reserve
    /// ([`crate::reserve`]) and the write is tried once more.
    pub fn store(&self, path: &Path) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(self).map_err(JournalError::Encode)?;
        match fsutil::write_atomic(path, &bytes) {
            Err(full) if full.source.kind() == std::io::ErrorKind::StorageFull => {
                let dir = fsutil::parent_of(path)?;
                // The partial temporary holds space the retry needs.
                let _ = fsutil::remove_if_exists(&fsutil::sibling_temp(path, "tmp"));
                if !crate::reserve::release(dir) {
                    return Err(full.into());
                }
                tracing::error!(
                    "the state dir is full: released the journal's space reserve ({} MiB) to write {}; free space \
                     there (the reserve is taken again at the next start or apply)",
                    crate::reserve::RESERVE_BYTES >> 20,
                    path.display()
                );
                let retried = fsutil::write_atomic(path, &bytes);
                if retried.is_err() {
                    let _ = fsutil::remove_if_exists(&fsutil::sibling_temp(path, "tmp"));
                }
                Ok(retried?)
            }
            other => Ok(other?),
        }
    }

    /// The earlier result of `patch_id`, if any.
    pub fn result_of(&self, patch_id: &str) -> Option<&ApplyResult> {
        self.results.iter().rev().find(|r| r.patch_id == patch_id)
    }

    /// Adds a result, keeping at most [`MAX_RESULTS`].
    pub fn push_result(&mut self, result: ApplyResult) {
        self.results.retain(|r| r.patch_id != result.patch_id);
        self.results.push(result);
        let excess = self.results.len().saturating_sub(MAX_RESULTS);
        self.results.drain(..excess);
    }

    /// Version label of what runs: the newest committed patch, "" when never patched.
    pub fn running_version(&self) -> String {
        self.history
            .last()
            .map(|h| h.version.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_json() {
        for phase in [
            ApplyPhase::Prepared,
            ApplyPhase::Stopping,
            ApplyPhase::Swapping { done: 3 },
            ApplyPhase::Starting,
            ApplyPhase::Probation,
            ApplyPhase::Committed,
            ApplyPhase::Reverting {
                restored: 1,
                reason: "exit 3".into(),
            },
            ApplyPhase::Reverted,
            ApplyPhase::Failed,
        ] {
            let text = serde_json::to_string(&phase).unwrap();
            assert_eq!(serde_json::from_str::<ApplyPhase>(&text).unwrap(), phase);
        }
        assert_eq!(
            serde_json::to_string(&ApplyPhase::Swapping { done: 2 }).unwrap(),
            r#"{"phase":"swapping","done":2}"#
        );
    }

    #[test]
    fn file_digests_keep_their_json_names_from_before_manifest_format_2() {
        // A change journaled by an agent before format 2: bare sha256 digests under `new_sha256`/`old_sha256`.
        let old = r#"{"rel":"bin/x","target":"/d/bin/x","source":"/s/x","new_sha256":"aa","mode":493,
            "old_sha256":"bb","backup":"/b/x","temp":"/d/bin/.x.new"}"#;
        let change: FileChange = serde_json::from_str(old).unwrap();
        assert_eq!(change.new_digest.as_deref(), Some("aa"));
        assert_eq!(change.old_digest.as_deref(), Some("bb"));
        // Today's BLAKE3 digests go under the same names, so an older agent reading them finds a digest it
        // cannot match (and refuses) rather than none (and skips the check).
        let now = FileChange {
            new_digest: Some("blake3:cc".into()),
            old_digest: Some("blake3:dd".into()),
            ..change
        };
        let json: serde_json::Value = serde_json::to_value(&now).unwrap();
        assert_eq!(json["new_sha256"], "blake3:cc");
        assert_eq!(json["old_sha256"], "blake3:dd");
    }

    #[test]
    fn history_written_before_created_dirs_existed_still_reads() {
        let old = r#"{"patch_id":"p1","digest":"d","version":"v2","outcome":"committed","finished_unix":1,
            "backup_dir":"/s/backups/svc/p1","backup_kept":true,"files":[]}"#;
        let entry: HistoryEntry = serde_json::from_str(old).unwrap();
        assert!(entry.created_dirs.is_empty());
        assert_eq!(entry.patch_id, "p1");
    }

    #[test]
    fn absent_journal_is_empty_and_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = ServiceJournal::path(dir.path(), "svc");
        assert_eq!(
            ServiceJournal::load(&path).unwrap(),
            ServiceJournal::default()
        );
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{not json").unwrap();
        let err = ServiceJournal::load(&path).unwrap_err().to_string();
        assert!(err.contains("move it aside"), "{err}");
    }

    #[test]
    fn results_are_bounded_and_latest_wins() {
        let mut journal = ServiceJournal::default();
        for i in 0..(MAX_RESULTS + 10) {
            journal.push_result(ApplyResult {
                patch_id: format!("p{i}"),
                kind: ApplyKind::Patch,
                digest: String::new(),
                version: String::new(),
                outcome: Outcome::Committed,
                reason: String::new(),
                log_tail: vec![],
                downtime_ms: 0,
                binary_sha256: String::new(),
                steps: vec![],
                finished_unix: 0,
                caller: String::new(),
            });
        }
        assert_eq!(journal.results.len(), MAX_RESULTS);
        assert!(journal.result_of("p0").is_none());
        assert!(
            journal
                .result_of(&format!("p{}", MAX_RESULTS + 9))
                .is_some()
        );
    }
}
