//! OAuth2 access tokens for FCM (docs/providers.md, "FCM: OAuth2 service-account tokens").
//!
//! A credential (a service-account key, workload identity federation, gcloud user credentials
//! or the metadata server; see `credentials.rs`) obtains a bearer access token about an hour
//! long; this module holds what they share: the token, the service-account JWT assertion, the
//! token endpoint's answer and its errors. `token_source.rs` caches and refreshes the token.
//!
//! Neither the private key nor any access token ever reaches a log line or a `Debug` output.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The scope FCM's `messages:send` accepts.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Assertion lifetime; Google's maximum.
pub const ASSERTION_LIFETIME_SECS: u64 = 3600;
/// Refresh at most this long before the access token expires (or 10% of its lifetime, if less).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Assumed lifetime when the token response has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// Why a service-account key file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("the service-account JSON has no `{0}`")]
    Missing(&'static str),
    #[error("`type` is `{0}`; supported: `service_account`, `external_account`, `authorized_user`")]
    WrongType(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("`private_key` is not an RSA private key in PEM form: {0}")]
    Key(String),
    #[error("`token_uri` is not usable: {0}")]
    TokenUri(String),
}

/// Why no access token could be obtained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The assertion could not be signed (a broken key; caught at start in practice).
    #[error("signing the OAuth assertion failed: {0}")]
    Sign(String),
    /// The token endpoint refused the credentials (`invalid_grant`, ...): retrying cannot help.
    /// The text names the endpoint, its answer and what to check.
    #[error("{0}")]
    Rejected(String),
    /// The token endpoint failed or could not be reached, after retries.
    #[error("the OAuth token endpoint is unavailable: {0}")]
    Unavailable(String),
}

/// A bearer access token. Its `Debug` is redacted; use [`AccessToken::secret`] to send it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    pub(crate) fn new(token: &str) -> Self {
        Self(token.into())
    }

    /// The token itself, for the `authorization` header only.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The token as shared: caches keyed by token compare it by pointer.
    pub(crate) fn shared(&self) -> &Arc<str> {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

/// A parsed service-account key: who we are and the key that signs assertions.
pub struct ServiceAccountKey {
    /// `client_email`, the JWT `iss`.
    pub client_email: String,
    /// `private_key_id`, the JWT `kid` when present.
    pub private_key_id: Option<String>,
    /// `token_uri`, where assertions are exchanged (also the JWT `aud`).
    pub token_uri: String,
    /// `project_id` from the file.
    pub project_id: Option<String>,
    key: EncodingKey,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceAccountKey {
    /// Parses a Google service-account key file and checks that its key can sign.
    pub fn from_json(json: &str) -> Result<Self, CredentialsError> {
        let file: KeyFile =
            serde_json::from_str(json).map_err(|e| CredentialsError::Json(e.to_string()))?;
        if let Some(kind) = file.kind.as_deref()
            && kind != "service_account"
        {
            return Err(CredentialsError::WrongType(kind.to_string()));
        }
        let present = |v: Option<String>, name: &'static str| {
            v.filter(|s| !s.trim().is_empty())
                .ok_or(CredentialsError::Missing(name))
        };
        let client_email = present(file.client_email, "client_email")?;
        let private_key = present(file.private_key, "private_key")?;
        let token_uri = present(file.token_uri, "token_uri")?;
        let key = EncodingKey::from_rsa_pem(private_key.as_bytes())
            .map_err(|e| CredentialsError::Key(e.to_string()))?;
        let account = Self {
            client_email,
            private_key_id: file.private_key_id.filter(|s| !s.is_empty()),
            token_uri,
            project_id: file.project_id.filter(|s| !s.is_empty()),
            key,
        };
        // Fail at start, not on the first push, if the key cannot sign (a PEM block labelled
        // RSA but holding something else only fails here).
        account
            .assertion(unix_now())
            .map_err(|e| CredentialsError::Key(e.to_string()))?;
        Ok(account)
    }

    /// Signs the RS256 assertion for `iat` (Unix seconds), valid for an hour.
    pub fn assertion(&self, iat: u64) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".into());
        header.kid = self.private_key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| TokenError::Sign(e.to_string()))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One token-endpoint request's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Worth another try (5xx, 429, 408, transport, a malformed 200).
    #[error("{0}")]
    Transient(String),
    /// The endpoint refused the credentials.
    #[error("{0}")]
    Permanent(String),
}

impl FetchError {
    /// A refusal says who refused what, the endpoint's answer, and what to check.
    pub fn with_hint(self, what: &str, hint: &str) -> Self {
        match self {
            Self::Permanent(reason) => Self::Permanent(format!("{what} ({reason}); {hint}")),
            transient => transient,
        }
    }
}

/// Classifies a token endpoint response: the token and its lifetime, or why not.
pub fn parse_token_response(
    status: u16,
    body: &[u8],
) -> Result<(AccessToken, Duration), FetchError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if status == 200 {
        let Some(token) = field("access_token").filter(|t| !t.is_empty()) else {
            return Err(FetchError::Transient(
                "HTTP 200 without an access_token".into(),
            ));
        };
        // It goes into a header: visible ASCII only (Google's are `ya29.` plus base64url).
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FetchError::Transient(
                "the access_token contains characters not allowed in a header".into(),
            ));
        }
        if let Some(kind) = field("token_type")
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(FetchError::Permanent(format!(
                "unsupported token_type `{kind}` (expected Bearer)"
            )));
        }
        let lifetime = match json.as_ref().and_then(|j| j.get("expires_in")) {
            None | Some(Value::Null) => DEFAULT_LIFETIME,
            Some(value) => parse_expires_in(value)
                .ok_or_else(|| FetchError::Transient(format!("invalid expires_in {value}")))?,
        };
        return Ok((AccessToken::new(&token), lifetime));
    }
    let error = field("error");
    let description = field("error_description");
    let reason = match (&error, &description) {
        (Some(e), Some(d)) => format!("HTTP {status} {e}: {d}"),
        (Some(e), None) => format!("HTTP {status} {e}"),
        (None, Some(d)) => format!("HTTP {status}: {d}"),
        (None, None) => format!("HTTP {status}"),
    };
    let transient_code = matches!(
        error.as_deref(),
        Some("internal_failure" | "server_error" | "temporarily_unavailable")
    );
    if transient_code || matches!(status, 408 | 429 | 500..=599) {
        Err(FetchError::Transient(reason))
    } else {
        Err(FetchError::Permanent(reason))
    }
}

/// `expires_in` as a number or a numeric string (both seen); seconds, not negative.
fn parse_expires_in(value: &Value) -> Option<Duration> {
    let secs = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn account() -> (ServiceAccountKey, pushgate_mocks::keys::ServiceAccount) {
        let sa =
            pushgate_mocks::keys::generate_service_account("proj-1", "https://127.0.0.1:1/token");
        (ServiceAccountKey::from_json(&sa.json).unwrap(), sa)
    }

    #[test]
    fn assertion_is_rs256_with_kid_and_google_claims() {
        let (key, sa) = account();
        let iat = unix_now();
        let jwt = key.assertion(iat).unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let file: Value = serde_json::from_str(&sa.json).unwrap();
        assert_eq!(header.kid.as_deref(), file["private_key_id"].as_str());
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&["https://127.0.0.1:1/token"]);
        validation.set_issuer(&[sa.client_email.as_str()]);
        let data = jsonwebtoken::decode::<Value>(
            &jwt,
            &DecodingKey::from_rsa_pem(sa.public_pem.as_bytes()).unwrap(),
            &validation,
        )
        .unwrap();
        let claims = data.claims;
        assert_eq!(claims["iss"], sa.client_email.as_str());
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(claims["aud"], "https://127.0.0.1:1/token");
        assert_eq!(claims["iat"].as_u64(), Some(iat));
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            3600
        );
        assert_eq!(claims.as_object().unwrap().len(), 5, "{claims}");
    }

    #[test]
    fn kid_is_omitted_without_private_key_id() {
        let (_, sa) = account();
        let mut file: Value = serde_json::from_str(&sa.json).unwrap();
        file.as_object_mut().unwrap().remove("private_key_id");
        let key = ServiceAccountKey::from_json(&file.to_string()).unwrap();
        let header = jsonwebtoken::decode_header(key.assertion(1).unwrap()).unwrap();
        assert_eq!(header.kid, None);
    }

    #[test]
    fn key_file_errors_say_what_is_wrong() {
        let (_, sa) = account();
        assert!(matches!(
            ServiceAccountKey::from_json("not json"),
            Err(CredentialsError::Json(_))
        ));
        for field in ["client_email", "private_key", "token_uri"] {
            let mut file: Value = serde_json::from_str(&sa.json).unwrap();
            file.as_object_mut().unwrap().remove(field);
            assert_eq!(
                ServiceAccountKey::from_json(&file.to_string()).unwrap_err(),
                CredentialsError::Missing(field)
            );
        }
        let mut file: Value = serde_json::from_str(&sa.json).unwrap();
        file["private_key"] = Value::from(pushgate_mocks::keys::generate_apns_key().private_p8_pem);
        let err = ServiceAccountKey::from_json(&file.to_string()).unwrap_err();
        assert!(matches!(err, CredentialsError::Key(_)), "{err:?}");
        file["private_key"] =
            Value::from("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        assert!(matches!(
            ServiceAccountKey::from_json(&file.to_string()),
            Err(CredentialsError::Key(_))
        ));
        file["type"] = Value::from("authorized_user");
        assert!(matches!(
            ServiceAccountKey::from_json(&file.to_string()),
            Err(CredentialsError::WrongType(_))
        ));
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let (key, _) = account();
        let text = format!("{key:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(text.contains("<redacted>"));
        let token = AccessToken("ya29.secret".into());
        assert_eq!(format!("{token:?}"), "AccessToken(<redacted>)");
    }

    #[test]
    fn token_response_parsing() {
        let (t, d) = parse_token_response(
            200,
            br#"{"access_token":"ya29.c.abc","expires_in":3599,"token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(t.secret(), "ya29.c.abc");
        assert_eq!(d, Duration::from_secs(3599));
        let (_, d) = parse_token_response(
            200,
            br#"{"access_token":"ya29.x","expires_in":"3599","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(d, Duration::from_secs(3599), "expires_in as a string");
        let (_, d) = parse_token_response(200, br#"{"access_token":"ya29.x"}"#).unwrap();
        assert_eq!(d, DEFAULT_LIFETIME);
        for body in [
            &b"<html/>"[..],
            b"{}",
            br#"{"access_token":""}"#,
            br#"{"access_token":"a b"}"#,
        ] {
            assert!(matches!(
                parse_token_response(200, body),
                Err(FetchError::Transient(_))
            ));
        }
        assert!(matches!(
            parse_token_response(200, br#"{"access_token":"x","expires_in":-5}"#),
            Err(FetchError::Transient(_))
        ));
    }

    #[test]
    fn token_endpoint_errors() {
        let body = br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        assert_eq!(
            parse_token_response(400, body),
            Err(FetchError::Permanent(
                "HTTP 400 invalid_grant: Invalid JWT Signature.".into()
            ))
        );
        let body = br#"{"error":"invalid_grant","error_description":"Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."}"#;
        assert!(matches!(
            parse_token_response(400, body),
            Err(FetchError::Permanent(_))
        ));
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(
                parse_token_response(status, b"<html>"),
                Err(FetchError::Transient(_))
            ));
        }
        let body = br#"{"error":"temporarily_unavailable"}"#;
        assert!(matches!(
            parse_token_response(400, body),
            Err(FetchError::Transient(_))
        ));
        let body = br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        let Err(refused) = parse_token_response(400, body) else {
            panic!("not refused");
        };
        let reason = refused
            .with_hint(
                "the OAuth token endpoint rejected the service-account credentials",
                "check the key",
            )
            .clone();
        assert!(
            matches!(&reason, FetchError::Permanent(r) if r.contains("invalid_grant") && r.contains("credentials") && r.contains("check the key")),
            "{reason:?}"
        );
    }
}
