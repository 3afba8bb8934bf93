//! [`FileIdentity`]: what identifies one version of a file on disk without reading it, for the hash cache and
//! for stage's record of what it verified.

/// What identifies one version of a file without reading it: replacing the file (rename over it) changes the
/// inode, writing into it changes the mtime, and any change to the inode at all (a write, a chmod, a `touch`
/// that sets the mtime back) changes the ctime, which no user can set. The ctime also changes when a hard link is
/// added or removed (backups, staging) or the file is renamed, which costs one more hashing: on any doubt the
/// file is hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// A file time (seconds and nanoseconds, as `stat` gives them) in nanoseconds since the epoch.
pub fn nanos(secs: i64, nsec: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsec)
}

/// See [`FileIdentity::racy_window_ns`].
const RACY_WINDOW_COARSE_NS: i128 = 1_000_000_000;
/// See [`FileIdentity::racy_window_ns`].
const RACY_WINDOW_FINE_NS: i128 = 20_000_000;

impl FileIdentity {
    /// The identity an `lstat` (through a directory handle) shows.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    pub fn of_stat(stat: &rustix::fs::Stat) -> Self {
        FileIdentity {
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
            size: stat.st_size as u64,
            mode: stat.st_mode as u32,
            mtime_ns: nanos(stat.st_mtime as i64, stat.st_mtime_nsec as i64),
            ctime_ns: nanos(stat.st_ctime as i64, stat.st_ctime_nsec as i64),
        }
    }

    /// The identity `std::fs::symlink_metadata` shows.
    pub fn of_metadata(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mode: meta.mode(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The same inode, unwritten since: what a hard link of the recorded file must show (its ctime moved with
    /// the link itself, so it is not compared).
    pub fn same_content_as(&self, linked: &FileIdentity) -> bool {
        self.dev == linked.dev
            && self.ino == linked.ino
            && self.size == linked.size
            && self.mtime_ns == linked.mtime_ns
    }

    /// Changed so shortly before `hashed_at` that a further change within the same timestamp tick could leave
    /// the identity unchanged ("racily clean", as git calls it): such a hash is used once but not cached.
    pub(crate) fn is_racy(&self, hashed_at: std::time::SystemTime) -> bool {
        let Ok(since_epoch) = hashed_at.duration_since(std::time::UNIX_EPOCH) else {
            return true;
        };
        let hashed_ns = i128::try_from(since_epoch.as_nanos()).unwrap_or(i128::MAX);
        hashed_ns - self.ctime_ns.max(self.mtime_ns) < self.racy_window_ns()
    }

    /// One timestamp tick with margin. Both times on a whole second means the file system may keep only seconds
    /// (ext4 with small inodes, FAT, some NFS servers): one second, like git. Otherwise the times have sub-second
    /// resolution, stamped from the kernel's clock tick (1-10 ms), and [`RACY_WINDOW_FINE_NS`] covers several.
    fn racy_window_ns(&self) -> i128 {
        let whole_second = |ns: i128| ns % 1_000_000_000 == 0;
        if whole_second(self.mtime_ns) && whole_second(self.ctime_ns) {
            RACY_WINDOW_COARSE_NS
        } else {
            RACY_WINDOW_FINE_NS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FileIdentity;
    use std::time::{Duration, UNIX_EPOCH};

    fn identity(mtime_ns: i128, ctime_ns: i128) -> FileIdentity {
        FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mode: 0o100644,
            mtime_ns,
            ctime_ns,
        }
    }

    #[test]
    fn the_racy_window_is_a_second_for_whole_second_times_and_a_few_ticks_otherwise() {
        let second = 1_700_000_000_i128 * 1_000_000_000;
        let at = |ns: i128| UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap());
        let fine = identity(second + 1_000, second + 2_000);
        assert!(fine.is_racy(at(second + 2_000 + 10_000_000)), "10 ms later");
        assert!(
            !fine.is_racy(at(second + 2_000 + 30_000_000)),
            "30 ms later"
        );
        let coarse = identity(second, second);
        assert!(
            coarse.is_racy(at(second + 500_000_000)),
            "half a second later"
        );
        assert!(
            !coarse.is_racy(at(second + 1_000_000_000)),
            "a second later"
        );
        assert!(fine.is_racy(at(second - 1)), "a clock set back");
    }
}
