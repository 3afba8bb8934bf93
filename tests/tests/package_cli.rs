//! `patchctl package build` and `patchctl package inspect` as an operator runs them: the real binary, a base
//! package made with GNU tar the way the tiup docs do it, and hostile packages made with GNU tar too.

use patchd_e2e::{blake3_file, patchctl, patchctl_ok, sha256_file};
use patchd_package::digest::{DEFAULT_CHUNK_SIZE, tree_digest_file};
use patchd_package::{Expectations, Limits, unpack_verified};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs GNU tar in `dir` (the operator's tool), panicking with its stderr on failure.
fn tar(dir: &Path, args: &[&str]) {
    let out = Command::new("tar")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("GNU tar is installed");
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `demo-worker-v1.0.0-linux-amd64.tar.gz` made with `tar czf` from a release directory, as tiup ships them.
fn base_package(root: &Path) -> PathBuf {
    let release = root.join("release");
    write(
        &release.join("demo-worker/demo-worker"),
        b"#!/bin/sh\necho v1.0.0\n",
        0o755,
    );
    write(
        &release.join("demo-worker/conf/worker.toml"),
        b"threads = 4\n",
        0o644,
    );
    let base = root.join("demo-worker-v1.0.0-linux-amd64.tar.gz");
    tar(&release, &["czf", base.to_str().unwrap(), "demo-worker"]);
    base
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn build_then_inspect_a_hotfix_with_the_real_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = base_package(tmp.path());
    let new_binary = tmp.path().join("build/demo-worker");
    write(&new_binary, b"#!/bin/sh\necho v1.0.1-hotfix\n", 0o700);
    let hotfix = tmp.path().join("out/demo-worker-hotfix.tar.gz");
    fs::create_dir_all(hotfix.parent().unwrap()).unwrap();

    // The base, as released: no manifest, one is computed.
    let base_info = json(&patchctl_ok(
        &home,
        &[
            "--format",
            "json",
            "package",
            "inspect",
            base.to_str().unwrap(),
        ],
    ));
    assert_eq!(base_info["manifest"]["component"], "demo-worker");
    assert_eq!(base_info["manifest"]["version"], "v1.0.0");
    assert_eq!(base_info["manifest_embedded"], false);
    assert_eq!(base_info["package_sha256"], sha256_file(&base));

    let replace = format!("demo-worker/demo-worker={}", new_binary.display());
    let built = patchctl_ok(
        &home,
        &[
            "package",
            "build",
            "--base",
            base.to_str().unwrap(),
            "--replace",
            &replace,
            "--version",
            "v1.0.1-hotfix",
            "-o",
            hotfix.to_str().unwrap(),
        ],
    );
    let tree_digest = tree_digest_file(&hotfix, DEFAULT_CHUNK_SIZE).unwrap();
    assert!(
        built.contains(&tree_digest),
        "build prints the tree digest:\n{built}"
    );
    assert!(
        built.contains(&sha256_file(&hotfix)),
        "build prints the package sha256:\n{built}"
    );
    assert!(
        built.contains("replaced") && built.contains("demo-worker/demo-worker"),
        "{built}"
    );

    let info = json(&patchctl_ok(
        &home,
        &[
            "package",
            "inspect",
            hotfix.to_str().unwrap(),
            "--format",
            "json",
        ],
    ));
    assert_eq!(info["path"], hotfix.to_str().unwrap());
    assert_eq!(info["manifest_embedded"], true);
    assert_eq!(info["manifest"]["version"], "v1.0.1-hotfix");
    assert_eq!(info["tree_digest"], tree_digest);
    assert_eq!(info["size"], fs::metadata(&hotfix).unwrap().len());
    let files = info["manifest"]["files"].as_array().unwrap();
    let binary = files
        .iter()
        .find(|f| f["path"] == "demo-worker/demo-worker")
        .unwrap();
    assert_eq!(binary["digest"], blake3_file(&new_binary));
    assert_eq!(
        binary["mode"], 0o755,
        "the base's mode is kept, not the local file's 0700"
    );
    let conf = files
        .iter()
        .find(|f| f["path"] == "demo-worker/conf/worker.toml")
        .unwrap();
    assert_eq!(
        conf["digest"],
        blake3_file(&tmp.path().join("release/demo-worker/conf/worker.toml"))
    );

    let text = patchctl_ok(&home, &["package", "inspect", hotfix.to_str().unwrap()]);
    // Each file's digest, cut to its algorithm and 12 hex digits.
    let binary_digest = blake3_file(&new_binary);
    for needle in [
        "demo-worker",
        "v1.0.1-hotfix",
        "embedded",
        &tree_digest,
        "0755",
        "demo-worker/conf/worker.toml",
        &binary_digest[.."blake3:".len() + 12],
    ] {
        assert!(
            text.contains(needle),
            "inspect text lacks `{needle}`:\n{text}"
        );
    }

    // What an agent stages from it is exactly the new binary, with the base's mode.
    let staged = tmp.path().join("staging");
    let expect = Expectations {
        component: Some("demo-worker".into()),
        ..Expectations::default()
    };
    unpack_verified(&hotfix, &staged, &Limits::default(), &expect).unwrap();
    assert_eq!(
        fs::read(staged.join("demo-worker/demo-worker")).unwrap(),
        b"#!/bin/sh\necho v1.0.1-hotfix\n"
    );

    // GNU tar reads it too (the format is plain tar.gz) and finds the manifest first.
    let listing = Command::new("tar")
        .args(["tzf", hotfix.to_str().unwrap()])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert_eq!(
        listing.lines().next(),
        Some("patchd-manifest.json"),
        "{listing}"
    );
}

#[test]
fn hostile_and_broken_packages_exit_1_naming_the_entry_and_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let work = tmp.path().join("work");
    write(&work.join("demo-worker/demo-worker"), b"bin", 0o755);
    write(&work.join("README"), b"hi", 0o644);
    let outside = tmp.path().join("outside-file");
    write(&outside, b"pwned", 0o644);

    let dotdot = tmp.path().join("dotdot.tar.gz");
    tar(
        &work,
        &[
            "czPf",
            dotdot.to_str().unwrap(),
            "demo-worker",
            "../outside-file",
        ],
    );
    let absolute = tmp.path().join("absolute.tar.gz");
    tar(
        &work,
        &[
            "czPf",
            absolute.to_str().unwrap(),
            "demo-worker",
            outside.to_str().unwrap(),
        ],
    );
    let at_root = tmp.path().join("root-file.tar.gz");
    tar(
        &work,
        &["czf", at_root.to_str().unwrap(), "demo-worker", "README"],
    );
    let truncated = tmp.path().join("truncated.tar.gz");
    let whole = fs::read(base_package(tmp.path())).unwrap();
    fs::write(&truncated, &whole[..whole.len() - 10]).unwrap();

    let rows: [(&Path, &[&str]); 4] = [
        (
            &dotdot,
            &["../outside-file", "`..` path components are refused"],
        ),
        (
            &absolute,
            &[outside.to_str().unwrap(), "absolute paths are refused"],
        ),
        (
            &at_root,
            &["README", "files at the archive root are refused"],
        ),
        (&truncated, &["corrupt or truncated gzip"]),
    ];
    for (package, needles) in rows {
        let out = patchctl(&home, &["package", "inspect", package.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            package.display(),
            stderr(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "nothing on stdout for a refused package"
        );
        let message = stderr(&out);
        for needle in needles {
            assert!(
                message.contains(needle),
                "{}: stderr lacks `{needle}`:\n{message}",
                package.display()
            );
        }
        // A refused base cannot be built upon either.
        let replace = format!("demo-worker/demo-worker={}", outside.display());
        let out_path = tmp.path().join("never.tar.gz");
        let build = patchctl(
            &home,
            &[
                "package",
                "build",
                "--base",
                package.to_str().unwrap(),
                "--replace",
                &replace,
                "-o",
                out_path.to_str().unwrap(),
            ],
        );
        assert_eq!(build.status.code(), Some(1), "{}", stderr(&build));
        assert!(!out_path.exists());
    }
}

#[test]
fn build_mistakes_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = base_package(tmp.path());
    let local = tmp.path().join("new");
    write(&local, b"new", 0o755);
    let out_path = tmp.path().join("hotfix.tar.gz");
    let base_arg = base.to_str().unwrap();
    let out_arg = out_path.to_str().unwrap();

    // A path the base does not hold: the error lists the similar one and mentions --add.
    let wrong = format!("demo-worker/bin/demo-worker={}", local.display());
    let out = patchctl(
        &home,
        &[
            "package",
            "build",
            "--base",
            base_arg,
            "--replace",
            &wrong,
            "-o",
            out_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(
        message.contains("similar: demo-worker/demo-worker") && message.contains("--add"),
        "{message}"
    );

    // A malformed mapping and a build with nothing to change are usage errors.
    let out = patchctl(
        &home,
        &[
            "package",
            "build",
            "--base",
            base_arg,
            "--replace",
            "no-equals-sign",
            "-o",
            out_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = patchctl(
        &home,
        &["package", "build", "--base", base_arg, "-o", out_arg],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!out_path.exists());

    // --add puts a new file in, JSON output lists it.
    let add = format!("demo-worker/bin/helper={}", local.display());
    let built = json(&patchctl_ok(
        &home,
        &[
            "--format", "json", "package", "build", "--base", base_arg, "--add", &add, "-o",
            out_arg,
        ],
    ));
    assert_eq!(built["added"][0], "demo-worker/bin/helper");
    assert_eq!(built["manifest"]["version"], "v1.0.0-hotfix");
    assert_eq!(built["package_sha256"], sha256_file(&out_path));
}
