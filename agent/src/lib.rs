//! patchd agent library: config, mTLS gRPC server, blob transfer, host info, and the RPC glue to the apply engine.
#![forbid(unsafe_code)]

pub mod apply_rpc;
