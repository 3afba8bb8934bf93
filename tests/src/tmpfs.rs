//! A tmpfs of a given size for one test (root only): a small or full disk under an agent's state dir.

use std::io::Write;
use std::path::PathBuf;

/// A tmpfs mounted on a temporary directory of its own for one test, lazily unmounted when dropped (a service may
/// still hold its log open), before that directory is removed.
pub struct Tmpfs {
    /// Where it is mounted.
    pub path: PathBuf,
    _mount_point: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`8m`, `512m`); panics unless it can (the tests run as root).
    pub fn mount(size: &str) -> Self {
        let mount_point = tempfile::tempdir().unwrap();
        let path = mount_point.path();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot mount a tmpfs at {} (this test runs as root): {e}",
                path.display()
            )
        });
        Self {
            path: path.to_path_buf(),
            _mount_point: mount_point,
        }
    }

    /// Bytes an unprivileged writer could still allocate.
    pub fn available(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(&self.path).unwrap();
        stat.blocks_available() * stat.fragment_size()
    }

    /// Fills the file system to the last byte: big writes, then pages, then single bytes until ENOSPC.
    pub fn fill(&self) {
        let mut filler = std::fs::File::create(self.path.join("filler")).unwrap();
        for size in [1 << 20, 4096, 1] {
            let block = vec![0xA5u8; size];
            loop {
                match filler.write(&block) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                    Err(e) => panic!("filling {}: {e}", self.path.display()),
                }
            }
        }
        assert_eq!(self.available(), 0, "the tmpfs must be full");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}
