//! Memory stays flat: inspecting and unpacking a package much larger than any buffer does not grow the process.
//! (Its own test binary, so no other test's allocations blur the figure.)
// Test code: helpers may panic like the tests (clippy treats only `#[test]` functions as tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchd_package::{Expectations, Limits, inspect, unpack_verified};
use std::io::Read;

/// Peak resident set size of this process, in KiB (Linux `VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_large_package_is_streamed_not_loaded() {
    const SIZE: u64 = 192 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let package = tmp.path().join("big.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&package).unwrap(),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(SIZE);
        tar.append_data(&mut header, "big/blob", std::io::repeat(7).take(SIZE))
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }
    let before = peak_rss_kib();
    let info = inspect(&package, &Limits::default()).unwrap();
    assert_eq!(info.manifest.files[0].size, SIZE);
    unpack_verified(
        &package,
        &tmp.path().join("dest"),
        &Limits::default(),
        &Expectations::default(),
    )
    .unwrap();
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(
        grown_mib < 32,
        "peak RSS grew by {grown_mib} MiB while streaming a {} MiB package",
        SIZE >> 20
    );
}
