//! Build contexts for `FROM scratch` images: a binary and the shared libraries (and loader) `ldd` lists, at their
//! own paths, so an image needs no registry and no pull. [`scratch_context`] makes the uncompressed tar the
//! Engine API takes; [`scratch_files`] and [`scratch_dockerfile`] let a caller keep the context on disk, and
//! [`directory_context`] packs such a directory.

use crate::DockerError;
use std::path::{Path, PathBuf};

/// One file of an image's root file system: where it is on this host, and its absolute path in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchFile {
    pub host: PathBuf,
    pub inside: String,
}

/// `FROM scratch`, `COPY rootfs/ /`, and `entrypoint` (exec form).
pub fn scratch_dockerfile(entrypoint: &[&str]) -> String {
    let entrypoint = serde_json::Value::from(entrypoint.to_vec()).to_string();
    format!("FROM scratch\nCOPY rootfs/ /\nENTRYPOINT {entrypoint}\n")
}

/// The files of a root file system holding each `(host path, Some(path in the image))` (default `/<file name>`)
/// and the shared libraries each loads, each path once.
pub fn scratch_files(files: &[(&Path, Option<&str>)]) -> Result<Vec<ScratchFile>, DockerError> {
    let mut rootfs: Vec<ScratchFile> = Vec::new();
    let mut add = |host: PathBuf, inside: String| {
        if !rootfs.iter().any(|known| known.inside == inside) {
            rootfs.push(ScratchFile { host, inside });
        }
    };
    for (host, inside) in files {
        let inside = match inside {
            Some(inside) => (*inside).to_owned(),
            None => {
                let name = host.file_name().ok_or_else(|| DockerError::File {
                    action: "cannot put in an image",
                    path: host.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
                })?;
                format!("/{}", name.to_string_lossy())
            }
        };
        add(host.to_path_buf(), inside);
        for library in shared_libraries(host)? {
            let inside = library.to_string_lossy().into_owned();
            add(library, inside);
        }
    }
    Ok(rootfs)
}

/// A build context (uncompressed tar): [`scratch_dockerfile`] and `rootfs/` with [`scratch_files`].
pub fn scratch_context(
    files: &[(&Path, Option<&str>)],
    entrypoint: &[&str],
) -> Result<Vec<u8>, DockerError> {
    let rootfs = scratch_files(files)?;
    let dockerfile = scratch_dockerfile(entrypoint);
    let mut tar = context_builder();
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .map_err(|source| pack_error(Path::new("Dockerfile"), source))?;
    for file in &rootfs {
        let inside = format!("rootfs/{}", file.inside.trim_start_matches('/'));
        tar.append_path_with_name(&file.host, &inside)
            .map_err(|source| pack_error(&file.host, source))?;
    }
    tar.into_inner()
        .map_err(|source| pack_error(Path::new("Dockerfile"), source))
}

/// A build context directory (holding a `Dockerfile`) as the uncompressed tar the Engine API takes.
pub fn directory_context(dir: &Path) -> Result<Vec<u8>, DockerError> {
    let mut tar = context_builder();
    tar.append_dir_all(".", dir)
        .map_err(|source| pack_error(dir, source))?;
    tar.into_inner().map_err(|source| pack_error(dir, source))
}

/// A tar writer the engine's reader accepts: symlinks followed (a library's real file under the name the loader
/// asks for), and no GNU sparse entries (linker output has holes; the engine refuses type `S` headers).
fn context_builder() -> tar::Builder<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(true);
    tar.sparse(false);
    tar
}

fn pack_error(path: &Path, source: std::io::Error) -> DockerError {
    DockerError::File {
        action: "cannot add to the build context",
        path: path.to_owned(),
        source,
    }
}

/// The shared libraries (and the loader) `ldd` lists for `binary`; none for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, DockerError> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| DockerError::File {
            action: "cannot run ldd (install libc-bin) on",
            path: binary.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_holds_the_binary_its_libraries_and_a_scratch_dockerfile() {
        let binary = std::env::current_exe().unwrap();
        let context =
            scratch_context(&[(&binary, Some("/worker"))], &["/worker", "serve"]).unwrap();
        let mut names = Vec::new();
        let mut dockerfile = String::new();
        for entry in tar::Archive::new(context.as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            assert_ne!(entry.header().entry_type(), tar::EntryType::GNUSparse);
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name == "Dockerfile" {
                std::io::Read::read_to_string(&mut entry, &mut dockerfile).unwrap();
            }
            names.push(name);
        }
        assert_eq!(
            dockerfile,
            "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/worker\",\"serve\"]\n"
        );
        assert!(names.contains(&"rootfs/worker".to_owned()), "{names:?}");
        let libraries = shared_libraries(&binary).unwrap();
        assert!(!libraries.is_empty(), "a test binary links libc");
        for library in libraries {
            let inside = format!(
                "rootfs/{}",
                library.to_string_lossy().trim_start_matches('/')
            );
            assert!(names.contains(&inside), "{inside} missing from {names:?}");
        }
    }
}
