//! Stand-ins for Google's credential endpoints, HTTP/1.1 only, handing out access tokens that a
//! [`crate::fcm::MockFcm`] accepts (through its [`FcmIssuer`]).
//!
//! Routes, on one listener (cleartext, or TLS offering ALPN `http/1.1` alone):
//! - `GET /computeMetadata/v1/instance/service-accounts/default/token` and
//!   `GET /computeMetadata/v1/project/project-id`: the GCE/GKE metadata server. A request without
//!   `Metadata-Flavor: Google`, or with `X-Forwarded-For` (the real server refuses proxied
//!   requests), gets 403 and is counted in [`GoogleAuthStats::metadata_refused`]; answers carry
//!   `Metadata-Flavor: Google`. The token answer is `{"access_token","expires_in","token_type"}`.
//! - `POST /token`: the service-account JWT-bearer exchange, checked by the mock FCM itself.
//! - `POST /v1/token`: Google STS token exchange (RFC 8693): `grant_type`
//!   `urn:ietf:params:oauth:grant-type:token-exchange`, `audience` and `subject_token` equal to the
//!   configured ones, `subject_token_type` present, `requested_token_type` an access token, `scope`
//!   including cloud-platform; else 400 `invalid_grant` / `invalid_request` / `invalid_scope`.
//!   The federated token it issues is accepted by the mock FCM too (as Google accepts federated
//!   tokens for some APIs).
//! - `POST /v1/projects/-/serviceAccounts/<email>:generateAccessToken`: IAM Credentials. The
//!   bearer must be a token this stand-in's STS issued, `<email>` the configured service
//!   account, the JSON body a non-empty `scope` list; else 401/403/400 in Google's error shape.
//!   Success: `{"accessToken","expireTime"}` (RFC 3339).
//!
//! [`MockGoogleAuthConfig::advertised_lifetime`] shortens the lifetime announced to clients (the
//! tokens stay valid at the mock FCM for its own lifetime), so a test sees refreshes before
//! expiry without waiting an hour.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::fcm::FcmIssuer;
use crate::http1::{Http1Request, Http1Response, Http1Running};
use crate::tls::MockTls;

const METADATA_TOKEN: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const METADATA_PROJECT: &str = "/computeMetadata/v1/project/project-id";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Configuration of a [`MockGoogleAuth`].
#[derive(Clone, Debug)]
pub struct MockGoogleAuthConfig {
    /// Serve TLS with ALPN `http/1.1` only (an HTTP/1.1-only HTTPS endpoint); false: cleartext.
    pub tls: bool,
    /// What the metadata server answers as the project id.
    pub project_id: String,
    /// The only subject token STS accepts.
    pub subject_token: String,
    /// The only `audience` STS accepts.
    pub audience: String,
    /// The only service account IAM Credentials impersonates.
    pub service_account: String,
    /// Lifetime announced with each token (`expires_in`, `expireTime`); default: the mock FCM's.
    pub advertised_lifetime: Option<Duration>,
}

impl Default for MockGoogleAuthConfig {
    fn default() -> Self {
        Self {
            tls: false,
            project_id: "pushgate-test".into(),
            subject_token: "eyJhbGciOiJSUzI1NiJ9.k8s-service-account-token.sig".into(),
            audience: "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/k8s".into(),
            service_account: "push@pushgate-test.iam.gserviceaccount.com".into(),
            advertised_lifetime: None,
        }
    }
}

/// What the stand-in saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GoogleAuthStats {
    /// Metadata requests answered (token and project id).
    pub metadata_requests: u64,
    /// Metadata requests refused for a missing `Metadata-Flavor: Google` or a proxy header.
    pub metadata_refused: u64,
    /// Metadata token answers.
    pub metadata_tokens: u64,
    /// JWT-bearer requests to `/token`.
    pub jwt_requests: u64,
    /// STS requests, and tokens issued by STS.
    pub sts_requests: u64,
    pub sts_tokens: u64,
    /// IAM Credentials requests, and tokens issued by them.
    pub impersonation_requests: u64,
    pub impersonation_tokens: u64,
    /// Requests to any other path.
    pub unknown_requests: u64,
}

#[derive(Default)]
struct Counters {
    metadata_requests: AtomicU64,
    metadata_refused: AtomicU64,
    metadata_tokens: AtomicU64,
    jwt_requests: AtomicU64,
    sts_requests: AtomicU64,
    sts_tokens: AtomicU64,
    impersonation_requests: AtomicU64,
    impersonation_tokens: AtomicU64,
    unknown_requests: AtomicU64,
}

struct Inner {
    cfg: MockGoogleAuthConfig,
    issuer: FcmIssuer,
    counters: Counters,
    /// Tokens issued by STS: the only bearers IAM Credentials accepts.
    federated: Mutex<HashSet<String>>,
    /// The last STS form received (for tests to inspect).
    last_sts_form: Mutex<Option<HashMap<String, String>>>,
}

/// A running stand-in. Dropping it stops the listener.
pub struct MockGoogleAuth {
    inner: Arc<Inner>,
    tls: Option<Arc<MockTls>>,
    running: Http1Running,
}

impl MockGoogleAuth {
    /// Binds `127.0.0.1:0` and serves; tokens come from `issuer` (a mock FCM's).
    pub async fn start(cfg: MockGoogleAuthConfig, issuer: FcmIssuer) -> anyhow::Result<Self> {
        let tls = if cfg.tls {
            Some(Arc::new(MockTls::generate(&[b"http/1.1"])?))
        } else {
            None
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let inner = Arc::new(Inner {
            cfg,
            issuer,
            counters: Counters::default(),
            federated: Mutex::default(),
            last_sts_form: Mutex::default(),
        });
        let handler = Arc::clone(&inner);
        let running = crate::http1::spawn(
            listener,
            tls.clone(),
            Arc::new(move |request| handler.answer(request)),
        )?;
        Ok(Self {
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

    /// `127.0.0.1:PORT`, what `GCE_METADATA_HOST` takes.
    pub fn host(&self) -> String {
        self.running.addr.to_string()
    }

    /// The JWT-bearer token endpoint, for a service-account file's `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.url())
    }

    /// Google STS's token URL, for an `external_account` file's `token_url`.
    pub fn sts_url(&self) -> String {
        format!("{}/v1/token", self.url())
    }

    /// IAM Credentials `generateAccessToken` of the configured service account.
    pub fn impersonation_url(&self) -> String {
        format!(
            "{}/v1/projects/-/serviceAccounts/{}:generateAccessToken",
            self.url(),
            self.inner.cfg.service_account
        )
    }

    /// The CA certificate (PEM) to trust when serving TLS.
    pub fn ca_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.ca_pem().to_string())
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &MockGoogleAuthConfig {
        &self.inner.cfg
    }

    /// The last STS form received, decoded.
    pub fn last_sts_form(&self) -> Option<HashMap<String, String>> {
        self.inner.last_sts_form.lock().clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> GoogleAuthStats {
        let c = &self.inner.counters;
        GoogleAuthStats {
            metadata_requests: c.metadata_requests.load(Relaxed),
            metadata_refused: c.metadata_refused.load(Relaxed),
            metadata_tokens: c.metadata_tokens.load(Relaxed),
            jwt_requests: c.jwt_requests.load(Relaxed),
            sts_requests: c.sts_requests.load(Relaxed),
            sts_tokens: c.sts_tokens.load(Relaxed),
            impersonation_requests: c.impersonation_requests.load(Relaxed),
            impersonation_tokens: c.impersonation_tokens.load(Relaxed),
            unknown_requests: c.unknown_requests.load(Relaxed),
        }
    }
}

impl Inner {
    fn answer(&self, request: Http1Request) -> Http1Response {
        let path = request.path().to_string();
        if path.starts_with("/computeMetadata/") {
            return self.metadata(&request, &path);
        }
        if path == "/token" {
            self.counters.jwt_requests.fetch_add(1, Relaxed);
            let audience = format!("{}/token", self.origin(&request));
            let mut answer = self.issuer.exchange_assertion(&request.body, &audience);
            if answer.status == 200 {
                answer = self.relabel_lifetime(answer);
            }
            return answer;
        }
        if path == "/v1/token" {
            return self.sts(&request);
        }
        if path.starts_with("/v1/projects/-/serviceAccounts/")
            && path.ends_with(":generateAccessToken")
        {
            return self.impersonate(&request, &path);
        }
        self.counters.unknown_requests.fetch_add(1, Relaxed);
        google_error(404, "NOT_FOUND", "Requested entity was not found.")
    }

    /// `scheme://host` the client addressed (its `Host` header).
    fn origin(&self, request: &Http1Request) -> String {
        let scheme = if self.cfg.tls { "https" } else { "http" };
        format!("{scheme}://{}", request.header("host").unwrap_or(""))
    }

    fn lifetime(&self, issued: u64) -> u64 {
        self.cfg
            .advertised_lifetime
            .map_or(issued, |d| d.as_secs().max(1))
    }

    /// Rewrites `expires_in` of a JSON token answer to the advertised lifetime.
    fn relabel_lifetime(&self, answer: Http1Response) -> Http1Response {
        let Some(lifetime) = self.cfg.advertised_lifetime else {
            return answer;
        };
        let Ok(mut body) = serde_json::from_slice::<Value>(&answer.body) else {
            return answer;
        };
        body["expires_in"] = Value::from(lifetime.as_secs().max(1));
        Http1Response::new(200, "application/json; charset=utf-8", body.to_string())
    }

    fn metadata(&self, request: &Http1Request, path: &str) -> Http1Response {
        let flavored = |r: Http1Response| r.with_header("metadata-flavor", "Google");
        if request.header("metadata-flavor") != Some("Google")
            || request.headers.contains_key("x-forwarded-for")
        {
            self.counters.metadata_refused.fetch_add(1, Relaxed);
            return flavored(Http1Response::new(
                403,
                "text/html; charset=UTF-8",
                "Missing required header: Metadata-Flavor\n",
            ));
        }
        if request.method != http::Method::GET {
            return flavored(Http1Response::new(405, "text/plain", "GET only\n"));
        }
        self.counters.metadata_requests.fetch_add(1, Relaxed);
        match path {
            METADATA_TOKEN => {
                let (token, issued) = self.issuer.issue();
                self.counters.metadata_tokens.fetch_add(1, Relaxed);
                let body = json!({
                    "access_token": token,
                    "expires_in": self.lifetime(issued),
                    "token_type": "Bearer",
                });
                flavored(Http1Response::new(
                    200,
                    "application/json",
                    body.to_string(),
                ))
            }
            METADATA_PROJECT => flavored(Http1Response::new(
                200,
                "application/text",
                self.cfg.project_id.clone(),
            )),
            _ => flavored(Http1Response::new(404, "text/html", "Not Found\n")),
        }
    }

    fn sts(&self, request: &Http1Request) -> Http1Response {
        self.counters.sts_requests.fetch_add(1, Relaxed);
        let form = parse_form(&request.body);
        *self.last_sts_form.lock() = Some(form.clone());
        let get = |k: &str| form.get(k).map(String::as_str);
        if get("grant_type") != Some("urn:ietf:params:oauth:grant-type:token-exchange") {
            return oauth_error(400, "unsupported_grant_type", "Invalid grant_type.");
        }
        if get("requested_token_type") != Some("urn:ietf:params:oauth:token-type:access_token") {
            return oauth_error(400, "invalid_request", "Invalid requested_token_type.");
        }
        if get("subject_token_type").is_none_or(str::is_empty) {
            return oauth_error(400, "invalid_request", "Missing subject_token_type.");
        }
        if get("audience") != Some(self.cfg.audience.as_str()) {
            return oauth_error(
                400,
                "invalid_target",
                "The target service indicated by the \"audience\" parameters is invalid.",
            );
        }
        if get("subject_token") != Some(self.cfg.subject_token.as_str()) {
            return oauth_error(
                400,
                "invalid_grant",
                "The subject token is invalid or has expired.",
            );
        }
        if !get("scope").is_some_and(|s| s.split(' ').any(|sc| sc == CLOUD_PLATFORM)) {
            return oauth_error(400, "invalid_scope", "Invalid scope.");
        }
        let (token, issued) = self.issuer.issue();
        self.federated.lock().insert(token.clone());
        self.counters.sts_tokens.fetch_add(1, Relaxed);
        let body = json!({
            "access_token": token,
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": self.lifetime(issued),
        });
        Http1Response::new(200, "application/json", body.to_string())
    }

    fn impersonate(&self, request: &Http1Request, path: &str) -> Http1Response {
        self.counters.impersonation_requests.fetch_add(1, Relaxed);
        let bearer = request
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !self.federated.lock().contains(bearer) || !self.issuer.accepts(bearer) {
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
            );
        }
        let email = path
            .trim_start_matches("/v1/projects/-/serviceAccounts/")
            .trim_end_matches(":generateAccessToken");
        if email != self.cfg.service_account {
            return google_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
            );
        }
        let scopes_ok = serde_json::from_slice::<Value>(&request.body)
            .ok()
            .and_then(|b| b.get("scope").and_then(Value::as_array).cloned())
            .is_some_and(|s| !s.is_empty() && s.iter().all(Value::is_string));
        if !scopes_ok {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
            );
        }
        let (token, issued) = self.issuer.issue();
        self.counters.impersonation_tokens.fetch_add(1, Relaxed);
        let expires = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + self.lifetime(issued);
        let body = json!({ "accessToken": token, "expireTime": rfc3339(expires) });
        Http1Response::new(200, "application/json; charset=UTF-8", body.to_string())
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Http1Response {
    Http1Response::new(
        status,
        "application/json; charset=utf-8",
        json!({"error": error, "error_description": description}).to_string(),
    )
}

fn google_error(status: u16, code: &str, message: &str) -> Http1Response {
    Http1Response::new(
        status,
        "application/json; charset=UTF-8",
        json!({"error": {"code": status, "message": message, "status": code}}).to_string(),
    )
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_313_600), "2026-12-03T16:00:00Z");
    }

    #[test]
    fn form_decoding() {
        let form = parse_form(b"a=%2F%2Fx+y&b=&c=100%25&d=%zz");
        assert_eq!(form["a"], "//x y");
        assert_eq!(form["b"], "");
        assert_eq!(form["c"], "100%");
        assert_eq!(form["d"], "%zz");
    }
}
