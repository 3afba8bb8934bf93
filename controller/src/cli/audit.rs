//! `patchctl audit [<cluster>] [--rollout ID]`: the rollouts and upgrades journaled in the store, and one rollout's
//! per-node report (steps, durations, result, reason) or one upgrade's report (`patchctl::upgrade::report`).

use super::{Ctx, Format};
use patchctl::output::plain_table;
use patchctl::store::{NodeRolloutState, Rollout, RolloutReport, Store};
use patchd_package::digest::TreeDigest;
use serde_json::{Value, json};
use std::collections::BTreeMap;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only rollouts of this cluster.
    cluster: Option<String>,
    /// Show the per-node report of this rollout.
    #[arg(long = "rollout", value_name = "ID")]
    rollout: Option<String>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let store = Store::open_home(&ctx.home)?;
    match &args.rollout {
        Some(id) if store.upgrade(id)?.is_some() => {
            upgrade_report(ctx, &store, args.cluster.as_deref(), id)
        }
        Some(id) => report(ctx, &store, args.cluster.as_deref(), id),
        None => list(ctx, &store, args.cluster.as_deref()),
    }
}

fn list(ctx: &Ctx, store: &Store, cluster: Option<&str>) -> anyhow::Result<u8> {
    if let Some(name) = cluster
        && store.load_cluster(name)?.is_none()
        && store.list_rollouts(Some(name))?.is_empty()
        && store.list_upgrades(Some(name))?.is_empty()
    {
        let known: Vec<String> = store.list_clusters()?.into_iter().map(|c| c.name).collect();
        let known = if known.is_empty() {
            "none yet".to_string()
        } else {
            known.join(", ")
        };
        anyhow::bail!(
            "no cluster named `{name}` (registered: {known}); run `patchctl audit` to see every rollout"
        );
    }
    let rollouts = store.list_rollouts(cluster)?;
    let upgrades = store.list_upgrades(cluster)?;
    let mut counts = Vec::with_capacity(rollouts.len());
    for rollout in &rollouts {
        counts.push(state_counts(store, &rollout.id)?);
    }
    match ctx.format {
        Format::Json => {
            let entries: Vec<Value> = rollouts
                .iter()
                .zip(&counts)
                .map(|(rollout, counts)| {
                    let mut entry = rollout_json(rollout);
                    entry["nodes"] = json!(counts);
                    entry
                })
                .collect();
            // Upgrades join the same array as kind `upgrade`, so the document keeps one shape.
            let mut entries = entries;
            entries.extend(upgrades.iter().map(|upgrade| {
                json!({
                    "id": upgrade.id,
                    "cluster": upgrade.cluster,
                    "kind": "upgrade",
                    "state": upgrade.outcome,
                    "runbook": upgrade.runbook_name,
                    "runbook_sha256": upgrade.runbook_sha256,
                    "package_digest": upgrade.package_digest,
                    "package_path": upgrade.package_path,
                    "created_at": upgrade.started_at,
                    "finished_at": upgrade.finished_at,
                })
            }));
            outln!("{}", serde_json::to_string_pretty(&entries)?);
        }
        Format::Text => {
            if !upgrades.is_empty() {
                let rows: Vec<Vec<String>> = upgrades
                    .iter()
                    .map(|upgrade| {
                        vec![
                            upgrade.id.clone(),
                            upgrade.cluster.clone(),
                            upgrade.runbook_name.clone(),
                            upgrade.outcome.to_string(),
                            upgrade.started_at.to_string(),
                            upgrade
                                .finished_at
                                .map_or_else(|| "-".to_string(), |at| at.to_string()),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    plain_table(
                        &[
                            "Upgrade", "Cluster", "Runbook", "Outcome", "Started", "Finished"
                        ],
                        &rows
                    )
                );
                outln!();
            }
            if rollouts.is_empty() {
                match cluster {
                    Some(name) => outln!("No rollout recorded for cluster `{name}`"),
                    None => outln!("No rollout recorded yet"),
                }
                return Ok(patchctl::exit::OK);
            }
            let rows: Vec<Vec<String>> = rollouts
                .iter()
                .zip(&counts)
                .map(|(rollout, counts)| {
                    vec![
                        rollout.id.clone(),
                        rollout.cluster.clone(),
                        rollout.kind.to_string(),
                        dash(&rollout.version),
                        rollout.state.to_string(),
                        describe_counts(counts),
                        rollout.created_at.to_string(),
                        format_ms(millis_between(rollout)),
                    ]
                })
                .collect();
            let header = [
                "ID", "Cluster", "Kind", "Version", "State", "Nodes", "Started", "Duration",
            ];
            out!("{}", plain_table(&header, &rows));
            outln!("Show one rollout with `patchctl audit --rollout <ID>`");
        }
    }
    Ok(patchctl::exit::OK)
}

fn report(ctx: &Ctx, store: &Store, cluster: Option<&str>, id: &str) -> anyhow::Result<u8> {
    let report = match store.rollout_report(id)? {
        Some(report) if cluster.is_none_or(|name| report.rollout.cluster == name) => report,
        _ => {
            let recent: Vec<String> = store
                .list_rollouts(cluster)?
                .into_iter()
                .rev()
                .take(10)
                .map(|rollout| rollout.id)
                .collect();
            let recent = if recent.is_empty() {
                "none".to_string()
            } else {
                recent.join(", ")
            };
            let scope = cluster
                .map(|name| format!(" of cluster `{name}`"))
                .unwrap_or_default();
            anyhow::bail!(
                "no rollout `{id}`{scope} (most recent: {recent}); list them with `patchctl audit`"
            );
        }
    };
    match ctx.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report_json(&report))?),
        Format::Text => out!("{}", report_text(&report)),
    }
    Ok(patchctl::exit::OK)
}

fn upgrade_report(ctx: &Ctx, store: &Store, cluster: Option<&str>, id: &str) -> anyhow::Result<u8> {
    let Some(upgrade) = store
        .upgrade(id)?
        .filter(|upgrade| cluster.is_none_or(|name| upgrade.cluster == name))
    else {
        anyhow::bail!("no upgrade `{id}` of that cluster; list them with `patchctl audit`");
    };
    let entries = store
        .upgrade_entries(id)?
        .into_iter()
        .map(|(at, json)| {
            serde_json::from_str(&json)
                .map(|entry| (at, entry))
                .map_err(|error| {
                    anyhow::anyhow!("upgrade {id}: a journal entry cannot be read: {error}")
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = patchctl::upgrade::report::build(upgrade, &entries);
    match ctx.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => out!("{}", upgrade_report_text(&report)),
    }
    Ok(patchctl::exit::OK)
}

fn upgrade_report_text(report: &patchctl::upgrade::report::UpgradeReport) -> String {
    let upgrade = &report.upgrade;
    let mut out = String::new();
    out.push_str(&format!("Upgrade:   {}\n", upgrade.id));
    out.push_str(&format!("Cluster:   {}\n", upgrade.cluster));
    out.push_str(&format!(
        "Runbook:   {} (sha256 {})\n",
        upgrade.runbook_name, upgrade.runbook_sha256
    ));
    out.push_str(&format!("Package:   {}\n", dash(&upgrade.package_path)));
    out.push_str(&format!("Outcome:   {}\n", upgrade.outcome));
    out.push_str(&format!("Started:   {}\n", upgrade.started_at));
    if let Some(finished) = upgrade.finished_at {
        out.push_str(&format!("Finished:  {finished}\n"));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|row| {
            let mut note = dash(&row.note);
            if row.resolved {
                note = format!("{note} (resolved after a crash)");
            }
            vec![row.step.clone(), row.outcome.clone(), note]
        })
        .collect();
    out.push_str(&plain_table(&["Step", "Outcome", "Note"], &rows));
    if !report.backups.is_empty() {
        out.push_str("\nBackups:\n");
        let rows: Vec<Vec<String>> = report
            .backups
            .iter()
            .map(|backup| {
                vec![
                    backup.step.clone(),
                    backup.path.clone(),
                    backup.size.to_string(),
                    backup.sha256.clone(),
                ]
            })
            .collect();
        out.push_str(&plain_table(&["Step", "Path", "Bytes", "sha256"], &rows));
    }
    if !report.saved.is_empty() {
        out.push_str("\nSaved values:\n");
        for (name, value) in &report.saved {
            out.push_str(&format!("  {name} = {value}\n"));
        }
    }
    if !report.marks.is_empty() {
        out.push_str("\nMarks:\n");
        for (name, at) in &report.marks {
            out.push_str(&format!(
                "  {name} = {}\n",
                patchctl::store::Timestamp(at.saturating_mul(1000))
            ));
        }
        for (window, seconds) in &report.windows {
            out.push_str(&format!("  {window} = {seconds}s\n"));
        }
    }
    out
}

fn report_text(report: &RolloutReport) -> String {
    let rollout = &report.rollout;
    let mut out = String::new();
    out.push_str(&format!("Rollout:   {}\n", rollout.id));
    out.push_str(&format!("Cluster:   {}\n", rollout.cluster));
    out.push_str(&format!("Kind:      {}\n", rollout.kind));
    out.push_str(&format!(
        "Package:   {} ({})\n",
        dash(&rollout.version),
        dash(&rollout.package_path)
    ));
    out.push_str(&format!(
        "Digest:    {}\n",
        dash(
            rollout
                .package_digest
                .as_ref()
                .map_or("", TreeDigest::as_str)
        )
    ));
    out.push_str(&format!("State:     {}\n", rollout.state));
    out.push_str(&format!("Started:   {}\n", rollout.created_at));
    out.push_str(&format!(
        "Duration:  {}\n",
        format_ms(millis_between(rollout))
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = report
        .nodes
        .iter()
        .map(|node| {
            let steps: Vec<String> = node
                .steps
                .iter()
                .filter(|step| step.state != "started")
                .map(|step| match step.duration_ms {
                    Some(ms) => format!("{} {} {}", step.step, step.state, format_ms(ms)),
                    None => format!("{} {}", step.step, step.state),
                })
                .collect();
            vec![
                node.node_id.clone(),
                node.state
                    .map_or_else(|| "-".to_string(), |state| state.to_string()),
                format_ms(node.duration_ms),
                if steps.is_empty() {
                    "-".to_string()
                } else {
                    steps.join(", ")
                },
                node.reason.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    out.push_str(&plain_table(
        &["Node", "Result", "Duration", "Steps", "Reason"],
        &rows,
    ));
    out.push_str(&format!("Total nodes: {}\n", report.nodes.len()));
    out
}

/// The report with the stored JSON documents (plan, options) embedded as JSON rather than as strings.
fn report_json(report: &RolloutReport) -> Value {
    json!({
        "rollout": rollout_json(&report.rollout),
        "nodes": report.nodes,
    })
}

fn rollout_json(rollout: &Rollout) -> Value {
    let parse = |text: &str| {
        serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_string()))
    };
    json!({
        "id": rollout.id,
        "cluster": rollout.cluster,
        "kind": rollout.kind,
        "state": rollout.state,
        "package_digest": rollout.package_digest.as_ref().map_or("", TreeDigest::as_str),
        "package_path": rollout.package_path,
        "version": rollout.version,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "duration_ms": millis_between(rollout),
        "plan": parse(&rollout.plan_json),
        "options": parse(&rollout.options_json),
    })
}

/// Node count per state, in the state machine's order.
fn state_counts(store: &Store, rollout_id: &str) -> anyhow::Result<BTreeMap<&'static str, usize>> {
    let mut counts = BTreeMap::new();
    for node in store.node_states(rollout_id)? {
        *counts.entry(node.state.as_str()).or_insert(0) += 1;
    }
    Ok(counts)
}

fn describe_counts(counts: &BTreeMap<&'static str, usize>) -> String {
    let parts: Vec<String> = NodeRolloutState::ALL
        .iter()
        .filter_map(|state| {
            counts
                .get(state.as_str())
                .map(|count| format!("{count} {state}"))
        })
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

fn millis_between(rollout: &Rollout) -> u64 {
    u64::try_from(rollout.updated_at.since(rollout.created_at).as_millis()).unwrap_or(u64::MAX)
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

/// `850ms`, `12.3s`, `4m05s`.
fn format_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::format_ms;

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(format_ms(850), "850ms");
        assert_eq!(format_ms(12_345), "12.3s");
        assert_eq!(format_ms(245_000), "4m05s");
    }
}
