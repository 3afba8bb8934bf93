//! The patchd wire contract: generated gRPC types for `patchd.v1`. Domain crates convert at the boundary.
#![forbid(unsafe_code)]
#![allow(clippy::derive_partial_eq_without_eq, clippy::large_enum_variant)]

/// Generated code for the `patchd.v1` package.
pub mod v1 {
    tonic::include_proto!("patchd.v1");
}

/// Protocol version reported by `Info`; bump on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message either side accepts: a chunk of up to 4 MiB plus framing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
