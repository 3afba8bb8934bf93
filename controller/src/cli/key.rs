//! `patchctl key generate`: an ed25519 package-signing key pair in minisign's format (see
//! `patchd_package::signing`); agents trust the public key (`[trust] keys`), `patchctl package sign` uses the secret.

use super::{Ctx, Format};
use anyhow::Context as _;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a package-signing key pair (ed25519, minisign's format): NAME.pub and NAME.key.
    ///
    /// Run this on the host that signs releases, not on the controller host: whoever holds the secret key can
    /// sign packages every agent that trusts the public key will install. The secret key file is written mode
    /// 0600 and unencrypted (`minisign -S -s NAME.key` signs with it too); keep it offline or in a secrets store. Put the public key
    /// (the `RW…` line, or the .pub file) in each agent's patchd.toml under `[trust] keys`.
    Generate(GenerateArgs),
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// Directory to write the key files to (created if missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Base name of the files: NAME.pub (public) and NAME.key (secret).
    #[arg(long, value_name = "NAME", default_value = "patchd-signing")]
    name: String,
    /// Replace existing key files of that name (signatures made with the old key stop verifying on agents that
    /// trust only the new one).
    #[arg(long)]
    force: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Generate(generate) => run_generate(ctx, generate),
    }
}

fn run_generate(ctx: &Ctx, args: GenerateArgs) -> anyhow::Result<u8> {
    if args.name.is_empty() || args.name.contains('/') || args.name.starts_with('.') {
        anyhow::bail!(
            "--name `{}` is not a file name: use letters, digits, '-' or '_' (for example release-2026)",
            args.name
        );
    }
    let public_path = args.out.join(format!("{}.pub", args.name));
    let secret_path = args.out.join(format!("{}.key", args.name));
    if !args.force {
        for path in [&public_path, &secret_path] {
            if path.exists() {
                anyhow::bail!(
                    "{} already exists: pick another --name or --out, or pass --force to replace the key pair",
                    path.display()
                );
            }
        }
    }
    let keys = patchd_package::signing::generate_keys().context("cannot generate a key pair")?;
    write(&secret_path, &keys.secret_file, 0o600)?;
    write(&public_path, &keys.public_file, 0o644)?;
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "key_id": keys.key_id.to_string(),
                "public_key": keys.public_key,
                "public_key_file": public_path,
                "secret_key_file": secret_path,
            }))?
        ),
        Format::Text => {
            outln!("Key id:      {}", keys.key_id);
            outln!(
                "Public key:  {} ({})",
                public_path.display(),
                keys.public_key
            );
            outln!(
                "Secret key:  {} (mode 0600: keep it off the controller host)",
                secret_path.display()
            );
            outln!();
            outln!("Trust it on each agent (patchd.toml):");
            outln!("  [trust]");
            outln!("  keys = [\"{}\"]", keys.public_key);
            outln!(
                "Sign a package: patchctl package sign PKG --key {}",
                secret_path.display()
            );
        }
    }
    Ok(patchctl::exit::OK)
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    patchd_tls::write_file_atomic(path, text.as_bytes(), mode)
        .with_context(|| format!("cannot write {}", path.display()))
}
