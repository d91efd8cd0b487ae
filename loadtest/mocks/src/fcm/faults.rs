//! Live fault injection for the mock FCM: token faults, error rates, latency, a per-project
//! quota bucket and connection faults.

use super::*;

pub(super) struct Bucket {
    pub(super) quota: ProjectQuota,
    pub(super) tokens: f64,
    pub(super) last: tokio::time::Instant,
}

/// Live-adjustable fault injection for a [`MockFcm`]. All methods are thread-safe.
pub struct FcmFaults {
    pub(super) tokens: RwLock<HashMap<String, FcmTokenFault>>,
    pub(super) quota_exceeded: PerMille,
    pub(super) internal: PerMille,
    pub(super) unavailable: PerMille,
    pub(super) bad_gateway: PerMille,
    pub(super) token_endpoint_unavailable: PerMille,
    pub(super) retry_after: RwLock<RetryAfter>,
    pub(super) conn: ConnFaults,
    pub(super) latency_micros: AtomicU64,
    pub(super) generation: AtomicU64,
    pub(super) bucket: Mutex<Option<Bucket>>,
    pub(super) clock: MockClock,
    pub(super) on_accepted: crate::server::AcceptObserver,
}

impl FcmFaults {
    pub(super) fn new(latency: Duration) -> Self {
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
            on_accepted: crate::server::AcceptObserver::default(),
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

    pub(super) fn retry_after_value(&self) -> Option<String> {
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

    pub(super) fn bucket_take(&self) -> bool {
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
