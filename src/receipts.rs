//! Receipt stage: every accepted message ends in exactly one terminal receipt, and every receipt
//! passes through one hub.
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
//! work: memory stays bounded by the window. Recipients refused at ingest get their REJECTED
//! receipt from [`ReceiptHub::refuse`], so subscribers and metrics see them too.
//!
//! [`InFlight`] counts accepted messages without a terminal receipt; shutdown waits on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::{Notify, OwnedSemaphorePermit, broadcast, mpsc};

use crate::domain::{MessageMeta, Receipt, ReceiptStatus};
use crate::metrics::Metrics;

pub use crate::domain::Resolution;

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

/// Sees every receipt the hub publishes (a durable store: lease acks, receipt stream).
pub trait ReceiptObserver: Send + Sync {
    fn observe(&self, receipt: &Arc<Receipt>);
}

/// Accepted messages that still owe their terminal receipt, with a signal when none do. Also
/// mirrored on the `pushgate_in_flight_messages` gauge.
pub struct InFlight {
    count: AtomicUsize,
    drained: Notify,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl InFlight {
    fn new(metrics: &Metrics) -> Self {
        Self {
            count: AtomicUsize::new(0),
            drained: Notify::new(),
            gauge: metrics.in_flight.clone(),
        }
    }

    /// Counts one more accepted message.
    pub fn enter(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
    }

    /// Counts a message as done (terminal receipt, or handed off to another replica).
    pub fn leave(&self) {
        self.gauge.dec();
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Messages in flight now.
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no message is in flight, at most `limit`; true when drained.
    pub async fn wait_drained(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.get() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return self.get() == 0;
            }
        }
    }
}

/// Fans receipts out to the subscribers of each app; every receipt passes here.
pub struct ReceiptHub {
    apps: DashMap<Arc<str>, broadcast::Sender<Arc<Receipt>>>,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    closed: AtomicBool,
    observers: parking_lot::RwLock<Vec<Arc<dyn ReceiptObserver>>>,
}

impl ReceiptHub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            apps: DashMap::new(),
            in_flight: InFlight::new(&metrics),
            metrics,
            closed: AtomicBool::new(false),
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
        self.closed.store(true, Ordering::Release);
        self.apps.clear();
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Accepted messages without a terminal receipt.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Subscribes to every receipt of `app` emitted from now on.
    pub fn subscribe(&self, app: &str) -> broadcast::Receiver<Arc<Receipt>> {
        if self.closed.load(Ordering::Acquire) {
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

    /// Publishes the receipt of a recipient that was refused at ingest and never entered the
    /// gateway (bad input, a duplicate id, shutdown, a store outage), and returns it for the
    /// caller.
    pub fn refuse(&self, meta: Arc<MessageMeta>, resolution: Resolution) -> Arc<Receipt> {
        let mut receipt = Receipt::new(meta, 0, resolution, None);
        receipt.accepted = false;
        let receipt = Arc::new(receipt);
        self.publish(&receipt);
        receipt
    }

    /// Publishes the terminal receipt of a message accepted and ended by policy before it
    /// entered the pipeline (a holdout recipient: DROPPED, never sent), and returns it for the
    /// caller. It is marked accepted, so a durable store records its outcome for idempotent
    /// resends; no stage holds anything of it, and it never counted as in flight.
    pub fn decline(&self, meta: Arc<MessageMeta>, resolution: Resolution) -> Arc<Receipt> {
        let receipt = Arc::new(Receipt::new(meta, 0, resolution, None));
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
        hub.in_flight.enter();
        Self::accepted_earlier(meta, sink, hub, permit)
    }

    /// The handle of a message that was counted in flight when it was accepted in compact form
    /// ([`crate::work::Waiting`]) and is now taking its place.
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

    /// A message taken over from a durable store after a crash or restart, or on another
    /// replica: its original caller is gone, so its receipts go to the app's subscribers only.
    pub fn detached(meta: Arc<MessageMeta>, hub: Arc<ReceiptHub>, attempt: u32) -> Self {
        let mut pending = Self::new(meta, None, hub, None);
        pending.attempt = attempt;
        pending
    }

    /// Releases the handle without a terminal receipt, because the message lives on durably
    /// (in the store at shutdown): whichever replica finishes it emits the terminal receipt.
    pub fn hand_off(mut self) {
        self.resolved = true;
        self.hub.in_flight.leave();
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
        let resolution = Resolution {
            provider_status,
            ..Resolution::gateway(ReceiptStatus::Retrying, reason)
        };
        let receipt = Arc::new(Receipt::new(
            Arc::clone(&self.meta),
            self.attempt,
            resolution,
            Some(next_attempt_at),
        ));
        self.hub.publish(&receipt);
        if let Some(sink) = &self.sink {
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
    }

    /// Sets the message aside until `due`: emits a non-terminal SCHEDULED receipt (to the caller
    /// and the subscribers), then lets go of the caller's sink and window slot, because a
    /// scheduled message may wait for days: its terminal receipt goes to the app's subscribers
    /// (and, with Redis, the receipts stream). Its ttl counts from `due`.
    pub fn schedule(&mut self, due: SystemTime) {
        let accepted_at = self.meta.accepted_at;
        let expires_at = self
            .meta
            .expires_at
            .map(|e| due + e.duration_since(accepted_at).unwrap_or_default());
        self.set_aside(due, expires_at, "scheduled");
    }

    /// Sets a message that came due aside again until `due` (quiet hours began meanwhile, say):
    /// a new SCHEDULED receipt tells the subscribers when it will go, and its expiry moves by
    /// the wait, so the ttl still counts from when it is sent. `now` is when it came due.
    pub fn defer(&mut self, due: SystemTime, now: SystemTime) {
        let wait = due.duration_since(now).unwrap_or_default();
        let expires_at = self.meta.expires_at.map(|e| e + wait);
        self.set_aside(due, expires_at, "deferred");
    }

    /// [`Pending::schedule`] and [`Pending::defer`]: the new expiry, the SCHEDULED receipt, and
    /// the caller's sink and window slot let go.
    fn set_aside(&mut self, due: SystemTime, expires_at: Option<SystemTime>, reason: &str) {
        if expires_at != self.meta.expires_at {
            let mut meta = (*self.meta).clone();
            meta.expires_at = expires_at;
            self.meta = Arc::new(meta);
        }
        let receipt = Arc::new(Receipt::new(
            Arc::clone(&self.meta),
            self.attempt,
            Resolution::gateway(ReceiptStatus::Scheduled, reason),
            Some(due),
        ));
        self.hub.publish(&receipt);
        if let Some(sink) = self.sink.take() {
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
        self.permit = None;
    }

    /// Blanks the user id its receipts carry (the user was erased, ForgetUser).
    pub fn forget_user_id(&mut self) {
        let mut meta = (*self.meta).clone();
        meta.user_id.clear();
        self.meta = Arc::new(meta);
    }

    /// Emits the terminal receipt. Consumes the handle, so it can happen once.
    pub fn resolve(mut self, resolution: Resolution) {
        self.finish(resolution);
    }

    /// Emits the terminal receipt of a message that turned out not to be accepted after all
    /// (the store could not make it safe), marked `accepted = false` like a refusal at ingest:
    /// a store records no outcome for it and releases nothing of it.
    pub fn resolve_unaccepted(mut self, resolution: Resolution) {
        self.finish_marked(resolution, false);
    }

    fn finish(&mut self, resolution: Resolution) {
        self.finish_marked(resolution, true);
    }

    fn finish_marked(&mut self, resolution: Resolution, accepted: bool) {
        self.resolved = true;
        let mut receipt = Receipt::new(Arc::clone(&self.meta), self.attempt, resolution, None);
        receipt.accepted = accepted;
        let receipt = Arc::new(receipt);
        self.hub.publish(&receipt);
        self.hub.in_flight.leave();
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
    use crate::domain::{Platform, Priority};

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
            content: Default::default(),
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
        assert_eq!(hub.in_flight().get(), 0);
    }

    /// A scheduled message deferred again when due: a second SCHEDULED receipt names the new
    /// time, and the expiry moves with the wait (the ttl counts from the send).
    #[test]
    fn a_deferred_message_is_rescheduled_with_its_ttl_kept() {
        let hub = Arc::new(ReceiptHub::new(Arc::new(Metrics::new())));
        let mut sub = hub.subscribe("app");
        let accepted = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Duration::from_secs(3_600);
        let mut meta = (*meta()).clone();
        meta.accepted_at = accepted;
        meta.expires_at = Some(accepted + ttl);
        let mut p = Pending::new(Arc::new(meta), None, Arc::clone(&hub), None);
        let first_due = accepted + Duration::from_secs(600);
        p.schedule(first_due);
        assert_eq!(p.meta().expires_at, Some(first_due + ttl));
        let second_due = first_due + Duration::from_secs(8 * 3_600);
        p.defer(second_due, first_due);
        assert_eq!(p.meta().expires_at, Some(second_due + ttl));
        let first = sub.try_recv().unwrap();
        let second = sub.try_recv().unwrap();
        assert_eq!(
            (first.status, second.status),
            (ReceiptStatus::Scheduled, ReceiptStatus::Scheduled)
        );
        assert_eq!(first.next_attempt_at, Some(first_due));
        assert_eq!(second.next_attempt_at, Some(second_due));
        assert_eq!(second.reason, "deferred");
        p.resolve(Resolution::gateway(ReceiptStatus::Delivered, ""));
        assert!(sub.try_recv().unwrap().terminal());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_is_signalled_when_the_last_message_leaves() {
        let hub = Arc::new(ReceiptHub::new(Arc::new(Metrics::new())));
        let pending = Pending::new(meta(), None, Arc::clone(&hub), None);
        assert!(!hub.in_flight().wait_drained(Duration::from_secs(1)).await);
        let waiter = tokio::spawn({
            let hub = Arc::clone(&hub);
            async move {
                hub.in_flight()
                    .wait_drained(Duration::from_secs(3600))
                    .await
            }
        });
        tokio::task::yield_now().await;
        pending.resolve(Resolution::gateway(ReceiptStatus::Delivered, ""));
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn refusals_pass_through_the_hub_and_are_marked_not_accepted() {
        let metrics = Arc::new(Metrics::new());
        let hub = ReceiptHub::new(Arc::clone(&metrics));
        let mut sub = hub.subscribe("app");
        let error = crate::domain::FieldError::new("recipients[0].device_token", "empty");
        let receipt = hub.refuse(meta(), Resolution::invalid(&error));
        assert!(!receipt.accepted);
        assert_eq!(receipt.field, "recipients[0].device_token");
        assert_eq!(sub.try_recv().unwrap().status, ReceiptStatus::Rejected);
        assert_eq!(metrics.receipts.get("app", "apns", "rejected"), 1);
        assert_eq!(hub.in_flight().get(), 0);
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
