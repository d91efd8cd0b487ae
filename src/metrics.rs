//! Prometheus metrics of the gateway, with units in their names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    /// What the policy stage decided, per app: `send`, `opted_out`, `quiet_hours`,
    /// `suppressed`, `frequency_cap`, `unavailable` (policy state unreachable).
    pub policy_decisions: Family<DecisionLabels, Counter>,
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
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Policy-stage decisions per app (send, opted_out, quiet_hours, suppressed, frequency_cap, unavailable)",
            policy_decisions.clone(),
        );
        Self {
            registry,
            policy_decisions,
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
}
