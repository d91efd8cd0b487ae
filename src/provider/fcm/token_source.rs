//! [`TokenSource`]: one credential's FCM access token, cached and refreshed shortly before it
//! expires. Refreshes are single-flight: one request to the token endpoint at a time per
//! credential, and callers that arrive while it runs wait for its result instead of sending
//! their own. A 401 from FCM drops the cached token only if it is still the one that was
//! rejected, so a burst of in-flight rejections causes one refresh, not a stampede.
//!
//! It sits above both the credentials (`credentials.rs`, which obtain a token) and the token
//! types (`oauth.rs`), so neither of those imports the other's user.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::credentials::Credential;
use super::oauth::{AccessToken, FetchError, REFRESH_MARGIN, TokenError};
use super::token_http::CredentialHttp;

/// How a [`TokenSource`] retries and remembers failures.
#[derive(Debug, Clone)]
pub struct RefreshPolicy {
    /// Requests per refresh (first try included).
    pub attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// After the endpoint rejects the credentials, callers fail fast for this long.
    pub rejected_hold: Duration,
    /// After the endpoint stays unavailable through every attempt, callers fail fast this long.
    pub unavailable_hold: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(1),
            rejected_hold: Duration::from_secs(30),
            unavailable_hold: Duration::from_secs(2),
        }
    }
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    /// The last refresh's failure and until when callers fail fast on it.
    failure: Option<(Instant, TokenError)>,
    /// Bumped by every completed refresh, so waiters can tell one finished while they waited.
    generation: u64,
}

impl State {
    fn fresh(&self, now: Instant) -> Option<AccessToken> {
        self.current
            .as_ref()
            .filter(|c| now < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// Due for refresh but not yet expired: still good to send with.
    fn usable(&self, now: Instant) -> Option<AccessToken> {
        self.current
            .as_ref()
            .filter(|c| now < c.expires_at)
            .map(|c| c.token.clone())
    }
}

/// Caches one credential's FCM access token and refreshes it, single-flight.
pub struct TokenSource {
    credential: Credential,
    http: CredentialHttp,
    policy: RefreshPolicy,
    state: Mutex<State>,
    refresh: tokio::sync::Mutex<()>,
    requests: AtomicU64,
    issued: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("credential", &self.credential)
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Tokens of `credential`, fetched with `http`.
    pub fn new(credential: Credential, http: CredentialHttp, policy: RefreshPolicy) -> Self {
        Self {
            credential,
            http,
            policy,
            state: Mutex::new(State::default()),
            refresh: tokio::sync::Mutex::new(()),
            requests: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Where the tokens come from.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The client of the credential endpoints.
    pub fn http(&self) -> &CredentialHttp {
        &self.http
    }

    /// Requests sent to the token endpoint so far (retries included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Access tokens obtained so far (successful refreshes).
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Refreshes that ended without a token, after their retries.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// A valid access token: the cached one, or a fresh one from the token endpoint.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        let seen = {
            let state = self.state.lock();
            if let Some(token) = state.fresh(Instant::now()) {
                return Ok(token);
            }
            state.generation
        };
        let _refreshing = self.refresh.lock().await;
        {
            let state = self.state.lock();
            let now = Instant::now();
            if let Some(token) = state.fresh(now) {
                return Ok(token);
            }
            if let Some((until, error)) = &state.failure
                && (state.generation != seen || now < *until)
            {
                // The refresh we waited for failed, or one failed moments ago: share its result
                // rather than queue another request behind it.
                return state.usable(now).ok_or_else(|| error.clone());
            }
        }
        let started = Instant::now();
        let result = self.fetch_with_retries().await;
        let mut state = self.state.lock();
        state.generation += 1;
        match result {
            Ok((token, lifetime)) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                let margin = REFRESH_MARGIN.min(lifetime / 10);
                state.current = Some(Cached {
                    token: token.clone(),
                    refresh_at: started + lifetime.saturating_sub(margin),
                    expires_at: started + lifetime,
                });
                state.failure = None;
                debug!(credential = self.credential.kind(), principal = %self.credential.principal(), ?lifetime, "FCM access token refreshed");
                Ok(token)
            }
            Err(error) => {
                let hold = match error {
                    TokenError::Unavailable(_) => self.policy.unavailable_hold,
                    TokenError::Rejected(_) | TokenError::Sign(_) => self.policy.rejected_hold,
                };
                self.failures.fetch_add(1, Ordering::Relaxed);
                warn!(credential = self.credential.kind(), principal = %self.credential.principal(), %error, "FCM access token refresh failed");
                state.failure = Some((Instant::now() + hold, error.clone()));
                // A token due for refresh but not expired still works.
                state.usable(Instant::now()).ok_or(error)
            }
        }
    }

    /// FCM rejected `rejected`: forget it, unless a newer token already replaced it.
    pub fn invalidate(&self, rejected: &AccessToken) {
        let mut state = self.state.lock();
        if state.current.as_ref().is_some_and(|c| &c.token == rejected) {
            state.current = None;
            // A rejection says nothing about the token endpoint: allow an immediate refresh.
            state.failure = None;
        }
    }

    async fn fetch_with_retries(&self) -> Result<(AccessToken, Duration), TokenError> {
        let mut last = String::new();
        for attempt in 1..=self.policy.attempts.max(1) {
            if attempt > 1 {
                let delay = crate::backoff::backoff(
                    self.policy.backoff_base,
                    self.policy.backoff_cap,
                    attempt - 1,
                );
                tokio::time::sleep(delay).await;
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            match self.credential.fetch(&self.http).await {
                Ok(token) => return Ok(token),
                Err(FetchError::Permanent(reason)) => return Err(TokenError::Rejected(reason)),
                Err(FetchError::Transient(reason)) => {
                    debug!(attempt, %reason, "token endpoint attempt failed");
                    last = reason;
                }
            }
        }
        Err(TokenError::Unavailable(last))
    }
}
