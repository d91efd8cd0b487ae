//! Gateway configuration: one typed struct, loaded from a TOML file plus `PUSHGATE_` environment
//! overrides, validated at start with errors that name the offending key.
//!
//! Environment overrides use `__` between levels, e.g. `PUSHGATE_LISTEN=0.0.0.0:50051` or
//! `PUSHGATE_APPS__SHOP__APNS__KEY_ID=ABC123DEFG` (figment lower-cases the keys, so app ids
//! meant to be overridden from the environment should be lower-case).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Arc;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

pub use crate::backoff::RetryConfig;
pub use crate::config_error::ConfigError;
use crate::provider::Provider;
use crate::provider::apns::ApnsProvider;
pub use crate::provider::config::{ApnsConfig, ApnsEnvironment, FcmConfig};
use crate::registry::{AppRegistry, AppRuntime};

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
    pub redis: crate::store::redis::RedisConfig,
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

    /// Builds every app's providers. Providers are shared: apps using the same APNs key (team,
    /// key, endpoint) share one connection pool and one signed token. Reads key files; fails naming the key on any problem.
    pub fn registry(&self) -> Result<AppRegistry, ConfigError> {
        let config = self;
        let mut apns_pools: HashMap<(String, String, String), Arc<ApnsProvider>> = HashMap::new();
        let mut apps = Vec::new();
        for (id, app) in &config.apps {
            let apns = match &app.apns {
                Some(apns) => {
                    let key = (
                        apns.team_id.clone(),
                        apns.key_id.clone(),
                        apns.endpoint_url().to_string(),
                    );
                    let provider = match apns_pools.get(&key) {
                        Some(p) => Arc::clone(p),
                        None => {
                            let p = Arc::new(crate::provider::config::build_apns(
                                &format!("apps.{id}.apns"),
                                apns,
                            )?);
                            apns_pools.insert(key, Arc::clone(&p));
                            p
                        }
                    };
                    Some(provider as Arc<dyn Provider>)
                }
                None => None,
            };
            let fcm = match &app.fcm {
                Some(fcm) => Some(crate::provider::fcm::build(&format!("apps.{id}.fcm"), fcm)?),
                None => None,
            };
            apps.push(AppRuntime {
                id: Arc::from(id.as_str()),
                apns_topic: app
                    .apns
                    .as_ref()
                    .map(|a| a.topic.clone())
                    .unwrap_or_default(),
                apns,
                fcm,
                retry: app.retry.clone().unwrap_or_else(|| config.retry.clone()),
            });
        }
        Ok(AppRegistry::from_apps(apps))
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
                crate::provider::config::validate_apns(&format!("{prefix}.apns"), apns)?;
            }
            if let Some(fcm) = &app.fcm {
                crate::provider::config::validate_fcm(&format!("{prefix}.fcm"), fcm)?;
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
