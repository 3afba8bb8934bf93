//! `patchctl ca`: create the cluster certificate authority (default `$PATCHCTL_HOME/tls`), revoke certificates it
//! issued, and write the CRL the agents load (`[tls] crl`).

use super::args::{CA_KEY_ENV, CaLocation};
use super::{Ctx, Format};
use anyhow::Context;
use patchd_tls::{CRL_FILE, REVOKED_FILE, Revocations};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a new cluster CA (ca.crt, ca.key with mode 0600). Refuses to replace an existing one.
    Init {
        #[command(flatten)]
        ca: CaLocation,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate this CA issued (by its file or its serial number), then rewrite the CRL.
    /// Copy the CRL to every agent's `[tls] crl` path: each refuses the certificate at its next connection.
    Revoke {
        /// The certificate file (PEM), or its serial number in hex (`patchctl cert issue` prints it).
        certificate: String,
        #[command(flatten)]
        ca: CaLocation,
        /// Where to write the CRL. Default: ca.crl in the CA directory.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Write the CRL (signed by the CA) listing every revoked certificate; run again before its next update
    /// (30 days) to keep it current.
    Crl {
        #[command(flatten)]
        ca: CaLocation,
        /// Where to write the CRL. Default: ca.crl in the CA directory.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Init { ca, force } => init(ctx, &ca, force),
        Command::Revoke {
            certificate,
            ca,
            out,
        } => revoke(ctx, &ca, &certificate, out),
        Command::Crl { ca, out } => {
            let dir = ca.dir(ctx);
            let revocations = Revocations::load(&dir.join(REVOKED_FILE))?;
            let written = write_crl(ctx, &ca, &revocations, out)?;
            report_crl(ctx, &written, &revocations, None);
            Ok(patchctl::exit::OK)
        }
    }
}

fn init(ctx: &Ctx, ca: &CaLocation, force: bool) -> anyhow::Result<u8> {
    let paths = ca.paths(ctx);
    for dir in [&paths.cert, &paths.key].iter().filter_map(|p| p.parent()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let paths = patchd_tls::init_ca(&paths, force).context("cannot create the CA")?;
    let key_elsewhere = ca.key.is_some();
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
            if key_elsewhere {
                outln!(
                    "  only `cert issue`, `ca revoke` and `ca crl` need the key: pass --ca-key or set {CA_KEY_ENV}"
                );
            }
            outln!("next:");
            outln!("  patchctl cert issue controller --role operator --operator <your name>");
            outln!("  patchctl cert issue <host> --role agent --san <host>   (one per agent host)");
        }
    }
    Ok(patchctl::exit::OK)
}

fn revoke(
    ctx: &Ctx,
    ca_location: &CaLocation,
    certificate: &str,
    out: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let dir = ca_location.dir(ctx);
    let ca = ca_location.load(ctx)?;
    let as_file = Path::new(certificate);
    let (serial, subject) = if as_file.is_file() {
        let pem =
            std::fs::read(as_file).with_context(|| format!("cannot read {}", as_file.display()))?;
        patchd_tls::serial_of_cert_pem(as_file, &pem, ca.cert_pem().as_bytes())?
    } else {
        (certificate.to_string(), String::new())
    };
    let record = dir.join(REVOKED_FILE);
    let mut revocations = Revocations::load(&record)?;
    let (entry, added) = revocations.revoke(&serial, &subject)?;
    if added {
        revocations.save(&record)?;
    }
    let written = write_crl(ctx, ca_location, &revocations, out)?;
    report_crl(ctx, &written, &revocations, Some((&entry, added)));
    Ok(patchctl::exit::OK)
}

fn write_crl(
    ctx: &Ctx,
    ca_location: &CaLocation,
    revocations: &Revocations,
    out: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let ca = ca_location.load(ctx)?;
    let path = out.unwrap_or_else(|| ca_location.dir(ctx).join(CRL_FILE));
    let pem = ca.crl_pem(revocations).context("cannot sign the CRL")?;
    patchd_tls::write_file_atomic(&path, pem.as_bytes(), 0o644)?;
    Ok(path)
}

fn report_crl(
    ctx: &Ctx,
    crl: &Path,
    revocations: &Revocations,
    revoked: Option<(&patchd_tls::RevokedCert, bool)>,
) {
    match ctx.format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "crl": crl,
                "revoked": revocations.entries().iter().map(|e| serde_json::json!({
                    "serial": e.serial, "subject": e.subject, "revoked_unix": e.revoked_unix,
                })).collect::<Vec<_>>(),
                "serial": revoked.map(|(e, _)| e.serial.clone()),
                "already_revoked": revoked.map(|(_, added)| !added),
            })
        ),
        Format::Text => {
            if let Some((entry, added)) = revoked {
                let subject = if entry.subject.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", entry.subject)
                };
                if added {
                    outln!("revoked serial {}{subject}", entry.serial);
                } else {
                    outln!("serial {}{subject} was already revoked", entry.serial);
                }
            }
            outln!(
                "wrote CRL {} ({} revoked certificate{})",
                crl.display(),
                revocations.entries().len(),
                if revocations.entries().len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            outln!(
                "next: copy it to every agent's [tls] crl path (e.g. /etc/patchd/tls/ca.crl); each agent reloads it at \
                 its next connection, without a restart"
            );
        }
    }
}
