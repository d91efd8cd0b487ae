//! Limit stage: decides *when* an accepted message may go to its provider, never whether.
//!
//! It sits between the bounded dispatch channel and the provider attempt:
//!
//! ```text
//! dispatch mpsc ──> Scheduler ──(per app: DRR over apps, HIGH lane first)──> attempt
//!                      │  per (app, provider): GCRA rate limit (governor) + AIMD concurrency
//!                      │  per campaign: optional GCRA rate carried in the request
//! ```
//!
//! - [`LimitConfig`]: `[apps.<id>.limits]`, rates per second or per minute (a per-minute rate is
//!   applied per second, with a burst), a DRR weight and the adaptive-concurrency bounds.
//! - [`queues::Queues`]: per-app queues scheduled by deficit round robin; each app has one flow
//!   per provider with a HIGH lane ahead of a bulk lane. A message waiting for its rate holds no
//!   provider permit; only the accept-window slot it took at ingest.
//! - [`aimd::Aimd`]: additive-increase / multiplicative-decrease concurrency per (app, provider),
//!   halved on 429/503 and on rising latency, like Vector's adaptive request concurrency.
//! - [`Limits`]: the shared, live-updatable limit settings (`Gateway::update_limits`, SIGHUP).
//!
//! Cluster-wide limits (sharing one app's rate across replicas through Redis) are not
//! implemented: every replica applies the configured rate on its own.

pub mod aimd;
pub mod queues;
pub mod rate;
pub mod scheduler;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::config::ConfigError;
use crate::model::Platform;

pub use aimd::{Aimd, Feedback};
pub use queues::{Next, Queues, Schedulable, Slot};
pub use scheduler::Scheduler;

/// Default adaptive-concurrency start per (app, provider).
pub const DEFAULT_INITIAL_CONCURRENCY: usize = 100;
/// Default adaptive-concurrency ceiling per (app, provider).
pub const DEFAULT_MAX_CONCURRENCY: usize = 1_000;
/// Largest accepted rate, messages per second.
const MAX_RATE_PER_SECOND: u32 = 1_000_000;

/// `[apps.<id>.limits]`: how fast and how much at once an app may send. Every key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitConfig {
    /// APNs messages per second; absent means unlimited.
    pub apns_per_second: Option<u32>,
    /// APNs messages per minute, applied per second (`n / 60` a second); exclusive with
    /// `apns_per_second`.
    pub apns_per_minute: Option<u32>,
    /// FCM messages per second; absent means unlimited.
    pub fcm_per_second: Option<u32>,
    /// FCM messages per minute, applied per second; exclusive with `fcm_per_second`.
    pub fcm_per_minute: Option<u32>,
    /// Messages that may go at once above the steady rate (per provider). Default: one second's
    /// worth of the rate (at least 1).
    pub burst: Option<u32>,
    /// Deficit-round-robin weight against other apps.
    pub weight: u32,
    /// Adaptive concurrency: provider requests in flight per (app, provider) at start.
    pub initial_concurrency: usize,
    /// Adaptive concurrency: the ceiling it grows to.
    pub max_concurrency: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            apns_per_second: None,
            apns_per_minute: None,
            fcm_per_second: None,
            fcm_per_minute: None,
            burst: None,
            weight: 1,
            initial_concurrency: DEFAULT_INITIAL_CONCURRENCY,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }
}

/// A steady rate with a burst, as the GCRA needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// `per_minute` applied per second, with one second's worth (at least 1) as burst unless
    /// `burst` says otherwise.
    pub fn per_minute(per_minute: u32, burst: Option<u32>) -> Self {
        Self::per_second_f64(f64::from(per_minute) / 60.0, burst)
    }

    fn per_second_f64(per_second: f64, burst: Option<u32>) -> Self {
        let default_burst = per_second.ceil().max(1.0).min(f64::from(u32::MAX)) as u32;
        Self {
            per_second,
            burst: burst.unwrap_or(default_burst).max(1),
        }
    }
}

impl LimitConfig {
    /// The rate for `platform`, when limited.
    pub fn rate(&self, platform: Platform) -> Option<Rate> {
        let (per_second, per_minute) = match platform {
            Platform::Apns => (self.apns_per_second, self.apns_per_minute),
            Platform::Fcm => (self.fcm_per_second, self.fcm_per_minute),
        };
        match (per_second, per_minute) {
            (Some(s), _) => Some(Rate::per_second_f64(f64::from(s), self.burst)),
            (None, Some(m)) => Some(Rate::per_minute(m, self.burst)),
            (None, None) => None,
        }
    }

    /// Checks values serde cannot; errors name the key under `prefix` (`apps.<id>.limits`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: format!("{prefix}.{key}"),
            reason: reason.into(),
        };
        for (provider, s, m) in [
            ("apns", self.apns_per_second, self.apns_per_minute),
            ("fcm", self.fcm_per_second, self.fcm_per_minute),
        ] {
            if s.is_some() && m.is_some() {
                return Err(invalid(
                    &format!("{provider}_per_minute"),
                    &format!("set {provider}_per_second or {provider}_per_minute, not both"),
                ));
            }
            if s == Some(0) {
                return Err(invalid(
                    &format!("{provider}_per_second"),
                    "must be at least 1",
                ));
            }
            if m == Some(0) {
                return Err(invalid(
                    &format!("{provider}_per_minute"),
                    "must be at least 1",
                ));
            }
            if s.is_some_and(|s| s > MAX_RATE_PER_SECOND) {
                return Err(invalid(
                    &format!("{provider}_per_second"),
                    "must be at most 1000000",
                ));
            }
        }
        if self.burst == Some(0) {
            return Err(invalid("burst", "must be at least 1"));
        }
        if !(1..=1_000).contains(&self.weight) {
            return Err(invalid("weight", "must be between 1 and 1000"));
        }
        if self.max_concurrency == 0 {
            return Err(invalid("max_concurrency", "must be at least 1"));
        }
        if self.initial_concurrency == 0 || self.initial_concurrency > self.max_concurrency {
            return Err(invalid(
                "initial_concurrency",
                "must be between 1 and max_concurrency",
            ));
        }
        Ok(())
    }
}

/// A snapshot of one (app, provider) adaptive-concurrency controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencySnapshot {
    /// Requests currently allowed in flight.
    pub limit: usize,
    /// Requests in flight now.
    pub in_flight: usize,
}

/// The live limit settings of every app, shared by the scheduler and whoever updates them.
#[derive(Default)]
pub struct Limits {
    configs: RwLock<HashMap<String, LimitConfig>>,
    controllers: DashMap<(Arc<str>, Platform), Arc<Mutex<Aimd>>>,
    version: AtomicU64,
    changed: Notify,
}

impl Limits {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces `app`'s limits; the scheduler applies them before its next decision.
    pub fn set(&self, app: &str, config: LimitConfig) {
        for platform in [Platform::Apns, Platform::Fcm] {
            if let Some(ctl) = self.controllers.get(&(Arc::from(app), platform)) {
                ctl.lock().set_max(config.max_concurrency);
            }
        }
        self.configs.write().insert(app.to_string(), config);
        self.version.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// `app`'s limits (the defaults when none were set).
    pub fn get(&self, app: &str) -> LimitConfig {
        self.configs.read().get(app).cloned().unwrap_or_default()
    }

    /// Increments whenever a limit changes.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Resolves after the next change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The adaptive-concurrency state of (`app`, `platform`), once it has carried traffic.
    pub fn concurrency(&self, app: &str, platform: Platform) -> Option<ConcurrencySnapshot> {
        self.controllers.get(&(Arc::from(app), platform)).map(|c| {
            let c = c.lock();
            ConcurrencySnapshot {
                limit: c.limit(),
                in_flight: c.in_flight(),
            }
        })
    }

    /// The controller of (`app`, `platform`), created from `config` on first use.
    fn controller(
        &self,
        app: &Arc<str>,
        platform: Platform,
        config: &LimitConfig,
    ) -> Arc<Mutex<Aimd>> {
        Arc::clone(
            self.controllers
                .entry((Arc::clone(app), platform))
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Aimd::new(
                        config.initial_concurrency,
                        config.max_concurrency,
                    )))
                })
                .value(),
        )
    }
}

/// Re-reads `path` on every SIGHUP and applies each app's `[limits]` section (apps themselves
/// are not added or removed by a reload). A config that fails to load or validate is logged and
/// the current limits stay.
pub async fn reload_on_sighup(gateway: Arc<crate::gateway::Gateway>, path: Option<PathBuf>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: limits reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match crate::config::Config::load(path.as_deref()) {
                Ok(config) => {
                    for (id, app) in &config.apps {
                        gateway.update_limits(id, app.limits.clone());
                    }
                    tracing::info!(apps = config.apps.len(), "SIGHUP: limits reloaded");
                }
                Err(error) => {
                    tracing::warn!(%error, "SIGHUP: config reload failed; limits unchanged")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (gateway, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_minute_is_applied_per_second() {
        let c = LimitConfig {
            fcm_per_minute: Some(600_000),
            ..Default::default()
        };
        let r = c.rate(Platform::Fcm).unwrap();
        assert_eq!(r.per_second, 10_000.0);
        assert_eq!(r.burst, 10_000);
        assert_eq!(c.rate(Platform::Apns), None);
        let c = LimitConfig {
            apns_per_minute: Some(30),
            ..Default::default()
        };
        assert_eq!(
            c.rate(Platform::Apns),
            Some(Rate {
                per_second: 0.5,
                burst: 1
            })
        );
    }

    #[test]
    fn validation_names_the_key() {
        let c = LimitConfig {
            apns_per_second: Some(5),
            apns_per_minute: Some(5),
            ..Default::default()
        };
        let e = c.validate("apps.a.limits").unwrap_err().to_string();
        assert!(e.contains("apps.a.limits.apns_per_minute"), "{e}");
        let c = LimitConfig {
            weight: 0,
            ..Default::default()
        };
        let e = c.validate("apps.a.limits").unwrap_err().to_string();
        assert!(e.contains("apps.a.limits.weight"), "{e}");
        let c = LimitConfig {
            initial_concurrency: 5,
            max_concurrency: 2,
            ..Default::default()
        };
        let e = c.validate("apps.a.limits").unwrap_err().to_string();
        assert!(e.contains("initial_concurrency"), "{e}");
        assert!(LimitConfig::default().validate("x").is_ok());
    }
}
