//! Every way a package can be refused: each variant names the entry, the rule it broke and what to do about it.

use std::path::PathBuf;

/// Why a package was refused or could not be read, built or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// Reading the package or writing the destination failed at the OS level.
    #[error("{action} {}: {cause}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The file does not start with the gzip magic bytes.
    #[error(
        "{} is not a gzip file: a package is a .tar.gz (create it with `patchctl package build` or `tar czf`)",
        path.display()
    )]
    NotGzip { path: PathBuf },

    /// The gzip stream is truncated or corrupt (bad deflate data, CRC or length mismatch).
    #[error(
        "{}: corrupt or truncated gzip stream ({detail}); the file is damaged: copy or download it again",
        path.display()
    )]
    CorruptGzip { path: PathBuf, detail: String },

    /// The tar stream inside the gzip is malformed (bad header checksum, truncated entry, bad sparse map…).
    #[error(
        "{}: corrupt tar stream{} ({detail}); rebuild the package with `patchctl package build`",
        path.display(),
        after.as_ref().map(|entry| format!(" after entry `{entry}`")).unwrap_or_default()
    )]
    CorruptTar {
        path: PathBuf,
        after: Option<String>,
        detail: String,
    },

    /// Non-zero data follows the tar end-of-archive marker (for example two archives concatenated).
    #[error(
        "{}: data after the end-of-archive marker (concatenated archives?); other tools would unpack it \
         differently, so it is refused: rebuild the package with `patchctl package build`",
        path.display()
    )]
    TrailingData { path: PathBuf },

    /// The package holds no regular file.
    #[error(
        "{}: the package is empty (no regular file); a package is `<component>/…` with at least one file",
        path.display()
    )]
    EmptyPackage { path: PathBuf },

    /// An entry name is not valid UTF-8.
    #[error(
        "entry `{entry}`: the path is not valid UTF-8; rename the file with a UTF-8 name and rebuild the package"
    )]
    NonUtf8Path { entry: String },

    /// An entry name holds a control character (newline, escape…), which would garble every listing of it.
    #[error(
        "entry {entry:?}: the path holds a control character; rename the file and rebuild the package"
    )]
    ControlCharacter { entry: String },

    /// A path (or link target) longer than the system allows.
    #[error(
        "entry `{entry}`: the path is {len} bytes, over the {limit}-byte limit of the file system; \
         shorten it and rebuild the package"
    )]
    PathTooLong {
        entry: String,
        len: usize,
        limit: usize,
    },

    /// A path with more components than any real package needs.
    #[error(
        "entry `{entry}`: {depth} path components, over the limit of {limit}; flatten the directory tree and \
         rebuild the package"
    )]
    PathTooDeep {
        entry: String,
        depth: usize,
        limit: usize,
    },

    /// An absolute entry path.
    #[error(
        "entry `{entry}`: absolute paths are refused (they would write outside the package directory); \
         paths must be relative, like `<component>/bin/x`"
    )]
    AbsolutePath { entry: String },

    /// An entry path with a `..` component.
    #[error(
        "entry `{entry}`: `..` path components are refused (they would write outside the package directory); \
         rebuild the package from inside its directory"
    )]
    ParentComponent { entry: String },

    /// A device, fifo, socket, sparse file or other entry type that is not a file, directory or link.
    #[error(
        "entry `{entry}`: {kind} entries are refused (a package may hold only regular files, directories and \
         links inside it); remove it and rebuild the package"
    )]
    UnsupportedEntryType { entry: String, kind: String },

    /// The same path appears twice (or as both a file and a directory).
    #[error(
        "entry `{entry}`: the path appears more than once in the archive (or as both a file and a directory); \
         the later copy would silently win: rebuild the package with each path once"
    )]
    DuplicatePath { entry: String },

    /// An entry lies below a path that is a file or a symlink in the package.
    #[error(
        "entry `{entry}`: its parent `{ancestor}` is a {ancestor_kind} in the package, not a directory \
         (writing through it is refused); rebuild the package"
    )]
    ThroughNonDirectory {
        entry: String,
        ancestor: String,
        ancestor_kind: &'static str,
    },

    /// A symlink or hard link whose target leaves the package's component directory.
    #[error(
        "entry `{entry}`: {kind} to `{target}` points outside the package directory; links must stay inside \
         `<component>/`: replace it with the file itself"
    )]
    LinkOutsidePackage {
        entry: String,
        target: String,
        kind: &'static str,
    },

    /// A symlink whose target goes through another symlink of the package (`..` after it would escape lexical checks).
    #[error(
        "entry `{entry}`: symlink target `{target}` passes through the symlink `{via}`; point it at the real \
         path instead"
    )]
    SymlinkThroughSymlink {
        entry: String,
        target: String,
        via: String,
    },

    /// A hard link whose target is not a regular file earlier in the archive.
    #[error(
        "entry `{entry}`: hard link to `{target}`, which is not a regular file earlier in the archive; \
         replace the link with a copy of the file"
    )]
    HardLinkTargetMissing { entry: String, target: String },

    /// An entry at the archive root other than the component directory and the manifest.
    #[error(
        "entry `{entry}`: files at the archive root are refused; everything but `patchd-manifest.json` must \
         live under one component directory (`<component>/…`)"
    )]
    EntryAtRoot { entry: String },

    /// Entries under two different top-level directories.
    #[error(
        "entry `{entry}`: a second top-level directory (`{second}` besides `{first}`); a package holds \
         exactly one component directory: build one package per component"
    )]
    MultipleTopLevelDirs {
        entry: String,
        first: String,
        second: String,
    },

    /// More entries than the configured limit.
    #[error(
        "entry `{entry}`: the package has more than {limit} entries (limit `max_files`); \
         raise the limit if this package is genuine"
    )]
    TooManyEntries { entry: String, limit: u64 },

    /// One file larger than the per-entry limit.
    #[error(
        "entry `{entry}`: {size} bytes is over the per-file limit of {limit} bytes; \
         raise the limit if this package is genuine"
    )]
    EntryTooLarge {
        entry: String,
        size: u64,
        limit: u64,
    },

    /// The unpacked total crosses the configured limit (checked while streaming: decompression bombs stop here).
    #[error(
        "entry `{entry}`: unpacking it brings the package to {total} bytes, over the limit of {limit} bytes \
         (limit `max_unpacked_bytes`); raise the limit if this package is genuine"
    )]
    UnpackedTooLarge {
        entry: String,
        total: u64,
        limit: u64,
    },

    /// A tar extension header (long name, pax record) larger than any sane path needs.
    #[error(
        "{}: a tar extension header (long name or pax record){} is over {limit} bytes; refused as a \
         decompression bomb: rebuild the package",
        path.display(),
        after.as_ref().map(|entry| format!(" after entry `{entry}`")).unwrap_or_default()
    )]
    MetadataTooLarge {
        path: PathBuf,
        after: Option<String>,
        limit: u64,
    },

    /// A file with the setuid, setgid or sticky bit. Refused rather than stripped: a hotfix must not change
    /// privileges silently, and stripping would make the unpacked file differ from what the publisher built.
    #[error(
        "entry `{entry}`: mode {mode:04o} has the setuid/setgid/sticky bit, which packages may not carry; \
         `chmod u-s,g-s,o-t` the file and rebuild the package"
    )]
    SpecialModeBits { entry: String, mode: u32 },

    /// A world-writable file: any local user could replace the binary once deployed.
    #[error(
        "entry `{entry}`: mode {mode:04o} is world-writable; `chmod o-w` the file and rebuild the package"
    )]
    WorldWritable { entry: String, mode: u32 },

    /// A directory, link or other non-file entry that carries data.
    #[error(
        "entry `{entry}`: a {kind} entry carries {size} bytes of data, which tar never writes; rebuild the package"
    )]
    UnexpectedData {
        entry: String,
        kind: &'static str,
        size: u64,
    },

    /// The embedded manifest cannot be read or is not a valid manifest.
    #[error("patchd-manifest.json: {detail}; rebuild the package with `patchctl package build`")]
    InvalidManifest { detail: String },

    /// A file differs from what the manifest says about it.
    #[error(
        "entry `{entry}`: {field} is {found} in the archive but the manifest says {expected}; the package \
         was altered after it was built: rebuild it with `patchctl package build`"
    )]
    ManifestMismatch {
        entry: String,
        field: &'static str,
        found: String,
        expected: String,
    },

    /// An archive entry the manifest does not list.
    #[error(
        "entry `{entry}`: present in the archive but not listed in patchd-manifest.json; the package was \
         altered after it was built: rebuild it with `patchctl package build`"
    )]
    NotInManifest { entry: String },

    /// A manifest entry missing from the archive.
    #[error(
        "entry `{entry}`: listed in patchd-manifest.json but missing from the archive; the package is \
         incomplete: rebuild it with `patchctl package build`"
    )]
    MissingFromArchive { entry: String },

    /// The package's component is not the one the target service runs.
    #[error(
        "the package is for component `{found}` but the target expects `{expected}`; pick the package \
         built for `{expected}` (or the right role/service)"
    )]
    ComponentMismatch { found: String, expected: String },

    /// A binary (or the manifest) for another OS/architecture than the target.
    #[error(
        "entry `{entry}`: built for {found} but the target runs {expected}; build the hotfix for {expected}"
    )]
    WrongTarget {
        entry: String,
        found: String,
        expected: String,
    },

    /// ELF binaries for different OS/architectures in one package.
    #[error(
        "entry `{entry}` is built for {found} but `{other_entry}` for {other}; a package targets one OS/arch: \
         build one package per platform"
    )]
    MixedTargets {
        entry: String,
        found: String,
        other_entry: String,
        other: String,
    },

    /// `unpack_verified` refuses to mix a package into existing files.
    #[error(
        "{}: the unpack destination must not exist or be an empty directory; remove it or pick another",
        path.display()
    )]
    DestinationNotEmpty { path: PathBuf },

    /// A file on disk differs from the manifest (`verify_tree`).
    #[error("{}: {detail}; unpack the package again", path.display())]
    TreeMismatch { path: PathBuf, detail: String },

    /// `build --replace` named a path the base package does not hold.
    #[error(
        "`{path}` is not a file of the base package{}; use a path inside the package, as printed by \
         `patchctl package inspect` (or `--add` to add a new file)",
        similar_hint(similar)
    )]
    ReplaceTargetMissing { path: String, similar: Vec<String> },

    /// `build` was given an unusable replacement or addition.
    #[error("{path}: {detail}")]
    BadReplacement { path: String, detail: String },

    // Image packages (`docker save` archives); kept together at the end of the enum.
    /// The image archive is not a readable tar.
    #[error(
        "{}: not a readable tar ({detail}); an image archive is what `docker save -o FILE IMAGE` writes \
         (uncompressed: gunzip it first)",
        path.display()
    )]
    ImageNotTar { path: PathBuf, detail: String },

    /// The image archive has neither `manifest.json` nor an OCI `index.json` naming an image.
    #[error(
        "{}: no image manifest (neither `manifest.json` nor an OCI `index.json` naming an image); \
         make the archive with `docker save -o FILE IMAGE`",
        path.display()
    )]
    ImageNoManifest { path: PathBuf },

    /// The image archive holds several images.
    #[error(
        "{}: the archive holds {count} images; an image package carries exactly one: \
         `docker save` a single image reference",
        path.display()
    )]
    ImageSeveralImages { path: PathBuf, count: usize },

    /// The image config the archive's manifest names is not in the archive.
    #[error(
        "{}: the image config `{config}` named by the archive's manifest is missing; the archive is \
         incomplete: save the image again with `docker save`",
        path.display()
    )]
    ImageConfigMissing { path: PathBuf, config: String },

    /// The image config's content does not hash to the digest its file name claims.
    #[error(
        "{}: the image config `{config}` hashes to {computed}, not the digest its name claims; the archive \
         was altered or damaged: save the image again with `docker save`",
        path.display()
    )]
    ImageConfigDigestMismatch {
        path: PathBuf,
        config: String,
        computed: String,
    },

    /// A JSON document of the image archive (config, manifest, index) is larger than any real one.
    #[error(
        "{}: {entry} is {size} bytes, over the {limit}-byte limit for image metadata; refused: \
         save the image again with `docker save`",
        path.display()
    )]
    ImageJsonTooLarge {
        path: PathBuf,
        entry: String,
        size: u64,
        limit: u64,
    },

    /// The image archive is malformed in another way (bad JSON, missing layer, inconsistent layer count).
    #[error("{}: not a valid image archive: {detail}; save the image again with `docker save`", path.display())]
    ImageInvalid { path: PathBuf, detail: String },

    /// The archive's image ID is not the one the package manifest names.
    #[error(
        "{}: the archive holds image {found} but the package manifest names image {expected}; the package \
         was altered after it was built: rebuild it with `patchctl package build --image`",
        path.display()
    )]
    ImageIdMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },

    /// The archive's layer digests are not the ones the package manifest names.
    #[error(
        "{}: the archive's layers are [{found}] but the package manifest names [{expected}]; rebuild the \
         package with `patchctl package build --image`",
        path.display()
    )]
    ImageLayersMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// A path or link target with an invisible Unicode format character (U+202E, zero-width…) or not in NFC.
    #[error(
        "entry {entry:?}: {detail}; rename the file (NFC, no format characters) and rebuild the package"
    )]
    UnsafeUnicode { entry: String, detail: String },
}

fn similar_hint(similar: &[String]) -> String {
    if similar.is_empty() {
        String::new()
    } else {
        format!(" (similar: {})", similar.join(", "))
    }
}

impl PackageError {
    /// An image-archive error re-addressed to the package holding the archive (the archive itself was a
    /// temporary copy); any other error is returned as it is.
    pub(crate) fn at_package(self, package: &std::path::Path) -> Self {
        let path = package.to_owned();
        match self {
            Self::ImageNotTar { detail, .. } => Self::ImageNotTar { path, detail },
            Self::ImageNoManifest { .. } => Self::ImageNoManifest { path },
            Self::ImageSeveralImages { count, .. } => Self::ImageSeveralImages { path, count },
            Self::ImageConfigMissing { config, .. } => Self::ImageConfigMissing { path, config },
            Self::ImageConfigDigestMismatch {
                config, computed, ..
            } => Self::ImageConfigDigestMismatch {
                path,
                config,
                computed,
            },
            Self::ImageJsonTooLarge {
                entry, size, limit, ..
            } => Self::ImageJsonTooLarge {
                path,
                entry,
                size,
                limit,
            },
            Self::ImageInvalid { detail, .. } => Self::ImageInvalid { path, detail },
            Self::ImageIdMismatch {
                found, expected, ..
            } => Self::ImageIdMismatch {
                path,
                found,
                expected,
            },
            Self::ImageLayersMismatch {
                found, expected, ..
            } => Self::ImageLayersMismatch {
                path,
                found,
                expected,
            },
            other => other,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        cause: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            cause,
        }
    }
}
