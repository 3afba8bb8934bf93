//! DEMO ONLY: command-line pieces shared by `demo-master` and `demo-worker` (`stamp`, `version`, start-up).

use crate::stamp::{self, Mode, Stamp, StampError};
use crate::{StartAction, start_behaviour};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::TcpListener;

/// The subcommands every demo binary has besides `serve` (flattened into each binary's command enum).
#[derive(Debug, clap::Subcommand)]
pub enum CommonCommand {
    /// Copy this binary with a version label and a behaviour stamped into it.
    Stamp(StampArgs),
    /// Print the version label stamped into this binary.
    Version,
}

impl CommonCommand {
    /// Runs the command, printing its result on stdout.
    pub fn run(&self) -> Result<(), StampError> {
        match self {
            Self::Stamp(args) => {
                let stamped = run_stamp(args)?;
                println!(
                    "stamped {} as {} (mode {})",
                    args.out.display(),
                    stamped.version,
                    stamped.mode.as_str()
                );
            }
            Self::Version => println!("{}", stamp::own_stamp()?.version),
        }
        Ok(())
    }
}

/// `stamp`: copy this executable with a version and behaviour stamped into it.
#[derive(Debug, clap::Args)]
pub struct StampArgs {
    /// Version label the stamped binary reports (e.g. v1.0.1-hotfix).
    #[arg(long = "version", value_name = "LABEL")]
    pub label: String,
    /// Behaviour of the stamped binary at start.
    #[arg(long, value_enum, default_value_t = Mode::Ok)]
    pub mode: Mode,
    /// Delay before listening, for `--mode slow-start`.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Binary to copy (default: this executable); any stamp it carries is replaced.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Where to write the stamped binary (mode 0755).
    #[arg(short, long)]
    pub out: PathBuf,
}

/// Writes the stamped copy.
pub fn run_stamp(args: &StampArgs) -> Result<Stamp, StampError> {
    let stamp = Stamp {
        version: args.label.clone(),
        mode: args.mode,
        delay_ms: args.delay_ms,
    };
    let source = args.from.clone().unwrap_or_else(stamp::own_exe);
    stamp::write_stamped(&source, &args.out, &stamp)?;
    Ok(stamp)
}

/// Reads this executable's stamp and applies its start behaviour; exits the process for mode `crash`.
pub async fn start(program: &str) -> Result<Stamp, StampError> {
    let own = stamp::own_stamp()?;
    if start_behaviour(&own).await == StartAction::Crash {
        eprintln!(
            "{program} {}: crashing on start (demo mode `crash`)",
            own.version
        );
        std::process::exit(crate::CRASH_EXIT_CODE);
    }
    Ok(own)
}

/// The sha256 of this executable, as `/version` reports it: hashed on a blocking thread at the first `/version`
/// request, then kept. A real service does not hash its own binary before it serves, and ten demo services
/// restarting at once on a small machine would otherwise spend 100+ ms of their downtime hashing themselves.
#[derive(Debug, Clone, Default)]
pub struct OwnDigest(std::sync::Arc<tokio::sync::OnceCell<String>>);

impl OwnDigest {
    /// The hex sha256 (hashed on first use); an error is reported in the value itself.
    pub async fn get(&self) -> String {
        self.0
            .get_or_init(|| async {
                let hashed =
                    tokio::task::spawn_blocking(|| stamp::sha256_file(&stamp::own_exe())).await;
                match hashed {
                    Ok(Ok(sha256)) => sha256,
                    Ok(Err(e)) => format!("unknown ({e})"),
                    Err(e) => format!("unknown ({e})"),
                }
            })
            .await
            .clone()
    }
}

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeStartError {
    #[error(transparent)]
    Stamp(#[from] StampError),
    #[error("cannot listen on {listen}; pick a free address")]
    Listen {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A `serve` that passed its start behaviour and holds its listener.
#[derive(Debug)]
pub struct Serving {
    /// This executable's stamp.
    pub stamp: Stamp,
    /// Hex sha256 of this executable (hashed when first asked for).
    pub binary_sha256: OwnDigest,
    pub listener: TcpListener,
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
}

impl Serving {
    /// [`start`] (stamp, start behaviour), then binds `listen`.
    pub async fn start(program: &str, listen: &str) -> Result<Self, ServeStartError> {
        let stamp = start(program).await?;
        let binary_sha256 = OwnDigest::default();
        let listener =
            TcpListener::bind(listen)
                .await
                .map_err(|source| ServeStartError::Listen {
                    listen: listen.to_string(),
                    source,
                })?;
        let addr = listener.local_addr()?;
        Ok(Self {
            stamp,
            binary_sha256,
            listener,
            addr,
        })
    }

    /// Prints the ready line `PROGRAM listening on ADDR (name …, version …, mode …)` the tests wait for.
    pub fn announce(&self, program: &str, name: &str) {
        println!(
            "{program} listening on {} (name {name}, version {}, mode {})",
            self.addr,
            self.stamp.version,
            self.stamp.mode.as_str()
        );
    }
}
