//! `patchctl agent info|push`: talk to one agent directly (building blocks of `patch`, and host debugging).

use super::{Ctx, Format};
use anyhow::Context;
use patchctl::agent::client::{AgentClient, PreparedBlob, PushOptions};
use patchctl::agent::digest_cache::DigestCache;
use patchctl::tls_files::ControllerTls;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show an agent's version and host facts.
    Info {
        /// Agent address, HOST:PORT. Its certificate must name HOST.
        addr: String,
        /// Directory with ca.crt, controller.crt, controller.key. Default: $PATCHCTL_HOME/tls
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Send a package to an agent's cache (transfer only; resumes; skips what the agent holds). The chunk hashes
    /// are remembered in $PATCHCTL_HOME/cache/digests, so pushing the same file again sends at once.
    Push {
        /// Agent address, HOST:PORT. Its certificate must name HOST.
        addr: String,
        /// The file to send.
        file: PathBuf,
        /// Chunk size in bytes: a power of two from 4096 to 4194304; part of the package digest.
        #[arg(long, default_value_t = patchd_package::digest::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// Directory with ca.crt, controller.crt, controller.key. Default: $PATCHCTL_HOME/tls
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Info { addr, tls_dir } => {
            let tls = ControllerTls::load_dir(&tls_dir.unwrap_or_else(|| ctx.home.tls_dir()))?;
            let mut client = AgentClient::connect(&addr, &tls).await?;
            let info = client.info().await?;
            match ctx.format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&info)?),
                Format::Text => {
                    let gib = |b: u64| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30));
                    outln!("agent      {}", info.agent);
                    outln!(
                        "version    patchd {} (protocol {})",
                        info.agent_version,
                        info.protocol_version
                    );
                    outln!(
                        "host       {} ({}/{}, {} CPUs)",
                        info.hostname,
                        info.os,
                        info.arch,
                        info.cpu_count
                    );
                    outln!(
                        "memory     {} available of {}",
                        gib(info.memory_available_bytes),
                        gib(info.memory_total_bytes)
                    );
                    outln!(
                        "disk       {} free in the state directory",
                        gib(info.state_dir_free_bytes)
                    );
                    outln!(
                        "uptime     host {}, agent {}",
                        humantime::format_duration(std::time::Duration::from_secs(
                            info.host_uptime_seconds
                        )),
                        humantime::format_duration(std::time::Duration::from_secs(
                            info.agent_uptime_seconds
                        ))
                    );
                    outln!(
                        "services   {}",
                        if info.services.is_empty() {
                            "(none)".to_string()
                        } else {
                            info.services.join(", ")
                        }
                    );
                }
            }
            Ok(patchctl::exit::OK)
        }
        Command::Push {
            addr,
            file,
            chunk_size,
            tls_dir,
        } => {
            let tls = ControllerTls::load_dir(&tls_dir.unwrap_or_else(|| ctx.home.tls_dir()))?;
            let cache = DigestCache::at(ctx.home.digest_cache_dir());
            let mut blob =
                PreparedBlob::prepare_cached(&file, chunk_size, Some(cache.clone())).await?;
            let mut client = AgentClient::connect(&addr, &tls).await?;
            let bar = if ctx.format == Format::Text {
                indicatif::ProgressBar::new(blob.total_size)
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .context("progress template")?,
            );
            let mut result = client
                .push(&blob, &PushOptions::default(), |p| {
                    bar.set_position(p.bytes_done)
                })
                .await;
            // Remembered hashes the agent refuses are forgotten, and the file is hashed and sent once more.
            if blob.from_cache()
                && let Err(error) = &result
                && error.code() == Some(tonic::Code::DataLoss)
            {
                cache.forget(blob.identity(), chunk_size);
                errln!(
                    "the agent refused the chunk hashes remembered for {} ({error}): hashing the file again",
                    file.display()
                );
                blob = PreparedBlob::prepare_cached(&file, chunk_size, Some(cache.clone())).await?;
                result = client
                    .push(&blob, &PushOptions::default(), |p| {
                        bar.set_position(p.bytes_done)
                    })
                    .await;
            }
            let report = result.with_context(|| {
                format!(
                    "push of {} to {addr} failed (the agent keeps the chunks it verified: run the same command \
                     again to resume)",
                    file.display()
                )
            })?;
            bar.finish_and_clear();
            match ctx.format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
                Format::Text => {
                    outln!("pushed {} to {}", file.display(), report.agent);
                    outln!("  digest   {}", report.digest);
                    outln!(
                        "  size     {} bytes in {} chunks of {} bytes",
                        report.total_bytes,
                        report.chunks_total,
                        report.chunk_size
                    );
                    outln!(
                        "  sent     {} bytes in {} chunks ({} chunks already held{})",
                        report.bytes_sent,
                        report.chunks_sent,
                        report.chunks_skipped,
                        if report.retries > 0 {
                            format!(", {} resent", report.retries)
                        } else {
                            String::new()
                        }
                    );
                    outln!(
                        "  time     {:.2} s transfer (+ {:.2} s {})",
                        report.transfer_seconds,
                        report.digest_seconds,
                        if report.digest_cached {
                            "finding the chunk hashes in the digest cache"
                        } else {
                            "reading and hashing the file"
                        }
                    );
                    outln!("  speed    {:.1} MB/s", report.mb_per_s);
                }
            }
            Ok(patchctl::exit::OK)
        }
    }
}
