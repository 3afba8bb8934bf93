//! A file's content digest, as manifests, journals and caches record it: `blake3:<hex>` (manifest format 2, the
//! current one) or bare `<hex>` sha256 (manifest format 1, and every record written before format 2).
//!
//! BLAKE3 hashes file contents at about three times sha256's speed here, and the agent hashes every byte it
//! unpacks, so format 2 takes most of a stage's CPU away. A digest always says its own algorithm, so a record
//! written by an older patchd (bare sha256) is checked as sha256 and never against a BLAKE3 digest.

use crate::digest::{Hasher, TreeVersion};
use std::io::Read;

/// What a BLAKE3 content digest starts with.
pub const BLAKE3_PREFIX: &str = "blake3:";

/// The hash function behind a content digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentAlgorithm {
    /// sha256, written bare (`<64 hex>`): manifest format 1 and older records.
    Sha256,
    /// BLAKE3, written `blake3:<64 hex>`: manifest format 2.
    Blake3,
}

impl ContentAlgorithm {
    /// What new packages are built with.
    pub const CURRENT: ContentAlgorithm = ContentAlgorithm::Blake3;

    /// The algorithm a recorded digest was computed with (bare hex is sha256, as every older record is).
    pub fn of(digest: &str) -> ContentAlgorithm {
        if digest.starts_with(BLAKE3_PREFIX) {
            ContentAlgorithm::Blake3
        } else {
            ContentAlgorithm::Sha256
        }
    }

    /// The name operators know it by (`sha256sum`, `b3sum`).
    pub fn name(self) -> &'static str {
        match self {
            ContentAlgorithm::Sha256 => "sha256",
            ContentAlgorithm::Blake3 => "blake3",
        }
    }

    /// Whether `digest` is a digest of this algorithm, written as this module says (lowercase hex).
    pub fn is_well_formed(self, digest: &str) -> bool {
        let hex = match self {
            ContentAlgorithm::Sha256 => digest,
            ContentAlgorithm::Blake3 => match digest.strip_prefix(BLAKE3_PREFIX) {
                Some(hex) => hex,
                None => return false,
            },
        };
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    /// A running hash whose [`ContentHasher::finish`] is a digest of this algorithm.
    pub fn hasher(self) -> ContentHasher {
        let version = match self {
            ContentAlgorithm::Sha256 => TreeVersion::V1,
            ContentAlgorithm::Blake3 => TreeVersion::V2,
        };
        ContentHasher {
            algorithm: self,
            hasher: Hasher::new(version),
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> String {
        let mut hasher = self.hasher();
        hasher.update(data);
        hasher.finish()
    }

    /// The digest of everything `reader` yields.
    pub fn digest_reader(self, mut reader: impl Read) -> std::io::Result<String> {
        let mut hasher = self.hasher();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
        }
        Ok(hasher.finish())
    }
}

impl std::fmt::Display for ContentAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A content digest being computed.
#[derive(Clone)]
pub struct ContentHasher {
    algorithm: ContentAlgorithm,
    hasher: Hasher,
}

impl ContentHasher {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// The digest, written as its algorithm's records are (`blake3:<hex>` or bare sha256 hex).
    pub fn finish(self) -> String {
        let hex = hex::encode(self.hasher.finish());
        match self.algorithm {
            ContentAlgorithm::Sha256 => hex,
            ContentAlgorithm::Blake3 => format!("{BLAKE3_PREFIX}{hex}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers for "abc", from `sha256sum` and `b3sum`.
    #[test]
    fn digests_are_written_with_their_algorithm() {
        assert_eq!(
            ContentAlgorithm::Sha256.digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            ContentAlgorithm::Blake3.digest(b"abc"),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        let mut split = ContentAlgorithm::Blake3.hasher();
        split.update(b"a");
        split.update(b"bc");
        assert_eq!(split.finish(), ContentAlgorithm::Blake3.digest(b"abc"));
        assert_eq!(
            ContentAlgorithm::Blake3.digest_reader(&b"abc"[..]).unwrap(),
            ContentAlgorithm::Blake3.digest(b"abc")
        );
    }

    #[test]
    fn a_digest_names_its_algorithm_and_form() {
        let blake3 = ContentAlgorithm::Blake3.digest(b"x");
        let sha256 = ContentAlgorithm::Sha256.digest(b"x");
        assert_eq!(ContentAlgorithm::of(&blake3), ContentAlgorithm::Blake3);
        assert_eq!(ContentAlgorithm::of(&sha256), ContentAlgorithm::Sha256);
        assert!(ContentAlgorithm::Blake3.is_well_formed(&blake3));
        assert!(ContentAlgorithm::Sha256.is_well_formed(&sha256));
        assert!(!ContentAlgorithm::Blake3.is_well_formed(&sha256));
        assert!(!ContentAlgorithm::Sha256.is_well_formed(&blake3));
        assert!(!ContentAlgorithm::Sha256.is_well_formed(&sha256.to_uppercase()));
        assert!(!ContentAlgorithm::Blake3.is_well_formed("blake3:abc"));
    }
}
