//! Arguments several commands share: the `-N`/`-R` selection; where the CA lives (`ca`, `cert`); and for `patch`
//! and `rollback` the review and policy flags with the review itself (dry run, plan, confirmation) and the rollout
//! lock taken after it.

use super::{Ctx, Format};
use anyhow::{Context, bail};
use patchctl::exit;
use patchctl::output::ask;
use patchctl::rollout::report_takeover;
use patchctl::store::{RolloutLock, Store};
use patchd_planner::{Amount, Plan, Policy};
use std::io::IsTerminal;
use std::time::Duration;

/// `-N`/`-R`: which nodes a command is about.
#[derive(Debug, Clone, clap::Args)]
pub struct Selection {
    /// Only these nodes (IDs or names, comma-separated).
    #[arg(short = 'N', long = "node", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Only these roles (comma-separated). With -N: the intersection.
    #[arg(short = 'R', long = "role", value_delimiter = ',')]
    pub roles: Vec<String>,
}

/// Environment variable naming the CA private key when it is kept outside the CA directory.
pub const CA_KEY_ENV: &str = "PATCHCTL_CA_KEY";

/// Where the cluster CA is: its directory (`ca.crt`, `revoked.json`, `ca.crl`) and its private key, which may be
/// kept elsewhere (another directory, removable media): only `cert issue`, `ca revoke` and `ca crl` read it.
#[derive(Debug, Clone, clap::Args)]
pub struct CaLocation {
    /// Directory of the CA certificate. Default: $PATCHCTL_HOME/tls
    #[arg(long = "ca-dir", alias = "dir", value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// The CA private key. Default: ca.key in the CA directory.
    #[arg(long = "ca-key", env = CA_KEY_ENV, value_name = "PATH")]
    pub key: Option<std::path::PathBuf>,
}

impl CaLocation {
    /// The CA directory.
    pub fn dir(&self, ctx: &Ctx) -> std::path::PathBuf {
        self.dir.clone().unwrap_or_else(|| ctx.home.tls_dir())
    }

    /// The CA certificate and key paths.
    pub fn paths(&self, ctx: &Ctx) -> patchd_tls::CaPaths {
        patchd_tls::CaPaths::with_key(&self.dir(ctx), self.key.as_deref())
    }

    /// Loads the CA (certificate and key); the error says where it looked and how to point elsewhere.
    pub fn load(&self, ctx: &Ctx) -> anyhow::Result<patchd_tls::CertificateAuthority> {
        let paths = self.paths(ctx);
        patchd_tls::CertificateAuthority::load_from(&paths).with_context(|| {
            format!(
                "cannot load the CA ({}, key {}): create one with `patchctl ca init`, or pass --ca-dir, and --ca-key \
                 (or set {CA_KEY_ENV}) when the key is kept elsewhere",
                paths.cert.display(),
                paths.key.display()
            )
        })
    }
}

/// Review and policy flags of a new rollout.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutFlags {
    /// Print the plan and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long = "yes")]
    pub yes: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

impl RolloutFlags {
    /// Prints the plan (or only prints it, with --dry-run) and asks to go on. `Some(exit code)` when the command
    /// ends here: a dry run, or the operator declined.
    pub(super) async fn review(
        &self,
        ctx: &Ctx,
        header: &str,
        plan: &Plan,
    ) -> anyhow::Result<Option<u8>> {
        if self.dry_run {
            return print_dry_run(ctx, header, plan).map(Some);
        }
        errln!("{header}\n\n{plan}");
        warn_parallelism(plan);
        if self.policy.canary.is_some()
            && self.policy.canary_wait.is_none()
            && !std::io::stdin().is_terminal()
        {
            bail!(
                "--canary needs a confirmation after the canary batch, and stdin is not a terminal: add --canary-wait DURATION"
            );
        }
        if !confirm("Do you want to continue?", self.yes).await? {
            return Ok(Some(exit::DECLINED));
        }
        Ok(None)
    }
}

fn print_dry_run(ctx: &Ctx, header: &str, plan: &Plan) -> anyhow::Result<u8> {
    match ctx.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(plan)?),
        Format::Text => outln!("{header}\n\n{plan}\n(dry run: nothing was changed)"),
    }
    Ok(exit::OK)
}

/// Says so when the failure budget, not the batch size, bounds how many nodes run at once.
fn warn_parallelism(plan: &Plan) {
    let budget = plan.policy().failure_budget as usize;
    let widest = plan
        .batches()
        .iter()
        .map(|batch| batch.nodes.len())
        .max()
        .unwrap_or(0);
    if widest > budget + 1 {
        errln!(
            "Note: with --failure-budget {budget} at most {} node(s) are patched at once (so that at most {} can end \
             failed); raise --failure-budget to run batches of {widest} in parallel.",
            budget + 1,
            budget + 1
        );
    }
}

/// Asks on the terminal. Without `-y` and without a terminal, refuses (the caller exits 4).
pub(super) async fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        errln!("Not confirmed: stdin is not a terminal. Pass -y to confirm without a prompt.");
        return Ok(false);
    }
    let question = question.to_string();
    let answer = tokio::task::spawn_blocking(move || ask(&question))
        .await
        .context("the prompt stopped unexpectedly")??;
    if !answer {
        errln!("Declined: nothing was changed.");
    }
    Ok(answer)
}

/// Batching and failure policy flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Nodes per batch, per role: a count or a percent (`25%`).
    #[arg(long, default_value = "1")]
    pub batch_size: Amount,
    /// Nodes of a role that may be unavailable at once (count or percent), counting nodes already down.
    #[arg(long, default_value = "1")]
    pub max_unavailable: Amount,
    /// Patch a first batch of N nodes, then pause (confirmation, or --canary-wait).
    #[arg(long, value_name = "N")]
    pub canary: Option<u32>,
    /// After the canary batch, wait this long instead of asking (e.g. `30s`).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub canary_wait: Option<Duration>,
    /// Nodes allowed to end failed or reverted before the rollout halts. At most budget+1 nodes are patched at
    /// once, so that at most budget+1 can end failed.
    #[arg(long, default_value_t = 0)]
    pub failure_budget: u32,
}

impl PolicyArgs {
    pub(super) fn policy(&self) -> Policy {
        Policy {
            batch_size: self.batch_size,
            max_unavailable: self.max_unavailable,
            canary: self.canary,
            failure_budget: self.failure_budget,
        }
    }

    /// `--canary-wait` as journaled in the rollout options.
    pub(super) fn canary_wait_ms(&self) -> Option<u64> {
        self.canary_wait.map(|wait| wait.as_millis() as u64)
    }
}

/// Takes `cluster`'s rollout lock for a new `patch` or `rollback`, after its review. Another rollout may have
/// started and stopped while this one planned and asked: never run over it.
pub fn lock_for_new_rollout(store: &Store, cluster: &str) -> anyhow::Result<RolloutLock> {
    let lock = store.acquire_rollout_lock(cluster)?;
    report_takeover(&lock);
    if let Some(unfinished) = store.unfinished_rollout(cluster)? {
        bail!(
            "rollout {} ({}, {}) on cluster `{cluster}` started meanwhile and is unfinished: finish it first with \
             `patchctl patch --resume {cluster}`",
            unfinished.id,
            unfinished.kind,
            unfinished.state,
        );
    }
    Ok(lock)
}
