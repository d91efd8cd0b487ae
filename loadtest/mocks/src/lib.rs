//! Test stand-ins for what the gateway talks to: protocol-faithful mock push providers (APNs,
//! FCM), the credentials they accept, and a throw-away `redis-server`. A dev-dependency of the
//! gateway and a dependency of the load tool; the shipped `pushgate` binary never links it.
//!
//! - [`apns::MockApns`]: the APNs HTTP/2 provider API with token (JWT) authentication.
//! - [`fcm::MockFcm`]: FCM HTTP v1 `messages:send` plus the OAuth2 token endpoint.
//! - [`google::MockGoogleAuth`]: Google's credential endpoints as HTTP/1.1-only stand-ins (the
//!   GCE/GKE metadata server, an OAuth token endpoint, STS and IAM Credentials), issuing tokens
//!   the mock FCM accepts.
//! - [`keys`]: credentials for both (an APNs `.p8` key, a Google service-account file).
//! - [`tls`]: the throw-away certificates the mocks serve.
//! - [`redis_server::RedisServer`]: a private `redis-server` on a free port that a test can kill
//!   and restart.
//!
//! Both mocks bind `127.0.0.1:0`, speak HTTP/2 (TLS with ALPN, or cleartext prior knowledge;
//! the FCM mock's token endpoint HTTP/1.1 too), count everything in atomics ([`MockStats`]) and take live fault injection.

pub mod apns;
pub mod fcm;
pub mod google;
pub mod http1;
mod json;
pub mod keys;
pub mod redis_server;
mod server;
pub mod tls;

pub use server::{MockStats, OnAccepted};
