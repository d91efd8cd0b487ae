//! Provider settings of an app (`[apps.<id>.apns]`, `[apps.<id>.fcm]`), their checks, and the
//! construction of an APNs provider from them. Secrets in them never reach a log line: their
//! `Debug` redacts keys.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::apns::{ApnsProvider, jwt::ApnsTokenSigner};
use super::h2pool::{Endpoint, H2Pool, PoolConfig};
use crate::config_error::ConfigError;

/// APNs environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApnsEnvironment {
    #[default]
    Production,
    Sandbox,
}

/// APNs token-based credentials and connection settings of an app.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// Path to Apple's `AuthKey_<KEYID>.p8` file.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The `.p8` contents inline (e.g. from a secret in the environment); wins over `key_file`.
    #[serde(default)]
    pub key_pem: Option<String>,
    pub key_id: String,
    pub team_id: String,
    /// The app's bundle id; the push type's suffix is appended per message.
    pub topic: String,
    #[serde(default)]
    pub environment: ApnsEnvironment,
    /// Overrides the endpoint URL (mock servers, load tests). `https://`, or `http://` (cleartext
    /// HTTP/2) to a loopback address only.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Extra CA certificate (PEM) to trust, for a TLS mock.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connections kept open.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Most connections opened when demand needs more (never fewer than `connections`).
    #[serde(default = "default_apns_max_connections")]
    pub max_connections: usize,
    /// An extra connection the others could do without for this long is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Provider token re-signing interval, clamped to Apple's [20, 60) minutes.
    #[serde(default = "default_token_refresh_secs")]
    pub token_refresh_secs: u64,
}

impl std::fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_file", &self.key_file)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("environment", &self.environment)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ApnsConfig {
    /// The endpoint URL in effect.
    pub fn endpoint_url(&self) -> &str {
        match (&self.endpoint, self.environment) {
            (Some(url), _) => url,
            (None, ApnsEnvironment::Production) => super::apns::PRODUCTION_URL,
            (None, ApnsEnvironment::Sandbox) => super::apns::SANDBOX_URL,
        }
    }
}

/// FCM HTTP v1 credentials and connection settings of an app.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// `"adc"`: Application Default Credentials (also what an absent key file means), said
    /// explicitly.
    #[serde(default)]
    pub credentials: Option<String>,
    /// Path to a Google credential JSON file (service-account key, `external_account` or
    /// `authorized_user`).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The service-account JSON inline; wins over `credentials_file`.
    #[serde(default)]
    pub credentials_json: Option<String>,
    /// Overrides the project id from the key file.
    #[serde(default)]
    pub project_id: Option<String>,
    /// Overrides `https://fcm.googleapis.com` (mock servers, load tests); `https://`, or
    /// `http://` to a loopback address only.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connections kept open.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Most connections opened when demand needs more (never fewer than `connections`).
    #[serde(default = "default_fcm_max_connections")]
    pub max_connections: usize,
    /// An extra connection the others could do without for this long is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl std::fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmConfig")
            .field("credentials", &self.credentials)
            .field("credentials_file", &self.credentials_file)
            .field(
                "credentials_json",
                &self.credentials_json.as_ref().map(|_| "<redacted>"),
            )
            .field("project_id", &self.project_id)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn default_connections() -> usize {
    2
}
/// APNs gives a token connection up to 1,000 streams (docs/providers.md): 25 connections carry
/// 25,000 requests at once, 125,000/s at 200 ms.
fn default_apns_max_connections() -> usize {
    25
}
/// FCM gives a connection 100 streams: 250 connections carry 25,000 requests at once.
fn default_fcm_max_connections() -> usize {
    250
}
fn default_idle_timeout_secs() -> u64 {
    300
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_token_refresh_secs() -> u64 {
    40 * 60
}

/// Checks `[apps.<id>.apns]` at `key`.
pub fn validate_apns(key: &str, apns: &ApnsConfig) -> Result<(), ConfigError> {
    let ten_chars = |v: &str| v.len() == 10 && v.chars().all(|c| c.is_ascii_alphanumeric());
    if !ten_chars(&apns.key_id) {
        return Err(ConfigError::invalid(
            format!("{key}.key_id"),
            "must be the 10-character key id from Apple",
        ));
    }
    if !ten_chars(&apns.team_id) {
        return Err(ConfigError::invalid(
            format!("{key}.team_id"),
            "must be the 10-character team id from Apple",
        ));
    }
    if apns.topic.trim().is_empty() {
        return Err(ConfigError::invalid(
            format!("{key}.topic"),
            "must be the app's bundle id",
        ));
    }
    if apns.key_file.is_none() && apns.key_pem.is_none() {
        return Err(ConfigError::invalid(
            format!("{key}.key_file"),
            "set key_file (the .p8 file) or key_pem",
        ));
    }
    if let Some(url) = &apns.endpoint {
        require_https(&format!("{key}.endpoint"), url)?;
    }
    at_least_one(&format!("{key}.connections"), apns.connections as u64)?;
    at_most_1000(&format!("{key}.connections"), apns.connections)?;
    at_least_one(
        &format!("{key}.max_connections"),
        apns.max_connections as u64,
    )?;
    at_most_1000(&format!("{key}.max_connections"), apns.max_connections)?;
    at_least_one(&format!("{key}.idle_timeout_secs"), apns.idle_timeout_secs)?;
    at_least_one(
        &format!("{key}.request_timeout_ms"),
        apns.request_timeout_ms,
    )?;
    Ok(())
}

/// Checks that `credentials`, when set, is `"adc"` and not given with a key file.
pub fn check_fcm_credentials(key: &str, fcm: &FcmConfig) -> Result<(), ConfigError> {
    match fcm.credentials.as_deref() {
        None => Ok(()),
        Some(mode) if !mode.eq_ignore_ascii_case("adc") => Err(ConfigError::invalid(
            format!("{key}.credentials"),
            format!(
                "`{mode}` is not a credentials mode: use \"adc\" (Application Default \
                 Credentials), or credentials_file / credentials_json instead"
            ),
        )),
        Some(_) if fcm.credentials_file.is_some() || fcm.credentials_json.is_some() => {
            Err(ConfigError::invalid(
                format!("{key}.credentials"),
                "\"adc\" and a credentials_file / credentials_json exclude each other",
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Checks `[apps.<id>.fcm]` at `key`. Without `credentials_file` or `credentials_json` the app
/// uses Application Default Credentials, found when its provider is built.
pub fn validate_fcm(key: &str, fcm: &FcmConfig) -> Result<(), ConfigError> {
    check_fcm_credentials(key, fcm)?;
    if let Some(url) = &fcm.endpoint {
        require_https(&format!("{key}.endpoint"), url)?;
    }
    at_least_one(&format!("{key}.connections"), fcm.connections as u64)?;
    at_most_1000(&format!("{key}.connections"), fcm.connections)?;
    at_least_one(
        &format!("{key}.max_connections"),
        fcm.max_connections as u64,
    )?;
    at_most_1000(&format!("{key}.max_connections"), fcm.max_connections)?;
    at_least_one(&format!("{key}.idle_timeout_secs"), fcm.idle_timeout_secs)?;
    at_least_one(&format!("{key}.request_timeout_ms"), fcm.request_timeout_ms)?;
    Ok(())
}

fn at_most_1000(key: &str, value: usize) -> Result<(), ConfigError> {
    if value > 1_000 {
        return Err(ConfigError::invalid(key, "must be at most 1000"));
    }
    Ok(())
}

/// Checks that the URL set at `key` is `https://`, or `http://` to a loopback host (a local mock
/// or sidecar): credentials and device tokens never cross a network in the clear.
pub fn require_https(key: &str, url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ConfigError::invalid(key, format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if uri.host().is_some_and(is_loopback_host) => Ok(()),
        _ => Err(ConfigError::invalid(
            key,
            "must be an https:// URL (http:// is allowed only to a loopback address)",
        )),
    }
}

/// `localhost`, `127.0.0.0/8` or `::1` (as `http::Uri` gives it, possibly in brackets).
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn at_least_one(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be at least 1"));
    }
    Ok(())
}

/// Reads a file named by the setting at `key`.
pub fn read_file(key: &str, path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

/// Builds the APNs provider of `[apps.<id>.apns]` at `key`.
pub fn build_apns(key: &str, apns: &ApnsConfig) -> Result<ApnsProvider, ConfigError> {
    let pem = match (&apns.key_pem, &apns.key_file) {
        (Some(pem), _) => pem.clone(),
        (None, Some(path)) => read_file(&format!("{key}.key_file"), path)?,
        (None, None) => {
            return Err(ConfigError::Invalid {
                key: format!("{key}.key_file"),
                reason: "missing".into(),
            });
        }
    };
    let signer = ApnsTokenSigner::new(
        &apns.key_id,
        &apns.team_id,
        pem.as_bytes(),
        Duration::from_secs(apns.token_refresh_secs),
    )
    .map_err(|e| ConfigError::Invalid {
        key: format!(
            "{key}.{}",
            if apns.key_pem.is_some() {
                "key_pem"
            } else {
                "key_file"
            }
        ),
        reason: e.to_string(),
    })?;
    let ca = match &apns.ca_file {
        Some(path) => Some(read_file(&format!("{key}.ca_file"), path)?),
        None => None,
    };
    let endpoint =
        Endpoint::parse(apns.endpoint_url(), ca.as_deref()).map_err(|e| ConfigError::Invalid {
            key: format!("{key}.endpoint"),
            reason: e.to_string(),
        })?;
    let pool = H2Pool::new(
        endpoint,
        PoolConfig {
            name: format!("apns:{}:{}", apns.team_id, apns.key_id),
            connections: apns.connections,
            max_connections: apns.max_connections.max(apns.connections),
            idle_timeout: Duration::from_secs(apns.idle_timeout_secs),
            request_timeout: Duration::from_millis(apns.request_timeout_ms),
            initial_max_streams: 1,
            single_stream_until_success: true,
            ..PoolConfig::default()
        },
    );
    Ok(ApnsProvider::new(pool, signer, Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::require_https;

    #[test]
    fn endpoints_are_https_except_on_loopback() {
        for ok in [
            "https://api.push.apple.com",
            "https://10.0.0.1:443",
            "http://127.0.0.1:8080",
            "http://127.9.9.9",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert!(require_https("k", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://api.push.apple.com",
            "http://10.0.0.1",
            "http://localhost.evil.example",
            "ftp://127.0.0.1",
            "127.0.0.1:80",
        ] {
            let err = require_https("apps.a.apns.endpoint", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("apps.a.apns.endpoint"), "{bad}: {err}");
        }
    }
}
