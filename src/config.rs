//! Gateway configuration: one typed struct, loaded from a TOML file plus `PUSHGATE_` environment
//! overrides, validated at start with errors that name the offending key.
//!
//! Environment overrides use `__` between levels, e.g. `PUSHGATE_LISTEN=0.0.0.0:50051` or
//! `PUSHGATE_APPS__SHOP__APNS__KEY_ID=ABC123DEFG` (figment lower-cases the keys, so app ids
//! meant to be overridden from the environment should be lower-case).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Default retry policy; apps may override it.
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
    /// `[redis]`: durable delivery; off (in-memory queue) unless `redis.url` is set.
    #[serde(default)]
    pub redis: crate::durable::RedisConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

/// Sizes of the data path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Accepted messages without a terminal receipt, at most. When full, ingest waits (and a
    /// StreamSend caller is slowed by HTTP/2 flow control).
    pub accept_window: usize,
    /// Provider requests outstanding at once, over all providers.
    pub max_in_flight_requests: usize,
    /// Capacity of the channel between ingest and delivery.
    pub dispatch_queue: usize,
    /// Recipients in one batch, at most.
    pub max_batch_recipients: usize,
    /// How long a shutdown waits for in-flight messages before failing the rest.
    pub shutdown_grace_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            accept_window: 100_000,
            max_in_flight_requests: 8_192,
            dispatch_queue: 4_096,
            max_batch_recipients: 10_000,
            shutdown_grace_secs: 20,
        }
    }
}

impl PipelineConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// When and how often transient failures are retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff ceiling; doubles per attempt (full jitter).
    pub base_ms: u64,
    /// Largest backoff ceiling.
    pub cap_ms: u64,
    /// Provider attempts per message, including the first.
    pub max_attempts: u32,
    /// A provider's Retry-After is honoured up to this long.
    pub max_retry_after_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base_ms: 500,
            cap_ms: 60_000,
            max_attempts: 5,
            max_retry_after_secs: 3_600,
        }
    }
}

impl RetryConfig {
    pub fn base(&self) -> Duration {
        Duration::from_millis(self.base_ms)
    }
    pub fn cap(&self) -> Duration {
        Duration::from_millis(self.cap_ms)
    }
    pub fn max_retry_after(&self) -> Duration {
        Duration::from_secs(self.max_retry_after_secs)
    }
}

/// One tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    #[serde(default)]
    pub apns: Option<ApnsConfig>,
    #[serde(default)]
    pub fcm: Option<FcmConfig>,
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// API keys allowed to send for and subscribe to this app (`authorization: Bearer <key>`).
    /// When no app has any, the API is open (for development; the gateway logs a warning).
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Rate limits, fair-share weight and adaptive-concurrency bounds (`[apps.<id>.limits]`).
    #[serde(default)]
    pub limits: crate::limit::LimitConfig,
}

/// An API key; its `Debug` never shows the secret.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

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
    /// Overrides the endpoint URL (mock servers, load tests). `http://` means cleartext HTTP/2.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Extra CA certificate (PEM) to trust, for a TLS mock.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connections")]
    pub connections: usize,
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
            (None, ApnsEnvironment::Production) => crate::provider::apns::PRODUCTION_URL,
            (None, ApnsEnvironment::Sandbox) => crate::provider::apns::SANDBOX_URL,
        }
    }
}

/// FCM HTTP v1 credentials and connection settings of an app.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// Path to the service-account JSON key file.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The service-account JSON inline; wins over `credentials_file`.
    #[serde(default)]
    pub credentials_json: Option<String>,
    /// Overrides the project id from the key file.
    #[serde(default)]
    pub project_id: Option<String>,
    /// Overrides `https://fcm.googleapis.com` (mock servers, load tests).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connections")]
    pub connections: usize,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl std::fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmConfig")
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
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_token_refresh_secs() -> u64 {
    40 * 60
}

impl Config {
    /// Loads `path` (when given) and `PUSHGATE_*` environment overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Parse(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("PUSHGATE_").split("__"));
        Self::from_figment(figment)
    }

    /// Parses a TOML string (tests, embedded configs) and validates.
    pub fn from_toml(toml: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            if key.is_empty() {
                ConfigError::Parse(e.to_string())
            } else {
                ConfigError::invalid(key, e.kind.to_string())
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.redis
            .validate()
            .map_err(|(key, reason)| ConfigError::invalid(key, reason))?;
        let p = &self.pipeline;
        for (key, value) in [
            ("pipeline.accept_window", p.accept_window as u64),
            (
                "pipeline.max_in_flight_requests",
                p.max_in_flight_requests as u64,
            ),
            ("pipeline.dispatch_queue", p.dispatch_queue as u64),
            (
                "pipeline.max_batch_recipients",
                p.max_batch_recipients as u64,
            ),
        ] {
            at_least_one(key, value)?;
        }
        validate_retry("retry", &self.retry)?;
        for (id, app) in &self.apps {
            let prefix = format!("apps.{id}");
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::invalid(
                    &prefix,
                    "app ids use letters, digits, '-', '_' and '.'",
                ));
            }
            if app.apns.is_none() && app.fcm.is_none() {
                return Err(ConfigError::invalid(
                    &prefix,
                    "an app needs an [apns] or [fcm] section",
                ));
            }
            for (i, key) in app.api_keys.iter().enumerate() {
                if key.0.len() < 16 || key.0.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(ConfigError::invalid(
                        format!("{prefix}.api_keys[{i}]"),
                        "an API key is at least 16 printable characters without spaces",
                    ));
                }
            }
            if let Some(retry) = &app.retry {
                validate_retry(&format!("{prefix}.retry"), retry)?;
            }
            app.limits.validate(&format!("{prefix}.limits"))?;
            if let Some(apns) = &app.apns {
                validate_apns(&format!("{prefix}.apns"), apns)?;
            }
            if let Some(fcm) = &app.fcm {
                let key = format!("{prefix}.fcm");
                if fcm.credentials_file.is_none() && fcm.credentials_json.is_none() {
                    return Err(ConfigError::invalid(
                        format!("{key}.credentials_file"),
                        "set credentials_file or credentials_json",
                    ));
                }
                at_least_one(&format!("{key}.connections"), fcm.connections as u64)?;
                at_least_one(&format!("{key}.request_timeout_ms"), fcm.request_timeout_ms)?;
            }
        }
        Ok(())
    }
}

fn at_least_one(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be at least 1"));
    }
    Ok(())
}

fn validate_retry(key: &str, retry: &RetryConfig) -> Result<(), ConfigError> {
    at_least_one(
        &format!("{key}.max_attempts"),
        u64::from(retry.max_attempts),
    )?;
    if retry.cap_ms < retry.base_ms {
        return Err(ConfigError::invalid(
            format!("{key}.cap_ms"),
            "must be >= base_ms",
        ));
    }
    Ok(())
}

fn validate_apns(key: &str, apns: &ApnsConfig) -> Result<(), ConfigError> {
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
    at_least_one(&format!("{key}.connections"), apns.connections as u64)?;
    at_least_one(
        &format!("{key}.request_timeout_ms"),
        apns.request_timeout_ms,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
        [apps.shop.apns]
        key_pem = "x"
        key_id = "ABC123DEFG"
        team_id = "DEF123GHIJ"
        topic = "com.example.shop"
    "#;

    #[test]
    fn defaults_and_one_app() {
        let c = Config::from_toml(APP).unwrap();
        assert_eq!(c.listen, default_listen());
        let apns = c.apps["shop"].apns.as_ref().unwrap();
        assert_eq!(apns.environment, ApnsEnvironment::Production);
        assert_eq!(apns.endpoint_url(), "https://api.push.apple.com");
        assert!(!format!("{apns:?}").contains("key_pem: Some(\"x\")"));
    }

    #[test]
    fn errors_name_the_key() {
        let bad = APP.replace("ABC123DEFG", "short");
        let err = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("apps.shop.apns.key_id"), "{err}");

        let bad = format!("{APP}\nenvironment = \"staging\"");
        let err = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("apps.shop.apns.environment"), "{err}");

        let err = Config::from_toml("[pipeline]\naccept_window = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pipeline.accept_window"), "{err}");

        let err = Config::from_toml("[apps.empty]").unwrap_err().to_string();
        assert!(err.contains("apps.empty"), "{err}");

        let err = Config::from_toml("lisen = \"x\"").unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }
}
