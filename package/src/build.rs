//! Building packages: a hotfix from a base package plus replacement files (`patchctl package build`), or a
//! package from a directory. Output is deterministic (sorted entries, fixed mtime, uid/gid 0, manifest first)
//! and written atomically (temporary file, fsync, rename).

use crate::content::ContentAlgorithm;
use crate::digest::read_full;
use crate::elf::{ELF_SNIFF_BYTES, detect_elf_target, target_label};
use crate::manifest::{FileEntry, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, SymlinkEntry};
use crate::paths::{ancestors, is_within, normalize_entry_path, resolve_symlink, similar_paths};
use crate::unpack::sync_dir;
use crate::{
    Expectations, Limits, PackageError, PackageInfo, inspect, read_image_archive, unpack_verified,
};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Fixed modification time of every entry (the epoch): builds of the same inputs are byte-identical.
const FIXED_MTIME: u64 = 0;

/// What to build a hotfix from.
#[derive(Debug, Clone, Copy)]
pub struct BuildSpec<'a> {
    /// The original package.
    pub base: &'a Path,
    /// `(path in package, local file)`: files of the base replaced by local files (their mode is kept).
    pub replacements: &'a [(String, PathBuf)],
    /// `(path in package, local file)`: files added to the package (mode taken from the local file).
    pub additions: &'a [(String, PathBuf)],
    /// Version label; default `<base version>-hotfix`.
    pub version: Option<&'a str>,
}

/// Builds a hotfix package: `base` with the named files replaced by local ones, written to `out`.
pub fn build(
    base: &Path,
    replacements: &[(String, PathBuf)],
    version: Option<&str>,
    out: &Path,
) -> Result<PackageInfo, PackageError> {
    build_with(
        &BuildSpec {
            base,
            replacements,
            additions: &[],
            version,
        },
        out,
    )
}

/// [`build`] with every option (additions too).
pub fn build_with(spec: &BuildSpec<'_>, out: &Path) -> Result<PackageInfo, PackageError> {
    let out_dir = parent_dir(out);
    let work = tempfile::Builder::new()
        .prefix(".patchd-build-")
        .tempdir_in(&out_dir)
        .map_err(|e| PackageError::io("cannot create a work directory in", &out_dir, e))?;
    let tree = work.path().join("tree");
    let base = unpack_verified(
        spec.base,
        &tree,
        &Limits::default(),
        &Expectations::default(),
    )?;

    let mut touched: HashSet<&str> = HashSet::new();
    for (path, local) in spec.replacements {
        if !touched.insert(path) {
            return Err(bad(path, "is given twice; replace each path once"));
        }
        let Some(entry) = base.file(path) else {
            if let Some(link) = base.symlinks.iter().find(|l| l.path == *path) {
                return Err(bad(
                    path,
                    &format!(
                        "is a symlink to `{}` in the base package; replace the file it points to",
                        link.target
                    ),
                ));
            }
            let similar = similar_paths(path, base.files.iter().map(|f| f.path.as_str()));
            return Err(PackageError::ReplaceTargetMissing {
                path: path.clone(),
                similar,
            });
        };
        copy_in(local, &tree.join(path), entry.mode, path)?;
    }
    for (path, local) in spec.additions {
        if !touched.insert(path) {
            return Err(bad(path, "is given twice; add or replace each path once"));
        }
        let clean = normalize_entry_path(path).ok();
        if clean.as_deref() != Some(path.as_str())
            || !path.starts_with(&format!("{}/", base.component))
        {
            return Err(bad(
                path,
                &format!("must be a clean relative path under `{}/`", base.component),
            ));
        }
        let at = tree.join(path);
        if fs::symlink_metadata(&at).is_ok() {
            return Err(bad(
                path,
                "already exists in the base package; use --replace",
            ));
        }
        for ancestor in ancestors(path) {
            if let Ok(meta) = fs::symlink_metadata(tree.join(ancestor))
                && !meta.is_dir()
            {
                return Err(bad(
                    path,
                    &format!("its parent `{ancestor}` is not a directory in the base package"),
                ));
            }
        }
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| PackageError::io("cannot create directory", parent, e))?;
        }
        let local_mode = fs::metadata(local)
            .map_err(|e| PackageError::io("cannot read", local, e))?
            .permissions()
            .mode();
        // New files get owner rwx as given, and at most read/execute for group and others.
        copy_in(local, &at, local_mode & 0o755, path)?;
    }

    let version = match spec.version {
        Some(version) => version.to_owned(),
        None => format!("{}-hotfix", base.version),
    };
    write_package(
        &tree,
        &base.component,
        &version,
        (base.os.clone(), base.arch.clone()),
        base.image.as_ref().map(|image| image.archive.as_str()),
        out,
    )
}

/// Packs `component_dir` (its name is the component) into a package with an embedded manifest.
pub fn pack_dir(
    component_dir: &Path,
    version: &str,
    out: &Path,
) -> Result<PackageInfo, PackageError> {
    let component = component_dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| {
            bad(
                &component_dir.display().to_string(),
                "has no usable directory name",
            )
        })?
        .to_owned();
    let root = parent_dir(component_dir);
    write_package(&root, &component, version, (None, None), None, out)
}

/// File name of the `docker save` archive inside an image package's component directory.
pub const IMAGE_ARCHIVE_FILE: &str = "image.tar";

/// Builds an image package: the `docker save` archive `archive` as `<component>/image.tar`, with its image
/// ID, tags, os/arch and layers in the manifest.
pub fn build_image(
    archive: &Path,
    component: &str,
    version: &str,
    out: &Path,
) -> Result<PackageInfo, PackageError> {
    if normalize_entry_path(component).ok().as_deref() != Some(component) || component.contains('/')
    {
        return Err(bad(
            component,
            "is not a usable component name (one directory name, like `demo-worker`); pass --component",
        ));
    }
    // Refuse a bad archive before copying it anywhere.
    read_image_archive(archive)?;
    let out_dir = parent_dir(out);
    let work = tempfile::Builder::new()
        .prefix(".patchd-build-")
        .tempdir_in(&out_dir)
        .map_err(|e| PackageError::io("cannot create a work directory in", &out_dir, e))?;
    let component_dir = work.path().join(component);
    fs::create_dir(&component_dir)
        .map_err(|e| PackageError::io("cannot create directory", &component_dir, e))?;
    let path_in_package = format!("{component}/{IMAGE_ARCHIVE_FILE}");
    copy_in(
        archive,
        &work.path().join(&path_in_package),
        0o644,
        &path_in_package,
    )?;
    write_package(
        work.path(),
        component,
        version,
        (None, None),
        Some(&path_in_package),
        out,
    )
}

fn bad(path: &str, detail: &str) -> PackageError {
    PackageError::BadReplacement {
        path: path.to_owned(),
        detail: detail.to_owned(),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Replaces `dest` (inside the work tree) by a copy of the local file `src` with `mode`.
fn copy_in(src: &Path, dest: &Path, mode: u32, path_in_package: &str) -> Result<(), PackageError> {
    let meta =
        fs::metadata(src).map_err(|e| PackageError::io("cannot read replacement", src, e))?;
    if !meta.is_file() {
        return Err(bad(
            path_in_package,
            &format!("{} is not a regular file", src.display()),
        ));
    }
    let mut input =
        File::open(src).map_err(|e| PackageError::io("cannot open replacement", src, e))?;
    match fs::remove_file(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PackageError::io("cannot remove", dest, e)),
    }
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| PackageError::io("cannot create", dest, e))?;
    io::copy(&mut input, &mut output).map_err(|e| PackageError::io("cannot copy into", dest, e))?;
    output
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| PackageError::io("cannot set mode of", dest, e))
}

/// One entry of the tree to pack, in archive order.
enum Item {
    Dir(String),
    File(FileEntry),
    Symlink(SymlinkEntry),
}

/// Packs `root/component` into `out`: manifest first, then the tree depth-first in name order.
fn write_package(
    root: &Path,
    component: &str,
    version: &str,
    fallback_target: (Option<String>, Option<String>),
    image_archive: Option<&str>,
    out: &Path,
) -> Result<PackageInfo, PackageError> {
    if version.is_empty() || version.chars().any(char::is_control) {
        return Err(bad(
            "--version",
            "must be a non-empty label without control characters",
        ));
    }
    let mut items = Vec::new();
    let mut targets: Vec<(String, &'static str, &'static str)> = Vec::new();
    scan_tree(root, component, component, &mut items, &mut targets)?;

    let mut first: Option<&(String, &'static str, &'static str)> = None;
    for target in &targets {
        match first {
            Some(seen) if (seen.1, seen.2) != (target.1, target.2) => {
                return Err(PackageError::MixedTargets {
                    entry: target.0.clone(),
                    found: target_label(target.1, target.2),
                    other_entry: seen.0.clone(),
                    other: target_label(seen.1, seen.2),
                });
            }
            Some(_) => {}
            None => first = Some(target),
        }
    }
    let (os, arch) = match first {
        Some((_, os, arch)) => (Some((*os).to_owned()), Some((*arch).to_owned())),
        None => fallback_target,
    };
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        component: component.to_owned(),
        version: version.to_owned(),
        os,
        arch,
        files: items
            .iter()
            .filter_map(|i| {
                if let Item::File(f) = i {
                    Some(f.clone())
                } else {
                    None
                }
            })
            .collect(),
        symlinks: items
            .iter()
            .filter_map(|i| {
                if let Item::Symlink(l) = i {
                    Some(l.clone())
                } else {
                    None
                }
            })
            .collect(),
        image: None,
    };
    manifest.sort();
    if let Some(archive) = image_archive {
        // Read from the tree being packed, so a replaced archive gets its own image ID.
        let mut image = read_image_archive(&root.join(archive))?;
        image.archive = archive.to_owned();
        if !image.os.is_empty() {
            manifest.os = Some(image.os.clone());
        }
        if !image.arch.is_empty() {
            manifest.arch = Some(image.host_arch());
        }
        manifest.image = Some(image);
    }
    if manifest.files.is_empty() {
        return Err(PackageError::EmptyPackage {
            path: root.join(component),
        });
    }

    let out_dir = parent_dir(out);
    let mut temp = tempfile::Builder::new()
        .prefix(".patchd-package-")
        .suffix(".tmp")
        .tempfile_in(&out_dir)
        .map_err(|e| PackageError::io("cannot create a temporary file in", &out_dir, e))?;
    write_archive(temp.as_file_mut(), root, &manifest, &items)
        .map_err(|e| PackageError::io("cannot write package", temp.path(), e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| PackageError::io("cannot fsync", temp.path(), e))?;
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o644))
        .map_err(|e| PackageError::io("cannot set mode of", temp.path(), e))?;
    temp.persist(out)
        .map_err(|e| PackageError::io("cannot rename the package to", out, e.error))?;
    sync_dir(&out_dir)?;

    // Read back what was written, with every check a receiver will run.
    let info = inspect(out, &Limits::default())?;
    if info.manifest != manifest {
        return Err(PackageError::InvalidManifest {
            detail: format!(
                "{} changed while it was being packed; build again",
                root.join(component).display()
            ),
        });
    }
    Ok(info)
}

fn write_archive(
    file: &mut File,
    root: &Path,
    manifest: &Manifest,
    items: &[Item],
) -> io::Result<()> {
    let gzip = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(
            BufWriter::with_capacity(256 * 1024, file),
            flate2::Compression::default(),
        );
    let mut tar = tar::Builder::new(gzip);
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(FIXED_MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let manifest_json = manifest.to_json();
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o644, manifest_json.len() as u64),
        MANIFEST_FILE,
        manifest_json.as_slice(),
    )?;
    for item in items {
        match item {
            Item::Dir(path) => {
                tar.append_data(
                    &mut header(tar::EntryType::Directory, 0o755, 0),
                    format!("{path}/"),
                    io::empty(),
                )?;
            }
            Item::File(entry) => {
                let content = File::open(root.join(&entry.path))?;
                tar.append_data(
                    &mut header(tar::EntryType::Regular, entry.mode, entry.size),
                    &entry.path,
                    content,
                )?;
            }
            Item::Symlink(link) => {
                tar.append_link(
                    &mut header(tar::EntryType::Symlink, 0o777, 0),
                    &link.path,
                    &link.target,
                )?;
            }
        }
    }
    let gzip = tar.into_inner()?;
    let buffered = gzip.finish()?;
    buffered.into_inner().map_err(|e| e.into_error())?.flush()
}

/// Lists `root/rel` depth-first in name order, hashing files and checking what a receiver would refuse.
fn scan_tree(
    root: &Path,
    component: &str,
    rel: &str,
    items: &mut Vec<Item>,
    targets: &mut Vec<(String, &'static str, &'static str)>,
) -> Result<(), PackageError> {
    let dir = root.join(rel);
    items.push(Item::Dir(rel.to_owned()));
    let mut children = Vec::new();
    for child in fs::read_dir(&dir).map_err(|e| PackageError::io("cannot list", &dir, e))? {
        let child = child.map_err(|e| PackageError::io("cannot list", &dir, e))?;
        let name = child
            .file_name()
            .into_string()
            .map_err(|raw| PackageError::NonUtf8Path {
                entry: format!("{rel}/{}", raw.to_string_lossy()),
            })?;
        children.push(name);
    }
    children.sort();
    for name in children {
        let path = format!("{rel}/{name}");
        if name.chars().any(char::is_control) {
            return Err(PackageError::ControlCharacter { entry: path });
        }
        if let Some(problem) = crate::paths::unicode_problem(&name) {
            return Err(crate::paths::unicode_error(path, problem));
        }
        let at = root.join(&path);
        let meta =
            fs::symlink_metadata(&at).map_err(|e| PackageError::io("cannot stat", &at, e))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            scan_tree(root, component, &path, items, targets)?;
        } else if file_type.is_symlink() {
            let target =
                fs::read_link(&at).map_err(|e| PackageError::io("cannot read symlink", &at, e))?;
            let target =
                target
                    .into_os_string()
                    .into_string()
                    .map_err(|raw| PackageError::NonUtf8Path {
                        entry: format!("{path} -> {}", raw.to_string_lossy()),
                    })?;
            let inside = !target.starts_with('/')
                && resolve_symlink(&path, &target)
                    .is_some_and(|resolved| is_within(&resolved, component));
            if !inside {
                return Err(PackageError::LinkOutsidePackage {
                    entry: path,
                    target,
                    kind: "symlink",
                });
            }
            items.push(Item::Symlink(SymlinkEntry { path, target }));
        } else if file_type.is_file() {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o7000 != 0 {
                return Err(PackageError::SpecialModeBits { entry: path, mode });
            }
            if mode & 0o002 != 0 {
                return Err(PackageError::WorldWritable { entry: path, mode });
            }
            let (digest, size, target) = hash_file(&at)?;
            if let Some((os, arch)) = target {
                targets.push((path.clone(), os, arch));
            }
            items.push(Item::File(FileEntry {
                path,
                mode,
                size,
                digest,
            }));
        } else {
            return Err(PackageError::UnsupportedEntryType {
                entry: path,
                kind: "special file".to_owned(),
            });
        }
    }
    Ok(())
}

type HashedFile = (String, u64, Option<(&'static str, &'static str)>);

fn hash_file(at: &Path) -> Result<HashedFile, PackageError> {
    let mut file = File::open(at).map_err(|e| PackageError::io("cannot open", at, e))?;
    let mut hash = ContentAlgorithm::CURRENT.hasher();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    let mut target = None;
    loop {
        let n =
            read_full(&mut file, &mut buf).map_err(|e| PackageError::io("cannot read", at, e))?;
        if n == 0 {
            break;
        }
        if size == 0 && n >= ELF_SNIFF_BYTES {
            target = detect_elf_target(&buf[..n]);
        }
        size += n as u64;
        hash.update(&buf[..n]);
    }
    Ok((hash.finish(), size, target))
}
