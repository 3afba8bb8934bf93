//! `patchctl cert issue`: issue an agent or controller certificate signed by the cluster CA. A controller
//! certificate carries its role (`operator`, `observer`) and the person it is for (`--operator`), and lives 7 days
//! unless told otherwise; names the CA's own files use, and existing certificates, are refused without `--force`.

use super::args::CaLocation;
use super::{Ctx, Format};
use anyhow::{Context, bail};
use patchd_tls::{CertSpec, ControllerRole, Role};
use std::path::PathBuf;

/// Names that would overwrite the CA's own files (`ca.crt`, `ca.key`, `ca.crl`).
const RESERVED_NAMES: &[&str] = &["ca"];
/// Default validity of a controller certificate: short, so a leaked one expires soon even unrevoked.
const CONTROLLER_DAYS: u32 = 7;
/// Default validity of an agent certificate.
const AGENT_DAYS: u32 = 365;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    /// A patchd agent (TLS server; EKU serverAuth).
    Agent,
    /// A controller that may do everything: upload, stage, apply, rollback, and read (`controller` is an alias).
    #[value(alias = "controller")]
    Operator,
    /// A controller that may only read: Info and Status (`patchctl display`, `agent info`).
    Observer,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Issue a certificate and key (<name>.crt, <name>.key mode 0600). Refuses to replace existing files of that
    /// name without --force.
    Issue {
        /// Certificate name: common name and file stem (e.g. the host name, or "controller").
        name: String,
        /// What the certificate is for.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The person a controller certificate is for (logged by agents with every change they make, and shown by
        /// `display`). Default: $USER, else the name of the current user.
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// Host name or IP address the controller dials this agent by (repeatable; no wildcards). Default for
        /// agents: <name>.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
        /// Output directory. Default: the CA directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        ca: CaLocation,
        /// Validity in days. Default: 7 for controller certificates, 365 for agents.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: Option<u32>,
        /// Replace an existing certificate and key of this name.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    let Command::Issue {
        name,
        role: role_arg,
        operator,
        mut sans,
        out,
        ca,
        days,
        force,
    } = args.command;
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "invalid certificate name `{name}`: use letters, digits, '-', '_' and '.' (it becomes a file name)"
        );
    }
    if RESERVED_NAMES.contains(&name.as_str()) {
        bail!(
            "`{name}` is reserved: {name}.crt and {name}.key are the cluster CA's own files; pick another name (e.g. \
             the host name, or \"controller\")"
        );
    }
    let (role, controller_role) = match role_arg {
        RoleArg::Agent => (Role::Agent, None),
        RoleArg::Operator => (Role::Controller, Some(ControllerRole::Operator)),
        RoleArg::Observer => (Role::Controller, Some(ControllerRole::Observer)),
    };
    let operator = match (controller_role, operator) {
        (None, Some(_)) => {
            bail!("--operator names the person a controller certificate is for; an agent has none")
        }
        (None, None) => None,
        (Some(_), Some(operator)) => Some(operator),
        (Some(_), None) => Some(login_name().context(
            "name the person this certificate is for with --operator NAME (no login name found)",
        )?),
    };
    if role == Role::Agent && sans.is_empty() {
        errln!(
            "note: no --san given: the certificate names only `{name}`; the controller must dial it by that name"
        );
        sans.push(name.clone());
    }
    let out = out.unwrap_or_else(|| ca.dir(ctx));
    let (cert_file, key_file) = (
        out.join(format!("{name}.crt")),
        out.join(format!("{name}.key")),
    );
    if !force && let Some(existing) = [&cert_file, &key_file].into_iter().find(|p| p.exists()) {
        bail!(
            "{} already exists: pass --force to replace it (a certificate in use keeps working until it expires or \
             is revoked with `patchctl ca revoke`)",
            existing.display()
        );
    }
    let authority = ca.load(ctx)?;
    let days = days.unwrap_or(if role == Role::Agent {
        AGENT_DAYS
    } else {
        CONTROLLER_DAYS
    });
    let mut spec = CertSpec::new(name.as_str(), role, sans.clone(), days);
    if let Some(controller_role) = controller_role {
        spec = spec.with_controller_role(controller_role);
    }
    if let Some(operator) = &operator {
        spec = spec.with_operator(operator.as_str());
    }
    let not_after = spec.not_after;
    let issued = authority
        .issue(&spec)
        .context("cannot issue the certificate")?;
    let (serial, _) = patchd_tls::serial_of_cert_pem(
        &cert_file,
        issued.cert_pem.as_bytes(),
        authority.cert_pem().as_bytes(),
    )?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let paths = issued.write(&out, &name)?;
    let role_name = controller_role.map_or(role.as_str(), ControllerRole::as_str);
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "name": name, "role": role_name, "operator": operator, "sans": sans, "serial": serial,
                "cert": paths.cert, "key": paths.key, "not_after": not_after.unix_timestamp(),
            })
        ),
        Format::Text => {
            outln!("issued {role_name} certificate `{name}` (valid {days} days)");
            if let Some(operator) = &operator {
                outln!("  operator     {operator}");
            }
            if !sans.is_empty() {
                outln!("  names        {}", sans.join(", "));
            }
            outln!("  serial       {serial}   (revoke: patchctl ca revoke {serial})");
            outln!("  certificate  {}", paths.cert.display());
            outln!("  key          {} (mode 0600)", paths.key.display());
        }
    }
    Ok(patchctl::exit::OK)
}

/// Who runs this command: `$USER`, else the account name of the current user id.
fn login_name() -> Option<String> {
    std::env::var("USER")
        .ok()
        .filter(|user| !user.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|user| user.name)
        })
}
