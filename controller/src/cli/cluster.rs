//! `patchctl cluster import|list|show|unlock`: register clusters from topology files and look at them.

use super::{Ctx, Format};
use anyhow::Context;
use patchctl::output::plain_table;
use patchctl::registered::load_cluster;
use patchctl::store::{RolePackage, Store, StoreError, StoredCluster};
use patchctl::topology::Topology;
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Validate a topology file and register it under a name (re-import replaces it: the way to edit a cluster).
    Import {
        /// Cluster name (letters, digits, `.`, `_`, `-`).
        name: String,
        /// Topology file (YAML, format in ARCHITECTURE.md).
        topology: PathBuf,
    },
    /// List registered clusters.
    List,
    /// Print a cluster's stored topology file.
    Show {
        /// Cluster name.
        name: String,
    },
    /// Remove the rollout lock of a cluster whose holder is known to be gone (e.g. died on another host).
    Unlock {
        /// Cluster name.
        name: String,
        /// Remove the lock even when its holder still runs on this host.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Import { name, topology } => import(ctx, &name, &topology),
        Command::List => list(ctx),
        Command::Show { name } => show(ctx, &name),
        Command::Unlock { name, force } => unlock(ctx, &name, force),
    }
}

fn check_cluster_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with(['.', '-']);
    anyhow::ensure!(
        valid,
        "invalid cluster name `{name}`: use 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.` or `-`"
    );
    Ok(())
}

fn import(ctx: &Ctx, name: &str, path: &std::path::Path) -> anyhow::Result<u8> {
    check_cluster_name(name)?;
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read topology file {}; check the path",
            path.display()
        )
    })?;
    let topology =
        Topology::parse(&text).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    topology
        .check_name(name, &text)
        .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    let source = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());

    let store = Store::open_home(&ctx.home)?;
    // Replacing the topology under a running rollout would change its nodes and hooks mid-way: refuse.
    let lock = match store.acquire_rollout_lock(name) {
        Ok(lock) => lock,
        Err(error @ StoreError::Locked { .. }) => {
            return Err(anyhow::anyhow!(
                "cannot re-import `{name}` while a rollout runs: {error}"
            ));
        }
        Err(error) => return Err(error.into()),
    };
    let created = store.save_cluster(name, &text, &source.to_string_lossy())?;
    lock.release()?;
    let unfinished = store.unfinished_rollout(name)?;

    match ctx.format {
        Format::Json => {
            let summary = json!({
                "cluster": name,
                "created": created,
                "source": source,
                "version": topology.version,
                "roles": role_summaries(&topology),
                "total_nodes": topology.node_count(),
            });
            outln!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Format::Text => {
            let verb = if created { "Imported" } else { "Updated" };
            outln!("{verb} cluster `{name}` from {}", source.display());
            if let Some(version) = &topology.version {
                outln!("Cluster version: {version}");
            }
            out!("{}", roles_table(&topology));
            outln!("Total nodes: {}", topology.node_count());
        }
    }
    if let Some(rollout) = unfinished {
        errln!(
            "note: rollout {} of `{name}` is unfinished ({}); `patchctl patch --resume {name}` will use the topology \
             just imported",
            rollout.id,
            rollout.state
        );
    }
    Ok(patchctl::exit::OK)
}

fn role_summaries(topology: &Topology) -> serde_json::Value {
    topology
        .roles
        .iter()
        .map(|role| {
            json!({
                "name": role.name,
                "component": role.component,
                "service": role.service,
                "nodes": role.nodes.len(),
                "hooks": role.hooks.iter().map(|(key, _)| key).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn roles_table(topology: &Topology) -> String {
    let rows: Vec<Vec<String>> = topology
        .roles
        .iter()
        .map(|role| {
            let hooks: Vec<&str> = role.hooks.iter().map(|(key, _)| key).collect();
            vec![
                role.name.clone(),
                role.component.clone(),
                role.service.clone(),
                role.nodes.len().to_string(),
                if hooks.is_empty() {
                    "-".to_string()
                } else {
                    hooks.join(",")
                },
            ]
        })
        .collect();
    plain_table(&["Role", "Component", "Service", "Nodes", "Hooks"], &rows)
}

/// Roles and nodes of a stored cluster; `None` if its text no longer parses (shown as `?`).
fn parsed(cluster: &StoredCluster) -> Option<Topology> {
    Topology::parse(&cluster.yaml).ok()
}

fn list(ctx: &Ctx) -> anyhow::Result<u8> {
    let store = Store::open_home(&ctx.home)?;
    let clusters = store.list_clusters()?;
    match ctx.format {
        Format::Json => {
            let entries: Vec<serde_json::Value> = clusters
                .iter()
                .map(|cluster| {
                    let topology = parsed(cluster);
                    json!({
                        "name": cluster.name,
                        "version": topology.as_ref().and_then(|t| t.version.clone()),
                        "roles": topology.as_ref().map(|t| t.role_order()),
                        "nodes": topology.as_ref().map(Topology::node_count),
                        "source": cluster.source_path,
                        "created_at": cluster.created_at,
                        "imported_at": cluster.imported_at,
                    })
                })
                .collect();
            outln!("{}", serde_json::to_string_pretty(&entries)?);
        }
        Format::Text => {
            if clusters.is_empty() {
                outln!(
                    "No cluster registered; register one with `patchctl cluster import <name> <topology.yaml>`"
                );
                return Ok(patchctl::exit::OK);
            }
            let rows: Vec<Vec<String>> = clusters
                .iter()
                .map(|cluster| {
                    let topology = parsed(cluster);
                    vec![
                        cluster.name.clone(),
                        topology
                            .as_ref()
                            .and_then(|t| t.version.clone())
                            .unwrap_or_else(|| "-".into()),
                        topology
                            .as_ref()
                            .map_or_else(|| "?".into(), |t| t.role_order().join(",")),
                        topology
                            .as_ref()
                            .map_or_else(|| "?".into(), |t| t.node_count().to_string()),
                        cluster.imported_at.to_string(),
                        cluster.source_path.clone(),
                    ]
                })
                .collect();
            out!(
                "{}",
                plain_table(
                    &["Name", "Version", "Roles", "Nodes", "Imported", "Source"],
                    &rows
                )
            );
        }
    }
    Ok(patchctl::exit::OK)
}

/// The stored file verbatim, then the packages `patch --overwrite` recorded per role as YAML comments (so the
/// output can still be saved and re-imported).
fn show(ctx: &Ctx, name: &str) -> anyhow::Result<u8> {
    let store = Store::open_home(&ctx.home)?;
    let cluster = load_cluster(&store, name)?;
    let packages = store.role_packages(name)?;
    match ctx.format {
        Format::Json => {
            let document = json!({
                "name": cluster.name,
                "source": cluster.source_path,
                "created_at": cluster.created_at,
                "imported_at": cluster.imported_at,
                "topology": parsed(&cluster),
                "yaml": cluster.yaml,
                "role_packages": packages,
            });
            outln!("{}", serde_json::to_string_pretty(&document)?);
        }
        Format::Text => {
            out!("{}", cluster.yaml);
            if !cluster.yaml.ends_with('\n') {
                outln!();
            }
            out!("{}", role_packages_comment(&packages));
        }
    }
    Ok(patchctl::exit::OK)
}

/// One comment line per role with a recorded package; nothing when none is.
fn role_packages_comment(packages: &[RolePackage]) -> String {
    if packages.is_empty() {
        return String::new();
    }
    let mut text =
        "# Packages recorded by `patchctl patch --overwrite` (what a scale-out deploys):\n"
            .to_string();
    for package in packages {
        text.push_str(&format!(
            "#   {}: {} (digest {}, {}, recorded {})\n",
            package.role,
            package.version,
            package.digest.short(16),
            package.path,
            package.set_at
        ));
    }
    text
}

fn unlock(ctx: &Ctx, name: &str, force: bool) -> anyhow::Result<u8> {
    let store = Store::open_home(&ctx.home)?;
    let removed = store.force_unlock(name, force)?;
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&json!({ "cluster": name, "removed": removed }))?
        ),
        Format::Text => match removed {
            Some(holder) => outln!(
                "Removed the rollout lock of `{name}` held by patchctl pid {} on {} since {}; if that rollout was \
                 cut short, continue it with `patchctl patch --resume {name}`",
                holder.pid,
                holder.host,
                holder.started_at
            ),
            None => outln!("Cluster `{name}` has no rollout lock"),
        },
    }
    Ok(patchctl::exit::OK)
}
