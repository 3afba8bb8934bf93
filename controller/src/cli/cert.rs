//! `patchctl cert issue`: issue an agent or controller certificate signed by the cluster CA.

use super::{Ctx, Format};
use anyhow::Context;
use patchd_tls::{CertSpec, CertificateAuthority, Role};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// A patchd agent (TLS server; EKU serverAuth).
    Agent,
    /// The patchctl controller (TLS client; EKU clientAuth).
    Controller,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Issue a certificate and key (<name>.crt, <name>.key mode 0600), replacing older files of that name.
    Issue {
        /// Certificate name: common name and file stem (e.g. the host name, or "controller").
        name: String,
        /// What the certificate is for.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Host name or IP address the controller dials this agent by (repeatable). Default for agents: <name>.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
        /// Output directory. Default: the CA directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Directory holding ca.crt and ca.key. Default: $PATCHCTL_HOME/tls
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let Command::Issue {
        name,
        role,
        mut sans,
        out,
        ca_dir,
        days,
    } = args.command;
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        anyhow::bail!(
            "invalid certificate name `{name}`: use letters, digits, '-', '_' and '.' (it becomes a file name)"
        );
    }
    let role = match role {
        RoleArg::Agent => Role::Agent,
        RoleArg::Controller => Role::Controller,
    };
    if role == Role::Agent && sans.is_empty() {
        errln!(
            "note: no --san given: the certificate names only `{name}`; the controller must dial it by that name"
        );
        sans.push(name.clone());
    }
    let ca_dir = ca_dir.unwrap_or_else(|| ctx.home.tls_dir());
    let out = out.unwrap_or_else(|| ca_dir.clone());
    let ca = CertificateAuthority::load(&ca_dir).with_context(|| {
        format!(
            "cannot load the CA from {} (create one with `patchctl ca init`)",
            ca_dir.display()
        )
    })?;
    let spec = CertSpec::new(name.as_str(), role, sans.clone(), days);
    let not_after = spec.not_after;
    let paths = ca
        .issue(&spec)
        .context("cannot issue the certificate")?
        .write(&out, &name)?;
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "name": name, "role": role.as_str(), "sans": sans, "cert": paths.cert, "key": paths.key,
                "not_after": not_after.unix_timestamp(),
            })
        ),
        Format::Text => {
            outln!(
                "issued {} certificate `{name}` (valid {days} days)",
                role.as_str()
            );
            if !sans.is_empty() {
                outln!("  names        {}", sans.join(", "));
            }
            outln!("  certificate  {}", paths.cert.display());
            outln!("  key          {} (mode 0600)", paths.key.display());
        }
    }
    Ok(patchctl::exit::OK)
}
