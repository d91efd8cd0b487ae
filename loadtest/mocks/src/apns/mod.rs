//! A mock APNs (HTTP/2 provider API, token authentication) that behaves like the real service
//! closely enough to test a client against it, and fast enough to load-test one.
//!
//! What it checks, in this order (docs/providers.md, "APNs: what a faithful mock checks", which
//! follows Pushy's mock; Apple documents no precedence), answering the first failure:
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

mod auth;
mod faults;
mod handler;
#[cfg(test)]
mod tests;
mod validate;

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

pub use faults::ApnsFaults;

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

/// Which spelling to emit for the wrong-environment key error (docs/providers.md, "APNs:
/// wrong-environment key errors": Apple's docs say `BadEnvironmentKeyIdInToken`, the wire has been seen to say `BadEnvironmentKeyInToken`).
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
