//! Prometheus metrics of the gateway, with units in their names.
//!
//! Most are counters, gauges and histograms the stages update as they work. What lives in other
//! objects (a provider's connection pool, a credential's refresh counters) is read at scrape time
//! instead: the wiring registers a [`Sampler`] that fills [`Samples`], and a collector turns them
//! into families, so the providers need not know this module's registry.

use std::sync::Arc;

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A provider connection pool at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSample {
    /// `apns` or `fcm`.
    pub provider: &'static str,
    /// The pool's name (`apns:<team>:<key>`, `fcm:<app>`); one pool may serve several apps.
    pub pool: String,
    /// Connections open now.
    pub open: u64,
    /// Connections established since start (first ones, reconnects and extra ones).
    pub opened: u64,
    /// Connections the server ended: a GOAWAY (or an orderly close) received.
    pub goaways: u64,
    /// Connections re-established after one was lost.
    pub reconnects: u64,
}

/// A credential's token refreshes at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialSample {
    /// `apns` or `fcm`.
    pub provider: &'static str,
    /// The pool the credential signs for (same names as [`PoolSample::pool`]).
    pub pool: String,
    /// `jwt` (APNs provider token, signed here) or `oauth` (FCM access token, fetched).
    pub kind: &'static str,
    /// Tokens obtained (signed or issued).
    pub refreshes: u64,
    /// Refreshes that produced no token (after their retries).
    pub failures: u64,
}

/// What samplers report at one scrape.
#[derive(Debug, Default)]
pub struct Samples {
    pub pools: Vec<PoolSample>,
    pub credentials: Vec<CredentialSample>,
}

impl Samples {
    /// Adds a pool unless one of that name is already in (pools shared by apps appear once).
    pub fn pool(&mut self, sample: PoolSample) {
        if !self.pools.iter().any(|p| p.pool == sample.pool) {
            self.pools.push(sample);
        }
    }

    /// Adds a credential unless one of that pool and kind is already in.
    pub fn credential(&mut self, sample: CredentialSample) {
        if !self
            .credentials
            .iter()
            .any(|c| c.pool == sample.pool && c.kind == sample.kind)
        {
            self.credentials.push(sample);
        }
    }
}

/// Fills [`Samples`] at scrape time (and may set gauges it holds).
pub type Sampler = Arc<dyn Fn(&mut Samples) + Send + Sync>;

/// Turns the samplers' figures into metric families at each scrape.
#[derive(Default)]
struct SampledCollector {
    samplers: Arc<RwLock<Vec<Sampler>>>,
}

impl std::fmt::Debug for SampledCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampledCollector").finish_non_exhaustive()
    }
}

impl Collector for SampledCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut samples = Samples::default();
        for sampler in self.samplers.read().iter() {
            sampler(&mut samples);
        }
        let pool_labels = |p: &PoolSample| {
            [
                ("provider", p.provider.to_string()),
                ("pool", p.pool.clone()),
            ]
        };
        type PoolFigure = (
            &'static str,
            &'static str,
            MetricType,
            fn(&PoolSample) -> u64,
        );
        const POOL_FIGURES: [PoolFigure; 4] = [
            (
                "provider_connections_open",
                "Provider connections open now, per pool",
                MetricType::Gauge,
                |p| p.open,
            ),
            (
                "provider_connections_opened",
                "Provider connections established, per pool",
                MetricType::Counter,
                |p| p.opened,
            ),
            (
                "provider_goaways_received",
                "Provider connections ended by the server (GOAWAY or orderly close), per pool",
                MetricType::Counter,
                |p| p.goaways,
            ),
            (
                "provider_reconnects",
                "Provider connections re-established after one was lost, per pool",
                MetricType::Counter,
                |p| p.reconnects,
            ),
        ];
        for (name, help, kind, value) in POOL_FIGURES {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for pool in &samples.pools {
                let labels = pool_labels(pool);
                let metric = family.encode_family(&labels)?;
                match kind {
                    MetricType::Gauge => {
                        ConstGauge::new(i64::try_from(value(pool)).unwrap_or(i64::MAX))
                            .encode(metric)?
                    }
                    _ => ConstCounter::new(value(pool)).encode(metric)?,
                }
            }
        }
        let credential_labels = |c: &CredentialSample| {
            [
                ("provider", c.provider.to_string()),
                ("pool", c.pool.clone()),
                ("kind", c.kind.to_string()),
            ]
        };
        type CredentialFigure = (&'static str, &'static str, fn(&CredentialSample) -> u64);
        const CREDENTIAL_FIGURES: [CredentialFigure; 2] = [
            (
                "token_refreshes",
                "Provider tokens obtained: APNs JWTs signed (kind=jwt), FCM OAuth tokens fetched (kind=oauth)",
                |c| c.refreshes,
            ),
            (
                "token_refresh_failures",
                "Token refreshes that produced no token, after their retries",
                |c| c.failures,
            ),
        ];
        for (name, help, value) in CREDENTIAL_FIGURES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for credential in &samples.credentials {
                let labels = credential_labels(credential);
                ConstCounter::new(value(credential)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Redis client figures, handed to the Redis client at start.
#[derive(Clone, Debug)]
pub struct RedisMetrics {
    /// Redis calls that failed (errors, timeouts, unreachable).
    pub errors: Counter,
    /// Round trip of the health PING, every 250 ms.
    pub ping_seconds: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub app: String,
    pub provider: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub app: String,
    pub decision: String,
}

/// An HTTP/JSON API request: the matched route template (`/v1/apps/{app_id}/batches`, never the
/// raw path, so a label cannot take a value per app or per probe of the port), the method, and
/// the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

/// [`HttpLabels`] without the status (the duration histogram's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// Counter handles of a `{app, provider, outcome}` family, cached by key so the per-message
/// path does not build three label strings and hash them for every increment.
#[derive(Default)]
pub struct OutcomeCounters {
    family: Family<OutcomeLabels, Counter>,
    cache: dashmap::DashMap<(std::sync::Arc<str>, &'static str, &'static str), Counter>,
}

impl OutcomeCounters {
    /// Increments the counter of (`app`, `provider`, `outcome`).
    pub fn inc(&self, app: &std::sync::Arc<str>, provider: &'static str, outcome: &'static str) {
        let key = (std::sync::Arc::clone(app), provider, outcome);
        if let Some(counter) = self.cache.get(&key) {
            counter.inc();
            return;
        }
        let counter = self
            .family
            .get_or_create(&OutcomeLabels {
                app: app.to_string(),
                provider: provider.to_string(),
                outcome: outcome.to_string(),
            })
            .clone();
        counter.inc();
        self.cache.insert(key, counter);
    }

    /// The current value (tests).
    pub fn get(&self, app: &str, provider: &str, outcome: &str) -> u64 {
        self.family
            .get_or_create(&OutcomeLabels {
                app: app.to_string(),
                provider: provider.to_string(),
                outcome: outcome.to_string(),
            })
            .get()
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Recipients accepted for delivery.
    pub accepted: Family<AppLabels, Counter>,
    /// Recipients rejected at validation.
    pub rejected_at_ingest: Family<AppLabels, Counter>,
    /// Receipts emitted, terminal and not, by status.
    pub receipts: OutcomeCounters,
    /// Provider attempts by their outcome.
    pub deliveries: OutcomeCounters,
    /// Provider request latency.
    pub delivery_seconds: Family<ProviderLabels, Histogram>,
    /// The `delivery_seconds` handles of APNs and FCM, resolved once.
    delivery_seconds_by_platform: [Histogram; 2],
    /// Accepted messages without a terminal receipt yet.
    pub in_flight: Gauge,
    /// Messages waiting in the retry queue.
    pub retry_queue_depth: Gauge,
    /// Messages finalized by the drop guard instead of by the pipeline: a gateway bug. Tests
    /// assert this stays 0.
    pub unresolved_drops: Counter,
    /// Durable delivery: messages claimed from an expired lease (their replica crashed or
    /// stalled), so possibly attempted twice.
    pub redis_reclaimed: Counter,
    /// Time messages waited in the limit stage (rate, fairness, concurrency), per app.
    pub rate_limit_wait_seconds: Family<AppLabels, Histogram>,
    /// Messages waiting in the limit stage's queues, per app.
    pub scheduler_queue_depth: Family<AppLabels, Gauge>,
    /// Redis calls that failed.
    pub redis_errors: Counter,
    /// Round trip of Redis's health PING.
    pub redis_ping_seconds: Histogram,
    samplers: Arc<RwLock<Vec<Sampler>>>,
    /// What the policy stage decided, per app: `send`, `opted_out`, `quiet_hours`,
    /// `suppressed`, `frequency_cap`, `unavailable` (policy state unreachable).
    pub policy_decisions: Family<DecisionLabels, Counter>,
    /// HTTP/JSON API requests answered, by route template, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Time from an HTTP/JSON API request to its response head, by route template and method
    /// (a receipts stream's body then lasts as long as its caller wants).
    pub http_request_seconds: Family<HttpRouteLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pushgate");
        let accepted = Family::<AppLabels, Counter>::default();
        registry.register(
            "accepted",
            "Recipients accepted for delivery",
            accepted.clone(),
        );
        let rejected_at_ingest = Family::<AppLabels, Counter>::default();
        registry.register(
            "rejected_at_ingest",
            "Recipients rejected by validation",
            rejected_at_ingest.clone(),
        );
        let receipts = OutcomeCounters::default();
        registry.register(
            "receipts",
            "Receipts emitted by status",
            receipts.family.clone(),
        );
        let deliveries = OutcomeCounters::default();
        registry.register(
            "deliveries",
            "Provider delivery attempts by outcome",
            deliveries.family.clone(),
        );
        let delivery_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "delivery_seconds",
            "Provider request latency",
            delivery_seconds.clone(),
        );
        let delivery_seconds_by_platform =
            [crate::domain::Platform::Apns, crate::domain::Platform::Fcm].map(|p| {
                delivery_seconds
                    .get_or_create(&ProviderLabels {
                        provider: p.as_str().to_string(),
                    })
                    .clone()
            });
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_messages",
            "Accepted messages without a terminal receipt",
            in_flight.clone(),
        );
        let retry_queue_depth = Gauge::default();
        registry.register(
            "retry_queue_depth_messages",
            "Messages waiting for a retry",
            retry_queue_depth.clone(),
        );
        let unresolved_drops = Counter::default();
        registry.register(
            "unresolved_drops",
            "Messages finalized by the drop guard (a gateway bug when non-zero)",
            unresolved_drops.clone(),
        );
        let redis_reclaimed = Counter::default();
        registry.register(
            "redis_reclaimed",
            "Messages claimed from an expired lease (crashed or stalled replica): possible duplicates",
            redis_reclaimed.clone(),
        );
        let rate_limit_wait_seconds = Family::<AppLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "rate_limit_wait_seconds",
            "Time messages waited in the limit stage (rate limit, fair share, concurrency)",
            rate_limit_wait_seconds.clone(),
        );
        let scheduler_queue_depth = Family::<AppLabels, Gauge>::default();
        registry.register(
            "scheduler_queue_depth",
            "Messages waiting in the limit stage's queues",
            scheduler_queue_depth.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis calls that failed (errors, timeouts, unreachable)",
            redis_errors.clone(),
        );
        let redis_ping_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "redis_ping_seconds",
            "Round trip of the Redis health PING (every 250 ms)",
            redis_ping_seconds.clone(),
        );
        let collector = SampledCollector::default();
        let samplers = Arc::clone(&collector.samplers);
        registry.register_collector(Box::new(collector));
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Policy-stage decisions per app (send, opted_out, quiet_hours, suppressed, frequency_cap, unavailable)",
            policy_decisions.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP/JSON API requests answered, by route template, method and status",
            http_requests.clone(),
        );
        let http_request_seconds =
            Family::<HttpRouteLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            });
        registry.register(
            "http_request_seconds",
            "Time from an HTTP/JSON API request to its response head",
            http_request_seconds.clone(),
        );
        Self {
            registry,
            policy_decisions,
            http_requests,
            http_request_seconds,
            accepted,
            rejected_at_ingest,
            receipts,
            deliveries,
            delivery_seconds,
            delivery_seconds_by_platform,
            in_flight,
            retry_queue_depth,
            unresolved_drops,
            redis_reclaimed,
            rate_limit_wait_seconds,
            scheduler_queue_depth,
            redis_errors,
            redis_ping_seconds,
            samplers,
        }
    }

    /// Adds a sampler, run at every scrape. It must not hold the `Metrics` (a cycle): give it
    /// the gauges it sets and weak references to what it reads.
    pub fn add_sampler(&self, sampler: Sampler) {
        self.samplers.write().push(sampler);
    }

    /// The Redis client's handles.
    pub fn redis(&self) -> RedisMetrics {
        RedisMetrics {
            errors: self.redis_errors.clone(),
            ping_seconds: self.redis_ping_seconds.clone(),
        }
    }

    /// The provider latency histogram of `platform`.
    pub fn delivery_seconds_of(&self, platform: crate::domain::Platform) -> &Histogram {
        match platform {
            crate::domain::Platform::Apns => &self.delivery_seconds_by_platform[0],
            crate::domain::Platform::Fcm => &self.delivery_seconds_by_platform[1],
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_counters_count_into_the_exported_family() {
        let metrics = Metrics::new();
        let app: std::sync::Arc<str> = "shop".into();
        metrics.receipts.inc(&app, "apns", "delivered");
        metrics.receipts.inc(&app, "apns", "delivered");
        metrics.receipts.inc(&app, "fcm", "invalid_token");
        assert_eq!(metrics.receipts.get("shop", "apns", "delivered"), 2);
        assert_eq!(metrics.receipts.get("shop", "fcm", "invalid_token"), 1);
        metrics
            .delivery_seconds_of(crate::domain::Platform::Fcm)
            .observe(0.01);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"pushgate_receipts_total{app="shop",provider="apns",outcome="delivered"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pushgate_delivery_seconds_count{provider="fcm"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn sampled_families_are_exported_and_shared_pools_appear_once() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        for family in [
            "# TYPE pushgate_provider_connections_open gauge",
            "# TYPE pushgate_provider_goaways_received counter",
            "# TYPE pushgate_token_refreshes counter",
            "# TYPE pushgate_token_refresh_failures counter",
            "# TYPE pushgate_redis_ping_seconds histogram",
        ] {
            assert!(text.contains(family), "{family} missing from\n{text}");
        }
        let sampler: Sampler = Arc::new(|samples: &mut Samples| {
            for _ in 0..2 {
                samples.pool(PoolSample {
                    provider: "apns",
                    pool: "apns:T:K".into(),
                    open: 2,
                    opened: 3,
                    goaways: 1,
                    reconnects: 1,
                });
                samples.credential(CredentialSample {
                    provider: "apns",
                    pool: "apns:T:K".into(),
                    kind: "jwt",
                    refreshes: 4,
                    failures: 0,
                });
            }
        });
        metrics.add_sampler(sampler);
        let text = metrics.encode();
        for line in [
            r#"pushgate_provider_connections_open{provider="apns",pool="apns:T:K"} 2"#,
            r#"pushgate_provider_goaways_received_total{provider="apns",pool="apns:T:K"} 1"#,
            r#"pushgate_provider_reconnects_total{provider="apns",pool="apns:T:K"} 1"#,
            r#"pushgate_token_refreshes_total{provider="apns",pool="apns:T:K",kind="jwt"} 4"#,
        ] {
            assert_eq!(text.matches(line).count(), 1, "{line} in\n{text}");
        }
    }
}
