//! The CLI's output, in one place: the output format, tiup's plain tables, the yes/no prompt, and the one way to
//! standard output and standard error, where a reader that went away (`| head -1`, a closed terminal) ends that
//! stream quietly, never with a panic, and never stops the work in progress.
//!
//! `println!` panics when stdout is a closed pipe (Rust ignores SIGPIPE, so the write returns `EPIPE`); for
//! `patchctl patch` that came after the rollout had finished, turning a success into exit 101. The macros
//! [`outln!`](crate::outln), [`out!`](crate::out), [`errln!`](crate::errln) and [`err!`](crate::err) write
//! through here instead: the first failed write marks the stream gone and every later write to it is dropped,
//! so the command goes on and exits with its own code (see the README's exit codes).

use std::fmt::Arguments;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed: nobody reads it any more.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set once a write to stderr failed.
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Writes to stdout; after a failed write, does nothing (see the module doc). Used by [`outln!`](crate::outln).
pub fn write_stdout(args: Arguments<'_>) {
    write_or_mark_gone(&STDOUT_GONE, &mut std::io::stdout().lock(), args);
}

/// Writes to stderr; after a failed write, does nothing. Used by [`errln!`](crate::errln).
pub fn write_stderr(args: Arguments<'_>) {
    write_or_mark_gone(&STDERR_GONE, &mut std::io::stderr().lock(), args);
}

/// Whether a write to stdout has failed (its reader is gone).
pub fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

fn write_or_mark_gone(gone: &AtomicBool, stream: &mut impl Write, args: Arguments<'_>) {
    if gone.load(Ordering::Relaxed) {
        return;
    }
    // A line that does not end in a newline (a prompt, a partial row) is flushed so the reader sees it now;
    // stdout is line-buffered, and a failure only shows at the flush.
    if stream
        .write_fmt(args)
        .and_then(|()| stream.flush())
        .is_err()
    {
        gone.store(true, Ordering::Relaxed);
    }
}

/// A writer to stderr for the log (`tracing`): a failed write is dropped, as [`errln!`](crate::errln) does,
/// instead of being reported on the very stream that failed.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrLog;

impl Write for StderrLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !STDERR_GONE.load(Ordering::Relaxed) && std::io::stderr().write_all(buf).is_err() {
            STDERR_GONE.store(true, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `println!` to stdout that stops quietly when the reader is gone (see [`crate::output`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` to stdout that stops quietly when the reader is gone (see [`crate::output`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

/// `eprintln!` to stderr that stops quietly when the reader is gone (see [`crate::output`]).
#[macro_export]
macro_rules! errln {
    () => {
        $crate::output::write_stderr(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` to stderr that stops quietly when the reader is gone (see [`crate::output`]).
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::output::write_stderr(format_args!($($arg)*))
    };
}

/// Output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text and tables.
    Text,
    /// One JSON document on stdout.
    Json,
}

/// tiup's table style: no borders, a dashes line under the header, columns two spaces apart.
pub fn plain_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    table.set_header(header.iter().copied());
    table.add_row(header.iter().map(|title| "-".repeat(title.chars().count())));
    for row in rows {
        table.add_row(row.iter().map(String::as_str));
    }
    let mut text = String::new();
    for line in table.lines() {
        // Every cell has one space of left padding: drop the first column's.
        text.push_str(line.strip_prefix(' ').unwrap_or(&line).trim_end());
        text.push('\n');
    }
    text
}

/// Asks a yes/no question on stderr and reads the answer from stdin (no means no). Blocks: call it off the
/// async runtime's workers.
pub fn ask(question: &str) -> std::io::Result<bool> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{question} [y/N]: ")?;
    stderr.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose reader is gone.
    struct ClosedPipe {
        writes: usize,
    }

    impl Write for ClosedPipe {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_first_failed_write_marks_the_stream_gone_and_later_writes_are_dropped() {
        let gone = AtomicBool::new(false);
        let mut pipe = ClosedPipe { writes: 0 };
        write_or_mark_gone(&gone, &mut pipe, format_args!("line {}\n", 1));
        assert!(gone.load(Ordering::Relaxed));
        write_or_mark_gone(&gone, &mut pipe, format_args!("line {}\n", 2));
        assert_eq!(pipe.writes, 1, "nothing is written once the reader is gone");
    }

    #[test]
    fn writes_to_an_open_stream_arrive_whole() {
        let gone = AtomicBool::new(false);
        let mut sink = Vec::new();
        write_or_mark_gone(&gone, &mut sink, format_args!("a {}\n", "b"));
        write_or_mark_gone(&gone, &mut sink, format_args!("c"));
        assert_eq!(sink, b"a b\nc");
        assert!(!gone.load(Ordering::Relaxed));
    }
}
