//! The app registry: every configured tenant with its render settings, retry policy and the
//! providers that reach its devices. Providers are shared: apps using the same APNs key (team,
//! key, endpoint) share one connection pool and one signed token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ApnsConfig, Config, ConfigError, RetryConfig};
use crate::model::Platform;
use crate::provider::Provider;
use crate::provider::apns::{ApnsProvider, jwt::ApnsTokenSigner};
use crate::provider::h2pool::{Endpoint, H2Pool, PoolConfig};

/// One tenant at run time.
pub struct AppRuntime {
    pub id: Arc<str>,
    pub apns_topic: String,
    pub apns: Option<Arc<dyn Provider>>,
    pub fcm: Option<Arc<dyn Provider>>,
    pub retry: RetryConfig,
}

impl AppRuntime {
    /// The provider for `platform`, when the app has credentials for it.
    pub fn provider(&self, platform: Platform) -> Option<&Arc<dyn Provider>> {
        match platform {
            Platform::Apns => self.apns.as_ref(),
            Platform::Fcm => self.fcm.as_ref(),
        }
    }
}

/// All tenants, by id.
pub struct AppRegistry {
    apps: HashMap<String, Arc<AppRuntime>>,
}

impl AppRegistry {
    /// Builds every app's providers. Reads key files; fails naming the key on any problem.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut apns_pools: HashMap<(String, String, String), Arc<ApnsProvider>> = HashMap::new();
        let mut apps = HashMap::new();
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
                            let p = Arc::new(build_apns(&format!("apps.{id}.apns"), apns)?);
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
            apps.insert(
                id.clone(),
                Arc::new(AppRuntime {
                    id: Arc::from(id.as_str()),
                    apns_topic: app
                        .apns
                        .as_ref()
                        .map(|a| a.topic.clone())
                        .unwrap_or_default(),
                    apns,
                    fcm,
                    retry: app.retry.clone().unwrap_or_else(|| config.retry.clone()),
                }),
            );
        }
        Ok(Self { apps })
    }

    /// A registry from ready-made runtimes (tests, benchmarks).
    pub fn from_apps(apps: impl IntoIterator<Item = AppRuntime>) -> Self {
        Self {
            apps: apps
                .into_iter()
                .map(|a| (a.id.to_string(), Arc::new(a)))
                .collect(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<AppRuntime>> {
        self.apps.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.apps.keys().map(String::as_str)
    }
}

fn read_file(key: &str, path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

fn build_apns(key: &str, apns: &ApnsConfig) -> Result<ApnsProvider, ConfigError> {
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
            request_timeout: Duration::from_millis(apns.request_timeout_ms),
            initial_max_streams: 1,
            single_stream_until_success: true,
            ..PoolConfig::default()
        },
    );
    Ok(ApnsProvider::new(pool, signer, Duration::from_secs(60)))
}
