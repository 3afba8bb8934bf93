//! Terminal output shared by the commands and the rollout runner: the output format, tiup's plain tables and the
//! yes/no prompt.

use std::io::{BufRead, Write};

/// Output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text and tables.
    Text,
    /// One JSON document on stdout.
    Json,
}

/// tiup's table style: no borders, a dashes line under the header, columns two spaces apart.
pub fn plain_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    table.set_header(header.iter().copied());
    table.add_row(header.iter().map(|title| "-".repeat(title.chars().count())));
    for row in rows {
        table.add_row(row.iter().map(String::as_str));
    }
    let mut text = String::new();
    for line in table.lines() {
        // Every cell has one space of left padding: drop the first column's.
        text.push_str(line.strip_prefix(' ').unwrap_or(&line).trim_end());
        text.push('\n');
    }
    text
}

/// Asks a yes/no question on stderr and reads the answer from stdin (no means no). Blocks: call it off the
/// async runtime's workers.
pub fn ask(question: &str) -> std::io::Result<bool> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{question} [y/N]: ")?;
    stderr.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}
