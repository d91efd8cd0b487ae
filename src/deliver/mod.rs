//! Deliver stage: takes messages the limit stage lets go, renders them, runs one provider attempt
//! each under the in-flight request limit, and turns each outcome into a terminal receipt or a
//! retry parked in the store (backoff from [`crate::backoff`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use crate::backoff::{RetryPlan, plan_retry};
use crate::domain::{Outcome, ReceiptStatus};
use crate::metrics::Metrics;
use crate::receipts::Resolution;
use crate::store::Store;
use crate::store::policy_state::PolicyState;
use crate::work::{Job, Work};

/// Shared state of the deliver stage.
pub struct Deliverer {
    pub metrics: Arc<Metrics>,
    /// Where retries are parked and dead letters kept.
    pub store: Arc<dyn Store>,
    /// Provider requests outstanding at once.
    pub requests: Arc<Semaphore>,
    /// Fires when the shutdown grace period is over: in-flight attempts are abandoned.
    pub hard_stop: CancellationToken,
    /// Per-app rate limits, fair-share weights and adaptive concurrency (the limit stage).
    pub limits: Arc<crate::limit::Limits>,
    /// Where tokens the provider reports dead are remembered, so the policy stage stops
    /// sending to them.
    pub dead_tokens: Option<Arc<dyn PolicyState>>,
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
            Arc::clone(&self.store),
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
                        // The request covers recording its outcome too: with the store's
                        // writer behind, new requests wait instead of piling up deliveries
                        // that a crash would repeat.
                        if let Some(settled) = this.store.settled() {
                            tokio::select! {
                                () = settled => {}
                                _ = this.hard_stop.cancelled() => {}
                            }
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
        let attempted = tokio::select! {
            attempted = provider.deliver_timed(&job.request) => attempted,
            _ = self.hard_stop.cancelled() => {
                self.store.abandon(
                    job.into(),
                    "gateway shut down while the provider request was in flight; it may or may not have been delivered",
                );
                return;
            }
        };
        slot.observe(&attempted, provider.capacity());
        self.metrics
            .delivery_seconds_of(meta.platform)
            .observe(started.elapsed().as_secs_f64());
        let outcome = attempted.outcome;
        self.metrics.deliveries.inc(
            &meta.app_id,
            meta.platform.as_str(),
            outcome_label(&outcome),
        );
        debug!(attempt, ?outcome, "attempt finished");
        if let (Outcome::InvalidToken { invalid_since, .. }, Some(dead)) =
            (&outcome, &self.dead_tokens)
        {
            let since = invalid_since.unwrap_or_else(SystemTime::now);
            // Awaited before the receipt (one write, only for dead tokens): whoever sees the
            // INVALID_TOKEN receipt and then lists dead tokens or sends again sees it.
            if let Err(e) = dead
                .suppress(
                    &meta.app_id,
                    &meta.user_id,
                    job.request.device_token(),
                    crate::domain::epoch_millis(since),
                )
                .await
            {
                tracing::warn!(app = %meta.app_id, error = %e, "could not remember a dead device token");
            }
        }
        match outcome {
            Outcome::Retry {
                reason,
                status,
                retry_after,
            } => self.retry(job, reason, status, retry_after),
            other => job.pending.resolve(Resolution::from_outcome(other)),
        }
    }

    /// Parks a transiently failed job, or ends it when no attempt is left or its ttl would pass
    /// before the next one ([`plan_retry`]).
    fn retry(&self, job: Job, reason: String, status: u16, retry_after: Option<Duration>) {
        let attempt = job.pending.attempt();
        let plan = plan_retry(
            &job.app.retry,
            attempt,
            retry_after,
            SystemTime::now(),
            job.pending.meta().expires_at,
        );
        match plan {
            RetryPlan::GiveUp => {
                let resolution = Resolution::from_outcome(Outcome::Retry {
                    reason: format!("{reason} (after {attempt} attempts)"),
                    status,
                    retry_after,
                });
                self.store.dead_letter(job, resolution);
            }
            RetryPlan::Expire => job.pending.resolve(Resolution {
                provider_status: status,
                ..Resolution::gateway(
                    ReceiptStatus::Expired,
                    format!("ttl passes before the next attempt; last error: {reason}"),
                )
            }),
            RetryPlan::Retry { delay, at } => {
                job.pending.retrying(&reason, status, at);
                self.store.park(job, Instant::now() + delay);
            }
        }
    }
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
