//! Generated protobuf and gRPC code for `pushgate.v1`, compiled once from `pushgate/v1/` and used
//! by the gateway (server), the load tool and the tests (clients). Every message also has serde
//! impls in the proto3 JSON mapping (pbjson), used by the HTTP/JSON API.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("pushgate.v1");
include!(concat!(env!("OUT_DIR"), "/pushgate.v1.serde.rs"));

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pushgate_descriptor.bin"));
