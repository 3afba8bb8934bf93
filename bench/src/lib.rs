//! Helpers shared by the benchmark binaries.

use std::time::Duration;

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`; zero when it cannot be read (the
/// process is gone). Children's time is not included.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime (fields 14 and 15 of proc(5)), in clock ticks of 10 ms.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The median of sorted values: the mean of the two middle ones for an even count (with two pushes, the higher
/// one alone would be reported as the median).
pub fn median_of_sorted(sorted: &[f64]) -> Option<f64> {
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}
