//! Staging a package while it is uploaded: the agent's upload hands each verified chunk to an unpacker that runs
//! the very walk Stage runs on a blob ([`patchd_package::unpack_verified_from`]: hostile-package rules, every file
//! hashed against the manifest, as it is written) into a private `staging/.tmp-*` directory. Once the blob is
//! complete (its tree digest matched), [`PreStager::publish`] finishes it as a stage does
//! ([`crate::stage::finish_staging`]), under the lock that serializes stages of the digest (the engine's stage
//! locks), so a Stage never races the publish: it waits, then finds the staged directory and checks it as any
//! other. Each byte of a package is then written twice (blob and tree) but never read back from disk.
//!
//! Such a tree carries a `prestaged` marker until a Stage has checked it ([`crate::stage::StagedPaths::prestaged`]):
//! Apply refuses it until then, as it refuses a package no Stage has staged, and that first Stage reports it
//! staged now (`already_staged: false`), as it would have without the upload's help.
//!
//! The unpack is an optimisation only: whenever it does not finish (hostile package, no space, a stream that broke
//! or parked, a digest that did not match, a package staged meanwhile) its directory is dropped and Stage unpacks
//! the blob as before, reporting errors as before. The component is not known at upload: Stage checks it against
//! the service ([`crate::stage::check_component`]).

use crate::digest_locks::DigestLocks;
use crate::fsutil::{self, IoContext};
use crate::layout::StateLayout;
use crate::prune::Pins;
use crate::stage::{self, StageError, StagedPaths};
use patchd_package::{Expectations, Limits, Manifest, PackageError};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What an upload needs to stage the package it receives: the state dir, the agent's package limits, and the
/// stage locks and pins of the engine (so it takes part in the same serialization and pruning rules as a Stage).
#[derive(Debug, Clone)]
pub struct PreStager {
    state_dir: PathBuf,
    limits: Limits,
    /// The engine's stage locks: one per digest, held by every Stage.
    locks: Arc<DigestLocks>,
    pins: Arc<Pins>,
}

impl PreStager {
    pub(crate) fn new(
        state_dir: PathBuf,
        limits: Limits,
        locks: Arc<DigestLocks>,
        pins: Arc<Pins>,
    ) -> Self {
        Self {
            state_dir,
            limits,
            locks,
            pins,
        }
    }

    /// A pre-stager with locks of its own: for a blob store used without an engine (tests, tools). Stages run by
    /// an engine over the same state dir would not be serialized with it; use [`crate::Engine::prestager`] there.
    pub fn standalone(state_dir: &Path, limits: Limits) -> Self {
        Self::new(
            state_dir.to_path_buf(),
            limits,
            Arc::default(),
            Arc::default(),
        )
    }

    /// The agent's package limits (what Stage unpacks with).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The directory staged packages live in.
    pub fn staging_dir(&self) -> PathBuf {
        StateLayout::new(&self.state_dir).staging()
    }

    /// True when `digest` is staged already (nothing to gain from unpacking it again).
    pub fn is_staged(&self, digest: &str) -> bool {
        fsutil::exists_no_follow(&StagedPaths::new(&self.state_dir, digest).dir)
    }

    /// A fresh private directory name for unpacking `digest` (`staging/.tmp-*`, not created here).
    pub fn temp_dir(&self, digest: &str) -> PathBuf {
        stage::temp_dir(&self.state_dir, digest)
    }

    /// Unpacks the `size` bytes of the package `digest` that `source` yields into `temp` (created here; it must
    /// not exist), exactly as Stage unpacks the blob, within `limits` (at most the agent's), for any component.
    /// Blocking. On error `temp` is removed.
    pub fn unpack(
        &self,
        digest: &str,
        source: &mut dyn BufRead,
        size: u64,
        temp: &Path,
        limits: &Limits,
    ) -> Result<Manifest, PackageError> {
        let unpacked = std::fs::create_dir_all(self.staging_dir())
            .and_then(|()| std::fs::create_dir(temp))
            .map_err(|cause| PackageError::Io {
                action: "cannot create unpack directory",
                path: temp.to_path_buf(),
                cause,
            })
            .and_then(|()| {
                patchd_package::unpack_verified_from(
                    source,
                    size,
                    // The blob's own name: a package without a manifest gets the version Stage would give it.
                    &stage::blob_path(&self.state_dir, digest),
                    &stage::files_of(temp),
                    limits,
                    &Expectations::for_this_host(None),
                )
            });
        if unpacked.is_err() {
            discard(temp);
        }
        unpacked
    }

    /// Publishes the tree unpacked into `temp` as `staging/<digest>`, marked `prestaged`, once the blob of `digest`
    /// is complete, under the stage lock of `digest` and with `digest` pinned. Returns false (and removes `temp`)
    /// when `digest` was staged meanwhile; on error `temp` is removed too.
    pub async fn publish(
        &self,
        digest: &str,
        temp: PathBuf,
        manifest: Manifest,
    ) -> Result<bool, StageError> {
        let _staging = self.locks.acquire(digest).await;
        let _pin = self.pins.pin(digest);
        let (state_dir, owned_digest) = (self.state_dir.clone(), digest.to_string());
        let published = tokio::task::spawn_blocking(move || {
            if fsutil::exists_no_follow(&StagedPaths::new(&state_dir, &owned_digest).dir) {
                discard(&temp);
                return Ok(false);
            }
            // Before the manifest: its atomic write syncs the directory, so the marker is as durable as the tree.
            let marker = StagedPaths { dir: temp.clone() }.prestaged();
            let finished = std::fs::write(&marker, b"")
                .ctx("write", &marker)
                .map_err(StageError::from)
                .and_then(|()| stage::finish_staging(&state_dir, &owned_digest, &temp, &manifest));
            if finished.is_err() {
                discard(&temp);
            }
            finished.map(|()| true)
        })
        .await
        .map_err(|e| {
            StageError::Fs(fsutil::FsError {
                op: "publish staging directory",
                path: self.staging_dir(),
                source: std::io::Error::other(e.to_string()),
            })
        })??;
        Ok(published)
    }
}

/// Removes a pre-stage's private directory (best effort: what is left goes at the next start).
pub fn discard(temp: &Path) {
    if let Err(e) = fsutil::remove_tree_if_exists(temp) {
        tracing::warn!("cannot remove {}: {e}", temp.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package of component `svc` in the blob cache of `state`; returns its digest.
    fn cached_package(dir: &Path, state: &Path) -> String {
        let src = dir.join("src/svc");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("svc"), "binary v2").unwrap();
        let out = dir.join("svc-v2.tar.gz");
        let info = patchd_package::pack_dir(&src, "v2", &out).unwrap();
        let blobs = StateLayout::new(state).blobs();
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::copy(&out, blobs.join(&info.tree_digest)).unwrap();
        info.tree_digest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_waits_for_a_stage_of_the_digest_and_never_replaces_what_it_staged() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let digest = cached_package(dir.path(), &state);
        let prestager = PreStager::standalone(&state, Limits::default());
        let blob = stage::blob_path(&state, &digest);
        let size = std::fs::metadata(&blob).unwrap().len();
        let temp = prestager.temp_dir(&digest);
        let manifest = prestager
            .unpack(
                &digest,
                &mut std::io::BufReader::new(std::fs::File::open(&blob).unwrap()),
                size,
                &temp,
                &prestager.limits(),
            )
            .unwrap();
        assert!(temp.join("files/svc/svc").is_file());

        // A Stage of the digest holds its lock (as `Engine::stage` does) while the upload publishes.
        let staging = prestager.locks.acquire(&digest).await;
        let publishing = tokio::spawn({
            let (prestager, digest, temp) = (prestager.clone(), digest.clone(), temp.clone());
            async move { prestager.publish(&digest, temp, manifest).await }
        });
        let spec: crate::spec::ServiceSpec =
            toml::from_str("name = \"svc\"\ncomponent = \"svc\"\n").unwrap();
        let staged = stage::stage_blocking(&state, &digest, &spec, &Limits::default()).unwrap();
        assert!(!staged.already_staged, "the stage unpacked the blob itself");
        assert!(
            !publishing.is_finished(),
            "the publish waits for the stage lock"
        );
        drop(staging);

        assert!(
            !publishing.await.unwrap().unwrap(),
            "staged meanwhile: not published"
        );
        assert!(!temp.exists(), "its copy is dropped");
        assert!(!stage::is_prestaged(&state, &digest));
        let manifest = stage::load_staged(&state, &digest).unwrap().unwrap();
        crate::staged_identity::verify_staged(&state, &digest, &manifest).unwrap();
    }
}
