//! The due gate: the policy stage's second look at a scheduled message, when it comes due.
//!
//! A store hands its due work (retries, scheduled messages, jobs claimed from Redis) to this
//! gate instead of straight to the limit stage. Work without a [`crate::work::DueCheck`] passes
//! through untouched; a scheduled message that comes due is decided in full (opt-out, quiet
//! hours, suppression, caps, in the stage's order) with what is true *now*, a chunk per app at
//! a time (one state call, one Redis round trip with Redis): it goes on to the limit stage, ends
//! with its policy receipt, or (quiet hours with `action = "defer"`, or the state unreachable)
//! is parked in the store again until later, still carrying its check; a deferral gets a new
//! SCHEDULED receipt naming the new time, and its ttl counts from then.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Policy, Verdict};
use crate::domain::ReceiptStatus;
use crate::receipts::Resolution;
use crate::store::Store;
use crate::work::{Job, Work};

/// Work read from the store per round, at most (and so messages decided per state call).
const CHUNK: usize = 256;
/// How long a due message waits when the policy state could not be asked.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(5);
const SHUT_DOWN: &str = "gateway shut down before the scheduled message was sent";

/// Runs the gate until every sender of `from` is gone (the store stopped), passing work on to
/// `ready` (the limit stage's input). `store` is where deferred messages go back to (weak: the
/// store holds the gate's sender). When `stop` fires, work the limit stage has no room for is
/// abandoned to the store (FAILED in memory, handed off with Redis).
pub async fn run_gate(
    policy: Policy,
    mut from: mpsc::Receiver<Work>,
    ready: mpsc::Sender<Work>,
    store: Weak<dyn Store>,
    stop: CancellationToken,
) {
    let mut buf = Vec::with_capacity(CHUNK);
    while from.recv_many(&mut buf, CHUNK).await > 0 {
        let mut due: HashMap<Arc<str>, Vec<Job>> = HashMap::new();
        let mut pass = Vec::with_capacity(buf.len());
        for work in buf.drain(..) {
            match work {
                Work::Job(job) if job.due.is_some() => {
                    due.entry(Arc::clone(&job.app.id)).or_default().push(*job)
                }
                other => pass.push(other),
            }
        }
        for (app, jobs) in due {
            let verdicts = {
                let checks: Vec<(&Job, &crate::work::DueCheck)> = jobs
                    .iter()
                    .filter_map(|job| Some((job, job.due.as_deref()?)))
                    .collect();
                policy.decide_due(&app, &checks).await
            };
            for (mut job, verdict) in jobs.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Send => {
                        job.due = None;
                        pass.push(job.into());
                    }
                    Verdict::End(resolution) => job.pending.resolve(resolution),
                    Verdict::Schedule { due_ms, .. } => {
                        let now_ms = policy.now_ms();
                        let wait =
                            Duration::from_millis(u64::try_from(due_ms - now_ms).unwrap_or(0));
                        let now = crate::domain::from_epoch_millis(now_ms);
                        job.pending.defer(now + wait, now);
                        park(&store, job, wait);
                    }
                    Verdict::Unavailable(reason) => {
                        warn!(%app, %reason, "policy state unreachable: a due scheduled message waits");
                        park(&store, job, UNAVAILABLE_RETRY);
                    }
                }
            }
        }
        for work in pass {
            forward(&ready, &store, &stop, work).await;
        }
    }
}

/// Hands `work` to the limit stage, or, once `stop` fired and there is no room, to the store.
async fn forward(
    ready: &mpsc::Sender<Work>,
    store: &Weak<dyn Store>,
    stop: &CancellationToken,
    work: Work,
) {
    let slot = tokio::select! {
        biased;
        slot = ready.reserve() => slot.ok(),
        _ = stop.cancelled() => None,
    };
    match (slot, store.upgrade()) {
        (Some(slot), _) => slot.send(work),
        (None, Some(store)) => store.abandon(work, SHUT_DOWN),
        (None, None) => work.resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN)),
    }
}

/// Parks a due message again for `wait`, its check kept.
fn park(store: &Weak<dyn Store>, job: Job, wait: Duration) {
    match store.upgrade() {
        Some(store) => store.park(job, tokio::time::Instant::now() + wait),
        None => job
            .pending
            .resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN)),
    }
}
