//! `patchctl ca init`: create the cluster certificate authority (default `$PATCHCTL_HOME/tls`).

use super::{Ctx, Format};
use anyhow::Context;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a new cluster CA (ca.crt, ca.key with mode 0600). Refuses to replace an existing one.
    Init {
        /// Directory for ca.crt and ca.key. Default: $PATCHCTL_HOME/tls
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Init { dir, force } => {
            let dir = dir.unwrap_or_else(|| ctx.home.tls_dir());
            let paths = patchd_tls::init_ca(&dir, force).context("cannot create the CA")?;
            match ctx.format {
                Format::Json => {
                    outln!(
                        "{}",
                        serde_json::json!({ "cert": paths.cert, "key": paths.key, "replaced": force })
                    )
                }
                Format::Text => {
                    outln!("created cluster CA");
                    outln!("  certificate  {}", paths.cert.display());
                    outln!(
                        "  key          {} (mode 0600: keep it secret)",
                        paths.key.display()
                    );
                    outln!("next:");
                    outln!("  patchctl cert issue controller --role controller");
                    outln!(
                        "  patchctl cert issue <host> --role agent --san <host>   (one per agent host)"
                    );
                }
            }
            Ok(patchctl::exit::OK)
        }
    }
}
