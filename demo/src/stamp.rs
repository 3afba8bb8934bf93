//! DEMO ONLY: the version/behaviour stamp appended to a demo binary, so a patched binary behaves differently by itself.
//!
//! Layout at the very end of the executable (found by reading only the tail):
//! `\n#PATCHD-DEMO-STAMP:` + JSON + `#` + u64 little-endian length of the JSON + the 8-byte magic `PDSTAMP1`.
//! Stamping a binary that already carries a stamp replaces the old one (it is stripped first).

use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Magic bytes ending every stamped binary.
pub const MAGIC: &[u8; 8] = b"PDSTAMP1";
const PREFIX: &[u8] = b"\n#PATCHD-DEMO-STAMP:";
const SUFFIX: &[u8] = b"#";
/// Bytes after the JSON: `#`, the length, the magic.
const TAIL_LEN: u64 = 1 + 8 + 8;
/// A stamp's JSON is tiny; anything larger is a corrupt or foreign tail.
const MAX_JSON_LEN: u64 = 64 * 1024;

/// Overrides the stamped mode at start (the stamp is the main mechanism; this is for quick experiments).
pub const MODE_ENV: &str = "DEMO_WORKER_MODE";

/// How a demo binary behaves once started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Serve normally.
    #[default]
    Ok,
    /// Print an error and exit with code 3 right after start.
    Crash,
    /// Serve, but `/health` answers 500.
    FailHealth,
    /// Sleep `delay_ms` before listening.
    SlowStart,
}

impl Mode {
    /// The name used on the command line, in the stamp and in `/version`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Crash => "crash",
            Mode::FailHealth => "fail-health",
            Mode::SlowStart => "slow-start",
        }
    }

    /// Parses the command-line/env spelling.
    pub fn parse(text: &str) -> Option<Mode> {
        match text.trim() {
            "ok" => Some(Mode::Ok),
            "crash" => Some(Mode::Crash),
            "fail-health" => Some(Mode::FailHealth),
            "slow-start" => Some(Mode::SlowStart),
            _ => None,
        }
    }
}

/// What is stamped into a binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Version label reported by `/version` (e.g. `v1.0.1-hotfix`).
    pub version: String,
    /// Behaviour at start.
    #[serde(default)]
    pub mode: Mode,
    /// Delay for `slow-start`, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
}

impl Stamp {
    /// The stamp of an unstamped binary: the crate version, normal behaviour.
    pub fn unstamped() -> Stamp {
        Stamp {
            version: format!("v{}", env!("CARGO_PKG_VERSION")),
            mode: Mode::Ok,
            delay_ms: 0,
        }
    }
}

/// Errors reading or writing stamps.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; check that its directory exists and is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} ends with a corrupt demo stamp ({reason}); re-stamp it from an unstamped binary"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot encode the stamp: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Reads the stamp at the end of `path`, if any; also returns the length of the file without the stamp.
pub fn read_stamp(path: &Path) -> Result<(Option<Stamp>, u64), StampError> {
    let read_err = |source| StampError::Read {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason: &str| StampError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len < 16 {
        return Ok((None, len));
    }
    let mut tail = [0u8; 16];
    file.seek(SeekFrom::Start(len - 16)).map_err(read_err)?;
    file.read_exact(&mut tail).map_err(read_err)?;
    if &tail[8..] != MAGIC {
        return Ok((None, len));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&tail[..8]);
    let json_len = u64::from_le_bytes(len_bytes);
    if json_len > MAX_JSON_LEN {
        return Err(corrupt("length out of range"));
    }
    let stamp_len = PREFIX.len() as u64 + json_len + TAIL_LEN;
    if stamp_len > len {
        return Err(corrupt("length out of range"));
    }
    let start = len - stamp_len;
    let mut stamp_bytes = vec![0u8; (stamp_len - TAIL_LEN + 1) as usize];
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    file.read_exact(&mut stamp_bytes).map_err(read_err)?;
    let Some(rest) = stamp_bytes.strip_prefix(PREFIX) else {
        return Err(corrupt("missing prefix"));
    };
    let Some(json) = rest.strip_suffix(SUFFIX) else {
        return Err(corrupt("missing separator"));
    };
    let stamp: Stamp = serde_json::from_slice(json).map_err(|e| corrupt(&e.to_string()))?;
    Ok((Some(stamp), start))
}

/// Copies `source` (without any stamp it carries) to `out` with `stamp` appended, mode 0755.
///
/// Writes a temporary file next to `out` and renames it, so `out` may be a running executable.
pub fn write_stamped(source: &Path, out: &Path, stamp: &Stamp) -> Result<(), StampError> {
    let (_, body_len) = read_stamp(source)?;
    let json = serde_json::to_vec(stamp)?;
    let write_err = |source| StampError::Write {
        path: out.to_path_buf(),
        source,
    };
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(".{file_name}.stamp-{}", std::process::id()));
    let result = (|| -> Result<(), StampError> {
        // `stamp -o new/dir/worker` is how the quickstart's hints use it: create the directory.
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(write_err)?;
        }
        let mut input = std::fs::File::open(source).map_err(|e| StampError::Read {
            path: source.to_path_buf(),
            source: e,
        })?;
        let mut output = std::fs::File::create(&tmp).map_err(write_err)?;
        std::io::copy(&mut (&mut input).take(body_len), &mut output).map_err(write_err)?;
        output.write_all(PREFIX).map_err(write_err)?;
        output.write_all(&json).map_err(write_err)?;
        output.write_all(SUFFIX).map_err(write_err)?;
        output
            .write_all(&(json.len() as u64).to_le_bytes())
            .map_err(write_err)?;
        output.write_all(MAGIC).map_err(write_err)?;
        output.sync_all().map_err(write_err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(write_err)?;
        std::fs::rename(&tmp, out).map_err(write_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The stamp of the running executable (or the unstamped default), with `DEMO_WORKER_MODE` applied.
pub fn own_stamp() -> Result<Stamp, StampError> {
    let exe = own_exe();
    let (stamp, _) = read_stamp(&exe)?;
    let mut stamp = stamp.unwrap_or_else(Stamp::unstamped);
    if let Some(mode) = std::env::var(MODE_ENV)
        .ok()
        .as_deref()
        .and_then(Mode::parse)
    {
        stamp.mode = mode;
    }
    Ok(stamp)
}

/// Path of the running executable (`/proc/self/exe` still opens the right file after a swap on disk).
pub fn own_exe() -> PathBuf {
    PathBuf::from("/proc/self/exe")
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, StampError> {
    let read_err = |source| StampError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer).map_err(read_err)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(hex::encode(context.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_restamping_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("orig");
        std::fs::write(&original, b"#!binary body\x00\x01").unwrap();
        assert_eq!(read_stamp(&original).unwrap(), (None, 15));

        let first = dir.path().join("first");
        let stamp = Stamp {
            version: "v1.0.0".into(),
            mode: Mode::SlowStart,
            delay_ms: 250,
        };
        write_stamped(&original, &first, &stamp).unwrap();
        let (read, body) = read_stamp(&first).unwrap();
        assert_eq!(read, Some(stamp));
        assert_eq!(body, 15);

        let second = dir.path().join("second");
        let hotfix = Stamp {
            version: "v1.0.1-hotfix".into(),
            mode: Mode::Ok,
            delay_ms: 0,
        };
        write_stamped(&first, &second, &hotfix).unwrap();
        assert_eq!(read_stamp(&second).unwrap().0, Some(hotfix));
        let bytes = std::fs::read(&second).unwrap();
        assert!(bytes.starts_with(b"#!binary body\x00\x01\n#PATCHD-DEMO-STAMP:"));
        assert_eq!(
            bytes.windows(MAGIC.len()).filter(|w| w == MAGIC).count(),
            1,
            "old stamp stripped"
        );
        assert_ne!(sha256_file(&first).unwrap(), sha256_file(&second).unwrap());
    }

    #[test]
    fn corrupt_tail_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad");
        let mut bytes = b"body".to_vec();
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(MAGIC);
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(read_stamp(&path), Err(StampError::Corrupt { .. })));
    }
}
