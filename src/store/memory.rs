//! The in-memory store, the embedded default (demo, development): accepted messages go straight
//! to the limit stage, retries wait in a heap ordered by due time until a pump task feeds them
//! back. Not crash-safe: what it holds is lost with the process (each message still gets a
//! terminal receipt on an orderly shutdown). No idempotency window, no receipts feed, no dead
//! letters: those need a store that outlives the process.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    AcceptError, DeadLetters, Earlier, FeedError, FeedFilter, ReceiptFeed, Scheduled, Store,
    StoreError, StoreStats,
};
use crate::domain::{Receipt, ReceiptStatus};
use crate::metrics::Metrics;
use crate::receipts::{ReceiptObserver, Resolution};
use crate::work::{Job, Waiting, Work};

const SHUT_DOWN: &str = "gateway shut down before the retry was attempted";

struct Entry {
    due: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // Reversed: BinaryHeap is a max-heap and we want the earliest due first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .due
            .cmp(&self.due)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// The in-memory store: a retry heap and its pump task. See the module docs.
pub struct MemoryStore {
    heap: Mutex<BinaryHeap<Entry>>,
    seq: AtomicU64,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Set (under the heap lock) when the pump has ended; later jobs are failed at once.
    stopped: AtomicBool,
    /// Always healthy; kept so that [`Store::health`] has something to follow.
    health: watch::Sender<bool>,
    scheduled: AtomicU64,
    claimed: AtomicU64,
    dead_lettered: AtomicU64,
}

impl MemoryStore {
    /// Starts the pump that feeds due retries into `dispatch` (the limit stage's input). When
    /// `stop` fires, every waiting retry is resolved FAILED (the gateway is shutting down) and
    /// the pump ends.
    pub fn start(
        dispatch: mpsc::Sender<Work>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let queue = Arc::new(Self {
            heap: Mutex::new(BinaryHeap::new()),
            seq: AtomicU64::new(0),
            wake: Notify::new(),
            metrics,
            stopped: AtomicBool::new(false),
            health: watch::channel(true).0,
            scheduled: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
        });
        let pump = Arc::clone(&queue);
        tokio::spawn(async move { pump.pump(dispatch, stop).await });
        queue
    }

    /// The due time of the earliest waiting job.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.lock().peek().map(|e| e.due)
    }

    fn pop_due(&self, now: Instant) -> Option<Job> {
        let mut heap = self.heap.lock();
        if heap.peek().is_some_and(|e| e.due <= now) {
            let entry = heap.pop()?;
            self.metrics.retry_queue_depth.dec();
            self.claimed.fetch_add(1, Ordering::Relaxed);
            return Some(entry.job);
        }
        None
    }

    async fn pump(self: Arc<Self>, dispatch: mpsc::Sender<Work>, stop: CancellationToken) {
        loop {
            let wake = self.wake.notified();
            while let Some(job) = self.pop_due(Instant::now()) {
                let slot = tokio::select! {
                    biased;
                    _ = stop.cancelled() => None,
                    slot = dispatch.reserve() => slot.ok(),
                };
                match slot {
                    Some(slot) => slot.send(job.into()),
                    None => {
                        job.pending
                            .resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN));
                        break;
                    }
                }
            }
            if stop.is_cancelled() {
                break;
            }
            let next = self.next_due();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = wake => {}
                _ = async {
                    match next {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
        let drained: Vec<Entry> = {
            let mut heap = self.heap.lock();
            self.stopped.store(true, Ordering::Release);
            std::mem::take(&mut *heap).into_vec()
        };
        for entry in drained {
            self.metrics.retry_queue_depth.dec();
            entry
                .job
                .pending
                .resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN));
        }
    }
}

impl ReceiptObserver for MemoryStore {
    /// Nothing to release: a message lives only in the stages that carry it.
    fn observe(&self, _receipt: &Arc<Receipt>) {}
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn is_healthy(&self) -> bool {
        true
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    async fn claim_ids(
        &self,
        _app: &str,
        _ids: &[&str],
    ) -> Result<HashMap<String, Earlier>, StoreError> {
        Ok(HashMap::new())
    }

    async fn release_ids(&self, _app: &str, _ids: &[String]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn accept(&self, messages: Vec<Waiting>) -> Result<Vec<Work>, AcceptError> {
        Ok(messages.into_iter().map(Work::Waiting).collect())
    }

    fn park(&self, job: Job, due: Instant) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut heap = self.heap.lock();
        if self.stopped.load(Ordering::Acquire) {
            drop(heap);
            job.pending
                .resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN));
            return;
        }
        let earliest = heap.peek().is_none_or(|e| due < e.due);
        heap.push(Entry { due, seq, job });
        self.metrics.retry_queue_depth.inc();
        self.scheduled.fetch_add(1, Ordering::Relaxed);
        drop(heap);
        if earliest {
            self.wake.notify_one();
        }
    }

    async fn cancel_scheduled(&self, app: &str, which: &Scheduled) -> Result<u64, StoreError> {
        let cancelled: Vec<Entry> = {
            let mut heap = self.heap.lock();
            let (taken, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut *heap)
                .into_vec()
                .into_iter()
                .partition(|e| {
                    let m = e.job.pending.meta();
                    // Retries (attempted already) are not scheduled messages.
                    e.job.pending.attempt() == 0
                        && *m.app_id == *app
                        && which.selects(&m.campaign_id, &m.batch_id, &m.message_id, &m.user_id)
                });
            *heap = kept.into();
            taken
        };
        let n = cancelled.len() as u64;
        for entry in cancelled {
            self.metrics.retry_queue_depth.dec();
            let mut pending = entry.job.pending;
            if matches!(which, Scheduled::User(_)) {
                pending.forget_user_id();
            }
            pending.resolve(Resolution::gateway(ReceiptStatus::Dropped, which.reason()));
        }
        Ok(n)
    }

    fn dead_letter(&self, job: Job, resolution: Resolution) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        job.pending.resolve(resolution);
    }

    fn abandon(&self, work: Work, reason: &str) {
        work.resolve(Resolution::gateway(ReceiptStatus::Failed, reason));
    }

    fn parked(&self) -> usize {
        self.heap.lock().len()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            scheduled: self.scheduled.load(Ordering::Relaxed),
            claimed: self.claimed.load(Ordering::Relaxed),
            reclaimed: 0,
            acked: 0,
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            fenced: 0,
        }
    }

    fn receipts_feed(
        &self,
        _app: &str,
        _cursor: String,
        _filter: FeedFilter,
    ) -> Result<ReceiptFeed, FeedError> {
        Err(FeedError::Unsupported)
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetters> {
        None
    }

    fn live_replicas(&self) -> Option<watch::Receiver<u32>> {
        None
    }
}
