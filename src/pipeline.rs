//! Deliver stage driver: takes accepted jobs from the dispatch channel, runs provider attempts
//! under the in-flight request limit, and turns each outcome into a terminal receipt or a retry.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use crate::metrics::Metrics;
use crate::model::{Outcome, Platform, ProviderRequest, ReceiptStatus};
use crate::provider::h2pool::{backoff, exponential_ceiling};
use crate::queue::RetryQueue;
use crate::receipts::{Pending, Resolution};
use crate::registry::AppRuntime;
use crate::waiting::Waiting;

/// One accepted message on its way to a provider.
pub struct Job {
    pub pending: Pending,
    pub request: ProviderRequest,
    pub app: Arc<AppRuntime>,
    /// The message is persisted in Redis (durable delivery): a shutdown hands it off to the
    /// replica that reclaims its lease instead of failing it.
    pub durable: bool,
}

impl Job {
    /// Ends this process's part in the job at shutdown. A durable job stays in Redis and is
    /// finished (with its terminal receipt) by whichever replica reclaims it; any other job
    /// ends FAILED with `reason`.
    pub fn abandon(self, reason: &str) {
        if self.durable {
            self.pending.hand_off();
        } else {
            self.pending
                .resolve(Resolution::gateway(ReceiptStatus::Failed, reason));
        }
    }
}

/// What the dispatch channel and the limit stage carry: a fresh message in its compact,
/// unrendered form, or a rendered job (accepted durably, claimed from Redis, or back for another
/// attempt).
#[derive(Debug)]
pub enum Work {
    Waiting(Waiting),
    Job(Box<Job>),
}

impl From<Job> for Work {
    fn from(job: Job) -> Self {
        Work::Job(Box::new(job))
    }
}

impl Work {
    pub fn app(&self) -> &Arc<AppRuntime> {
        match self {
            Work::Waiting(w) => w.app(),
            Work::Job(job) => &job.app,
        }
    }

    pub fn message_id(&self) -> &str {
        match self {
            Work::Waiting(w) => w.message_id(),
            Work::Job(job) => &job.pending.meta().message_id,
        }
    }

    pub fn platform(&self) -> Platform {
        match self {
            Work::Waiting(w) => w.platform(),
            Work::Job(job) => job.request.platform(),
        }
    }

    /// Provider attempts made so far.
    pub fn attempt(&self) -> u32 {
        match self {
            Work::Waiting(_) => 0,
            Work::Job(job) => job.pending.attempt(),
        }
    }

    /// Ends the message without a (further) attempt.
    pub fn resolve(self, resolution: Resolution) {
        match self {
            Work::Waiting(w) => w.resolve(resolution),
            Work::Job(job) => job.pending.resolve(resolution),
        }
    }

    /// See [`Job::abandon`]; a waiting message was never made durable.
    pub fn abandon(self, reason: &str) {
        match self {
            Work::Waiting(w) => w.resolve(Resolution::gateway(ReceiptStatus::Failed, reason)),
            Work::Job(job) => job.abandon(reason),
        }
    }

    /// The job for a provider attempt: a waiting message is rendered now (and ends with a
    /// receipt, returning `None`, if that fails).
    pub fn into_job(self) -> Option<Job> {
        match self {
            Work::Waiting(w) => w.into_job(),
            Work::Job(job) => Some(*job),
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("app", &self.app.id)
            .field("message_id", &self.pending.meta().message_id)
            .finish()
    }
}

/// Shared state of the deliver stage.
pub struct Deliverer {
    pub metrics: Arc<Metrics>,
    pub retry_queue: Arc<dyn RetryQueue>,
    /// Provider requests outstanding at once.
    pub requests: Arc<Semaphore>,
    /// Fires when the shutdown grace period is over: in-flight attempts are abandoned.
    pub hard_stop: CancellationToken,
    /// Per-app rate limits, fair-share weights and adaptive concurrency (the limit stage).
    pub limits: Arc<crate::limit::Limits>,
}

impl Deliverer {
    /// Runs until the dispatch channel closes; then every job still in it has been resolved.
    /// Jobs pass the limit stage (per-app fair queues, rate limits, adaptive concurrency) and
    /// take a global request permit only when they may go.
    pub async fn run(self: Arc<Self>, dispatch: mpsc::Receiver<Work>) {
        let scheduler = crate::limit::Scheduler::new(
            Arc::clone(&self.limits),
            Arc::clone(&self.metrics),
            Arc::clone(&self.requests),
            self.hard_stop.clone(),
        );
        scheduler
            .run(dispatch, |work, permit, slot| {
                let this = Arc::clone(&self);
                // Debug level: at the default `info` filter a span per message (allocated and
                // formatted by the subscriber) would cost a measurable share of the message.
                let span = debug_span!(
                    "deliver",
                    app = %work.app().id,
                    message_id = %work.message_id(),
                    provider = work.platform().as_str(),
                );
                tokio::spawn(
                    async move {
                        // Rendered here, on any worker, not on the scheduler's task.
                        if let Some(job) = work.into_job() {
                            this.attempt(job, &slot).await;
                        }
                        // The global permit first: the slot's drop wakes the scheduler.
                        drop(permit);
                        drop(slot);
                    }
                    .instrument(span),
                );
            })
            .await;
    }

    /// One provider attempt and what follows from it.
    async fn attempt(&self, mut job: Job, slot: &crate::limit::Slot) {
        let meta = Arc::clone(job.pending.meta());
        if meta.expires_at.is_some_and(|t| SystemTime::now() >= t) {
            job.pending.resolve(Resolution::gateway(
                ReceiptStatus::Expired,
                "ttl passed before the message could be sent",
            ));
            return;
        }
        let Some(provider) = job.app.provider(meta.platform).cloned() else {
            job.pending.resolve(Resolution::gateway(
                ReceiptStatus::Rejected,
                format!("app has no {} credentials", meta.platform.as_str()),
            ));
            return;
        };
        let attempt = job.pending.begin_attempt();
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = provider.deliver(&job.request) => outcome,
            _ = self.hard_stop.cancelled() => {
                job.abandon(
                    "gateway shut down while the provider request was in flight; it may or may not have been delivered",
                );
                return;
            }
        };
        let rtt = started.elapsed();
        slot.observe(&outcome, rtt);
        self.metrics
            .delivery_seconds_of(meta.platform)
            .observe(rtt.as_secs_f64());
        self.metrics.deliveries.inc(
            &meta.app_id,
            meta.platform.as_str(),
            outcome_label(&outcome),
        );
        debug!(attempt, ?outcome, "attempt finished");
        match outcome {
            Outcome::Retry {
                reason,
                status,
                retry_after,
            } => self.retry(job, reason, status, retry_after),
            other => job.pending.resolve(Resolution::from_outcome(other)),
        }
    }

    /// Parks a transiently failed job, or ends it when no attempt is left or its ttl would pass.
    fn retry(&self, job: Job, reason: String, status: u16, retry_after: Option<Duration>) {
        let policy = &job.app.retry;
        let attempt = job.pending.attempt();
        if attempt >= policy.max_attempts {
            let resolution = Resolution::from_outcome(Outcome::Retry {
                reason: format!("{reason} (after {attempt} attempts)"),
                status,
                retry_after,
            });
            self.retry_queue.dead_letter(job, resolution);
            return;
        }
        let delay = retry_delay(policy, attempt, retry_after);
        let next_attempt_at = SystemTime::now() + delay;
        if let Some(expires_at) = job.pending.meta().expires_at
            && next_attempt_at >= expires_at
        {
            job.pending.resolve(Resolution {
                provider_status: status,
                ..Resolution::gateway(
                    ReceiptStatus::Expired,
                    format!("ttl passes before the next attempt; last error: {reason}"),
                )
            });
            return;
        }
        job.pending.retrying(&reason, status, next_attempt_at);
        self.retry_queue.schedule(job, Instant::now() + delay);
    }
}

/// The wait before attempt `attempt + 1`: exponential backoff with full jitter, but never less
/// than the provider's Retry-After (clamped to the policy's maximum).
pub fn retry_delay(
    policy: &crate::config::RetryConfig,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let jittered = backoff(policy.base(), policy.cap(), attempt);
    match retry_after {
        Some(after) => jittered.max(after.min(policy.max_retry_after())),
        None => jittered,
    }
}

/// The largest wait `retry_delay` can choose for `attempt` without a Retry-After.
pub fn retry_delay_ceiling(policy: &crate::config::RetryConfig, attempt: u32) -> Duration {
    exponential_ceiling(policy.base(), policy.cap(), attempt)
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::InvalidToken { .. } => "invalid_token",
        Outcome::Rejected { .. } => "rejected",
        Outcome::Retry { .. } => "retry",
        Outcome::Failed { .. } => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;

    /// The limit stage holds one `Work` per accepted message, up to a million of them.
    #[test]
    fn a_queued_message_stays_small() {
        assert!(
            std::mem::size_of::<Work>() <= 24,
            "{} bytes",
            std::mem::size_of::<Work>()
        );
    }

    #[test]
    fn retry_after_is_a_floor_and_clamped() {
        let policy = RetryConfig {
            base_ms: 100,
            cap_ms: 1_000,
            max_attempts: 5,
            max_retry_after_secs: 60,
        };
        for attempt in 1..6 {
            let d = retry_delay(&policy, attempt, None);
            assert!(d <= retry_delay_ceiling(&policy, attempt));
            let d = retry_delay(&policy, attempt, Some(Duration::from_secs(30)));
            assert!(d >= Duration::from_secs(30));
            let d = retry_delay(&policy, attempt, Some(Duration::from_secs(7_200)));
            assert_eq!(d, Duration::from_secs(60), "clamped to max_retry_after");
        }
    }
}
