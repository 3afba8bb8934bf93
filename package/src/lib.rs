//! patchd package format: the tree digest, the manifest, hostile-package checks, build and unpack.
//!
//! A package is a `.tar.gz` holding one component directory (`demo-worker/…`) and, when built by
//! `patchctl package build`, a `patchd-manifest.json` at its root (see ARCHITECTURE.md "Package"). Every
//! reader here streams the archive once, refuses hostile entries before anything is written, and enforces
//! the size limits while decompressing, so memory stays flat whatever the package size.
//!
//! Rules every package must follow (each broken rule is one [`PackageError`] variant naming the entry): relative
//! UTF-8 paths without `..` or control characters, at most 4095 bytes and 128 components; only regular files,
//! directories, symlinks and hard links (no devices, fifos, sparse files…); links that stay inside the component
//! directory and symlinks that do not pass through other symlinks; each path once; one top-level directory and
//! nothing else at the root but the manifest; entry count and sizes within [`Limits`]; no setuid/setgid/sticky bit
//! (refused, not stripped: a hotfix must not change privileges silently) and no world-writable file; a valid gzip
//! stream with nothing but zero padding after the tar end marker; at least one regular file; when a manifest is
//! embedded, every file matches it exactly (path, size, content digest, mode) and nothing is missing or extra; ELF binaries
//! all for one OS/arch, matching the manifest and the target host when those are known.

#![forbid(unsafe_code)]

mod build;
pub mod content;
pub mod digest;
pub mod direct_write;
mod elf;
mod error;
mod image;
pub mod manifest;
mod paths;
pub mod signing;
mod unpack;
mod walk;

pub use build::{BuildSpec, IMAGE_ARCHIVE_FILE, build, build_image, build_with, pack_dir};
pub use content::ContentAlgorithm;
pub use elf::detect_elf_target;
pub use error::PackageError;
pub use image::{
    ImageInfo, MAX_IMAGE_JSON_BYTES, engine_arch_to_host, inspect_verifying_image,
    read_image_archive, verify_image_archive,
};
pub use manifest::{
    FileEntry, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_FORMAT_SHA256, Manifest, SymlinkEntry,
};
pub use unpack::{unpack_verified, unpack_verified_from, verify_tree, verify_tree_trusting};

use elf::target_label;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// Bounds on what a package may unpack to (decompression bombs, runaway packages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (files, directories, links) a package may hold.
    pub max_files: u64,
    /// Most bytes all regular files together may unpack to.
    pub max_unpacked_bytes: u64,
    /// Most bytes one regular file may unpack to.
    pub max_entry_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 10_000,
            max_unpacked_bytes: 8 << 30,
            max_entry_bytes: 4 << 30,
        }
    }
}

/// What the target of a package expects; `None` fields are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// The component the target service runs.
    pub component: Option<String>,
    /// The target host's OS (`std::env::consts::OS`).
    pub os: Option<String>,
    /// The target host's architecture (`std::env::consts::ARCH`).
    pub arch: Option<String>,
}

impl Expectations {
    /// Expectations of a service of `component` on the running host.
    pub fn for_this_host(component: Option<String>) -> Self {
        Self {
            component,
            os: Some(std::env::consts::OS.to_owned()),
            arch: Some(std::env::consts::ARCH.to_owned()),
        }
    }
}

/// What `inspect` learned about a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageInfo {
    /// The embedded manifest, or the one computed from the archive.
    pub manifest: Manifest,
    /// True when the archive carries `patchd-manifest.json`.
    pub manifest_embedded: bool,
    /// Plain sha256 of the `.tar.gz` file (what `sha256sum` prints).
    pub package_sha256: String,
    /// Tree digest of the `.tar.gz` file at the default chunk size: the package's name everywhere.
    pub tree_digest: String,
    /// Size of the `.tar.gz` file in bytes.
    pub size: u64,
}

/// Reads the whole package once, checks every entry and returns its manifest and digests.
///
/// With an embedded manifest, every file must match it exactly; without one, the manifest is computed from
/// the archive (version taken from the file name, `<component>-<version>[-<os>-<arch>].tar.gz`).
pub fn inspect(path: &Path, limits: &Limits) -> Result<PackageInfo, PackageError> {
    inspect_expecting(path, limits, &Expectations::default())
}

/// [`inspect`], also checking the package against what its target expects (component, OS, architecture).
pub fn inspect_expecting(
    path: &Path,
    limits: &Limits,
    expect: &Expectations,
) -> Result<PackageInfo, PackageError> {
    let walked = walk::walk(
        path,
        limits,
        expect,
        walk::RawDigests::Compute,
        &mut walk::NullSink,
    )?;
    let (manifest, manifest_embedded) = settle_manifest(&walked, path, expect)?;
    let (package_sha256, tree_digest) = walked.digests.ok_or_else(|| {
        PackageError::io(
            "package digests missing after a walk that computes them",
            path,
            std::io::Error::other("internal error"),
        )
    })?;
    Ok(PackageInfo {
        manifest,
        manifest_embedded,
        package_sha256,
        tree_digest,
        size: walked.size,
    })
}

/// Checks what a walk found as a whole (links, targets, the embedded manifest) and returns the manifest.
pub(crate) fn settle_manifest(
    walked: &walk::Walked,
    path: &Path,
    expect: &Expectations,
) -> Result<(Manifest, bool), PackageError> {
    let detected = unanimous_target(walked)?;
    if let Some(expected) = &expect.component
        && *expected != walked.top
    {
        return Err(PackageError::ComponentMismatch {
            found: walked.top.clone(),
            expected: expected.clone(),
        });
    }
    let (mut manifest, embedded) = match &walked.embedded {
        Some(embedded) => {
            check_against_manifest(walked, embedded, detected)?;
            (embedded.clone(), true)
        }
        None => {
            let (os, arch) = detected.map(|(_, os, arch)| (os, arch)).unzip();
            let manifest = Manifest {
                format: MANIFEST_FORMAT,
                component: walked.top.clone(),
                version: version_from_file_name(path, &walked.top, os, arch),
                os: os.map(str::to_owned),
                arch: arch.map(str::to_owned),
                files: walked.files.clone(),
                symlinks: walked.symlinks.clone(),
                image: None,
            };
            (manifest, false)
        }
    };
    manifest.sort();
    check_manifest_target(&manifest, expect)?;
    Ok((manifest, embedded))
}

/// The one OS/arch all ELF binaries share, or `None` without binaries.
fn unanimous_target(
    walked: &walk::Walked,
) -> Result<Option<(&str, &'static str, &'static str)>, PackageError> {
    let mut first: Option<(&str, &'static str, &'static str)> = None;
    for (path, os, arch) in &walked.targets {
        match first {
            None => first = Some((path, os, arch)),
            Some((first_path, first_os, first_arch)) if (first_os, first_arch) != (*os, *arch) => {
                return Err(PackageError::MixedTargets {
                    entry: path.clone(),
                    found: target_label(os, arch),
                    other_entry: first_path.to_owned(),
                    other: target_label(first_os, first_arch),
                });
            }
            Some(_) => {}
        }
    }
    Ok(first)
}

fn check_against_manifest(
    walked: &walk::Walked,
    manifest: &Manifest,
    detected: Option<(&str, &'static str, &'static str)>,
) -> Result<(), PackageError> {
    let mismatch = |entry: &str, field: &'static str, found: String, expected: String| {
        PackageError::ManifestMismatch {
            entry: entry.to_owned(),
            field,
            found,
            expected,
        }
    };
    if manifest.component != walked.top {
        return Err(mismatch(
            MANIFEST_FILE,
            "the component",
            walked.top.clone(),
            manifest.component.clone(),
        ));
    }
    let listed: HashMap<&str, &FileEntry> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    for file in &walked.files {
        let Some(expected) = listed.get(file.path.as_str()) else {
            return Err(PackageError::NotInManifest {
                entry: file.path.clone(),
            });
        };
        if file.size != expected.size {
            return Err(mismatch(
                &file.path,
                "the size",
                file.size.to_string(),
                expected.size.to_string(),
            ));
        }
        if ContentAlgorithm::of(&file.digest) != ContentAlgorithm::of(&expected.digest) {
            // Files are hashed in the manifest's algorithm once it has been read; this one came before it.
            return Err(PackageError::InvalidManifest {
                detail: format!(
                    "`{MANIFEST_FILE}` comes after `{}` in the archive; it must be the first entry \
                     (rebuild the package with `patchctl package build`)",
                    file.path
                ),
            });
        }
        if file.digest != expected.digest {
            return Err(mismatch(
                &file.path,
                "the digest",
                file.digest.clone(),
                expected.digest.clone(),
            ));
        }
        if file.mode != expected.mode {
            return Err(mismatch(
                &file.path,
                "the mode",
                format!("{:04o}", file.mode),
                format!("{:04o}", expected.mode),
            ));
        }
    }
    let present: std::collections::HashSet<&str> =
        walked.files.iter().map(|f| f.path.as_str()).collect();
    if let Some(missing) = manifest
        .files
        .iter()
        .find(|f| !present.contains(f.path.as_str()))
    {
        return Err(PackageError::MissingFromArchive {
            entry: missing.path.clone(),
        });
    }
    let listed_links: HashMap<&str, &str> = manifest
        .symlinks
        .iter()
        .map(|l| (l.path.as_str(), l.target.as_str()))
        .collect();
    for link in &walked.symlinks {
        match listed_links.get(link.path.as_str()) {
            None => {
                return Err(PackageError::NotInManifest {
                    entry: link.path.clone(),
                });
            }
            Some(target) if *target != link.target => {
                return Err(mismatch(
                    &link.path,
                    "the symlink target",
                    link.target.clone(),
                    (*target).to_owned(),
                ));
            }
            Some(_) => {}
        }
    }
    let present_links: std::collections::HashSet<&str> =
        walked.symlinks.iter().map(|l| l.path.as_str()).collect();
    if let Some(missing) = manifest
        .symlinks
        .iter()
        .find(|l| !present_links.contains(l.path.as_str()))
    {
        return Err(PackageError::MissingFromArchive {
            entry: missing.path.clone(),
        });
    }
    if let Some((path, os, arch)) = detected {
        let os_differs = manifest
            .os
            .as_deref()
            .is_some_and(|declared| declared != os);
        let arch_differs = manifest
            .arch
            .as_deref()
            .is_some_and(|declared| declared != arch);
        if os_differs || arch_differs {
            return Err(mismatch(
                path,
                "the binary's OS/arch",
                target_label(os, arch),
                target_label(
                    manifest.os.as_deref().unwrap_or(os),
                    manifest.arch.as_deref().unwrap_or(arch),
                ),
            ));
        }
    }
    Ok(())
}

/// The manifest's declared OS/arch against the target's.
fn check_manifest_target(manifest: &Manifest, expect: &Expectations) -> Result<(), PackageError> {
    let differs = |declared: &Option<String>, wanted: &Option<String>| match (declared, wanted) {
        (Some(declared), Some(wanted)) => declared != wanted,
        _ => false,
    };
    if differs(&manifest.os, &expect.os) || differs(&manifest.arch, &expect.arch) {
        let label = |os: &Option<String>, arch: &Option<String>| {
            target_label(
                os.as_deref().unwrap_or("any"),
                arch.as_deref().unwrap_or("any"),
            )
        };
        return Err(PackageError::WrongTarget {
            entry: MANIFEST_FILE.to_owned(),
            found: label(&manifest.os, &manifest.arch),
            expected: label(&expect.os, &expect.arch),
        });
    }
    Ok(())
}

/// `dm-master-v5.3.0-linux-amd64.tar.gz` → `v5.3.0`: tiup's naming; anything else gives the file stem.
fn version_from_file_name(
    path: &Path,
    component: &str,
    os: Option<&str>,
    arch: Option<&str>,
) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".tar.gz")
        .or_else(|| name.strip_suffix(".tgz"))
        .unwrap_or(&name);
    let mut version = stem
        .strip_prefix(&format!("{component}-"))
        .unwrap_or(stem)
        .to_owned();
    let os_names: Vec<&str> = os.into_iter().chain(["linux", "darwin"]).collect();
    let arch_names: Vec<&str> = arch
        .into_iter()
        .chain(["amd64", "arm64", "x86_64", "aarch64"])
        .collect();
    'strip: for os in &os_names {
        for arch in &arch_names {
            if let Some(rest) = version.strip_suffix(&format!("-{os}-{arch}")) {
                version = rest.to_owned();
                break 'strip;
            }
        }
    }
    if version.is_empty() {
        "unknown".to_owned()
    } else {
        version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_tiup_style_file_names() {
        let v = |name: &str| {
            version_from_file_name(Path::new(name), "dm-master", Some("linux"), Some("x86_64"))
        };
        assert_eq!(v("/tmp/dm-master-v5.3.0-linux-amd64.tar.gz"), "v5.3.0");
        assert_eq!(v("dm-master-hotfix-linux-x86_64.tgz"), "hotfix");
        assert_eq!(v("fix.tar.gz"), "fix");
        assert_eq!(v("dm-master.tar.gz"), "dm-master");
    }
}
