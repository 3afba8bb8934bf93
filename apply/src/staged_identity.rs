//! The identities of a staged tree's files, recorded when stage has written and verified them, so that apply
//! can trust a staged file without hashing it again (ARCHITECTURE.md, glossary "stage").
//!
//! Why this is as strong as hashing: a staged file whose inode, size, mode, mtime and ctime are those recorded
//! right after stage verified it has not been written since (a write changes mtime and ctime; setting the mtime
//! back changes the ctime, which no process can set). A write in the same timestamp tick as the recorded one
//! would go unseen ("racily clean", as git calls it), so an identity is recorded only when the file system's
//! clock has moved past it: anything written later gets a later ctime. Anything doubtful (no record, a
//! mismatch, a hard link added since, which changes the ctime) means hashing the file as before.
//!
//! Stage uses the same record when it finds a package already staged ([`verify_staged`]): only the files whose
//! identity changed since are hashed against the manifest, so a tree staged during its upload is not read again.

use crate::fsutil::{DirHandle, FsError, IoContext, write_atomic};
use crate::layout::StateLayout;
use patchd_package::Manifest;
use std::collections::BTreeMap;
use std::path::Path;

/// Name of the record in `staging/<digest>/`.
pub const RECORD_FILE: &str = "identities.json";

/// How long stage waits at most for the file system's clock to move past the last file it wrote (a few
/// timestamp ticks; files it could not seal are simply not recorded).
const MAX_SEAL_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

pub use crate::fsutil::FileIdentity;

/// Package path (as in the manifest) → identity.
pub type Identities = BTreeMap<String, FileIdentity>;

fn lstat(path: &Path) -> Result<rustix::fs::Stat, FsError> {
    rustix::fs::lstat(path)
        .map_err(std::io::Error::from)
        .ctx("stat", path)
}

/// Records the identities of the regular files of a tree stage has just unpacked and verified into
/// `staged_dir/files` (the private temporary directory, before it is renamed into place: nothing else writes
/// there). Waits until the file system's clock has moved past every recorded ctime (see the module doc).
pub fn record(staged_dir: &Path, manifest: &Manifest) -> Result<(), FsError> {
    let files = staged_dir.join("files");
    let mut identities = Identities::new();
    for file in &manifest.files {
        let stat = lstat(&files.join(&file.path))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile {
            identities.insert(file.path.clone(), FileIdentity::of_stat(&stat));
        }
    }
    let newest = identities
        .values()
        .map(|id| id.ctime_ns.max(id.mtime_ns))
        .max();
    let probe = staged_dir.join(".clock");
    let started = std::time::Instant::now();
    let clock = loop {
        std::fs::write(&probe, b"").ctx("write", &probe)?;
        let now = FileIdentity::of_stat(&lstat(&probe)?).ctime_ns;
        std::fs::remove_file(&probe).ctx("remove", &probe)?;
        if newest.is_none_or(|newest| now > newest) || started.elapsed() >= MAX_SEAL_WAIT {
            break now;
        }
        // The clock is still in the tick of the last write: wait for the next one.
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    identities.retain(|_, id| id.ctime_ns.max(id.mtime_ns) < clock);
    let bytes = serde_json::to_vec(&identities).map_err(|e| FsError {
        op: "encode",
        path: staged_dir.join(RECORD_FILE),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&staged_dir.join(RECORD_FILE), &bytes)
}

/// The record of the staged dir `staged_rel` below the state dir; empty when there is none or it is unreadable
/// (every file is then hashed, as before records existed).
pub fn load(state: &DirHandle, staged_rel: &Path) -> Identities {
    let read = || -> Option<Identities> {
        let mut file = state.open_file(&staged_rel.join(RECORD_FILE)).ok()?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    read().unwrap_or_default()
}

/// Checks the staged tree of `digest` against its manifest as [`patchd_package::verify_tree`] does, except that a
/// regular file whose `lstat` identity equals the record is not read (see the module doc: it has not been written
/// since stage verified it). Without a record every file is hashed.
pub fn verify_staged(
    state_dir: &Path,
    digest: &str,
    manifest: &Manifest,
) -> Result<(), patchd_package::PackageError> {
    let staged_rel = Path::new(StateLayout::STAGING).join(digest);
    let recorded = DirHandle::open_trusted(state_dir)
        .map(|state| load(&state, &staged_rel))
        .unwrap_or_default();
    let files = state_dir.join(&staged_rel).join("files");
    patchd_package::verify_tree_trusting(&files, manifest, |path, meta| {
        recorded
            .get(path)
            .is_some_and(|id| *id == FileIdentity::of_metadata(meta))
    })
}

/// For a source below the state dir that is a staged file (`staging/<digest>/files/<package path>`), the staged
/// dir (relative to the state dir) and the package path.
pub fn staged_source(source_rel: &Path) -> Option<(std::path::PathBuf, String)> {
    let mut parts = source_rel.components();
    let staging = parts.next()?.as_os_str();
    let digest = parts.next()?.as_os_str();
    let files = parts.next()?.as_os_str();
    let package_path = parts.as_path();
    if staging != StateLayout::STAGING || files != "files" || package_path.as_os_str().is_empty() {
        return None;
    }
    let package_path = package_path.to_str()?.to_string();
    Some((Path::new(staging).join(digest), package_path))
}
