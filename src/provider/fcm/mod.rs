//! FCM HTTP v1 provider: OAuth-authenticated HTTP/2 requests to
//! `/v1/projects/{project_id}/messages:send`, one message per request (the legacy `/batch` and
//! `/fcm/send` APIs are gone and never called).
//!
//! One `FcmProvider` exists per app. It owns a connection pool to the FCM endpoint, a
//! [`token_source::TokenSource`] (its credential, found as Application Default Credentials are, and
//! the HTTP/1.1-or-HTTP/2 client of the credential endpoints) and the project-wide quota pause: after a `429` with `Retry-After`, every delivery of this provider
//! waits until that instant before sending, because the quota is shared by the whole project.

mod credentials;
mod oauth;
pub mod response;
mod token_http;
mod token_source;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use self::credentials::{Credential, discover};
use self::oauth::{AccessToken, TokenError};
use self::response::{Verdict, classify};
use self::token_http::CredentialHttp;
use self::token_source::{RefreshPolicy, TokenSource};
use super::apns::transport_outcome;
use super::config::FcmConfig;
use super::h2pool::{Endpoint, H2Pool, PoolConfig};
use super::{Attempt, BearerHeader, BoxFuture, Capacity, Provider, wrong_platform};
use crate::config_error::ConfigError;
use crate::domain::{FcmRequest, Outcome, Platform, ProviderRequest};

/// Google's endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
/// Longest project-wide pause a single `Retry-After` can impose (a guard against absurd dates).
pub const MAX_APP_PAUSE: Duration = Duration::from_secs(5 * 60);

/// Where an app's messages are sent: its project's `messages:send`.
struct SendTarget {
    project_id: String,
    send_uri: String,
    /// `send_uri` parsed; `None` when the project id does not make a valid URI.
    uri: Option<Uri>,
}

impl SendTarget {
    fn new(endpoint: &Endpoint, project_id: &str) -> Self {
        let send_uri = format!(
            "{}://{}/v1/projects/{project_id}/messages:send",
            endpoint.scheme, endpoint.authority
        );
        Self {
            project_id: project_id.to_string(),
            uri: Uri::try_from(send_uri.as_str()).ok(),
            send_uri,
        }
    }
}

/// The FCM client of one app.
pub struct FcmProvider {
    pool: H2Pool,
    tokens: TokenSource,
    /// Set at start, or on the first send from the metadata server (ADC without a project id).
    target: tokio::sync::OnceCell<SendTarget>,
    authorization: BearerHeader,
    request_timeout: Duration,
    /// Project quota exhausted: no send before this instant.
    app_pause_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for FcmProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmProvider")
            .field("project_id", &self.project_id())
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl FcmProvider {
    /// `pool` points at the FCM endpoint; `request_timeout` also bounds how long a delivery waits
    /// out a quota pause before handing the message back for a later retry.
    pub fn new(
        pool: H2Pool,
        tokens: TokenSource,
        project_id: &str,
        request_timeout: Duration,
    ) -> Self {
        let target = SendTarget::new(pool.endpoint(), project_id);
        Self::with_target(pool, tokens, Some(target), request_timeout)
    }

    /// `target` is `None` when the project id is to be asked of the metadata server.
    fn with_target(
        pool: H2Pool,
        tokens: TokenSource,
        target: Option<SendTarget>,
        request_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            tokens,
            target: tokio::sync::OnceCell::new_with(target),
            authorization: BearerHeader::default(),
            request_timeout,
            app_pause_until: Mutex::new(None),
        }
    }

    /// Builds the provider from an app's `[fcm]` section, with Application Default Credentials
    /// from the process environment when no key is configured; errors name the offending key
    /// under `key` (e.g. `apps.shop.fcm`).
    pub fn from_config(key: &str, config: &FcmConfig) -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self::from_config_with_env(key, config, &env)
    }

    /// As [`FcmProvider::from_config`], reading the ADC variables (`GOOGLE_APPLICATION_CREDENTIALS`,
    /// `GCE_METADATA_HOST`, `GOOGLE_CLOUD_PROJECT`, `HOME`, `CLOUDSDK_CONFIG`) through `env`.
    pub fn from_config_with_env(
        key: &str,
        config: &FcmConfig,
        env: credentials::Env<'_>,
    ) -> Result<Self, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            reason,
        };
        crate::provider::config::check_fcm_credentials(key, config)?;
        let found = discover(
            config.credentials_json.as_deref(),
            config.credentials_file.as_deref(),
            env,
        )
        .map_err(|e| invalid(e.field, e.reason))?;
        let source_field = if config.credentials_json.is_some() {
            "credentials_json"
        } else {
            "credentials_file"
        };
        let project_id = match (&config.project_id, found.credential.project_id()) {
            (Some(id), _) => {
                check_project_id(id).map_err(|reason| invalid("project_id", reason))?;
                Some(id.clone())
            }
            (None, Some(id)) => {
                check_project_id(id)
                    .map_err(|reason| invalid(source_field, format!("`project_id` {reason}")))?;
                Some(id.to_string())
            }
            (None, None) => match env("GOOGLE_CLOUD_PROJECT").or_else(|| env("GCLOUD_PROJECT")) {
                Some(id) => {
                    check_project_id(&id).map_err(|reason| {
                        invalid("project_id", format!("GOOGLE_CLOUD_PROJECT: {reason}"))
                    })?;
                    Some(id)
                }
                // The metadata server knows the project it runs in.
                None if matches!(found.credential, Credential::Metadata(_)) => None,
                None if matches!(found.credential, Credential::ServiceAccount(_)) => {
                    return Err(invalid(
                        source_field,
                        "the service-account JSON has no `project_id` (or set project_id)".into(),
                    ));
                }
                None => {
                    return Err(invalid(
                        "project_id",
                        format!(
                            "{} credentials name no Firebase project: set project_id (or \
                             GOOGLE_CLOUD_PROJECT)",
                            found.credential.kind()
                        ),
                    ));
                }
            },
        };
        if config.request_timeout_ms == 0 {
            return Err(invalid("request_timeout_ms", "must be at least 1".into()));
        }
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let ca =
            match &config.ca_file {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                    invalid("ca_file", format!("cannot read {}: {e}", path.display()))
                })?),
                None => None,
            };
        let url = config.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        let endpoint = parse_origin(url, ca.as_deref(), &invalid, "endpoint")?;
        if let Credential::ServiceAccount(account) = &found.credential {
            check_token_uri(&account.token_uri).map_err(|reason| invalid(source_field, reason))?;
        }
        let http = CredentialHttp::new(ca.as_deref(), request_timeout)
            .map_err(|e| invalid("ca_file", e.to_string()))?;
        // One FCM pool per app: named after the app (`apps.<id>.fcm` -> `fcm:<id>`).
        let app = key
            .strip_prefix("apps.")
            .and_then(|k| k.strip_suffix(".fcm"))
            .unwrap_or(key);
        let pool = H2Pool::new(
            endpoint,
            PoolConfig {
                name: format!("fcm:{app}"),
                connections: config.connections.max(1),
                max_connections: config.max_connections.max(config.connections),
                idle_timeout: Duration::from_secs(config.idle_timeout_secs),
                request_timeout,
                initial_max_streams: 100,
                ..PoolConfig::default()
            },
        );
        info!(
            app = key,
            credentials = %found.source,
            kind = found.credential.kind(),
            principal = %found.credential.principal(),
            project = project_id.as_deref().unwrap_or("(from the metadata server)"),
            "FCM credentials"
        );
        let tokens = TokenSource::new(found.credential, http, RefreshPolicy::default());
        let target = project_id.map(|id| SendTarget::new(pool.endpoint(), &id));
        Ok(Self::with_target(pool, tokens, target, request_timeout))
    }

    /// The FCM connection pool (for metrics and tests).
    pub fn pool(&self) -> &H2Pool {
        &self.pool
    }

    /// The access-token cache (for metrics and tests).
    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// The project messages are sent to (empty until the metadata server has named it).
    pub fn project_id(&self) -> &str {
        self.target.get().map_or("", |t| t.project_id.as_str())
    }

    /// The send target, asking the metadata server for the project id the first time when the
    /// configuration named none.
    async fn target(&self) -> Result<&SendTarget, Outcome> {
        self.target
            .get_or_try_init(|| async {
                let Credential::Metadata(server) = self.tokens.credential() else {
                    return Err("no Firebase project id configured".to_string());
                };
                let id = server.project_id(self.tokens.http()).await?;
                check_project_id(&id)
                    .map_err(|reason| format!("the metadata server's project id {reason}"))?;
                info!(project = %id, "FCM project id from the metadata server");
                Ok(SendTarget::new(self.pool.endpoint(), &id))
            })
            .await
            .map_err(|reason| Outcome::Retry {
                reason: format!("the FCM project id is unknown: {reason}"),
                status: 0,
                retry_after: None,
            })
    }

    /// Until when sends are paused after a quota 429, if they are.
    pub fn paused_until(&self) -> Option<Instant> {
        let pause = *self.app_pause_until.lock();
        pause.filter(|until| *until > Instant::now())
    }

    /// Pauses every send of this provider for `delay` (never shortens a pause in force).
    pub fn pause_app(&self, delay: Duration) {
        if delay.is_zero() {
            return;
        }
        let until = Instant::now() + delay.min(MAX_APP_PAUSE);
        let mut pause = self.app_pause_until.lock();
        if pause.is_none_or(|current| current < until) {
            *pause = Some(until);
            warn!(project = %self.project_id(), ?delay, "FCM quota exceeded; pausing sends");
        }
    }

    /// Waits out a quota pause, if one is in force. A pause longer than a request may take is
    /// not waited out here: the message goes back to the retry queue with the remaining time.
    async fn wait_for_quota(&self) -> Result<(), Outcome> {
        let Some(until) = self.paused_until() else {
            return Ok(());
        };
        let remaining = until.saturating_duration_since(Instant::now());
        if remaining > self.request_timeout {
            return Err(Outcome::Retry {
                reason: format!(
                    "FCM project quota exceeded: sends for project {} paused for another {:.1}s",
                    self.project_id(),
                    remaining.as_secs_f64()
                ),
                status: 429,
                retry_after: Some(remaining),
            });
        }
        tokio::time::sleep_until(until).await;
        Ok(())
    }

    /// Checks what goes into the request; the returned closure assembles it without failing,
    /// once per try.
    fn prepare_request(
        &self,
        target: &SendTarget,
        token: &AccessToken,
    ) -> Result<impl Fn() -> Request<()> + use<>, String> {
        let uri = target
            .uri
            .clone()
            .ok_or_else(|| format!("invalid FCM request: bad URI `{}`", target.send_uri))?;
        let authorization = self
            .authorization
            .get("Bearer", token.shared(), "the access token")?;
        Ok(move || {
            let mut headers = HeaderMap::with_capacity(2);
            headers.insert(AUTHORIZATION, authorization.clone());
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let mut request = Request::new(());
            *request.method_mut() = Method::POST;
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers;
            request
        })
    }

    /// One delivery, with a fresh access token once when FCM rejects the cached one;
    /// `round_trip` is set to the wire time of the last request that got an answer.
    async fn deliver_fcm(
        &self,
        message: &FcmRequest,
        round_trip: &mut Option<Duration>,
    ) -> Outcome {
        if let Err(outcome) = self.wait_for_quota().await {
            return outcome;
        }
        let target = match self.target().await {
            Ok(target) => target,
            Err(outcome) => return outcome,
        };
        let mut refreshed = false;
        loop {
            let token = match self.tokens.token().await {
                Ok(token) => token,
                Err(error) => return token_outcome(error),
            };
            let request = match self.prepare_request(target, &token) {
                Ok(request) => request,
                Err(reason) => return Outcome::Failed { reason, status: 0 },
            };
            let response = match self.pool.send_with(request, message.body.clone()).await {
                Ok(response) => response,
                Err(error) => return transport_outcome(error),
            };
            *round_trip = Some(response.round_trip);
            let retry_after = response
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            let status = response.status.as_u16();
            match classify(status, &response.body, retry_after, SystemTime::now()) {
                Verdict::Final(outcome) => {
                    if let Outcome::Retry {
                        status: 429,
                        retry_after: Some(delay),
                        ..
                    } = &outcome
                    {
                        self.pause_app(*delay);
                    }
                    return outcome;
                }
                Verdict::RefreshToken(_) if !refreshed => {
                    refreshed = true;
                    self.tokens.invalidate(&token);
                }
                Verdict::RefreshToken(message) => {
                    return Outcome::Failed {
                        reason: format!("FCM rejected the access token: {message}"),
                        status: 401,
                    };
                }
            }
        }
    }
}

impl Provider for FcmProvider {
    fn platform(&self) -> Platform {
        Platform::Fcm
    }

    fn deliver<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.deliver_timed(request).await.outcome })
    }

    fn deliver_timed<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let mut round_trip = None;
            let outcome = match request {
                ProviderRequest::Fcm(message) => self.deliver_fcm(message, &mut round_trip).await,
                other => wrong_platform(Platform::Fcm, other),
            };
            Attempt {
                outcome,
                round_trip,
            }
        })
    }

    fn capacity(&self) -> Capacity {
        self.pool.capacity()
    }

    fn sample(&self, samples: &mut crate::metrics::Samples) {
        samples.pool(super::pool_sample("fcm", &self.pool));
        samples.credential(crate::metrics::CredentialSample {
            provider: "fcm",
            pool: self.pool.name().to_string(),
            kind: "oauth",
            refreshes: self.tokens.issued(),
            failures: self.tokens.failures(),
        });
    }
}

/// No access token: retry when the token endpoint is down, fail when it refuses the credentials.
fn token_outcome(error: TokenError) -> Outcome {
    match error {
        TokenError::Unavailable(_) => Outcome::Retry {
            reason: error.to_string(),
            status: 0,
            retry_after: None,
        },
        TokenError::Rejected(_) | TokenError::Sign(_) => Outcome::Failed {
            reason: error.to_string(),
            status: 0,
        },
    }
}

/// A service account's `token_uri` must be an absolute `https://` URL (`http://` to loopback).
fn check_token_uri(token_uri: &str) -> Result<(), String> {
    let uri: http::Uri = token_uri
        .parse()
        .map_err(|e| format!("`token_uri` is not a URL: {e}"))?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err("`token_uri` must be an absolute https:// URL".into());
    }
    crate::provider::config::require_https("token_uri", token_uri)
        .map_err(|_| "`token_uri` must be https:// (http:// only to a loopback address)".into())
}

/// Project ids go into the URL path: `^[^/]+$`, and in practice letters, digits, `-`, `.`, `:`
/// (legacy domain-scoped ids) or a numeric project number.
fn check_project_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._:~".contains(c))
    {
        return Err(format!("`{id}` is not a valid Firebase project id"));
    }
    Ok(())
}

fn parse_origin(
    url: &str,
    ca: Option<&str>,
    invalid: &impl Fn(&str, String) -> ConfigError,
    field: &str,
) -> Result<Endpoint, ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(field, format!("invalid URL `{url}`: {e}")))?;
    if !uri.path().trim_matches('/').is_empty() || uri.query().is_some() {
        return Err(invalid(
            field,
            format!("`{url}` must be an origin (scheme://host[:port]) without a path"),
        ));
    }
    Endpoint::parse(url, ca).map_err(|e| {
        let field = if matches!(e, super::h2pool::EndpointError::Ca(_)) {
            "ca_file"
        } else {
            field
        };
        invalid(field, e.to_string())
    })
}

/// Builds the FCM provider of one app.
pub fn build(key: &str, config: &FcmConfig) -> Result<Arc<dyn Provider>, ConfigError> {
    Ok(Arc::new(FcmProvider::from_config(key, config)?))
}

#[cfg(test)]
mod tests;
