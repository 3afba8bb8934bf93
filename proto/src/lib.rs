//! The patchd wire contract: generated gRPC types for `patchd.v1`. Domain crates convert at the boundary.
#![forbid(unsafe_code)]
#![allow(clippy::derive_partial_eq_without_eq, clippy::large_enum_variant)]

/// Generated code for the `patchd.v1` package.
pub mod v1 {
    tonic::include_proto!("patchd.v1");
}

/// Protocol version reported by `Info`; bump on incompatible changes. 2: uploads may name their blob by a version-2
/// (BLAKE3) tree digest (`BlobRef.tree_version`), and QueryBlob says which version it read. 3: the agent reads
/// package manifest format 2 (BLAKE3 file digests), and QueryBlob says so (`manifest_format`).
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest gRPC message either side accepts: a chunk of up to 4 MiB plus framing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// The request path of `patchd.v1.Agent/Upload`: both ends serve and send it outside tonic's codec.
pub const UPLOAD_PATH: &str = "/patchd.v1.Agent/Upload";

/// Length of the gRPC message prefix: a compression flag and a big-endian u32 length.
pub const GRPC_HEADER_BYTES: usize = 5;

/// The gRPC prefix of an uncompressed message of `len` bytes (both Upload fast paths frame by hand).
pub fn grpc_header(len: usize) -> [u8; GRPC_HEADER_BYTES] {
    let [a, b, c, d] = (len as u32).to_be_bytes();
    [0, a, b, c, d]
}

/// `message` as one uncompressed gRPC frame: prefix, then the protobuf encoding.
pub fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(GRPC_HEADER_BYTES + len);
    out.extend_from_slice(&grpc_header(len));
    message.encode_raw(&mut out);
    out.into()
}
