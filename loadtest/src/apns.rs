//! A mock APNs (HTTP/2 provider API, token authentication) that behaves like the real service
//! closely enough to test a client against it, and fast enough to load-test one.
//!
//! What it checks, in this order (PROTOCOLS.md A.8, which follows Pushy's mock; Apple documents no
//! precedence), answering the first failure:
//!
//! 0. an `apns-*` or `authorization` header repeated: 400 `DuplicateHeaders`
//! 1. `apns-id` present but not a canonical lowercase UUID: 400 `BadMessageId`
//! 2. `:method` not POST: 405 `MethodNotAllowed`
//! 3. `apns-topic` missing or empty: 400 `MissingTopic`
//! 4. `apns-collapse-id` over 64 bytes: 400 `BadCollapseId`
//! 5. `apns-priority` not 1, 5 or 10: 400 `BadPriority`
//! 6. `apns-push-type` unknown: 400 `InvalidPushType` (absent means `alert`, unless
//!    [`MockApnsConfig::require_push_type`])
//! 7. `apns-topic` without the push type's suffix (e.g. `.voip`): 400 `BadTopic`; bundle id not in
//!    [`MockApnsConfig::topics`] (when non-empty): 400 `TopicDisallowed`
//! 8. `:path` `/3/device/`: 400 `MissingDeviceToken`; not under `/3/device/`: 404 `BadPath`; token
//!    not an even-length hex string: 400 `BadDeviceToken`
//! 9. `apns-expiration` not an integer, or (when [`MockApnsConfig::flag_past_expiration`]) > 0 and
//!    in the past, the classic relative-TTL bug: 400 `BadExpirationDate`
//! 10. fault sets: 410 `Unregistered` with `timestamp` in **milliseconds**; 400 `BadDeviceToken`
//! 11. provider JWT: missing → 403 `MissingProviderToken`; not `bearer <jwt>`, undecodable, `alg`
//!     not ES256, unknown `kid`, bad signature, `iss` not the team, `iat` too far in the future →
//!     403 `InvalidProviderToken`; `kid` marked wrong-environment → 403
//!     `BadEnvironmentKeyIdInToken` / `BadEnvironmentKeyInToken` (configurable spelling); `iat`
//!     older than 3600 s → 403 `ExpiredProviderToken`; a different JWT on the same connection
//!     less than 1200 s after the previous one was first used → 429 `TooManyProviderTokenUpdates`
//! 12. body empty: 400 `PayloadEmpty`; over 4096 bytes (5120 for `voip`): 413 `PayloadTooLarge`;
//!     not a JSON object: 400 `BadRequestPayload` (**undocumented** for `/3/device`: Apple lists it
//!     only for the broadcast API; what APNs really answers is unknown)
//! 13. `background` push with priority other than 5, or `aps` other than exactly
//!     `{"content-available":1}`: [`MockApnsConfig::background_error`] (default 400 `BadPriority`;
//!     Apple says only "is an error")
//! 14. injected rate faults: 429 `TooManyRequests`, 500 `InternalServerError`, 503
//!     `ServiceUnavailable`
//! 15. otherwise 200 with `apns-id` echoed (or generated) and an empty body.
//!
//! Every response carries `apns-id`. Errors carry `content-type: application/json` and
//! `{"reason":"..."}` (plus `"timestamp"` for 410).
//!
//! JWT verdicts are cached by token string: a JWT's signature is checked once
//! ([`MockStats::jwt_verifications`] counts real checks); only the `iat` age is re-evaluated per
//! request. Time is the system clock plus [`ApnsFaults::advance_clock`].
//!
//! # Limitations (know these before trusting a test)
//! - **SETTINGS cannot change after the handshake** with the `h2` crate, so the real sequence
//!   "MAX_CONCURRENT_STREAMS=1, then N after the first authorized request (and back to 1 after
//!   errors)" is not reproduced. The mock advertises [`MockApnsConfig::max_concurrent_streams`] at
//!   handshake and emulates the limit of one: while a connection has not yet seen a request with
//!   a valid JWT, a stream opened while another is in flight gets `RST_STREAM(REFUSED_STREAM)`
//!   ([`MockStats::refused_streams`]). A client can therefore not learn the limit of 1 from
//!   SETTINGS, only from refusals. The "drop to 1 after a rejected notification" throttle is not
//!   emulated.
//! - **GOAWAY carries no debug data**: `h2` cannot attach any, so the JSON `{"reason":"Shutdown"}`
//!   APNs puts there is absent (clients must treat it as optional anyway). GOAWAY is h2's graceful
//!   sequence (GOAWAY with the maximum stream id, PING, final GOAWAY) with code NO_ERROR.
//! - Certificate authentication, `UnrelatedKeyIdInToken`, topic-specific keys, per-key token-update
//!   enforcement, `DeviceTokenNotForTopic` and `apns-unique-id` are not emulated.
//! - ALPN offers only `h2`; a client offering ALPN without `h2` fails the TLS handshake, and a
//!   client sending no ALPN at all is served HTTP/2 (lenient, as the real APNs is).
//! - The payload is not checked beyond the `background` rule (no `aps` schema validation).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::{Mutex, RwLock};

use crate::json;
pub use crate::server::MockStats;
use crate::server::{
    self, Admission, ConnCtx, ConnFaults, Countdown, Counters, Handler, MockClock, PerMille,
    Running,
};
use crate::tls::MockTls;

/// Every `reason` string APNs documents for `/3/device`, plus the on-the-wire spelling
/// `BadEnvironmentKeyInToken` and the undocumented `BadRequestPayload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum ApnsReason {
    BadCollapseId,
    BadDeviceToken,
    BadExpirationDate,
    BadMessageId,
    BadPriority,
    BadTopic,
    DeviceTokenNotForTopic,
    DuplicateHeaders,
    IdleTimeout,
    InvalidPushType,
    MissingDeviceToken,
    MissingTopic,
    PayloadEmpty,
    TopicDisallowed,
    BadCertificate,
    BadCertificateEnvironment,
    ExpiredProviderToken,
    Forbidden,
    InvalidProviderToken,
    MissingProviderToken,
    UnrelatedKeyIdInToken,
    BadEnvironmentKeyIdInToken,
    BadEnvironmentKeyInToken,
    BadPath,
    MethodNotAllowed,
    ExpiredToken,
    Unregistered,
    PayloadTooLarge,
    TooManyProviderTokenUpdates,
    TooManyRequests,
    InternalServerError,
    ServiceUnavailable,
    Shutdown,
    BadRequestPayload,
}

const REASON_NAMES: &[&str] = &[
    "BadCollapseId",
    "BadDeviceToken",
    "BadExpirationDate",
    "BadMessageId",
    "BadPriority",
    "BadTopic",
    "DeviceTokenNotForTopic",
    "DuplicateHeaders",
    "IdleTimeout",
    "InvalidPushType",
    "MissingDeviceToken",
    "MissingTopic",
    "PayloadEmpty",
    "TopicDisallowed",
    "BadCertificate",
    "BadCertificateEnvironment",
    "ExpiredProviderToken",
    "Forbidden",
    "InvalidProviderToken",
    "MissingProviderToken",
    "UnrelatedKeyIdInToken",
    "BadEnvironmentKeyIdInToken",
    "BadEnvironmentKeyInToken",
    "BadPath",
    "MethodNotAllowed",
    "ExpiredToken",
    "Unregistered",
    "PayloadTooLarge",
    "TooManyProviderTokenUpdates",
    "TooManyRequests",
    "InternalServerError",
    "ServiceUnavailable",
    "Shutdown",
    "BadRequestPayload",
];

impl ApnsReason {
    /// The wire string, e.g. `"BadDeviceToken"`.
    pub fn as_str(self) -> &'static str {
        REASON_NAMES[self as usize]
    }

    /// The HTTP status APNs pairs with this reason.
    pub fn status(self) -> u16 {
        use ApnsReason::*;
        match self {
            BadCertificate
            | BadCertificateEnvironment
            | ExpiredProviderToken
            | Forbidden
            | InvalidProviderToken
            | MissingProviderToken
            | UnrelatedKeyIdInToken
            | BadEnvironmentKeyIdInToken
            | BadEnvironmentKeyInToken => 403,
            BadPath => 404,
            MethodNotAllowed => 405,
            ExpiredToken | Unregistered => 410,
            PayloadTooLarge => 413,
            TooManyProviderTokenUpdates | TooManyRequests => 429,
            InternalServerError => 500,
            ServiceUnavailable | Shutdown => 503,
            _ => 400,
        }
    }
}

impl std::fmt::Display for ApnsReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which spelling to emit for the wrong-environment key error (PROTOCOLS.md A.6: Apple's docs say
/// `BadEnvironmentKeyIdInToken`, the wire has been seen to say `BadEnvironmentKeyInToken`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BadEnvironmentSpelling {
    /// `BadEnvironmentKeyIdInToken`, as documented.
    #[default]
    Documented,
    /// `BadEnvironmentKeyInToken`, as observed on the wire.
    Wire,
}

/// Configuration of a [`MockApns`].
#[derive(Clone, Debug)]
pub struct MockApnsConfig {
    /// Serve TLS (`https://`) with a generated certificate; false = cleartext HTTP/2 prior knowledge.
    pub tls: bool,
    /// The team id every JWT's `iss` must equal.
    pub team_id: String,
    /// Known signing keys: (key id, SPKI public key PEM).
    pub keys: Vec<(String, String)>,
    /// Allowed bundle ids (the push type's suffix is added on top); empty = any.
    pub topics: Vec<String>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised at handshake (default 1000).
    pub max_concurrent_streams: u32,
    /// Delay before every response (live-adjustable with [`ApnsFaults::set_latency`]).
    pub latency: Duration,
    /// Spelling of the wrong-environment key reason.
    pub bad_environment_spelling: BadEnvironmentSpelling,
    /// Error for a `background` push with priority != 5 or an `aps` other than
    /// `{"content-available":1}`; `None` accepts it silently. Default `Some(BadPriority)`.
    pub background_error: Option<ApnsReason>,
    /// Flag `apns-expiration` values > 0 that are in the past (default true).
    pub flag_past_expiration: bool,
    /// Answer a missing `apns-push-type` with `InvalidPushType` instead of assuming `alert`
    /// (default false; Apple requires it only for watchOS).
    pub require_push_type: bool,
    /// Refuse extra streams on a connection that has not yet sent a valid JWT (default true).
    pub refuse_streams_before_auth: bool,
    /// How far in the future `iat` may be before `InvalidProviderToken` (default 60 s;
    /// Apple's behaviour is unconfirmed).
    pub max_iat_skew: Duration,
    /// Keep every accepted notification for [`MockApns::accepted`] (default true; turn off for
    /// long load runs to keep memory flat).
    pub record_accepted: bool,
}

impl Default for MockApnsConfig {
    fn default() -> Self {
        MockApnsConfig {
            tls: true,
            team_id: String::new(),
            keys: Vec::new(),
            topics: Vec::new(),
            max_concurrent_streams: 1000,
            latency: Duration::ZERO,
            bad_environment_spelling: BadEnvironmentSpelling::Documented,
            background_error: Some(ApnsReason::BadPriority),
            flag_past_expiration: true,
            require_push_type: false,
            refuse_streams_before_auth: true,
            max_iat_skew: Duration::from_secs(60),
            record_accepted: true,
        }
    }
}

impl MockApnsConfig {
    /// A default config trusting one key of `team_id`.
    pub fn new(team_id: &str, key_id: &str, public_pem: &str) -> Self {
        MockApnsConfig {
            team_id: team_id.to_string(),
            keys: vec![(key_id.to_string(), public_pem.to_string())],
            ..Default::default()
        }
    }
}

/// A notification the mock answered with 200.
#[derive(Clone, Debug)]
pub struct AcceptedApns {
    /// Hex device token from `:path`.
    pub device_token: String,
    /// `apns-topic`.
    pub topic: String,
    /// `apns-push-type` (`alert` when absent).
    pub push_type: String,
    /// `apns-priority` (10 when absent).
    pub priority: u8,
    /// `apns-expiration`, if sent.
    pub expiration: Option<u64>,
    /// `apns-collapse-id`, if sent.
    pub collapse_id: Option<String>,
    /// The `apns-id` echoed or generated.
    pub apns_id: String,
    /// The JSON body.
    pub payload: serde_json::Value,
    /// When the mock accepted it.
    pub received_at: Instant,
}

/// Live-adjustable fault injection for a [`MockApns`]. All methods are thread-safe.
pub struct ApnsFaults {
    unregistered: RwLock<HashMap<String, Option<u64>>>,
    has_unregistered: AtomicBool,
    bad_tokens: RwLock<HashSet<String>>,
    has_bad_tokens: AtomicBool,
    too_many_requests: PerMille,
    internal_error: PerMille,
    unavailable: PerMille,
    conn: ConnFaults,
    latency_micros: AtomicU64,
    force_expired: Countdown,
    reject_all: RwLock<Option<ApnsReason>>,
    has_reject_all: AtomicBool,
    wrong_env_keys: RwLock<HashSet<String>>,
    has_wrong_env_keys: AtomicBool,
    clock: MockClock,
}

impl ApnsFaults {
    fn new(latency: Duration) -> Self {
        ApnsFaults {
            unregistered: RwLock::default(),
            has_unregistered: AtomicBool::new(false),
            bad_tokens: RwLock::default(),
            has_bad_tokens: AtomicBool::new(false),
            too_many_requests: PerMille::default(),
            internal_error: PerMille::default(),
            unavailable: PerMille::default(),
            conn: ConnFaults::default(),
            latency_micros: AtomicU64::new(latency.as_micros() as u64),
            force_expired: Countdown::default(),
            reject_all: RwLock::new(None),
            has_reject_all: AtomicBool::new(false),
            wrong_env_keys: RwLock::default(),
            has_wrong_env_keys: AtomicBool::new(false),
            clock: MockClock::default(),
        }
    }

    /// `token` answers 410 `Unregistered`; `timestamp_ms` (milliseconds since the epoch) defaults
    /// to the time of the response.
    pub fn add_unregistered(&self, token: &str, timestamp_ms: Option<u64>) {
        self.unregistered
            .write()
            .insert(token.to_ascii_lowercase(), timestamp_ms);
        self.has_unregistered.store(true, Relaxed);
    }

    /// `token` answers 400 `BadDeviceToken`.
    pub fn add_bad_device_token(&self, token: &str) {
        self.bad_tokens.write().insert(token.to_ascii_lowercase());
        self.has_bad_tokens.store(true, Relaxed);
    }

    /// Removes `token` from both fault sets.
    pub fn remove_token(&self, token: &str) {
        let t = token.to_ascii_lowercase();
        self.unregistered.write().remove(&t);
        self.bad_tokens.write().remove(&t);
    }

    /// Exactly `per_mille` of every 1000 subsequent requests answer 429 `TooManyRequests`,
    /// evenly spaced (1000 = all, 0 = off). Deterministic.
    pub fn set_too_many_requests_per_mille(&self, per_mille: u32) {
        self.too_many_requests.set(per_mille);
    }

    /// Same for 500 `InternalServerError`.
    pub fn set_internal_error_per_mille(&self, per_mille: u32) {
        self.internal_error.set(per_mille);
    }

    /// Same for 503 `ServiceUnavailable`.
    pub fn set_unavailable_per_mille(&self, per_mille: u32) {
        self.unavailable.set(per_mille);
    }

    /// The `n`-th request from now (counted over all connections) is served, then its
    /// connection is closed gracefully with GOAWAY. `n == 0` sends GOAWAY on every open
    /// connection now.
    pub fn goaway_after(&self, n: u64) {
        if n == 0 {
            self.conn.goaway_all_now();
        } else {
            self.conn.goaway.arm(n);
        }
    }

    /// The `n`-th request from now (n >= 1) is answered RST_STREAM(INTERNAL_ERROR) instead of a
    /// response.
    pub fn reset_after(&self, n: u64) {
        self.conn.reset.arm(n);
    }

    /// When the `n`-th request from now (n >= 1) arrives, its connection is dropped (TCP close,
    /// no GOAWAY, in-flight streams lost).
    pub fn drop_connection_after(&self, n: u64) {
        self.conn.drop.arm(n);
    }

    /// Delay before every response.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_micros
            .store(latency.as_micros() as u64, Relaxed);
    }

    /// The next `n` requests that reach the JWT check answer 403 `ExpiredProviderToken` (and
    /// reset their connection's token-update window so a re-signed JWT is accepted).
    pub fn force_expired_provider_token(&self, n: u64) {
        self.force_expired.arm(n);
    }

    /// Every request reaching the JWT check answers this reason (use a 403 reason such as
    /// `InvalidProviderToken`); `None` turns it off.
    pub fn reject_all_auth(&self, reason: Option<ApnsReason>) {
        *self.reject_all.write() = reason;
        self.has_reject_all.store(reason.is_some(), Relaxed);
    }

    /// JWTs signed with key `kid` answer 403 with the wrong-environment reason.
    pub fn add_wrong_environment_key(&self, kid: &str) {
        self.wrong_env_keys.write().insert(kid.to_string());
        self.has_wrong_env_keys.store(true, Relaxed);
    }

    /// Moves the mock's clock forward (ages JWTs; expiration checks), without sleeping.
    pub fn advance_clock(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Turns every fault off (the clock offset stays).
    pub fn clear(&self) {
        self.unregistered.write().clear();
        self.has_unregistered.store(false, Relaxed);
        self.bad_tokens.write().clear();
        self.has_bad_tokens.store(false, Relaxed);
        self.too_many_requests.set(0);
        self.internal_error.set(0);
        self.unavailable.set(0);
        self.conn.goaway.disarm();
        self.conn.reset.disarm();
        self.conn.drop.disarm();
        self.force_expired.disarm();
        self.reject_all_auth(None);
        self.wrong_env_keys.write().clear();
        self.has_wrong_env_keys.store(false, Relaxed);
    }
}

/// A JWT's cached verdict: either why it is invalid, or what is needed per request.
#[derive(Clone)]
enum JwtVerdict {
    Invalid,
    Valid { kid: Arc<str>, iat: i64 },
}

/// The JWT a connection currently uses and when it was first used there.
#[derive(Default)]
struct ConnToken {
    jwt: Option<Arc<str>>,
    first_used: i64,
    /// The current JWT's verdict, so the common case skips the shared cache.
    kid: Option<Arc<str>>,
    iat: i64,
}

/// Per-connection state.
#[derive(Default)]
pub(crate) struct ApnsConn {
    authorized: AtomicBool,
    token: Mutex<ConnToken>,
}

const JWT_CACHE_MAX: usize = 100_000;

struct ApnsInner {
    cfg: MockApnsConfig,
    keys: HashMap<String, DecodingKey>,
    topics: HashSet<String>,
    faults: ApnsFaults,
    counters: Counters,
    jwt_cache: RwLock<HashMap<String, JwtVerdict>>,
    accepted: Mutex<Vec<AcceptedApns>>,
}

/// A running mock APNs. Dropping it stops the listener; [`MockApns::shutdown`] drains first.
pub struct MockApns {
    inner: Arc<ApnsInner>,
    tls: Option<Arc<MockTls>>,
    running: Running,
}

impl MockApns {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(cfg: MockApnsConfig) -> anyhow::Result<MockApns> {
        let mut keys = HashMap::new();
        for (kid, pem) in &cfg.keys {
            let key = DecodingKey::from_ec_pem(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("key {kid}: not an EC public key PEM: {e}"))?;
            keys.insert(kid.clone(), key);
        }
        let tls = if cfg.tls {
            Some(Arc::new(MockTls::generate(&[b"h2"])?))
        } else {
            None
        };
        let (listener, addr) = server::bind().await?;
        let inner = Arc::new(ApnsInner {
            keys,
            topics: cfg.topics.iter().cloned().collect(),
            faults: ApnsFaults::new(cfg.latency),
            counters: Counters::new(REASON_NAMES),
            jwt_cache: RwLock::default(),
            accepted: Mutex::default(),
            cfg,
        });
        let running = server::spawn(listener, addr, inner.clone(), tls.clone(), false);
        Ok(MockApns {
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

    /// The CA certificate (PEM) to trust when serving TLS.
    pub fn ca_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.ca_pem().to_string())
    }

    /// Live fault injection.
    pub fn faults(&self) -> &ApnsFaults {
        &self.inner.faults
    }

    /// Every notification answered 200, in order.
    pub fn accepted(&self) -> Vec<AcceptedApns> {
        self.inner.accepted.lock().clone()
    }

    /// Takes (and clears) the accepted list.
    pub fn take_accepted(&self) -> Vec<AcceptedApns> {
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

/// What a request failed with.
struct Reject {
    reason: ApnsReason,
    timestamp_ms: Option<u64>,
}

impl From<ApnsReason> for Reject {
    fn from(reason: ApnsReason) -> Self {
        Reject {
            reason,
            timestamp_ms: None,
        }
    }
}

const PUSH_TYPES: &[(&str, &str)] = &[
    ("alert", ""),
    ("background", ""),
    ("complication", ".complication"),
    ("controls", ".push-type.controls"),
    ("fileprovider", ".pushkit.fileprovider"),
    ("liveactivity", ".push-type.liveactivity"),
    ("location", ".location-query"),
    ("mdm", ""),
    ("pushtotalk", ".voip-ptt"),
    ("voip", ".voip"),
    ("widgets", ".push-type.widgets"),
];

const APNS_ID: HeaderName = HeaderName::from_static("apns-id");
const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");

const MAX_PAYLOAD: usize = 4096;
const MAX_VOIP_PAYLOAD: usize = 5120;

fn is_canonical_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

fn has_duplicate_headers(headers: &HeaderMap) -> bool {
    // No name carries two values: nothing to look at.
    if headers.len() == headers.keys_len() {
        return false;
    }
    headers.keys().any(|k| {
        let n = k.as_str();
        (n.starts_with("apns-") || n == "authorization")
            && headers.get_all(k).iter().nth(1).is_some()
    })
}

/// The fields of a request that passed the header checks.
struct Validated<'a> {
    token: &'a str,
    topic: &'a str,
    push_type: &'a str,
    priority: u8,
    expiration: Option<u64>,
    collapse_id: Option<&'a str>,
}

impl ApnsInner {
    fn check_headers<'a>(&self, parts: &'a http::request::Parts) -> Result<Validated<'a>, Reject> {
        use ApnsReason::*;
        let h = &parts.headers;
        if has_duplicate_headers(h) {
            return Err(DuplicateHeaders.into());
        }
        if let Some(id) = header_str(h, &APNS_ID)
            && !is_canonical_uuid(id)
        {
            return Err(BadMessageId.into());
        }
        if parts.method != Method::POST {
            return Err(MethodNotAllowed.into());
        }
        let topic = match header_str(h, &APNS_TOPIC) {
            Some(t) if !t.is_empty() => t,
            _ => return Err(MissingTopic.into()),
        };
        let collapse_id = h.get(&APNS_COLLAPSE_ID);
        if collapse_id.is_some_and(|c| c.len() > 64) {
            return Err(BadCollapseId.into());
        }
        let collapse_id = collapse_id.map(|c| c.to_str().unwrap_or("\u{fffd}"));
        let priority = match header_str(h, &APNS_PRIORITY) {
            None => 10,
            Some("10") => 10,
            Some("5") => 5,
            Some("1") => 1,
            Some(_) => return Err(BadPriority.into()),
        };
        let (push_type, suffix) = match header_str(h, &APNS_PUSH_TYPE) {
            None if self.cfg.require_push_type => return Err(InvalidPushType.into()),
            None => ("alert", ""),
            Some(p) => match PUSH_TYPES.iter().find(|(name, _)| *name == p) {
                Some(&(name, suffix)) => (name, suffix),
                None => return Err(InvalidPushType.into()),
            },
        };
        let bundle = match topic.strip_suffix(suffix) {
            Some(b) if !b.is_empty() => b,
            _ => return Err(BadTopic.into()),
        };
        if !self.topics.is_empty() && push_type != "mdm" && !self.topics.contains(bundle) {
            return Err(TopicDisallowed.into());
        }
        let path = parts.uri.path();
        let token = match path.strip_prefix("/3/device/") {
            Some("") => return Err(MissingDeviceToken.into()),
            Some(t) => t,
            None => return Err(BadPath.into()),
        };
        if token.contains('/') {
            return Err(BadPath.into());
        }
        if token.len() % 2 != 0 || !token.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(BadDeviceToken.into());
        }
        let expiration = match header_str(h, &APNS_EXPIRATION) {
            None => None,
            Some(e) => match e.parse::<u64>() {
                Ok(v) => {
                    if self.cfg.flag_past_expiration
                        && v > 0
                        && (v as i64) < self.faults.clock.now_secs()
                    {
                        return Err(BadExpirationDate.into());
                    }
                    Some(v)
                }
                Err(_) => return Err(BadExpirationDate.into()),
            },
        };
        let f = &self.faults;
        if f.has_unregistered.load(Relaxed) {
            let lower = token.to_ascii_lowercase();
            if let Some(ts) = f.unregistered.read().get(&lower) {
                let ts = ts.unwrap_or_else(|| f.clock.now_millis().max(0) as u64);
                return Err(Reject {
                    reason: Unregistered,
                    timestamp_ms: Some(ts),
                });
            }
        }
        if f.has_bad_tokens.load(Relaxed)
            && f.bad_tokens.read().contains(&token.to_ascii_lowercase())
        {
            return Err(BadDeviceToken.into());
        }
        Ok(Validated {
            token,
            topic,
            push_type,
            priority,
            expiration,
            collapse_id,
        })
    }

    /// Verifies a JWT's structure, header, issuer and signature. Cached by the caller.
    fn verify_jwt(&self, jwt: &str) -> JwtVerdict {
        let mut it = jwt.split('.');
        let (Some(h), Some(c), Some(sig), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return JwtVerdict::Invalid;
        };
        let decode = |part: &str| -> Option<serde_json::Value> {
            let raw = URL_SAFE_NO_PAD.decode(part).ok()?;
            serde_json::from_slice(&raw).ok()
        };
        let (Some(header), Some(claims)) = (decode(h), decode(c)) else {
            return JwtVerdict::Invalid;
        };
        if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
            return JwtVerdict::Invalid;
        }
        let Some(kid) = header.get("kid").and_then(|k| k.as_str()) else {
            return JwtVerdict::Invalid;
        };
        let Some(key) = self.keys.get(kid) else {
            return JwtVerdict::Invalid;
        };
        let Some(iat) = claims.get("iat").and_then(|v| v.as_i64()) else {
            return JwtVerdict::Invalid;
        };
        if claims.get("iss").and_then(|v| v.as_str()) != Some(self.cfg.team_id.as_str()) {
            return JwtVerdict::Invalid;
        }
        self.counters.jwt_verifications.fetch_add(1, Relaxed);
        let signed = &jwt[..h.len() + 1 + c.len()];
        match jsonwebtoken::crypto::verify(sig, signed.as_bytes(), key, Algorithm::ES256) {
            Ok(true) => JwtVerdict::Valid {
                kid: Arc::from(kid),
                iat,
            },
            _ => JwtVerdict::Invalid,
        }
    }

    fn verdict(&self, jwt: &str) -> JwtVerdict {
        if let Some(v) = self.jwt_cache.read().get(jwt) {
            return v.clone();
        }
        let v = self.verify_jwt(jwt);
        let mut cache = self.jwt_cache.write();
        if cache.len() >= JWT_CACHE_MAX {
            cache.clear();
        }
        cache.insert(jwt.to_string(), v.clone());
        v
    }

    fn check_auth(&self, headers: &HeaderMap, conn: &ApnsConn) -> Result<(), Reject> {
        use ApnsReason::*;
        let f = &self.faults;
        let auth = match headers.get(AUTHORIZATION) {
            Some(v) if !v.is_empty() => v.to_str().unwrap_or(""),
            _ => return Err(MissingProviderToken.into()),
        };
        if f.has_reject_all.load(Relaxed)
            && let Some(reason) = *f.reject_all.read()
        {
            return Err(reason.into());
        }
        if f.force_expired.take() {
            *conn.token.lock() = ConnToken::default();
            return Err(ExpiredProviderToken.into());
        }
        let jwt = match auth.split_once(' ') {
            Some((scheme, jwt)) if scheme.eq_ignore_ascii_case("bearer") => jwt.trim(),
            _ => return Err(InvalidProviderToken.into()),
        };
        // Fast path: the connection's current JWT was verified already.
        let known = {
            let t = conn.token.lock();
            match (&t.jwt, &t.kid) {
                (Some(cur), Some(kid)) if &**cur == jwt => Some((kid.clone(), t.iat)),
                _ => None,
            }
        };
        let (kid, iat) = match known {
            Some(k) => k,
            None => match self.verdict(jwt) {
                JwtVerdict::Valid { kid, iat } => (kid, iat),
                JwtVerdict::Invalid => return Err(InvalidProviderToken.into()),
            },
        };
        if f.has_wrong_env_keys.load(Relaxed) && f.wrong_env_keys.read().contains(&*kid) {
            return Err(match self.cfg.bad_environment_spelling {
                BadEnvironmentSpelling::Documented => BadEnvironmentKeyIdInToken,
                BadEnvironmentSpelling::Wire => BadEnvironmentKeyInToken,
            }
            .into());
        }
        let now = f.clock.now_secs();
        if iat > now + self.cfg.max_iat_skew.as_secs() as i64 {
            return Err(InvalidProviderToken.into());
        }
        let mut token = conn.token.lock();
        if now - iat > 3600 {
            if token.jwt.as_deref() == Some(jwt) {
                *token = ConnToken::default();
            }
            return Err(ExpiredProviderToken.into());
        }
        match &token.jwt {
            Some(current) if &**current == jwt => {}
            Some(_) if now - token.first_used < 1200 => {
                return Err(TooManyProviderTokenUpdates.into());
            }
            _ => {
                *token = ConnToken {
                    jwt: Some(Arc::from(jwt)),
                    first_used: now,
                    kid: Some(kid),
                    iat,
                };
            }
        }
        drop(token);
        conn.authorized.store(true, Relaxed);
        Ok(())
    }

    /// Checks the payload; returns it parsed when it is to be recorded.
    fn check_body(
        &self,
        v: &Validated<'_>,
        body: &Bytes,
        truncated: bool,
    ) -> Result<Option<serde_json::Value>, Reject> {
        use ApnsReason::*;
        if body.is_empty() && !truncated {
            return Err(PayloadEmpty.into());
        }
        let limit = if v.push_type == "voip" {
            MAX_VOIP_PAYLOAD
        } else {
            MAX_PAYLOAD
        };
        if truncated || body.len() > limit {
            return Err(PayloadTooLarge.into());
        }
        // The common case needs no tree: an object, not a `background` push, not recorded.
        let background = v.push_type == "background" && self.cfg.background_error.is_some();
        if !background && !self.cfg.record_accepted && json::is_object(body) {
            return Ok(None);
        }
        let payload: serde_json::Value = match serde_json::from_slice(body) {
            Ok(p @ serde_json::Value::Object(_)) => p,
            _ => return Err(BadRequestPayload.into()),
        };
        if v.push_type == "background"
            && let Some(err) = self.cfg.background_error
        {
            let aps_ok = payload
                .get("aps")
                .and_then(|a| a.as_object())
                .is_some_and(|aps| {
                    aps.len() == 1
                        && aps.get("content-available").and_then(|c| c.as_i64()) == Some(1)
                });
            if v.priority != 5 || !aps_ok {
                return Err(err.into());
            }
        }
        Ok(Some(payload))
    }

    fn respond(
        &self,
        resp: &mut SendResponse<Bytes>,
        apns_id: &HeaderValue,
        reject: Option<Reject>,
    ) {
        let builder = Response::builder().header(APNS_ID, apns_id.clone());
        match reject {
            None => {
                self.counters.record(200, None);
                if let Ok(r) = builder.status(StatusCode::OK).body(()) {
                    server::send(resp, r, None);
                }
            }
            Some(Reject {
                reason,
                timestamp_ms,
            }) => {
                let status = reason.status();
                self.counters.record(status, Some(reason as usize));
                let body = match timestamp_ms {
                    Some(ts) => format!(r#"{{"reason":"{reason}","timestamp":{ts}}}"#),
                    None => format!(r#"{{"reason":"{reason}"}}"#),
                };
                if let Ok(r) = builder
                    .status(status)
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(())
                {
                    server::send(resp, r, Some(Bytes::from(body)));
                }
            }
        }
    }

    async fn handle(
        &self,
        conn: &ApnsConn,
        req: http::Request<RecvStream>,
        resp: &mut SendResponse<Bytes>,
    ) {
        let (parts, mut body) = req.into_parts();
        let Ok((body, truncated)) = server::read_body(&mut body, MAX_VOIP_PAYLOAD).await else {
            return; // the client reset the stream
        };
        server::delay(self.faults.latency_micros.load(Relaxed)).await;
        // Echo the client's id (sharing its bytes) or make one.
        let apns_id = match parts.headers.get(&APNS_ID) {
            Some(id) if id.to_str().is_ok_and(is_canonical_uuid) => {
                let mut id = id.clone();
                id.set_sensitive(false);
                id
            }
            _ => {
                let mut buf = uuid::Uuid::encode_buffer();
                let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
                HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static(""))
            }
        };
        let v = match self.check_headers(&parts) {
            Ok(v) => v,
            Err(r) => return self.respond(resp, &apns_id, Some(r)),
        };
        if let Err(r) = self.check_auth(&parts.headers, conn) {
            return self.respond(resp, &apns_id, Some(r));
        }
        let payload = match self.check_body(&v, &body, truncated) {
            Ok(p) => p,
            Err(r) => return self.respond(resp, &apns_id, Some(r)),
        };
        let f = &self.faults;
        let injected = if f.too_many_requests.hit() {
            Some(ApnsReason::TooManyRequests)
        } else if f.internal_error.hit() {
            Some(ApnsReason::InternalServerError)
        } else if f.unavailable.hit() {
            Some(ApnsReason::ServiceUnavailable)
        } else {
            None
        };
        if let Some(reason) = injected {
            return self.respond(resp, &apns_id, Some(reason.into()));
        }
        self.counters.accepted.fetch_add(1, Relaxed);
        if self.cfg.record_accepted {
            let record = AcceptedApns {
                device_token: v.token.to_string(),
                topic: v.topic.to_string(),
                push_type: v.push_type.to_string(),
                priority: v.priority,
                expiration: v.expiration,
                collapse_id: v.collapse_id.map(str::to_string),
                apns_id: apns_id.to_str().unwrap_or_default().to_string(),
                payload: payload.unwrap_or_default(),
                received_at: Instant::now(),
            };
            self.accepted.lock().push(record);
        }
        self.respond(resp, &apns_id, None);
    }
}

impl Handler for ApnsInner {
    type ConnState = ApnsConn;

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn conn_faults(&self) -> &ConnFaults {
        &self.faults.conn
    }

    fn h2_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.max_concurrent_streams(self.cfg.max_concurrent_streams)
            .max_header_list_size(8000)
            .max_local_error_reset_streams(None);
        b
    }

    fn admit(&self, conn: &ConnCtx<ApnsConn>) -> Admission {
        if self.cfg.refuse_streams_before_auth
            && !conn.state.authorized.load(Relaxed)
            && conn.in_flight.load(Relaxed) >= 1
        {
            Admission::Refuse
        } else {
            Admission::Serve
        }
    }

    async fn serve(
        self: Arc<Self>,
        conn: Arc<ConnCtx<ApnsConn>>,
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
    fn canonical_uuid() {
        assert!(is_canonical_uuid("eabeae54-14a8-11e5-b60b-1697f925ec7b"));
        assert!(!is_canonical_uuid("EABEAE54-14A8-11E5-B60B-1697F925EC7B"));
        assert!(!is_canonical_uuid("eabeae5414a811e5b60b1697f925ec7b"));
        assert!(!is_canonical_uuid("eabeae54-14a8-11e5-b60b-1697f925ec7"));
        assert!(!is_canonical_uuid("eabeae54_14a8-11e5-b60b-1697f925ec7b"));
    }

    #[test]
    fn reason_table_matches_the_enum() {
        assert_eq!(
            REASON_NAMES.len(),
            ApnsReason::BadRequestPayload as usize + 1
        );
        assert_eq!(ApnsReason::Unregistered.as_str(), "Unregistered");
        assert_eq!(ApnsReason::Unregistered.status(), 410);
        assert_eq!(
            ApnsReason::BadEnvironmentKeyInToken.as_str(),
            "BadEnvironmentKeyInToken"
        );
        assert_eq!(ApnsReason::TooManyProviderTokenUpdates.status(), 429);
        assert_eq!(ApnsReason::Shutdown.status(), 503);
    }
}
