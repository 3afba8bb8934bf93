//! `patchctl package`: build a hotfix package from a base package in one command, or an image package from a
//! container image, and inspect packages (every hostile-package rule is checked, and an image package's archive
//! against its image ID; a refused package exits 1 with the entry and the rule).

use super::{Ctx, Format};
use anyhow::{Context as _, bail};
use comfy_table::{Table, presets};
use indicatif::HumanBytes;
use patchctl::agent::client::PreparedBlob;
use patchctl::agent::digest_cache::DigestCache;
use patchd_package::content::BLAKE3_PREFIX;
use patchd_package::{BuildSpec, ContentAlgorithm, Expectations, Limits, PackageInfo};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Build a hotfix package (the base package with some of its files replaced by local ones), or an image
    /// package (a container image for services with `backend = "docker"`).
    ///
    /// Example: patchctl package build --base demo-worker-v1.0.0-linux-amd64.tar.gz
    ///   --replace demo-worker/demo-worker=./target/release/demo-worker --version v1.0.1-hotfix -o hotfix.tar.gz
    ///
    /// Example: patchctl package build --image demo-worker:v1.0.1-hotfix -o demo-worker-image.tar.gz
    Build(BuildArgs),
    /// Check a package against every rule and print its manifest and digests.
    Inspect(InspectArgs),
    /// Sign a package (after checking it against every rule): writes PKG.minisig beside it, in minisign's format.
    ///
    /// `minisign -Vm PKG -p KEY.pub` verifies the result; `patchctl patch` sends PKG.minisig (and any
    /// PKG.<name>.minisig, for agents that require several keys) with the package. Run it where the secret key
    /// lives, not on the controller host.
    Sign(SignArgs),
}

#[derive(Debug, clap::Args)]
struct SignArgs {
    /// The package to sign.
    package: PathBuf,
    /// The secret key file (from `patchctl key generate`; with a key of `minisign -G`, sign with `minisign -S`).
    #[arg(long, value_name = "SECRET_KEY")]
    key: PathBuf,
    /// Where to write the signature (default: PKG.minisig; use PKG.<name>.minisig for a second signer).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
// `--version` is the package's version label here, not patchctl's own version.
#[command(disable_version_flag = true)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["base", "image"]))]
#[command(group = clap::ArgGroup::new("changes").multiple(true).args(["replace", "add"]))]
struct BuildArgs {
    /// The original package (`<component>/…` inside, as released).
    #[arg(long, value_name = "PACKAGE", requires = "changes")]
    base: Option<PathBuf>,
    /// Replace a file of the base package (path as printed by `package inspect`); its mode is kept.
    #[arg(long, value_name = "PATH_IN_PACKAGE=LOCAL_FILE", value_parser = parse_mapping, requires = "base")]
    replace: Vec<(String, PathBuf)>,
    /// Add a file the base package does not hold (mode taken from the local file, at most 0755).
    #[arg(long, value_name = "PATH_IN_PACKAGE=LOCAL_FILE", value_parser = parse_mapping, requires = "base")]
    add: Vec<(String, PathBuf)>,
    /// Build an image package from a `docker save` archive (an existing file) or an image reference the local
    /// Docker Engine has (exported over its Unix socket; `DOCKER_HOST=unix://…` names another).
    #[arg(long, value_name = "ARCHIVE|REFERENCE")]
    image: Option<String>,
    /// Component of an image package (default: the image name of its first repo tag, `demo-worker` for
    /// `registry/demo-worker:v2`).
    #[arg(long, value_name = "NAME", requires = "image")]
    component: Option<String>,
    /// Version label recorded in the manifest (default: the base version with `-hotfix`; for an image, the tag
    /// of its first repo tag).
    #[arg(long, value_name = "LABEL")]
    version: Option<String>,
    /// Where to write the hotfix package (written atomically).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
}

#[derive(Debug, clap::Args)]
struct InspectArgs {
    /// The package to check.
    package: PathBuf,
    /// Refuse packages with more entries than this.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_files)]
    max_files: u64,
    /// Refuse packages whose files add up to more bytes than this.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_unpacked_bytes)]
    max_unpacked_bytes: u64,
    /// Refuse packages with one file larger than this.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_entry_bytes)]
    max_file_bytes: u64,
    /// Also require this component (as a target service would).
    #[arg(long, value_name = "NAME")]
    component: Option<String>,
}

fn parse_mapping(raw: &str) -> Result<(String, PathBuf), String> {
    match raw.split_once('=') {
        Some((inside, local)) if !inside.is_empty() && !local.is_empty() => Ok((
            inside.trim_start_matches("./").to_owned(),
            PathBuf::from(local),
        )),
        _ => Err(format!(
            "`{raw}` is not PATH_IN_PACKAGE=LOCAL_FILE (for example demo-worker/demo-worker=./target/release/demo-worker)"
        )),
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Build(build) => run_build(ctx, build).await,
        Command::Inspect(inspect) => run_inspect(ctx, inspect).await,
        Command::Sign(sign) => run_sign(ctx, sign).await,
    }
}

async fn run_sign(ctx: &Ctx, args: SignArgs) -> anyhow::Result<u8> {
    let output = args.output.clone().unwrap_or_else(|| {
        let mut name = args.package.clone().into_os_string();
        name.push(patchd_package::signing::SIGNATURE_SUFFIX);
        PathBuf::from(name)
    });
    let package = args.package.clone();
    let key = args.key.clone();
    let (info, signed) = tokio::task::spawn_blocking(move || {
        // A signature vouches for the package: never sign one an agent would refuse anyway.
        let info = patchd_package::inspect_expecting(
            &package,
            &Limits::default(),
            &Expectations::default(),
        )
        .with_context(|| format!("package {} refused, not signed", package.display()))?;
        let signed = patchd_package::signing::sign_file(&package, &key)?;
        anyhow::Ok((info, signed))
    })
    .await
    .context("the signing task panicked")??;
    patchd_tls::write_file_atomic(&output, signed.text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", output.display()))?;
    let key_id = signed.key_id;
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "package": args.package,
                "signature": output,
                "key_id": key_id.to_string(),
                "component": info.manifest.component,
                "version": info.manifest.version,
            }))?
        ),
        Format::Text => outln!(
            "Signed {} ({} {}) with key {key_id}: {}",
            args.package.display(),
            info.manifest.component,
            info.manifest.version,
            output.display()
        ),
    }
    Ok(patchctl::exit::OK)
}

/// What `--format json` prints: the package info plus where it is.
#[derive(Serialize)]
struct PackageReport<'a> {
    path: &'a Path,
    #[serde(flatten)]
    info: &'a PackageInfo,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    replaced: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    added: Vec<&'a str>,
}

async fn run_build(ctx: &Ctx, args: BuildArgs) -> anyhow::Result<u8> {
    let BuildArgs {
        base,
        replace,
        add,
        image,
        component,
        version,
        output,
    } = args;
    let base = match (base, image) {
        (Some(base), _) => base,
        (None, Some(image)) => {
            let info = build_image_package(&image, component, version, &output).await?;
            remember_digests(ctx, &output).await;
            print_built(ctx, &output, &info, vec![], vec![])?;
            return Ok(patchctl::exit::OK);
        }
        (None, None) => bail!("give --base (a hotfix of a package) or --image (an image package)"),
    };
    let output_path = output.clone();
    let (info, replace, add) = tokio::task::spawn_blocking(move || {
        let spec = BuildSpec {
            base: &base,
            replacements: &replace,
            additions: &add,
            version: version.as_deref(),
        };
        let info = patchd_package::build_with(&spec, &output)
            .with_context(|| format!("cannot build a hotfix package from {}", base.display()))?;
        anyhow::Ok((info, replace, add))
    })
    .await
    .context("the build task panicked")??;
    remember_digests(ctx, &output_path).await;
    let replaced: Vec<&str> = replace.iter().map(|(p, _)| p.as_str()).collect();
    let added: Vec<&str> = add.iter().map(|(p, _)| p.as_str()).collect();
    print_built(ctx, &output_path, &info, replaced, added)?;
    Ok(patchctl::exit::OK)
}

/// An image package from a `docker save` archive or from an image of the local engine.
async fn build_image_package(
    image: &str,
    component: Option<String>,
    version: Option<String>,
    output: &Path,
) -> anyhow::Result<PackageInfo> {
    let source = PathBuf::from(image);
    // A path that exists is an archive; anything else is a reference the engine must have.
    let exported = if source.is_file() {
        None
    } else {
        let engine = patchd_docker::Engine::connect_default()
            .await
            .with_context(|| {
                format!("`{image}` is not a file, so it was taken as an image reference")
            })?;
        let out_dir = match output.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        let temp = tempfile::Builder::new()
            .prefix(".patchd-image-")
            .suffix(".tar")
            .tempfile_in(&out_dir)
            .with_context(|| format!("cannot create a temporary file in {}", out_dir.display()))?
            .into_temp_path();
        engine.save_image(image, &temp).await?;
        Some(temp)
    };
    let archive = exported
        .as_deref()
        .map_or(source.clone(), Path::to_path_buf);
    let output = output.to_path_buf();
    let image = image.to_owned();
    tokio::task::spawn_blocking(move || {
        let found = patchd_package::read_image_archive(&archive)
            .with_context(|| format!("cannot build an image package from `{image}`"))?;
        let first_tag = found.repo_tags.first().map(|tag| component_and_version(tag));
        let component = match (component, &first_tag) {
            (Some(component), _) => component,
            (None, Some((name, _))) => name.clone(),
            (None, None) => bail!(
                "image `{image}` carries no repo tag to name the component: pass --component NAME (and --version)"
            ),
        };
        let version = match (version, first_tag.and_then(|(_, tag)| tag)) {
            (Some(version), _) => version,
            (None, Some(tag)) => tag,
            (None, None) => bail!("image `{image}` carries no tag to take the version from: pass --version LABEL"),
        };
        let info = patchd_package::build_image(&archive, &component, &version, &output)
            .with_context(|| format!("cannot build an image package from `{image}`"))?;
        // `exported` (the temporary archive) is removed when it drops, after the package is written.
        drop(exported);
        anyhow::Ok(info)
    })
    .await
    .context("the build task panicked")?
}

/// Fills the sender's digest cache with the package just written, so that its first `agent push`
/// (at the default chunk size) sends at once instead of reading the whole file again.
async fn remember_digests(ctx: &Ctx, output: &Path) {
    let cache = DigestCache::at(ctx.home.digest_cache_dir());
    let output = output.to_path_buf();
    let remembered = tokio::task::spawn_blocking(move || {
        PreparedBlob::remember_new_file(&cache, &output, patchd_package::digest::DEFAULT_CHUNK_SIZE)
    })
    .await;
    if let Err(error) = remembered {
        tracing::debug!(%error, "digest cache not filled");
    }
}

fn print_built(
    ctx: &Ctx,
    output_path: &Path,
    info: &PackageInfo,
    replaced: Vec<&str>,
    added: Vec<&str>,
) -> anyhow::Result<()> {
    match ctx.format {
        Format::Json => print_json(&PackageReport {
            path: output_path,
            info,
            replaced,
            added,
        })?,
        Format::Text => {
            outln!("built {}", output_path.display());
            print_summary(output_path, info);
            outln!();
            for (label, paths) in [("replaced", &replaced), ("added", &added)] {
                for path in paths {
                    if let Some(file) = info.manifest.file(path) {
                        outln!(
                            "{label:<9} {path}  ({}, {:04o}, {})",
                            HumanBytes(file.size),
                            file.mode,
                            short(&file.digest)
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

async fn run_inspect(ctx: &Ctx, args: InspectArgs) -> anyhow::Result<u8> {
    let limits = Limits {
        max_files: args.max_files,
        max_unpacked_bytes: args.max_unpacked_bytes,
        max_entry_bytes: args.max_file_bytes,
    };
    let expect = Expectations {
        component: args.component,
        ..Expectations::default()
    };
    let package = args.package;
    let (info, package) = tokio::task::spawn_blocking(move || {
        let info = patchd_package::inspect_verifying_image(&package, &limits, &expect)
            .with_context(|| format!("package {} refused", package.display()))?;
        anyhow::Ok((info, package))
    })
    .await
    .context("the inspect task panicked")??;
    match ctx.format {
        Format::Json => print_json(&PackageReport {
            path: &package,
            info: &info,
            replaced: vec![],
            added: vec![],
        })?,
        Format::Text => {
            print_summary(&package, &info);
            outln!();
            print_files(&info);
        }
    }
    Ok(patchctl::exit::OK)
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).context("cannot encode the report as JSON")?
    );
    Ok(())
}

/// A content digest cut to its algorithm and 12 hex digits (`blake3:6437b3ac3846`, `sha256:ba7816bf8f01`).
fn short(digest: &str) -> String {
    let algorithm = ContentAlgorithm::of(digest);
    let hex = digest.strip_prefix(BLAKE3_PREFIX).unwrap_or(digest);
    format!("{algorithm}:{}", hex.get(..12).unwrap_or(hex))
}

fn print_summary(path: &Path, info: &PackageInfo) {
    let manifest = &info.manifest;
    let target = match (&manifest.os, &manifest.arch) {
        (None, None) => "unknown (no ELF binary in the package)".to_owned(),
        (os, arch) => format!(
            "{}/{}",
            os.as_deref().unwrap_or("?"),
            arch.as_deref().unwrap_or("?")
        ),
    };
    let origin = if info.manifest_embedded {
        "embedded (patchd-manifest.json)"
    } else {
        "computed from the archive (no patchd-manifest.json)"
    };
    outln!(
        "package      {} ({})",
        path.display(),
        HumanBytes(info.size)
    );
    outln!("component    {}", manifest.component);
    outln!("version      {}", manifest.version);
    outln!("os/arch      {target}");
    outln!("manifest     {origin}");
    outln!("sha256       {}", info.package_sha256);
    outln!("tree digest  {}", info.tree_digest);
    if let Some(image) = &manifest.image {
        outln!("image        {}", image.id);
        outln!(
            "tags         {}",
            if image.repo_tags.is_empty() {
                "(none)".to_owned()
            } else {
                image.repo_tags.join(", ")
            }
        );
        outln!("image os     {}/{}", image.os, image.arch);
        outln!("archive      {}", image.archive);
        outln!("layers       {}", image.layers.len());
        for layer in &image.layers {
            outln!("  {layer}");
        }
    }
    outln!(
        "files        {} ({} unpacked){}",
        manifest.files.len(),
        HumanBytes(manifest.unpacked_size()),
        if manifest.symlinks.is_empty() {
            String::new()
        } else {
            format!(", {} symlinks", manifest.symlinks.len())
        }
    );
}

fn print_files(info: &PackageInfo) {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(vec!["MODE", "SIZE", "DIGEST", "PATH"]);
    for file in &info.manifest.files {
        table.add_row(vec![
            format!("{:04o}", file.mode),
            file.size.to_string(),
            short(&file.digest),
            file.path.clone(),
        ]);
    }
    for link in &info.manifest.symlinks {
        table.add_row(vec![
            "link".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            format!("{} -> {}", link.path, link.target),
        ]);
    }
    outln!("{table}");
}

/// `(component, version)` from an image reference or repo tag: `registry:5000/team/demo-worker:v2` gives
/// `("demo-worker", "v2")`; without a tag the version is `latest`; a digest reference gives no version.
pub fn component_and_version(reference: &str) -> (String, Option<String>) {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    match last.split_once(':') {
        Some((name, tag)) => (name.to_owned(), Some(tag.to_owned())),
        None if without_digest.len() < reference.len() => (last.to_owned(), None),
        None => (last.to_owned(), Some("latest".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_and_version_come_from_the_last_path_segment() {
        assert_eq!(
            component_and_version("demo-worker:v2"),
            ("demo-worker".to_owned(), Some("v2".to_owned()))
        );
        assert_eq!(
            component_and_version("registry:5000/team/demo-worker:v2.1-hotfix"),
            ("demo-worker".to_owned(), Some("v2.1-hotfix".to_owned()))
        );
        assert_eq!(
            component_and_version("demo-worker"),
            ("demo-worker".to_owned(), Some("latest".to_owned()))
        );
        assert_eq!(
            component_and_version("demo-worker@sha256:abcd"),
            ("demo-worker".to_owned(), None)
        );
    }
}
