//! The signing gate: when `[trust]` names keys, a blob is staged or applied only after its minisign signatures
//! (sent with Stage and Apply) verified against the blob's bytes on this agent's disk, whatever the controller
//! says. Digests verified since start are remembered, so an Apply right after its Stage does not hash the blob again;
//! an Apply of a digest not verified in this run (staged before the keys were configured, or before a restart) is
//! verified from the signatures it carries.

use patchd_apply::layout::is_digest;
use patchd_package::signing::{SignatureError, TrustPolicy};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tonic::Status;

/// The agent's trust policy and the digests it verified in this run.
#[derive(Debug)]
pub struct PackageTrust {
    policy: TrustPolicy,
    state_dir: PathBuf,
    verified: Mutex<HashSet<String>>,
}

impl PackageTrust {
    /// The gate for `policy` over the blob cache of `state_dir`.
    pub fn new(policy: TrustPolicy, state_dir: &Path) -> Self {
        Self {
            policy,
            state_dir: state_dir.to_path_buf(),
            verified: Mutex::new(HashSet::new()),
        }
    }

    /// True when packages must be signed.
    pub fn is_enforced(&self) -> bool {
        self.policy.is_enforced()
    }

    fn remembered(&self, digest: &str) -> bool {
        self.verified
            .lock()
            .map(|verified| verified.contains(digest))
            .unwrap_or(false)
    }

    fn remember(&self, digest: &str) {
        if let Ok(mut verified) = self.verified.lock() {
            verified.insert(digest.to_string());
        }
    }

    /// Checks the blob `digest` against `signatures` (blocking: it reads the whole blob). `fresh` re-verifies a
    /// digest verified before (Stage does, so a new signature set is always checked); Apply passes `false`.
    pub fn check(&self, digest: &str, signatures: &[String], fresh: bool) -> Result<(), Status> {
        if !self.is_enforced() || (!fresh && self.remembered(digest)) {
            return Ok(());
        }
        if !is_digest(digest) {
            return Err(Status::invalid_argument(format!(
                "digest {digest:?} is not a 64-character lowercase hex tree digest"
            )));
        }
        let blob = patchd_apply::stage::blob_path(&self.state_dir, digest);
        if !blob.is_file() {
            return Err(Status::failed_precondition(format!(
                "blob {digest} is not in this agent's cache, so its signature cannot be checked; upload it first \
                 (QueryBlob/Upload)"
            )));
        }
        let keys = self
            .policy
            .verify_file(&blob, signatures)
            .map_err(|error| refusal(digest, error))?;
        let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
        tracing::info!(%digest, keys = %keys.join(","), "package signature verified");
        self.remember(digest);
        Ok(())
    }
}

/// A refused signature as a gRPC status: an unsigned package is a missing precondition, a wrong key or changed
/// bytes are a refusal; the message names the key ids and what to do.
fn refusal(digest: &str, error: SignatureError) -> Status {
    let message = format!("package {digest} refused: {error}");
    tracing::warn!(%digest, %error, "package signature refused");
    match error {
        SignatureError::Unsigned { .. } => Status::failed_precondition(message),
        SignatureError::Malformed { .. } | SignatureError::TooMany { .. } => {
            Status::invalid_argument(message)
        }
        SignatureError::Io { .. } => Status::internal(message),
        _ => Status::permission_denied(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchd_package::signing::{TrustedKey, generate_keys, sign_file};
    use tonic::Code;

    #[test]
    fn stage_verifies_every_time_and_apply_trusts_what_stage_verified() {
        let dir = tempfile::tempdir().unwrap();
        let digest = "a".repeat(64);
        let blob = patchd_apply::stage::blob_path(dir.path(), &digest);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"blob bytes").unwrap();
        let keys = generate_keys().unwrap();
        let secret = dir.path().join("k.key");
        std::fs::write(&secret, &keys.secret_file).unwrap();
        let signature = sign_file(&blob, &secret).unwrap().text;
        let trust = PackageTrust::new(
            TrustPolicy::new(vec![TrustedKey::parse(&keys.public_key).unwrap()], 1),
            dir.path(),
        );

        let refused = trust.check(&digest, &[], false).unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains(&keys.key_id.to_string()));
        trust
            .check(&digest, std::slice::from_ref(&signature), true)
            .unwrap();
        // Apply after Stage: remembered.
        trust.check(&digest, &[], false).unwrap();
        // Stage again without the signature: checked again, refused.
        assert_eq!(
            trust.check(&digest, &[], true).unwrap_err().code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            trust
                .check("../x", std::slice::from_ref(&signature), true)
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        let unenforced = PackageTrust::new(TrustPolicy::new(Vec::new(), 1), dir.path());
        unenforced.check(&"b".repeat(64), &[], true).unwrap();
    }
}
