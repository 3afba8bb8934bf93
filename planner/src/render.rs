//! The stable text form of a [`Plan`] (golden files, `patchctl patch --dry-run`).

use super::*;

impl fmt::Display for Plan {
    /// Stable text rendering (golden files, `patchctl patch --dry-run`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = &self.summary;
        let policy = &self.policy;
        writeln!(
            f,
            "Plan: {} node(s) in {} role(s), {} batch(es)",
            summary.total_nodes,
            summary.roles.len(),
            self.batches.len()
        )?;
        let canary = match policy.canary {
            Some(count) => count.to_string(),
            None => "none".to_string(),
        };
        writeln!(
            f,
            "Policy: batch size {}, max unavailable {}, canary {}, failure budget {}",
            policy.batch_size, policy.max_unavailable, canary, policy.failure_budget
        )?;
        let id_width = self
            .batches
            .iter()
            .flat_map(|b| &b.nodes)
            .map(|n| n.id.len())
            .max()
            .unwrap_or(0);
        let name_width = self
            .batches
            .iter()
            .flat_map(|b| &b.nodes)
            .map(|n| n.name.len())
            .max()
            .unwrap_or(0);
        let host_width = self
            .batches
            .iter()
            .flat_map(|b| &b.nodes)
            .map(|n| n.host.len())
            .max()
            .unwrap_or(0);
        for role in &summary.roles {
            writeln!(f)?;
            writeln!(
                f,
                "Role {}: {} of {} node(s); batch size {}, max unavailable {} ({} down outside the selection, {} \
                 may go down at once)",
                role.role,
                role.selected,
                role.total,
                role.batch_size,
                role.max_unavailable,
                role.down_outside,
                role.headroom
            )?;
            for batch in self.batches.iter().filter(|batch| batch.role == role.role) {
                let mut marks = Vec::new();
                if batch.canary {
                    marks.push("canary");
                }
                if batch.pause_after {
                    marks.push("pause after");
                }
                let marks = if marks.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", marks.join(", "))
                };
                writeln!(f, "  Batch {}{}", batch.index + 1, marks)?;
                for node in &batch.nodes {
                    let mut notes = Vec::new();
                    if node.is_leader {
                        notes.push("leader");
                    }
                    if node.was_down {
                        notes.push("down");
                    }
                    let notes = if notes.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", notes.join(", "))
                    };
                    let line = format!(
                        "    {:<id_width$}  {:<name_width$}  {:<host_width$}{}",
                        node.id, node.name, node.host, notes
                    );
                    writeln!(f, "{}", line.trim_end())?;
                }
            }
        }
        Ok(())
    }
}
