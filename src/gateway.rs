//! Ingest stage and the gateway's lifecycle: validates and renders a batch, admits each accepted
//! recipient into the bounded accept window, and hands it to the deliver stage. Also owns the
//! explicit shutdown: stop accepting, drain in flight within a grace period, fail what remains.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::PipelineConfig;
use crate::metrics::{AppLabels, Metrics};
use crate::model::{FieldError, MessageMeta, ProviderRequest, ReceiptStatus, Recipient, Template};
use crate::pipeline::{Deliverer, Job, Work};
use crate::queue::MemoryRetryQueue;
use crate::receipts::{CallerSink, Pending, ReceiptEnvelope, ReceiptHub, Resolution};
use crate::registry::AppRegistry;
use crate::render::{CompiledTemplate, RenderContext, Stamp};
use crate::waiting::{AcceptedBatch, PackedAt, PackedRecipients, Waiting};

/// A batch as the domain sees it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub app_id: String,
    pub batch_id: String,
    pub campaign_id: String,
    pub template: Template,
    pub recipients: Vec<Recipient>,
    /// The campaign's rate limit (messages per minute) carried in the request; 0 means none.
    pub campaign_rate_per_minute: u32,
}

/// Accepted or rejected, per recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    pub index: usize,
    pub message_id: String,
    pub accepted: bool,
    pub field: String,
    pub reason: String,
}

impl RecipientResult {
    fn accepted(index: usize, message_id: String) -> Self {
        Self {
            index,
            message_id,
            accepted: true,
            field: String::new(),
            reason: String::new(),
        }
    }

    fn rejected(index: usize, message_id: String, field: String, reason: String) -> Self {
        Self {
            index,
            message_id,
            accepted: false,
            field,
            reason,
        }
    }
}

/// What ingest made of a batch.
#[derive(Debug, Clone)]
pub struct BatchResult {
    pub batch_id: String,
    pub results: Vec<RecipientResult>,
}

impl BatchResult {
    pub fn accepted(&self) -> usize {
        self.results.iter().filter(|r| r.accepted).count()
    }
    pub fn rejected(&self) -> usize {
        self.results.len() - self.accepted()
    }
}

/// Why a whole batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    Unavailable(String),
}

/// The running gateway (everything but the gRPC transport).
pub struct Gateway {
    apps: AppRegistry,
    config: PipelineConfig,
    window: Arc<Semaphore>,
    window_high_water: AtomicUsize,
    dispatch: mpsc::Sender<Work>,
    hub: Arc<ReceiptHub>,
    metrics: Arc<Metrics>,
    accepting: CancellationToken,
    hard_stop: CancellationToken,
    limits: Arc<crate::limit::Limits>,
    /// The Redis retry queue, when durable delivery is configured.
    durable: Option<Arc<crate::durable::RedisRetryQueue>>,
}

impl Gateway {
    /// Starts the deliver stage and the in-memory retry queue.
    pub fn start(apps: AppRegistry, config: PipelineConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::start_with(apps, config, metrics, None)
    }

    /// Starts the deliver stage with the Redis retry queue when `redis` is given (durable
    /// delivery), else with the in-memory one.
    pub fn start_with(
        apps: AppRegistry,
        config: PipelineConfig,
        metrics: Arc<Metrics>,
        redis: Option<Arc<crate::durable::RedisStore>>,
    ) -> Arc<Self> {
        let hard_stop = CancellationToken::new();
        let hub = Arc::new(ReceiptHub::new(Arc::clone(&metrics)));
        // Everything admitted holds an accept-window slot; the bound backs up the dispatch
        // channel for jobs that do not (claimed from a durable queue).
        let limits = Arc::new(crate::limit::Limits::with_queue_bound(
            config.accept_window + config.dispatch_queue,
            (config.accept_window / 2).max(1),
        ));
        let (dispatch, dispatch_rx) = mpsc::channel(config.dispatch_queue);
        let durable = redis.map(|store| {
            let runtimes: Vec<_> = apps.ids().filter_map(|id| apps.get(id).cloned()).collect();
            let queue = crate::durable::RedisRetryQueue::start(
                store,
                Arc::clone(&hub),
                runtimes,
                dispatch.clone(),
                hard_stop.clone(),
            );
            hub.add_observer(Arc::clone(&queue) as _);
            queue
        });
        let retry_queue: Arc<dyn crate::queue::RetryQueue> = match &durable {
            Some(queue) => Arc::clone(queue) as _,
            None => {
                MemoryRetryQueue::start(dispatch.clone(), Arc::clone(&metrics), hard_stop.clone())
            }
        };
        let deliverer = Arc::new(Deliverer {
            metrics: Arc::clone(&metrics),
            retry_queue,
            requests: Arc::new(Semaphore::new(config.max_in_flight_requests)),
            hard_stop: hard_stop.clone(),
            limits: Arc::clone(&limits),
        });
        tokio::spawn(deliverer.run(dispatch_rx));
        Arc::new(Self {
            apps,
            window: Arc::new(Semaphore::new(config.accept_window)),
            window_high_water: AtomicUsize::new(0),
            config,
            dispatch,
            hub,
            metrics,
            accepting: CancellationToken::new(),
            hard_stop,
            limits,
            durable,
        })
    }

    /// Replaces `app`'s rate limits, weight and concurrency bounds, effective at once (no
    /// restart). Used at start, on SIGHUP and by tests.
    pub fn update_limits(&self, app: &str, limits: crate::limit::LimitConfig) {
        self.limits.set(app, limits);
    }

    /// The live limit settings and adaptive-concurrency state.
    pub fn limits(&self) -> &Arc<crate::limit::Limits> {
        &self.limits
    }

    /// The Redis retry queue, when durable delivery is configured.
    pub fn durable(&self) -> Option<&Arc<crate::durable::RedisRetryQueue>> {
        self.durable.as_ref()
    }

    pub fn hub(&self) -> &Arc<ReceiptHub> {
        &self.hub
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn apps(&self) -> &AppRegistry {
        &self.apps
    }

    /// True until shutdown begins.
    pub fn is_accepting(&self) -> bool {
        !self.accepting.is_cancelled()
    }

    /// Fires when shutdown begins.
    pub fn stopping(&self) -> CancellationToken {
        self.accepting.clone()
    }

    /// The most accepted-but-unfinished messages held at once so far.
    pub fn window_high_water(&self) -> usize {
        self.window_high_water.load(Ordering::Relaxed)
    }

    /// The configured accept window.
    pub fn window_size(&self) -> usize {
        self.config.accept_window
    }

    /// Validates, renders and admits a batch. Waits for accept-window room as needed (that wait
    /// is the backpressure a fast caller feels). With `sink`, the batch's receipts go there too;
    /// with `stream_rejections`, recipients failing validation also get a REJECTED receipt there.
    ///
    /// A batch-level error (unknown app, bad template) leaves `batch` untouched, so the caller
    /// can still report every recipient; otherwise its recipients are taken.
    pub async fn submit(
        &self,
        batch: &mut Batch,
        sink: Option<&CallerSink>,
        stream_rejections: bool,
    ) -> Result<BatchResult, SubmitError> {
        if !self.is_accepting() {
            return Err(SubmitError::Unavailable(
                "the gateway is shutting down".into(),
            ));
        }
        if let Some(durable) = &self.durable
            && !durable.store().is_healthy()
        {
            return Err(SubmitError::Unavailable(
                "redis is unreachable: durable delivery is unavailable, retry later".into(),
            ));
        }
        if batch.app_id.is_empty() {
            return Err(FieldError::new("app_id", "required").into());
        }
        let Some(app) = self.apps.get(&batch.app_id).cloned() else {
            return Err(
                FieldError::new("app_id", format!("unknown app `{}`", batch.app_id)).into(),
            );
        };
        if batch.recipients.len() > self.config.max_batch_recipients {
            return Err(FieldError::new(
                "recipients",
                format!(
                    "{} recipients; a batch holds at most {}",
                    batch.recipients.len(),
                    self.config.max_batch_recipients
                ),
            )
            .into());
        }
        let compiled = CompiledTemplate::compile(&batch.template)?;
        let batch_id: Arc<str> = if batch.batch_id.is_empty() {
            crate::model::random_uuid().to_string().into()
        } else {
            batch.batch_id.as_str().into()
        };
        let ctx = RenderContext {
            apns_topic: app.apns_topic.clone(),
            analytics_label: (!batch.campaign_id.is_empty()).then(|| batch.campaign_id.clone()),
        };
        let accepted = AcceptedBatch::new(
            app,
            batch_id,
            batch.campaign_id.as_str().into(),
            compiled,
            ctx,
            batch.template.ttl,
            batch.campaign_rate_per_minute,
            sink.cloned(),
            Arc::clone(&self.hub),
        );
        let batch_id = accepted.batch_id.to_string();
        let mut ingest = Ingest::new(self, &accepted.app.id, sink, stream_rejections);
        let recipients = std::mem::take(&mut batch.recipients);
        match &self.durable {
            Some(durable) => {
                self.submit_durable(durable, Arc::new(accepted), recipients, ingest)
                    .await
            }
            None => {
                let packed = ingest.validate_and_pack(&accepted, recipients);
                Ok(self.admit_waiting(accepted, packed, ingest).await)
            }
        }
        .map(|results| BatchResult { batch_id, results })
    }

    /// In-memory delivery, second half of a batch: each validated recipient (packed into the
    /// batch's buffer) takes its limit-stage place and window slot, then waits as a compact
    /// [`Waiting`] message.
    async fn admit_waiting(
        &self,
        mut accepted: AcceptedBatch,
        packed: Validated,
        mut ingest: Ingest<'_>,
    ) -> Vec<RecipientResult> {
        accepted.set_recipients(packed.recipients);
        let accepted = Arc::new(accepted);
        for at in packed.valid {
            let Some((admission, slot)) = self.take_place(&accepted.app.id).await else {
                let meta = accepted.meta_at(at, SystemTime::now());
                let message_id = meta.message_id.clone();
                ingest.shutting_down(&Arc::new(meta), at.index(), message_id);
                continue;
            };
            let message_id = accepted.message_id_at(at).to_owned();
            ingest.accepted.inc();
            let waiting = Waiting::new(Arc::clone(&accepted), at, slot);
            self.dispatch_accepted(Work::Waiting(waiting), admission)
                .await;
            ingest
                .results
                .push(RecipientResult::accepted(at.index(), message_id));
        }
        ingest.results.sort_by_key(|r| r.index);
        ingest.results
    }

    /// Durable delivery: recipients are rendered, claimed for idempotency and written to Redis
    /// (in chunks, before the caller hears they were accepted), then dispatched.
    async fn submit_durable(
        &self,
        durable: &crate::durable::RedisRetryQueue,
        accepted: Arc<AcceptedBatch>,
        recipients: Vec<Recipient>,
        mut ingest: Ingest<'_>,
    ) -> Result<Vec<RecipientResult>, SubmitError> {
        let app_id = Arc::clone(&accepted.app.id);
        // Caller ids seen recently are not sent again.
        let earlier = crate::durable::idempotency::claim(
            durable.store(),
            &app_id,
            recipients.iter().map(|r| r.message_id.as_str()),
        )
        .await
        .map_err(|e| SubmitError::Unavailable(format!("redis is unreachable: {e}")))?;
        let mut release = Vec::new();
        let mut staged = Vec::new();
        for (index, recipient) in recipients.into_iter().enumerate() {
            let message_id = message_id_of(&recipient);
            let accepted_at = SystemTime::now();
            let meta_of = |message_id: &str| {
                Arc::new(accepted.meta(
                    message_id.to_owned(),
                    recipient.platform,
                    recipient.user_id.clone(),
                    accepted_at,
                ))
            };
            let first = !ingest.seen_ids.contains(&message_id);
            if let Some(state) = earlier.get(&message_id).filter(|_| first) {
                ingest.seen_ids.insert(message_id.clone());
                let (receipt, reason) = crate::durable::idempotency::duplicate_receipt(
                    &meta_of(&message_id),
                    index,
                    state,
                );
                if let Some(sink) = ingest.sink {
                    let _ = sink.send(ReceiptEnvelope {
                        receipt: Arc::new(receipt),
                        permit: None,
                    });
                }
                ingest.results.push(RecipientResult::rejected(
                    index,
                    message_id,
                    format!("recipients[{index}].message_id"),
                    reason,
                ));
                continue;
            }
            // A caller id claimed for idempotency is released when the recipient is not taken.
            let claimed = first && !recipient.message_id.is_empty();
            let checked = ingest.check(&accepted, &recipient, index, &message_id, accepted_at);
            let request = match checked {
                Ok(request) => request,
                Err(error) => {
                    if claimed {
                        release.push(message_id.clone());
                    }
                    ingest.rejected(&meta_of(&message_id), index, message_id, error);
                    continue;
                }
            };
            // Staged messages hold limit-stage places and window slots until they are
            // flushed, so flush before a wait they might be causing.
            if !staged.is_empty()
                && (self.window.available_permits() == 0
                    || futures::FutureExt::now_or_never(self.limits.admit(&app_id)).is_none())
            {
                self.flush_staged(durable, &mut staged, &mut ingest.results, &mut release)
                    .await;
            }
            let Some((admission, permit)) = self.take_place(&app_id).await else {
                if claimed {
                    release.push(message_id.clone());
                }
                ingest.shutting_down(&meta_of(&message_id), index, message_id);
                continue;
            };
            ingest.accepted.inc();
            let pending = Pending::new(
                meta_of(&message_id),
                ingest.sink.cloned(),
                Arc::clone(&self.hub),
                Some(permit),
            );
            let job = Job {
                pending,
                request,
                app: Arc::clone(&accepted.app),
                durable: true,
            };
            staged.push((job, admission, index, message_id));
            if staged.len() >= 256 {
                self.flush_staged(durable, &mut staged, &mut ingest.results, &mut release)
                    .await;
            }
        }
        self.flush_staged(durable, &mut staged, &mut ingest.results, &mut release)
            .await;
        if let Err(e) =
            crate::durable::idempotency::release(durable.store(), &app_id, &release).await
        {
            warn!(app = %app_id, error = %e, "could not release idempotency keys of rejected recipients");
        }
        ingest.results.sort_by_key(|r| r.index);
        Ok(ingest.results)
    }

    /// A recipient's place in the limit stage (first, so one app's backlog cannot fill the
    /// shared window), then its accept-window slot; `None` when shutdown begins meanwhile.
    async fn take_place(
        &self,
        app_id: &Arc<str>,
    ) -> Option<(crate::limit::Admission, OwnedSemaphorePermit)> {
        let place = tokio::select! {
            place = async {
                let admission = self.limits.admit(app_id).await;
                let permit = Arc::clone(&self.window).acquire_owned().await.ok()?;
                Some((admission, permit))
            } => place,
            _ = self.accepting.cancelled() => None,
        };
        let used = self.config.accept_window - self.window.available_permits();
        self.window_high_water.fetch_max(used, Ordering::Relaxed);
        place
    }

    /// Hands an accepted job to the deliver stage; its limit-stage place is committed once it is
    /// in the dispatch channel.
    async fn dispatch_accepted(&self, work: Work, admission: crate::limit::Admission) {
        match self.dispatch.send(work).await {
            Ok(()) => admission.commit(),
            Err(mpsc::error::SendError(work)) => work.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "gateway shut down before delivery",
            )),
        }
    }

    /// Durable delivery: persists the staged accepted jobs in Redis, then dispatches them. When
    /// Redis fails, they are not acknowledged as accepted: each ends FAILED (with a receipt) and
    /// its idempotency id is released.
    async fn flush_staged(
        &self,
        durable: &crate::durable::RedisRetryQueue,
        staged: &mut Vec<(Job, crate::limit::Admission, usize, String)>,
        results: &mut Vec<RecipientResult>,
        release: &mut Vec<String>,
    ) {
        if staged.is_empty() {
            return;
        }
        let chunk = std::mem::take(staged);
        let persisted = durable
            .persist_accepted(chunk.iter().map(|(job, ..)| job))
            .await;
        for (job, admission, index, message_id) in chunk {
            if let Err(e) = &persisted {
                let reason = format!("redis is unreachable, the message was not accepted: {e}");
                job.pending
                    .resolve(Resolution::gateway(ReceiptStatus::Failed, reason.clone()));
                release.push(message_id.clone());
                results.push(RecipientResult::rejected(
                    index,
                    message_id,
                    String::new(),
                    reason,
                ));
                continue;
            }
            self.dispatch_accepted(job.into(), admission).await;
            results.push(RecipientResult::accepted(index, message_id));
        }
    }

    /// Emits a REJECTED receipt for a recipient that never entered the pipeline.
    fn reject(&self, meta: &Arc<MessageMeta>, error: &FieldError, sink: Option<&CallerSink>) {
        let receipt = self.hub.rejection(meta, error);
        if let Some(sink) = sink {
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
    }

    /// Stops accepting, waits up to `grace` for in-flight messages to finish, then fails what is
    /// left (each with a terminal receipt saying so) and waits for those receipts to be emitted.
    pub async fn shutdown(&self, grace: Duration) {
        self.accepting.cancel();
        let in_flight = self.metrics.in_flight.get();
        info!(
            in_flight,
            ?grace,
            "shutting down: draining in-flight messages"
        );
        if !self.wait_drained(grace).await {
            warn!(
                remaining = self.metrics.in_flight.get(),
                "grace period over: failing the messages still in flight"
            );
        }
        self.hard_stop.cancel();
        if !self.wait_drained(Duration::from_secs(5)).await {
            warn!(
                remaining = self.metrics.in_flight.get(),
                "messages still unresolved after the hard stop"
            );
        }
        self.hub.close();
    }

    async fn wait_drained(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.metrics.in_flight.get() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// The caller's id, or a fresh one when it gave none.
fn message_id_of(recipient: &Recipient) -> String {
    if recipient.message_id.is_empty() {
        crate::model::random_uuid().to_string()
    } else {
        recipient.message_id.clone()
    }
}

/// The recipients of an in-memory batch that passed validation, packed.
struct Validated {
    recipients: PackedRecipients,
    /// Where each valid recipient is packed (its message id included).
    valid: Vec<PackedAt>,
}

/// The per-batch state of ingest: validation, rejections and the per-recipient results.
struct Ingest<'a> {
    gateway: &'a Gateway,
    sink: Option<&'a CallerSink>,
    stream_rejections: bool,
    seen_ids: HashSet<String>,
    results: Vec<RecipientResult>,
    accepted: Counter,
    rejected: Counter,
}

impl<'a> Ingest<'a> {
    fn new(
        gateway: &'a Gateway,
        app_id: &str,
        sink: Option<&'a CallerSink>,
        stream_rejections: bool,
    ) -> Self {
        let labels = AppLabels {
            app: app_id.to_owned(),
        };
        Self {
            gateway,
            sink,
            stream_rejections,
            seen_ids: HashSet::new(),
            results: Vec::new(),
            accepted: gateway.metrics.accepted.get_or_create(&labels).clone(),
            rejected: gateway
                .metrics
                .rejected_at_ingest
                .get_or_create(&labels)
                .clone(),
        }
    }

    /// Validates one recipient by rendering it.
    fn check(
        &mut self,
        batch: &AcceptedBatch,
        recipient: &Recipient,
        index: usize,
        message_id: &str,
        accepted_at: SystemTime,
    ) -> Result<ProviderRequest, FieldError> {
        if !self.seen_ids.insert(message_id.to_owned()) {
            return Err(FieldError::new(
                format!("recipients[{index}].message_id"),
                "duplicate message_id in this batch",
            ));
        }
        if batch.app.provider(recipient.platform).is_none() {
            return Err(FieldError::new(
                format!("recipients[{index}].platform"),
                format!(
                    "app `{}` has no {} credentials",
                    batch.app.id,
                    recipient.platform.as_str()
                ),
            ));
        }
        let stamp = Stamp {
            message_id,
            accepted_at,
        };
        batch
            .template
            .render_ref(recipient.into(), index, stamp, &batch.ctx)
    }

    /// In-memory delivery, first half of a batch: validates every recipient (rejections are
    /// reported now) and packs the valid ones into one buffer.
    fn validate_and_pack(
        &mut self,
        batch: &AcceptedBatch,
        recipients: Vec<Recipient>,
    ) -> Validated {
        let mut packed = Validated {
            recipients: PackedRecipients::default(),
            valid: Vec::with_capacity(recipients.len()),
        };
        self.results.reserve(recipients.len());
        for (index, recipient) in recipients.into_iter().enumerate() {
            let message_id = message_id_of(&recipient);
            let accepted_at = SystemTime::now();
            let checked = self
                .check(batch, &recipient, index, &message_id, accepted_at)
                .and_then(|_validated| {
                    packed
                        .recipients
                        .push(&recipient, &message_id, index, &batch.template)
                        .ok_or_else(|| {
                            FieldError::new("recipients", "the batch is too large to hold")
                        })
                });
            match checked {
                Ok(at) => packed.valid.push(at),
                Err(error) => {
                    let meta = batch.meta(
                        message_id.clone(),
                        recipient.platform,
                        recipient.user_id.clone(),
                        accepted_at,
                    );
                    self.rejected(&Arc::new(meta), index, message_id, error);
                }
            }
        }
        packed
    }

    /// A recipient that failed validation: counted, reported, and given a REJECTED receipt.
    fn rejected(
        &mut self,
        meta: &Arc<MessageMeta>,
        index: usize,
        message_id: String,
        error: FieldError,
    ) {
        self.rejected.inc();
        self.refuse(meta, index, message_id, error);
    }

    /// A valid recipient that shutdown kept from being accepted.
    fn shutting_down(&mut self, meta: &Arc<MessageMeta>, index: usize, message_id: String) {
        let error = FieldError::new("", "the gateway is shutting down");
        self.refuse(meta, index, message_id, error);
    }

    /// Reports a recipient that was not taken, with a REJECTED receipt.
    fn refuse(
        &mut self,
        meta: &Arc<MessageMeta>,
        index: usize,
        message_id: String,
        error: FieldError,
    ) {
        self.gateway
            .reject(meta, &error, self.sink.filter(|_| self.stream_rejections));
        self.results.push(RecipientResult::rejected(
            index,
            message_id,
            error.field,
            error.reason,
        ));
    }
}
