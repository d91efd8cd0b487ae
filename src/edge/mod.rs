//! The gRPC edge: the tonic services and the authentication interceptor. Translates protobuf to
//! domain types at the edge and back; no business logic lives here.
//!
//! - `api`: `pushgate.v1.PushGateway` (SendBatch, StreamSend, SubscribeReceipts).
//! - `admin`: `pushgate.v1.PushGatewayAdmin` (dead letters), when the store keeps them.
//! - `auth`: API keys, checked by an interceptor before any handler runs.
//! - `convert`: requests into domain batches, results into responses.
//! - `insights`: `pushgate.v1.PushGatewayInsights` (TrackEvents, GetCampaignStats).
//! - `tls`: TLS and mutual TLS on the listener, reloadable.

pub mod admin;
pub mod api;
pub mod auth;
pub mod convert;
pub mod insights;
pub mod tls;

pub use admin::AdminApi;
pub use api::Api;
pub use auth::{ApiKeys, Caller, Scope};
pub use convert::into_batch;
pub use insights::InsightsApi;
pub use tls::ServerTls;
