//! DEMO ONLY: command-line pieces shared by `demo-master` and `demo-worker` (`stamp`, `version`, start-up).

use crate::stamp::{self, Mode, Stamp, StampError};
use crate::{StartAction, start_behaviour};
use std::path::PathBuf;

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
pub async fn start(program: &str) -> Result<(Stamp, String), StampError> {
    let own = stamp::own_stamp()?;
    if start_behaviour(&own).await == StartAction::Crash {
        eprintln!(
            "{program} {}: crashing on start (demo mode `crash`)",
            own.version
        );
        std::process::exit(crate::CRASH_EXIT_CODE);
    }
    let sha256 = stamp::sha256_file(&stamp::own_exe())?;
    Ok((own, sha256))
}
