//! Host facts reported by the Info call (sysinfo for memory/uptime/hostname, statvfs for the state dir's disk).

use std::path::Path;
use std::time::Instant;

/// What the agent reports about itself and its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub state_dir_free_bytes: u64,
    pub host_uptime_seconds: u64,
    pub agent_uptime_seconds: u64,
    pub services: Vec<String>,
}

/// Collects the facts now. Blocking (reads /proc): call it from `spawn_blocking`. Facts that cannot be read are
/// reported as empty/zero rather than failing the call.
pub fn collect(state_dir: &Path, started: Instant, services: Vec<String>) -> HostInfo {
    let (memory_total_bytes, memory_available_bytes) = match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            (sys.total_memory(), sys.available_memory())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read memory information");
            (0, 0)
        }
    };
    let cpu_count = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    HostInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        cpu_count: u32::try_from(cpu_count).unwrap_or(u32::MAX),
        memory_total_bytes,
        memory_available_bytes,
        state_dir_free_bytes: crate::transfer::free_bytes(state_dir).unwrap_or(0),
        host_uptime_seconds: sysinfo::System::uptime().unwrap_or(0),
        agent_uptime_seconds: started.elapsed().as_secs(),
        services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_real_facts() {
        let dir = tempfile::tempdir().unwrap();
        let info = collect(dir.path(), Instant::now(), vec!["w".into()]);
        assert!(info.cpu_count >= 1);
        assert!(info.memory_total_bytes > 0);
        assert!(info.state_dir_free_bytes > 0);
        assert!(!info.hostname.is_empty());
        assert_eq!(info.services, vec!["w".to_string()]);
    }
}
