//! Free-space checks before the engine writes a lot at once: unpacking a package into staging (up to
//! `limits.max_unpacked_bytes`) and copying backups or temporaries across file systems. A check that fails
//! refuses the operation before its first byte is written, with the bytes needed and free.

use crate::fsutil::FsError;
use crate::journal::FileChange;
use patchd_package::manifest::MAX_MANIFEST_BYTES;
use patchd_package::{MANIFEST_FILE, Manifest};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Files take whole blocks: sizes are rounded up to this before they are added up.
const BLOCK_BYTES: u64 = 4096;

/// What a space check found.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "{what} needs {needed} bytes in {} but only {free} bytes are free there: free space on that file \
         system (unused blobs and staged packages are pruned once older than limits.cache_min_age), then retry",
        dir.display()
    )]
    NoSpace {
        what: String,
        needed: u64,
        free: u64,
        dir: PathBuf,
    },
    #[error("cannot measure the free space of {}: {source}", dir.display())]
    Statvfs {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read package {} to size it: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Bytes available to unprivileged writers on the file system holding `dir`.
// The statvfs field types are platform-dependent (32-bit on some targets): the conversions are not useless there.
#[allow(clippy::useless_conversion)]
pub fn free_bytes(dir: &Path) -> Result<u64, SpaceError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| SpaceError::Statvfs {
        dir: dir.to_path_buf(),
        source: std::io::Error::from(e),
    })?;
    Ok(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}

/// Refuses when `needed` bytes do not fit in the free space of `dir`'s file system.
pub fn ensure_fits(what: &str, needed: u64, dir: &Path) -> Result<(), SpaceError> {
    let free = free_bytes(dir)?;
    if needed > free {
        return Err(SpaceError::NoSpace {
            what: what.to_string(),
            needed,
            free,
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

fn on_disk(size: u64) -> u64 {
    size.div_ceil(BLOCK_BYTES).saturating_mul(BLOCK_BYTES)
}

/// Bytes the package at `path` unpacks to (regular files, rounded to blocks), read from its embedded manifest
/// when the archive starts with it (as `patchctl package build` writes it: only the first entry is read), else
/// from the sizes in the tar headers (one decompression pass, no data kept). The unpack itself checks every file
/// against the manifest, so a package that lies here is refused there.
pub fn unpacked_bytes(path: &Path) -> Result<u64, SpaceError> {
    let read_err = |source: std::io::Error| SpaceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut total = 0u64;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let size = entry.header().size().map_err(read_err)?;
        let name = entry.path().map_err(read_err)?.into_owned();
        let at_root_manifest = name.strip_prefix(".").unwrap_or(&name) == Path::new(MANIFEST_FILE);
        if at_root_manifest && size <= MAX_MANIFEST_BYTES {
            let mut text = Vec::new();
            entry
                .by_ref()
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut text)
                .map_err(read_err)?;
            // A manifest that does not parse is the unpack's to refuse, with its own message.
            if let Ok(manifest) = Manifest::from_json(&text) {
                return Ok(manifest
                    .files
                    .iter()
                    .map(|f| on_disk(f.size))
                    .fold(0, u64::saturating_add));
            }
        }
        if entry.header().entry_type().is_file() {
            total = total.saturating_add(on_disk(size));
        }
    }
    Ok(total)
}

/// Refuses to unpack `package` into `staging_root` when its files do not fit there.
pub fn ensure_unpack_fits(
    package: &Path,
    digest: &str,
    staging_root: &Path,
) -> Result<(), SpaceError> {
    let needed = unpacked_bytes(package)?;
    ensure_fits(&format!("unpacking package {digest}"), needed, staging_root)
}

/// The bytes each destination file system must take for the backups and temporaries of `files`, as
/// `fsutil::materialize_at` makes them: a hard link (no data) when it stays on its source's file system and the
/// source already has the owner it needs (a backup keeps its source's; a temporary takes the target's, or its
/// directory's for a new file), a copy otherwise. One entry per file system, with an existing directory on it.
pub fn copies_needed(files: &[FileChange]) -> Vec<(u64, PathBuf)> {
    let mut per_fs: BTreeMap<u64, (u64, PathBuf)> = BTreeMap::new();
    for change in files {
        // (from, to, whether `to` takes the target's owner rather than keeping its source's)
        let backup = change
            .backup
            .as_deref()
            .map(|backup| (change.target.as_path(), backup, false));
        let temp = change
            .source
            .as_deref()
            .map(|source| (source, change.temp.as_path(), true));
        for (from, to, owned_as_target) in backup.into_iter().chain(temp) {
            let Ok(meta) = std::fs::symlink_metadata(from) else {
                continue;
            };
            let Some(dest_dir) = to.ancestors().skip(1).find(|dir| dir.is_dir()) else {
                continue;
            };
            let (Some(source_dir), Ok(dest_meta)) = (from.parent(), std::fs::metadata(dest_dir))
            else {
                continue;
            };
            let same_owner = !owned_as_target || {
                let wanted = std::fs::symlink_metadata(&change.target).unwrap_or(dest_meta.clone());
                (wanted.uid(), wanted.gid()) == (meta.uid(), meta.gid())
            };
            let linked = same_owner
                && std::fs::metadata(source_dir).is_ok_and(|m| m.dev() == dest_meta.dev());
            if !meta.is_file() || linked {
                continue;
            }
            let entry = per_fs
                .entry(dest_meta.dev())
                .or_insert_with(|| (0, dest_dir.to_path_buf()));
            entry.0 = entry.0.saturating_add(on_disk(meta.len()));
        }
    }
    per_fs.into_values().collect()
}

/// Refuses, before an apply prepares anything, when the copies it would make (see [`copies_needed`]) do not fit
/// on their file system; the apply then fails with nothing changed.
pub fn ensure_copies_fit(files: &[FileChange]) -> Result<(), FsError> {
    for (needed, dir) in copies_needed(files) {
        ensure_fits(
            "copying backups and new files across file systems",
            needed,
            &dir,
        )
        .map_err(|e| FsError {
            op: "check free space in",
            path: dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, e.to_string()),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacked_size_comes_from_the_embedded_manifest_or_the_headers() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("demo")).unwrap();
        std::fs::write(tree.join("demo/demo"), vec![1u8; 10_000]).unwrap();
        std::fs::write(tree.join("demo/conf"), b"x").unwrap();

        // Without a manifest: the tar headers' sizes.
        let raw = dir.path().join("demo-v1.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&raw).unwrap(),
            flate2::Compression::fast(),
        );
        let mut builder = tar::Builder::new(gz);
        builder.append_dir_all("demo", tree.join("demo")).unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        // 10000 bytes take 3 blocks, 1 byte takes one.
        assert_eq!(unpacked_bytes(&raw).unwrap(), 4 * BLOCK_BYTES);

        let built = dir.path().join("built.tar.gz");
        let info = patchd_package::pack_dir(&tree.join("demo"), "v1", &built).unwrap();
        assert!(info.manifest_embedded);
        assert_eq!(unpacked_bytes(&built).unwrap(), 4 * BLOCK_BYTES);

        let err = ensure_fits("unpacking x", u64::MAX, dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("needs 18446744073709551615 bytes"),
            "{err}"
        );
        ensure_fits("unpacking x", 1, dir.path()).unwrap();
    }

    fn change(dir: &Path, target: &Path, source: &Path) -> FileChange {
        FileChange {
            rel: PathBuf::from("f"),
            target: target.to_path_buf(),
            source: Some(source.to_path_buf()),
            new_digest: None,
            mode: None,
            old_digest: None,
            backup: Some(dir.join("backups/set/0-f")),
            temp: target.with_file_name(".f.new"),
        }
    }

    #[test]
    fn only_copies_across_file_systems_count() {
        let dir = tempfile::tempdir().unwrap();
        let (target, source) = (dir.path().join("target"), dir.path().join("staged"));
        std::fs::write(&target, vec![1u8; 5000]).unwrap();
        std::fs::write(&source, vec![2u8; 100]).unwrap();
        // Everything on one file system: hard links, nothing to copy.
        assert!(copies_needed(&[change(dir.path(), &target, &source)]).is_empty());
        ensure_copies_fit(&[change(dir.path(), &target, &source)]).unwrap();

        // The staged file on another file system (a tmpfs, where /dev/shm is one): its copy counts, where
        // the temporary goes; the backup stays a link.
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("SKIPPED: no /dev/shm");
            return;
        };
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        if dev(other.path()) == dev(dir.path()) {
            eprintln!("SKIPPED: /dev/shm is on the temp dir's file system");
            return;
        }
        let far = other.path().join("staged");
        std::fs::write(&far, vec![3u8; 100]).unwrap();
        assert_eq!(
            copies_needed(&[change(dir.path(), &target, &far)]),
            vec![(BLOCK_BYTES, dir.path().to_path_buf())]
        );
    }

    #[test]
    fn a_new_file_that_needs_another_owner_is_a_copy_on_the_same_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let (target, source) = (dir.path().join("target"), dir.path().join("staged"));
        std::fs::write(&target, vec![1u8; 5000]).unwrap();
        std::fs::write(&source, vec![2u8; 100]).unwrap();
        // The deployed file belongs to the service user: its temporary is a copy owned as it (a link would
        // share the staged file's owner), so its blocks count; the backup keeps its owner and stays a link.
        std::os::unix::fs::chown(&target, Some(65534), Some(65534))
            .expect("chown needs root: run the tests as root (scripts/test.sh does)");
        assert_eq!(
            copies_needed(&[change(dir.path(), &target, &source)]),
            vec![(BLOCK_BYTES, dir.path().to_path_buf())]
        );
    }
}
