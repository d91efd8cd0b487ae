//! The app registry: every configured tenant with its render settings, retry policy and the
//! providers that reach its devices. Built from the configuration by
//! [`crate::config::Config::registry`]; it knows nothing of how it was configured.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backoff::RetryConfig;
use crate::domain::Platform;
use crate::provider::Provider;

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
