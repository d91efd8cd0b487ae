//! Live fault injection for the mock APNs: dead and bad tokens, error rates, rejected or
//! wrong-environment keys, forced token expiry and connection faults.

use super::*;

/// Live-adjustable fault injection for a [`MockApns`]. All methods are thread-safe.
pub struct ApnsFaults {
    pub(super) unregistered: RwLock<HashMap<String, Option<u64>>>,
    pub(super) has_unregistered: AtomicBool,
    pub(super) bad_tokens: RwLock<HashSet<String>>,
    pub(super) has_bad_tokens: AtomicBool,
    pub(super) too_many_requests: PerMille,
    pub(super) internal_error: PerMille,
    pub(super) unavailable: PerMille,
    pub(super) conn: ConnFaults,
    pub(super) latency_micros: AtomicU64,
    pub(super) force_expired: Countdown,
    /// JWTs a forced `ExpiredProviderToken` declared expired: expired for every connection, as
    /// a token past its hour is, so a connection that used one takes a new token at once.
    pub(super) expired_jwts: RwLock<HashSet<Arc<str>>>,
    pub(super) reject_all: RwLock<Option<ApnsReason>>,
    pub(super) has_reject_all: AtomicBool,
    pub(super) wrong_env_keys: RwLock<HashSet<String>>,
    pub(super) has_wrong_env_keys: AtomicBool,
    pub(super) clock: MockClock,
    pub(super) on_accepted: crate::server::AcceptObserver,
}

impl ApnsFaults {
    pub(super) fn new(latency: Duration) -> Self {
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
            expired_jwts: RwLock::default(),
            reject_all: RwLock::new(None),
            has_reject_all: AtomicBool::new(false),
            wrong_env_keys: RwLock::default(),
            has_wrong_env_keys: AtomicBool::new(false),
            clock: MockClock::default(),
            on_accepted: crate::server::AcceptObserver::default(),
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

    /// New connections advertise SETTINGS_MAX_CONCURRENT_STREAMS `n` (`None`: back to the
    /// configured value), and every open connection gets GOAWAY so clients move to new ones.
    pub fn set_max_concurrent_streams(&self, n: Option<u32>) {
        self.conn.set_max_streams(n);
    }

    /// `f` is called with the device token of every accepted (200) request from now on; only
    /// the first call sets it (false after).
    pub fn set_on_accepted(&self, f: crate::server::OnAccepted) -> bool {
        self.on_accepted.set(f)
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
        self.expired_jwts.write().clear();
        self.reject_all_auth(None);
        self.wrong_env_keys.write().clear();
        self.has_wrong_env_keys.store(false, Relaxed);
    }
}
