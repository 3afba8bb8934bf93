//! Progress of a running rollout on stderr: bars per node on a terminal, plain timestamped lines otherwise; the
//! canary pause (wait, or ask on the terminal).

use super::summary::capitalized;
use crate::agent::client::PushProgress;
use crate::executor::{BatchSpec, Event, NodeRef, Observer, PauseDecision, Step, StepStatus};
use crate::output::ask;
use crate::store::Rollout;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Progress on stderr: bars per node on a terminal, plain timestamped lines otherwise; canary pauses.
pub(super) struct CliObserver {
    started: Instant,
    bars: Option<Bars>,
    package_bytes: u64,
    batch_count: usize,
    canary_wait: Option<Duration>,
}

struct Bars {
    multi: MultiProgress,
    nodes: Mutex<HashMap<String, ProgressBar>>,
}

impl CliObserver {
    pub(super) fn new(
        rollout: &Rollout,
        package_bytes: u64,
        batch_count: usize,
        canary_wait: Option<Duration>,
    ) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| Bars {
            multi: MultiProgress::new(),
            nodes: Mutex::new(HashMap::new()),
        });
        let observer = Self {
            started: Instant::now(),
            bars,
            package_bytes,
            batch_count,
            canary_wait,
        };
        observer.line(&format!(
            "{} {} on cluster `{}`",
            capitalized(rollout.kind.as_str()),
            rollout.id,
            rollout.cluster
        ));
        observer
    }

    pub(super) fn line(&self, text: &str) {
        let stamped = format!("[{:>7.2}s] {text}", self.started.elapsed().as_secs_f64());
        match &self.bars {
            Some(bars) => {
                let _ = bars.multi.println(stamped);
            }
            None => errln!("{stamped}"),
        }
    }

    fn node_line(&self, node: &NodeRef, text: &str) {
        self.line(&format!("{:<21} {text}", node.id));
    }

    fn bar(&self, node: &NodeRef) -> Option<ProgressBar> {
        let bars = self.bars.as_ref()?;
        let mut nodes = bars
            .nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bar = nodes.entry(node.id.clone()).or_insert_with(|| {
            let bar = bars.multi.add(ProgressBar::new(self.package_bytes.max(1)));
            let style = ProgressStyle::with_template(
                "{prefix:21} [{bar:24}] {bytes:>10}/{total_bytes:10} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(node.id.clone());
            bar
        });
        Some(bar.clone())
    }

    pub(super) fn pushed(&self, node: &NodeRef, progress: PushProgress) {
        if let Some(bar) = self.bar(node) {
            bar.set_length(progress.total_bytes.max(1));
            bar.set_position(progress.bytes_done);
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bars) = &self.bars {
            let nodes = bars
                .nodes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for bar in nodes.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}

impl Observer for CliObserver {
    fn event(&self, event: &Event) {
        match event {
            Event::StageStarted { nodes } => self.line(&format!("Staging the package on {nodes} node(s)")),
            Event::BatchStarted { batch } => {
                let ids: Vec<&str> = batch.nodes.iter().map(|node| node.id.as_str()).collect();
                let canary = if batch.canary { ", canary" } else { "" };
                self.line(&format!(
                    "Batch {}/{} ({}{canary}): {}",
                    batch.index + 1,
                    self.batch_count,
                    batch.role,
                    ids.join(", ")
                ));
            }
            Event::Step { node, step, status, detail } => {
                if let Some(bar) = self.bar(node) {
                    bar.set_message(format!("{step} {status}"));
                }
                let show = match status {
                    StepStatus::Started => matches!(step, Step::Apply | Step::Offline | Step::Undo),
                    StepStatus::Done => !matches!(step, Step::Mark),
                    StepStatus::Failed => true,
                    StepStatus::Skipped => false,
                };
                if show && self.bars.is_none() {
                    let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
                    let status = match status {
                        StepStatus::Done => "ok",
                        other => other.as_str(),
                    };
                    self.node_line(node, &format!("{step} {status}{detail}"));
                } else if *status == StepStatus::Failed {
                    self.node_line(node, &format!("{step} failed: {detail}"));
                }
            }
            Event::NodeFinished { node, phase, reason } => {
                let text = match reason {
                    Some(reason) if phase.is_failure() => format!("=> {phase}: {reason}"),
                    _ => format!("=> {phase}"),
                };
                if let Some(bar) = self.bar(node) {
                    bar.finish_with_message(phase.as_str().to_string());
                }
                self.node_line(node, &text);
            }
            Event::Halting { failures, budget } => self.line(&format!(
                "Failure budget spent ({failures} failure(s), budget {budget}): no new node starts; finishing the nodes \
                 in flight"
            )),
            Event::Interrupting => self.line("Interrupted: no new node starts"),
        }
    }

    async fn pause(&self, batch: &BatchSpec) -> PauseDecision {
        if let Some(wait) = self.canary_wait {
            self.line(&format!(
                "Canary batch {} done; going on in {} (Ctrl-C to stop here)",
                batch.index + 1,
                humantime::format_duration(wait)
            ));
            tokio::time::sleep(wait).await;
            return PauseDecision::Continue;
        }
        if !std::io::stdin().is_terminal() {
            self.line("Canary batch done, and there is no terminal to confirm on: stopping here");
            return PauseDecision::Stop;
        }
        let question = format!(
            "Canary batch {} done. Continue with the remaining batches?",
            batch.index + 1
        );
        // The prompt blocks on stdin: keep it off the runtime's workers so Ctrl-C is still handled meanwhile.
        let multi = self.bars.as_ref().map(|bars| bars.multi.clone());
        let answer = tokio::task::spawn_blocking(move || match multi {
            Some(multi) => multi.suspend(|| ask(&question)),
            None => ask(&question),
        })
        .await;
        match answer {
            Ok(Ok(true)) => PauseDecision::Continue,
            _ => PauseDecision::Stop,
        }
    }
}
