//! The scheduler task: reads the bounded dispatch channel into [`Queues`], and launches each
//! job when its app's turn, rate and concurrency allow and a global request permit is free.
//!
//! Memory stays bounded: every job admitted at ingest holds one slot of the gateway's accept
//! window (taken at ingest, released with its terminal receipt), retries included, so those are
//! at most `pipeline.accept_window` here. Reading the channel eagerly is what lets a small app's
//! message overtake a flooding app's backlog; a caller that outpaces its limit fills the window
//! and ingest (and StreamSend reading) waits. As a backstop for jobs that hold no window slot
//! (claimed from a durable queue), the scheduler stops reading the channel while it holds
//! [`Limits::queue_bound`] jobs (`accept_window + dispatch_queue`), so the channel backs up.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Limits;
use super::queues::{Next, Queues, Schedulable, Slot};
use crate::domain::{Platform, Priority, ReceiptStatus, Resolution};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::work::Work;

/// Why a message still queued at the hard stop ends (when the store does not keep it).
const SHUTDOWN: &str = "gateway shut down before delivery";

/// How often queued messages are checked against their ttl.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

impl Schedulable for Work {
    fn app(&self) -> &Arc<str> {
        &Work::app(self).id
    }
    fn platform(&self) -> Platform {
        Work::platform(self)
    }
    fn high_priority(&self) -> bool {
        self.priority() == Priority::High
    }
    fn campaign_limit(&self) -> Option<(&Arc<str>, u32)> {
        Work::campaign_limit(self)
    }
    fn expired(&self, now: SystemTime) -> bool {
        self.expires_at().is_some_and(|t| now >= t)
    }
}

/// Runs the limit stage for the deliver stage.
pub struct Scheduler {
    queues: Queues<Work>,
    requests: Arc<Semaphore>,
    /// Takes back what is still queued at the hard stop.
    store: Arc<dyn Store>,
    hard_stop: CancellationToken,
}

impl Scheduler {
    /// `requests` is the global in-flight request limit; at `hard_stop` whatever still waits is
    /// abandoned to `store` (failed, or handed off when the store keeps it durably).
    pub fn new(
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
        requests: Arc<Semaphore>,
        store: Arc<dyn Store>,
        hard_stop: CancellationToken,
    ) -> Self {
        Self {
            queues: Queues::new(limits, metrics),
            requests,
            store,
            hard_stop,
        }
    }

    /// Runs until `dispatch` closes and the queues are empty (or the hard stop has failed the
    /// rest). `launch` starts one provider attempt; it must keep the permit and the slot until the
    /// attempt ends, and report the outcome with [`Slot::observe`].
    pub async fn run<F>(mut self, mut dispatch: mpsc::Receiver<Work>, mut launch: F)
    where
        F: FnMut(Work, OwnedSemaphorePermit, Slot),
    {
        let wake = Arc::clone(self.queues.wake());
        let limits = Arc::clone(self.queues.limits());
        let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let bound = limits.queue_bound();
        let mut open = true;
        let mut expired = Vec::new();
        loop {
            if self.hard_stop.is_cancelled() {
                for job in self.queues.drain() {
                    left_queue(&limits, &job);
                    self.store.abandon(job, SHUTDOWN);
                }
                while let Some(job) = dispatch.recv().await {
                    self.store.abandon(job, SHUTDOWN);
                }
                return;
            }
            while open && self.queues.len() < bound {
                match dispatch.try_recv() {
                    Ok(job) => self.queues.push(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            self.queues.refresh();
            let mut wake_at = None;
            while !self.queues.is_empty() {
                let Ok(permit) = Arc::clone(&self.requests).try_acquire_owned() else {
                    break;
                };
                match self.queues.next(SystemTime::now(), &mut expired) {
                    Next::Ready(job, slot, _waited) => {
                        left_queue(&limits, &job);
                        launch(job, permit, slot)
                    }
                    Next::Idle(at) => {
                        wake_at = at;
                        break;
                    }
                }
            }
            for job in expired.drain(..) {
                left_queue(&limits, &job);
                expire(job);
            }
            if !open && self.queues.is_empty() {
                return;
            }
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.hard_stop.cancelled() => {}
                job = dispatch.recv(), if open && self.queues.len() < bound => match job {
                    Some(job) => self.queues.push(job),
                    None => open = false,
                },
                _ = wake.notified() => {}
                _ = limits.changed() => {}
                _ = sleep => {}
                _ = sweep.tick() => {
                    self.queues.expire(SystemTime::now(), &mut expired);
                    for job in expired.drain(..) {
                        left_queue(&limits, &job);
                        expire(job);
                    }
                }
            }
        }
    }
}

/// A job leaving the queue before its first attempt frees its app's admission place.
fn left_queue(limits: &Limits, work: &Work) {
    if work.attempt() == 0 {
        limits.left_queue(&work.app().id);
    }
}

fn expire(work: Work) {
    work.resolve(Resolution::gateway(
        ReceiptStatus::Expired,
        "ttl passed while the message waited for its turn (rate limit)",
    ));
}
