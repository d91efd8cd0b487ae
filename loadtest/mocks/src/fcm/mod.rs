//! A mock FCM HTTP v1 service with its OAuth2 token endpoint, faithful to the error shapes real
//! clients must parse (docs/providers.md, "FCM") and fast enough to load-test a client.
//!
//! Routes (all on one HTTP/2 listener):
//! - `POST /token`: the service-account JWT-bearer exchange (docs/providers.md, "FCM: OAuth2
//!   service-account tokens"). The assertion must be RS256,
//!   verify against [`MockFcmConfig::public_key_pem`], have `iss` == `client_email`, a `scope`
//!   containing `https://www.googleapis.com/auth/firebase.messaging` or
//!   `https://www.googleapis.com/auth/cloud-platform`, `aud` equal to [`MockFcm::token_uri`] **or**
//!   `https://oauth2.googleapis.com/token`, `exp - iat <= 3600`, `exp` not past and `iat` not in the
//!   future (60 s skew each way). Success: `{"access_token":"ya29.mock-…","expires_in":<token
//!   lifetime secs>,"token_type":"Bearer"}`; failures: HTTP 400 `{"error":"invalid_grant",
//!   "error_description":"Invalid JWT Signature."}` and siblings (`invalid_scope`,
//!   `unsupported_grant_type`, `invalid_request`). Go's empty `"jti":""` and any extra claim are
//!   accepted.
//! - `POST /v1/projects/{project}/messages:send`, checked in this order:
//!   1. `authorization: Bearer <token>` issued by this mock, unexpired, not invalidated by
//!      [`FcmFaults::expire_access_tokens_now`]: else 401 `UNAUTHENTICATED` (no `FcmError`
//!      detail, `www-authenticate` header, Google's two message texts).
//!   2. `{project}` == [`MockFcmConfig::project_id`]: else 403 `PERMISSION_DENIED` with a
//!      `google.rpc.ErrorInfo` `IAM_PERMISSION_DENIED` detail, the general Google shape for a
//!      project the credentials cannot access (our choice; SENDER_ID_MISMATCH is reserved for the
//!      token fault). Numeric project numbers are not recognised.
//!   3. the body is JSON with only `message` and `validate_only`/`validateOnly` at the top and
//!      only known `Message` fields (snake_case or camelCase): else 400 `Invalid JSON payload
//!      received…` with a `BadRequest` detail.
//!   4. exactly one of `token`/`topic`/`condition`/`fid`: none → 400 `Recipient of the message is
//!      not set.` (FcmError + BadRequest{field:"message"}); two → 400 oneof error.
//!   5. `data`, `android.data`, `webpush.data` values are strings: else 400
//!      `Invalid value at 'message.data[i].value' (TYPE_STRING), <value>` with a `BadRequest`
//!      detail (`i` is the index in serde_json's map order, sorted by key unless serde_json's
//!      `preserve_order` feature is on).
//!   6. `android.ttl` a Duration string (`"3600s"`, `"1.5s"`) ≤ 2 419 200 s; `android.priority`
//!      NORMAL/HIGH in any case.
//!   7. body bytes minus the token value's bytes ≤ 4096: else 400 `INVALID_ARGUMENT` with **no
//!      details** (the topic limit of 2048 is [UNCONFIRMED] and not applied).
//!   8. token faults, then rate faults (429 `QUOTA_EXCEEDED` with `Retry-After` and `QuotaFailure`;
//!      500 `INTERNAL`; 503 `UNAVAILABLE` with `Retry-After`; 502 with Google's HTML page), then
//!      the optional per-project token bucket (429).
//!   9. 200 `{"name":"projects/<p>/messages/0:<n>%<hex>"}`; `validate_only` answers
//!      `projects/<p>/messages/fake_message_id` and is not recorded.
//! - `POST /batch`, `POST /fcm/send`: 404 (Google-style HTML page), counted in
//!   [`MockStats::legacy_requests`] so tests can assert the gateway never calls them.
//! - anything else: 404 `NOT_FOUND`.
//!
//! Error `details[]` order alternates between responses (FcmError first, then last), so a client
//! that reads `details[0]` fails a test.
//!
//! # Limitations
//! - `messages:send` over HTTP/2 only. ALPN offers `h2` and `http/1.1` (as Google does); over
//!   HTTP/1.1 (ALPN `http/1.1`, or a cleartext connection that does not open with the HTTP/2
//!   preface) only `/token` is answered, anything else 505.
//! - GOAWAY carries no debug data (`h2` cannot attach any).
//! - The per-device (240/min) and collapsible-message limits, topic fan-out, reserved data keys
//!   and self-signed JWT bearer tokens are not emulated. Tokens in `apns`/`webpush` blocks are not
//!   validated.

mod faults;
mod oauth;
mod reply;
mod send;
#[cfg(test)]
mod tests;
mod validate;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Response};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value, json};

pub use crate::server::MockStats;
use crate::server::{self, ConnFaults, Counters, Handler, MockClock, PerMille, Running};
use crate::tls::MockTls;
pub use faults::FcmFaults;

/// The `aud` Google's own libraries always send, whatever `token_uri` says.
pub const GOOGLE_TOKEN_AUD: &str = "https://oauth2.googleapis.com/token";
/// Scopes that allow `messages:send`.
pub const FCM_SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
];

const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const APNS_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.ApnsError";
const BAD_REQUEST: &str = "type.googleapis.com/google.rpc.BadRequest";
const QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";
const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";

const MAX_TTL_SECS: f64 = 2_419_200.0;
const MAX_MESSAGE_BYTES: usize = 4096;
const MAX_BODY_READ: usize = 256 * 1024;
const TIME_SKEW_SECS: i64 = 60;

// Reason indexes for the stats table.
const REASON_NAMES: &[&str] = &[
    "INVALID_ARGUMENT",
    "UNREGISTERED",
    "SENDER_ID_MISMATCH",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "THIRD_PARTY_AUTH_ERROR",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "HTML_502",
    "invalid_grant",
    "invalid_scope",
    "unsupported_grant_type",
    "invalid_request",
    "temporarily_unavailable",
];
const R_INVALID_ARGUMENT: usize = 0;
const R_UNREGISTERED: usize = 1;
const R_SENDER_ID_MISMATCH: usize = 2;
const R_QUOTA_EXCEEDED: usize = 3;
const R_UNAVAILABLE: usize = 4;
const R_INTERNAL: usize = 5;
const R_THIRD_PARTY_AUTH_ERROR: usize = 6;
const R_UNAUTHENTICATED: usize = 7;
const R_PERMISSION_DENIED: usize = 8;
const R_NOT_FOUND: usize = 9;
const R_HTML_502: usize = 10;
const R_INVALID_GRANT: usize = 11;
const R_INVALID_SCOPE: usize = 12;
const R_UNSUPPORTED_GRANT_TYPE: usize = 13;
const R_INVALID_REQUEST: usize = 14;
const R_TEMPORARILY_UNAVAILABLE: usize = 15;

/// Configuration of a [`MockFcm`].
#[derive(Clone, Debug)]
pub struct MockFcmConfig {
    /// Serve TLS (`https://`) with a generated certificate; false = cleartext HTTP/2 prior knowledge.
    pub tls: bool,
    /// The project `messages:send` accepts.
    pub project_id: String,
    /// The service account's `client_email` (the assertion's `iss`).
    pub client_email: String,
    /// The service account's RSA public key (SPKI or PKCS#1 PEM).
    pub public_key_pem: String,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (default 100, as observed from Google).
    pub max_concurrent_streams: u32,
    /// Delay before every response (live-adjustable with [`FcmFaults::set_latency`]).
    pub latency: Duration,
    /// Lifetime of issued access tokens (default 3600 s); also the `expires_in` sent.
    pub token_lifetime: Duration,
    /// Keep every accepted message for [`MockFcm::accepted`] (default true).
    pub record_accepted: bool,
}

impl Default for MockFcmConfig {
    fn default() -> Self {
        MockFcmConfig {
            tls: true,
            project_id: String::new(),
            client_email: String::new(),
            public_key_pem: String::new(),
            max_concurrent_streams: 100,
            latency: Duration::ZERO,
            token_lifetime: Duration::from_secs(3600),
            record_accepted: true,
        }
    }
}

impl MockFcmConfig {
    /// A default config for one service account.
    pub fn new(project_id: &str, client_email: &str, public_key_pem: &str) -> Self {
        MockFcmConfig {
            project_id: project_id.to_string(),
            client_email: client_email.to_string(),
            public_key_pem: public_key_pem.to_string(),
            ..Default::default()
        }
    }
}

/// A message the mock answered with 200 (not `validate_only`).
#[derive(Clone, Debug)]
pub struct AcceptedFcm {
    /// `message.token`, or empty when the target was a topic, condition or fid.
    pub token: String,
    /// `message.topic`, if that was the target.
    pub topic: Option<String>,
    /// `message.condition`, if that was the target.
    pub condition: Option<String>,
    /// The whole `message` object as received.
    pub message: Value,
    /// The `name` answered (`projects/<p>/messages/<id>`).
    pub name: String,
    /// When the mock accepted it.
    pub received_at: Instant,
}

/// What a faulty registration token answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FcmTokenFault {
    /// 404 `NOT_FOUND` + FcmError `UNREGISTERED`.
    Unregistered,
    /// 400 `INVALID_ARGUMENT` "APNs device token is disabled." + FcmError `INVALID_ARGUMENT` +
    /// ApnsError{410, Unregistered}: a dead iOS token.
    ApnsUnregistered,
    /// 400 `INVALID_ARGUMENT` + FcmError + BadRequest{field:"message.token", "Invalid
    /// registration token"}.
    InvalidToken,
    /// 403 `PERMISSION_DENIED` "SenderId mismatch" + FcmError `SENDER_ID_MISMATCH`.
    SenderIdMismatch,
    /// 401 `UNAUTHENTICATED` "Auth error from APNS or Web Push Service" + FcmError
    /// `THIRD_PARTY_AUTH_ERROR` + ApnsError{403, InvalidProviderToken}.
    ThirdPartyAuthError,
}

/// How `Retry-After` is sent on injected 429 and 503 responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// No header.
    None,
    /// `Retry-After: <seconds>`.
    Seconds(u64),
    /// `Retry-After: <HTTP-date>`, this many seconds after now (mock clock).
    HttpDate(u64),
}

/// A per-project token bucket answering 429 `QUOTA_EXCEEDED` when empty.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProjectQuota {
    /// Bucket size (burst).
    pub capacity: u64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
}

/// Per-connection state: the access token this connection last showed valid, so the common case
/// (one token for many requests) skips the shared map. Issued tokens are never removed or changed,
/// and generation and expiry are re-checked on every request.
#[derive(Default)]
pub(crate) struct FcmConn {
    token: Mutex<Option<CachedToken>>,
}

struct CachedToken {
    token: Box<str>,
    expires_at: i64,
    generation: u64,
}

struct Issued {
    expires_at: i64,
    generation: u64,
}

struct FcmInner {
    cfg: MockFcmConfig,
    key: DecodingKey,
    token_uri: String,
    faults: FcmFaults,
    counters: Counters,
    issued: RwLock<HashMap<String, Issued>>,
    accepted: Mutex<Vec<AcceptedFcm>>,
    error_seq: AtomicU64,
    message_seq: AtomicU64,
    /// `projects/<p>/messages/`.
    name_prefix: String,
    /// `{"name":"projects/<p>/messages/` (JSON-escaped), the start of every 200 body.
    name_json_head: String,
    /// The whole 200 body of a `validate_only` request.
    validate_only_body: Bytes,
}

/// Issues access tokens a [`MockFcm`] accepts (see [`MockFcm::issuer`]).
#[derive(Clone)]
pub struct FcmIssuer(Arc<FcmInner>);

impl std::fmt::Debug for FcmIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FcmIssuer")
    }
}

impl FcmIssuer {
    /// A fresh access token and its lifetime in seconds (counted in `tokens_issued`).
    pub fn issue(&self) -> (String, u64) {
        self.0.issue()
    }

    /// The service-account JWT-bearer exchange of the mock's `/token`, answered as over
    /// HTTP/1.1, also accepting assertions addressed to `audience` (the stand-in's own URL).
    pub fn exchange_assertion(&self, body: &[u8], audience: &str) -> crate::http1::Http1Response {
        self.0
            .token_endpoint_for(&Method::POST, body, Some(audience))
            .into_http1()
    }

    /// True when `token` was issued by the mock and is still accepted.
    pub fn accepts(&self, token: &str) -> bool {
        let generation = self.0.faults.generation.load(Relaxed);
        let now = self.0.faults.clock.now_secs();
        self.0
            .issued
            .read()
            .get(token)
            .is_some_and(|i| i.generation == generation && i.expires_at > now)
    }
}

/// A running mock FCM. Dropping it stops the listener; [`MockFcm::shutdown`] drains first.
pub struct MockFcm {
    inner: Arc<FcmInner>,
    tls: Option<Arc<MockTls>>,
    running: Running,
}

impl MockFcm {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(cfg: MockFcmConfig) -> anyhow::Result<MockFcm> {
        let key = DecodingKey::from_rsa_pem(cfg.public_key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("public_key_pem: not an RSA public key PEM: {e}"))?;
        let tls = if cfg.tls {
            Some(Arc::new(MockTls::generate(&[b"h2", b"http/1.1"])?))
        } else {
            None
        };
        let (listener, addr) = server::bind().await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let name_prefix = format!("projects/{}/messages/", cfg.project_id);
        let name_json = json!({ "name": name_prefix }).to_string();
        // Drop the closing `"}`: the message id goes there.
        let name_json_head = name_json
            .strip_suffix("\"}")
            .unwrap_or(&name_json)
            .to_string();
        let validate_only_body =
            Bytes::from(json!({ "name": format!("{name_prefix}fake_message_id") }).to_string());
        let inner = Arc::new(FcmInner {
            key,
            token_uri: format!("{scheme}://{addr}/token"),
            faults: FcmFaults::new(cfg.latency),
            counters: Counters::new(REASON_NAMES),
            issued: RwLock::default(),
            accepted: Mutex::default(),
            error_seq: AtomicU64::new(0),
            message_seq: AtomicU64::new(0),
            name_prefix,
            name_json_head,
            validate_only_body,
            cfg,
        });
        let running = server::spawn(listener, addr, inner.clone(), tls.clone(), true);
        Ok(MockFcm {
            inner,
            tls,
            running,
        })
    }

    /// `https://127.0.0.1:PORT` or `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.running.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.running.addr
    }

    /// `url() + "/token"`: the `token_uri` to put in the service-account file.
    pub fn token_uri(&self) -> String {
        self.inner.token_uri.clone()
    }

    /// The CA certificate (PEM) to trust when serving TLS.
    pub fn ca_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.ca_pem().to_string())
    }

    /// Live fault injection.
    pub fn faults(&self) -> &FcmFaults {
        &self.inner.faults
    }

    /// Every message answered 200 (excluding `validate_only`), in order.
    pub fn accepted(&self) -> Vec<AcceptedFcm> {
        self.inner.accepted.lock().clone()
    }

    /// Takes (and clears) the accepted list.
    pub fn take_accepted(&self) -> Vec<AcceptedFcm> {
        std::mem::take(&mut *self.inner.accepted.lock())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        self.inner.counters.snapshot()
    }

    /// A handle that issues access tokens this mock accepts, for credential stand-ins
    /// ([`crate::google::MockGoogleAuth`]) that hand tokens out their own way.
    pub fn issuer(&self) -> FcmIssuer {
        FcmIssuer(Arc::clone(&self.inner))
    }

    /// GOAWAY on every connection, drain in-flight streams (up to 2 s), stop.
    pub async fn shutdown(self) {
        self.running.shutdown(Duration::from_secs(2)).await;
    }
}
