//! Protocol-faithful mock push providers (APNs, FCM) and the load generator's building blocks.
//!
//! - [`apns::MockApns`]: the APNs HTTP/2 provider API with token (JWT) authentication.
//! - [`fcm::MockFcm`]: FCM HTTP v1 `messages:send` plus the OAuth2 token endpoint.
//! - [`keys`]: credentials for both (an APNs `.p8` key, a Google service-account file).
//! - [`tls`]: the throw-away certificates the mocks serve.
//!
//! Both mocks bind `127.0.0.1:0`, speak HTTP/2 only (TLS with ALPN, or cleartext prior
//! knowledge), count everything in atomics ([`MockStats`]) and take live fault injection.

pub mod apns;
pub mod fcm;
mod json;
pub mod keys;
mod server;
pub mod tls;

pub use server::MockStats;
