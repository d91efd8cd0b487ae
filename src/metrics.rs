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
pub struct ProviderLabels {
    pub provider: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Recipients accepted for delivery.
    pub accepted: Family<AppLabels, Counter>,
    /// Recipients rejected at validation.
    pub rejected_at_ingest: Family<AppLabels, Counter>,
    /// Receipts emitted, terminal and not, by status.
    pub receipts: Family<OutcomeLabels, Counter>,
    /// Provider attempts by their outcome.
    pub deliveries: Family<OutcomeLabels, Counter>,
    /// Provider request latency.
    pub delivery_seconds: Family<ProviderLabels, Histogram>,
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
        let receipts = Family::<OutcomeLabels, Counter>::default();
        registry.register("receipts", "Receipts emitted by status", receipts.clone());
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Provider delivery attempts by outcome",
            deliveries.clone(),
        );
        let delivery_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "delivery_seconds",
            "Provider request latency",
            delivery_seconds.clone(),
        );
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
        Self {
            registry,
            accepted,
            rejected_at_ingest,
            receipts,
            deliveries,
            delivery_seconds,
            in_flight,
            retry_queue_depth,
            unresolved_drops,
            redis_reclaimed,
            rate_limit_wait_seconds,
            scheduler_queue_depth,
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
