//! One streaming pass over a `.tar.gz`: hashes the raw bytes (plain sha256 and tree digest) unless told not to,
//! decompresses, checks every entry against the hostile-package rules before handing it to a sink, and enforces the
//! limits while bytes flow, so a decompression bomb stops at the limit and memory stays flat. The bytes come from a
//! file ([`walk`]) or from any buffered reader of known length ([`walk_reader`]: the agent's upload, chunk by
//! verified chunk, read in place). File contents are read into an aligned buffer of a whole direct write, so a
//! sink that writes them with `DirectWriter` sends them to the disk from there.

mod stream;
mod tree;

pub(crate) use stream::MAX_METADATA_BYTES;
use stream::{Decoder, Decompressed, RawHashes, Source, StreamState, classify, drain_trailer};
use tree::{Node, PackageTree};

use crate::content::ContentAlgorithm;
use crate::digest::{DEFAULT_CHUNK_SIZE, StreamingTreeDigest, read_full};
use crate::elf::{ELF_SNIFF_BYTES, detect_elf_target, target_label};
use crate::manifest::{FileEntry, MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, SymlinkEntry};
use crate::paths::{
    MAX_PATH_BYTES, PathProblem, is_within, normalize_entry_path, resolve_symlink, top_component,
    unicode_error, unicode_problem,
};
use crate::{Expectations, Limits, PackageError};
use ring::digest::{Context, SHA256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

/// Size of the buffer a package file is read through.
pub(crate) const RAW_BUF_BYTES: usize = 256 * 1024;
/// Size of the read buffer for file contents: a whole direct-write buffer, and aligned, so a staged file's data
/// goes from it to the disk without another copy (`DirectWriter`).
const FILE_BUF_BYTES: usize = crate::direct_write::WRITE_BUFFER_BYTES;

/// Receives the entries of a package as they stream by, after each passed the rules.
pub(crate) trait Sink {
    /// A directory entry.
    fn directory(&mut self, path: &str) -> Result<(), PackageError>;
    /// A regular file starts; its content follows through `file_data`, then `file_end`.
    fn file_begin(&mut self, path: &str, mode: u32) -> Result<(), PackageError>;
    /// The next bytes of the current file.
    fn file_data(&mut self, data: &[u8]) -> Result<(), PackageError>;
    /// The current file is complete.
    fn file_end(&mut self) -> Result<(), PackageError>;
    /// A hard link to a regular file seen earlier (materialised as a copy).
    fn hard_link(&mut self, path: &str, target: &str, mode: u32) -> Result<(), PackageError>;
}

/// A sink that keeps nothing: `inspect`.
pub(crate) struct NullSink;

impl Sink for NullSink {
    fn directory(&mut self, _: &str) -> Result<(), PackageError> {
        Ok(())
    }
    fn file_begin(&mut self, _: &str, _: u32) -> Result<(), PackageError> {
        Ok(())
    }
    fn file_data(&mut self, _: &[u8]) -> Result<(), PackageError> {
        Ok(())
    }
    fn file_end(&mut self) -> Result<(), PackageError> {
        Ok(())
    }
    fn hard_link(&mut self, _: &str, _: &str, _: u32) -> Result<(), PackageError> {
        Ok(())
    }
}

/// Everything one pass learned about a package.
pub(crate) struct Walked {
    /// The component directory.
    pub top: String,
    /// Regular files (hard links included, as copies), in archive order.
    pub files: Vec<FileEntry>,
    /// Symlinks, in archive order.
    pub symlinks: Vec<SymlinkEntry>,
    /// The manifest found in the archive, if any.
    pub embedded: Option<Manifest>,
    /// `(path, os, arch)` of every ELF binary.
    pub targets: Vec<(String, &'static str, &'static str)>,
    /// Plain sha256 of the `.tar.gz` file, and its tree digest at the default chunk size (`None` when the walk
    /// was asked not to hash the raw file: [`RawDigests::Skip`]).
    pub digests: Option<(String, String)>,
    /// Size of the `.tar.gz` file.
    pub size: u64,
}

/// Whether a walk hashes the raw `.tar.gz` bytes as well (the file's own digests, not its entries').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawDigests {
    /// `inspect`: the package's sha256 and tree digest are what it reports.
    Compute,
    /// Stage: the agent verified the blob's tree digest as it arrived, and every entry is still checked
    /// (gzip's CRC-32 over the whole tar stream, each file against the manifest), so hashing the raw bytes again
    /// would only spend a second pass of sha256.
    Skip,
}

/// Walks `path` once: every entry is checked against the rules before the sink sees it.
pub(crate) fn walk(
    path: &Path,
    limits: &Limits,
    expect: &Expectations,
    raw: RawDigests,
    sink: &mut dyn Sink,
) -> Result<Walked, PackageError> {
    let (file, size) = open_package(path)?;
    let mut reader = BufReader::with_capacity(RAW_BUF_BYTES, file);
    walk_reader(&mut reader, size, path, limits, expect, raw, sink)
}

/// Opens a package file and tells its size.
pub(crate) fn open_package(path: &Path) -> Result<(File, u64), PackageError> {
    let file = File::open(path).map_err(|e| PackageError::io("cannot open package", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| PackageError::io("cannot stat package", path, e))?
        .len();
    Ok((file, size))
}

/// Walks the `size` bytes of a package `source` yields, as [`walk`] does a file; `path` names the package in errors
/// (and gives the version of a package without a manifest, as a file name would). A source that fails is an I/O
/// error on `path` (`cannot read package`); one whose length is not `size` is refused like a file changed while read.
pub(crate) fn walk_reader(
    source: &mut dyn BufRead,
    size: u64,
    path: &Path,
    limits: &Limits,
    expect: &Expectations,
    raw: RawDigests,
    sink: &mut dyn Sink,
) -> Result<Walked, PackageError> {
    if size == 0 {
        return Err(PackageError::EmptyPackage {
            path: path.to_owned(),
        });
    }
    let state = Rc::new(StreamState::default());
    let source = Source {
        raw: source,
        hashes: (raw == RawDigests::Compute).then(|| RawHashes {
            sha256: Context::new(&SHA256),
            tree: StreamingTreeDigest::new(DEFAULT_CHUNK_SIZE, size),
        }),
        read: 0,
        state: Rc::clone(&state),
    };
    let mut source = source;
    let head = source
        .fill_buf()
        .map_err(|e| PackageError::io("cannot read package", path, e))?;
    if !head.starts_with(&[0x1f, 0x8b]) {
        return Err(PackageError::NotGzip {
            path: path.to_owned(),
        });
    }
    let decompressed = Decompressed {
        inner: Decoder::new(source),
        state: Rc::clone(&state),
    };
    let mut archive = tar::Archive::new(decompressed);

    let mut walker = Walker::new(path, limits, expect, &state);
    walker.run(&mut archive, sink)?;
    walker.tree.check_symlink_chains(&walker.symlinks)?;
    let Walker {
        top,
        files,
        symlinks,
        embedded,
        targets,
        ..
    } = walker;

    let mut rest = archive.into_inner();
    drain_trailer(&mut rest, path, &state)?;
    let source = rest.inner.into_inner();
    let Source { hashes, read, .. } = source;
    let changed = || {
        PackageError::io(
            "package changed while it was read",
            path,
            io::Error::other(format!("read {read} bytes, expected {size}")),
        )
    };
    if read != size {
        return Err(changed());
    }
    let digests = match hashes {
        Some(RawHashes { sha256, tree }) => Some((
            hex::encode(sha256.finish().as_ref()),
            tree.finish().ok_or_else(changed)?,
        )),
        None => None,
    };
    let Some(top) = top else {
        return Err(PackageError::EmptyPackage {
            path: path.to_owned(),
        });
    };
    if files.is_empty() {
        return Err(PackageError::EmptyPackage {
            path: path.to_owned(),
        });
    }
    Ok(Walked {
        top,
        files,
        symlinks,
        embedded,
        targets,
        digests,
        size,
    })
}

struct Walker<'a> {
    path: &'a Path,
    limits: &'a Limits,
    expect: &'a Expectations,
    state: &'a StreamState,
    top: Option<String>,
    tree: PackageTree,
    file_index: HashMap<String, usize>,
    files: Vec<FileEntry>,
    symlinks: Vec<SymlinkEntry>,
    embedded: Option<Manifest>,
    targets: Vec<(String, &'static str, &'static str)>,
    entries: u64,
    unpacked: u64,
    last: Option<String>,
    buf: Vec<u8>,
}

impl<'a> Walker<'a> {
    fn new(
        path: &'a Path,
        limits: &'a Limits,
        expect: &'a Expectations,
        state: &'a StreamState,
    ) -> Self {
        Self {
            path,
            limits,
            expect,
            state,
            top: None,
            tree: PackageTree::new(),
            file_index: HashMap::new(),
            files: Vec::new(),
            symlinks: Vec::new(),
            embedded: None,
            targets: Vec::new(),
            entries: 0,
            unpacked: 0,
            last: None,
            buf: vec![0u8; FILE_BUF_BYTES + crate::direct_write::DIRECT_IO_ALIGN],
        }
    }

    fn io_error(&self, err: io::Error) -> PackageError {
        classify(err, self.state, self.path, self.last.as_deref())
    }

    fn run(
        &mut self,
        archive: &mut tar::Archive<Decompressed<Decoder<'_>>>,
        sink: &mut dyn Sink,
    ) -> Result<(), PackageError> {
        let mut entries = archive.entries().map_err(|e| self.io_error(e))?;
        loop {
            self.state.metadata_budget.set(Some(MAX_METADATA_BYTES));
            let next = entries.next();
            self.state.metadata_budget.set(None);
            let entry = match next {
                None => return Ok(()),
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(self.io_error(e)),
            };
            self.entry(entry, sink)?;
        }
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        sink: &mut dyn Sink,
    ) -> Result<(), PackageError> {
        let raw_bytes = entry.path_bytes().into_owned();
        let raw = String::from_utf8(raw_bytes).map_err(|e| PackageError::NonUtf8Path {
            entry: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })?;
        let kind = entry.header().entry_type();
        let declared = entry.size();

        if kind.is_pax_global_extensions() {
            // Archive-wide comments (`git archive` writes the commit id here): nothing for us, but bounded.
            if declared > MAX_METADATA_BYTES {
                return Err(PackageError::MetadataTooLarge {
                    path: self.path.to_owned(),
                    after: self.last.clone(),
                    limit: MAX_METADATA_BYTES,
                });
            }
            io::copy(&mut entry, &mut io::sink()).map_err(|e| self.io_error(e))?;
            return Ok(());
        }

        let path = match normalize_entry_path(&raw) {
            Ok(path) => path,
            Err(PathProblem::Absolute) => return Err(PackageError::AbsolutePath { entry: raw }),
            Err(PathProblem::Parent) => return Err(PackageError::ParentComponent { entry: raw }),
            Err(PathProblem::Control) => return Err(PackageError::ControlCharacter { entry: raw }),
            Err(PathProblem::TooLong) => return Err(too_long(&raw)),
            Err(problem @ (PathProblem::FormatCharacter(_) | PathProblem::NotNfc)) => {
                return Err(unicode_error(raw, problem));
            }
            // `./` (what `tar czf x.tar.gz .` writes first) is the archive root itself.
            Err(PathProblem::Root) if kind.is_dir() => return Ok(()),
            Err(PathProblem::Root) => return Err(PackageError::EntryAtRoot { entry: raw }),
        };

        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(PackageError::TooManyEntries {
                entry: path,
                limit: self.limits.max_files,
            });
        }

        let node = if kind.is_file() || kind.is_contiguous() {
            Node::File
        } else if kind.is_dir() {
            Node::Dir
        } else if kind.is_symlink() {
            Node::Symlink
        } else if kind.is_hard_link() {
            // A hard link becomes a regular file (a copy of its target).
            Node::File
        } else {
            return Err(PackageError::UnsupportedEntryType {
                entry: path,
                kind: entry_kind_name(kind),
            });
        };
        if (node != Node::File || kind.is_hard_link()) && declared != 0 {
            let kind_name = match node {
                Node::Dir | Node::ImpliedDir => "directory",
                Node::Symlink => "symlink",
                Node::File => "hard link",
            };
            return Err(PackageError::UnexpectedData {
                entry: path,
                kind: kind_name,
                size: declared,
            });
        }

        let at_root = !path.contains('/');
        if at_root && path == MANIFEST_FILE {
            if node != Node::File || kind.is_hard_link() {
                return Err(PackageError::EntryAtRoot { entry: path });
            }
            if self.embedded.is_some() {
                return Err(PackageError::DuplicatePath { entry: path });
            }
            self.embedded = Some(self.read_manifest(&mut entry, declared)?);
            self.last = Some(path);
            return Ok(());
        }
        if at_root && node != Node::Dir {
            return Err(PackageError::EntryAtRoot { entry: path });
        }
        let top = top_component(&path).to_owned();
        match &self.top {
            None => {
                if let Some(expected) = &self.expect.component
                    && *expected != top
                {
                    return Err(PackageError::ComponentMismatch {
                        found: top,
                        expected: expected.clone(),
                    });
                }
                self.top = Some(top.clone());
            }
            Some(first) if *first != top => {
                return Err(PackageError::MultipleTopLevelDirs {
                    entry: path,
                    first: first.clone(),
                    second: top,
                });
            }
            Some(_) => {}
        }
        self.tree.place(&path, node)?;

        match node {
            Node::Dir | Node::ImpliedDir => sink.directory(&path)?,
            Node::Symlink => self.symlink(&entry, path.clone(), &top)?,
            Node::File if kind.is_hard_link() => {
                self.hard_link(&entry, path.clone(), &top, sink)?
            }
            Node::File => self.file(&mut entry, path.clone(), declared, sink)?,
        }
        self.last = Some(path);
        Ok(())
    }

    fn read_manifest<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        declared: u64,
    ) -> Result<Manifest, PackageError> {
        if declared > MAX_MANIFEST_BYTES {
            return Err(PackageError::InvalidManifest {
                detail: format!("{declared} bytes is over the {MAX_MANIFEST_BYTES}-byte limit"),
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| self.io_error(e))?;
        if bytes.len() as u64 != declared {
            return Err(self.truncated(MANIFEST_FILE));
        }
        Manifest::from_json(&bytes)
    }

    fn truncated(&self, entry: &str) -> PackageError {
        PackageError::CorruptTar {
            path: self.path.to_owned(),
            after: self.last.clone(),
            detail: format!("entry `{entry}` is shorter than its header says"),
        }
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        path: String,
        top: &str,
    ) -> Result<(), PackageError> {
        let target_bytes = entry
            .link_name_bytes()
            .map(|b| b.into_owned())
            .unwrap_or_default();
        let target = String::from_utf8(target_bytes).map_err(|e| PackageError::NonUtf8Path {
            entry: format!("{path} -> {}", String::from_utf8_lossy(e.as_bytes())),
        })?;
        if target.len() > MAX_PATH_BYTES {
            return Err(too_long(&format!("{path} -> {target}")));
        }
        if target.chars().any(char::is_control) {
            return Err(PackageError::ControlCharacter {
                entry: format!("{path} -> {target}"),
            });
        }
        if let Some(problem) = unicode_problem(&target) {
            return Err(unicode_error(format!("{path} -> {target}"), problem));
        }
        let inside = !target.is_empty()
            && !target.starts_with('/')
            && resolve_symlink(&path, &target).is_some_and(|resolved| is_within(&resolved, top));
        if !inside {
            return Err(PackageError::LinkOutsidePackage {
                entry: path,
                target,
                kind: "symlink",
            });
        }
        self.symlinks.push(SymlinkEntry { path, target });
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        path: String,
        top: &str,
        sink: &mut dyn Sink,
    ) -> Result<(), PackageError> {
        let raw_target = entry
            .link_name_bytes()
            .map(|b| b.into_owned())
            .unwrap_or_default();
        let raw_target = String::from_utf8(raw_target).map_err(|e| PackageError::NonUtf8Path {
            entry: format!("{path} -> {}", String::from_utf8_lossy(e.as_bytes())),
        })?;
        let outside = || PackageError::LinkOutsidePackage {
            entry: path.clone(),
            target: raw_target.clone(),
            kind: "hard link",
        };
        let target = match normalize_entry_path(&raw_target) {
            Ok(target) => target,
            Err(PathProblem::TooLong) => return Err(too_long(&format!("{path} -> {raw_target}"))),
            Err(_) => return Err(outside()),
        };
        if !is_within(&target, top) {
            return Err(outside());
        }
        let Some(&index) = self.file_index.get(&target) else {
            return Err(PackageError::HardLinkTargetMissing {
                entry: path,
                target: raw_target,
            });
        };
        let source = self.files[index].clone();
        self.account_size(&path, source.size)?;
        sink.hard_link(&path, &source.path, source.mode)?;
        if let Some(found) = self
            .targets
            .iter()
            .find(|(p, _, _)| *p == source.path)
            .map(|(_, os, arch)| (*os, *arch))
        {
            self.targets.push((path.clone(), found.0, found.1));
        }
        self.file_index.insert(path.clone(), self.files.len());
        self.files.push(FileEntry { path, ..source });
        Ok(())
    }

    fn account_size(&mut self, path: &str, size: u64) -> Result<(), PackageError> {
        if size > self.limits.max_entry_bytes {
            return Err(PackageError::EntryTooLarge {
                entry: path.to_owned(),
                size,
                limit: self.limits.max_entry_bytes,
            });
        }
        let total = self.unpacked.saturating_add(size);
        if total > self.limits.max_unpacked_bytes {
            return Err(PackageError::UnpackedTooLarge {
                entry: path.to_owned(),
                total,
                limit: self.limits.max_unpacked_bytes,
            });
        }
        self.unpacked = total;
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: String,
        declared: u64,
        sink: &mut dyn Sink,
    ) -> Result<(), PackageError> {
        let raw_mode = entry
            .header()
            .mode()
            .map_err(|e| PackageError::CorruptTar {
                path: self.path.to_owned(),
                after: self.last.clone(),
                detail: format!("entry `{path}`: {e}"),
            })?
            & 0o7777;
        if raw_mode & 0o7000 != 0 {
            return Err(PackageError::SpecialModeBits {
                entry: path,
                mode: raw_mode,
            });
        }
        if raw_mode & 0o002 != 0 {
            return Err(PackageError::WorldWritable {
                entry: path,
                mode: raw_mode,
            });
        }
        self.account_size(&path, declared)?;

        // The first buffer is read before the sink sees the file, so a binary for the wrong target is refused
        // before a single byte of it is written.
        let mut buf = std::mem::take(&mut self.buf);
        let start = buf
            .as_ptr()
            .align_offset(crate::direct_write::DIRECT_IO_ALIGN);
        let result = self.stream_file(
            entry,
            &path,
            raw_mode,
            declared,
            sink,
            &mut buf[start..start + FILE_BUF_BYTES],
        );
        self.buf = buf;
        let digest = result?;
        self.file_index.insert(path.clone(), self.files.len());
        self.files.push(FileEntry {
            path,
            mode: raw_mode,
            size: declared,
            digest,
        });
        Ok(())
    }

    fn stream_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &str,
        mode: u32,
        declared: u64,
        sink: &mut dyn Sink,
        buf: &mut [u8],
    ) -> Result<String, PackageError> {
        // The manifest's algorithm once it has been read (it is the first entry of every package patchctl
        // builds); the current one for a package without a manifest.
        let algorithm = self
            .embedded
            .as_ref()
            .map_or(ContentAlgorithm::CURRENT, Manifest::content_algorithm);
        let mut hash = algorithm.hasher();
        let mut seen = read_full(entry, buf).map_err(|e| self.io_error(e))?;
        let first = &buf[..seen];
        if first.len() >= ELF_SNIFF_BYTES
            && let Some((os, arch)) = detect_elf_target(first)
        {
            self.check_expected_target(path, os, arch)?;
            self.targets.push((path.to_owned(), os, arch));
        }
        sink.file_begin(path, mode)?;
        hash.update(first);
        sink.file_data(first)?;
        loop {
            let n = read_full(entry, buf).map_err(|e| self.io_error(e))?;
            if n == 0 {
                break;
            }
            seen += n;
            hash.update(&buf[..n]);
            sink.file_data(&buf[..n])?;
        }
        if seen as u64 != declared {
            return Err(self.truncated(path));
        }
        sink.file_end()?;
        Ok(hash.finish())
    }

    fn check_expected_target(&self, path: &str, os: &str, arch: &str) -> Result<(), PackageError> {
        let os_differs = self.expect.os.as_deref().is_some_and(|want| want != os);
        let arch_differs = self.expect.arch.as_deref().is_some_and(|want| want != arch);
        if os_differs || arch_differs {
            return Err(PackageError::WrongTarget {
                entry: path.to_owned(),
                found: target_label(os, arch),
                expected: target_label(
                    self.expect.os.as_deref().unwrap_or(os),
                    self.expect.arch.as_deref().unwrap_or(arch),
                ),
            });
        }
        Ok(())
    }
}

fn too_long(raw: &str) -> PackageError {
    let shown: String = raw.chars().take(80).collect();
    PackageError::PathTooLong {
        entry: format!("{shown}…"),
        len: raw.len(),
        limit: MAX_PATH_BYTES,
    }
}

fn entry_kind_name(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Char => "character device".to_owned(),
        tar::EntryType::Block => "block device".to_owned(),
        tar::EntryType::Fifo => "fifo".to_owned(),
        tar::EntryType::GNUSparse => "sparse file".to_owned(),
        other => format!(
            "tar type `{}`",
            char::from(other.as_byte()).escape_default()
        ),
    }
}
