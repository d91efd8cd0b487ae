//! APNs provider: token-authenticated HTTP/2 requests to `/3/device/<token>`.
//!
//! One `ApnsProvider` exists per (team, key, endpoint) and is shared by every app that uses that
//! key: one connection pool, one signed token. The topic travels with each rendered request.

pub mod jwt;
pub mod response;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::warn;

use self::jwt::ApnsTokenSigner;
use self::response::{Verdict, classify};
use super::h2pool::{H2Pool, TransportError};
use super::{BoxFuture, Provider, wrong_platform};
use crate::model::{ApnsRequest, Outcome, Platform, ProviderRequest};

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

    fn build(&self, message: &ApnsRequest, token: &str) -> Result<Request<()>, String> {
        let endpoint = self.pool.endpoint();
        let uri = format!(
            "{}://{}/3/device/{}",
            endpoint.scheme, endpoint.authority, message.device_token
        );
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("authorization", bearer(token)?)
            .header("apns-topic", value(&message.topic, "apns-topic")?)
            .header("apns-push-type", message.push_type.header_value())
            .header("apns-priority", priority_value(message.priority))
            .header("apns-id", value(&message.apns_id, "apns-id")?);
        if let Some(expiration) = message.expiration {
            builder = builder.header("apns-expiration", HeaderValue::from(expiration));
        }
        if let Some(collapse) = &message.collapse_id {
            builder = builder.header("apns-collapse-id", value(collapse, "apns-collapse-id")?);
        }
        builder
            .body(())
            .map_err(|e| format!("invalid APNs request: {e}"))
    }

    async fn deliver_apns(&self, message: &ApnsRequest) -> Outcome {
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
            return Outcome::Failed {
                reason,
                status: 403,
            };
        }
        let outcome = self.send_apns(message).await;
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
        outcome
    }

    async fn send_apns(&self, message: &ApnsRequest) -> Outcome {
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
            let request = match self.build(message, &token) {
                Ok(r) => r,
                Err(reason) => return Outcome::Rejected { reason, status: 0 },
            };
            let response = match self.pool.send(request, message.payload.clone()).await {
                Ok(r) => r,
                Err(e) => return transport_outcome(e),
            };
            let apns_id = response
                .headers
                .get("apns-id")
                .and_then(|v| v.to_str().ok())
                .or(Some(message.apns_id.as_str()));
            match classify(response.status.as_u16(), &response.body, apns_id) {
                Verdict::Final(outcome) => return outcome,
                Verdict::RefreshToken if !refreshed => {
                    refreshed = true;
                    self.signer.expire(&token);
                }
                Verdict::RefreshToken => {
                    return Outcome::Failed {
                        reason: "ExpiredProviderToken: APNs rejected a freshly signed token as \
                                 expired; check the gateway host's clock"
                            .into(),
                        status: 403,
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
        Box::pin(async move {
            match request {
                ProviderRequest::Apns(message) => self.deliver_apns(message).await,
                other => wrong_platform(Platform::Apns, other),
            }
        })
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

/// Not marked HPACK-sensitive on purpose: the token changes at most every 20 minutes and Apple
/// says it "can be indexed", so after the first request it costs a one-byte table index instead
/// of ~200 Huffman-coded bytes per request. It never reaches a log: requests are not logged.
fn bearer(token: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&format!("bearer {token}"))
        .map_err(|_| "provider token is not a valid header value".to_string())
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
