//! Container image archives (`docker save` tars) inside packages: what identifies the image, read and checked.
//!
//! An image package holds a `docker save` archive as an ordinary file of its component directory, and the
//! manifest's [`ImageInfo`] says which image it is. The image ID is the sha256 of the image config JSON, the
//! same ID `docker load` prints and `docker inspect` reports, so the controller (before upload) and the agent
//! (before `load`) can prove the archive is the image the manifest names without an engine.
//!
//! Both layouts `docker save` writes are read: the legacy one (`manifest.json` + `<id>.json` + `<dir>/layer.tar`)
//! and the OCI one Docker 25+ writes (`index.json`, `blobs/sha256/<hex>`, still with a `manifest.json`); an OCI
//! layout without `manifest.json` is read through `index.json` and the image manifest blob. The archive is read
//! with seeks over a file, never buffered whole: only the small JSON documents are held, each bounded by
//! [`MAX_IMAGE_JSON_BYTES`].

use crate::PackageError;
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Largest config, `manifest.json`, `index.json` or OCI manifest accepted (real configs are a few KiB;
/// one with a long history stays far below this).
pub const MAX_IMAGE_JSON_BYTES: u64 = 8 * 1024 * 1024;

/// Which container image an image package carries (the `image` field of the package manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Path of the `docker save` archive relative to the package root (`demo-worker/image.tar`); also an
    /// entry of the manifest's `files`, so its sha256 and every hostile-package check apply to it.
    pub archive: String,
    /// Image ID, `sha256:<64 hex>`: the sha256 of the image config JSON.
    pub id: String,
    /// Repository tags recorded in the archive (`demo-worker:v2`), possibly none.
    pub repo_tags: Vec<String>,
    /// OS of the image config (`linux`).
    pub os: String,
    /// Architecture of the image config, in the engine's naming (`amd64`, `arm64`).
    pub arch: String,
    /// Layer digests of the image config (`rootfs.diff_ids`), bottom layer first.
    pub layers: Vec<String>,
}

impl ImageInfo {
    /// The first 12 hex digits of the image ID, as `docker images` shows it.
    pub fn short_id(&self) -> &str {
        let hex = self.id.strip_prefix("sha256:").unwrap_or(&self.id);
        hex.get(..12).unwrap_or(hex)
    }

    /// The architecture in Rust's naming (`std::env::consts::ARCH`: `x86_64`, `aarch64`), which the package
    /// manifest's `arch` and the agent's host checks use.
    pub fn host_arch(&self) -> String {
        engine_arch_to_host(&self.arch)
    }

    /// Checks the fields a manifest carries are well formed (used when a package manifest is parsed).
    pub(crate) fn check_self(&self) -> Result<(), String> {
        if !is_digest(&self.id) {
            return Err(format!(
                "image id `{}` is not `sha256:` followed by 64 lowercase hex digits",
                self.id
            ));
        }
        if let Some(layer) = self.layers.iter().find(|l| !is_digest(l)) {
            return Err(format!(
                "image layer `{layer}` is not `sha256:` followed by 64 lowercase hex digits"
            ));
        }
        Ok(())
    }
}

/// Maps an engine/OCI architecture name to Rust's (`amd64` → `x86_64`); unknown names pass through.
pub fn engine_arch_to_host(arch: &str) -> String {
    match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "386" => "x86",
        "arm" => "arm",
        "ppc64le" => "powerpc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
    .to_owned()
}

/// Reads a single-image `docker save` archive: image ID (config digest), tags, os/arch and layer digests.
/// `archive` of the result is empty; the caller sets it to the archive's path inside the package.
pub fn read_image_archive(path: &Path) -> Result<ImageInfo, PackageError> {
    let listing = list_archive(path)?;
    let target = match &listing.manifest_json {
        Some(bytes) => target_from_docker_manifest(path, bytes)?,
        None => match &listing.index_json {
            Some(bytes) => target_from_oci_index(path, &listing, bytes)?,
            None => {
                return Err(PackageError::ImageNoManifest {
                    path: path.to_owned(),
                });
            }
        },
    };
    let config_bytes = read_small_entry(path, &listing, &target.config, "image config")?
        .ok_or_else(|| PackageError::ImageConfigMissing {
            path: path.to_owned(),
            config: target.config.clone(),
        })?;
    let computed = sha256_hex(&config_bytes);
    if let Some(named) = digest_in_name(&target.config)
        && named != computed
    {
        return Err(PackageError::ImageConfigDigestMismatch {
            path: path.to_owned(),
            config: target.config.clone(),
            computed: format!("sha256:{computed}"),
        });
    }
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| PackageError::ImageInvalid {
            path: path.to_owned(),
            detail: format!("image config `{}` is not valid JSON: {e}", target.config),
        })?;
    for layer in &target.layers {
        if !listing.entries.contains_key(layer.as_str()) {
            return Err(PackageError::ImageInvalid {
                path: path.to_owned(),
                detail: format!("layer `{layer}` listed by the archive's manifest is missing"),
            });
        }
    }
    let layers = config.rootfs.diff_ids;
    if !target.layers.is_empty() && target.layers.len() != layers.len() {
        return Err(PackageError::ImageInvalid {
            path: path.to_owned(),
            detail: format!(
                "the archive's manifest lists {} layers but the image config {}",
                target.layers.len(),
                layers.len()
            ),
        });
    }
    let info = ImageInfo {
        archive: String::new(),
        id: format!("sha256:{computed}"),
        repo_tags: target.repo_tags,
        os: config.os,
        arch: config.architecture,
        layers,
    };
    info.check_self()
        .map_err(|detail| PackageError::ImageInvalid {
            path: path.to_owned(),
            detail,
        })?;
    Ok(info)
}

/// Checks that the archive at `path` is the image `expected` names: same image ID and layer digests.
pub fn verify_image_archive(path: &Path, expected: &ImageInfo) -> Result<(), PackageError> {
    let found = read_image_archive(path)?;
    if found.id != expected.id {
        return Err(PackageError::ImageIdMismatch {
            path: path.to_owned(),
            found: found.id,
            expected: expected.id.clone(),
        });
    }
    if found.layers != expected.layers {
        return Err(PackageError::ImageLayersMismatch {
            path: path.to_owned(),
            found: found.layers.join(", "),
            expected: expected.layers.join(", "),
        });
    }
    Ok(())
}

/// [`crate::inspect`], and for an image package also the proof that its archive is the image the manifest
/// names: the package is unpacked (every hostile-package check applies) into a temporary directory and the
/// archive's image ID and layers compared with the manifest's. What the controller runs before any upload.
pub fn inspect_verifying_image(
    package: &Path,
    limits: &crate::Limits,
    expect: &crate::Expectations,
) -> Result<crate::PackageInfo, PackageError> {
    let info = crate::inspect_expecting(package, limits, expect)?;
    let Some(image) = &info.manifest.image else {
        return Ok(info);
    };
    let work = tempfile::Builder::new()
        .prefix(".patchd-image-check-")
        .tempdir()
        .map_err(|e| {
            PackageError::io(
                "cannot create a temporary directory in",
                std::env::temp_dir(),
                e,
            )
        })?;
    let tree = work.path().join("tree");
    crate::unpack_verified(package, &tree, limits, expect)?;
    // Errors name the package the operator gave, not the temporary copy of its archive.
    verify_image_archive(&tree.join(&image.archive), image)
        .map_err(|err| err.at_package(package))?;
    Ok(info)
}

/// The image an archive's top-level manifest points at.
struct Target {
    config: String,
    repo_tags: Vec<String>,
    /// Layer entry names (empty when only known through the OCI manifest's blobs).
    layers: Vec<String>,
}

/// One pass over the archive: entry names and sizes, plus the small top-level documents.
struct Listing {
    entries: HashMap<String, u64>,
    manifest_json: Option<Vec<u8>>,
    index_json: Option<Vec<u8>>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciDescriptor {
    digest: String,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

fn target_from_docker_manifest(path: &Path, bytes: &[u8]) -> Result<Target, PackageError> {
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(bytes).map_err(|e| PackageError::ImageInvalid {
            path: path.to_owned(),
            detail: format!("manifest.json is not a docker-save manifest: {e}"),
        })?;
    let mut entries = entries.into_iter();
    match (entries.next(), entries.len()) {
        (None, _) => Err(PackageError::ImageNoManifest {
            path: path.to_owned(),
        }),
        (Some(entry), 0) => Ok(Target {
            config: clean_name(&entry.config),
            repo_tags: entry.repo_tags.unwrap_or_default(),
            layers: entry.layers.iter().map(|l| clean_name(l)).collect(),
        }),
        (Some(_), more) => Err(PackageError::ImageSeveralImages {
            path: path.to_owned(),
            count: more + 1,
        }),
    }
}

fn target_from_oci_index(
    path: &Path,
    listing: &Listing,
    bytes: &[u8],
) -> Result<Target, PackageError> {
    let invalid = |detail: String| PackageError::ImageInvalid {
        path: path.to_owned(),
        detail,
    };
    let index: OciIndex = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("index.json is not an OCI index: {e}")))?;
    let descriptor = match index.manifests.as_slice() {
        [] => {
            return Err(PackageError::ImageNoManifest {
                path: path.to_owned(),
            });
        }
        [one] => one,
        several => {
            return Err(PackageError::ImageSeveralImages {
                path: path.to_owned(),
                count: several.len(),
            });
        }
    };
    let repo_tags = descriptor
        .annotations
        .get("io.containerd.image.name")
        .map(|name| vec![name.clone()])
        .unwrap_or_default();
    let manifest_name = blob_name(&descriptor.digest)
        .ok_or_else(|| invalid(format!("index.json names digest `{}`", descriptor.digest)))?;
    let manifest_bytes = read_small_entry(path, listing, &manifest_name, "OCI image manifest")?
        .ok_or_else(|| {
            invalid(format!(
                "the OCI image manifest `{manifest_name}` named by index.json is missing"
            ))
        })?;
    let manifest: OciManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        invalid(format!(
            "`{manifest_name}` is not an OCI image manifest (an image index of several platforms is not \
             supported: save one platform): {e}"
        ))
    })?;
    let config = blob_name(&manifest.config.digest).ok_or_else(|| {
        invalid(format!(
            "the image manifest names config digest `{}`",
            manifest.config.digest
        ))
    })?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| {
            blob_name(&l.digest)
                .ok_or_else(|| invalid(format!("the image manifest names layer `{}`", l.digest)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Target {
        config,
        repo_tags,
        layers,
    })
}

fn open(path: &Path) -> Result<tar::Archive<BufReader<File>>, PackageError> {
    let file = File::open(path).map_err(|e| PackageError::io("open", path, e))?;
    Ok(tar::Archive::new(BufReader::new(file)))
}

fn not_a_tar(path: &Path, detail: String) -> PackageError {
    PackageError::ImageNotTar {
        path: path.to_owned(),
        detail,
    }
}

/// Lists every entry; keeps `manifest.json` and `index.json` (bounded). Seeks over entry data.
fn list_archive(path: &Path) -> Result<Listing, PackageError> {
    let mut archive = open(path)?;
    let mut listing = Listing {
        entries: HashMap::new(),
        manifest_json: None,
        index_json: None,
    };
    let entries = archive
        .entries_with_seek()
        .map_err(|e| not_a_tar(path, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| not_a_tar(path, e.to_string()))?;
        let name = clean_name(&String::from_utf8_lossy(&entry.path_bytes()));
        let size = entry.size();
        let slot = match name.as_str() {
            "manifest.json" => Some(&mut listing.manifest_json),
            "index.json" => Some(&mut listing.index_json),
            _ => None,
        };
        if let Some(slot) = slot {
            *slot = Some(read_bounded(path, &name, &mut entry, size)?);
        }
        listing.entries.insert(name, size);
    }
    if listing.entries.is_empty() {
        return Err(not_a_tar(
            path,
            "no tar entry (empty file or not a tar)".into(),
        ));
    }
    Ok(listing)
}

/// Reads one small entry by name in a second, seeking pass; `None` when the archive has no such entry.
fn read_small_entry(
    path: &Path,
    listing: &Listing,
    wanted: &str,
    what: &str,
) -> Result<Option<Vec<u8>>, PackageError> {
    let Some(&size) = listing.entries.get(wanted) else {
        return Ok(None);
    };
    if size > MAX_IMAGE_JSON_BYTES {
        return Err(PackageError::ImageJsonTooLarge {
            path: path.to_owned(),
            entry: format!("{what} `{wanted}`"),
            size,
            limit: MAX_IMAGE_JSON_BYTES,
        });
    }
    let mut archive = open(path)?;
    let entries = archive
        .entries_with_seek()
        .map_err(|e| not_a_tar(path, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| not_a_tar(path, e.to_string()))?;
        let name = clean_name(&String::from_utf8_lossy(&entry.path_bytes()));
        if name == wanted {
            let size = entry.size();
            return read_bounded(path, &name, &mut entry, size).map(Some);
        }
    }
    Ok(None)
}

fn read_bounded(
    path: &Path,
    name: &str,
    entry: &mut impl Read,
    size: u64,
) -> Result<Vec<u8>, PackageError> {
    if size > MAX_IMAGE_JSON_BYTES {
        return Err(PackageError::ImageJsonTooLarge {
            path: path.to_owned(),
            entry: format!("`{name}`"),
            size,
            limit: MAX_IMAGE_JSON_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .take(MAX_IMAGE_JSON_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| not_a_tar(path, format!("reading `{name}`: {e}")))?;
    Ok(bytes)
}

/// Entry names as tar stores them may start with `./`; the archive's manifests never do.
fn clean_name(name: &str) -> String {
    name.trim_start_matches("./").to_owned()
}

/// `sha256:<hex>` → `blobs/sha256/<hex>`.
fn blob_name(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    (is_hex64(hex) && algorithm == "sha256").then(|| format!("blobs/sha256/{hex}"))
}

/// The digest a config's file name claims: `<hex>.json` (legacy) or `blobs/sha256/<hex>` (OCI).
fn digest_in_name(name: &str) -> Option<&str> {
    let candidate = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    is_hex64(candidate).then_some(candidate)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(is_hex64)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut context = Context::new(&SHA256);
    context.update(bytes);
    hex::encode(context.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Builds a tar from (name, bytes) pairs.
    fn tar_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, bytes.as_slice())
                .unwrap();
        }
        builder.into_inner().unwrap()
    }

    struct Image {
        layer: Vec<u8>,
        layer_digest: String,
        config: Vec<u8>,
        config_hex: String,
    }

    fn image() -> Image {
        let layer = tar_of(&[("hello", b"hello world\n".to_vec())]);
        let layer_digest = format!("sha256:{}", sha256_hex(&layer));
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))
        .unwrap();
        let config_hex = sha256_hex(&config);
        Image {
            layer,
            layer_digest,
            config,
            config_hex,
        }
    }

    fn legacy_archive(image: &Image, manifest: serde_json::Value) -> Vec<u8> {
        tar_of(&[
            ("abc/layer.tar", image.layer.clone()),
            (&format!("{}.json", image.config_hex), image.config.clone()),
            ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ])
    }

    fn legacy_manifest(image: &Image) -> serde_json::Value {
        serde_json::json!([{
            "Config": format!("{}.json", image.config_hex),
            "RepoTags": ["demo-worker:v2"],
            "Layers": ["abc/layer.tar"],
        }])
    }

    fn write(dir: &tempfile::TempDir, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join("image.tar");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_legacy_layout() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let path = write(&dir, &legacy_archive(&image, legacy_manifest(&image)));
        let info = read_image_archive(&path).unwrap();
        assert_eq!(info.id, format!("sha256:{}", image.config_hex));
        assert_eq!(info.repo_tags, vec!["demo-worker:v2".to_owned()]);
        assert_eq!((info.os.as_str(), info.arch.as_str()), ("linux", "amd64"));
        assert_eq!(info.host_arch(), "x86_64");
        assert_eq!(info.layers, vec![image.layer_digest.clone()]);
        assert_eq!(info.archive, "");
        assert_eq!(info.short_id(), &image.config_hex[..12]);
        verify_image_archive(&path, &info).unwrap();
    }

    fn oci_archive(image: &Image, with_docker_manifest: bool) -> Vec<u8> {
        let layer_hex = image.layer_digest.trim_start_matches("sha256:").to_owned();
        let oci_manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{}", image.config_hex), "size": image.config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": image.layer_digest, "size": image.layer.len()}],
        }))
        .unwrap();
        let manifest_hex = sha256_hex(&oci_manifest);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": format!("sha256:{manifest_hex}"), "size": oci_manifest.len(),
                           "annotations": {"io.containerd.image.name": "docker.io/library/demo-worker:v2"}}],
        }))
        .unwrap();
        let mut entries = vec![
            (format!("blobs/sha256/{layer_hex}"), image.layer.clone()),
            (
                format!("blobs/sha256/{}", image.config_hex),
                image.config.clone(),
            ),
            (format!("blobs/sha256/{manifest_hex}"), oci_manifest),
            ("index.json".to_owned(), index),
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
        ];
        if with_docker_manifest {
            let manifest = serde_json::json!([{
                "Config": format!("blobs/sha256/{}", image.config_hex),
                "RepoTags": ["demo-worker:v2"],
                "Layers": [format!("blobs/sha256/{layer_hex}")],
            }]);
            entries.push((
                "manifest.json".to_owned(),
                serde_json::to_vec(&manifest).unwrap(),
            ));
        }
        let borrowed: Vec<(&str, Vec<u8>)> = entries
            .iter()
            .map(|(n, b)| (n.as_str(), b.clone()))
            .collect();
        tar_of(&borrowed)
    }

    #[test]
    fn reads_oci_layout_with_and_without_docker_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        for with_docker_manifest in [true, false] {
            let path = write(&dir, &oci_archive(&image, with_docker_manifest));
            let info = read_image_archive(&path).unwrap();
            assert_eq!(info.id, format!("sha256:{}", image.config_hex));
            assert_eq!(info.layers, vec![image.layer_digest.clone()]);
            assert_eq!(info.os, "linux");
            let expected_tag = if with_docker_manifest {
                "demo-worker:v2"
            } else {
                "docker.io/library/demo-worker:v2"
            };
            assert_eq!(info.repo_tags, vec![expected_tag.to_owned()]);
        }
    }

    #[test]
    fn refuses_what_is_not_a_tar() {
        let dir = tempfile::tempdir().unwrap();
        for bytes in [
            b"".to_vec(),
            vec![0x1f, 0x8b, 8, 0, 1, 2, 3],
            vec![b'x'; 2048],
        ] {
            let path = write(&dir, &bytes);
            let err = read_image_archive(&path).unwrap_err();
            assert!(
                matches!(err, PackageError::ImageNotTar { .. }),
                "{bytes:?}: {err}"
            );
            assert!(err.to_string().contains("docker save"), "{err}");
        }
    }

    #[test]
    fn refuses_an_archive_without_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &tar_of(&[("hello", b"hi".to_vec())]));
        let err = read_image_archive(&path).unwrap_err();
        assert!(matches!(err, PackageError::ImageNoManifest { .. }), "{err}");
        let path = write(&dir, &tar_of(&[("manifest.json", b"[]".to_vec())]));
        let err = read_image_archive(&path).unwrap_err();
        assert!(matches!(err, PackageError::ImageNoManifest { .. }), "{err}");
    }

    #[test]
    fn refuses_several_images() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let mut manifest = legacy_manifest(&image);
        let first = manifest[0].clone();
        manifest.as_array_mut().unwrap().push(first);
        let path = write(&dir, &legacy_archive(&image, manifest));
        let err = read_image_archive(&path).unwrap_err();
        assert!(
            matches!(err, PackageError::ImageSeveralImages { count: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_missing_config() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let manifest = legacy_manifest(&image);
        let path = write(
            &dir,
            &tar_of(&[
                ("abc/layer.tar", image.layer.clone()),
                ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            ]),
        );
        let err = read_image_archive(&path).unwrap_err();
        assert!(
            matches!(err, PackageError::ImageConfigMissing { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&image.config_hex), "{err}");
    }

    #[test]
    fn refuses_a_config_whose_digest_differs_from_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = image();
        let named = image.config_hex.clone();
        image.config.push(b' ');
        let manifest = legacy_manifest(&image);
        let path = write(&dir, &legacy_archive(&image, manifest));
        let err = read_image_archive(&path).unwrap_err();
        assert!(
            matches!(err, PackageError::ImageConfigDigestMismatch { .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains(&named), "{message}");
        assert!(message.contains(&sha256_hex(&image.config)), "{message}");
    }

    #[test]
    fn refuses_an_oversized_config() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b' '; usize::try_from(MAX_IMAGE_JSON_BYTES).unwrap() + 1];
        let manifest = serde_json::json!([{"Config": "big.json", "RepoTags": [], "Layers": []}]);
        let path = write(
            &dir,
            &tar_of(&[
                ("big.json", big),
                ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            ]),
        );
        let err = read_image_archive(&path).unwrap_err();
        assert!(
            matches!(err, PackageError::ImageJsonTooLarge { .. }),
            "{err}"
        );
    }

    #[test]
    fn verify_names_both_ids_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let path = write(&dir, &legacy_archive(&image, legacy_manifest(&image)));
        let mut expected = read_image_archive(&path).unwrap();
        let real = expected.id.clone();
        expected.id = format!("sha256:{}", "0".repeat(64));
        let err = verify_image_archive(&path, &expected).unwrap_err();
        assert!(matches!(err, PackageError::ImageIdMismatch { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&real) && message.contains(&expected.id),
            "{message}"
        );

        let mut expected = read_image_archive(&path).unwrap();
        expected.layers = vec![format!("sha256:{}", "1".repeat(64))];
        let err = verify_image_archive(&path, &expected).unwrap_err();
        assert!(
            matches!(err, PackageError::ImageLayersMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_missing_layer() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let path = write(
            &dir,
            &tar_of(&[
                (&format!("{}.json", image.config_hex), image.config.clone()),
                (
                    "manifest.json",
                    serde_json::to_vec(&legacy_manifest(&image)).unwrap(),
                ),
            ]),
        );
        let err = read_image_archive(&path).unwrap_err();
        assert!(err.to_string().contains("abc/layer.tar"), "{err}");
    }

    /// Rewrites a package's embedded manifest through `edit`, keeping every other entry as it is.
    fn tamper_manifest(package: &Path, edit: impl Fn(&mut serde_json::Value)) {
        tamper(package, edit, None);
    }

    /// Rewrites a package: the manifest through `edit`, and the image archive by `archive` when given.
    fn tamper(package: &Path, edit: impl Fn(&mut serde_json::Value), replacement: Option<&[u8]>) {
        let gz = flate2::read::GzDecoder::new(File::open(package).unwrap());
        let mut archive = tar::Archive::new(gz);
        let mut entries: Vec<(tar::Header, Vec<u8>)> = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            if entry.path().unwrap().to_str() == Some(crate::MANIFEST_FILE) {
                let mut manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                edit(&mut manifest);
                bytes = serde_json::to_vec_pretty(&manifest).unwrap();
            } else if let Some(replacement) = replacement
                && entry.path().unwrap().ends_with("image.tar")
            {
                bytes = replacement.to_vec();
            }
            let mut header = entry.header().clone();
            header.set_size(bytes.len() as u64);
            header.set_cksum();
            entries.push((header, bytes));
        }
        let out = File::create(package).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            out,
            flate2::Compression::fast(),
        ));
        for (header, bytes) in entries {
            builder.append(&header, bytes.as_slice()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn an_image_package_carries_the_image_and_refuses_a_wrong_id() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let archive = write(&dir, &legacy_archive(&image, legacy_manifest(&image)));
        let package = dir.path().join("demo-worker-v2.tar.gz");
        let info = crate::build_image(&archive, "demo-worker", "v2", &package).unwrap();
        let carried = info.manifest.image.clone().unwrap();
        assert_eq!(carried.archive, "demo-worker/image.tar");
        assert_eq!(carried.id, format!("sha256:{}", image.config_hex));
        assert!(info.manifest.file(&carried.archive).is_some());
        assert_eq!(info.manifest.os.as_deref(), Some("linux"));
        assert_eq!(info.manifest.arch.as_deref(), Some("x86_64"));
        let limits = crate::Limits::default();
        let expect = crate::Expectations::default();
        let checked = inspect_verifying_image(&package, &limits, &expect).unwrap();
        assert_eq!(checked.manifest, info.manifest);

        let wrong = format!("sha256:{}", "e".repeat(64));
        let wrong_in_edit = wrong.clone();
        tamper_manifest(&package, move |m| {
            m["image"]["id"] = wrong_in_edit.clone().into()
        });
        // The files still match the manifest, so only the image check can catch it.
        crate::inspect(&package, &limits).unwrap();
        let err = inspect_verifying_image(&package, &limits, &expect).unwrap_err();
        assert!(matches!(err, PackageError::ImageIdMismatch { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&wrong), "{message}");
        assert!(message.contains(&image.config_hex), "{message}");
        assert!(
            message.contains(&package.display().to_string()),
            "{message}"
        );

        tamper_manifest(&package, |m| {
            m["image"]["archive"] = "demo-worker/other.tar".into()
        });
        let err = crate::inspect(&package, &limits).unwrap_err();
        assert!(err.to_string().contains("demo-worker/other.tar"), "{err}");
    }

    #[test]
    fn a_bad_archive_is_refused_before_a_package_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let archive = write(&dir, b"not a tar at all");
        let package = dir.path().join("out.tar.gz");
        let err = crate::build_image(&archive, "demo-worker", "v2", &package).unwrap_err();
        assert!(matches!(err, PackageError::ImageNotTar { .. }), "{err}");
        assert!(!package.exists());
        let err = crate::build_image(&archive, "../x", "v2", &package).unwrap_err();
        assert!(err.to_string().contains("--component"), "{err}");
    }

    #[test]
    fn a_damaged_archive_with_matching_hashes_is_refused_naming_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let archive = write(&dir, &legacy_archive(&image, legacy_manifest(&image)));
        let package = dir.path().join("demo-worker-v2.tar.gz");
        crate::build_image(&archive, "demo-worker", "v2", &package).unwrap();
        // The config altered under its digest name, and the file hash updated to match.
        let mut damaged_image = super::tests::image();
        damaged_image.config.push(b' ');
        let damaged = legacy_archive(&damaged_image, legacy_manifest(&damaged_image));
        let (digest, size) = (
            crate::ContentAlgorithm::CURRENT.digest(&damaged),
            damaged.len(),
        );
        tamper(
            &package,
            |m| {
                m["files"][0]["digest"] = digest.clone().into();
                m["files"][0]["size"] = size.into();
            },
            Some(&damaged),
        );
        let limits = crate::Limits::default();
        crate::inspect(&package, &limits).unwrap();
        let err = inspect_verifying_image(&package, &limits, &crate::Expectations::default())
            .unwrap_err();
        assert!(
            matches!(err, PackageError::ImageConfigDigestMismatch { .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with(&package.display().to_string()),
            "names the package, not a temporary copy: {message}"
        );
    }
}
