//! patchd package format: the tree digest, the manifest, hostile-package checks, build and unpack.
#![forbid(unsafe_code)]

pub mod digest;
