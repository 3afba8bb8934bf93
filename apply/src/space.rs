//! Free-space checks before the engine writes a lot at once: unpacking a package into staging (up to
//! `limits.max_unpacked_bytes`) and copying backups or temporaries across file systems. A check that fails
//! refuses the operation before its first byte is written, with the bytes needed and free.

use patchd_package::manifest::MAX_MANIFEST_BYTES;
use patchd_package::{MANIFEST_FILE, Manifest};
use std::io::Read;
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
}
