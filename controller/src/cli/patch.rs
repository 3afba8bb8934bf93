//! `patchctl patch <cluster> <package>`: inspect the package, observe the cluster, plan, confirm, then hand the
//! rollout to the runner (`patchctl::rollout`); `--resume` continues an unfinished one after a crash.

use super::Ctx;
use super::args::{RolloutFlags, Selection, lock_for_new_rollout};
use anyhow::{Context, bail};
use patchctl::agent::client::PreparedBlob;
use patchctl::hooks::{ClusterHooks, HookClient};
use patchctl::node_status::NodeStatus;
use patchctl::registered::{load_tls, load_topology};
use patchctl::rollout::{NewRun, journal_and_execute, observe, plan_input, resume};
use patchctl::store::{RolloutKind, RolloutOptions, Store, new_rollout_id};
use patchctl::topology::Topology;
use patchd_planner::Plan;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name (see `patchctl cluster list`).
    pub cluster: String,
    /// The hotfix package (`.tar.gz`, see `patchctl package build`). Not needed with --resume.
    pub package: Option<PathBuf>,
    #[command(flatten)]
    pub selection: Selection,
    /// Record the package as the role's package for future scale-out (`cluster show` lists it). Takes
    /// `--overwrite=true|false` like tiup.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub overwrite: bool,
    /// The cluster is offline: swap files only, no hooks, no restarts. Takes `--offline=true|false` like tiup.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,
    #[command(flatten)]
    pub rollout: RolloutFlags,
    /// Continue the cluster's unfinished rollout (after a crash or Ctrl-C).
    #[arg(long)]
    pub resume: bool,
    /// Parallel uploads while staging (each holds a few MiB of buffers in flight).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Stage the package on every node before touching any. By default a batch starts as soon as each of its
    /// nodes is staged, and the later nodes go on staging while it restarts (in plan order); a node whose staging
    /// fails is left untouched and counts against the failure budget when its batch comes.
    #[arg(long)]
    pub stage_all_first: bool,
    /// Longest wait for one node's status probes before planning.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let store = Arc::new(Store::open_home(&ctx.home)?);
    if args.resume {
        let Some(rollout) = store.unfinished_rollout(&args.cluster)? else {
            errln!(
                "Nothing to resume: cluster `{}` has no unfinished rollout (`patchctl audit {}` lists its rollouts)",
                args.cluster,
                args.cluster
            );
            return Ok(patchctl::exit::DECLINED);
        };
        return Ok(resume(&ctx.home, ctx.format, store, rollout).await?);
    }
    let Some(package) = &args.package else {
        bail!(
            "give the package file: `patchctl patch {} <package.tar.gz>` (or --resume)",
            args.cluster
        );
    };
    let package = std::fs::canonicalize(package)
        .with_context(|| format!("cannot open package {}: check the path", package.display()))?;
    let topology = Arc::new(load_topology(&store, &args.cluster)?);
    let tls = load_tls(&ctx.home, &topology)?;
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::for_cluster(&tls)?);
    // The status probes only read (agents' Status, the hooks' GETs): they run while the package is read, hashed
    // and checked against the cluster, and are dropped unanswered when the package is refused or a rollout must
    // be finished first, so a bad package or an unfinished rollout is reported without waiting for slow nodes.
    let mut probes = Box::pin(observe(&hooks, &topology, &tls, args.probe_timeout));
    let mut checks = Box::pin(async {
        let (info, blob) = inspect_and_prepare(&package).await?;
        check_component(&topology, &info.manifest.component, &args.selection.roles)?;
        let unfinished = store.unfinished_rollout(&args.cluster)?;
        Ok::<_, anyhow::Error>((info, blob, unfinished))
    });
    let mut observed = None;
    let checked = tokio::select! {
        checked = &mut checks => checked,
        statuses = &mut probes => {
            observed = Some(statuses);
            (&mut checks).await
        }
    };
    drop(checks);
    let (info, blob, unfinished) = checked?;
    let component = info.manifest.component.clone();

    if let Some(unfinished) = unfinished {
        // Nothing is planned here: the probes stop now rather than hold their connections through the resume.
        drop(probes);
        if unfinished.kind == RolloutKind::Patch
            && unfinished.package_digest.as_ref() == Some(&blob.digest)
        {
            errln!(
                "Rollout {} of this package is unfinished: resuming it.",
                unfinished.id
            );
            return Ok(resume(&ctx.home, ctx.format, store, unfinished).await?);
        }
        bail!(
            "rollout {} ({} of {}, {}) on cluster `{}` is unfinished: finish it first with `patchctl patch --resume {}`",
            unfinished.id,
            unfinished.kind,
            if unfinished.version.is_empty() {
                "-"
            } else {
                &unfinished.version
            },
            unfinished.state,
            args.cluster,
            args.cluster
        );
    }
    let observed = match observed {
        Some(observed) => {
            drop(probes);
            observed
        }
        None => probes.await,
    };

    let input = plan_input(
        &topology,
        &observed,
        &args.selection.nodes,
        &args.selection.roles,
        topology.component_roles(&component),
        args.rollout.policy.policy(),
    );
    let plan = patchd_planner::plan(&input)?;
    check_platform(&plan, &observed, &info.manifest)?;

    let header = format!(
        "Patch cluster `{}` with {} {} ({}, {} bytes, digest {}){}\n{}",
        args.cluster,
        component,
        info.manifest.version,
        package.display(),
        info.size,
        blob.digest.short(16),
        if args.offline {
            " --offline: files only, no hooks, no restarts"
        } else {
            ""
        },
        signature_line(&blob.signatures)
    );
    if let Some(code) = args.rollout.review(ctx, &header, &plan).await? {
        return Ok(code);
    }

    let lock = lock_for_new_rollout(&store, &args.cluster)?;
    let options = RolloutOptions {
        patch_id: new_rollout_id(),
        offline: args.offline,
        overwrite: args.overwrite,
        concurrency: args.concurrency,
        stage_all_first: args.stage_all_first,
        canary_wait_ms: args.rollout.policy.canary_wait_ms(),
        to_patch_id: None,
        component,
    };
    let code = journal_and_execute(
        ctx.format,
        store,
        &args.cluster,
        NewRun {
            kind: RolloutKind::Patch,
            package_digest: Some(blob.digest.clone()),
            package_path: package.display().to_string(),
            version: info.manifest.version.clone(),
            options,
            plan,
            topology,
            tls,
            blob: Some(Arc::new(blob)),
        },
    )
    .await;
    drop(lock);
    Ok(code?)
}

/// Reads the package twice in parallel: the full inspection (manifest, hostile-content checks) and the chunk
/// hashes for the transfer.
async fn inspect_and_prepare(
    package: &Path,
) -> anyhow::Result<(patchd_package::PackageInfo, PreparedBlob)> {
    let path = package.to_path_buf();
    let inspection = tokio::task::spawn_blocking(move || {
        // An image package's archive is also checked against its image ID, before anything is uploaded.
        patchd_package::inspect_verifying_image(
            &path,
            &patchd_package::Limits::default(),
            &patchd_package::Expectations::default(),
        )
    });
    let prepared = PreparedBlob::prepare(package, patchd_package::digest::DEFAULT_CHUNK_SIZE);
    let (inspection, prepared) = tokio::join!(inspection, prepared);
    let info = inspection
        .context("package inspection stopped unexpectedly")?
        .with_context(|| format!("package {} is not usable", package.display()))?;
    let blob = prepared?;
    if blob.digest != info.tree_digest {
        bail!(
            "package {} changed while it was being read: try again",
            package.display()
        );
    }
    Ok((info, blob))
}

/// The package's component must be run by the selected roles; otherwise list roles with their components.
fn check_component(topology: &Topology, component: &str, roles: &[String]) -> anyhow::Result<()> {
    let listing = || {
        topology
            .roles
            .iter()
            .map(|role| format!("{} ({})", role.name, role.component))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if topology.component_roles(component).is_empty() {
        bail!(
            "the package is for component `{component}`, which no role of this cluster runs; roles (component): {}",
            listing()
        );
    }
    // `-R "a, b"` splits into `a` and ` b`: compare trimmed names, as the planner does.
    let wrong: Vec<&str> = roles
        .iter()
        .map(|name| name.trim())
        .filter(|name| {
            topology
                .role(name)
                .is_some_and(|role| role.component != component)
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "the package is for component `{component}`, but -R names role(s) {} that run another component; roles \
             (component): {}",
            wrong.join(", "),
            listing()
        );
    }
    Ok(())
}

/// The package's OS/arch (when it names them) must match what each planned node's agent reports.
fn check_platform(
    plan: &Plan,
    observed: &HashMap<String, NodeStatus>,
    manifest: &patchd_package::Manifest,
) -> anyhow::Result<()> {
    let (Some(os), Some(arch)) = (&manifest.os, &manifest.arch) else {
        return Ok(());
    };
    let wanted = format!("{os}/{arch}");
    let mismatched: Vec<String> = plan
        .nodes()
        .filter_map(|(_, node)| observed.get(&node.id))
        .filter(|row| row.os_arch != "-" && row.os_arch != wanted)
        .map(|row| format!("{} ({})", row.id, row.os_arch))
        .collect();
    if !mismatched.is_empty() {
        bail!(
            "the package is built for {wanted}, but these nodes run another platform: {}",
            mismatched.join(", ")
        );
    }
    Ok(())
}

/// Who signed the package (the signature files beside it), so the operator knows before agents that trust keys
/// refuse it.
fn signature_line(signatures: &[String]) -> String {
    if signatures.is_empty() {
        return "Unsigned (no PKG.minisig): agents with [trust] keys refuse it; sign it with `patchctl package sign`"
            .to_string();
    }
    let signers: Vec<String> = signatures
        .iter()
        .map(|text| {
            patchd_package::signing::signature_key_id(text).map_or_else(
                || "an unreadable signature".to_string(),
                |id| format!("key {id}"),
            )
        })
        .collect();
    format!("Signed by {}", signers.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::parse(
            "roles:\n  demo-master:\n    nodes:\n      - { host: 127.0.1.1, port: 1, deploy_dir: /a }\n  demo-worker:\n    nodes:\n      - { host: 127.0.1.2, port: 2, deploy_dir: /b }\n",
        )
        .unwrap()
    }

    fn parsed(extra: &[&str]) -> Result<Args, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Patch {
            #[command(flatten)]
            args: Args,
        }
        let argv = ["patch", "demo", "pkg.tar.gz"].iter().chain(extra);
        <Patch as clap::Parser>::try_parse_from(argv).map(|patch| patch.args)
    }

    #[test]
    fn overwrite_and_offline_take_tiup_booleans() {
        let neither = parsed(&[]).unwrap();
        assert!(!neither.overwrite && !neither.offline);
        let bare = parsed(&["--overwrite", "--offline"]).unwrap();
        assert!(bare.overwrite && bare.offline);
        let tiup = parsed(&["--overwrite=true", "--offline=true"]).unwrap();
        assert!(tiup.overwrite && tiup.offline);
        let off = parsed(&["--overwrite=false", "--offline=false"]).unwrap();
        assert!(!off.overwrite && !off.offline);
        // As with tiup, a separate word is not the flag's value.
        assert!(parsed(&["--offline", "false"]).is_err());
        assert!(parsed(&["--overwrite=maybe"]).is_err());
    }

    #[test]
    fn a_package_for_another_component_is_refused_with_the_roles_listed() {
        let topology = topology();
        let unknown = check_component(&topology, "tikv", &[])
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("`tikv`")
                && unknown.contains("demo-master (demo-master), demo-worker (demo-worker)"),
            "{unknown}"
        );
        let wrong_role = check_component(&topology, "demo-worker", &["demo-master".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            wrong_role.contains("-R names role(s) demo-master"),
            "{wrong_role}"
        );
        assert!(check_component(&topology, "demo-worker", &["demo-worker".to_string()]).is_ok());
        // `-R "demo-worker, demo-master"` splits into ` demo-master`: still checked.
        let spaced = check_component(
            &topology,
            "demo-worker",
            &["demo-worker".to_string(), " demo-master".to_string()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            spaced.contains("-R names role(s) demo-master that"),
            "{spaced}"
        );
    }
}
