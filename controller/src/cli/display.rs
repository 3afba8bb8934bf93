//! `patchctl display <cluster>`: the seed's status table (ID, Role, Host, Ports, OS/Arch, Status, Data Dir,
//! Deploy Dir, Version) from agents and the cluster's hooks, probed in parallel with a timeout; then who made each
//! node's last change (as its agent recorded it from the controller certificate) and the problems.

use super::args::Selection;
use super::{Ctx, Format};
use patchctl::hooks::{ClusterHooks, HookClient};
use patchctl::node_status::{self, LiveAgentProbe, NodeStatus};
use patchctl::output::plain_table;
use patchctl::registered::{load_tls, load_topology};
use patchctl::store::Store;
use patchctl::topology::{Node, Topology};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name (see `patchctl cluster list`).
    pub cluster: String,
    #[command(flatten)]
    pub selection: Selection,
    /// Longest wait for one node's probes (agent, health, member state).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let store = Store::open_home(&ctx.home)?;
    let topology = Arc::new(load_topology(&store, &args.cluster)?);
    let selected = select_nodes(&topology, &args.selection.nodes, &args.selection.roles)?;
    let tls = load_tls(&ctx.home, &topology)?;
    let hooks = ClusterHooks::new(Arc::clone(&topology), HookClient::for_cluster(&tls)?);
    let marks: HashSet<String> = store
        .node_marks(&args.cluster)?
        .into_iter()
        .map(|mark| mark.node_id)
        .collect();
    let probe = LiveAgentProbe::new(tls);
    let rows = node_status::collect(
        &hooks,
        &selected,
        &probe,
        &|node| marks.contains(&node.id),
        args.timeout,
    )
    .await;
    match ctx.format {
        Format::Json => {
            let document = serde_json::json!({
                "cluster": args.cluster,
                "version": topology.version,
                "nodes": rows,
                "total_nodes": rows.len(),
            });
            outln!("{}", serde_json::to_string_pretty(&document)?);
        }
        Format::Text => out!(
            "{}",
            render(&args.cluster, topology.version.as_deref(), &rows)
        ),
    }
    Ok(patchctl::exit::OK)
}

/// The text output: header lines, the table, `Total nodes: N`.
pub(super) fn render(cluster: &str, version: Option<&str>, rows: &[NodeStatus]) -> String {
    let mut out = format!(
        "Cluster name: {cluster}\nCluster version: {}\n",
        version.unwrap_or("-")
    );
    let header = [
        "ID",
        "Role",
        "Host",
        "Ports",
        "OS/Arch",
        "Status",
        "Data Dir",
        "Deploy Dir",
        "Version",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let role = if row.patched {
                format!("{} (patched)", row.role)
            } else {
                row.role.clone()
            };
            vec![
                row.id.clone(),
                role,
                row.host.clone(),
                row.ports.clone(),
                row.os_arch.clone(),
                row.status.clone(),
                row.data_dir.clone(),
                row.deploy_dir.clone(),
                row.version.clone(),
            ]
        })
        .collect();
    out.push_str(&plain_table(&header, &body));
    out.push_str(&format!("Total nodes: {}\n", rows.len()));
    // Who made each node's last change, as its agent recorded it from the controller certificate.
    let changes: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let last = row.service.as_ref()?.last.as_ref()?;
            (!last.caller.is_empty()).then(|| {
                format!(
                    "  {}: {} {} by {}",
                    row.id,
                    patchctl::agent::ops::outcome_name(last.outcome),
                    last.patch_id,
                    last.caller
                )
            })
        })
        .collect();
    if !changes.is_empty() {
        out.push_str("Last changes:\n");
        for change in changes {
            out.push_str(&change);
            out.push('\n');
        }
    }
    let problems: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.problems
                .iter()
                .map(move |p| format!("  {}: {p}", row.id))
        })
        .collect();
    if !problems.is_empty() {
        out.push_str("Problems:\n");
        for problem in problems {
            out.push_str(&problem);
            out.push('\n');
        }
    }
    out
}

/// `-N`/`-R` for display: filters with intersection semantics; unknown names list what exists.
pub(super) fn select_nodes<'t>(
    topology: &'t Topology,
    nodes: &[String],
    roles: &[String],
) -> anyhow::Result<Vec<&'t Node>> {
    // `-R "a, b"` splits into `a` and ` b`: compare trimmed names, as the planner does.
    let nodes = &trimmed(nodes);
    let roles = &trimmed(roles);
    let unknown_roles: Vec<&String> = roles
        .iter()
        .filter(|role| topology.role(role).is_none())
        .collect();
    if !unknown_roles.is_empty() {
        anyhow::bail!(
            "unknown role(s) {}; the cluster has: {}",
            join(&unknown_roles),
            topology.role_order().join(", ")
        );
    }
    let unknown_nodes: Vec<&String> = nodes
        .iter()
        .filter(|wanted| !topology.nodes().any(|node| node.is_named(wanted)))
        .collect();
    if !unknown_nodes.is_empty() {
        let known: Vec<&str> = topology.nodes().map(|node| node.id.as_str()).collect();
        anyhow::bail!(
            "unknown node(s) {}; the cluster has: {}",
            join(&unknown_nodes),
            known.join(", ")
        );
    }
    let selected: Vec<&Node> = topology
        .nodes()
        .filter(|node| roles.is_empty() || roles.contains(&node.role))
        .filter(|node| nodes.is_empty() || nodes.iter().any(|wanted| node.is_named(wanted)))
        .collect();
    if selected.is_empty() {
        anyhow::bail!("no node is both in -N and in -R; drop one of them or fix the lists");
    }
    Ok(selected)
}

/// Trimmed names, empty ones dropped.
fn trimmed(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|name| name.trim())
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|item| item.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_looks_like_the_seed() {
        let row = NodeStatus {
            id: "127.0.1.1:8261".into(),
            role: "demo-master".into(),
            patched: true,
            host: "127.0.1.1".into(),
            ports: "8261/8291".into(),
            os_arch: "linux/x86_64".into(),
            status: "Healthy|L".into(),
            data_dir: "/opt/demo/data/master-8261".into(),
            deploy_dir: "/opt/demo/master-8261".into(),
            version: "v1.0.1-hotfix".into(),
            leader: true,
            service: None,
            problems: vec![],
        };
        let text = render("demo", Some("v1.0.0"), &[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Cluster name: demo");
        assert_eq!(lines[1], "Cluster version: v1.0.0");
        assert!(
            lines[2].starts_with("ID")
                && lines[2].contains("OS/Arch")
                && lines[2].ends_with("Version")
        );
        assert!(lines[3].starts_with("--") && lines[3].contains("----"));
        assert!(lines[4].contains("demo-master (patched)") && lines[4].contains("Healthy|L"));
        assert_eq!(lines[5], "Total nodes: 1");
        // Columns line up: "Role" starts where the role does.
        assert_eq!(lines[2].find("Role"), lines[4].find("demo-master"));
    }
}
