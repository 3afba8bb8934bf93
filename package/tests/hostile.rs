//! The hostile-package table: one broken or malicious archive per row, each refused by both `inspect` and
//! `unpack_verified` with the specific error, and never a byte written outside the unpack directory.
// Test code: helpers may panic like the tests (clippy treats only `#[test]` functions as tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flate2::Compression;
use flate2::write::GzEncoder;
use patchd_package::{
    ContentAlgorithm, Expectations, Limits, PackageError, inspect_expecting, unpack_verified,
};
use std::io::Write;
use std::path::Path;
use tar::{EntryType, Header};

/// Builds archives entry by entry with raw names, which tar's own builder would refuse to write.
struct Archive {
    builder: tar::Builder<Vec<u8>>,
}

impl Archive {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(mut self, name: &[u8], kind: EntryType, mode: u32, data: &[u8], link: &[u8]) -> Self {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), EntryType::Directory, 0o755, b"", b"")
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(name.as_bytes(), EntryType::Regular, 0o644, data, b"")
    }

    fn file_mode(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.raw(name.as_bytes(), EntryType::Regular, mode, data, b"")
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            0o777,
            b"",
            target.as_bytes(),
        )
    }

    fn hard_link(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            EntryType::Link,
            0o644,
            b"",
            target.as_bytes(),
        )
    }

    /// A file whose name is longer than a header holds (tar writes a GNU long-name record).
    fn long_file(mut self, name: &str, data: &[u8]) -> Self {
        let mut header = Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        self.builder.append_data(&mut header, name, data).unwrap();
        self
    }

    fn manifest(self, json: &str) -> Self {
        self.file("patchd-manifest.json", json.as_bytes())
    }

    fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }

    fn gz(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// A minimal ELF executable header for `machine` (62 = x86_64, 183 = aarch64), padded to 64 bytes.
fn elf(machine: u16) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[6] = 1;
    h[16..18].copy_from_slice(&2u16.to_le_bytes());
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    h
}

fn good() -> Archive {
    Archive::new()
        .dir("demo/")
        .file_mode("demo/demo", 0o755, b"#!/bin/sh\necho ok\n")
        .file("demo/conf/a.toml", b"a = 1\n")
}

/// A manifest of the current format (2: BLAKE3 digests) listing `files`.
fn manifest_for(files: &[(&str, u32, &[u8])], extra: &str) -> String {
    let files: Vec<String> = files
        .iter()
        .map(|(path, mode, data)| {
            format!(
                r#"{{"path":"{path}","mode":{mode},"size":{},"digest":"{}"}}"#,
                data.len(),
                ContentAlgorithm::Blake3.digest(data)
            )
        })
        .collect();
    format!(
        r#"{{"format":2,"component":"demo","version":"v1"{extra},"files":[{}]}}"#,
        files.join(",")
    )
}

/// A manifest of format 1 (sha256 digests, under the key `sha256`), as patchctl wrote before format 2.
fn manifest_format_1_for(files: &[(&str, u32, &[u8])]) -> String {
    let files: Vec<String> = files
        .iter()
        .map(|(path, mode, data)| {
            format!(
                r#"{{"path":"{path}","mode":{mode},"size":{},"sha256":"{}"}}"#,
                data.len(),
                sha256(data)
            )
        })
        .collect();
    format!(
        r#"{{"format":1,"component":"demo","version":"v1","files":[{}]}}"#,
        files.join(",")
    )
}

/// [`good`]'s files after a format-1 manifest, first in the archive as patchctl wrote it, listing `files`.
fn format_1_package(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    Archive::new()
        .manifest(&manifest_format_1_for(files))
        .dir("demo/")
        .file_mode("demo/demo", 0o755, b"#!/bin/sh\necho ok\n")
        .file("demo/conf/a.toml", b"a = 1\n")
        .gz()
}

type Check = fn(&PackageError) -> bool;

/// A file that differs from its manifest entry in its digest alone.
fn is_digest_mismatch(e: &PackageError) -> bool {
    matches!(
        e,
        PackageError::ManifestMismatch {
            field: "the digest",
            ..
        }
    )
}

struct Case {
    name: &'static str,
    archive: Vec<u8>,
    limits: Limits,
    expect: Expectations,
    check: Check,
    /// A piece of text the error message must contain (the entry it names).
    mentions: &'static str,
}

fn case(name: &'static str, archive: Vec<u8>, mentions: &'static str, check: Check) -> Case {
    Case {
        name,
        archive,
        limits: Limits::default(),
        expect: Expectations::default(),
        check,
        mentions,
    }
}

fn cases(abs_target: &str) -> Vec<Case> {
    let abs_name: &'static str = Box::leak(abs_target.to_owned().into_boxed_str());
    let valid = good().gz();
    let mut truncated = valid.clone();
    truncated.truncate(valid.len() - 20);
    let mut corrupt = valid.clone();
    let middle = corrupt.len() / 2;
    for byte in &mut corrupt[middle..middle + 8] {
        *byte ^= 0x5a;
    }
    let mut trailing = good().tar();
    trailing.extend_from_slice(&good().tar());
    let big = vec![0u8; 3 << 20];
    let elf_x86 = elf(62);
    let elf_arm = elf(183);
    let script: &[u8] = b"#!/bin/sh\necho ok\n";
    let conf: &[u8] = b"a = 1\n";

    let mut rows = vec![
        case(
            "absolute path",
            Archive::new().dir("demo/").file(abs_name, b"pwned").gz(),
            abs_name,
            |e| matches!(e, PackageError::AbsolutePath { .. }),
        ),
        case(
            "dot-dot path",
            good().file("demo/../../escaped", b"pwned").gz(),
            "demo/../../escaped",
            |e| matches!(e, PackageError::ParentComponent { .. }),
        ),
        case(
            "dot-dot as first entry",
            Archive::new().file("../escaped", b"pwned").gz(),
            "../escaped",
            |e| matches!(e, PackageError::ParentComponent { .. }),
        ),
        case(
            "symlink leaving the package",
            good().symlink("demo/lnk", "../../etc/passwd").gz(),
            "demo/lnk",
            |e| {
                matches!(
                    e,
                    PackageError::LinkOutsidePackage {
                        kind: "symlink",
                        ..
                    }
                )
            },
        ),
        case(
            "absolute symlink",
            good().symlink("demo/lnk", "/etc/passwd").gz(),
            "/etc/passwd",
            |e| {
                matches!(
                    e,
                    PackageError::LinkOutsidePackage {
                        kind: "symlink",
                        ..
                    }
                )
            },
        ),
        case(
            "symlink to the archive root",
            good().symlink("demo/up", "..").gz(),
            "demo/up",
            |e| matches!(e, PackageError::LinkOutsidePackage { .. }),
        ),
        case(
            "symlink escaping through another symlink",
            good()
                .dir("demo/a/b/c/")
                .symlink("demo/a/b/c/s", "../../..")
                .symlink("demo/a/b/c/t", "s/../../x")
                .gz(),
            "demo/a/b/c/t",
            |e| matches!(e, PackageError::SymlinkThroughSymlink { .. }),
        ),
        case(
            "hard link leaving the package",
            good().hard_link("demo/h", "../outside").gz(),
            "demo/h",
            |e| {
                matches!(
                    e,
                    PackageError::LinkOutsidePackage {
                        kind: "hard link",
                        ..
                    }
                )
            },
        ),
        case(
            "absolute hard link",
            good().hard_link("demo/h", "/etc/shadow").gz(),
            "/etc/shadow",
            |e| {
                matches!(
                    e,
                    PackageError::LinkOutsidePackage {
                        kind: "hard link",
                        ..
                    }
                )
            },
        ),
        case(
            "hard link to nothing",
            good().hard_link("demo/h", "demo/missing").gz(),
            "demo/missing",
            |e| matches!(e, PackageError::HardLinkTargetMissing { .. }),
        ),
        case(
            "character device",
            good()
                .raw(b"demo/tty", EntryType::Char, 0o644, b"", b"")
                .gz(),
            "demo/tty",
            |e| matches!(e, PackageError::UnsupportedEntryType { kind, .. } if kind == "character device"),
        ),
        case(
            "block device",
            good()
                .raw(b"demo/sda", EntryType::Block, 0o644, b"", b"")
                .gz(),
            "demo/sda",
            |e| matches!(e, PackageError::UnsupportedEntryType { kind, .. } if kind == "block device"),
        ),
        case(
            "fifo",
            good()
                .raw(b"demo/pipe", EntryType::Fifo, 0o644, b"", b"")
                .gz(),
            "demo/pipe",
            |e| matches!(e, PackageError::UnsupportedEntryType { kind, .. } if kind == "fifo"),
        ),
        case(
            "unknown entry type",
            good()
                .raw(b"demo/odd", EntryType::new(b'Z'), 0o644, b"", b"")
                .gz(),
            "demo/odd",
            |e| matches!(e, PackageError::UnsupportedEntryType { .. }),
        ),
        case(
            "duplicate file",
            good().file("demo/conf/a.toml", b"b = 2\n").gz(),
            "demo/conf/a.toml",
            |e| matches!(e, PackageError::DuplicatePath { .. }),
        ),
        case(
            "file then directory",
            good().dir("demo/demo/").gz(),
            "demo/demo",
            |e| matches!(e, PackageError::DuplicatePath { .. }),
        ),
        case(
            "entry below a file",
            good().file("demo/demo/inner", b"x").gz(),
            "demo/demo/inner",
            |e| {
                matches!(
                    e,
                    PackageError::ThroughNonDirectory {
                        ancestor_kind: "file",
                        ..
                    }
                )
            },
        ),
        case(
            "entry below a symlink",
            good()
                .dir("demo/real/")
                .symlink("demo/via", "real")
                .file("demo/via/x", b"x")
                .gz(),
            "demo/via/x",
            |e| {
                matches!(
                    e,
                    PackageError::ThroughNonDirectory {
                        ancestor_kind: "symlink",
                        ..
                    }
                )
            },
        ),
        case(
            "file at the root",
            good().file("README", b"hi").gz(),
            "README",
            |e| matches!(e, PackageError::EntryAtRoot { .. }),
        ),
        case(
            "symlink at the root",
            good().symlink("latest", "demo").gz(),
            "latest",
            |e| matches!(e, PackageError::EntryAtRoot { .. }),
        ),
        case(
            "two top-level directories",
            good().file("other/x", b"x").gz(),
            "other/x",
            |e| matches!(e, PackageError::MultipleTopLevelDirs { .. }),
        ),
        case(
            "non-UTF-8 path",
            good()
                .raw(b"demo/\xff\xfe", EntryType::Regular, 0o644, b"x", b"")
                .gz(),
            "demo/",
            |e| matches!(e, PackageError::NonUtf8Path { .. }),
        ),
        case(
            "path longer than PATH_MAX",
            good()
                .long_file(&format!("demo/{}", "deep/".repeat(1000)), b"x")
                .gz(),
            "over the 4095-byte limit",
            |e| matches!(e, PackageError::PathTooLong { .. }),
        ),
        case(
            "path with too many components",
            good()
                .long_file(&format!("demo/{}x", "d/".repeat(200)), b"x")
                .gz(),
            "path components",
            |e| matches!(e, PackageError::PathTooDeep { .. }),
        ),
        case(
            "control character in a path",
            good().file("demo/a\x1b[31mred", b"x").gz(),
            "demo/a",
            |e| matches!(e, PackageError::ControlCharacter { .. }),
        ),
        case(
            "bidi override (U+202E) in a path",
            good().file("demo/invoice\u{202e}fdp.sh", b"x").gz(),
            "U+202E",
            |e| matches!(e, PackageError::UnsafeUnicode { .. }),
        ),
        case(
            "zero-width space in a directory name",
            good().file("demo/bin\u{200b}/x", b"x").gz(),
            "U+200B",
            |e| matches!(e, PackageError::UnsafeUnicode { .. }),
        ),
        case(
            "path not in NFC (decomposed e + combining acute)",
            good().file("demo/cafe\u{301}", b"x").gz(),
            "NFC",
            |e| matches!(e, PackageError::UnsafeUnicode { .. }),
        ),
        case(
            "symlink target with a zero-width joiner",
            good().symlink("demo/link", "x\u{200d}").gz(),
            "U+200D",
            |e| matches!(e, PackageError::UnsafeUnicode { .. }),
        ),
        case(
            "setuid binary",
            good().file_mode("demo/suid", 0o4755, b"x").gz(),
            "demo/suid",
            |e| matches!(e, PackageError::SpecialModeBits { mode: 0o4755, .. }),
        ),
        case(
            "setgid binary",
            good().file_mode("demo/sgid", 0o2755, b"x").gz(),
            "demo/sgid",
            |e| matches!(e, PackageError::SpecialModeBits { .. }),
        ),
        case(
            "world-writable file",
            good().file_mode("demo/ww", 0o666, b"x").gz(),
            "demo/ww",
            |e| matches!(e, PackageError::WorldWritable { .. }),
        ),
        case(
            "directory entry carrying data",
            good()
                .raw(b"demo/d/", EntryType::Directory, 0o755, b"hidden", b"")
                .gz(),
            "demo/d",
            |e| matches!(e, PackageError::UnexpectedData { .. }),
        ),
        case(
            "long-name header bomb",
            good()
                .raw(
                    b"././@LongLink",
                    EntryType::GNULongName,
                    0o644,
                    &vec![b'a'; 2 << 20],
                    b"",
                )
                .file("demo/x", b"x")
                .gz(),
            "demo/conf/a.toml",
            |e| matches!(e, PackageError::MetadataTooLarge { .. }),
        ),
        case("truncated gzip", truncated, "truncated", |e| {
            matches!(e, PackageError::CorruptGzip { .. })
        }),
        case("corrupt gzip", corrupt, "gzip", |e| {
            matches!(e, PackageError::CorruptGzip { .. })
        }),
        case(
            "garbage inside the gzip",
            gzip(&[0x42u8; 2048]),
            "corrupt tar",
            |e| matches!(e, PackageError::CorruptTar { .. }),
        ),
        case("plain tar, not gzip", good().tar(), "not a gzip", |e| {
            matches!(e, PackageError::NotGzip { .. })
        }),
        case("zero-byte file", Vec::new(), "empty", |e| {
            matches!(e, PackageError::EmptyPackage { .. })
        }),
        case(
            "archive without entries",
            Archive::new().gz(),
            "empty",
            |e| matches!(e, PackageError::EmptyPackage { .. }),
        ),
        case(
            "directories only",
            Archive::new().dir("demo/").dir("demo/bin/").gz(),
            "empty",
            |e| matches!(e, PackageError::EmptyPackage { .. }),
        ),
        case(
            "concatenated archives",
            gzip(&trailing),
            "end-of-archive",
            |e| matches!(e, PackageError::TrailingData { .. }),
        ),
        case(
            "manifest that is not JSON",
            good().manifest("{not json").gz(),
            "patchd-manifest.json",
            |e| matches!(e, PackageError::InvalidManifest { .. }),
        ),
        case(
            "manifest from the future",
            good()
                .manifest(
                    &manifest_for(
                        &[
                            ("demo/demo", 0o755, script),
                            ("demo/conf/a.toml", 0o644, conf),
                        ],
                        "",
                    )
                    .replace(r#""format":2"#, r#""format":3"#),
                )
                .gz(),
            "format 3",
            |e| matches!(e, PackageError::InvalidManifest { .. }),
        ),
        case(
            "format-2 manifest with sha256 digests",
            good()
                .manifest(
                    &manifest_format_1_for(&[
                        ("demo/demo", 0o755, script),
                        ("demo/conf/a.toml", 0o644, conf),
                    ])
                    .replace(r#""format":1"#, r#""format":2"#),
                )
                .gz(),
            "format 2 expects `blake3:`",
            |e| matches!(e, PackageError::InvalidManifest { .. }),
        ),
        case(
            "format-1 manifest (sha256), file altered after it was written",
            format_1_package(&[
                // The same size as the archive's `demo/demo`: only its sha256 differs.
                ("demo/demo", 0o755, b"#!/bin/sh\necho no\n"),
                ("demo/conf/a.toml", 0o644, conf),
            ]),
            "demo/demo",
            is_digest_mismatch,
        ),
        case(
            "format-1 manifest (sha256) after the files it lists",
            good()
                .manifest(&manifest_format_1_for(&[
                    ("demo/demo", 0o755, script),
                    ("demo/conf/a.toml", 0o644, conf),
                ]))
                .gz(),
            "must be the first entry",
            |e| matches!(e, PackageError::InvalidManifest { .. }),
        ),
        case(
            "file altered after the manifest was written",
            good()
                .manifest(&manifest_for(
                    &[
                        // The same size as the archive's `demo/demo`: only its digest differs.
                        ("demo/demo", 0o755, b"#!/bin/sh\necho no\n"),
                        ("demo/conf/a.toml", 0o644, conf),
                    ],
                    "",
                ))
                .gz(),
            "demo/demo",
            is_digest_mismatch,
        ),
        case(
            "mode altered after the manifest was written",
            good()
                .manifest(&manifest_for(
                    &[
                        ("demo/demo", 0o700, script),
                        ("demo/conf/a.toml", 0o644, conf),
                    ],
                    "",
                ))
                .gz(),
            "demo/demo",
            |e| {
                matches!(
                    e,
                    PackageError::ManifestMismatch {
                        field: "the mode",
                        ..
                    }
                )
            },
        ),
        case(
            "file slipped in besides the manifest",
            good()
                .manifest(&manifest_for(&[("demo/demo", 0o755, script)], ""))
                .gz(),
            "demo/conf/a.toml",
            |e| matches!(e, PackageError::NotInManifest { .. }),
        ),
        case(
            "file listed in the manifest but missing",
            good()
                .manifest(&manifest_for(
                    &[
                        ("demo/demo", 0o755, script),
                        ("demo/conf/a.toml", 0o644, conf),
                        ("demo/gone", 0o644, b"x"),
                    ],
                    "",
                ))
                .gz(),
            "demo/gone",
            |e| matches!(e, PackageError::MissingFromArchive { .. }),
        ),
        case(
            "manifest declaring another architecture than its binary",
            Archive::new()
                .file_mode("demo/demo", 0o755, &elf_x86)
                .manifest(&manifest_for(
                    &[("demo/demo", 0o755, &elf_x86)],
                    r#","os":"linux","arch":"aarch64""#,
                ))
                .gz(),
            "demo/demo",
            |e| matches!(e, PackageError::ManifestMismatch { .. }),
        ),
        case(
            "binaries for two architectures",
            Archive::new()
                .file_mode("demo/a", 0o755, &elf_x86)
                .file_mode("demo/b", 0o755, &elf_arm)
                .gz(),
            "demo/b",
            |e| matches!(e, PackageError::MixedTargets { .. }),
        ),
    ];

    let mut limited = |name, archive, mentions, limits: Limits, check: Check| {
        rows.push(Case {
            name,
            archive,
            limits,
            expect: Expectations::default(),
            check,
            mentions,
        });
    };
    limited(
        "too many entries",
        good()
            .file("demo/4", b"4")
            .file("demo/5", b"5")
            .file("demo/6", b"6")
            .gz(),
        "demo/6",
        Limits {
            max_files: 5,
            ..Limits::default()
        },
        |e| matches!(e, PackageError::TooManyEntries { limit: 5, .. }),
    );
    limited(
        "one file over the per-file limit",
        good().file("demo/big", &big).gz(),
        "demo/big",
        Limits {
            max_entry_bytes: 1 << 20,
            ..Limits::default()
        },
        |e| matches!(e, PackageError::EntryTooLarge { .. }),
    );
    limited(
        "decompression bomb over the total limit",
        good()
            .file("demo/big1", &big)
            .file("demo/big2", &big)
            .file("demo/big3", &big)
            .gz(),
        "demo/big3",
        Limits {
            max_unpacked_bytes: 8 << 20,
            ..Limits::default()
        },
        |e| matches!(e, PackageError::UnpackedTooLarge { .. }),
    );

    let mut expecting = |name, archive, mentions, expect: Expectations, check: Check| {
        rows.push(Case {
            name,
            archive,
            limits: Limits::default(),
            expect,
            check,
            mentions,
        });
    };
    expecting(
        "package for another component",
        good().gz(),
        "`demo-worker`",
        Expectations {
            component: Some("demo-worker".into()),
            ..Expectations::default()
        },
        |e| matches!(e, PackageError::ComponentMismatch { .. }),
    );
    expecting(
        "binary for another architecture",
        Archive::new()
            .dir("demo/")
            .file_mode("demo/demo", 0o755, &elf_arm)
            .gz(),
        "demo/demo",
        Expectations {
            os: Some("linux".into()),
            arch: Some("x86_64".into()),
            ..Expectations::default()
        },
        |e| matches!(e, PackageError::WrongTarget { found, .. } if found == "linux/aarch64"),
    );
    expecting(
        "manifest for another architecture",
        good()
            .manifest(&manifest_for(
                &[
                    ("demo/demo", 0o755, script),
                    ("demo/conf/a.toml", 0o644, conf),
                ],
                r#","os":"linux","arch":"riscv64""#,
            ))
            .gz(),
        "linux/riscv64",
        Expectations {
            os: Some("linux".into()),
            arch: Some("x86_64".into()),
            ..Expectations::default()
        },
        |e| matches!(e, PackageError::WrongTarget { .. }),
    );
    rows
}

/// Every path under `root`, relative, sorted.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            out.push(
                entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .display()
                    .to_string(),
            );
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_hostile_package_is_refused_with_its_own_error_and_writes_nothing_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let abs_target = tmp.path().join("absolute-target");
    let mut failures = Vec::new();
    let rows = cases(abs_target.to_str().unwrap());
    assert!(rows.len() >= 50, "the table lost rows: {}", rows.len());
    for (index, row) in rows.into_iter().enumerate() {
        // Nested so `..` entries would land in `jail/` (or above) if they escaped.
        let work = tmp.path().join(format!("row-{index}"));
        let jail = work.join("jail");
        std::fs::create_dir_all(&jail).unwrap();
        let package = work.join("package.tar.gz");
        std::fs::write(&package, &row.archive).unwrap();
        let dest = jail.join("dest");

        match inspect_expecting(&package, &row.limits, &row.expect) {
            Ok(_) => failures.push(format!("{}: inspect accepted it", row.name)),
            Err(e) if !(row.check)(&e) => {
                failures.push(format!("{}: inspect gave the wrong error: {e:?}", row.name))
            }
            Err(e) if !e.to_string().contains(row.mentions) => failures.push(format!(
                "{}: inspect's message does not mention `{}`: {e}",
                row.name, row.mentions
            )),
            Err(_) => {}
        }
        match unpack_verified(&package, &dest, &row.limits, &row.expect) {
            Ok(_) => failures.push(format!("{}: unpack accepted it", row.name)),
            Err(e) if !(row.check)(&e) => {
                failures.push(format!("{}: unpack gave the wrong error: {e:?}", row.name))
            }
            Err(_) => {}
        }
        let left = listing(&work);
        if left != ["jail", "package.tar.gz"] {
            failures.push(format!(
                "{}: files left behind after the refusal: {left:?}",
                row.name
            ));
        }
        if abs_target.exists() {
            failures.push(format!("{}: wrote the absolute path", row.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_rows_are_hostile_only_in_the_way_they_say() {
    // Control: the base archive every row starts from is accepted, so each refusal comes from the row's change.
    let tmp = tempfile::tempdir().unwrap();
    let package = tmp.path().join("good.tar.gz");
    std::fs::write(&package, good().gz()).unwrap();
    let info = inspect_expecting(&package, &Limits::default(), &Expectations::default()).unwrap();
    assert_eq!(info.manifest.component, "demo");
    assert_eq!(info.manifest.files.len(), 2);
    unpack_verified(
        &package,
        &tmp.path().join("dest"),
        &Limits::default(),
        &Expectations::default(),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("dest/demo/conf/a.toml")).unwrap(),
        b"a = 1\n"
    );
    // The format-1 rows' control: a package built before format 2 (sha256 digests, manifest first) is accepted.
    let format_1 = tmp.path().join("format-1.tar.gz");
    std::fs::write(
        &format_1,
        format_1_package(&[
            ("demo/demo", 0o755, b"#!/bin/sh\necho ok\n"),
            ("demo/conf/a.toml", 0o644, b"a = 1\n"),
        ]),
    )
    .unwrap();
    let info = inspect_expecting(&format_1, &Limits::default(), &Expectations::default()).unwrap();
    assert_eq!(info.manifest.format, 1);
    assert_eq!(
        info.manifest.file("demo/conf/a.toml").unwrap().digest,
        sha256(b"a = 1\n")
    );
    unpack_verified(
        &format_1,
        &tmp.path().join("dest-format-1"),
        &Limits::default(),
        &Expectations::default(),
    )
    .unwrap();
}
