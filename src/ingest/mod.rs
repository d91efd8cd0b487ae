//! Ingest stage: validates a batch (app, size, template, then each recipient by rendering it),
//! packs the valid recipients into one buffer, asks the policy stage about each, admits each
//! into the bounded accept window and its app's place in the limit stage, has the store make it
//! safe, and hands it to the limit stage. One path, whichever store is configured.
//!
//! Every recipient not taken gets a REJECTED receipt through the receipt hub, naming the field;
//! every recipient taken is accepted and owes a terminal receipt from then on. A recipient that
//! an experiment holds out (`render::content`) is validated, accepted and ended at once: DROPPED
//! `holdout`, never packed nor sent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::domain::{
    Batch, BatchOutline, FieldError, MessageMeta, Platform, Priority, ProviderRequest, Receipt,
    ReceiptStatus, Recipient,
};
use crate::limit::{Admission, Limits};
use crate::metrics::{AppLabels, Metrics};
use crate::policy::{Input as PolicyInput, Policy, Timing, Verdict};
use crate::receipts::{CallerSink, Pending, ReceiptEnvelope, ReceiptHub, Resolution};
use crate::registry::AppRegistry;
use crate::render::content::Choice;
use crate::render::{CompiledTemplate, RecipientRef, RenderContext, Stamp};
use crate::store::{AcceptError, Earlier, Store};
use crate::work::{AcceptedBatch, PackedAt, PackedRecipients, Waiting, Work};

/// Admitted messages handed to the store at once (one durable write per chunk).
const STAGE_CHUNK: usize = 256;

/// The sizes ingest enforces.
#[derive(Debug, Clone, Copy)]
pub struct IngestConfig {
    /// Accepted messages without a terminal receipt, at most.
    pub accept_window: usize,
    /// Recipients in one batch, at most.
    pub max_batch_recipients: usize,
    /// Receipts queued unread for one `StreamSend` caller, at most.
    pub max_unread_receipts: usize,
    /// How long a `StreamSend` caller may leave them unread before its call is ended.
    pub stream_unread_timeout: std::time::Duration,
    /// What one batch may cost, checked before any work is done on it.
    pub caps: RequestCaps,
}

/// Caps on what one batch may carry (`[pipeline]`, see `config::PipelineConfig`), checked as a
/// whole before any id is claimed or any recipient rendered: a batch over one is refused once,
/// naming the field, at the cost of one pass over its sizes.
#[derive(Debug, Clone, Copy)]
pub struct RequestCaps {
    pub max_id_bytes: usize,
    pub max_vars_per_recipient: usize,
    pub max_vars_bytes: usize,
    pub max_template_field_bytes: usize,
    pub max_template_data_entries: usize,
    pub max_raw_json_bytes: usize,
}

impl Default for RequestCaps {
    fn default() -> Self {
        Self {
            max_id_bytes: 256,
            max_vars_per_recipient: 64,
            max_vars_bytes: 8_192,
            max_template_field_bytes: 4_096,
            max_template_data_entries: 64,
            max_raw_json_bytes: 4_096,
        }
    }
}

impl RequestCaps {
    /// The first cap `batch` exceeds, naming the field.
    pub fn check(&self, batch: &Batch) -> Result<(), FieldError> {
        let over = |field: String, what: &str, len: usize, max: usize| {
            (len > max).then(|| {
                FieldError::new(
                    field,
                    format!("{what} is {len} bytes, over the limit of {max}"),
                )
            })
        };
        let id =
            |field: &str, value: &str| over(field.into(), "the id", value.len(), self.max_id_bytes);
        let text = |field: String, value: &str| {
            over(
                field,
                "the text",
                value.len(),
                self.max_template_field_bytes,
            )
        };
        let json = |field: String, value: &str| {
            over(field, "the JSON", value.len(), self.max_raw_json_bytes)
        };
        let first = |checks: &mut dyn Iterator<Item = Option<FieldError>>| checks.flatten().next();
        let t = &batch.template;
        let batch_level = [
            id("batch_id", &batch.batch_id),
            id("campaign_id", &batch.campaign_id),
            text("template.title".into(), &t.title),
            text("template.subtitle".into(), &t.subtitle),
            text("template.body".into(), &t.body),
            text("template.image_url".into(), &t.image_url),
            text("template.deep_link".into(), &t.deep_link),
            text("template.sound".into(), &t.sound),
            text("template.category".into(), &t.category),
            text("template.thread_id".into(), &t.thread_id),
            text("template.android_channel_id".into(), &t.android_channel_id),
            json("template.apns_json".into(), &t.apns_json),
            json("template.fcm_json".into(), &t.fcm_json),
        ];
        if let Some(e) = first(&mut batch_level.into_iter()) {
            return Err(e);
        }
        if t.data.len() > self.max_template_data_entries {
            return Err(FieldError::new(
                "template.data",
                format!(
                    "{} entries, over the limit of {}",
                    t.data.len(),
                    self.max_template_data_entries
                ),
            ));
        }
        // Per-locale and per-variant texts are capped like the template's own; their counts
        // are capped when the template compiles.
        let localized = |field: &str, texts: &crate::domain::LocalizedText| {
            [
                ("title", &texts.title),
                ("subtitle", &texts.subtitle),
                ("body", &texts.body),
            ]
            .into_iter()
            .find_map(|(name, value)| text(format!("{field}.{name}"), value))
        };
        let locales =
            |field: &str,
             map: &std::collections::BTreeMap<String, crate::domain::LocalizedText>| {
                if map.len() > crate::render::content::MAX_LOCALES {
                    return Some(FieldError::new(
                        field,
                        format!(
                            "{} locales, over the limit of {}",
                            map.len(),
                            crate::render::content::MAX_LOCALES
                        ),
                    ));
                }
                map.iter().find_map(|(key, texts)| {
                    id(field, key).or_else(|| localized(&format!("{field}.{key}"), texts))
                })
            };
        if let Some(e) = locales("template.locales", &t.locales) {
            return Err(e);
        }
        if let Some(x) = &t.experiment {
            if x.variants.len() > crate::render::content::MAX_VARIANTS {
                return Err(FieldError::new(
                    "template.experiment.variants",
                    format!(
                        "{} variants, over the limit of {}",
                        x.variants.len(),
                        crate::render::content::MAX_VARIANTS
                    ),
                ));
            }
            for (i, v) in x.variants.iter().enumerate() {
                let field = format!("template.experiment.variants[{i}]");
                let found = id(&format!("{field}.name"), &v.name)
                    .or_else(|| localized(&field, &v.texts))
                    .or_else(|| locales(&format!("{field}.locales"), &v.locales));
                if let Some(e) = found {
                    return Err(e);
                }
            }
        }
        for (key, value) in &t.data {
            if let Some(e) = id("template.data", key) {
                return Err(e);
            }
            if let Some(e) = text(format!("template.data.{key}"), value) {
                return Err(e);
            }
        }
        for (i, r) in batch.recipients.iter().enumerate() {
            let field = |name: &str| format!("recipients[{i}].{name}");
            let checks = [
                over(
                    field("message_id"),
                    "the id",
                    r.message_id.len(),
                    self.max_id_bytes,
                ),
                over(
                    field("user_id"),
                    "the id",
                    r.user_id.len(),
                    self.max_id_bytes,
                ),
                over(field("locale"), "the id", r.locale.len(), self.max_id_bytes),
                over(
                    field("timezone"),
                    "the id",
                    r.timezone.len(),
                    self.max_id_bytes,
                ),
                text(field("title"), r.title.as_deref().unwrap_or_default()),
                text(field("body"), r.body.as_deref().unwrap_or_default()),
                json(field("apns_json"), &r.apns_json),
                json(field("fcm_json"), &r.fcm_json),
            ];
            if let Some(e) = first(&mut checks.into_iter()) {
                return Err(e);
            }
            if r.vars.len() > self.max_vars_per_recipient {
                return Err(FieldError::new(
                    field("vars"),
                    format!(
                        "{} variables, over the limit of {}",
                        r.vars.len(),
                        self.max_vars_per_recipient
                    ),
                ));
            }
            let bytes: usize = r.vars.iter().map(|(k, v)| k.len() + v.len()).sum();
            if let Some(e) = over(field("vars"), "the variables", bytes, self.max_vars_bytes) {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Accepted or rejected, per recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    pub index: usize,
    pub message_id: String,
    pub accepted: bool,
    pub field: String,
    pub reason: String,
    /// Not accepted, but its accept write may have been applied (see
    /// [`AcceptError::maybe_applied`]).
    pub maybe_accepted: bool,
}

impl RecipientResult {
    fn accepted(index: usize, message_id: String) -> Self {
        Self {
            index,
            message_id,
            accepted: true,
            field: String::new(),
            reason: String::new(),
            maybe_accepted: false,
        }
    }

    fn rejected(index: usize, message_id: String, field: String, reason: String) -> Self {
        Self {
            index,
            message_id,
            accepted: false,
            field,
            reason,
            maybe_accepted: false,
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

/// The ingest stage. See the module docs.
pub struct Ingest {
    apps: Arc<AppRegistry>,
    config: IngestConfig,
    window: Arc<Semaphore>,
    window_high_water: AtomicUsize,
    /// The limit stage's input.
    ready: mpsc::Sender<Work>,
    store: Arc<dyn Store>,
    policy: Policy,
    limits: Arc<Limits>,
    hub: Arc<ReceiptHub>,
    metrics: Arc<Metrics>,
    /// Cancelled when shutdown begins: nothing more is accepted.
    accepting: CancellationToken,
}

/// The parts ingest works with.
pub struct IngestParts {
    pub apps: Arc<AppRegistry>,
    pub config: IngestConfig,
    pub ready: mpsc::Sender<Work>,
    pub store: Arc<dyn Store>,
    pub policy: Policy,
    pub limits: Arc<Limits>,
    pub hub: Arc<ReceiptHub>,
    pub metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(parts: IngestParts) -> Self {
        Self {
            window: Arc::new(Semaphore::new(parts.config.accept_window)),
            window_high_water: AtomicUsize::new(0),
            apps: parts.apps,
            config: parts.config,
            ready: parts.ready,
            store: parts.store,
            policy: parts.policy,
            limits: parts.limits,
            hub: parts.hub,
            metrics: parts.metrics,
            accepting: CancellationToken::new(),
        }
    }

    /// True until [`Ingest::stop`].
    pub fn is_accepting(&self) -> bool {
        !self.accepting.is_cancelled()
    }

    /// Stops accepting: batches are refused, recipients waiting for room are refused.
    pub fn stop(&self) {
        self.accepting.cancel();
    }

    /// Fires when ingest stops accepting.
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

    /// Receipts queued unread for one `StreamSend` caller before its batches are no longer
    /// read.
    pub fn max_batch_recipients(&self) -> usize {
        self.config.max_batch_recipients
    }

    pub fn max_unread_receipts(&self) -> usize {
        self.config.max_unread_receipts
    }

    pub fn stream_unread_timeout(&self) -> std::time::Duration {
        self.config.stream_unread_timeout
    }

    /// Validates, packs and admits a batch. Waits for accept-window room as needed (that wait is
    /// the backpressure a fast caller feels). With `sink`, the batch's receipts go there too;
    /// with `stream_rejections`, recipients not taken also get their REJECTED receipt there.
    ///
    /// A batch-level error (unknown app, bad template, store unreachable) leaves `batch`
    /// untouched, so the caller can still report every recipient; otherwise its recipients are
    /// taken.
    pub async fn submit(
        &self,
        batch: &mut Batch,
        sink: Option<&CallerSink>,
        stream_rejections: bool,
    ) -> Result<BatchResult, SubmitError> {
        self.submit_until(batch, sink, stream_rejections, &CancellationToken::new())
            .await
    }

    /// [`Ingest::submit`] for a call that can go away: once `call_ended` fires, recipients not
    /// yet admitted are refused (`the call was cancelled ...`) instead of waiting for window
    /// room, and their idempotency ids are released with the others not taken, so a resend
    /// of the same ids is accepted. What was admitted before stays accepted and is delivered.
    /// Run this to completion (e.g. in a task of its own): a future dropped half-way cannot
    /// release what it claimed.
    pub async fn submit_until(
        &self,
        batch: &mut Batch,
        sink: Option<&CallerSink>,
        stream_rejections: bool,
        call_ended: &CancellationToken,
    ) -> Result<BatchResult, SubmitError> {
        if !self.is_accepting() {
            return Err(SubmitError::Unavailable(
                "the gateway is shutting down".into(),
            ));
        }
        if !self.store.is_healthy() {
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
        if batch.recipients.is_empty() {
            return Err(
                FieldError::new("recipients", "a batch needs at least one recipient").into(),
            );
        }
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
        self.config.caps.check(batch)?;
        let timing = Timing::of_at(batch, self.policy.now_ms())?;
        let compiled = CompiledTemplate::compile(&batch.template)?;
        if compiled.contents().has_experiment() && batch.campaign_id.is_empty() {
            return Err(FieldError::new(
                "campaign_id",
                "required with template.experiment: recipients are assigned per campaign",
            )
            .into());
        }
        // A template whose fixed text alone is over every provider's limit fails the batch once,
        // instead of being rendered for each recipient to fail each.
        let overridden = batch
            .recipients
            .iter()
            .any(|r| r.title.is_some() || r.body.is_some());
        let fixed = compiled.min_payload_bytes(overridden);
        if fixed > crate::render::MAX_PAYLOAD_BYTES {
            return Err(FieldError::new(
                "template",
                format!(
                    "the template's fixed text is {fixed} bytes, over the largest provider payload ({} bytes): no recipient could be sent",
                    crate::render::MAX_PAYLOAD_BYTES
                ),
            )
            .into());
        }
        let earlier = {
            let ids: Vec<&str> = batch
                .recipients
                .iter()
                .map(|r| r.message_id.as_str())
                .collect();
            self.store
                .claim_ids(&app.id, &ids)
                .await
                .map_err(|e| SubmitError::Unavailable(e.to_string()))?
        };
        let batch_id: Arc<str> = if batch.batch_id.is_empty() {
            crate::domain::random_uuid().to_string().into()
        } else {
            batch.batch_id.as_str().into()
        };
        let ctx = RenderContext {
            apns_topic: app.apns_topic.clone(),
            analytics_label: (!batch.campaign_id.is_empty()).then(|| batch.campaign_id.clone()),
        };
        let mut accepted = AcceptedBatch::new(
            app,
            batch_id,
            batch.campaign_id.as_str().into(),
            batch.template.clone(),
            compiled,
            ctx,
            batch.template.ttl,
            batch.campaign_rate_per_minute,
            sink.cloned(),
            Arc::clone(&self.hub),
        );
        let batch_id = accepted.batch_id.to_string();
        let mut run = Run::new(self, &accepted.app.id, sink, stream_rejections);
        run.call_ended = call_ended.clone();
        let recipients = std::mem::take(&mut batch.recipients);
        let valid = run.validate_and_pack(&mut accepted, recipients, &earlier, &timing);
        let transactional = batch.bypass_policies || accepted.priority == Priority::High;
        self.admit(Arc::new(accepted), valid, transactional, &mut run)
            .await;
        let app_id = Arc::clone(&run.app_id);
        if let Err(e) = self.store.release_ids(&app_id, &run.release).await {
            warn!(app = %app_id, error = %e, "could not release idempotency keys of recipients not taken");
        }
        run.results.sort_by_key(|r| r.index);
        Ok(BatchResult {
            batch_id,
            results: run.results,
        })
    }

    /// Gives every recipient of a batch refused as a whole its REJECTED receipt, through the hub
    /// and to `sink`. Each gets one short reason: its own error when one names it
    /// (`recipients[i]...`), else the first error and how many more there were; never a copy of
    /// every error (a refused batch of N recipients costs N short receipts, not N x errors).
    pub fn refuse_batch(&self, outline: BatchOutline, errors: &[FieldError], sink: &CallerSink) {
        let mut own: HashMap<usize, &FieldError> = HashMap::new();
        for e in errors {
            if let Some(index) = recipient_index(&e.field) {
                own.entry(index).or_insert(e);
            }
        }
        let summary = match errors.first() {
            Some(first) => {
                let more = errors.len() - 1;
                let mut reason = format!("batch refused: {}", short(&first.to_string()));
                if more > 0 {
                    reason.push_str(&format!(" (and {more} more errors)"));
                }
                Resolution {
                    field: first.field.clone(),
                    ..Resolution::gateway(ReceiptStatus::Rejected, reason)
                }
            }
            None => Resolution::gateway(ReceiptStatus::Rejected, "batch refused"),
        };
        self.refuse_each(outline, sink, true, |index| match own.get(&index) {
            Some(e) => Resolution::invalid(e),
            None => summary.clone(),
        });
    }

    /// Refuses a batch the caller may not send (another tenant's app, or no such app): each
    /// recipient's REJECTED receipt goes to `sink` only, not through the hub, so the app's
    /// subscribers and stores never see receipts a stranger made up.
    pub fn deny_batch(&self, outline: BatchOutline, error: &FieldError, sink: &CallerSink) {
        let resolution = Resolution::invalid(error);
        self.refuse_each(outline, sink, false, |_| resolution.clone());
    }

    fn refuse_each(
        &self,
        outline: BatchOutline,
        sink: &CallerSink,
        through_hub: bool,
        resolution: impl Fn(usize) -> Resolution,
    ) {
        let now = SystemTime::now();
        let app_id: Arc<str> = outline.app_id.as_str().into();
        let batch_id: Arc<str> = outline.batch_id.as_str().into();
        let campaign_id: Arc<str> = outline.campaign_id.as_str().into();
        for (index, (message_id, platform, user_id)) in outline.recipients.into_iter().enumerate() {
            let meta = Arc::new(MessageMeta {
                app_id: Arc::clone(&app_id),
                batch_id: Arc::clone(&batch_id),
                campaign_id: Arc::clone(&campaign_id),
                message_id,
                platform: platform.unwrap_or(Platform::Apns),
                user_id,
                priority: Priority::Default,
                accepted_at: now,
                expires_at: None,
                campaign_rate_per_minute: 0,
                content: Default::default(),
            });
            let receipt = if through_hub {
                self.hub.refuse(meta, resolution(index))
            } else {
                let mut receipt = Receipt::new(meta, 0, resolution(index), None);
                receipt.accepted = false;
                Arc::new(receipt)
            };
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
    }

    /// Second half of a batch: each validated recipient passes the policy stage (a chunk at a
    /// time), takes its limit-stage place and window slot, and is staged; staged messages go to
    /// the store in chunks and, once it has them, to the limit stage.
    async fn admit(
        &self,
        batch: Arc<AcceptedBatch>,
        valid: Vec<Valid>,
        transactional: bool,
        run: &mut Run<'_>,
    ) {
        let mut staged = Vec::new();
        let mut valid = valid.into_iter().peekable();
        while valid.peek().is_some() {
            let chunk: Vec<Valid> = valid.by_ref().take(STAGE_CHUNK).collect();
            let inputs: Vec<_> = chunk.iter().map(|v| v.input.clone()).collect();
            let verdicts = self
                .policy
                .decide(&batch.app.id, transactional, &inputs)
                .await;
            for (v, verdict) in chunk.into_iter().zip(verdicts) {
                self.admit_one(&batch, v, verdict, transactional, &mut staged, run)
                    .await;
            }
        }
        self.flush(&mut staged, run).await;
    }

    /// One recipient after its policy verdict: ended by the policy (accepted, with its
    /// terminal receipt now), refused (the policy state is unreachable), or staged.
    async fn admit_one(
        &self,
        batch: &Arc<AcceptedBatch>,
        Valid { at, claimed, input }: Valid,
        verdict: Verdict,
        transactional: bool,
        staged: &mut Vec<Staged>,
        run: &mut Run<'_>,
    ) {
        let message_id = batch.message_id_at(at).to_owned();
        let mut due = None;
        match verdict {
            Verdict::Send => {}
            Verdict::Schedule { due_ms, .. } => {
                // Without a durable store a scheduled message waits in this process: bounded.
                if self.store.name() == "memory"
                    && self.store.parked() >= self.policy.max_scheduled_in_memory()
                {
                    if claimed {
                        run.release.push(message_id.clone());
                    }
                    let meta = Arc::new(batch.meta_at(at, SystemTime::now()));
                    run.refuse(
                        meta,
                        at.index(),
                        message_id,
                        FieldError::new(
                            "send_at_ms",
                            "too many scheduled messages waiting in memory \
                             (policy.max_scheduled_in_memory); configure Redis to schedule more",
                        ),
                    );
                    return;
                }
                due = Some((due_ms, input.due_check(transactional)));
            }
            Verdict::End(resolution) => {
                let meta = Arc::new(batch.meta_at(at, SystemTime::now()));
                let pending = Pending::new(meta, batch.sink.clone(), Arc::clone(&self.hub), None);
                pending.resolve(resolution);
                run.accepted.inc();
                run.results
                    .push(RecipientResult::accepted(at.index(), message_id));
                return;
            }
            Verdict::Unavailable(reason) => {
                if claimed {
                    run.release.push(message_id.clone());
                }
                let meta = Arc::new(batch.meta_at(at, SystemTime::now()));
                let receipt = self.hub.refuse(
                    meta,
                    Resolution::gateway(ReceiptStatus::Failed, reason.clone()),
                );
                if let Some(sink) = run.sink.filter(|_| run.stream_rejections) {
                    let _ = sink.send(ReceiptEnvelope {
                        receipt,
                        permit: None,
                    });
                }
                run.results.push(RecipientResult::rejected(
                    at.index(),
                    message_id,
                    String::new(),
                    reason,
                ));
                return;
            }
        }
        // Staged messages hold limit-stage places and window slots until the store has
        // them, so hand them over before a wait they might be causing.
        if !staged.is_empty()
            && (self.window.available_permits() == 0 || !self.limits.has_room(&run.app_id))
        {
            self.flush(staged, run).await;
        }
        let (admission, slot) = match self.take_place(&run.app_id, &run.call_ended).await {
            Place::Taken(admission, slot) => (admission, slot),
            refused => {
                if claimed {
                    run.release.push(message_id.clone());
                }
                let reason = match refused {
                    Place::CallEnded => {
                        "the call was cancelled before this recipient was admitted; \
                         it was not accepted (a resend with the same message_id is)"
                    }
                    _ => "the gateway is shutting down",
                };
                let meta = batch.meta_at(at, SystemTime::now());
                if due.is_none() {
                    // Decided (and so reserved under the caps) but not accepted.
                    self.policy.release_unaccepted(
                        &meta.app_id,
                        &meta.batch_id,
                        &meta.message_id,
                        &meta.user_id,
                    );
                }
                run.refuse(
                    Arc::new(meta),
                    at.index(),
                    message_id,
                    FieldError::new("", reason),
                );
                return;
            }
        };
        run.accepted.inc();
        staged.push(Staged {
            waiting: Waiting::new(Arc::clone(batch), at, slot),
            admission,
            claimed,
            index: at.index(),
            message_id,
            due,
        });
        if staged.len() >= STAGE_CHUNK {
            self.flush(staged, run).await;
        }
    }

    /// Hands the staged messages to the store, then to the limit stage. When the store cannot
    /// take them they are not accepted after all: each ends FAILED (with a receipt), its
    /// idempotency id is released, and its result says why.
    async fn flush(&self, staged: &mut Vec<Staged>, run: &mut Run<'_>) {
        if staged.is_empty() {
            return;
        }
        let (messages, places): (Vec<_>, Vec<_>) = std::mem::take(staged)
            .into_iter()
            .map(|s| {
                (
                    s.waiting,
                    (s.admission, s.claimed, s.index, s.message_id, s.due),
                )
            })
            .unzip();
        match self.store.accept(messages).await {
            Ok(works) => {
                let mut scheduled = Vec::new();
                for (work, (admission, _, index, message_id, due)) in works.into_iter().zip(places)
                {
                    match due {
                        // The limit-stage place is given back: the message takes one again
                        // when it comes due, like a retry.
                        Some((due_ms, check)) => {
                            scheduled.extend(self.schedule(work, due_ms, check))
                        }
                        None => self.dispatch(work, admission).await,
                    }
                    run.results
                        .push(RecipientResult::accepted(index, message_id));
                }
                // Before the caller hears it was accepted: with Redis the schedule is durable.
                if !scheduled.is_empty() {
                    self.store.schedule(scheduled).await;
                }
            }
            Err(AcceptError {
                error,
                messages,
                maybe_applied,
            }) => {
                let reason = if maybe_applied {
                    format!(
                        "{error}; the accept could be neither confirmed nor undone: the message may still be delivered; resend it with the same message_id to learn its outcome"
                    )
                } else {
                    format!("{error}; the message was not accepted")
                };
                for (waiting, (_, claimed, index, message_id, due)) in
                    messages.into_iter().zip(places)
                {
                    if due.is_none() {
                        // Decided (and so reserved under the caps) but not accepted.
                        let meta = waiting.meta();
                        self.policy.release_unaccepted(
                            &meta.app_id,
                            &meta.batch_id,
                            &meta.message_id,
                            &meta.user_id,
                        );
                    }
                    // One that may still be delivered gets no terminal receipt here: if another
                    // replica reclaims and delivers it, that replica's receipt is its one
                    // terminal receipt (a FAILED one here would disagree with it).
                    let status = if maybe_applied {
                        ReceiptStatus::Retrying
                    } else {
                        ReceiptStatus::Failed
                    };
                    waiting.resolve_unaccepted(Resolution::gateway(status, reason.clone()));
                    // A message that may still be delivered keeps its id claimed: a resend is
                    // answered from the idempotency record, not accepted a second time.
                    if claimed && !maybe_applied {
                        run.release.push(message_id.clone());
                    }
                    run.results.push(RecipientResult {
                        maybe_accepted: maybe_applied,
                        ..RecipientResult::rejected(
                            index,
                            message_id,
                            String::new(),
                            reason.clone(),
                        )
                    });
                }
            }
        }
    }

    /// A recipient's place in the limit stage (first, so one app's backlog cannot fill the
    /// shared window), then its accept-window slot; `None` when shutdown begins meanwhile.
    async fn take_place(&self, app_id: &Arc<str>, call_ended: &CancellationToken) -> Place {
        let place = tokio::select! {
            // A call that ended takes no more places, even where one is free.
            biased;
            _ = self.accepting.cancelled() => Place::ShuttingDown,
            _ = call_ended.cancelled() => Place::CallEnded,
            place = async {
                let admission = self.limits.admit(app_id).await;
                match Arc::clone(&self.window).acquire_owned().await {
                    Ok(permit) => Place::Taken(admission, permit),
                    Err(_) => Place::ShuttingDown,
                }
            } => place,
        };
        let used = self.config.accept_window - self.window.available_permits();
        self.window_high_water.fetch_max(used, Ordering::Relaxed);
        place
    }

    /// Sets an accepted message aside until `due_ms`: rendered now (a message that cannot be
    /// rendered ends REJECTED here and `None` is returned), its SCHEDULED receipt emitted and
    /// its window slot released; the caller hands it to the store.
    fn schedule(
        &self,
        work: Work,
        due_ms: i64,
        check: crate::work::DueCheck,
    ) -> Option<(crate::work::Job, tokio::time::Instant)> {
        let mut job = work.into_job()?;
        // Decided again, in full, when it comes due (`policy::due`).
        job.due = Some(Box::new(check));
        // By the policy stage's clock, which computed `due_ms`.
        let wait = u64::try_from(due_ms - self.policy.now_ms()).unwrap_or(0);
        let due = crate::domain::from_epoch_millis(due_ms);
        job.pending.schedule(due);
        Some((
            job,
            tokio::time::Instant::now() + std::time::Duration::from_millis(wait),
        ))
    }

    /// Hands accepted work to the limit stage; its limit-stage place is committed once it is in
    /// the channel.
    async fn dispatch(&self, work: Work, admission: Admission) {
        match self.ready.send(work).await {
            Ok(()) => admission.commit(),
            Err(mpsc::error::SendError(work)) => work.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "gateway shut down before delivery",
            )),
        }
    }
}

/// What [`Ingest::take_place`] got a recipient.
enum Place {
    Taken(Admission, OwnedSemaphorePermit),
    ShuttingDown,
    /// The caller's call ended (cancelled, deadline passed) before the recipient had room.
    CallEnded,
}

/// A validated recipient: where it is packed, and whether its caller id was claimed for
/// idempotency (to be released if it is not taken after all).
struct Valid {
    at: PackedAt,
    claimed: bool,
    /// What the policy stage reads of the recipient.
    input: PolicyInput,
}

/// An admitted message waiting for the store, with what its result needs.
struct Staged {
    waiting: Waiting,
    admission: Admission,
    claimed: bool,
    index: usize,
    message_id: String,
    /// A scheduled message's send time (epoch ms), and what the policy stage checks then.
    due: Option<(i64, crate::work::DueCheck)>,
}

/// The recipient index a field such as `recipients[12].vars` names.
fn recipient_index(field: &str) -> Option<usize> {
    let rest = field.strip_prefix("recipients[")?;
    rest[..rest.find(']')?].parse().ok()
}

/// At most 256 bytes of `text` (cut on a character boundary), for receipts copied per recipient.
fn short(text: &str) -> &str {
    const MAX: usize = 256;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The caller's id, or a fresh one when it gave none.
fn message_id_of(recipient: &Recipient) -> String {
    if recipient.message_id.is_empty() {
        crate::domain::random_uuid().to_string()
    } else {
        recipient.message_id.clone()
    }
}

/// The answer to a resend of a message id seen within the idempotency window: the original
/// outcome when known, else "already accepted and in flight" (non-terminal; the terminal receipt
/// goes to the original request and to subscribers).
fn duplicate(earlier: Earlier) -> Resolution {
    match earlier {
        Earlier::Finished(status) => Resolution::gateway(
            status,
            format!(
                "duplicate message_id: already sent within the idempotency window; original outcome: {}",
                status.as_str()
            ),
        ),
        Earlier::InFlight => Resolution::gateway(
            ReceiptStatus::Retrying,
            "duplicate message_id: already accepted and still in flight; its receipt follows on the original request and SubscribeReceipts",
        ),
    }
}

/// The per-batch state of ingest: validation, refusals and the per-recipient results.
struct Run<'a> {
    ingest: &'a Ingest,
    app_id: Arc<str>,
    sink: Option<&'a CallerSink>,
    stream_rejections: bool,
    seen_ids: HashSet<String>,
    results: Vec<RecipientResult>,
    /// Caller ids claimed for idempotency whose recipients were not taken.
    release: Vec<String>,
    /// Fires when the caller's call ends: recipients not admitted by then are refused.
    call_ended: CancellationToken,
    accepted: Counter,
    rejected: Counter,
}

impl<'a> Run<'a> {
    fn new(
        ingest: &'a Ingest,
        app_id: &Arc<str>,
        sink: Option<&'a CallerSink>,
        stream_rejections: bool,
    ) -> Self {
        let labels = AppLabels {
            app: app_id.to_string(),
        };
        Self {
            ingest,
            app_id: Arc::clone(app_id),
            sink,
            stream_rejections,
            seen_ids: HashSet::new(),
            results: Vec::new(),
            release: Vec::new(),
            call_ended: CancellationToken::new(),
            accepted: ingest.metrics.accepted.get_or_create(&labels).clone(),
            rejected: ingest
                .metrics
                .rejected_at_ingest
                .get_or_create(&labels)
                .clone(),
        }
    }

    /// First half of a batch: validates every recipient (refusals are reported now) and packs
    /// the valid ones into the batch's buffer.
    fn validate_and_pack(
        &mut self,
        batch: &mut AcceptedBatch,
        recipients: Vec<Recipient>,
        earlier: &HashMap<String, Earlier>,
        timing: &Timing,
    ) -> Vec<Valid> {
        let mut packed = PackedRecipients::default();
        let mut valid = Vec::with_capacity(recipients.len());
        self.results.reserve(recipients.len());
        let dates = batch.template.uses_dates();
        for (index, mut recipient) in recipients.into_iter().enumerate() {
            // `date` without a zone renders in the recipient's zone, else the app's default.
            if recipient.timezone.is_empty()
                && (dates || recipient.title.is_some() || recipient.body.is_some())
                && let Some(name) = self.ingest.policy.default_zone_name(&batch.app.id)
            {
                recipient.timezone = name.to_owned();
            }
            let message_id = message_id_of(&recipient);
            let accepted_at = SystemTime::now();
            let meta = |message_id: &str| {
                Arc::new(batch.meta(
                    message_id.to_owned(),
                    recipient.platform,
                    recipient.user_id.clone(),
                    accepted_at,
                ))
            };
            let first = !self.seen_ids.contains(&message_id);
            if let Some(&state) = earlier.get(&message_id).filter(|_| first) {
                self.seen_ids.insert(message_id.clone());
                self.duplicate(meta(&message_id), index, message_id, state);
                continue;
            }
            // A caller id is claimed for idempotency only on its first occurrence.
            let claimed = first && !recipient.message_id.is_empty();
            let choice = batch.template.contents().choose(
                &batch.campaign_id,
                &recipient.user_id,
                &message_id,
                &recipient.locale,
            );
            let set = match choice {
                Choice::Send { set } => set,
                // Validated like any other recipient (its input is as wrong or right).
                Choice::Holdout => 0,
            };
            let checked = self
                .check(batch, &recipient, index, &message_id, accepted_at, set)
                .and_then(|_validated| {
                    self.ingest
                        .policy
                        .inspect(&batch.app.id, &recipient, index, timing)
                        .map(|input| input.reserving(&batch.batch_id, &message_id))
                })
                .and_then(|input| match choice {
                    Choice::Holdout => Ok(None),
                    Choice::Send { set } => packed
                        .push(&recipient, &message_id, index, set, &batch.template)
                        .map(|at| Some((at, input)))
                        .ok_or_else(|| {
                            FieldError::new("recipients", "the batch is too large to hold")
                        }),
                });
            match checked {
                Ok(Some((at, input))) => valid.push(Valid { at, claimed, input }),
                Ok(None) => {
                    // Held out: accepted, and ended at once, unsent. Its id stays claimed, so
                    // a resend is answered with this outcome instead of a second holdout.
                    let mut m = batch.meta(
                        message_id.clone(),
                        recipient.platform,
                        recipient.user_id.clone(),
                        accepted_at,
                    );
                    m.content = batch.template.contents().holdout_label();
                    self.hold_out(Arc::new(m), index, message_id);
                }
                Err(error) => {
                    if claimed {
                        self.release.push(message_id.clone());
                    }
                    self.rejected.inc();
                    self.refuse(meta(&message_id), index, message_id, error);
                }
            }
        }
        batch.set_recipients(packed);
        valid
    }

    /// Validates one recipient by rendering it.
    fn check(
        &mut self,
        batch: &AcceptedBatch,
        recipient: &Recipient,
        index: usize,
        message_id: &str,
        accepted_at: SystemTime,
        content: u16,
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
        let mut recipient = RecipientRef::from(recipient);
        recipient.content = content;
        batch
            .template
            .render_ref(recipient, index, stamp, &batch.ctx)
    }

    /// Ends a held-out recipient: DROPPED `holdout`, through the hub and to the caller.
    fn hold_out(&mut self, meta: Arc<MessageMeta>, index: usize, message_id: String) {
        self.accepted.inc();
        let receipt = self.ingest.hub.decline(
            meta,
            Resolution::gateway(ReceiptStatus::Dropped, crate::render::content::HOLDOUT),
        );
        if let Some(sink) = self.sink {
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
        self.results
            .push(RecipientResult::accepted(index, message_id));
    }

    /// Reports a recipient that was not taken, with a REJECTED receipt through the hub (and to
    /// the caller's stream when it asked for them).
    fn refuse(
        &mut self,
        meta: Arc<MessageMeta>,
        index: usize,
        message_id: String,
        error: FieldError,
    ) {
        let receipt = self.ingest.hub.refuse(meta, Resolution::invalid(&error));
        if let Some(sink) = self.sink.filter(|_| self.stream_rejections) {
            let _ = sink.send(ReceiptEnvelope {
                receipt,
                permit: None,
            });
        }
        self.results.push(RecipientResult::rejected(
            index,
            message_id,
            error.field,
            error.reason,
        ));
    }

    /// Answers a resend of an id seen within the idempotency window. The answer is not a receipt
    /// of the message (that one has, or will have, its own), so it goes to the resend's caller
    /// only, not through the hub: subscribers would read it as a second receipt of the message.
    fn duplicate(
        &mut self,
        meta: Arc<MessageMeta>,
        index: usize,
        message_id: String,
        earlier: Earlier,
    ) {
        let field = format!("recipients[{index}].message_id");
        let resolution = Resolution {
            field: field.clone(),
            ..duplicate(earlier)
        };
        let reason = resolution.reason.clone();
        if let Some(sink) = self.sink {
            let mut receipt = Receipt::new(meta, 0, resolution, None);
            receipt.accepted = false;
            let _ = sink.send(ReceiptEnvelope {
                receipt: Arc::new(receipt),
                permit: None,
            });
        }
        self.results
            .push(RecipientResult::rejected(index, message_id, field, reason));
    }
}
