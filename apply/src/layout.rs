//! The state directory's layout, named once: which subdirectory holds blobs, partial uploads, staged packages,
//! journals, backup sets, quarantined backups, process logs and pid files. The agent and the engine both build
//! their paths from [`StateLayout`], so a directory cannot be spelled two ways.

use std::path::{Path, PathBuf};

/// The paths below one state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    /// Complete, verified blobs: `<state>/blobs/<digest>`.
    pub const BLOBS: &'static str = "blobs";
    /// Uploads in progress, below [`Self::BLOBS`]: `<state>/blobs/partial/<digest>.{part,chunks}`.
    pub const PARTIAL: &'static str = "partial";
    /// Unpacked packages: `<state>/staging/<digest>/{files,manifest.json}`.
    pub const STAGING: &'static str = "staging";
    /// One journal per service (`<service>.json`), the hash cache and the space reserve.
    pub const JOURNAL: &'static str = "journal";
    /// Backup sets: `<state>/backups/<service>/<patch id>`.
    pub const BACKUPS: &'static str = "backups";
    /// Backup sets no journal refers to, kept rather than deleted: `<state>/quarantine/<service>/`.
    pub const QUARANTINE: &'static str = "quarantine";
    /// Output of agent-supervised processes.
    pub const LOGS: &'static str = "logs";
    /// Pid files of agent-supervised processes.
    pub const RUN: &'static str = "run";
    /// Rollout leases, one per leased service: `<state>/leases/<service>.json`.
    pub const LEASES: &'static str = "leases";

    /// The layout below `root` (the configured `state_dir`).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<state>/blobs`.
    pub fn blobs(&self) -> PathBuf {
        self.root.join(Self::BLOBS)
    }

    /// `<state>/blobs/<digest>`, whether or not it is there.
    pub fn blob(&self, digest: &str) -> PathBuf {
        self.blobs().join(digest)
    }

    /// `<state>/blobs/partial`.
    pub fn partial_uploads(&self) -> PathBuf {
        Self::partial_uploads_in(&self.blobs())
    }

    /// The partial uploads of the blob cache in `blobs_dir`.
    pub fn partial_uploads_in(blobs_dir: &Path) -> PathBuf {
        blobs_dir.join(Self::PARTIAL)
    }

    /// `<state>/staging`.
    pub fn staging(&self) -> PathBuf {
        self.root.join(Self::STAGING)
    }

    /// `<state>/staging/<digest>`.
    pub fn staged(&self, digest: &str) -> PathBuf {
        self.staging().join(digest)
    }

    /// `<state>/journal`.
    pub fn journal(&self) -> PathBuf {
        self.root.join(Self::JOURNAL)
    }

    /// `<state>/journal/<service>.json`.
    pub fn journal_of(&self, service: &str) -> PathBuf {
        self.journal().join(format!("{service}.json"))
    }

    /// `<state>/backups/<service>`: backup sets are per service, since one rollout may patch several services of
    /// a host.
    pub fn backups_of(&self, service: &str) -> PathBuf {
        self.root.join(Self::BACKUPS).join(service)
    }

    /// `<state>/leases/<service>.json`: the lease a rollout holds on the service, when one does.
    pub fn lease_of(&self, service: &str) -> PathBuf {
        self.root.join(Self::LEASES).join(format!("{service}.json"))
    }

    /// `<state>/quarantine/<service>`.
    pub fn quarantine_of(&self, service: &str) -> PathBuf {
        self.root.join(Self::QUARANTINE).join(service)
    }
}

/// Whether `text` is a tree digest: 64 lower-case hex digits (also safe as a file name in the blob cache and
/// staging).
pub fn is_digest(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_sit_where_the_agent_and_older_agents_put_them() {
        let layout = StateLayout::new(Path::new("/var/lib/patchd"));
        let digest = "ab".repeat(32);
        assert_eq!(
            layout.blob(&digest),
            Path::new("/var/lib/patchd/blobs").join(&digest)
        );
        assert_eq!(
            layout.partial_uploads(),
            Path::new("/var/lib/patchd/blobs/partial")
        );
        assert_eq!(
            layout.staged(&digest),
            Path::new("/var/lib/patchd/staging").join(&digest)
        );
        assert_eq!(
            layout.journal_of("db"),
            Path::new("/var/lib/patchd/journal/db.json")
        );
        assert_eq!(
            layout.backups_of("db"),
            Path::new("/var/lib/patchd/backups/db")
        );
        assert_eq!(
            layout.lease_of("db"),
            Path::new("/var/lib/patchd/leases/db.json")
        );
        assert_eq!(
            layout.quarantine_of("db"),
            Path::new("/var/lib/patchd/quarantine/db")
        );
    }

    #[test]
    fn a_digest_is_64_lower_case_hex_digits() {
        assert!(is_digest(&"0f".repeat(32)));
        assert!(!is_digest(&"0F".repeat(32)));
        assert!(!is_digest(&"0f".repeat(31)));
        assert!(!is_digest(&format!("{}/x", "0".repeat(62))));
    }
}
