//! The gateway's integration tests, one binary: a real gateway on free ports, real gRPC clients,
//! the mock APNs/FCM of `pushgate-mocks`, and real `redis-server` processes the harness starts.
//!
//! - [`harness`]: the gateway + mocks + client fixture, and the Redis server/cluster fixtures.
//! - one module per area: the APNs and FCM pipelines, limits, and the Redis store (durability,
//!   gRPC over Redis, crash recovery, cluster), security (authorization, TLS, request caps),
//!   the HTTP/JSON API, and `pushgate send`; property tests of the one-terminal-receipt
//!   invariant over scripted provider answers (`properties`).

mod harness;

mod apns_pipeline;
mod chaos;
mod content;
mod deploy;
mod fcm_pipeline;
mod google_credentials;
mod http_api;
mod idempotency;
mod ingress_limits;
mod limits;
mod otlp;
mod policy;
mod properties;
mod redis_cluster;
mod redis_crash;
mod redis_durable;
mod redis_grpc;
mod redis_sentinel;
mod security;
mod send_cli;
