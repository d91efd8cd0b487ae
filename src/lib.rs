//! pushgate: a push-notification delivery gateway.
//!
//! One message travels one way through the stages, each a module that imports none above it:
//!
//! ```text
//! edge (gRPC) -> ingest -> policy -> limit -> deliver -> receipts
//!                   all state through one seam: store (memory | redis)
//! ```
//!
//! [`app`] wires them together; [`domain`] and [`work`] hold the types every stage shares. See
//! `ARCHITECTURE.md` for the map.

pub mod app;
mod backoff;
pub mod config;
mod config_error;
mod deliver;
pub mod domain;
mod edge;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod ingest;
mod insights;
mod limit;
pub mod metrics;
pub mod otlp;
mod policy;
pub mod provider;
pub mod receipts;
mod redact;
pub mod registry;
pub mod render;
pub mod send;
pub mod store;
pub mod wire;
pub mod work;

/// Generated protobuf and gRPC code for `pushgate.v1` (the `pushgate-proto` crate).
pub use pushgate_proto as proto;
