//! One parser for `/proc/<pid>/stat`, for everything that must tell a live process from a dead one or from a later
//! process that reused its pid: a pid plus its start time (field 22, clock ticks since boot) names one process
//! until the next reboot.
//!
//! The command name (field 2) is in parentheses and may itself hold spaces and parentheses, so the fields are
//! counted from the *last* `)`. Linux only; elsewhere every read is `None`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// The fields of `/proc/<pid>/stat` patchd uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie: exited, not reaped), `X` (dead), …
    pub state: char,
    /// Field 4: the parent's pid.
    pub ppid: u32,
    /// Field 5: the process group id.
    pub pgrp: u32,
    /// Field 22: start time in clock ticks after boot.
    pub start_ticks: u64,
}

impl ProcStat {
    /// The stat of `pid`, or `None` when there is no such process (or /proc cannot be read).
    pub fn read(pid: u32) -> Option<ProcStat> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Parses the text of a `/proc/<pid>/stat` file; `None` when it is not one.
    pub fn parse(text: &str) -> Option<ProcStat> {
        let after_name = &text[text.rfind(')')? + 1..];
        // fields[0] is field 3 (state): field N is fields[N - 3].
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        Some(ProcStat {
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start_ticks: fields.get(19)?.parse().ok()?,
        })
    }

    /// Still running: neither a zombie nor dead.
    pub fn is_running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// Whether `pid` is a running process (a zombie is not).
pub fn is_running(pid: u32) -> bool {
    ProcStat::read(pid).is_some_and(|stat| stat.is_running())
}

/// The start time of `pid` (clock ticks after boot), whether or not it is a zombie.
pub fn start_ticks(pid: u32) -> Option<u64> {
    ProcStat::read(pid).map(|stat| stat.start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            ProcStat::parse(text),
            Some(ProcStat {
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                start_ticks: 987654
            })
        );
        let zombie = text.replace(") S ", ") Z ");
        assert!(!ProcStat::parse(&zombie).unwrap().is_running());
        assert_eq!(ProcStat::parse("4242 (truncated) S 1 2"), None);
        assert_eq!(ProcStat::parse("no parenthesis"), None);
    }

    #[test]
    fn a_child_is_running_until_it_exits_and_is_reaped() {
        let me = ProcStat::read(std::process::id()).expect("own stat");
        assert!(me.is_running() && me.start_ticks > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let stat = ProcStat::read(pid).expect("child stat");
        assert_eq!(stat.ppid, std::process::id());
        assert!(stat.start_ticks >= me.start_ticks);
        assert!(is_running(pid));
        assert_eq!(start_ticks(pid), Some(stat.start_ticks));
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(!is_running(pid));
        assert_eq!(start_ticks(pid), None);
    }
}
