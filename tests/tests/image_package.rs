//! Image packages end to end: a real image built in the real Docker Engine from the project's `demo-worker`
//! binary, packaged by `patchctl package build --image` from its reference (exported over the engine's socket)
//! and from a `docker save` archive, shown by `package inspect`, loaded back into the engine under the same ID;
//! and every broken or altered image package refused with exit 1 before anything reaches an agent, as is a build
//! from an engine that does not answer (its socket named) or lacks the image.
//! Needs a Docker Engine on /var/run/docker.sock: fails (never skips) without one.

use patchd_e2e::cluster_fixture::ClusterFixture;
use patchd_e2e::docker::DockerTest;
use patchd_e2e::{bin, blake3_file, patchctl, patchctl_ok};
use patchd_package::{Expectations, Limits, unpack_verified};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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

/// An image of the real `demo-worker` binary (FROM scratch plus its shared libraries), tagged `tag`.
fn demo_worker_image(docker: &DockerTest, tag: &str) -> String {
    docker.build_image(
        tag,
        &bin("demo-worker"),
        &["/demo-worker", "--listen", "0.0.0.0:8080"],
    )
}

/// Unpacks `package` with GNU tar, lets `alter` change the tree, and packs it again (manifest first), as someone
/// tampering with a package by hand would.
fn repack(package: &Path, alter: impl FnOnce(&Path)) {
    let work = tempfile::tempdir().unwrap();
    tar(work.path(), &["xzf", package.to_str().unwrap()]);
    alter(work.path());
    let mut entries: Vec<String> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "patchd-manifest.json")
        .collect();
    entries.sort();
    let mut args = vec![
        "czf".to_owned(),
        package.to_str().unwrap().to_owned(),
        "patchd-manifest.json".to_owned(),
    ];
    args.extend(entries);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tar(work.path(), &args);
}

fn edit_manifest(tree: &Path, edit: impl FnOnce(&mut Value)) {
    let path = tree.join("patchd-manifest.json");
    let mut manifest = json(&fs::read_to_string(&path).unwrap());
    edit(&mut manifest);
    fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn an_image_of_a_project_binary_is_packaged_by_reference_and_from_an_archive() {
    let docker = DockerTest::connect("image-pkg");
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let tag = docker.name("worker:v2-hotfix");
    let component = docker.name("worker");
    let id = demo_worker_image(&docker, &tag);
    let engine_view = docker.inspect_image(&id).expect("the image just built");
    let engine_layers = engine_view.root_fs.unwrap().layers.unwrap();

    // By reference: exported from the engine over its socket; component and version from the tag.
    let by_reference = tmp.path().join("by-reference.tar.gz");
    let built = json(&patchctl_ok(
        &home,
        &[
            "--format",
            "json",
            "package",
            "build",
            "--image",
            &tag,
            "-o",
            by_reference.to_str().unwrap(),
        ],
    ));
    let manifest = &built["manifest"];
    assert_eq!(manifest["component"], component.as_str());
    assert_eq!(manifest["version"], "v2-hotfix");
    assert_eq!(manifest["os"], "linux");
    assert_eq!(manifest["arch"], std::env::consts::ARCH);
    let image = &manifest["image"];
    assert_eq!(
        image["id"],
        id.as_str(),
        "the package names the engine's image ID"
    );
    assert_eq!(image["repo_tags"], serde_json::json!([tag]));
    assert_eq!(
        (image["os"].as_str(), image["arch"].as_str()),
        (Some("linux"), engine_view.architecture.as_deref())
    );
    assert_eq!(image["layers"], serde_json::json!(engine_layers));
    let archive = image["archive"].as_str().unwrap().to_owned();
    assert_eq!(archive, format!("{component}/image.tar"));
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        files[0]["path"],
        archive.as_str(),
        "the archive is an ordinary, hashed file"
    );
    assert!(
        !tmp.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".patchd-")),
        "no temporary export left next to the output"
    );

    // From a `docker save` archive, with the component and version given.
    let saved = tmp.path().join("saved.tar");
    docker.save_image(&tag, &saved);
    let from_archive = tmp.path().join("from-archive.tar.gz");
    let built = json(&patchctl_ok(
        &home,
        &[
            "--format",
            "json",
            "package",
            "build",
            "--image",
            saved.to_str().unwrap(),
            "--component",
            "demo-worker",
            "--version",
            "v2.0.1",
            "-o",
            from_archive.to_str().unwrap(),
        ],
    ));
    assert_eq!(built["manifest"]["component"], "demo-worker");
    assert_eq!(built["manifest"]["version"], "v2.0.1");
    assert_eq!(built["manifest"]["image"]["id"], id.as_str());
    assert_eq!(
        built["manifest"]["image"]["archive"],
        "demo-worker/image.tar"
    );
    assert_eq!(
        built["manifest"]["files"][0]["digest"],
        blake3_file(&saved).as_str(),
        "the archive is packaged byte for byte"
    );

    // `inspect` shows the image: text and JSON.
    let text = patchctl_ok(
        &home,
        &["package", "inspect", from_archive.to_str().unwrap()],
    );
    assert!(text.contains(&format!("image        {id}")), "{text}");
    assert!(text.contains(&format!("tags         {tag}")), "{text}");
    assert!(
        text.contains(&format!(
            "image os     linux/{}",
            engine_view.architecture.as_deref().unwrap()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("layers       {}", engine_layers.len())),
        "{text}"
    );
    for layer in &engine_layers {
        assert!(
            text.contains(layer.as_str()),
            "{layer} missing from:\n{text}"
        );
    }
    let inspected = json(&patchctl_ok(
        &home,
        &[
            "--format",
            "json",
            "package",
            "inspect",
            from_archive.to_str().unwrap(),
        ],
    ));
    assert_eq!(inspected["manifest"], built["manifest"]);

    // The packaged archive is the image: removed from the engine and loaded back, it has the same ID.
    let unpacked = tmp.path().join("unpacked");
    unpack_verified(
        &from_archive,
        &unpacked,
        &Limits::default(),
        &Expectations::default(),
    )
    .unwrap();
    docker.remove_image(&id);
    assert!(docker.inspect_image(&id).is_none(), "the image was removed");
    let archive_bytes = fs::read(unpacked.join("demo-worker/image.tar")).unwrap();
    docker.block_on(async {
        use futures::StreamExt;
        let mut load = docker.client().import_image(
            bollard::query_parameters::ImportImageOptions::default(),
            bollard::body_full(archive_bytes.into()),
            None,
        );
        while let Some(step) = load.next().await {
            step.unwrap_or_else(|e| panic!("docker load of the packaged archive failed: {e}"));
        }
    });
    let loaded = docker
        .inspect_image(&tag)
        .expect("the tag is back after the load");
    assert_eq!(loaded.id.as_deref(), Some(id.as_str()));
}

#[test]
fn broken_or_altered_image_packages_are_refused_with_exit_1() {
    let docker = DockerTest::connect("image-pkg-bad");
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let tag_v1 = docker.name("worker:v1");
    let tag_v2 = docker.name("worker:v2");
    let id_v1 = demo_worker_image(&docker, &tag_v1);
    // A second, different image: the same binary under another path.
    let id_v2 = docker.build_image_with(
        &tag_v2,
        &[(&bin("demo-worker"), Some("/usr/bin/demo-worker"))],
        &["/usr/bin/demo-worker"],
    );
    assert_ne!(id_v1, id_v2);
    let saved_v1 = tmp.path().join("v1.tar");
    let saved_v2 = tmp.path().join("v2.tar");
    docker.save_image(&tag_v1, &saved_v1);
    docker.save_image(&tag_v2, &saved_v2);

    // Not a tar, and an archive whose config was altered: refused before any package is written.
    let out_path = tmp.path().join("out.tar.gz");
    let not_tar = tmp.path().join("not-a-tar.tar");
    fs::write(&not_tar, vec![b'x'; 4096]).unwrap();
    let out = patchctl(
        &home,
        &[
            "package",
            "build",
            "--image",
            not_tar.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a readable tar"),
        "{}",
        stderr(&out)
    );
    assert!(!out_path.exists());

    // An engine that does not answer is named by its socket; a reference it does not have is named too.
    let absent_socket = tmp.path().join("no-docker.sock");
    let out = Command::new(bin("patchctl"))
        .args(["package", "build", "--image", &tag_v1, "-o"])
        .arg(&out_path)
        .env("PATCHCTL_HOME", &home)
        .env("DOCKER_HOST", format!("unix://{}", absent_socket.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "no Docker Engine answers on {}",
            absent_socket.display()
        )),
        "{}",
        stderr(&out)
    );
    let missing = docker.name("worker:never-built");
    let out = patchctl(
        &home,
        &[
            "package",
            "build",
            "--image",
            &missing,
            "-o",
            out_path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("has no image `{missing}`")),
        "{}",
        stderr(&out)
    );
    assert!(!out_path.exists());

    let altered = tmp.path().join("altered");
    fs::create_dir(&altered).unwrap();
    tar(&altered, &["xf", saved_v1.to_str().unwrap()]);
    let config_name = format!("{}.json", id_v1.trim_start_matches("sha256:"));
    let config_path = altered.join(&config_name);
    let config = fs::read_to_string(&config_path).unwrap_or_else(|e| {
        panic!("the legacy docker-save layout names the config {config_name}: {e}")
    });
    fs::write(
        &config_path,
        config.replace("\"os\":\"linux\"", "\"os\":\"linux\" "),
    )
    .unwrap();
    let altered_tar = tmp.path().join("altered.tar");
    tar(&altered, &["cf", altered_tar.to_str().unwrap(), "."]);
    let out = patchctl(
        &home,
        &[
            "package",
            "build",
            "--image",
            altered_tar.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&config_name)
            && stderr(&out).contains("not the digest its name claims"),
        "{}",
        stderr(&out)
    );
    assert!(!out_path.exists());

    // A package whose manifest names another image ID than its archive holds (files still consistent).
    let package = tmp.path().join("demo-worker-image.tar.gz");
    patchctl_ok(
        &home,
        &[
            "package",
            "build",
            "--image",
            saved_v1.to_str().unwrap(),
            "--component",
            "demo-worker",
            "-o",
            package.to_str().unwrap(),
        ],
    );
    repack(&package, |tree| {
        edit_manifest(tree, |m| m["image"]["id"] = id_v2.clone().into())
    });
    let out = patchctl(&home, &["package", "inspect", package.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains(&id_v1) && message.contains(&id_v2),
        "names both IDs: {message}"
    );

    // A package whose archive was swapped for another image's, with the file hash updated to match.
    patchctl_ok(
        &home,
        &[
            "package",
            "build",
            "--image",
            saved_v1.to_str().unwrap(),
            "--component",
            "demo-worker",
            "-o",
            package.to_str().unwrap(),
        ],
    );
    let v2_digest = blake3_file(&saved_v2);
    let v2_size = fs::metadata(&saved_v2).unwrap().len();
    repack(&package, |tree| {
        fs::copy(&saved_v2, tree.join("demo-worker/image.tar")).unwrap();
        edit_manifest(tree, |m| {
            m["files"][0]["digest"] = v2_digest.clone().into();
            m["files"][0]["size"] = v2_size.into();
        })
    });
    let out = patchctl(&home, &["package", "inspect", package.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains(&id_v1) && message.contains(&id_v2),
        "names both IDs: {message}"
    );
    assert!(
        message.contains(package.to_str().unwrap()),
        "names the package: {message}"
    );

    // `patch` refuses it before anything reaches an agent: the node's state dir is untouched.
    let cluster_dir = tmp.path().join("cluster");
    fs::create_dir(&cluster_dir).unwrap();
    let cluster = ClusterFixture::with_workers(&cluster_dir, 1);
    let worker = cluster.workers().next().unwrap();
    let before = tree_listing(&worker.state_dir());
    let starts = worker.start_count();
    let out = cluster.patchctl(&["patch", &cluster.name, package.to_str().unwrap(), "-y"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains(&id_v1) && message.contains(&id_v2),
        "names both IDs: {message}"
    );
    assert_eq!(
        tree_listing(&worker.state_dir()),
        before,
        "nothing was uploaded"
    );
    assert_eq!(worker.start_count(), starts, "the service was not touched");
}

/// Every path under `dir` with its size, sorted.
fn tree_listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = fs::read_dir(&current) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                found.push((entry.path(), meta.len()));
            }
        }
    }
    found.sort();
    found
}
