//! The tree digest that names a package on the wire and in every cache: one hash pass per byte on each side.
//!
//! Version 2, what every digest is made with now:
//! `tree = BLAKE3("patchd-tree-v2\0" || be64(chunk_size) || be64(total_len) || BLAKE3(chunk_0) || ... || BLAKE3(chunk_n-1))`
//!
//! Version 1, still read and verified (an agent accepts it from a patchctl older than version 2, and a blob cached
//! under a version-1 digest still stages): the same shape with sha256 and the tag `patchd-tree-v1\0`.
//!
//! Why version 2: the sender hashes every byte it pushes and every agent hashes every byte it receives, and on
//! these hosts sha256 runs at 1.0–1.9 GB/s on one core against BLAKE3's 5 GB/s (BENCHMARKS.md), so with sha256
//! the chunk hash alone cost an agent about half of its CPU per GB received. Both are 256-bit hashes with no known
//! weakness. The per-file digests in a package's manifest are BLAKE3 too since manifest format 2 (`content.rs`).
//!
//! Every byte is hashed exactly once (inside its chunk's hash); the root only hashes 32 bytes per chunk. Finding
//! two different files with the same tree digest requires a collision either at the root or in one chunk (the
//! root input fixes the version's tag, the chunk size, the length and every chunk hash in order), so it is as
//! strong as the plain hash of the file. The tags keep the versions apart: a digest names one version's tree
//! only. A zero-length file has zero chunks.

use ring::digest::{Context, SHA256};
use std::io::Read;
use std::path::Path;

/// Default chunk size: 1 MiB keeps every gRPC message far below the 4 MiB default limit.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Largest chunk size allowed on the wire (the message limit is 8 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Smallest chunk size allowed (keeps the per-chunk overhead bounded).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;

/// A chunk size the wire accepts: a power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`]. The cache does not
/// record a blob's chunk size (the digest covers it), so keeping the set small lets the agent re-verify any blob.
pub fn is_valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

/// Which hash a tree digest is made with (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TreeVersion {
    /// sha256 chunks and root; read and verified, never made by this version.
    V1,
    /// BLAKE3 chunks and root.
    V2,
}

impl TreeVersion {
    /// The version every digest is made with.
    pub const CURRENT: TreeVersion = TreeVersion::V2;
    /// Every version a blob may be named with, the current one first.
    pub const ALL: [TreeVersion; 2] = [TreeVersion::V2, TreeVersion::V1];

    /// The version a wire number names (`BlobRef.tree_version`). 0 is what a sender from before versions
    /// sends (the field did not exist): it meant version 1. `None` for a number this build does not know.
    pub fn from_wire(number: u32) -> Option<Self> {
        match number {
            0 | 1 => Some(TreeVersion::V1),
            2 => Some(TreeVersion::V2),
            _ => None,
        }
    }

    /// The number that names this version on the wire.
    pub fn wire(self) -> u32 {
        match self {
            TreeVersion::V1 => 1,
            TreeVersion::V2 => 2,
        }
    }

    /// The hash of one chunk.
    pub fn chunk_hash(self, data: &[u8]) -> [u8; 32] {
        match self {
            TreeVersion::V1 => {
                let mut out = [0u8; 32];
                out.copy_from_slice(ring::digest::digest(&SHA256, data).as_ref());
                out
            }
            TreeVersion::V2 => *blake3::hash(data).as_bytes(),
        }
    }

    fn domain_tag(self) -> &'static [u8] {
        match self {
            TreeVersion::V1 => b"patchd-tree-v1\0",
            TreeVersion::V2 => b"patchd-tree-v2\0",
        }
    }

    /// The tree digest of a whole reader of `total_len` bytes, in this version. Reads `chunk_size` bytes at a time.
    pub fn tree_digest_reader<R: Read>(
        self,
        mut reader: R,
        chunk_size: u32,
        total_len: u64,
    ) -> std::io::Result<String> {
        let mut tree = TreeHasher::versioned(self, chunk_size, total_len);
        let mut buf = vec![0u8; chunk_size as usize];
        let mut seen = 0u64;
        loop {
            let n = read_full(&mut reader, &mut buf)?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            tree.push_chunk_hash(&self.chunk_hash(&buf[..n]));
            if n < buf.len() {
                break;
            }
        }
        if seen != total_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("expected {total_len} bytes, read {seen}"),
            ));
        }
        tree.finish()
            .ok_or_else(|| std::io::Error::other("chunk count does not match the length"))
    }

    /// The tree digest of a file on disk, in this version.
    pub fn tree_digest_file(self, path: &Path, chunk_size: u32) -> std::io::Result<String> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        self.tree_digest_reader(
            std::io::BufReader::with_capacity(chunk_size as usize, file),
            chunk_size,
            len,
        )
    }
}

/// The hash of one chunk, in the current version.
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    TreeVersion::CURRENT.chunk_hash(data)
}

/// One running sha256 or BLAKE3 hash (a chunk's, the root's, or a file's content digest).
#[derive(Clone)]
pub(crate) enum Hasher {
    // Both boxed: the states are about 0.2 KB (sha256) and 1.9 KB (BLAKE3), and the one in use is the only one kept.
    Sha256(Box<Context>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub(crate) fn new(version: TreeVersion) -> Self {
        match version {
            TreeVersion::V1 => Hasher::Sha256(Box::new(Context::new(&SHA256))),
            TreeVersion::V2 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(context) => context.update(data),
            Hasher::Blake3(hasher) => {
                hasher.update(data);
            }
        }
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(context) => {
                let mut out = [0u8; 32];
                out.copy_from_slice((*context).finish().as_ref());
                out
            }
            Hasher::Blake3(hasher) => *hasher.finalize().as_bytes(),
        }
    }
}

/// Number of chunks a blob of `total_len` bytes has at `chunk_size`.
pub fn chunk_count(total_len: u64, chunk_size: u32) -> u64 {
    total_len.div_ceil(u64::from(chunk_size.max(1)))
}

/// Builds the root of the tree digest incrementally from the chunk hashes, in order.
#[derive(Clone)]
pub struct TreeHasher {
    version: TreeVersion,
    root: Hasher,
    chunk_size: u32,
    total_len: u64,
    chunks: u64,
}

impl TreeHasher {
    /// Starts a root in the current version for a blob of known size and chunk size.
    pub fn new(chunk_size: u32, total_len: u64) -> Self {
        Self::versioned(TreeVersion::CURRENT, chunk_size, total_len)
    }

    /// Starts a root in `version`.
    pub fn versioned(version: TreeVersion, chunk_size: u32, total_len: u64) -> Self {
        let mut root = Hasher::new(version);
        root.update(version.domain_tag());
        root.update(&u64::from(chunk_size).to_be_bytes());
        root.update(&total_len.to_be_bytes());
        Self {
            version,
            root,
            chunk_size,
            total_len,
            chunks: 0,
        }
    }

    /// The version this root is made in.
    pub fn version(&self) -> TreeVersion {
        self.version
    }

    /// Adds the next chunk's hash (made in this root's version).
    pub fn push_chunk_hash(&mut self, chunk_hash: &[u8; 32]) {
        self.root.update(chunk_hash);
        self.chunks += 1;
    }

    /// Chunks pushed so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The hex root, or `None` if the number of chunks pushed does not match the announced size.
    pub fn finish(self) -> Option<String> {
        if self.chunks != chunk_count(self.total_len, self.chunk_size) {
            return None;
        }
        Some(hex::encode(self.root.finish()))
    }

    /// [`TreeHasher::finish`] as a [`TreeDigest`] (the hex of a 32-byte hash needs no further check).
    pub fn finish_digest(self) -> Option<TreeDigest> {
        self.finish().map(TreeDigest)
    }
}

/// Computes the tree digest (current version) of a stream whose total length is known up front, fed in pieces of
/// any size.
///
/// Lets a caller hash a file while it reads it for another purpose (for example while decompressing it), so
/// every byte is read from disk once.
#[derive(Clone)]
pub struct StreamingTreeDigest {
    tree: TreeHasher,
    chunk: Hasher,
    chunk_size: u64,
    in_chunk: u64,
    fed: u64,
}

impl StreamingTreeDigest {
    /// Starts a digest for a blob of `total_len` bytes split into `chunk_size` chunks.
    pub fn new(chunk_size: u32, total_len: u64) -> Self {
        let chunk_size = chunk_size.max(1);
        Self {
            tree: TreeHasher::new(chunk_size, total_len),
            chunk: Hasher::new(TreeVersion::CURRENT),
            chunk_size: u64::from(chunk_size),
            in_chunk: 0,
            fed: 0,
        }
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (self.chunk_size - self.in_chunk).min(data.len() as u64) as usize;
            self.chunk.update(&data[..room]);
            self.in_chunk += room as u64;
            self.fed += room as u64;
            data = &data[room..];
            if self.in_chunk == self.chunk_size {
                self.close_chunk();
            }
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.fed
    }

    /// True when nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.fed == 0
    }

    /// The hex root, or `None` if the bytes fed do not add up to the announced length.
    pub fn finish(mut self) -> Option<String> {
        if self.in_chunk > 0 {
            self.close_chunk();
        }
        if self.fed != self.tree.total_len {
            return None;
        }
        self.tree.finish()
    }

    fn close_chunk(&mut self) {
        let done = std::mem::replace(&mut self.chunk, Hasher::new(self.tree.version()));
        self.tree.push_chunk_hash(&done.finish());
        self.in_chunk = 0;
    }
}

/// The tree digest (current version) of a whole reader of `total_len` bytes.
pub fn tree_digest_reader<R: Read>(
    reader: R,
    chunk_size: u32,
    total_len: u64,
) -> std::io::Result<String> {
    TreeVersion::CURRENT.tree_digest_reader(reader, chunk_size, total_len)
}

/// The tree digest (current version) of a file on disk.
pub fn tree_digest_file(path: &Path, chunk_size: u32) -> std::io::Result<String> {
    TreeVersion::CURRENT.tree_digest_file(path, chunk_size)
}

/// Reads until `buf` is full or the reader is at its end; returns the bytes read.
pub fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A package's tree digest: 64 lower-case hex characters, checked once where it enters (a CLI argument, a
/// stored row, an agent reply) so later code never re-validates. Serialized as the plain string, so stored JSON
/// and SQLite columns read the same as before the type existed.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TreeDigest(String);

/// A string that is not a tree digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a tree digest: expected 64 lower-case hex characters (as `patchctl package inspect` prints)"
)]
pub struct InvalidTreeDigest(pub String);

impl TreeDigest {
    /// True when `text` has the shape of a tree digest.
    pub fn is_valid(text: &str) -> bool {
        text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// The digest as hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first `len` characters, for tables and progress lines that cannot print all 64.
    pub fn short(&self, len: usize) -> &str {
        self.0.get(..len).unwrap_or(&self.0)
    }

    /// The empty placeholder some records carry when no package is involved (a rollback's own row).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for TreeDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TreeDigest {
    type Err = InvalidTreeDigest;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::try_from(text.to_string())
    }
}

impl TryFrom<String> for TreeDigest {
    type Error = InvalidTreeDigest;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        if Self::is_valid(&text) {
            Ok(Self(text))
        } else {
            Err(InvalidTreeDigest(text))
        }
    }
}

impl From<TreeDigest> for String {
    fn from(digest: TreeDigest) -> Self {
        digest.0
    }
}

impl AsRef<str> for TreeDigest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for TreeDigest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TreeDigest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for TreeDigest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_digest_is_64_lower_case_hex_and_travels_as_a_plain_string() {
        let text = "0123456789abcdef".repeat(4);
        let digest: TreeDigest = text.parse().unwrap();
        assert_eq!(digest.to_string(), text);
        assert_eq!(digest.short(16), "0123456789abcdef");
        assert_eq!(
            serde_json::to_string(&digest).unwrap(),
            format!("\"{text}\"")
        );
        assert_eq!(
            serde_json::from_str::<TreeDigest>(&format!("\"{text}\"")).unwrap(),
            digest
        );
        for bad in [
            &text[..63],
            &text.to_uppercase(),
            &format!("{}g", &text[..63]),
            "",
        ] {
            let error = bad.parse::<TreeDigest>().unwrap_err();
            assert!(error.to_string().contains("64 lower-case hex"), "{error}");
            assert!(serde_json::from_str::<TreeDigest>(&format!("\"{bad}\"")).is_err());
        }
    }

    #[test]
    fn the_hasher_names_the_same_digest_as_text_and_as_tree_digest() {
        let data = vec![7u8; 10_000];
        let expected = tree_digest_reader(&data[..], MIN_CHUNK_SIZE, data.len() as u64).unwrap();
        let mut tree = TreeHasher::new(MIN_CHUNK_SIZE, data.len() as u64);
        for chunk in data.chunks(MIN_CHUNK_SIZE as usize) {
            tree.push_chunk_hash(&chunk_hash(chunk));
        }
        assert_eq!(tree.finish_digest().unwrap(), expected);
    }

    /// Known answers, computed apart from this code (Python's hashlib and the `blake3` package, from the formulas
    /// in the module's doc): version 1 must keep naming what older builds named, version 2 must be what it says.
    #[test]
    fn each_version_gives_its_known_answer() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let v1 = TreeVersion::V1
            .tree_digest_reader(&data[..], 4096, data.len() as u64)
            .unwrap();
        let v2 = TreeVersion::V2
            .tree_digest_reader(&data[..], 4096, data.len() as u64)
            .unwrap();
        assert_eq!(
            v1,
            "c26bbc1cdefbc20172ac9ad571bae24dfdad1d1507126ebea6d9002eacbccbe9"
        );
        assert_eq!(
            v2,
            "8370b62bf22c90608a80e79937b2ba1fc0de9ea7b3fcba12087e3c86cecb7ce0"
        );
        assert_eq!(
            tree_digest_reader(&data[..], 4096, data.len() as u64).unwrap(),
            v2,
            "new digests are version 2"
        );
        let mut streaming = StreamingTreeDigest::new(4096, data.len() as u64);
        streaming.update(&data);
        assert_eq!(streaming.finish().unwrap(), v2);
    }

    #[test]
    fn wire_numbers_name_versions_and_zero_is_the_sender_from_before_versions() {
        assert_eq!(TreeVersion::from_wire(0), Some(TreeVersion::V1));
        for version in TreeVersion::ALL {
            assert_eq!(TreeVersion::from_wire(version.wire()), Some(version));
        }
        assert_eq!(TreeVersion::from_wire(3), None);
        assert_eq!(TreeVersion::ALL[0], TreeVersion::CURRENT);
    }

    #[test]
    fn digest_depends_on_content_length_and_chunk_size() {
        let data = vec![7u8; 10_000];
        let a = tree_digest_reader(&data[..], 4096, 10_000).unwrap();
        let b = tree_digest_reader(&data[..], 8192, 10_000).unwrap();
        let mut other = data.clone();
        other[9_999] = 8;
        let c = tree_digest_reader(&other[..], 4096, 10_000).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, tree_digest_reader(&data[..], 4096, 10_000).unwrap());
    }

    #[test]
    fn wrong_length_is_an_error() {
        let data = vec![1u8; 5000];
        assert!(tree_digest_reader(&data[..], 4096, 6000).is_err());
        assert!(tree_digest_reader(&data[..], 4096, 4000).is_err());
    }

    #[test]
    fn empty_blob_has_a_digest() {
        assert!(tree_digest_reader(&[][..], 4096, 0).is_ok());
    }

    #[test]
    fn streaming_digest_matches_the_reader_digest_whatever_the_piece_sizes() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let expected = tree_digest_reader(&data[..], 4096, data.len() as u64).unwrap();
        for piece in [1usize, 7, 4096, 5000, 20_000] {
            let mut streaming = StreamingTreeDigest::new(4096, data.len() as u64);
            for part in data.chunks(piece) {
                streaming.update(part);
            }
            assert_eq!(
                streaming.finish().as_deref(),
                Some(expected.as_str()),
                "piece size {piece}"
            );
        }
        let mut short = StreamingTreeDigest::new(4096, 10);
        short.update(&[1, 2, 3]);
        assert!(short.finish().is_none());
        assert!(StreamingTreeDigest::new(4096, 0).finish().is_some());
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_in_range() {
        assert!(is_valid_chunk_size(DEFAULT_CHUNK_SIZE));
        assert!(is_valid_chunk_size(MIN_CHUNK_SIZE));
        assert!(is_valid_chunk_size(MAX_CHUNK_SIZE));
        assert!(!is_valid_chunk_size(MIN_CHUNK_SIZE / 2));
        assert!(!is_valid_chunk_size(MAX_CHUNK_SIZE * 2));
        assert!(!is_valid_chunk_size(1_000_000));
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(1, 4096), 1);
        assert_eq!(chunk_count(4096, 4096), 1);
        assert_eq!(chunk_count(4097, 4096), 2);
    }
}
