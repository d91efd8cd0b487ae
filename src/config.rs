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

use std::collections::HashMap;
use std::sync::Arc;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

pub use crate::backoff::RetryConfig;
pub use crate::config_error::ConfigError;
pub use crate::limit::LimitConfig;
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
    /// HTTP/JSON API listen address (`POST /v1/apps/{app}/batches`, receipts as SSE/NDJSON,
    /// `/openapi.json`, `/healthz`); off when absent.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Bytes of one HTTP request body, at most; unset: twice `pipeline.max_request_bytes`
    /// (JSON is about twice the size of the same protobuf).
    #[serde(default)]
    pub http_max_body_bytes: Option<usize>,
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
    /// Lets the gateway run with no API key while listening on a non-loopback address, and
    /// serves the admin RPCs to unauthenticated callers when no key exists. Off by default:
    /// without keys the gateway then only starts on a loopback address, and refuses admin RPCs.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Serves gRPC server reflection (`grpc.reflection.v1`); on by default.
    #[serde(default = "default_true")]
    pub reflection: bool,
    /// `[tls]`: TLS (and, with `client_ca_file`, mutual TLS) on the gRPC listener; plaintext
    /// when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Log lines as human-readable text (default) or one JSON object per line (log shippers).
    #[serde(default)]
    pub log_format: LogFormat,
    /// `[otlp]`: export spans to an OpenTelemetry collector; off when absent.
    #[serde(default)]
    pub otlp: Option<crate::otlp::OtlpConfig>,
    /// `[policy]`: settings of the policy stage shared by every app.
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
    /// `[ingress]`: per-API-key limits (batches and recipients per second, open streams and
    /// subscriptions).
    #[serde(default)]
    pub ingress: IngressConfig,
}

/// `[ingress]`: per-key limits; 0 turns one off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// `SendBatch` calls and `StreamSend` batches of one key per second (bursts of one
    /// second's worth).
    pub batches_per_second_per_key: u32,
    /// Recipients of one key per second, over all its batches (bursts of one second's worth,
    /// so at least `pipeline.max_batch_recipients`).
    pub recipients_per_second_per_key: u32,
    /// `StreamSend` streams of one key open at once.
    pub streams_per_key: u32,
    /// `SubscribeReceipts` subscriptions of one key open at once.
    pub subscriptions_per_key: u32,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            batches_per_second_per_key: 500,
            recipients_per_second_per_key: 200_000,
            streams_per_key: 32,
            subscriptions_per_key: 32,
        }
    }
}

impl IngressConfig {
    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self, max_batch_recipients: usize) -> Result<(), (String, String)> {
        let rate = self.recipients_per_second_per_key as usize;
        if rate != 0 && rate < max_batch_recipients {
            return Err((
                "ingress.recipients_per_second_per_key".into(),
                format!(
                    "{rate} is below pipeline.max_batch_recipients ({max_batch_recipients}): \
                     a full batch could never pass (0 turns the limit off)"
                ),
            ));
        }
        Ok(())
    }
}

/// How the gateway writes its log lines (`log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_true() -> bool {
    true
}

/// `[tls]`: the gRPC listener's certificate, and the CA its clients' certificates must chain to
/// for mutual TLS. The files are read at start and again on SIGHUP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the listener (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificate(s): when set, every client must present a certificate signed by one
    /// of them (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
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
    /// Bytes of each id a request carries (`batch_id`, `campaign_id`, and each recipient's
    /// `message_id`, `user_id`, `locale`, `timezone`, and template data keys), at most.
    pub max_id_bytes: usize,
    /// Variables of one recipient, at most.
    pub max_vars_per_recipient: usize,
    /// Bytes of one recipient's variables, keys and values together, at most.
    pub max_vars_bytes: usize,
    /// Bytes of each template text field (`title`, `subtitle`, `body`, `image_url`,
    /// `deep_link`, `sound`, `category`, `thread_id`, `android_channel_id`, each `data` value)
    /// and of a recipient's `title`/`body` override, at most. The default is the providers'
    /// payload limit: a longer field can never be delivered.
    pub max_template_field_bytes: usize,
    /// Entries of `template.data`, at most.
    pub max_template_data_entries: usize,
    /// Bytes of each raw JSON override (`apns_json`, `fcm_json`, of the template and of each
    /// recipient), at most.
    pub max_raw_json_bytes: usize,
    /// Bytes of one encoded gRPC request (a SendBatch, or one StreamSend message), at most.
    /// Unset: derived from the batch cap, `max_batch_recipients` x 2 KiB + 1 MiB (21 MiB with
    /// the defaults), so a request is refused by size before it is decoded.
    pub max_request_bytes: Option<usize>,
    /// Dead letters one `ReplayDeadLetters` may replay (its `limit` is clamped to this, and more
    /// `message_ids` than this are refused).
    pub max_replay_dead_letters: usize,
    /// Receipts queued for a `StreamSend` caller that has not read them, at most: beyond it the
    /// gateway stops reading that caller's batches (HTTP/2 flow control then slows the caller)
    /// until it reads.
    pub max_unread_receipts: usize,
    /// How long a `StreamSend` caller may leave `max_unread_receipts` receipts unread, taking
    /// none, before the gateway ends its call (RESOURCE_EXHAUSTED): a caller that went away
    /// without resetting its call would otherwise hold its stream slot, and the HTTP/2 window
    /// its unread batches take on its connection, for ever.
    pub stream_unread_timeout_secs: u64,
    /// How long after its exposure (delivery, or holdout) a conversion is attributed to a
    /// campaign; also how long exposures and tracked event ids are remembered.
    pub attribution_window_secs: u64,
    /// Exposures (and tracked event ids) kept in memory without Redis, at most.
    pub insights_max_exposures: usize,
    /// Days Redis keeps a campaign's counters after their last update.
    pub insights_retention_days: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            accept_window: 100_000,
            max_in_flight_requests: 50_000,
            dispatch_queue: 4_096,
            max_batch_recipients: 10_000,
            shutdown_grace_secs: 20,
            max_id_bytes: 256,
            max_vars_per_recipient: 64,
            max_vars_bytes: 8_192,
            max_template_field_bytes: 4_096,
            max_template_data_entries: 64,
            max_raw_json_bytes: 4_096,
            max_request_bytes: None,
            max_replay_dead_letters: 1_000,
            max_unread_receipts: 10_000,
            stream_unread_timeout_secs: 60,
            attribution_window_secs: 3 * 24 * 3600,
            insights_max_exposures: 100_000,
            insights_retention_days: 30,
        }
    }
}

/// Wire bytes allowed per recipient when `max_request_bytes` is derived.
const RECIPIENT_WIRE_BUDGET: usize = 2 << 10;
/// Wire bytes allowed for the rest of a request (template, ids) when it is derived.
const REQUEST_WIRE_OVERHEAD: usize = 1 << 20;

impl PipelineConfig {
    /// The gRPC decode limit: `max_request_bytes`, or derived from `max_batch_recipients`.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes.unwrap_or_else(|| {
            self.max_batch_recipients
                .saturating_mul(RECIPIENT_WIRE_BUDGET)
                .saturating_add(REQUEST_WIRE_OVERHEAD)
        })
    }

    /// The campaign-measurement settings.
    pub fn insights(&self) -> crate::store::insights::InsightsConfig {
        crate::store::insights::InsightsConfig {
            attribution_window: Duration::from_secs(self.attribution_window_secs),
            max_exposures: self.insights_max_exposures,
            retention: Duration::from_secs(self.insights_retention_days.saturating_mul(86_400)),
        }
    }

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
    /// API keys allowed to send for and subscribe to this app (`authorization: Bearer <key>`),
    /// each the key itself or `sha256:<64 hex digits>` (the SHA-256 digest of the key). When no
    /// app has any key (api or admin), the API is open (for development; the gateway logs a
    /// warning and refuses to listen beyond loopback unless `allow_unauthenticated = true`).
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Keys that may do what `api_keys` may and also manage the app's dead letters
    /// (`PushGatewayAdmin`). Same forms as `api_keys`.
    #[serde(default)]
    pub admin_keys: Vec<ApiKey>,
    /// Rate limits, fair-share weight and adaptive-concurrency bounds (`[apps.<id>.limits]`).
    #[serde(default)]
    pub limits: crate::limit::LimitConfig,
    /// The IANA zone of recipients without a `timezone` (quiet hours); UTC when unset.
    #[serde(default)]
    pub default_timezone: Option<String>,
    /// At most `max` sends per user in any rolling `window` (`[{ max = 3, window = "1d" }]`).
    #[serde(default)]
    pub frequency_caps: Vec<crate::policy::CapConfig>,
    /// `[apps.<id>.quiet_hours]`: no pushes in this window of the recipient's local time.
    #[serde(default)]
    pub quiet_hours: Option<crate::policy::QuietHoursConfig>,
    /// Transactional messages (HIGH priority, `bypass_policies`) reach opted-out users.
    #[serde(default)]
    pub opt_out_spares_transactional: bool,
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

/// The prefix of a key written as its digest.
const SHA256_PREFIX: &str = "sha256:";

impl ApiKey {
    /// The SHA-256 digest the key is checked against: decoded from `sha256:<hex>`, or computed
    /// from a key written in the clear. `Err` says what is wrong with the value (never quoting
    /// it).
    pub fn digest(&self) -> Result<[u8; 32], &'static str> {
        use sha2::{Digest, Sha256};
        match self.0.strip_prefix(SHA256_PREFIX) {
            Some(hex) => {
                let hex = hex.as_bytes();
                if hex.len() != 64 {
                    return Err("a `sha256:` key is followed by 64 hex digits");
                }
                let mut out = [0u8; 32];
                for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
                    let digit = |c: u8| (c as char).to_digit(16);
                    match (digit(pair[0]), digit(pair[1])) {
                        (Some(hi), Some(lo)) => *byte = (hi * 16 + lo) as u8,
                        _ => return Err("a `sha256:` key is followed by 64 hex digits"),
                    }
                }
                Ok(out)
            }
            None => {
                if self.0.len() < 16 || self.0.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(
                        "an API key is at least 16 printable characters without spaces, or `sha256:<64 hex digits>`",
                    );
                }
                Ok(Sha256::digest(self.0.as_bytes()).into())
            }
        }
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

    /// The HTTP body limit: `http_max_body_bytes`, or twice the gRPC request limit.
    pub fn http_max_body_bytes(&self) -> usize {
        self.http_max_body_bytes
            .unwrap_or_else(|| self.pipeline.max_request_bytes().saturating_mul(2))
    }

    /// Every app's delivery policies, checked (errors name the key).
    pub fn policy_settings(&self) -> Result<crate::policy::PolicySettings, ConfigError> {
        let mut apps = HashMap::new();
        for (id, app) in &self.apps {
            let c = crate::policy::AppPolicyConfig {
                default_timezone: app.default_timezone.as_deref(),
                frequency_caps: &app.frequency_caps,
                quiet_hours: app.quiet_hours.as_ref(),
                opt_out_spares_transactional: app.opt_out_spares_transactional,
            };
            let policy = crate::policy::AppPolicy::from_config(&format!("apps.{id}"), &c)
                .map_err(|e| ConfigError::invalid(e.field, e.reason))?;
            apps.insert(id.clone(), policy);
        }
        Ok(crate::policy::PolicySettings {
            apps,
            config: self.policy.clone(),
            clock: crate::domain::Clock::system(),
        })
    }

    /// True when any app has an API or admin key (the API is then authenticated).
    pub fn has_keys(&self) -> bool {
        self.apps
            .values()
            .any(|a| !a.api_keys.is_empty() || !a.admin_keys.is_empty())
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(otlp) = &self.otlp {
            otlp.validate()?;
        }
        self.redis
            .validate()
            .map_err(|(key, reason)| ConfigError::invalid(key, reason))?;
        self.ingress
            .validate(self.pipeline.max_batch_recipients)
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
            ("pipeline.max_id_bytes", p.max_id_bytes as u64),
            (
                "pipeline.max_vars_per_recipient",
                p.max_vars_per_recipient as u64,
            ),
            ("pipeline.max_vars_bytes", p.max_vars_bytes as u64),
            (
                "pipeline.max_template_field_bytes",
                p.max_template_field_bytes as u64,
            ),
            (
                "pipeline.max_template_data_entries",
                p.max_template_data_entries as u64,
            ),
            ("pipeline.max_raw_json_bytes", p.max_raw_json_bytes as u64),
            (
                "pipeline.attribution_window_secs",
                p.attribution_window_secs,
            ),
            (
                "pipeline.insights_max_exposures",
                p.insights_max_exposures as u64,
            ),
            (
                "pipeline.insights_retention_days",
                p.insights_retention_days,
            ),
            ("pipeline.max_request_bytes", p.max_request_bytes() as u64),
            (
                "pipeline.max_replay_dead_letters",
                p.max_replay_dead_letters as u64,
            ),
            ("pipeline.max_unread_receipts", p.max_unread_receipts as u64),
            (
                "pipeline.stream_unread_timeout_secs",
                p.stream_unread_timeout_secs,
            ),
        ] {
            at_least_one(key, value)?;
        }
        validate_retry("retry", &self.retry)?;
        at_least_one(
            "policy.suppression_ttl_days",
            self.policy.suppression_ttl_days,
        )?;
        self.policy_settings()?;
        if !self.listen.ip().is_loopback() && !self.has_keys() && !self.allow_unauthenticated {
            return Err(ConfigError::invalid(
                "listen",
                format!(
                    "{} is not a loopback address and no API key is configured: anyone who \
                     reaches it could send for every app; set apps.<id>.api_keys (or \
                     admin_keys), or allow_unauthenticated = true to run open on purpose",
                    self.listen
                ),
            ));
        }
        if let Some(http) = self.http_listen
            && !http.ip().is_loopback()
            && !self.has_keys()
            && !self.allow_unauthenticated
        {
            return Err(ConfigError::invalid(
                "http_listen",
                format!(
                    "{http} is not a loopback address and no API key is configured; set \
                     apps.<id>.api_keys, or allow_unauthenticated = true"
                ),
            ));
        }
        at_least_one("http_max_body_bytes", self.http_max_body_bytes() as u64)?;
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
            for (list, keys) in [("api_keys", &app.api_keys), ("admin_keys", &app.admin_keys)] {
                for (i, key) in keys.iter().enumerate() {
                    key.digest().map_err(|reason| {
                        ConfigError::invalid(format!("{prefix}.{list}[{i}]"), reason)
                    })?;
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
