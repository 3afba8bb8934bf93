//! DEMO ONLY: a tiny DM-like cluster (`demo-master`, `demo-worker`) that the quickstart and the e2e tests patch,
//! and `demo-oms` (`oms.rs`), the OMS stand-in of the upgrade example.
//! Not part of patchd: it exists so there is something real to patch, take offline and watch.
#![forbid(unsafe_code)]

pub mod cli;
pub mod master;
pub mod oms;
pub mod stamp;
pub mod worker;

use stamp::{Mode, Stamp};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exit code of a binary stamped with mode `crash`.
pub const CRASH_EXIT_CODE: i32 = 3;

/// What a binary must do before it listens, according to its stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAction {
    /// Go on and listen.
    Listen,
    /// Exit at once with [`CRASH_EXIT_CODE`] (mode `crash`).
    Crash,
}

/// Applies the stamped start behaviour: sleeps for `slow-start`, tells the caller to exit for `crash`.
pub async fn start_behaviour(stamp: &Stamp) -> StartAction {
    match stamp.mode {
        Mode::Crash => StartAction::Crash,
        Mode::SlowStart => {
            tokio::time::sleep(Duration::from_millis(stamp.delay_ms)).await;
            StartAction::Listen
        }
        Mode::Ok | Mode::FailHealth => StartAction::Listen,
    }
}

/// Completes on SIGTERM or SIGINT (graceful shutdown of the HTTP server).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still dies on SIGTERM by default: just never resolve.
        _ => std::future::pending::<()>().await,
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
