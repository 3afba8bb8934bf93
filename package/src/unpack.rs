//! Verified unpack into a private directory (what the agent stages with), from a package file or from any reader of
//! known length (the agent's upload, as it arrives), and re-verification of an unpacked tree (every file hashed, or
//! only those the caller cannot vouch for).
//!
//! tar's own unpack is not used: every file is created here with `O_EXCL` (never through an existing path or
//! symlink), directories one component at a time, and symlinks only at the very end, after every check passed,
//! so no write can be steered outside the destination. On any error the destination is emptied again.

use crate::direct_write::DirectWriter;
use crate::manifest::Manifest;
use crate::walk::{RAW_BUF_BYTES, RawDigests, Sink, open_package, walk_reader};
use crate::{Expectations, Limits, PackageError, settle_manifest};
use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Unpacks `package` into `dest` and verifies every file against the manifest; returns the manifest.
///
/// `dest` must not exist (it is created with mode 0700; its parent must exist) or be an empty directory.
/// Every entry is checked against the hostile-package rules and `expect` before it is written; files get
/// their manifest mode and are fsynced, as are the directories. The manifest itself is not written into
/// `dest`: the tree holds exactly the package's files. On error nothing is left in `dest`.
///
/// Each byte is read, inflated, hashed and written once: the raw `.tar.gz` is not hashed (its identity is the
/// caller's to know, as the agent's blob cache does); damage to it still fails here, through gzip's CRC-32 over the
/// whole tar stream and each file's digest against the manifest.
pub fn unpack_verified(
    package: &Path,
    dest: &Path,
    limits: &Limits,
    expect: &Expectations,
) -> Result<Manifest, PackageError> {
    let (file, size) = open_package(package)?;
    let mut reader = std::io::BufReader::with_capacity(RAW_BUF_BYTES, file);
    unpack_verified_from(&mut reader, size, package, dest, limits, expect)
}

/// [`unpack_verified`] of the `size` bytes `source` yields: the same walk, rules and writes, for a package that is
/// not a file (yet). The decoder reads `source`'s buffer in place (the agent's verified chunks, not a copy). `package` names it in errors, and its file name gives the version of a package without a
/// manifest, exactly as when the same bytes are unpacked from a file of that name.
pub fn unpack_verified_from(
    source: &mut dyn BufRead,
    size: u64,
    package: &Path,
    dest: &Path,
    limits: &Limits,
    expect: &Expectations,
) -> Result<Manifest, PackageError> {
    let created = prepare_destination(dest)?;
    let result = unpack_into(source, size, package, dest, limits, expect);
    if result.is_err() {
        clear_destination(dest, created);
    }
    result
}

fn unpack_into(
    source: &mut dyn BufRead,
    size: u64,
    package: &Path,
    dest: &Path,
    limits: &Limits,
    expect: &Expectations,
) -> Result<Manifest, PackageError> {
    let mut sink = DiskSink::new(dest);
    let walked = walk_reader(
        source,
        size,
        package,
        limits,
        expect,
        RawDigests::Skip,
        &mut sink,
    )?;
    let (manifest, _) = settle_manifest(&walked, package, expect)?;
    for link in &manifest.symlinks {
        let at = dest.join(&link.path);
        if let Some(parent) = Path::new(&link.path).parent() {
            sink.ensure_dir(&parent.to_string_lossy())?;
        }
        std::os::unix::fs::symlink(&link.target, &at)
            .map_err(|e| PackageError::io("cannot create symlink", &at, e))?;
    }
    sink.sync_dirs()?;
    Ok(manifest)
}

/// Makes sure `dest` is a fresh or empty real directory with mode 0700; true when it was created here.
fn prepare_destination(dest: &Path) -> Result<bool, PackageError> {
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .map_err(|e| PackageError::io("cannot create unpack directory", dest, e))?;
            Ok(true)
        }
        Err(e) => Err(PackageError::io("cannot stat unpack directory", dest, e)),
        Ok(meta) if meta.is_dir() => {
            let mut listing = fs::read_dir(dest)
                .map_err(|e| PackageError::io("cannot list unpack directory", dest, e))?;
            if listing.next().is_some() {
                return Err(PackageError::DestinationNotEmpty {
                    path: dest.to_owned(),
                });
            }
            fs::set_permissions(dest, fs::Permissions::from_mode(0o700))
                .map_err(|e| PackageError::io("cannot restrict unpack directory", dest, e))?;
            Ok(false)
        }
        Ok(_) => Err(PackageError::DestinationNotEmpty {
            path: dest.to_owned(),
        }),
    }
}

/// Best effort: a failed unpack leaves no half-written tree behind.
fn clear_destination(dest: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(dest);
        return;
    }
    if let Ok(listing) = fs::read_dir(dest) {
        for entry in listing.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let _ = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

/// Writes entries under `root`, creating everything itself.
struct DiskSink<'a> {
    root: &'a Path,
    dirs: HashSet<String>,
    current: Option<(DirectWriter, PathBuf, u32)>,
}

impl<'a> DiskSink<'a> {
    fn new(root: &'a Path) -> Self {
        Self {
            root,
            dirs: HashSet::new(),
            current: None,
        }
    }

    /// Creates `rel` and its missing ancestors, one component at a time, refusing anything that is not a real
    /// directory on the way (the walker already guarantees none is a file or link; this is the second lock).
    fn ensure_dir(&mut self, rel: &str) -> Result<(), PackageError> {
        if rel.is_empty() || self.dirs.contains(rel) {
            return Ok(());
        }
        let mut sofar = String::new();
        for part in rel.split('/') {
            if !sofar.is_empty() {
                sofar.push('/');
            }
            sofar.push_str(part);
            if self.dirs.contains(&sofar) {
                continue;
            }
            let at = self.root.join(&sofar);
            match DirBuilder::new().mode(0o755).create(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let meta = fs::symlink_metadata(&at)
                        .map_err(|e| PackageError::io("cannot stat", &at, e))?;
                    if !meta.is_dir() {
                        return Err(PackageError::io(
                            "refusing to write through",
                            &at,
                            io::Error::other("exists and is not a directory"),
                        ));
                    }
                }
                Err(e) => return Err(PackageError::io("cannot create directory", &at, e)),
            }
            self.dirs.insert(sofar.clone());
        }
        Ok(())
    }

    /// `create_new` is `O_CREAT|O_EXCL`: it never follows or reuses an existing path, symlinks included.
    fn create_file(&mut self, rel: &str) -> Result<(File, PathBuf), PackageError> {
        if let Some(parent) = Path::new(rel).parent() {
            self.ensure_dir(&parent.to_string_lossy())?;
        }
        let at = self.root.join(rel);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&at)
            .map_err(|e| PackageError::io("cannot create file", &at, e))?;
        Ok((file, at))
    }

    fn sync_dirs(&self) -> Result<(), PackageError> {
        let mut dirs: Vec<&String> = self.dirs.iter().collect();
        // Deepest first, then the root, so each directory's entry is durable in its parent.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
        for rel in dirs {
            sync_dir(&self.root.join(rel))?;
        }
        sync_dir(self.root)
    }
}

fn finish_file(file: &File, at: &Path, mode: u32) -> Result<(), PackageError> {
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| PackageError::io("cannot set mode of", at, e))?;
    file.sync_all()
        .map_err(|e| PackageError::io("cannot fsync", at, e))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), PackageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PackageError::io("cannot fsync directory", dir, e))
}

impl Sink for DiskSink<'_> {
    fn directory(&mut self, path: &str) -> Result<(), PackageError> {
        self.ensure_dir(path)
    }

    fn file_begin(&mut self, path: &str, mode: u32) -> Result<(), PackageError> {
        let (file, at) = self.create_file(path)?;
        self.current = Some((DirectWriter::new(file), at, mode));
        Ok(())
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), PackageError> {
        match &mut self.current {
            Some((file, at, _)) => file
                .write_all(at, data)
                .map_err(|e| PackageError::io("cannot write", at.as_path(), e)),
            None => Ok(()),
        }
    }

    fn file_end(&mut self) -> Result<(), PackageError> {
        match self.current.take() {
            Some((writer, at, mode)) => {
                let file = writer
                    .finish(&at)
                    .map_err(|e| PackageError::io("cannot write", &at, e))?;
                finish_file(&file, &at, mode)
            }
            None => Ok(()),
        }
    }

    fn hard_link(&mut self, path: &str, target: &str, mode: u32) -> Result<(), PackageError> {
        let from = self.root.join(target);
        let mut source =
            File::open(&from).map_err(|e| PackageError::io("cannot open", &from, e))?;
        let (mut file, at) = self.create_file(path)?;
        io::copy(&mut source, &mut file)
            .map_err(|e| PackageError::io("cannot copy into", &at, e))?;
        finish_file(&file, &at, mode)
    }
}

/// Re-reads an unpacked tree and checks it holds exactly the manifest's files (content, size, mode) and
/// symlinks: what the agent runs before trusting a staging directory it finds from an earlier run.
pub fn verify_tree(root: &Path, manifest: &Manifest) -> Result<(), PackageError> {
    verify_tree_trusting(root, manifest, |_, _| false)
}

/// [`verify_tree`], except that the content of a regular file is not read when `unchanged(path, lstat)` holds
/// for it (`path` as in the manifest, after its type, size and mode matched): the caller vouches that the file is
/// still the one it verified earlier (the agent's record of each staged file's identity). Everything else is
/// checked as [`verify_tree`] does, so a file the caller cannot vouch for is hashed as always.
pub fn verify_tree_trusting(
    root: &Path,
    manifest: &Manifest,
    unchanged: impl Fn(&str, &fs::Metadata) -> bool,
) -> Result<(), PackageError> {
    let mismatch = |path: &Path, detail: String| PackageError::TreeMismatch {
        path: path.to_owned(),
        detail,
    };
    let mut expected: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; 256 * 1024];
    for entry in &manifest.files {
        let at = root.join(&entry.path);
        expected.insert(entry.path.clone());
        let meta =
            fs::symlink_metadata(&at).map_err(|e| mismatch(&at, format!("cannot stat: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(mismatch(&at, "is not a regular file".to_owned()));
        }
        if meta.len() != entry.size {
            return Err(mismatch(
                &at,
                format!(
                    "size is {} but the manifest says {}",
                    meta.len(),
                    entry.size
                ),
            ));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode != entry.mode {
            return Err(mismatch(
                &at,
                format!(
                    "mode is {mode:04o} but the manifest says {:04o}",
                    entry.mode
                ),
            ));
        }
        if unchanged(&entry.path, &meta) {
            continue;
        }
        let mut file = File::open(&at).map_err(|e| mismatch(&at, format!("cannot open: {e}")))?;
        let mut hash = manifest.content_algorithm().hasher();
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| mismatch(&at, format!("cannot read: {e}")))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        let digest = hash.finish();
        if digest != entry.digest {
            return Err(mismatch(
                &at,
                format!("digest is {digest} but the manifest says {}", entry.digest),
            ));
        }
    }
    for link in &manifest.symlinks {
        let at = root.join(&link.path);
        expected.insert(link.path.clone());
        let target =
            fs::read_link(&at).map_err(|e| mismatch(&at, format!("is not a symlink: {e}")))?;
        if target != Path::new(&link.target) {
            return Err(mismatch(
                &at,
                format!(
                    "points to {} but the manifest says {}",
                    target.display(),
                    link.target
                ),
            ));
        }
    }
    // Nothing besides directories may be there that the manifest does not list.
    let mut stack = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let listing =
            fs::read_dir(&dir).map_err(|e| mismatch(&dir, format!("cannot list: {e}")))?;
        for item in listing {
            let item = item.map_err(|e| mismatch(&dir, format!("cannot list: {e}")))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let file_type = item
                .file_type()
                .map_err(|e| mismatch(&item.path(), format!("cannot stat: {e}")))?;
            if file_type.is_dir() {
                stack.push((item.path(), child_rel));
            } else if !expected.contains(&child_rel) {
                return Err(mismatch(
                    &item.path(),
                    "is not listed in the manifest".to_owned(),
                ));
            }
        }
    }
    Ok(())
}
