//! Retry queue: messages waiting for their next attempt, ordered by due time.
//!
//! `RetryQueue` is the seam for the durable Redis implementation; `MemoryRetryQueue` is the
//! embedded default (demo, development). The memory queue is not crash-safe: what it holds is
//! lost with the process (each message still gets a terminal receipt on an orderly shutdown).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::ReceiptStatus;
use crate::pipeline::{Job, Work};
use crate::receipts::Resolution;

/// Parks jobs until they are due, then hands them back to the dispatcher.
pub trait RetryQueue: Send + Sync + 'static {
    /// Parks `job` until `due`.
    fn schedule(&self, job: Job, due: Instant);
    /// Ends a job whose attempts are exhausted with `resolution`. A durable queue keeps it as a
    /// dead letter (with its last error) for the admin RPCs; the default just resolves it.
    fn dead_letter(&self, job: Job, resolution: Resolution) {
        job.pending.resolve(resolution);
    }
    /// Jobs waiting.
    fn len(&self) -> usize;
    /// True when nothing waits.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

/// In-process retry queue: a heap and a pump task.
pub struct MemoryRetryQueue {
    heap: Mutex<BinaryHeap<Entry>>,
    seq: AtomicU64,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Set (under the heap lock) when the pump has ended; later jobs are failed at once.
    stopped: std::sync::atomic::AtomicBool,
}

impl MemoryRetryQueue {
    /// Starts the pump that feeds due jobs into `dispatch`. When `stop` fires, every waiting job
    /// is resolved FAILED (the gateway is shutting down) and the pump ends.
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
            stopped: Default::default(),
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
                        job.pending.resolve(Resolution::gateway(
                            ReceiptStatus::Failed,
                            "gateway shut down before the retry was attempted",
                        ));
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
            entry.job.pending.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "gateway shut down before the retry was attempted",
            ));
        }
    }
}

impl RetryQueue for MemoryRetryQueue {
    fn schedule(&self, job: Job, due: Instant) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut heap = self.heap.lock();
        if self.stopped.load(Ordering::Acquire) {
            drop(heap);
            job.pending.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "gateway shut down before the retry was attempted",
            ));
            return;
        }
        let earliest = heap.peek().is_none_or(|e| due < e.due);
        heap.push(Entry { due, seq, job });
        self.metrics.retry_queue_depth.inc();
        drop(heap);
        if earliest {
            self.wake.notify_one();
        }
    }

    fn len(&self) -> usize {
        self.heap.lock().len()
    }
}
