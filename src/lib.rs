//! pushgate: a push-notification delivery gateway.
//!
//! One message travels one way: gRPC ingest (`api`, `gateway`) -> render (`render`) -> deliver
//! (`pipeline`, `provider`) -> receipt (`receipts`), with transient failures parked in a retry
//! queue (`queue`).

pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod durable;
pub mod gateway;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod provider;
pub mod queue;
pub mod receipts;
pub mod registry;
pub mod render;
pub mod server;
pub mod waiting;

/// Generated protobuf and gRPC code for `pushgate.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pushgate.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pushgate_descriptor.bin"));
}
