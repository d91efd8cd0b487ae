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
//! - [`Limits`]: the shared, live-updatable limit settings (`Gateway::update_limits`, SIGHUP),
//!   and the number of replicas sharing every rate (each applies `1/n` of it; the store counts
//!   the replicas, see `store::redis::replicas`).

pub mod aimd;
pub mod queues;
pub mod rate;
pub mod scheduler;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::config_error::ConfigError;
use crate::domain::Platform;

pub use aimd::Aimd;
pub use queues::Slot;
pub use scheduler::Scheduler;

/// Default adaptive-concurrency start per (app, provider).
pub const DEFAULT_INITIAL_CONCURRENCY: usize = 100;
/// Default adaptive-concurrency ceiling per (app, provider).
pub const DEFAULT_MAX_CONCURRENCY: usize = 25_000;
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
    /// Messages of this app that may wait in the limit stage at once (not yet sent a first
    /// time); ingest of this app waits beyond it, so one rate-limited app cannot fill the
    /// shared accept window. Default: half of `pipeline.accept_window`.
    pub max_queued: Option<usize>,
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
            max_queued: None,
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

    /// This replica's share when `replicas` replicas split the rate evenly.
    pub fn shared(self, replicas: u32) -> Self {
        let n = replicas.max(1);
        Self {
            per_second: self.per_second / f64::from(n),
            burst: self.burst.div_ceil(n).max(1),
        }
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
        if self.max_queued == Some(0) {
            return Err(invalid("max_queued", "must be at least 1"));
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
    /// Times the limit was halved because the provider answered 429/503.
    pub backpressure_decreases: u64,
}

/// The live limit settings of every app, shared by the scheduler and whoever updates them.
#[derive(Default)]
pub struct Limits {
    /// Most jobs the scheduler holds; 0 means unbounded (see [`Limits::with_queue_bound`]).
    queue_bound: usize,
    /// `max_queued` of apps that do not set it; 0 means unbounded.
    default_max_queued: usize,
    /// Per app: messages admitted at ingest and not yet sent a first time.
    waiting: DashMap<Arc<str>, Arc<Waiting>>,
    /// Live replicas sharing every rate (0 and 1 mean alone).
    replicas: std::sync::atomic::AtomicU32,
    configs: RwLock<HashMap<String, LimitConfig>>,
    controllers: DashMap<(Arc<str>, Platform), Arc<Mutex<Aimd>>>,
    version: AtomicU64,
    changed: Notify,
}

impl Limits {
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits whose scheduler stops reading the dispatch channel while it holds `bound` jobs.
    /// Jobs admitted through the accept window never reach it (they are at most the window);
    /// it bounds jobs that hold no window slot (e.g. claimed from a durable queue).
    /// `default_max_queued` applies to apps without `max_queued`.
    pub fn with_queue_bound(bound: usize, default_max_queued: usize) -> Self {
        Self {
            queue_bound: bound,
            default_max_queued,
            ..Self::default()
        }
    }

    /// Waits until `app` may have one more message waiting in the limit stage, and counts it.
    /// The count drops when the scheduler sends the message a first time (or it expires or is
    /// failed), or when the returned [`Admission`] is dropped without [`Admission::commit`].
    pub async fn admit(&self, app: &Arc<str>) -> Admission {
        let cap = self.max_queued(app);
        let waiting = Arc::clone(
            self.waiting
                .entry(Arc::clone(app))
                .or_insert_with(|| Arc::new(Waiting::default()))
                .value(),
        );
        loop {
            let freed = waiting.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let taken = waiting
                .count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok();
            if taken {
                return Admission {
                    waiting: Some(Arc::clone(&waiting)),
                };
            }
            freed.await;
        }
    }

    /// True when `app` may have one more message waiting in the limit stage now (what
    /// [`Limits::admit`] would take without waiting), without taking it.
    pub fn has_room(&self, app: &str) -> bool {
        self.waiting(app) < self.max_queued(app)
    }

    fn max_queued(&self, app: &str) -> usize {
        match self.get(app).max_queued {
            Some(cap) => cap,
            None if self.default_max_queued > 0 => self.default_max_queued,
            None => usize::MAX,
        }
    }

    /// Messages of `app` admitted and not yet sent a first time.
    pub fn waiting(&self, app: &str) -> usize {
        self.waiting
            .get(app)
            .map_or(0, |w| w.count.load(Ordering::Acquire))
    }

    /// A message admitted by [`Limits::admit`] left the limit stage's queue.
    pub(crate) fn left_queue(&self, app: &str) {
        if let Some(w) = self.waiting.get(app) {
            w.release();
        }
    }

    /// See [`Limits::with_queue_bound`]; `usize::MAX` when unbounded.
    pub fn queue_bound(&self) -> usize {
        if self.queue_bound == 0 {
            usize::MAX
        } else {
            self.queue_bound
        }
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

    /// Sets how many replicas share every app's rate (from [`cluster`]).
    pub fn set_replicas(&self, n: u32) {
        if self.replicas.swap(n, Ordering::AcqRel) != n {
            self.version.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }

    /// Replicas sharing every app's rate (1 when alone).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Acquire).max(1)
    }

    /// This replica's rate for `platform` under `config`.
    pub fn local_rate(&self, config: &LimitConfig, platform: Platform) -> Option<Rate> {
        config.rate(platform).map(|r| r.shared(self.replicas()))
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
                backpressure_decreases: c.backpressure_decreases(),
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

/// One app's count of messages waiting in the limit stage.
#[derive(Default)]
struct Waiting {
    count: std::sync::atomic::AtomicUsize,
    freed: Notify,
}

impl Waiting {
    fn release(&self) {
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.freed.notify_one();
    }
}

/// One message's place among its app's waiting messages (see [`Limits::admit`]).
pub struct Admission {
    waiting: Option<Arc<Waiting>>,
}

impl Admission {
    /// The message is in the dispatch channel: the scheduler releases the place from now on.
    pub fn commit(mut self) {
        self.waiting = None;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(w) = self.waiting.take() {
            w.release();
        }
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

    #[tokio::test(start_paused = true)]
    async fn admission_caps_an_apps_waiting_messages() {
        let limits = Arc::new(Limits::with_queue_bound(100, 2));
        let app: Arc<str> = "a".into();
        limits.admit(&app).await.commit();
        let uncommitted = limits.admit(&app).await;
        assert_eq!(limits.waiting("a"), 2);
        let third = tokio::spawn({
            let (limits, app) = (Arc::clone(&limits), Arc::clone(&app));
            async move { limits.admit(&app).await.commit() }
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!third.is_finished(), "a third waits for a place");
        // The scheduler sent the committed one: its place goes to the third.
        limits.left_queue("a");
        third.await.unwrap();
        assert_eq!(limits.waiting("a"), 2);
        assert!(
            !limits.has_room("a"),
            "full, and asking did not take a place"
        );
        assert_eq!(limits.waiting("a"), 2);
        // An admission dropped uncommitted (shutdown at ingest) gives its place back.
        drop(uncommitted);
        assert!(limits.has_room("a"));
        assert_eq!(limits.waiting("a"), 1);
        // Another app is not affected.
        let other: Arc<str> = "b".into();
        limits.admit(&other).await.commit();
        assert_eq!(limits.waiting("b"), 1);
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
