//! Stage: a complete blob from the agent's cache is unpacked (hostile-package checks, every file against the
//! manifest) into `<state>/staging/<digest>/`, built in a temporary directory and renamed into place, so a
//! staging directory is complete or absent. Nothing live changes.
//!
//! Each byte is read, inflated, hashed and written once. The blob is not hashed against its tree digest again:
//! the agent verified that as it arrived (a blob appears only by rename after its digest matched), and damage on
//! disk since then fails the unpack (gzip's CRC-32 covers the whole tar stream, each file is checked against the
//! manifest). Only when an unpack fails is the blob hashed, to tell a damaged blob (removed from the cache:
//! upload it again) from a package that is refused as it is.
//!
//! Layout: `staging/<digest>/files/<component>/...` (the archive root), `staging/<digest>/manifest.json` and
//! `staging/<digest>/identities.json` (what [`crate::staged_identity`] recorded of the verified files).
//!
//! The agent may also have staged the package while it was uploaded ([`crate::prestage`]: the same unpack over
//! the verified chunks, finished by the same [`finish_staging`] under the same per-digest lock). Either way an
//! existing staging directory is checked before it is reused: a file whose identity still equals the record is
//! trusted without reading it, any other is hashed, and a mismatch stages the package again from the blob.

use crate::fsutil::{self, IoContext};
use crate::layout::{StateLayout, is_digest};
use crate::spec::ServiceSpec;
use patchd_package::{Expectations, Limits, Manifest, PackageError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Staging failed; each variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("digest {digest:?} is not a 64-character lowercase hex tree digest")]
    BadDigest { digest: String },
    #[error("blob {digest} is not in this agent's cache; upload it first (QueryBlob/Upload)")]
    BlobMissing { digest: String },
    #[error(
        "blob {digest} in the cache does not match its digest at any power-of-two chunk size (at the default: {found}): it was damaged on disk after its upload and was removed from the cache; upload it again"
    )]
    BlobCorrupt { digest: String, found: String },
    #[error("package {digest} refused for service {service:?}: {source}")]
    Package {
        digest: String,
        service: String,
        #[source]
        source: Box<PackageError>,
    },
    #[error(
        "staged package {digest} is for component {found:?} but service {service:?} runs {expected:?}; stage a package of {expected:?}"
    )]
    WrongComponent {
        digest: String,
        service: String,
        found: String,
        expected: String,
    },
    #[error("staging directory of {digest} is damaged ({detail}); it was removed, stage again")]
    Damaged { digest: String, detail: String },
    #[error("package {digest} refused for service {service:?}: {source}")]
    NoSpace {
        digest: String,
        service: String,
        #[source]
        source: crate::space::SpaceError,
    },
    #[error(transparent)]
    Fs(#[from] fsutil::FsError),
}

/// What Stage reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub digest: String,
    pub manifest: Manifest,
    pub already_staged: bool,
}

/// Paths of one staged package.
#[derive(Debug, Clone)]
pub struct StagedPaths {
    pub dir: PathBuf,
}

impl StagedPaths {
    pub fn new(state_dir: &Path, digest: &str) -> Self {
        StagedPaths {
            dir: StateLayout::new(state_dir).staged(digest),
        }
    }

    /// The archive root.
    pub fn files(&self) -> PathBuf {
        files_of(&self.dir)
    }

    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// Present while a tree staged during its upload waits for its first Stage ([`crate::prestage`]).
    pub fn prestaged(&self) -> PathBuf {
        self.dir.join("prestaged")
    }
}

/// The blob in the agent's cache (`<state>/blobs/<digest>`, complete blobs only).
pub fn blob_path(state_dir: &Path, digest: &str) -> PathBuf {
    StateLayout::new(state_dir).blob(digest)
}

/// Chunk sizes a blob of the cache may have been uploaded with (the cache does not record it; the digest covers
/// it): the default first (what patchctl sends), then every other power of two the wire allows. A sound blob is
/// hashed once; only a corrupt or unusual one is hashed more often.
fn candidate_chunk_sizes() -> Vec<u32> {
    use patchd_package::digest::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
    let mut sizes = vec![DEFAULT_CHUNK_SIZE];
    let mut size = MIN_CHUNK_SIZE;
    while size <= MAX_CHUNK_SIZE {
        if size != DEFAULT_CHUNK_SIZE {
            sizes.push(size);
        }
        size = size.saturating_mul(2);
    }
    sizes
}

/// The cached blob of `digest`, if the cache holds it.
fn cached_blob(state_dir: &Path, digest: &str) -> Result<PathBuf, StageError> {
    let path = blob_path(state_dir, digest);
    if !path.is_file() {
        return Err(StageError::BlobMissing {
            digest: digest.to_string(),
        });
    }
    Ok(path)
}

/// Checks a cached blob against its tree digest, in either tree version (a blob uploaded by a controller older than
/// version 2 is named by a version-1 digest).
pub fn verify_blob(state_dir: &Path, digest: &str) -> Result<PathBuf, StageError> {
    let path = cached_blob(state_dir, digest)?;
    let mut at_default = None;
    for version in patchd_package::digest::TreeVersion::ALL {
        for chunk_size in candidate_chunk_sizes() {
            let found = version
                .tree_digest_file(&path, chunk_size)
                .ctx("hash blob", &path)?;
            if found == digest {
                return Ok(path);
            }
            at_default.get_or_insert(found);
        }
    }
    let found = at_default.unwrap_or_default();
    Err(StageError::BlobCorrupt {
        digest: digest.to_string(),
        found,
    })
}

/// An unpack of the blob failed with `refused`: hashes the blob to tell why. A blob that no longer matches its
/// digest was damaged on disk after its upload; a sound blob is a package refused as it is.
fn explain_refusal(
    state_dir: &Path,
    digest: &str,
    service: &str,
    refused: PackageError,
) -> StageError {
    match verify_or_forget(state_dir, digest) {
        Err(damaged) => {
            tracing::warn!(%digest, "the cached blob no longer matches its digest: {refused}");
            damaged
        }
        Ok(()) => StageError::Package {
            digest: digest.to_string(),
            service: service.to_string(),
            source: Box::new(refused),
        },
    }
}

/// Checks the cached blob against its digest; a damaged one is removed, so that the next push uploads it again
/// instead of finding it cached. Only the file that was hashed goes: one that a new upload renamed into place
/// meanwhile (another inode) stays.
fn verify_or_forget(state_dir: &Path, digest: &str) -> Result<(), StageError> {
    use std::os::unix::fs::MetadataExt;
    let path = blob_path(state_dir, digest);
    let identity = |path: &Path| {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()))
    };
    let hashed = identity(&path);
    match verify_blob(state_dir, digest) {
        Ok(_) => Ok(()),
        Err(damaged) => {
            if matches!(damaged, StageError::BlobCorrupt { .. })
                && hashed.is_some()
                && identity(&path) == hashed
                && let Err(e) = std::fs::remove_file(&path)
            {
                tracing::warn!(%digest, "cannot remove the damaged blob {}: {e}", path.display());
            }
            Err(damaged)
        }
    }
}

/// Loads the manifest of an already staged package, `None` when not staged.
pub fn load_staged(state_dir: &Path, digest: &str) -> Result<Option<Manifest>, StageError> {
    let paths = StagedPaths::new(state_dir, digest);
    let bytes = match std::fs::read(paths.manifest()) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(fsutil::FsError {
                op: "read",
                path: paths.manifest(),
                source: e,
            }
            .into());
        }
    };
    match Manifest::from_json(&bytes) {
        Ok(manifest) => Ok(Some(manifest)),
        Err(e) => {
            fsutil::remove_tree_if_exists(&paths.dir)?;
            Err(StageError::Damaged {
                digest: digest.to_string(),
                detail: e.to_string(),
            })
        }
    }
}

/// The staged package must be for the service's component.
pub fn check_component(
    digest: &str,
    spec: &ServiceSpec,
    manifest: &Manifest,
) -> Result<(), StageError> {
    if manifest.component != spec.component {
        return Err(StageError::WrongComponent {
            digest: digest.to_string(),
            service: spec.name.clone(),
            found: manifest.component.clone(),
            expected: spec.component.clone(),
        });
    }
    Ok(())
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Stages `digest` for `spec` (blocking: hashes and unpacks). Idempotent: an existing staging directory is
/// reused (`already_staged`) after checking its component and its files against the manifest (reading only the
/// files whose identity no longer equals stage's record; a changed one is staged again from the blob). Callers
/// serialize stages of one digest (the engine's stage locks, which [`crate::prestage`] takes too). A tree staged
/// during its upload is claimed here: its `prestaged` marker goes, and it is reported staged now.
pub fn stage_blocking(
    state_dir: &Path,
    digest: &str,
    spec: &ServiceSpec,
    limits: &Limits,
) -> Result<Staged, StageError> {
    if !is_digest(digest) {
        return Err(StageError::BadDigest {
            digest: digest.to_string(),
        });
    }
    if let Some(manifest) = load_staged(state_dir, digest)? {
        check_component(digest, spec, &manifest)?;
        let paths = StagedPaths::new(state_dir, digest);
        // Staged files are hard-linked into deploy dirs, so an in-place edit of a deployed file changes the
        // staged copy too: trust it only while it still matches the manifest, else unpack the blob again.
        match crate::staged_identity::verify_staged(state_dir, digest, &manifest) {
            Ok(()) => {
                // Staged again: an apply is coming, so the cache pruning must not take it meanwhile.
                crate::prune::touch(&paths.dir);
                // Its upload staged it and no Stage had checked it yet: this one stages it, as far as anyone asks.
                let claimed = match std::fs::remove_file(paths.prestaged()) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => {
                        return Err(fsutil::FsError {
                            op: "remove",
                            path: paths.prestaged(),
                            source: e,
                        }
                        .into());
                    }
                };
                return Ok(Staged {
                    digest: digest.to_string(),
                    manifest,
                    already_staged: !claimed,
                });
            }
            Err(e) => {
                tracing::warn!(%digest, "staged package changed since staging ({e}); staging it again from the blob");
                fsutil::remove_tree_if_exists(&paths.dir)?;
                fsutil::fsync_dir(&StateLayout::new(state_dir).staging())?;
            }
        }
    }
    let blob = cached_blob(state_dir, digest)?;
    let staging_root = StateLayout::new(state_dir).staging();
    std::fs::create_dir_all(&staging_root).ctx("create directory", &staging_root)?;
    crate::space::ensure_unpack_fits(&blob, digest, &staging_root).map_err(|source| {
        let unreadable = matches!(source, crate::space::SpaceError::Read { .. });
        let refused = StageError::NoSpace {
            digest: digest.to_string(),
            service: spec.name.clone(),
            source,
        };
        // A blob that cannot even be sized may have been damaged on disk: say so rather than blame the package.
        match unreadable.then(|| verify_or_forget(state_dir, digest)) {
            Some(Err(damaged)) => damaged,
            _ => refused,
        }
    })?;
    let temp = temp_dir(state_dir, digest);
    fsutil::remove_tree_if_exists(&temp)?;
    std::fs::create_dir(&temp).ctx("create directory", &temp)?;
    let result = (|| {
        let expect = Expectations::for_this_host(Some(spec.component.clone()));
        let manifest = patchd_package::unpack_verified(&blob, &files_of(&temp), limits, &expect)
            .map_err(|refused| explain_refusal(state_dir, digest, &spec.name, refused))?;
        finish_staging(state_dir, digest, &temp, &manifest)?;
        Ok(manifest)
    })();
    match result {
        Ok(manifest) => Ok(Staged {
            digest: digest.to_string(),
            manifest,
            already_staged: false,
        }),
        Err(e) => {
            let _ = fsutil::remove_tree_if_exists(&temp);
            Err(e)
        }
    }
}

/// True while the tree of `digest` was staged during its upload and no Stage has checked it since: Apply refuses
/// it until then, as it refuses a package that is not staged.
pub fn is_prestaged(state_dir: &Path, digest: &str) -> bool {
    fsutil::exists_no_follow(&StagedPaths::new(state_dir, digest).prestaged())
}

/// A fresh private directory name for a stage of `digest`, under `staging/` (not created here). Its name starts
/// with `.tmp-`, so [`remove_stale_temps`] clears it at the next start if the agent dies meanwhile.
pub fn temp_dir(state_dir: &Path, digest: &str) -> PathBuf {
    StateLayout::new(state_dir).staging().join(format!(
        ".tmp-{digest}-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Where a stage unpacks the archive root inside its private directory (`files/`, as in a staged one).
pub fn files_of(temp: &Path) -> PathBuf {
    temp.join("files")
}

/// The end of every stage, once `files_of(temp)` holds the tree of `digest` unpacked and verified against
/// `manifest`: records the files' identities (so apply and a later stage can trust them without hashing them
/// again), writes `manifest.json`, renames `temp` to `staging/<digest>` and syncs the staging directory. The caller
/// holds the stage lock of `digest` (so the name is free) and removes `temp` when this fails.
pub fn finish_staging(
    state_dir: &Path,
    digest: &str,
    temp: &Path,
    manifest: &Manifest,
) -> Result<(), StageError> {
    crate::staged_identity::record(temp, manifest)?;
    fsutil::write_atomic(&temp.join("manifest.json"), &manifest.to_json())?;
    let final_dir = StagedPaths::new(state_dir, digest).dir;
    std::fs::rename(temp, &final_dir).ctx("rename staging directory to", &final_dir)?;
    fsutil::fsync_dir(&StateLayout::new(state_dir).staging())?;
    Ok(())
}

/// Removes leftovers of interrupted stages (`staging/.tmp-*`).
pub fn remove_stale_temps(state_dir: &Path) {
    let Ok(listing) = std::fs::read_dir(StateLayout::new(state_dir).staging()) else {
        return;
    };
    for entry in listing.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fsutil::remove_tree_if_exists(&entry.path());
        }
    }
}
