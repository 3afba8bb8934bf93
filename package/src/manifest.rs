//! The package manifest (`patchd-manifest.json` at the archive root): component, version, target and every file.

use crate::content::ContentAlgorithm;
use crate::{ImageInfo, PackageError};
use serde::{Deserialize, Serialize};

/// Name of the manifest file at the archive root.
pub const MANIFEST_FILE: &str = "patchd-manifest.json";
/// The manifest format this crate writes: 2, whose files' digests are BLAKE3.
pub const MANIFEST_FORMAT: u32 = 2;
/// The first manifest format, whose files' digests are sha256 (packages built before format 2; still read).
pub const MANIFEST_FORMAT_SHA256: u32 = 1;
/// Largest manifest accepted (10 000 files take about 2 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 32 * 1024 * 1024;

/// What a package holds. Paths are relative to the archive root and start with the component directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format: [`MANIFEST_FORMAT`], or [`MANIFEST_FORMAT_SHA256`] in a package built before it.
    pub format: u32,
    /// Component name, equal to the package's top-level directory.
    pub component: String,
    /// Free version label (`v1.0.1-hotfix`).
    pub version: String,
    /// Target OS (`std::env::consts::OS` names: `linux`, `freebsd`…) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Target architecture (`std::env::consts::ARCH` names: `x86_64`, `aarch64`…) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Every regular file, sorted by path.
    pub files: Vec<FileEntry>,
    /// Every symlink, sorted by path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symlinks: Vec<SymlinkEntry>,
    /// The container image of an image package (its `docker save` archive is one of `files`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
}

/// One regular file of a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path from the archive root (`demo-worker/demo-worker`).
    pub path: String,
    /// Permission bits (`0o755` is 493); never setuid/setgid/sticky.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// The content's digest in the manifest format's algorithm ([`Manifest::content_algorithm`]): `blake3:<hex>`
    /// (format 2), or bare sha256 hex (format 1, whose JSON calls it `sha256`).
    #[serde(alias = "sha256")]
    pub digest: String,
}

/// One symlink of a package; its target is relative and stays inside the component directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymlinkEntry {
    /// Path from the archive root.
    pub path: String,
    /// Link target, relative to the link's directory.
    pub target: String,
}

impl Manifest {
    /// Parses a manifest and checks its format and its own consistency (paths, duplicates, hashes).
    pub fn from_json(bytes: &[u8]) -> Result<Self, PackageError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| PackageError::InvalidManifest {
                detail: format!("not a valid manifest: {e}"),
            })?;
        manifest.check_self()?;
        Ok(manifest)
    }

    /// Serializes the manifest as pretty JSON (deterministic: fields in declaration order, lists as stored).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and integers into a Vec cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The algorithm of the files' digests, from the format ([`MANIFEST_FORMAT`] when the format is unknown: such a
    /// manifest is refused when parsed).
    pub fn content_algorithm(&self) -> ContentAlgorithm {
        if self.format == MANIFEST_FORMAT_SHA256 {
            ContentAlgorithm::Sha256
        } else {
            ContentAlgorithm::Blake3
        }
    }

    /// The file at `path`, if the package holds one.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Total size of the regular files.
    pub fn unpacked_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Sorts files and symlinks by path (the canonical order).
    pub fn sort(&mut self) {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.symlinks.sort_by(|a, b| a.path.cmp(&b.path));
    }

    fn check_self(&self) -> Result<(), PackageError> {
        let invalid = |detail: String| PackageError::InvalidManifest { detail };
        if self.format != MANIFEST_FORMAT && self.format != MANIFEST_FORMAT_SHA256 {
            return Err(invalid(format!(
                "format {} is not supported (this patchd reads formats {MANIFEST_FORMAT_SHA256} and \
                 {MANIFEST_FORMAT}); upgrade patchctl/patchd",
                self.format
            )));
        }
        if self.component.is_empty() || self.component.contains('/') || self.component == ".." {
            return Err(invalid(format!(
                "component `{}` is not a directory name",
                self.component
            )));
        }
        let prefix = format!("{}/", self.component);
        let mut seen = std::collections::HashSet::new();
        let paths = self
            .files
            .iter()
            .map(|f| &f.path)
            .chain(self.symlinks.iter().map(|s| &s.path));
        for path in paths {
            if !path.starts_with(&prefix)
                || crate::paths::normalize_entry_path(path).as_deref() != Ok(path)
            {
                return Err(invalid(format!(
                    "path `{path}` is not a clean path under `{prefix}`"
                )));
            }
            if !seen.insert(path.as_str()) {
                return Err(invalid(format!("path `{path}` is listed twice")));
            }
        }
        let algorithm = self.content_algorithm();
        for file in &self.files {
            if !algorithm.is_well_formed(&file.digest) {
                let expected = match algorithm {
                    ContentAlgorithm::Sha256 => "64 lowercase hex digits",
                    ContentAlgorithm::Blake3 => "`blake3:` and 64 lowercase hex digits",
                };
                return Err(invalid(format!(
                    "`{}` has an invalid digest `{}` (format {} expects {expected})",
                    file.path, file.digest, self.format
                )));
            }
        }
        if let Some(image) = &self.image {
            image.check_self().map_err(invalid)?;
            if self.file(&image.archive).is_none() {
                return Err(invalid(format!(
                    "image archive `{}` is not one of the package's files",
                    image.archive
                )));
            }
        }
        Ok(())
    }
}
