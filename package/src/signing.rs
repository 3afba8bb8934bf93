//! Package signatures in minisign's format (<https://jedisct1.github.io/minisign/>), so `minisign -V` and any other
//! minisign implementation can check what `patchctl package sign` writes, and minisign-made signatures work here.
//!
//! A signature covers the package file's bytes (the blob the agent holds), prehashed with BLAKE2b-512 as minisign
//! does by default (`ED` algorithm), and is written beside the package as `<package>.minisig`; further signatures
//! for a k-of-n policy go beside it as `<package>.<anything>.minisig`. Keys are ed25519 in minisign's key files:
//! the public key is the `RW…` base64 line of `<name>.pub`, the secret key file is kept unencrypted (mode 0600),
//! and belongs on a signing host, not on the controller host. Legacy (non-prehashed) signatures are refused.
//! The `minisign` tool signs with these secret keys too; its own unencrypted (`-W`) secret keys carry a checksum
//! the minisign crate does not read, so those sign with `minisign -S` (signatures and public keys interoperate).

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// File name suffix of a signature beside its package.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// Largest signature file read (a minisign signature is about 300 bytes; comments make it longer).
pub const MAX_SIGNATURE_BYTES: u64 = 16 * 1024;

/// Most signatures checked for one package: each one by a trusted key reads the whole package.
pub const MAX_SIGNATURES: usize = 16;

/// A minisign key id: 8 bytes, shown as minisign shows it (16 upper-case hex digits of the little-endian number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; 8]);

impl KeyId {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(KeyId)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

/// Why a key or a signature could not be made, read or accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A key or signature file could not be read or written.
    #[error("{action} {}: {cause}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A public key that is neither a minisign `RW…` base64 key nor the text of a minisign `.pub` file.
    #[error(
        "`{key}` is not a minisign public key ({detail}); give the `RW…` line of a key made by `patchctl key \
         generate` or `minisign -G`, or the path of its .pub file"
    )]
    BadPublicKey { key: String, detail: String },
    /// A secret key file that cannot be used.
    #[error(
        "{}: not a secret key `patchctl package sign` can use ({detail}); use a key made by `patchctl key \
         generate`, or sign with `minisign -Sm PKG -s KEY` (its PKG.minisig is accepted as well)",
        path.display()
    )]
    BadSecretKey { path: PathBuf, detail: String },
    /// Signing failed inside minisign (random numbers, self-check).
    #[error("signing {} failed: {detail}", path.display())]
    Sign { path: PathBuf, detail: String },
    /// A signature that is not in minisign's format.
    #[error(
        "signature {index} is not a minisign signature ({detail}); sign the package with `patchctl package sign` \
         or `minisign -S`"
    )]
    Malformed { index: usize, detail: String },
    /// More signatures than [`MAX_SIGNATURES`].
    #[error(
        "{count} signatures came with the package, over the limit of {limit}; keep only the signatures of the \
         trusted keys beside the package"
    )]
    TooMany { count: usize, limit: usize },
    /// A legacy (non-prehashed) minisign signature.
    #[error(
        "signature {index} (key {key}) is a legacy minisign signature, which is refused; sign again with \
         `patchctl package sign` or a current `minisign -S`"
    )]
    Legacy { index: usize, key: KeyId },
    /// The package came without any signature while keys are trusted.
    #[error(
        "the package is not signed, and this agent accepts only packages signed by {}: sign it with \
         `patchctl package sign PKG --key <secret key>` and keep PKG.minisig beside the package",
        trusted_list(trusted)
    )]
    Unsigned { trusted: Vec<KeyId> },
    /// No signature is by a trusted key.
    #[error(
        "the package is signed by {} but this agent trusts only {}: sign it with a trusted key, or add the key \
         to [trust] keys in the agent's patchd.toml",
        key_list(signed_by),
        trusted_list(trusted)
    )]
    UntrustedKey {
        signed_by: Vec<KeyId>,
        trusted: Vec<KeyId>,
    },
    /// A signature by a trusted key that does not match the bytes: the package changed after signing.
    #[error(
        "the signature by trusted key {key} does not match the package: its bytes changed after it was signed \
         (or the signature belongs to another file); rebuild or fetch the package again and sign it anew"
    )]
    Mismatch { key: KeyId },
    /// Fewer valid signatures by distinct trusted keys than the threshold.
    #[error(
        "the package carries valid signatures by {} of the {threshold} trusted key(s) this agent requires{}: \
         add signatures by other trusted keys as PKG.<name>.minisig beside the package",
        valid.len(),
        if valid.is_empty() { String::new() } else { format!(" ({})", key_list(valid)) }
    )]
    BelowThreshold { valid: Vec<KeyId>, threshold: usize },
}

fn key_list(keys: &[KeyId]) -> String {
    let names: Vec<String> = keys.iter().map(|key| format!("key {key}")).collect();
    names.join(", ")
}

fn trusted_list(keys: &[KeyId]) -> String {
    if keys.is_empty() {
        "no key".to_string()
    } else {
        key_list(keys)
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SignatureError {
    let path = path.to_path_buf();
    move |cause| SignatureError::Io {
        action,
        path,
        cause,
    }
}

/// A new key pair as the text of minisign's two key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKeys {
    /// The key id both files carry.
    pub key_id: KeyId,
    /// The `RW…` base64 public key (the line `[trust] keys` takes).
    pub public_key: String,
    /// The `.pub` file: an untrusted comment line naming the key id, then the base64 key.
    pub public_file: String,
    /// The secret key file (unencrypted): keep it off the controller host, mode 0600.
    pub secret_file: String,
}

/// Generates an ed25519 key pair in minisign's format.
pub fn generate_keys() -> Result<GeneratedKeys, SignatureError> {
    let failed = |error: minisign::PError| SignatureError::Sign {
        path: PathBuf::from("(new key)"),
        detail: error.to_string(),
    };
    let pair = minisign::KeyPair::generate_unencrypted_keypair().map_err(failed)?;
    let key_id = KeyId::from_slice(pair.pk.keynum()).ok_or_else(|| SignatureError::Sign {
        path: PathBuf::from("(new key)"),
        detail: "minisign returned a key id that is not 8 bytes".to_string(),
    })?;
    let public_key = pair.pk.to_base64();
    let public_file = format!("untrusted comment: minisign public key {key_id}\n{public_key}\n");
    let secret_file = pair
        .sk
        .to_box(Some(&format!("minisign secret key {key_id} (unencrypted)")))
        .map_err(failed)?
        .into_string();
    Ok(GeneratedKeys {
        key_id,
        public_key,
        public_file,
        secret_file,
    })
}

/// A signature made by [`sign_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The key that signed.
    pub key_id: KeyId,
    /// The text of the `.minisig` file.
    pub text: String,
}

/// Signs the bytes of `package` with the unencrypted minisign secret key in `secret_key_file`. The trusted comment
/// names the file and the time, as `minisign -S` writes it.
pub fn sign_file(package: &Path, secret_key_file: &Path) -> Result<Signed, SignatureError> {
    let text =
        std::fs::read_to_string(secret_key_file).map_err(io_error("read", secret_key_file))?;
    let bad_key = |detail: String| SignatureError::BadSecretKey {
        path: secret_key_file.to_path_buf(),
        detail,
    };
    let secret = minisign::SecretKeyBox::from_string(&text)
        .and_then(minisign::SecretKeyBox::into_unencrypted_secret_key)
        .map_err(|error| bad_key(error.to_string()))?;
    let public = minisign::PublicKey::from_secret_key(&secret)
        .map_err(|error| bad_key(error.to_string()))?;
    let key_id = KeyId::from_slice(public.keynum())
        .ok_or_else(|| bad_key("its key id is not 8 bytes".to_string()))?;
    let file = std::fs::File::open(package).map_err(io_error("open", package))?;
    let name = package
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default();
    let trusted = format!("timestamp:{seconds}\tfile:{name}\thashed");
    let untrusted = format!("signature from minisign secret key {key_id}");
    let signature = minisign::sign(
        Some(&public),
        &secret,
        std::io::BufReader::with_capacity(1 << 20, file),
        Some(&trusted),
        Some(&untrusted),
    )
    .map_err(|error| SignatureError::Sign {
        path: package.to_path_buf(),
        detail: error.to_string(),
    })?;
    Ok(Signed {
        key_id,
        text: signature.into_string(),
    })
}

/// The signature files beside `package`: `<package>.minisig` first, then `<package>.<name>.minisig` in name order.
pub fn signature_files(package: &Path) -> Result<Vec<PathBuf>, SignatureError> {
    let Some(name) = package
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Ok(Vec::new());
    };
    let dir = match package.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let primary = format!("{name}{SIGNATURE_SUFFIX}");
    let extra_prefix = format!("{name}.");
    let mut extra = BTreeSet::new();
    let mut found_primary = false;
    for entry in std::fs::read_dir(&dir).map_err(io_error("list", &dir))? {
        let entry = entry.map_err(io_error("list", &dir))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name == primary {
            found_primary = true;
        } else if file_name.starts_with(&extra_prefix) && file_name.ends_with(SIGNATURE_SUFFIX) {
            extra.insert(file_name);
        }
    }
    let mut files = Vec::new();
    if found_primary {
        files.push(dir.join(primary));
    }
    files.extend(extra.into_iter().map(|file| dir.join(file)));
    Ok(files)
}

/// Reads the signature files beside `package` (see [`signature_files`]).
pub fn read_signatures(package: &Path) -> Result<Vec<String>, SignatureError> {
    signature_files(package)?
        .iter()
        .map(|path| {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|file| file.take(MAX_SIGNATURE_BYTES).read_to_string(&mut text))
                .map_err(io_error("read signature", path))?;
            Ok(text)
        })
        .collect()
}

/// The key id a signature text names, `None` when it is not a minisign signature.
pub fn signature_key_id(text: &str) -> Option<KeyId> {
    let signature = minisign::SignatureBox::from_string(text).ok()?;
    KeyId::from_slice(signature.keynum())
}

/// A minisign public key: the `RW…` base64 line, or the text of a `.pub` file (comment line, then the key).
#[derive(Clone)]
pub struct TrustedKey {
    id: KeyId,
    key: minisign::PublicKey,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({})", self.id)
    }
}

impl TrustedKey {
    /// Parses a base64 key or the text of a minisign `.pub` file.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with("untrusted comment:"))
            .unwrap_or_default();
        let bad = |detail: String| SignatureError::BadPublicKey {
            key: text.trim().chars().take(80).collect(),
            detail,
        };
        let key = minisign::PublicKey::from_base64(line).map_err(|error| bad(error.to_string()))?;
        let id = KeyId::from_slice(key.keynum())
            .ok_or_else(|| bad("its key id is not 8 bytes".to_string()))?;
        Ok(Self { id, key })
    }

    /// The key id.
    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// The keys an agent trusts and how many of them must have signed a package (k of n).
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    keys: Vec<TrustedKey>,
    threshold: usize,
}

impl TrustPolicy {
    /// A policy; `threshold` is clamped to at least 1 (callers check it against the number of keys).
    pub fn new(keys: Vec<TrustedKey>, threshold: usize) -> Self {
        Self {
            keys,
            threshold: threshold.max(1),
        }
    }

    /// True when at least one key is trusted, so packages must be signed.
    pub fn is_enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The trusted key ids.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(TrustedKey::id).collect()
    }

    /// Checks `signatures` (texts of `.minisig` files) against the bytes of `package`; returns the trusted keys whose
    /// signatures verified. A trusted key's first signature must verify (later ones by the same key are skipped);
    /// signatures by other keys are ignored as long as enough trusted ones are valid. A policy with no key accepts
    /// anything (and returns no key).
    pub fn verify_file(
        &self,
        package: &Path,
        signatures: &[String],
    ) -> Result<Vec<KeyId>, SignatureError> {
        if !self.is_enforced() {
            return Ok(Vec::new());
        }
        if signatures.iter().all(|text| text.trim().is_empty()) {
            return Err(SignatureError::Unsigned {
                trusted: self.key_ids(),
            });
        }
        if signatures.len() > MAX_SIGNATURES {
            return Err(SignatureError::TooMany {
                count: signatures.len(),
                limit: MAX_SIGNATURES,
            });
        }
        let mut valid = BTreeSet::new();
        let mut untrusted = BTreeSet::new();
        for (index, text) in signatures.iter().enumerate() {
            let index = index + 1;
            let signature = minisign::SignatureBox::from_string(text).map_err(|error| {
                SignatureError::Malformed {
                    index,
                    detail: error.to_string(),
                }
            })?;
            let id =
                KeyId::from_slice(signature.keynum()).ok_or_else(|| SignatureError::Malformed {
                    index,
                    detail: "the key id is not 8 bytes".to_string(),
                })?;
            let Some(trusted) = self.keys.iter().find(|key| key.id == id) else {
                untrusted.insert(id);
                continue;
            };
            if valid.contains(&id) {
                // A second signature by a key already counted adds nothing: not worth reading the package again.
                continue;
            }
            if !signature.is_prehashed() {
                return Err(SignatureError::Legacy { index, key: id });
            }
            let file = std::fs::File::open(package).map_err(io_error("open", package))?;
            let reader = std::io::BufReader::with_capacity(1 << 20, file);
            minisign::verify(&trusted.key, &signature, reader, true, false, false).map_err(
                |error| match error.kind() {
                    minisign::ErrorKind::Io => SignatureError::Io {
                        action: "read",
                        path: package.to_path_buf(),
                        cause: std::io::Error::other(error.to_string()),
                    },
                    _ => SignatureError::Mismatch { key: id },
                },
            )?;
            valid.insert(id);
        }
        if valid.is_empty() {
            return Err(SignatureError::UntrustedKey {
                signed_by: untrusted.into_iter().collect(),
                trusted: self.key_ids(),
            });
        }
        if valid.len() < self.threshold {
            return Err(SignatureError::BelowThreshold {
                valid: valid.into_iter().collect(),
                threshold: self.threshold,
            });
        }
        Ok(valid.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Signer {
        keys: GeneratedKeys,
        secret: PathBuf,
    }

    fn signer(dir: &Path, name: &str) -> Signer {
        let keys = generate_keys().unwrap();
        let secret = dir.join(format!("{name}.key"));
        std::fs::write(&secret, &keys.secret_file).unwrap();
        Signer { keys, secret }
    }

    fn policy(signers: &[&Signer], threshold: usize) -> TrustPolicy {
        TrustPolicy::new(
            signers
                .iter()
                .map(|s| TrustedKey::parse(&s.keys.public_key).unwrap())
                .collect(),
            threshold,
        )
    }

    #[test]
    fn a_signature_verifies_only_for_its_key_and_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let package = dir.path().join("p.tar.gz");
        std::fs::write(&package, b"package bytes").unwrap();
        let a = signer(dir.path(), "a");
        let b = signer(dir.path(), "b");
        let signed = sign_file(&package, &a.secret).unwrap();
        assert_eq!(signed.key_id, a.keys.key_id);
        let by_a = signed.text;
        let by_b = sign_file(&package, &b.secret).unwrap().text;
        assert!(by_a.contains("file:p.tar.gz"), "{by_a}");
        assert_eq!(signature_key_id(&by_a), Some(a.keys.key_id));
        assert_eq!(signature_key_id("junk"), None);

        let trust_a = policy(&[&a], 1);
        assert_eq!(
            trust_a
                .verify_file(&package, std::slice::from_ref(&by_a))
                .unwrap(),
            vec![a.keys.key_id]
        );
        // An extra signature by an unknown key does not hurt.
        assert!(
            trust_a
                .verify_file(&package, &[by_b.clone(), by_a.clone()])
                .is_ok()
        );
        let err = trust_a.verify_file(&package, &[by_b]).unwrap_err();
        assert!(
            matches!(&err, SignatureError::UntrustedKey { signed_by, .. } if signed_by == &[b.keys.key_id])
        );
        assert!(
            err.to_string().contains(&b.keys.key_id.to_string()),
            "{err}"
        );
        assert!(matches!(
            trust_a.verify_file(&package, &[]),
            Err(SignatureError::Unsigned { .. })
        ));

        std::fs::write(&package, b"package bytez").unwrap();
        let err = trust_a.verify_file(&package, &[by_a]).unwrap_err();
        assert!(matches!(err, SignatureError::Mismatch { key } if key == a.keys.key_id));

        assert!(matches!(
            trust_a.verify_file(&package, &["not a signature".to_string()]),
            Err(SignatureError::Malformed { index: 1, .. })
        ));
        assert!(matches!(
            trust_a.verify_file(&package, &vec![String::from("x"); MAX_SIGNATURES + 1]),
            Err(SignatureError::TooMany { .. })
        ));
        // No key: nothing enforced.
        assert!(
            TrustPolicy::new(Vec::new(), 1)
                .verify_file(&package, &[])
                .is_ok()
        );
    }

    #[test]
    fn a_threshold_counts_distinct_trusted_keys() {
        let dir = tempfile::tempdir().unwrap();
        let package = dir.path().join("p.tar.gz");
        std::fs::write(&package, b"bytes").unwrap();
        let a = signer(dir.path(), "a");
        let b = signer(dir.path(), "b");
        let by_a = sign_file(&package, &a.secret).unwrap().text;
        let by_b = sign_file(&package, &b.secret).unwrap().text;
        let two_of_two = policy(&[&a, &b], 2);
        assert!(matches!(
            two_of_two.verify_file(&package, &[by_a.clone(), by_a.clone()]),
            Err(SignatureError::BelowThreshold { threshold: 2, .. })
        ));
        assert_eq!(
            two_of_two
                .verify_file(&package, &[by_a, by_b])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn keys_parse_from_the_base64_line_or_the_pub_file() {
        let keys = generate_keys().unwrap();
        assert!(keys.public_key.starts_with("RW"));
        let from_line = TrustedKey::parse(&keys.public_key).unwrap();
        let from_file = TrustedKey::parse(&keys.public_file).unwrap();
        assert_eq!(from_line.id(), keys.key_id);
        assert_eq!(from_file.id(), keys.key_id);
        assert!(keys.public_file.contains(&keys.key_id.to_string()));
        assert!(matches!(
            TrustedKey::parse("RWnot-a-key"),
            Err(SignatureError::BadPublicKey { .. })
        ));
    }

    #[test]
    fn signature_files_are_found_beside_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let package = dir.path().join("p.tar.gz");
        for name in [
            "p.tar.gz",
            "p.tar.gz.minisig",
            "p.tar.gz.ops.minisig",
            "p.tar.gz.a.minisig",
            "q.tar.gz.minisig",
            "p.tar.gz.sig",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let names: Vec<String> = signature_files(&package)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "p.tar.gz.minisig",
                "p.tar.gz.a.minisig",
                "p.tar.gz.ops.minisig"
            ]
        );
    }
}
