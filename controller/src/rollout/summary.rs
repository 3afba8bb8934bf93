//! The final summary of a rollout: a table on stdout (or one JSON document), then how to go on.

use crate::executor::{NodePhase, RolloutEnd, RolloutReport};
use crate::output::{Format, plain_table};
use crate::store::{Rollout, RolloutKind};
use std::time::Duration;

fn result_word(kind: RolloutKind, phase: NodePhase, had_turn: bool) -> &'static str {
    match phase {
        NodePhase::Pending if had_turn => "interrupted, back online",
        NodePhase::Done if kind == RolloutKind::Rollback => "rolled back",
        NodePhase::Done => "patched",
        NodePhase::Skipped => "skipped",
        NodePhase::Reverted => "reverted",
        NodePhase::Failed => "failed",
        NodePhase::LeftOffline => "LEFT OFFLINE",
        NodePhase::Pending | NodePhase::Staged => "not started",
        _ => "in flight",
    }
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
}

pub(super) fn print_summary(
    format: Format,
    rollout: &Rollout,
    report: &RolloutReport,
    elapsed: Duration,
) -> Result<(), serde_json::Error> {
    let end = match report.end {
        RolloutEnd::Completed => "completed",
        RolloutEnd::CompletedWithFailures => "completed with failures",
        RolloutEnd::Halted => "halted: failure budget spent",
        RolloutEnd::Interrupted => "interrupted",
        RolloutEnd::Stopped => "stopped after the canary",
        RolloutEnd::Refused => "refused: another rollout holds a lease on its nodes",
    };
    match format {
        Format::Json => {
            let nodes: Vec<serde_json::Value> = report
                .nodes
                .iter()
                .map(|node| {
                    serde_json::json!({
                        "node": node.node.id,
                        "role": node.node.role,
                        "result": result_word(rollout.kind, node.phase, node.duration.is_some()),
                        "phase": node.phase.as_str(),
                        "duration_ms": node.duration.map(|d| d.as_millis() as u64),
                        "downtime_ms": node.downtime.map(|d| d.as_millis() as u64),
                        "reason": node.reason,
                    })
                })
                .collect();
            let document = serde_json::json!({
                "rollout": rollout.id,
                "cluster": rollout.cluster,
                "kind": rollout.kind,
                "end": end,
                "failures": report.failures,
                "elapsed_ms": elapsed.as_millis() as u64,
                "nodes": nodes,
            });
            outln!("{}", serde_json::to_string_pretty(&document)?);
        }
        Format::Text => {
            let rows: Vec<Vec<String>> = report
                .nodes
                .iter()
                .map(|node| {
                    vec![
                        node.node.id.clone(),
                        node.node.role.clone(),
                        result_word(rollout.kind, node.phase, node.duration.is_some()).to_string(),
                        seconds(node.duration),
                        seconds(node.downtime),
                        clip(node.reason.as_deref().unwrap_or_default(), 140),
                    ]
                })
                .collect();
            outln!();
            out!(
                "{}",
                plain_table(
                    &["Node", "Role", "Result", "Duration", "Downtime", "Reason"],
                    &rows
                )
            );
            outln!(
                "{} {} {end} in {:.1}s: {} node(s), {} failure(s).",
                capitalized(rollout.kind.as_str()),
                rollout.id,
                elapsed.as_secs_f64(),
                report.nodes.len(),
                report.failures
            );
            match report.end {
                RolloutEnd::Interrupted => {
                    outln!("Resume with `patchctl patch --resume {}`.", rollout.cluster)
                }
                RolloutEnd::Halted | RolloutEnd::CompletedWithFailures => {
                    outln!("See `patchctl audit {}` for every step.", rollout.cluster)
                }
                _ => {}
            }
        }
    }
    if report.end == RolloutEnd::Refused {
        for node in &report.nodes {
            if let Some(reason) = &node.reason {
                errln!("error: node {}: {reason}", node.node.id);
            }
        }
        errln!(
            "Nothing was changed. Run again once that rollout has ended (its controller releases the lease), or \
             after the lease expires if that controller is gone."
        );
    }
    Ok(())
}

/// At most `limit` characters, with `…` when cut (the JSON summary and `audit` keep the whole text).
fn clip(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(limit.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

pub(super) fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_clipped_in_the_table_only() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("0123456789abc", 10), "012345678…");
        assert_eq!(
            result_word(RolloutKind::Patch, NodePhase::Pending, true),
            "interrupted, back online"
        );
        assert_eq!(
            result_word(RolloutKind::Rollback, NodePhase::Done, true),
            "rolled back"
        );
    }
}
