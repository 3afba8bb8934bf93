//! Where patchctl keeps its files: `$PATCHCTL_HOME` (default `~/.patchctl`), with `tls/` and the store.

use std::path::{Path, PathBuf};

/// Environment variable that overrides the home directory.
pub const HOME_ENV: &str = "PATCHCTL_HOME";

/// The controller's home directory and the well-known paths below it.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Uses an explicit directory.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$PATCHCTL_HOME`, else `$HOME/.patchctl`, else `./.patchctl`.
    pub fn from_env() -> Self {
        if let Some(dir) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            return Self::at(PathBuf::from(dir));
        }
        let base = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::at(base.join(".patchctl"))
    }

    /// The home directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Default directory of the cluster CA and the controller certificate.
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// The embedded store (SQLite).
    pub fn store_path(&self) -> PathBuf {
        self.root.join("patchctl.db")
    }

    /// The sender's cache of package chunk hashes (`patchctl::agent::digest_cache`).
    pub fn digest_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("digests")
    }

    /// Files of the demo cluster (`patchctl demo up`).
    pub fn demo_dir(&self) -> PathBuf {
        self.root.join("demo")
    }
}
