//! A mock FCM HTTP v1 service with its OAuth2 token endpoint, faithful to the error shapes real
//! clients must parse (PROTOCOLS.md part B) and fast enough to load-test a client.
//!
//! Routes (all on one HTTP/2 listener):
//! - `POST /token`: the service-account JWT-bearer exchange (B.3). The assertion must be RS256,
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
//! - HTTP/2 only. ALPN offers `h2` and `http/1.1` (as Google does), but a connection that
//!   negotiates `http/1.1` is closed ([`MockStats::connections_rejected`]).
//! - GOAWAY carries no debug data (`h2` cannot attach any).
//! - The per-device (240/min) and collapsible-message limits, topic fan-out, reserved data keys
//!   and self-signed JWT bearer tokens are not emulated. Tokens in `apns`/`webpush` blocks are not
//!   validated.

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

struct Bucket {
    quota: ProjectQuota,
    tokens: f64,
    last: tokio::time::Instant,
}

/// Live-adjustable fault injection for a [`MockFcm`]. All methods are thread-safe.
pub struct FcmFaults {
    tokens: RwLock<HashMap<String, FcmTokenFault>>,
    quota_exceeded: PerMille,
    internal: PerMille,
    unavailable: PerMille,
    bad_gateway: PerMille,
    token_endpoint_unavailable: PerMille,
    retry_after: RwLock<RetryAfter>,
    conn: ConnFaults,
    latency_micros: AtomicU64,
    generation: AtomicU64,
    bucket: Mutex<Option<Bucket>>,
    clock: MockClock,
}

impl FcmFaults {
    fn new(latency: Duration) -> Self {
        FcmFaults {
            tokens: RwLock::default(),
            quota_exceeded: PerMille::default(),
            internal: PerMille::default(),
            unavailable: PerMille::default(),
            bad_gateway: PerMille::default(),
            token_endpoint_unavailable: PerMille::default(),
            retry_after: RwLock::new(RetryAfter::Seconds(30)),
            conn: ConnFaults::default(),
            latency_micros: AtomicU64::new(latency.as_micros() as u64),
            generation: AtomicU64::new(0),
            bucket: Mutex::new(None),
            clock: MockClock::default(),
        }
    }

    /// Registration `token` answers with `fault`.
    pub fn set_token_fault(&self, token: &str, fault: FcmTokenFault) {
        self.tokens.write().insert(token.to_string(), fault);
    }

    /// Removes any fault from `token`.
    pub fn remove_token_fault(&self, token: &str) {
        self.tokens.write().remove(token);
    }

    /// `token` answers 404 UNREGISTERED.
    pub fn add_unregistered(&self, token: &str) {
        self.set_token_fault(token, FcmTokenFault::Unregistered);
    }

    /// `token` answers 400 INVALID_ARGUMENT + ApnsError{410, Unregistered}.
    pub fn add_apns_unregistered(&self, token: &str) {
        self.set_token_fault(token, FcmTokenFault::ApnsUnregistered);
    }

    /// `token` answers 400 INVALID_ARGUMENT with a `message.token` field violation.
    pub fn add_invalid_token(&self, token: &str) {
        self.set_token_fault(token, FcmTokenFault::InvalidToken);
    }

    /// `token` answers 403 SENDER_ID_MISMATCH.
    pub fn add_sender_id_mismatch(&self, token: &str) {
        self.set_token_fault(token, FcmTokenFault::SenderIdMismatch);
    }

    /// `token` answers 401 THIRD_PARTY_AUTH_ERROR + ApnsError{403, InvalidProviderToken}.
    pub fn add_third_party_auth_error(&self, token: &str) {
        self.set_token_fault(token, FcmTokenFault::ThirdPartyAuthError);
    }

    /// Exactly `per_mille` of every 1000 subsequent valid sends answer 429 QUOTA_EXCEEDED,
    /// evenly spaced (1000 = all, 0 = off). Deterministic.
    pub fn set_quota_exceeded_per_mille(&self, per_mille: u32) {
        self.quota_exceeded.set(per_mille);
    }

    /// Same for 500 INTERNAL.
    pub fn set_internal_per_mille(&self, per_mille: u32) {
        self.internal.set(per_mille);
    }

    /// Same for 503 UNAVAILABLE.
    pub fn set_unavailable_per_mille(&self, per_mille: u32) {
        self.unavailable.set(per_mille);
    }

    /// Same for 502 with Google's HTML error page.
    pub fn set_bad_gateway_per_mille(&self, per_mille: u32) {
        self.bad_gateway.set(per_mille);
    }

    /// Same for the token endpoint: 503 `{"error":"temporarily_unavailable"}`.
    pub fn set_token_endpoint_unavailable_per_mille(&self, per_mille: u32) {
        self.token_endpoint_unavailable.set(per_mille);
    }

    /// How `Retry-After` is sent on 429 and 503 (default `Seconds(30)`).
    pub fn set_retry_after(&self, retry_after: RetryAfter) {
        *self.retry_after.write() = retry_after;
    }

    /// Enables (or with `None` disables) a per-project token bucket. Uses tokio time, so it
    /// refills on a paused clock too.
    pub fn set_project_quota(&self, quota: Option<ProjectQuota>) {
        *self.bucket.lock() = quota.map(|quota| Bucket {
            quota,
            tokens: quota.capacity as f64,
            last: tokio::time::Instant::now(),
        });
    }

    /// Every access token issued so far becomes invalid (401 on use).
    pub fn expire_access_tokens_now(&self) {
        self.generation.fetch_add(1, Relaxed);
    }

    /// The `n`-th request from now (over all connections) is served, then its connection is
    /// closed gracefully with GOAWAY. `n == 0` sends GOAWAY on every open connection now.
    pub fn goaway_after(&self, n: u64) {
        if n == 0 {
            self.conn.goaway_all_now();
        } else {
            self.conn.goaway.arm(n);
        }
    }

    /// The `n`-th request from now (n >= 1) is answered RST_STREAM(INTERNAL_ERROR).
    pub fn reset_after(&self, n: u64) {
        self.conn.reset.arm(n);
    }

    /// When the `n`-th request from now (n >= 1) arrives, its connection is dropped without GOAWAY.
    pub fn drop_connection_after(&self, n: u64) {
        self.conn.drop.arm(n);
    }

    /// Delay before every response.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_micros
            .store(latency.as_micros() as u64, Relaxed);
    }

    /// Moves the mock's clock forward: ages access tokens and assertion timestamps.
    pub fn advance_clock(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Turns every fault off (issued tokens and the clock offset stay).
    pub fn clear(&self) {
        self.tokens.write().clear();
        for p in [
            &self.quota_exceeded,
            &self.internal,
            &self.unavailable,
            &self.bad_gateway,
            &self.token_endpoint_unavailable,
        ] {
            p.set(0);
        }
        self.conn.goaway.disarm();
        self.conn.reset.disarm();
        self.conn.drop.disarm();
        *self.bucket.lock() = None;
    }

    fn retry_after_value(&self) -> Option<String> {
        match *self.retry_after.read() {
            RetryAfter::None => None,
            RetryAfter::Seconds(s) => Some(s.to_string()),
            RetryAfter::HttpDate(s) => {
                let at = std::time::UNIX_EPOCH
                    + Duration::from_secs((self.clock.now_secs().max(0) as u64).saturating_add(s));
                Some(httpdate::fmt_http_date(at))
            }
        }
    }

    fn bucket_take(&self) -> bool {
        let mut guard = self.bucket.lock();
        let Some(b) = guard.as_mut() else {
            return true;
        };
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * b.quota.refill_per_sec).min(b.quota.capacity as f64);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
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

    /// GOAWAY on every connection, drain in-flight streams (up to 2 s), stop.
    pub async fn shutdown(self) {
        self.running.shutdown(Duration::from_secs(2)).await;
    }
}

/// One response to send.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Bytes,
    reason: Option<usize>,
    retry_after: bool,
    www_authenticate: bool,
}

/// A Google API error before serialisation.
struct GError {
    code: u16,
    status: &'static str,
    message: String,
    details: Vec<Value>,
    reason: usize,
    retry_after: bool,
}

impl GError {
    fn new(code: u16, status: &'static str, message: impl Into<String>, reason: usize) -> Self {
        GError {
            code,
            status,
            message: message.into(),
            details: Vec::new(),
            reason,
            retry_after: false,
        }
    }

    fn detail(mut self, d: Value) -> Self {
        self.details.push(d);
        self
    }

    fn fcm(self, code: &str) -> Self {
        self.detail(json!({"@type": FCM_ERROR, "errorCode": code}))
    }

    fn bad_request(self, field: &str, description: &str) -> Self {
        self.detail(json!({"@type": BAD_REQUEST, "fieldViolations": [
            {"field": field, "description": description}
        ]}))
    }

    fn invalid_argument(message: impl Into<String>) -> Self {
        GError::new(400, "INVALID_ARGUMENT", message, R_INVALID_ARGUMENT)
    }

    /// A JSON-level (proto parsing) error: INVALID_ARGUMENT with only a BadRequest detail.
    fn invalid_json(field: &str, message: String) -> Self {
        GError::invalid_argument(message.clone()).bad_request(field, &message)
    }
}

const UNAUTH_MISSING: &str = "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const UNAUTH_INVALID: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";

const HTML_502: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  <title>Error 502 (Server Error)!!1</title>\n  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  <p><b>502.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The server encountered a temporary error and could not complete your request.<p>Please try again in 30 seconds.  <ins>That\u{2019}s all we know.</ins>\n";

const HTML_404: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 404 (Not Found)!!1</title>\n  <p><b>404.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The requested URL was not found on this server.  <ins>That\u{2019}s all we know.</ins>\n";

/// Decodes one `application/x-www-form-urlencoded` component.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn oauth_error(status: u16, error: &str, description: &str, reason: usize) -> Reply {
    Reply {
        status,
        content_type: "application/json; charset=utf-8",
        body: Bytes::from(json!({"error": error, "error_description": description}).to_string()),
        reason: Some(reason),
        retry_after: false,
        www_authenticate: false,
    }
}

fn invalid_grant(description: &str) -> Reply {
    oauth_error(400, "invalid_grant", description, R_INVALID_GRANT)
}

const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";

/// Looks a field up under its snake_case or lowerCamelCase name.
fn field<'a>(obj: &'a Map<String, Value>, snake: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(snake) {
        return Some(v);
    }
    if !snake.contains('_') {
        return None;
    }
    let mut camel = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            camel.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            camel.push(c);
        }
    }
    obj.get(&camel)
}

const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "fcmOptions",
    "token",
    "topic",
    "condition",
    "fid",
];

/// A proto3-JSON rendering of a non-string value for "Invalid value" messages.
fn render_value(v: &Value) -> String {
    v.to_string()
}

/// Checks a `map<string,string>` field.
fn check_string_map(obj: &Map<String, Value>, key: &str, path: &str) -> Result<(), GError> {
    let Some(v) = field(obj, key) else {
        return Ok(());
    };
    match v {
        Value::Null => Ok(()),
        Value::Object(m) => {
            for (i, (_, value)) in m.iter().enumerate() {
                if !value.is_string() {
                    let f = format!("{path}[{i}].value");
                    let msg = format!(
                        "Invalid value at '{f}' (TYPE_STRING), {}",
                        render_value(value)
                    );
                    return Err(GError::invalid_json(&f, msg));
                }
            }
            Ok(())
        }
        other => {
            let msg = format!(
                "Invalid value at '{path}' (type.googleapis.com/google.protobuf.Struct), {}",
                render_value(other)
            );
            Err(GError::invalid_json(path, msg))
        }
    }
}

/// `0:<millis>%<seq as 16 hex digits>` (what `format!("0:{millis}%{seq:016x}")` gives), the id
/// part of an accepted message's name, written into `buf` without the formatting machinery. Only
/// digits, `:`, `-` and `%`: nothing JSON would escape.
fn message_id(millis: i64, seq: u64, buf: &mut [u8; 48]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 20];
    let mut d = digits.len();
    let mut m = millis.unsigned_abs();
    loop {
        d -= 1;
        digits[d] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    buf[..2].copy_from_slice(b"0:");
    let mut i = 2;
    if millis < 0 {
        buf[i] = b'-';
        i += 1;
    }
    let n = digits.len() - d;
    buf[i..i + n].copy_from_slice(&digits[d..]);
    i += n;
    buf[i] = b'%';
    i += 1;
    for (k, out) in buf[i..i + 16].iter_mut().enumerate() {
        *out = HEX[((seq >> (60 - 4 * k)) & 0xf) as usize];
    }
    i += 16;
    std::str::from_utf8(&buf[..i]).unwrap_or("")
}

/// Parses a proto Duration string (`"3600s"`, `"3.5s"`) to seconds.
fn parse_duration(s: &str) -> Option<f64> {
    let num = s.strip_suffix('s')?;
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    if int.is_empty() || !int.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if let Some(f) = frac
        && (f.is_empty() || f.len() > 9 || !f.bytes().all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    num.parse::<f64>().ok()
}

fn check_android(message: &Map<String, Value>) -> Result<(), GError> {
    let Some(android) = field(message, "android") else {
        return Ok(());
    };
    let android = match android {
        Value::Null => return Ok(()),
        Value::Object(a) => a,
        other => {
            let msg = format!(
                "Invalid value at 'message.android' (type.googleapis.com/google.firebase.fcm.v1.AndroidConfig), {}",
                render_value(other)
            );
            return Err(GError::invalid_json("message.android", msg));
        }
    };
    check_string_map(android, "data", "message.android.data")?;
    if let Some(ttl) = field(android, "ttl") {
        let secs = ttl.as_str().and_then(parse_duration);
        match secs {
            Some(s) if s <= MAX_TTL_SECS => {}
            Some(_) => {
                return Err(
                    GError::invalid_argument("Request contains an invalid argument.")
                        .fcm("INVALID_ARGUMENT")
                        .bad_request(
                            "message.android.ttl",
                            "The value of ttl exceeds the maximum of 2419200s (4 weeks).",
                        ),
                );
            }
            None => {
                let msg = format!(
                    "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {}",
                    render_value(ttl)
                );
                return Err(GError::invalid_json("message.android.ttl", msg));
            }
        }
    }
    if let Some(p) = field(android, "priority") {
        let ok = p
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("normal") || s.eq_ignore_ascii_case("high"));
        if !ok {
            let msg = format!(
                "Invalid value at 'message.android.priority' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {}",
                render_value(p)
            );
            return Err(GError::invalid_json("message.android.priority", msg));
        }
    }
    Ok(())
}

/// The validated parts of a send request.
struct SendRequest<'a> {
    /// The `message` object; `Null` unless asked for (only recording needs it).
    message: Value,
    token: Option<Cow<'a, str>>,
    topic: Option<Cow<'a, str>>,
    condition: Option<Cow<'a, str>>,
    validate_only: bool,
}

/// Checks a `messages:send` body (steps 3 to 7 of the module docs). The common case goes
/// through [`validate_send_fast`], which builds nothing; whatever it does not accept is answered
/// by [`validate_send_slow`], whose `Value`-based checks define the error texts.
fn validate_send(body: &[u8], want_message: bool) -> Result<SendRequest<'_>, GError> {
    let Some(fast) = validate_send_fast(body) else {
        return validate_send_slow(body);
    };
    let message = if want_message {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut root)) => root.remove("message").unwrap_or(Value::Null),
            _ => return validate_send_slow(body),
        }
    } else {
        Value::Null
    };
    Ok(SendRequest {
        message,
        token: fast.token.map(Cow::Borrowed),
        topic: fast.topic.map(Cow::Borrowed),
        condition: fast.condition.map(Cow::Borrowed),
        validate_only: fast.validate_only,
    })
}

/// The targets of a body [`validate_send_fast`] accepted.
#[derive(Debug, PartialEq)]
struct FastSend<'a> {
    token: Option<&'a str>,
    topic: Option<&'a str>,
    condition: Option<&'a str>,
    validate_only: bool,
}

/// The allocation-free check of a send body. It accepts only bodies [`validate_send_slow`]
/// accepts, with the same targets and `validate_only`; it gives up (`None`) on every error and on
/// anything unusual (duplicate keys, both `validate_only` spellings, escaped keys or target
/// strings), leaving the answer to the slow path.
fn validate_send_fast(body: &[u8]) -> Option<FastSend<'_>> {
    let root: fast::Root<'_> = crate::json::from_body(body)?;
    let token_len = root.targets[0].map_or(0, str::len);
    if body.len().saturating_sub(token_len) > MAX_MESSAGE_BYTES {
        return None;
    }
    let [token, topic, condition, _fid] = root.targets;
    Some(FastSend {
        token,
        topic,
        condition,
        validate_only: root.validate_only,
    })
}

/// The visitors of [`validate_send_fast`]: each mirrors one step of [`validate_send_slow`] and
/// fails where that step fails or where `Value`'s last-key-wins would matter.
mod fast {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

    use super::{MAX_TTL_SECS, parse_duration};
    use crate::json::{Borrowed, OptBool, OptBorrowed, Skip, StrMap, unusual};

    /// The top level: `message` (an object) and at most one of `validate_only`/`validateOnly`.
    pub(super) struct Root<'a> {
        /// `token`, `topic`, `condition`, `fid`: exactly one is set.
        pub targets: [Option<&'a str>; 4],
        pub validate_only: bool,
    }

    struct RootVisitor;

    impl<'de> Visitor<'de> for RootVisitor {
        type Value = Root<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a send request")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Root<'de>, A::Error> {
            let mut targets = None;
            let mut validate_only = None;
            while let Some(Borrowed(key)) = map.next_key()? {
                match key {
                    "message" if targets.is_none() => {
                        let Message(t) = map.next_value()?;
                        targets = Some(t);
                    }
                    "validate_only" | "validateOnly" if validate_only.is_none() => {
                        let OptBool(b) = map.next_value()?;
                        validate_only = Some(b.unwrap_or(false));
                    }
                    _ => return Err(unusual()),
                }
            }
            Ok(Root {
                targets: targets.ok_or_else(unusual)?,
                validate_only: validate_only.unwrap_or(false),
            })
        }
    }

    impl<'de> Deserialize<'de> for Root<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Root<'de>, D::Error> {
            d.deserialize_any(RootVisitor)
        }
    }

    /// `message`: only known fields, each once; exactly one target, a string without escapes;
    /// `data` a string map; `android` as below; no `webpush`; other fields any JSON.
    struct Message<'a>([Option<&'a str>; 4]);

    const MESSAGE_KEYS: [&str; 12] = [
        "token",
        "topic",
        "condition",
        "fid",
        "data",
        "android",
        "webpush",
        "name",
        "notification",
        "apns",
        "fcm_options",
        "fcmOptions",
    ];

    struct MessageVisitor;

    impl<'de> Visitor<'de> for MessageVisitor {
        type Value = Message<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a message object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'de>, A::Error> {
            let mut seen = 0u16;
            let mut targets = [None; 4];
            while let Some(Borrowed(key)) = map.next_key()? {
                let i = MESSAGE_KEYS
                    .iter()
                    .position(|k| *k == key)
                    .ok_or_else(unusual)?;
                if seen & (1 << i) != 0 {
                    return Err(unusual());
                }
                seen |= 1 << i;
                match i {
                    0..=3 => {
                        let OptBorrowed(t) = map.next_value()?;
                        targets[i] = t;
                    }
                    4 => {
                        map.next_value::<StrMap>()?;
                    }
                    5 => {
                        map.next_value::<Android>()?;
                    }
                    // Rare in what the gateway sends (only from a caller's raw `fcm_json`):
                    // left to the `Value` path.
                    6 => return Err(unusual()),
                    _ => {
                        map.next_value::<Skip>()?;
                    }
                }
            }
            if targets.iter().flatten().count() != 1 {
                return Err(unusual());
            }
            Ok(Message(targets))
        }
    }

    impl<'de> Deserialize<'de> for Message<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Message<'de>, D::Error> {
            d.deserialize_any(MessageVisitor)
        }
    }

    /// `android`: `null`, or an object whose `data` is a string map, `ttl` a valid Duration
    /// within the limit and `priority` NORMAL/HIGH (each at most once); other fields any JSON.
    struct Android;

    struct AndroidVisitor;

    impl<'de> Visitor<'de> for AndroidVisitor {
        type Value = Android;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("null or an AndroidConfig object")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Android, E> {
            Ok(Android)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Android, A::Error> {
            let mut seen = 0u8;
            while let Some(Borrowed(key)) = map.next_key()? {
                let bit = match key {
                    "data" => 1,
                    "ttl" => 2,
                    "priority" => 4,
                    _ => {
                        map.next_value::<Skip>()?;
                        continue;
                    }
                };
                if seen & bit != 0 {
                    return Err(unusual());
                }
                seen |= bit;
                match bit {
                    1 => {
                        map.next_value::<StrMap>()?;
                    }
                    2 => {
                        let Borrowed(ttl) = map.next_value()?;
                        if !parse_duration(ttl).is_some_and(|s| s <= MAX_TTL_SECS) {
                            return Err(unusual());
                        }
                    }
                    _ => {
                        let Borrowed(p) = map.next_value()?;
                        if !(p.eq_ignore_ascii_case("normal") || p.eq_ignore_ascii_case("high")) {
                            return Err(unusual());
                        }
                    }
                }
            }
            Ok(Android)
        }
    }

    impl<'de> Deserialize<'de> for Android {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Android, D::Error> {
            d.deserialize_any(AndroidVisitor)
        }
    }
}

/// The `Value`-based check of a send body: the reference behaviour, and the source of every
/// error text.
fn validate_send_slow(body: &[u8]) -> Result<SendRequest<'static>, GError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| {
        let msg = format!("Invalid JSON payload received. {e}");
        GError::invalid_json("", msg)
    })?;
    let Value::Object(mut root) = root else {
        let msg = "Invalid JSON payload received. Expected an object.".to_string();
        return Err(GError::invalid_json("", msg));
    };
    for k in root.keys() {
        if !matches!(k.as_str(), "message" | "validate_only" | "validateOnly") {
            let msg =
                format!("Invalid JSON payload received. Unknown name \"{k}\": Cannot find field.");
            return Err(GError::invalid_json("", msg));
        }
    }
    let validate_only = match field(&root, "validate_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            let msg = format!(
                "Invalid value at 'validate_only' (TYPE_BOOL), {}",
                render_value(other)
            );
            return Err(GError::invalid_json("validate_only", msg));
        }
    };
    let no_recipient = || {
        GError::invalid_argument("Recipient of the message is not set.")
            .fcm("INVALID_ARGUMENT")
            .bad_request("message", "Recipient of the message is not set.")
    };
    let message = match root.get("message") {
        None | Some(Value::Null) => return Err(no_recipient()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            let msg = format!(
                "Invalid value at 'message' (type.googleapis.com/google.firebase.fcm.v1.Message), {}",
                render_value(other)
            );
            return Err(GError::invalid_json("message", msg));
        }
    };
    for k in message.keys() {
        if !MESSAGE_FIELDS.contains(&k.as_str()) {
            let msg = format!(
                "Invalid JSON payload received. Unknown name \"{k}\" at 'message': Cannot find field."
            );
            return Err(GError::invalid_json("message", msg));
        }
    }
    let mut set: Option<&str> = None;
    let mut targets: [Option<String>; 3] = [None, None, None];
    for (i, name) in ["token", "topic", "condition", "fid"].iter().enumerate() {
        let v = match message.get(*name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => s,
            Some(other) => {
                let msg = format!(
                    "Invalid value at 'message.{name}' (TYPE_STRING), {}",
                    render_value(other)
                );
                return Err(GError::invalid_json(&format!("message.{name}"), msg));
            }
        };
        if set.is_some() {
            let msg = format!(
                "Invalid value at 'message' (oneof), oneof field 'target' is already set. Cannot set '{name}'"
            );
            return Err(GError::invalid_json("message", msg));
        }
        set = Some(name);
        if i < 3 {
            targets[i] = Some(v.clone());
        }
    }
    if set.is_none() {
        return Err(no_recipient());
    }
    check_string_map(message, "data", "message.data")?;
    check_android(message)?;
    if let Some(Value::Object(w)) = field(message, "webpush") {
        check_string_map(w, "data", "message.webpush.data")?;
    }
    let token_len = targets[0].as_ref().map_or(0, String::len);
    if body.len().saturating_sub(token_len) > MAX_MESSAGE_BYTES {
        return Err(GError::invalid_argument(
            "Request contains an invalid argument.",
        ));
    }
    let [token, topic, condition] = targets.map(|t| t.map(Cow::Owned));
    let message = root.remove("message").unwrap_or(Value::Null);
    Ok(SendRequest {
        message,
        token,
        topic,
        condition,
        validate_only,
    })
}

impl FcmInner {
    fn error_reply(&self, mut e: GError) -> Reply {
        if e.details.len() > 1 && self.error_seq.fetch_add(1, Relaxed) % 2 == 1 {
            e.details.reverse();
        }
        let mut err = json!({"code": e.code, "message": e.message, "status": e.status});
        if !e.details.is_empty() {
            err["details"] = Value::Array(e.details);
        }
        Reply {
            status: e.code,
            content_type: "application/json; charset=UTF-8",
            body: Bytes::from(json!({ "error": err }).to_string()),
            reason: Some(e.reason),
            retry_after: e.retry_after,
            www_authenticate: e.code == 401 && e.reason == R_UNAUTHENTICATED,
        }
    }

    fn html(&self, status: u16, body: &'static str, reason: usize) -> Reply {
        Reply {
            status,
            content_type: "text/html; charset=UTF-8",
            body: Bytes::from_static(body.as_bytes()),
            reason: Some(reason),
            retry_after: false,
            www_authenticate: false,
        }
    }

    fn token_endpoint(&self, method: &Method, body: &[u8]) -> Reply {
        self.counters.token_requests.fetch_add(1, Relaxed);
        if method != Method::POST {
            return oauth_error(
                405,
                "invalid_request",
                "Only POST is supported.",
                R_INVALID_REQUEST,
            );
        }
        if self.faults.token_endpoint_unavailable.hit() {
            return oauth_error(
                503,
                "temporarily_unavailable",
                "The service is currently unavailable.",
                R_TEMPORARILY_UNAVAILABLE,
            );
        }
        let body = String::from_utf8_lossy(body);
        let mut grant_type = None;
        let mut assertion = None;
        for pair in body.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match form_decode(k).as_str() {
                "grant_type" => grant_type = Some(form_decode(v)),
                "assertion" => assertion = Some(form_decode(v)),
                _ => {}
            }
        }
        match grant_type.as_deref() {
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {}
            Some(other) => {
                return oauth_error(
                    400,
                    "unsupported_grant_type",
                    &format!("Invalid grant_type: {other}"),
                    R_UNSUPPORTED_GRANT_TYPE,
                );
            }
            None => {
                return oauth_error(
                    400,
                    "invalid_request",
                    "Missing required parameter: grant_type",
                    R_INVALID_REQUEST,
                );
            }
        }
        let Some(assertion) = assertion else {
            return oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: assertion",
                R_INVALID_REQUEST,
            );
        };
        let claims = match self.verify_assertion(&assertion) {
            Ok(c) => c,
            Err(reply) => return reply,
        };
        if claims.get("iss").and_then(Value::as_str) != Some(self.cfg.client_email.as_str()) {
            return invalid_grant("Invalid grant: account not found");
        }
        let aud = claims.get("aud").and_then(Value::as_str).unwrap_or("");
        if aud != self.token_uri && aud != GOOGLE_TOKEN_AUD {
            return invalid_grant(
                "Invalid JWT: Failed audience check. The right audience is https://oauth2.googleapis.com/token",
            );
        }
        let (Some(iat), Some(exp)) = (
            claims.get("iat").and_then(Value::as_i64),
            claims.get("exp").and_then(Value::as_i64),
        ) else {
            return invalid_grant(SHORT_LIVED);
        };
        let now = self.faults.clock.now_secs();
        if exp - iat > 3600
            || exp < iat
            || exp <= now - TIME_SKEW_SECS
            || iat > now + TIME_SKEW_SECS
        {
            return invalid_grant(SHORT_LIVED);
        }
        let scope_ok = claims
            .get("scope")
            .and_then(Value::as_str)
            .is_some_and(|s| s.split(' ').any(|sc| FCM_SCOPES.contains(&sc)));
        if !scope_ok {
            return oauth_error(
                400,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
                R_INVALID_SCOPE,
            );
        }
        let token = format!("ya29.mock-{}", uuid::Uuid::new_v4().simple());
        let lifetime = self.cfg.token_lifetime.as_secs();
        self.issued.write().insert(
            token.clone(),
            Issued {
                expires_at: now + lifetime as i64,
                generation: self.faults.generation.load(Relaxed),
            },
        );
        self.counters.tokens_issued.fetch_add(1, Relaxed);
        Reply {
            status: 200,
            content_type: "application/json; charset=utf-8",
            body: Bytes::from(
                json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})
                    .to_string(),
            ),
            reason: None,
            retry_after: false,
            www_authenticate: false,
        }
    }

    /// Checks the assertion's structure, algorithm and RS256 signature; returns its claims.
    fn verify_assertion(&self, jwt: &str) -> Result<Map<String, Value>, Reply> {
        let bad_sig = || invalid_grant("Invalid JWT Signature.");
        let mut it = jwt.split('.');
        let (Some(h), Some(c), Some(sig), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(invalid_grant(
                "Invalid JWT: not a JWS compact serialization.",
            ));
        };
        let decode = |part: &str| -> Option<Value> {
            let raw = URL_SAFE_NO_PAD.decode(part).ok()?;
            serde_json::from_slice(&raw).ok()
        };
        let (Some(header), Some(Value::Object(claims))) = (decode(h), decode(c)) else {
            return Err(invalid_grant(
                "Invalid JWT: could not decode the header or claims.",
            ));
        };
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err(bad_sig());
        }
        self.counters.jwt_verifications.fetch_add(1, Relaxed);
        let signed = &jwt[..h.len() + 1 + c.len()];
        match jsonwebtoken::crypto::verify(sig, signed.as_bytes(), &self.key, Algorithm::RS256) {
            Ok(true) => Ok(claims),
            _ => Err(bad_sig()),
        }
    }

    fn check_access_token(&self, headers: &http::HeaderMap, conn: &FcmConn) -> Result<(), GError> {
        let unauth = |m| GError::new(401, "UNAUTHENTICATED", m, R_UNAUTHENTICATED);
        let Some(auth) = headers.get(AUTHORIZATION) else {
            return Err(unauth(UNAUTH_MISSING));
        };
        let auth = auth.to_str().unwrap_or("");
        let token = match auth.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => return Err(unauth(UNAUTH_INVALID)),
        };
        let generation = self.faults.generation.load(Relaxed);
        let now = self.faults.clock.now_secs();
        let valid = |expires_at: i64, issued_generation: u64| {
            issued_generation == generation && expires_at > now
        };
        let mut cached = conn.token.lock();
        if let Some(c) = cached.as_ref()
            && &*c.token == token
        {
            return if valid(c.expires_at, c.generation) {
                Ok(())
            } else {
                Err(unauth(UNAUTH_INVALID))
            };
        }
        match self.issued.read().get(token) {
            Some(i) if valid(i.expires_at, i.generation) => {
                *cached = Some(CachedToken {
                    token: token.into(),
                    expires_at: i.expires_at,
                    generation: i.generation,
                });
                Ok(())
            }
            _ => Err(unauth(UNAUTH_INVALID)),
        }
    }

    fn token_fault(&self, token: &str) -> Option<GError> {
        let fault = {
            let faults = self.faults.tokens.read();
            if faults.is_empty() {
                return None;
            }
            *faults.get(token)?
        };
        Some(match fault {
            FcmTokenFault::Unregistered => GError::new(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                R_UNREGISTERED,
            )
            .fcm("UNREGISTERED"),
            FcmTokenFault::ApnsUnregistered => {
                GError::invalid_argument("APNs device token is disabled.")
                    .fcm("INVALID_ARGUMENT")
                    .detail(
                        json!({"@type": APNS_ERROR, "statusCode": 410, "reason": "Unregistered"}),
                    )
            }
            FcmTokenFault::InvalidToken => {
                GError::invalid_argument("Request contains an invalid argument.")
                    .fcm("INVALID_ARGUMENT")
                    .bad_request("message.token", "Invalid registration token")
            }
            FcmTokenFault::SenderIdMismatch => GError::new(
                403,
                "PERMISSION_DENIED",
                "SenderId mismatch",
                R_SENDER_ID_MISMATCH,
            )
            .fcm("SENDER_ID_MISMATCH"),
            FcmTokenFault::ThirdPartyAuthError => GError::new(
                401,
                "UNAUTHENTICATED",
                "Auth error from APNS or Web Push Service",
                R_THIRD_PARTY_AUTH_ERROR,
            )
            .fcm("THIRD_PARTY_AUTH_ERROR")
            .detail(
                json!({"@type": APNS_ERROR, "statusCode": 403, "reason": "InvalidProviderToken"}),
            ),
        })
    }

    fn quota_error(&self) -> GError {
        let mut e = GError::new(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Send messages' and limit 'Send messages per minute' of service 'fcm.googleapis.com'.",
            R_QUOTA_EXCEEDED,
        )
        .fcm("QUOTA_EXCEEDED")
        .detail(json!({"@type": QUOTA_FAILURE, "violations": [{
            "subject": format!("project:{}", self.cfg.project_id),
            "description": "Project send rate exceeded."
        }]}));
        e.retry_after = true;
        e
    }

    fn send_endpoint(
        &self,
        conn: &FcmConn,
        method: &Method,
        project: &str,
        parts: &http::request::Parts,
        body: &[u8],
        truncated: bool,
    ) -> Reply {
        if method != Method::POST {
            return self.error_reply(GError::new(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                R_NOT_FOUND,
            ));
        }
        if let Err(e) = self.check_access_token(&parts.headers, conn) {
            return self.error_reply(e);
        }
        if project != self.cfg.project_id {
            let perm = "cloudmessaging.messages.create";
            let resource = format!("//cloudresourcemanager.googleapis.com/projects/{project}");
            return self.error_reply(
                GError::new(
                    403,
                    "PERMISSION_DENIED",
                    format!(
                        "Permission '{perm}' denied on resource '{resource}' (or it may not exist)."
                    ),
                    R_PERMISSION_DENIED,
                )
                .detail(
                    json!({"@type": ERROR_INFO, "reason": "IAM_PERMISSION_DENIED",
                    "domain": "cloudresourcemanager.googleapis.com",
                    "metadata": {"permission": perm, "resource": format!("projects/{project}")}}),
                ),
            );
        }
        if truncated {
            return self.error_reply(GError::invalid_argument(
                "Request contains an invalid argument.",
            ));
        }
        let req = match validate_send(body, self.cfg.record_accepted) {
            Ok(r) => r,
            Err(e) => return self.error_reply(e),
        };
        if let Some(e) = req.token.as_deref().and_then(|t| self.token_fault(t)) {
            return self.error_reply(e);
        }
        let f = &self.faults;
        if f.quota_exceeded.hit() {
            return self.error_reply(self.quota_error());
        }
        if f.internal.hit() {
            return self.error_reply(
                GError::new(500, "INTERNAL", "Internal error encountered.", R_INTERNAL)
                    .fcm("INTERNAL"),
            );
        }
        if f.unavailable.hit() {
            let mut e = GError::new(
                503,
                "UNAVAILABLE",
                "The service is currently unavailable.",
                R_UNAVAILABLE,
            )
            .fcm("UNAVAILABLE");
            e.retry_after = true;
            return self.error_reply(e);
        }
        if f.bad_gateway.hit() {
            return self.html(502, HTML_502, R_HTML_502);
        }
        if !f.bucket_take() {
            return self.error_reply(self.quota_error());
        }
        let body = if req.validate_only {
            self.counters.validate_only.fetch_add(1, Relaxed);
            self.validate_only_body.clone()
        } else {
            let n = self.message_seq.fetch_add(1, Relaxed);
            let mut buf = [0u8; 48];
            let id = message_id(self.faults.clock.now_millis(), n, &mut buf);
            self.counters.accepted.fetch_add(1, Relaxed);
            if self.cfg.record_accepted {
                let record = AcceptedFcm {
                    token: req.token.map(Cow::into_owned).unwrap_or_default(),
                    topic: req.topic.map(Cow::into_owned),
                    condition: req.condition.map(Cow::into_owned),
                    message: req.message,
                    name: format!("{}{id}", self.name_prefix),
                    received_at: Instant::now(),
                };
                self.accepted.lock().push(record);
            }
            // `{"name":"projects/<p>/messages/<id>"}`, as `json!` renders it: the id needs no
            // escaping. Sized exactly, so `Bytes` takes the buffer without another allocation.
            let head = self.name_json_head.as_bytes();
            let mut out = Vec::with_capacity(head.len() + id.len() + 2);
            out.extend_from_slice(head);
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\"}");
            Bytes::from(out)
        };
        Reply {
            status: 200,
            content_type: "application/json; charset=UTF-8",
            body,
            reason: None,
            retry_after: false,
            www_authenticate: false,
        }
    }

    async fn handle(
        &self,
        conn: &FcmConn,
        req: http::Request<RecvStream>,
        resp: &mut SendResponse<Bytes>,
    ) {
        let (parts, mut body) = req.into_parts();
        let Ok((body, truncated)) = server::read_body(&mut body, MAX_BODY_READ).await else {
            return;
        };
        server::delay(self.faults.latency_micros.load(Relaxed)).await;
        let path = parts.uri.path();
        let reply = if path == "/token" {
            self.token_endpoint(&parts.method, &body)
        } else if path == "/batch" || path == "/fcm/send" {
            self.counters.legacy_requests.fetch_add(1, Relaxed);
            self.html(404, HTML_404, R_NOT_FOUND)
        } else if let Some(project) = path
            .strip_prefix("/v1/projects/")
            .and_then(|p| p.strip_suffix("/messages:send"))
            .filter(|p| !p.is_empty() && !p.contains('/'))
        {
            self.send_endpoint(conn, &parts.method, project, &parts, &body, truncated)
        } else {
            self.error_reply(GError::new(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                R_NOT_FOUND,
            ))
        };
        self.counters.record(reply.status, reply.reason);
        let mut builder = Response::builder()
            .status(reply.status)
            .header(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
        if reply.retry_after
            && let Some(v) = self.faults.retry_after_value()
        {
            builder = builder.header("retry-after", v);
        }
        if reply.www_authenticate {
            builder = builder.header(
                "www-authenticate",
                "Bearer realm=\"https://accounts.google.com/\"",
            );
        }
        if let Ok(r) = builder.body(()) {
            server::send(resp, r, Some(reply.body));
        }
    }
}

impl Handler for FcmInner {
    type ConnState = FcmConn;

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn conn_faults(&self) -> &ConnFaults {
        &self.faults.conn
    }

    fn h2_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.max_concurrent_streams(self.cfg.max_concurrent_streams)
            .max_local_error_reset_streams(None);
        b
    }

    async fn serve(
        self: Arc<Self>,
        conn: Arc<server::ConnCtx<FcmConn>>,
        req: http::Request<RecvStream>,
        mut resp: SendResponse<Bytes>,
    ) {
        self.handle(&conn.state, req, &mut resp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600s"), Some(3600.0));
        assert_eq!(parse_duration("3.000000001s"), Some(3.000000001));
        assert_eq!(parse_duration("0s"), Some(0.0));
        for bad in ["3600", "1h", "s", ".5s", "1.s", "-1s", "1.0000000001s", ""] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_decode("urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"),
            "urn:ietf:params:oauth:grant-type:jwt-bearer"
        );
        assert_eq!(form_decode("a+b%2"), "a b%2");
        assert_eq!(form_decode("%zz%"), "%zz%");
    }

    #[test]
    fn camel_case_alias() {
        let m: Map<String, Value> =
            serde_json::from_str(r#"{"validateOnly":true,"fcmOptions":{}}"#).unwrap();
        assert_eq!(field(&m, "validate_only"), Some(&Value::Bool(true)));
        assert!(field(&m, "fcm_options").is_some());
        assert!(field(&m, "direct_boot_ok").is_none());
    }

    /// Whatever the fast path accepts, the `Value` path accepts with the same targets; the
    /// shapes clients send do take the fast path.
    #[test]
    fn fast_path_accepts_only_what_the_value_path_accepts() {
        let common = [
            r#"{"message":{"token":"t1","notification":{"title":"Hi","body":"x"},"data":{"screen":"cart"},"android":{"priority":"HIGH","notification":{"sound":"default"}},"fcm_options":{"analytics_label":"l"}}}"#,
            r#"{"message":{"topic":"news","data":null,"android":{"ttl":"3600s","priority":"normal","data":{"a":"b"}}}}"#,
            r#"{"validateOnly":true,"message":{"condition":"'a' in topics","apns":{"payload":{"aps":{}}}}}"#,
            r#"{"validate_only":null,"message":{"fid":"f","fcmOptions":{},"name":"n"}}"#,
            " {\"message\" : {\"token\":\"t\"}}\n",
        ];
        for b in common {
            assert!(validate_send_fast(b.as_bytes()).is_some(), "{b}");
        }
        let unusual = [
            r#"{"message":{"token":"t","token":null}}"#,
            r#"{"message":{"token":"t"},"message":{"token":"u"}}"#,
            r#"{"message":{"token":"t\u0031"}}"#,
            r#"{"message":{"tok\u0065n":"t"}}"#,
            r#"{"validate_only":true,"validateOnly":false,"message":{"token":"t"}}"#,
            r#"{"validate_only":1,"message":{"token":"t"}}"#,
            r#"{"message":{"token":"t","topic":"u"}}"#,
            r#"{"message":{"token":"t","fid":null,"topic":null}}"#,
            r#"{"message":{}}"#,
            r#"{"message":null}"#,
            r#"{"message":[]}"#,
            r#"{"message":["t"]}"#,
            r#"{}"#,
            r#"[]"#,
            r#"{"message":{"token":7}}"#,
            r#"{"message":{"token":"t","extra":1}}"#,
            r#"{"message":{"token":"t"},"extra":1}"#,
            r#"{"message":{"token":"t","data":{"a":1}}}"#,
            r#"{"message":{"token":"t","data":{"a":1,"a":"x"}}}"#,
            r#"{"message":{"token":"t","data":[]}}"#,
            r#"{"message":{"token":"t","data":{"a":"\u00e9"}}}"#,
            r#"{"message":{"token":"t","android":{"ttl":"1h"}}}"#,
            r#"{"message":{"token":"t","android":{"ttl":null}}}"#,
            r#"{"message":{"token":"t","android":{"ttl":"9999999s"}}}"#,
            r#"{"message":{"token":"t","android":{"ttl":"1s","ttl":"2s"}}}"#,
            r#"{"message":{"token":"t","android":{"priority":"urgent"}}}"#,
            r#"{"message":{"token":"t","android":{"priority":"High","x":[1,{"y":2}]}}}"#,
            r#"{"message":{"token":"t","android":{"data":{"k":2}}}}"#,
            r#"{"message":{"token":"t","android":7}}"#,
            r#"{"message":{"token":"t","android":null}}"#,
            r#"{"message":{"token":"t","webpush":{"data":{"k":"v"}}}}"#,
            r#"{"message":{"token":"t","webpush":7}}"#,
            r#"{"message":{"token":"t","webpush":{"data":{"k":false}}}}"#,
            r#"{"message":{"token":"t","webpush":[1,2,{"data":1}]}}"#,
            r#"{"message":{"token":"t","webpush":{"da\u0074a":{"k":1}}}}"#,
            r#"{"message":{"token":"t","notification":{"title":1e400}}}"#,
            r#"{"message":{"token":"t","notification":{"title":"\ud800"}}}"#,
            r#"{"message":{"token":"t"}} trailing"#,
            r#"{"message":{"token":"t"},}"#,
            "",
        ];
        let big = json!({"message": {"token": "t".repeat(5000), "data": {"k": "v"}}}).to_string();
        let too_big = json!({"message": {"topic": "t".repeat(5000)}}).to_string();
        for b in unusual
            .iter()
            .copied()
            .chain(common)
            .chain([big.as_str(), too_big.as_str()])
        {
            let Some(fast) = validate_send_fast(b.as_bytes()) else {
                continue;
            };
            match validate_send_slow(b.as_bytes()) {
                Ok(slow) => {
                    assert_eq!(fast.token, slow.token.as_deref(), "{b}");
                    assert_eq!(fast.topic, slow.topic.as_deref(), "{b}");
                    assert_eq!(fast.condition, slow.condition.as_deref(), "{b}");
                    assert_eq!(fast.validate_only, slow.validate_only, "{b}");
                }
                Err(e) => panic!(
                    "fast path accepted what the Value path refuses: {b}: {}",
                    e.message
                ),
            }
        }
        assert!(validate_send_fast(big.as_bytes()).is_some());
        assert!(validate_send_fast(too_big.as_bytes()).is_none());
        // Invalid UTF-8, in a target and in a skipped field: both paths refuse it.
        for b in [
            &b"{\"message\":{\"token\":\"\xff\"}}"[..],
            &b"{\"message\":{\"token\":\"t\",\"name\":\"\xc3\"}}"[..],
        ] {
            assert!(validate_send_fast(b).is_none());
            assert!(validate_send_slow(b).is_err());
        }
    }

    #[test]
    fn accepted_name_body_is_what_json_renders() {
        let mut buf = [0u8; 48];
        assert_eq!(
            message_id(1_700_000_000_123, 255, &mut buf),
            "0:1700000000123%00000000000000ff"
        );
        for (millis, seq) in [(0, 0), (-5, 1), (i64::MIN, u64::MAX), (i64::MAX, 1 << 63)] {
            let expected = format!("0:{millis}%{seq:016x}");
            assert_eq!(message_id(millis, seq, &mut buf), expected);
        }
    }

    #[test]
    fn size_limit_excludes_the_token() {
        let token = "t".repeat(5000);
        let body = json!({"message": {"token": token}}).to_string();
        assert!(validate_send(body.as_bytes(), true).is_ok());
        let body = json!({"message": {"topic": "x".repeat(5000)}}).to_string();
        let err = validate_send(body.as_bytes(), true).err().unwrap();
        assert!(err.details.is_empty());
    }
}
