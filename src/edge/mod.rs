//! The gRPC edge: the tonic services and the authentication interceptor. Translates protobuf to
//! domain types at the edge and back; no business logic lives here.
//!
//! - `api`: `pushgate.v1.PushGateway` (SendBatch, StreamSend, SubscribeReceipts).
//! - `admin`: `pushgate.v1.PushGatewayAdmin` (dead letters), when the store keeps them.
//! - `policy`: `pushgate.v1.PushGatewayPolicy` (dead tokens, opt-outs, erasure).
//! - `auth`: API keys, checked by an interceptor before any handler runs.
//! - `convert`: requests into domain batches, results into responses.
//! - `batch_guard`: counts a request's recipients on the wire and refuses one far over the
//!   batch cap before it is decoded.
//! - `insights`: `pushgate.v1.PushGatewayInsights` (TrackEvents, GetCampaignStats).
//! - `quota`: per-key ingress limits (batches and recipients per second, open streams and
//!   subscriptions).
//! - `tls`: TLS and mutual TLS on the listener, reloadable.
//! - `http`: the HTTP/JSON API over the same `Api`; `openapi`: its OpenAPI document.

pub mod admin;
pub mod api;
pub mod auth;
pub mod batch_guard;
pub mod convert;
pub mod http;
pub mod insights;
pub mod openapi;
pub mod policy;
pub mod quota;
pub mod tls;

pub use admin::AdminApi;
pub use api::Api;
pub use auth::ApiKeys;
pub use batch_guard::BatchGuard;
pub use convert::into_batch;
pub use insights::InsightsApi;
pub use policy::PolicyApi;
pub use quota::Quotas;
pub use tls::ServerTls;
