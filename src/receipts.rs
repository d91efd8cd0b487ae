//! Receipt stage: every accepted message ends in exactly one terminal receipt.
//!
//! That is a property of [`Pending`]: the handle is created when a message is accepted, travels
//! with the message through every stage, and is consumed by [`Pending::resolve`]. A handle
//! dropped without being resolved (a bug, a panic, a cancelled task) still emits a terminal
//! FAILED receipt from its `Drop` and counts `pushgate_unresolved_drops_total`, which tests assert
//! stays 0. No code path can emit a second terminal receipt, because resolving consumes the handle.
//!
//! Receipts go to the caller that sent the message (its stream, or its waiting `SendBatch`), and
//! to the app's subscribers. The accept-window permit travels inside the caller's receipt until
//! the caller's stream takes it, so a caller that stops reading receipts stops being given new
//! work: memory stays bounded by the window.

use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};

use crate::metrics::Metrics;
use crate::model::{MessageMeta, Outcome, Receipt, ReceiptStatus};

/// A receipt on its way to the caller, holding the caller's window slot while it waits.
#[derive(Debug)]
pub struct ReceiptEnvelope {
    pub receipt: Arc<Receipt>,
    /// Released when the caller's stream takes the receipt.
    pub permit: Option<OwnedSemaphorePermit>,
}

/// The sender side of a caller's receipt channel. Unbounded by type, bounded in practice: every
/// terminal receipt in it holds an accept-window permit, and non-terminal receipts are bounded by
/// the attempt limit per message.
pub type CallerSink = mpsc::UnboundedSender<ReceiptEnvelope>;

/// Capacity of each app's broadcast channel for subscribers.
const SUBSCRIBER_BUFFER: usize = 16_384;

/// Sees every receipt the hub publishes (durable layer: lease acks, receipt stream).
pub trait ReceiptObserver: Send + Sync {
    fn observe(&self, receipt: &Arc<Receipt>);
}

/// Fans receipts out to the subscribers of each app.
pub struct ReceiptHub {
    apps: DashMap<Arc<str>, broadcast::Sender<Arc<Receipt>>>,
    metrics: Arc<Metrics>,
    closed: std::sync::atomic::AtomicBool,
    observers: parking_lot::RwLock<Vec<Arc<dyn ReceiptObserver>>>,
}

impl ReceiptHub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            apps: DashMap::new(),
            metrics,
            closed: Default::default(),
            observers: Default::default(),
        }
    }

    /// Adds an observer of every receipt published from now on.
    pub fn add_observer(&self, observer: Arc<dyn ReceiptObserver>) {
        self.observers.write().push(observer);
    }

    /// Ends every subscription (after the receipts already buffered for it) and refuses new
    /// ones: the last step of a shutdown, once every message has its terminal receipt.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.apps.clear();
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Subscribes to every receipt of `app` emitted from now on.
    pub fn subscribe(&self, app: &str) -> broadcast::Receiver<Arc<Receipt>> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            // A receiver whose sender is gone: the subscription ends at once.
            return broadcast::channel(1).0.subscribe();
        }
        if let Some(sender) = self.apps.get(app) {
            return sender.subscribe();
        }
        self.apps
            .entry(Arc::from(app))
            .or_insert_with(|| broadcast::channel(SUBSCRIBER_BUFFER).0)
            .subscribe()
    }

    /// Publishes the terminal REJECTED receipt of a recipient that failed validation and never
    /// entered the pipeline, and returns it for the caller.
    pub fn rejection(
        &self,
        meta: &Arc<MessageMeta>,
        error: &crate::model::FieldError,
    ) -> Arc<Receipt> {
        let receipt = Arc::new(Receipt {
            meta: Arc::clone(meta),
            status: ReceiptStatus::Rejected,
            reason: error.reason.clone(),
            field: error.field.clone(),
            provider_status: 0,
            provider_message_id: String::new(),
            attempt: 0,
            completed_at: Some(SystemTime::now()),
            next_attempt_at: None,
            token_invalid_since: None,
        });
        self.publish(&receipt);
        receipt
    }

    fn publish(&self, receipt: &Arc<Receipt>) {
        self.metrics.receipts.inc(
            &receipt.meta.app_id,
            receipt.meta.platform.as_str(),
            receipt.status.as_str(),
        );
        for observer in self.observers.read().iter() {
            observer.observe(receipt);
        }
        if let Some(sender) = self.apps.get(&*receipt.meta.app_id)
            && sender.receiver_count() > 0
        {
            let _ = sender.send(Arc::clone(receipt));
        }
    }
}

/// How a message ended.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub status: ReceiptStatus,
    pub reason: String,
    pub field: String,
    pub provider_status: u16,
    pub provider_message_id: String,
    pub token_invalid_since: Option<SystemTime>,
}

impl Resolution {
    /// A gateway-side ending with a reason.
    pub fn gateway(status: ReceiptStatus, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            field: String::new(),
            provider_status: 0,
            provider_message_id: String::new(),
            token_invalid_since: None,
        }
    }

    /// The terminal resolution of a provider outcome. `Retry` outcomes reach here only when no
    /// further attempt is possible, so they end FAILED.
    pub fn from_outcome(outcome: Outcome) -> Self {
        let mut r = Self::gateway(ReceiptStatus::Failed, "");
        match outcome {
            Outcome::Delivered {
                provider_message_id,
                status,
            } => {
                r.status = ReceiptStatus::Delivered;
                r.provider_message_id = provider_message_id;
                r.provider_status = status;
            }
            Outcome::InvalidToken {
                reason,
                status,
                invalid_since,
            } => {
                r.status = ReceiptStatus::InvalidToken;
                r.reason = reason;
                r.provider_status = status;
                r.token_invalid_since = invalid_since;
            }
            Outcome::Rejected { reason, status } => {
                r.status = ReceiptStatus::Rejected;
                r.reason = reason;
                r.provider_status = status;
            }
            Outcome::Retry { reason, status, .. } => {
                r.reason = format!("retries exhausted; last error: {reason}");
                r.provider_status = status;
            }
            Outcome::Failed { reason, status } => {
                r.reason = reason;
                r.provider_status = status;
            }
        }
        r
    }
}

/// An accepted message that still owes its terminal receipt. See the module docs.
pub struct Pending {
    meta: Arc<MessageMeta>,
    sink: Option<CallerSink>,
    hub: Arc<ReceiptHub>,
    permit: Option<OwnedSemaphorePermit>,
    attempt: u32,
    resolved: bool,
}

impl Pending {
    /// Registers an accepted message. `permit` is its accept-window slot.
    pub fn new(
        meta: Arc<MessageMeta>,
        sink: Option<CallerSink>,
        hub: Arc<ReceiptHub>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        hub.metrics.in_flight.inc();
        Self::accepted_earlier(meta, sink, hub, permit)
    }

    /// The handle of a message that was counted in flight when it was accepted in compact form
    /// ([`crate::waiting::Waiting`]) and is now taking its place.
    pub fn accepted_earlier(
        meta: Arc<MessageMeta>,
        sink: Option<CallerSink>,
        hub: Arc<ReceiptHub>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            meta,
            sink,
            hub,
            permit,
            attempt: 0,
            resolved: false,
        }
    }

    /// A message taken over from Redis after a crash or restart, or on another replica: its
    /// original caller is gone, so its receipts go to the app's subscribers only.
    pub fn detached(meta: Arc<MessageMeta>, hub: Arc<ReceiptHub>, attempt: u32) -> Self {
        let mut pending = Self::new(meta, None, hub, None);
        pending.attempt = attempt;
        pending
    }

    /// Releases the handle without a terminal receipt, because the message lives on durably
    /// (parked in Redis at shutdown): whichever replica finishes it emits the terminal receipt.
    pub fn hand_off(mut self) {
        self.resolved = true;
        self.hub.metrics.in_flight.dec();
    }

    pub fn meta(&self) -> &Arc<MessageMeta> {
        &self.meta
    }

    /// Attempts made so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Counts a new provider attempt and returns its number (1-based).
    pub fn begin_attempt(&mut self) -> u32 {
        self.attempt = self.attempt.saturating_add(1);
        self.attempt
    }

    /// Emits a non-terminal RETRYING receipt.
    pub fn retrying(&self, reason: &str, provider_status: u16, next_attempt_at: SystemTime) {
        let receipt = Arc::new(Receipt {
            meta: Arc::clone(&self.meta),
            status: ReceiptStatus::Retrying,
            reason: reason.to_string(),
            field: String::new(),
            provider_status,
            provider_message_id: String::new(),
            attempt: self.attempt,
            completed_at: None,
            next_attempt_at: Some(next_attempt_at),
            token_invalid_since: None,
        });
        self.hub.publish(&receipt);
        if let Some(sink) = &self.sink {
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
    }

    /// Emits the terminal receipt. Consumes the handle, so it can happen once.
    pub fn resolve(mut self, resolution: Resolution) {
        self.finish(resolution);
    }

    fn finish(&mut self, resolution: Resolution) {
        self.resolved = true;
        let receipt = Arc::new(Receipt {
            meta: Arc::clone(&self.meta),
            status: resolution.status,
            reason: resolution.reason,
            field: resolution.field,
            provider_status: resolution.provider_status,
            provider_message_id: resolution.provider_message_id,
            attempt: self.attempt,
            completed_at: Some(SystemTime::now()),
            next_attempt_at: None,
            token_invalid_since: resolution.token_invalid_since,
        });
        self.hub.metrics.in_flight.dec();
        self.hub.publish(&receipt);
        let permit = self.permit.take();
        if let Some(sink) = self.sink.take() {
            // If the caller is gone the receipt still reached the subscribers; the permit is
            // released with the unsent envelope.
            let _ = sink.send(ReceiptEnvelope { receipt, permit });
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("message_id", &self.meta.message_id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.resolved {
            self.hub.metrics.unresolved_drops.inc();
            tracing::error!(
                app = %self.meta.app_id,
                message_id = %self.meta.message_id,
                "message dropped inside the gateway without a receipt; emitting FAILED"
            );
            self.finish(Resolution::gateway(
                ReceiptStatus::Failed,
                "dropped inside the gateway before completion",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Platform, Priority};

    fn meta() -> Arc<MessageMeta> {
        Arc::new(MessageMeta {
            app_id: "app".into(),
            batch_id: "b".into(),
            campaign_id: "c".into(),
            message_id: "m".into(),
            platform: Platform::Apns,
            user_id: String::new(),
            priority: Priority::Default,
            accepted_at: SystemTime::now(),
            expires_at: None,
            campaign_rate_per_minute: 0,
        })
    }

    #[test]
    fn resolve_emits_exactly_one_terminal_receipt_and_releases_permit() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(ReceiptHub::new(Arc::clone(&metrics)));
        let window = Arc::new(tokio::sync::Semaphore::new(1));
        let permit = Arc::clone(&window).try_acquire_owned().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut sub = hub.subscribe("app");
        let mut p = Pending::new(meta(), Some(tx), Arc::clone(&hub), Some(permit));
        p.begin_attempt();
        p.retrying("503", 503, SystemTime::now());
        p.resolve(Resolution::gateway(ReceiptStatus::Delivered, ""));
        let first = rx.try_recv().unwrap();
        assert!(!first.receipt.terminal());
        let second = rx.try_recv().unwrap();
        assert!(second.receipt.terminal());
        assert_eq!(second.receipt.attempt, 1);
        assert!(rx.try_recv().is_err(), "no further receipts");
        assert_eq!(
            window.available_permits(),
            0,
            "permit travels with the receipt"
        );
        drop(second);
        assert_eq!(window.available_permits(), 1);
        assert_eq!(sub.try_recv().unwrap().status, ReceiptStatus::Retrying);
        assert_eq!(sub.try_recv().unwrap().status, ReceiptStatus::Delivered);
        assert_eq!(metrics.unresolved_drops.get(), 0);
        assert_eq!(metrics.in_flight.get(), 0);
    }

    #[test]
    fn dropping_unresolved_emits_failed_and_counts() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(ReceiptHub::new(Arc::clone(&metrics)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        drop(Pending::new(meta(), Some(tx), hub, None));
        let r = rx.try_recv().unwrap();
        assert_eq!(r.receipt.status, ReceiptStatus::Failed);
        assert!(r.receipt.reason.contains("dropped inside the gateway"));
        assert!(rx.try_recv().is_err());
        assert_eq!(metrics.unresolved_drops.get(), 1);
    }
}
