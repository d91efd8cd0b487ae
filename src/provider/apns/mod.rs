//! APNs provider: token-authenticated HTTP/2 requests to `/3/device/<token>`.
//!
//! One `ApnsProvider` exists per (team, key, endpoint) and is shared by every app that uses that
//! key: one connection pool, one signed token. The topic travels with each rendered request.

pub mod jwt;
pub mod response;

use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::warn;

use self::jwt::ApnsTokenSigner;
use self::response::{Verdict, classify};
use super::h2pool::{H2Pool, TransportError};
use super::{Attempt, BearerHeader, BoxFuture, Capacity, Provider, wrong_platform};
use crate::domain::{ApnsRequest, Outcome, Platform, ProviderRequest};

/// Apple's production endpoint.
pub const PRODUCTION_URL: &str = "https://api.push.apple.com";
/// Apple's sandbox endpoint.
pub const SANDBOX_URL: &str = "https://api.sandbox.push.apple.com";

/// The APNs client for one signing key.
pub struct ApnsProvider {
    pool: H2Pool,
    signer: ApnsTokenSigner,
    /// After APNs rejects the credentials, messages fail fast until this instant instead of
    /// hammering APNs with a key it refuses.
    credentials_block: Mutex<Option<(Instant, String)>>,
    credentials_retry: Duration,
    /// False until APNs accepts a request signed with the current credentials (and again after
    /// it rejects them): while false, requests go one at a time, so a wrong key costs one
    /// request, not a burst.
    credentials_proven: std::sync::atomic::AtomicBool,
    probe: tokio::sync::Mutex<()>,
    bearer: BearerHeader,
}

const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const APNS_ID: HeaderName = HeaderName::from_static("apns-id");
const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");

/// One APNs request, checked, in parts that are cheap to clone.
struct ApnsRequestParts {
    uri: Uri,
    authorization: HeaderValue,
    topic: HeaderValue,
    push_type: HeaderValue,
    priority: HeaderValue,
    apns_id: HeaderValue,
    expiration: Option<HeaderValue>,
    collapse_id: Option<HeaderValue>,
}

impl ApnsRequestParts {
    fn request(&self) -> Request<()> {
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(APNS_TOPIC, self.topic.clone());
        headers.insert(APNS_PUSH_TYPE, self.push_type.clone());
        headers.insert(APNS_PRIORITY, self.priority.clone());
        // Unique per message: never worth a place in the HPACK table (on either side).
        let mut apns_id = self.apns_id.clone();
        apns_id.set_sensitive(true);
        headers.insert(APNS_ID, apns_id);
        if let Some(expiration) = &self.expiration {
            headers.insert(APNS_EXPIRATION, expiration.clone());
        }
        if let Some(collapse_id) = &self.collapse_id {
            headers.insert(APNS_COLLAPSE_ID, collapse_id.clone());
        }
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = headers;
        request
    }
}

impl ApnsProvider {
    /// `credentials_retry` is how long to fail fast after a credentials rejection before probing
    /// APNs again.
    pub fn new(pool: H2Pool, signer: ApnsTokenSigner, credentials_retry: Duration) -> Self {
        Self {
            pool,
            signer,
            credentials_block: Mutex::new(None),
            credentials_retry,
            credentials_proven: std::sync::atomic::AtomicBool::new(false),
            probe: tokio::sync::Mutex::new(()),
            bearer: BearerHeader::default(),
        }
    }

    /// The connection pool (for metrics and tests).
    pub fn pool(&self) -> &H2Pool {
        &self.pool
    }

    /// The token signer (for metrics and tests).
    pub fn signer(&self) -> &ApnsTokenSigner {
        &self.signer
    }

    fn blocked(&self) -> Option<String> {
        let mut block = self.credentials_block.lock();
        match block.as_ref() {
            Some((until, reason)) if Instant::now() < *until => Some(reason.clone()),
            Some(_) => {
                *block = None;
                None
            }
            None => None,
        }
    }

    /// Checks and prepares what goes into the request; `ApnsRequestParts::request` then
    /// assembles it without failing, once per try.
    fn prepare(&self, message: &ApnsRequest, token: &Arc<str>) -> Result<ApnsRequestParts, String> {
        let endpoint = self.pool.endpoint();
        let path = format!("/3/device/{}", message.device_token);
        let uri = Uri::builder()
            .scheme(endpoint.scheme.clone())
            .authority(endpoint.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| "device_token is not valid in a URL path".to_string())?;
        let mut apns_id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let apns_id = message.apns_id.hyphenated().encode_lower(&mut apns_id);
        Ok(ApnsRequestParts {
            uri,
            authorization: self.bearer.get("bearer", token, "provider token")?,
            topic: HeaderValue::from_maybe_shared(message.topic.clone())
                .map_err(|_| "apns-topic contains characters not allowed in a header")?,
            push_type: HeaderValue::from_static(message.push_type.header_value()),
            priority: priority_value(message.priority),
            apns_id: value(apns_id, "apns-id")?,
            expiration: message.expiration.map(HeaderValue::from),
            collapse_id: match &message.collapse_id {
                Some(collapse) => Some(value(collapse, "apns-collapse-id")?),
                None => None,
            },
        })
    }

    async fn deliver_apns(&self, message: &ApnsRequest) -> Attempt {
        use std::sync::atomic::Ordering;
        let mut probe = None;
        if !self.credentials_proven.load(Ordering::Acquire) {
            let guard = self.probe.lock().await;
            // Another request may have proven the credentials while this one waited.
            if !self.credentials_proven.load(Ordering::Acquire) {
                probe = Some(guard);
            }
        }
        if let Some(reason) = self.blocked() {
            return Attempt {
                outcome: Outcome::Failed {
                    reason,
                    status: 403,
                },
                round_trip: None,
            };
        }
        let mut round_trip = None;
        let outcome = self.send_apns(message, &mut round_trip).await;
        match &outcome {
            Outcome::Failed { status: 403, .. } => {
                self.credentials_proven.store(false, Ordering::Release);
            }
            Outcome::Delivered { .. } | Outcome::InvalidToken { .. } | Outcome::Rejected { .. } => {
                self.credentials_proven.store(true, Ordering::Release);
            }
            _ => {}
        }
        drop(probe);
        Attempt {
            outcome,
            round_trip,
        }
    }

    /// One delivery, re-signing once when APNs says the token expired; `round_trip` is set to
    /// the wire time of the last request that got an answer.
    async fn send_apns(&self, message: &ApnsRequest, round_trip: &mut Option<Duration>) -> Outcome {
        let mut refreshed = false;
        loop {
            let token = match self.signer.token() {
                Ok(t) => t,
                Err(e) => {
                    return Outcome::Failed {
                        reason: e.to_string(),
                        status: 0,
                    };
                }
            };
            let parts = match self.prepare(message, &token) {
                Ok(parts) => parts,
                Err(reason) => return Outcome::Rejected { reason, status: 0 },
            };
            let response = match self
                .pool
                .send_with(|| parts.request(), message.payload.clone())
                .await
            {
                Ok(r) => r,
                Err(e) => return transport_outcome(e),
            };
            *round_trip = Some(response.round_trip);
            let apns_id = response
                .headers
                .get(APNS_ID)
                .and_then(|v| v.to_str().ok())
                .or(parts.apns_id.to_str().ok());
            match classify(response.status.as_u16(), &response.body, apns_id) {
                Verdict::Final(outcome) => return outcome,
                Verdict::RefreshToken if !refreshed => {
                    refreshed = true;
                    self.signer.expire(&token);
                }
                Verdict::RefreshToken => {
                    // Twice in a row, the second time with a token signed after the first
                    // refusal: the message is not at fault, so it is retried later with backoff
                    // (and a token signed then) instead of failed; a host clock that stays
                    // wrong still ends it after its attempts, with this reason.
                    return Outcome::Retry {
                        reason: "ExpiredProviderToken: APNs rejected a freshly signed token as \
                                 expired; check the gateway host's clock"
                            .into(),
                        status: 403,
                        retry_after: None,
                    };
                }
                Verdict::CredentialsRejected(reason) => {
                    warn!(%reason, "APNs rejected the credentials; failing fast for {:?}", self.credentials_retry);
                    *self.credentials_block.lock() =
                        Some((Instant::now() + self.credentials_retry, reason.clone()));
                    return Outcome::Failed {
                        reason,
                        status: 403,
                    };
                }
            }
        }
    }
}

impl Provider for ApnsProvider {
    fn platform(&self) -> Platform {
        Platform::Apns
    }

    fn deliver<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.deliver_timed(request).await.outcome })
    }

    fn deliver_timed<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            match request {
                ProviderRequest::Apns(message) => self.deliver_apns(message).await,
                other => Attempt {
                    outcome: wrong_platform(Platform::Apns, other),
                    round_trip: None,
                },
            }
        })
    }

    fn sample(&self, samples: &mut crate::metrics::Samples) {
        samples.pool(super::pool_sample("apns", &self.pool));
        samples.credential(crate::metrics::CredentialSample {
            provider: "apns",
            pool: self.pool.name().to_string(),
            kind: "jwt",
            refreshes: self.signer.signatures(),
            failures: self.signer.sign_failures(),
        });
    }

    fn capacity(&self) -> Capacity {
        self.pool.capacity()
    }
}

/// Transport failures are transient for the message: retry later.
pub(crate) fn transport_outcome(error: TransportError) -> Outcome {
    Outcome::Retry {
        reason: error.to_string(),
        status: 0,
        retry_after: None,
    }
}

fn value(s: &str, name: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(s)
        .map_err(|_| format!("{name} contains characters not allowed in a header"))
}

fn priority_value(priority: u8) -> HeaderValue {
    HeaderValue::from(u16::from(priority))
}

/// Builds the provider for one key.
pub fn shared(
    pool: H2Pool,
    signer: ApnsTokenSigner,
    credentials_retry: Duration,
) -> Arc<ApnsProvider> {
    Arc::new(ApnsProvider::new(pool, signer, credentials_retry))
}
