//! Happy paths: pack, build a hotfix, inspect, unpack and verify, on realistic trees; deterministic output.
// Test code: helpers may panic like the tests (clippy treats only `#[test]` functions as tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchd_package::digest::{DEFAULT_CHUNK_SIZE, tree_digest_file};
use patchd_package::{
    BuildSpec, Expectations, Limits, MANIFEST_FILE, PackageError, build, build_with, inspect,
    pack_dir, unpack_verified, unpack_verified_from, verify_tree, verify_tree_trusting,
};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn sha256(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// A file's digest as manifests of format 2 write it: BLAKE3, from the `blake3` crate itself.
fn blake3(data: &[u8]) -> String {
    format!("blake3:{}", ::blake3::hash(data).to_hex())
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// `root/demo-worker/…` as an upstream release lays it out.
fn release_tree(root: &Path) -> PathBuf {
    let dir = root.join("demo-worker");
    write(&dir.join("demo-worker"), b"#!/bin/sh\necho v1.0.0\n", 0o755);
    write(&dir.join("conf/worker.toml"), b"threads = 4\n", 0o640);
    fs::create_dir_all(dir.join("logs")).unwrap();
    std::os::unix::fs::symlink("demo-worker", dir.join("current")).unwrap();
    dir
}

/// An upstream package made with the `tar` crate from disk: no manifest, as tiup ships them.
fn upstream_package(root: &Path) -> PathBuf {
    let dir = release_tree(root);
    let out = root.join("demo-worker-v1.0.0-linux-amd64.tar.gz");
    let gz =
        flate2::write::GzEncoder::new(fs::File::create(&out).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all("demo-worker", &dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    out
}

fn archive_entries(package: &Path) -> Vec<(String, u64, u64, u64)> {
    let gz = flate2::read::GzDecoder::new(fs::File::open(package).unwrap());
    let mut archive = tar::Archive::new(gz);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
            )
        })
        .collect()
}

#[test]
fn upstream_package_without_manifest_gets_a_computed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let info = inspect(&base, &Limits::default()).unwrap();
    assert!(!info.manifest_embedded);
    assert_eq!(info.manifest.component, "demo-worker");
    assert_eq!(
        info.manifest.version, "v1.0.0",
        "taken from the tiup-style file name"
    );
    let paths: Vec<&str> = info
        .manifest
        .files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(
        paths,
        ["demo-worker/conf/worker.toml", "demo-worker/demo-worker"]
    );
    let binary = info.manifest.file("demo-worker/demo-worker").unwrap();
    assert_eq!(binary.mode, 0o755);
    assert_eq!(binary.digest, blake3(b"#!/bin/sh\necho v1.0.0\n"));
    assert_eq!(info.manifest.symlinks.len(), 1);
    assert_eq!(info.manifest.symlinks[0].target, "demo-worker");
    let bytes = fs::read(&base).unwrap();
    assert_eq!(info.package_sha256, sha256(&bytes));
    assert_eq!(info.size, bytes.len() as u64);
    assert_eq!(
        info.tree_digest,
        tree_digest_file(&base, DEFAULT_CHUNK_SIZE).unwrap()
    );
}

#[test]
fn build_inspect_unpack_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let new_binary = tmp.path().join("new-worker");
    // The local file's own mode does not matter: the package keeps the base's 0755.
    write(&new_binary, b"#!/bin/sh\necho v1.0.1\n", 0o600);
    let out = tmp.path().join("out/hotfix.tar.gz");
    fs::create_dir_all(out.parent().unwrap()).unwrap();

    let replacements = [("demo-worker/demo-worker".to_owned(), new_binary.clone())];
    let built = build(&base, &replacements, Some("v1.0.1-hotfix"), &out).unwrap();
    assert!(built.manifest_embedded);
    assert_eq!(built.manifest.version, "v1.0.1-hotfix");
    let binary = built.manifest.file("demo-worker/demo-worker").unwrap();
    assert_eq!(
        (binary.mode, binary.digest.as_str()),
        (0o755, blake3(b"#!/bin/sh\necho v1.0.1\n").as_str())
    );
    let conf = built.manifest.file("demo-worker/conf/worker.toml").unwrap();
    assert_eq!(
        (conf.mode, conf.digest.as_str()),
        (0o640, blake3(b"threads = 4\n").as_str())
    );
    assert_eq!(
        inspect(&out, &Limits::default()).unwrap(),
        built,
        "inspect agrees with what build reported"
    );
    assert_eq!(
        built.tree_digest,
        tree_digest_file(&out, DEFAULT_CHUNK_SIZE).unwrap()
    );

    // Manifest first, then the tree in order, every header with a fixed mtime and root ownership.
    let entries = archive_entries(&out);
    assert_eq!(entries[0].0, MANIFEST_FILE);
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        [
            MANIFEST_FILE,
            "demo-worker/",
            "demo-worker/conf/",
            "demo-worker/conf/worker.toml",
            "demo-worker/current",
            "demo-worker/demo-worker",
            "demo-worker/logs/",
        ]
    );
    assert!(entries.iter().all(|e| (e.1, e.2, e.3) == (0, 0, 0)));
    // No work files left next to the output.
    assert_eq!(fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);

    let dest = tmp.path().join("staging");
    let expect = Expectations {
        component: Some("demo-worker".into()),
        ..Expectations::default()
    };
    let manifest = unpack_verified(&out, &dest, &Limits::default(), &expect).unwrap();
    assert_eq!(manifest, built.manifest);
    assert_eq!(
        fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        fs::read(dest.join("demo-worker/demo-worker")).unwrap(),
        b"#!/bin/sh\necho v1.0.1\n"
    );
    assert_eq!(
        fs::metadata(dest.join("demo-worker/demo-worker"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    assert_eq!(
        fs::read_link(dest.join("demo-worker/current")).unwrap(),
        Path::new("demo-worker")
    );
    assert!(dest.join("demo-worker/logs").is_dir());
    assert!(
        !dest.join(MANIFEST_FILE).exists(),
        "the manifest is returned, not written into the tree"
    );
    verify_tree(&dest, &manifest).unwrap();

    // verify_tree notices a changed byte, a changed mode and a stray file.
    fs::write(dest.join("demo-worker/conf/worker.toml"), b"threads = 5\n").unwrap();
    fs::set_permissions(
        dest.join("demo-worker/conf/worker.toml"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    assert!(matches!(
        verify_tree(&dest, &manifest),
        Err(PackageError::TreeMismatch { .. })
    ));
    fs::write(dest.join("demo-worker/conf/worker.toml"), b"threads = 4\n").unwrap();
    verify_tree(&dest, &manifest).unwrap();
    fs::set_permissions(
        dest.join("demo-worker/demo-worker"),
        fs::Permissions::from_mode(0o775),
    )
    .unwrap();
    assert!(matches!(
        verify_tree(&dest, &manifest),
        Err(PackageError::TreeMismatch { .. })
    ));
    fs::set_permissions(
        dest.join("demo-worker/demo-worker"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::write(dest.join("demo-worker/stray"), b"x").unwrap();
    assert!(matches!(
        verify_tree(&dest, &manifest),
        Err(PackageError::TreeMismatch { .. })
    ));
}

/// Every entry below `root`: path, kind, mode, and content or link target.
fn tree_snapshot(root: &Path) -> Vec<(String, String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                stack.push(path.clone());
                out.push((rel, "dir".into(), mode, Vec::new()));
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.push((
                    rel,
                    "link".into(),
                    0,
                    target.into_os_string().into_encoded_bytes(),
                ));
            } else {
                out.push((rel, "file".into(), mode, fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Hands out at most `piece` bytes per read (as chunks arrive), then fails after `fail_after` bytes if set.
struct Trickle<'a> {
    bytes: &'a [u8],
    piece: usize,
    fail_after: Option<usize>,
    given: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.fail_after.is_some_and(|limit| self.given >= limit) {
            return Err(std::io::Error::other("the upload stopped"));
        }
        let n = buf.len().min(self.piece).min(self.bytes.len() - self.given);
        buf[..n].copy_from_slice(&self.bytes[self.given..self.given + n]);
        self.given += n;
        Ok(n)
    }
}

#[test]
fn unpack_from_a_reader_writes_what_unpack_from_the_file_writes() {
    let tmp = tempfile::tempdir().unwrap();
    // No manifest: the version comes from the name the package goes by, file or not.
    let base = upstream_package(tmp.path());
    let bytes = fs::read(&base).unwrap();
    let (limits, expect) = (Limits::default(), Expectations::default());
    let from_file = tmp.path().join("from-file");
    let manifest = unpack_verified(&base, &from_file, &limits, &expect).unwrap();
    assert_eq!(manifest.version, "v1.0.0");

    let from_reader = tmp.path().join("from-reader");
    let source = Trickle {
        bytes: &bytes,
        piece: 1000,
        fail_after: None,
        given: 0,
    };
    let streamed = unpack_verified_from(
        &mut std::io::BufReader::with_capacity(1000, source),
        bytes.len() as u64,
        &base,
        &from_reader,
        &limits,
        &expect,
    )
    .unwrap();
    assert_eq!(streamed, manifest);
    assert_eq!(tree_snapshot(&from_reader), tree_snapshot(&from_file));
    assert!(!tree_snapshot(&from_file).is_empty());

    // A source that fails mid-way is an I/O error naming the package, and leaves nothing behind.
    let broken = tmp.path().join("broken");
    let source = Trickle {
        bytes: &bytes,
        piece: 1000,
        fail_after: Some(bytes.len() / 2),
        given: 0,
    };
    let err = unpack_verified_from(
        &mut std::io::BufReader::with_capacity(1000, source),
        bytes.len() as u64,
        &base,
        &broken,
        &limits,
        &expect,
    )
    .unwrap_err();
    assert!(
        matches!(&err, PackageError::Io { path, .. } if *path == base),
        "{err:?}"
    );
    assert!(!broken.exists(), "{:?}", tree_snapshot(&broken));

    // A source longer than announced is refused too.
    let source = Trickle {
        bytes: &bytes,
        piece: 1000,
        fail_after: None,
        given: 0,
    };
    let err = unpack_verified_from(
        &mut std::io::BufReader::with_capacity(1000, source),
        bytes.len() as u64 - 1,
        &base,
        &broken,
        &limits,
        &expect,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("changed while it was read"),
        "{err}"
    );
    assert!(!broken.exists());
}

#[test]
fn verify_tree_trusting_reads_only_files_the_caller_cannot_vouch_for() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let dest = tmp.path().join("dest");
    let manifest =
        unpack_verified(&base, &dest, &Limits::default(), &Expectations::default()).unwrap();
    // Same size and mode, other bytes.
    fs::write(
        dest.join("demo-worker/conf/worker.toml"),
        b"threads = 8
",
    )
    .unwrap();
    let changed = "demo-worker/conf/worker.toml";
    assert!(matches!(
        verify_tree(&dest, &manifest),
        Err(PackageError::TreeMismatch { .. })
    ));
    assert!(matches!(
        verify_tree_trusting(&dest, &manifest, |_, _| false),
        Err(PackageError::TreeMismatch { .. })
    ));
    // Vouched for: its content is not read, so the change goes unseen (the caller's record must be sound).
    verify_tree_trusting(&dest, &manifest, |path, _| path == changed).unwrap();
    // Vouching covers the content only: size, mode and stray entries are still checked.
    fs::write(
        dest.join(changed),
        b"threads = 16
",
    )
    .unwrap();
    assert!(matches!(
        verify_tree_trusting(&dest, &manifest, |_, _| true),
        Err(PackageError::TreeMismatch { .. })
    ));
    fs::write(
        dest.join(changed),
        b"threads = 4
",
    )
    .unwrap();
    fs::write(dest.join("demo-worker/stray"), b"x").unwrap();
    assert!(matches!(
        verify_tree_trusting(&dest, &manifest, |_, _| true),
        Err(PackageError::TreeMismatch { .. })
    ));
}

#[test]
fn builds_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let new_binary = tmp.path().join("new-worker");
    write(&new_binary, b"new", 0o755);
    let replacements = [("demo-worker/demo-worker".to_owned(), new_binary)];
    let first = tmp.path().join("a.tar.gz");
    let second = tmp.path().join("b.tar.gz");
    let a = build(&base, &replacements, None, &first).unwrap();
    // Time moves on and file times change between the two builds: the output must not.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = build(&base, &replacements, None, &second).unwrap();
    assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());
    assert_eq!(a.tree_digest, b.tree_digest);
    assert_eq!(
        a.manifest.version, "v1.0.0-hotfix",
        "default label derives from the base version"
    );
}

#[test]
fn replacing_a_path_the_base_does_not_hold_names_similar_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let local = tmp.path().join("x");
    write(&local, b"x", 0o755);
    let out = tmp.path().join("out.tar.gz");
    let err = build(
        &base,
        &[("demo-worker/bin/demo-worker".to_owned(), local.clone())],
        None,
        &out,
    )
    .unwrap_err();
    match &err {
        PackageError::ReplaceTargetMissing { similar, .. } => {
            assert_eq!(similar, &["demo-worker/demo-worker"])
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("--add"), "{err}");
    let err = build(
        &base,
        &[("demo-worker/current".to_owned(), local)],
        None,
        &out,
    )
    .unwrap_err();
    assert!(
        matches!(err, PackageError::BadReplacement { .. }),
        "{err:?}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".patchd")),
        "{leftovers:?}"
    );
}

#[test]
fn additions_and_elf_target_detection() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let exe = std::env::current_exe().unwrap();
    let tool = tmp.path().join("tool");
    write(&tool, b"#!/bin/sh\n", 0o775);
    let out = tmp.path().join("out.tar.gz");
    let spec = BuildSpec {
        base: &base,
        replacements: &[("demo-worker/demo-worker".to_owned(), exe.clone())],
        additions: &[("demo-worker/bin/tool".to_owned(), tool.clone())],
        version: Some("v2"),
    };
    let info = build_with(&spec, &out).unwrap();
    assert_eq!(info.manifest.os.as_deref(), Some(std::env::consts::OS));
    assert_eq!(info.manifest.arch.as_deref(), Some(std::env::consts::ARCH));
    assert_eq!(
        info.manifest.file("demo-worker/bin/tool").unwrap().mode,
        0o755,
        "group write dropped"
    );
    let expect = Expectations::for_this_host(Some("demo-worker".into()));
    unpack_verified(&out, &tmp.path().join("dest"), &Limits::default(), &expect).unwrap();

    let again = BuildSpec {
        additions: &[("demo-worker/conf/worker.toml".to_owned(), tool)],
        ..spec
    };
    let err = build_with(&again, &tmp.path().join("again.tar.gz")).unwrap_err();
    assert!(err.to_string().contains("--replace"), "{err}");
}

#[test]
fn unpack_refuses_a_non_empty_destination_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let base = upstream_package(tmp.path());
    let dest = tmp.path().join("dest");
    write(&dest.join("keep"), b"mine", 0o644);
    let err =
        unpack_verified(&base, &dest, &Limits::default(), &Expectations::default()).unwrap_err();
    assert!(
        matches!(err, PackageError::DestinationNotEmpty { .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"mine");
}

#[test]
fn gnu_style_archives_with_dot_prefix_pax_headers_and_hard_links_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c.tgz");
    let gz =
        flate2::write::GzEncoder::new(fs::File::create(&out).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut global = tar::Header::new_ustar();
    let record = b"52 comment=0123456789abcdef0123456789abcdef01234567\n";
    global.set_entry_type(tar::EntryType::XGlobalHeader);
    global.set_size(record.len() as u64);
    global.set_path("pax_global_header").unwrap();
    global.set_cksum();
    tar.append(&global, &record[..]).unwrap();
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "./", std::io::empty()).unwrap();
    tar.append_data(&mut dir, "./c/", std::io::empty()).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o755);
    file.set_size(5);
    let long = format!("./c/{}/bin", "very-long-directory-name".repeat(6));
    tar.append_data(&mut file, format!("{long}/tool"), &b"tool\n"[..])
        .unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Link);
    link.set_size(0);
    tar.append_link(&mut link, "./c/tool-copy", format!("{long}/tool"))
        .unwrap();
    tar.into_inner().unwrap().finish().unwrap();

    let info = inspect(&out, &Limits::default()).unwrap();
    assert_eq!(info.manifest.component, "c");
    assert_eq!(info.manifest.files.len(), 2);
    let dest = tmp.path().join("dest");
    unpack_verified(&out, &dest, &Limits::default(), &Expectations::default()).unwrap();
    let mut copy = String::new();
    fs::File::open(dest.join("c/tool-copy"))
        .unwrap()
        .read_to_string(&mut copy)
        .unwrap();
    assert_eq!(copy, "tool\n");
    assert_eq!(
        fs::metadata(dest.join("c/tool-copy"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
}

#[test]
fn pack_dir_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = release_tree(tmp.path());
    let out = tmp.path().join("p.tar.gz");
    let info = pack_dir(&dir, "v9", &out).unwrap();
    assert!(info.manifest_embedded);
    assert_eq!(info.manifest.version, "v9");
    let manifest = unpack_verified(
        &out,
        &tmp.path().join("d"),
        &Limits::default(),
        &Expectations::default(),
    )
    .unwrap();
    verify_tree(&tmp.path().join("d"), &manifest).unwrap();
}

#[test]
fn pack_dir_refuses_names_with_format_characters_or_not_in_nfc() {
    for name in ["invoice\u{202e}fdp.sh", "cafe\u{301}.conf"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = release_tree(tmp.path());
        write(&dir.join(name), b"x", 0o644);
        let err = pack_dir(&dir, "v9", &tmp.path().join("p.tar.gz")).unwrap_err();
        assert!(
            matches!(err, PackageError::UnsafeUnicode { .. }),
            "{name:?}: {err}"
        );
        assert!(!tmp.path().join("p.tar.gz").exists(), "nothing written");
    }
}
