//! Accepted messages waiting for their turn, kept compact: a batch's shared context
//! ([`AcceptedBatch`]) and the handle of one of its messages ([`Waiting`]).
//!
//! Between ingest and its first provider attempt a message may wait a long time (rate limits, a
//! slow provider), and the accept window lets a million of them do so. Rendered, a message holds
//! its payload (an FCM body repeats the token), its identity strings and a job: well over 1 KB.
//! Waiting, it needs only what its rendering will read. So a [`Waiting`] message is 24 bytes
//! pointing into its batch's shared context ([`AcceptedBatch`]): the compiled template, the
//! caller's sink, and one buffer in which every accepted recipient of the batch is packed (its
//! token, ids, the variables the template uses and any overrides), with no allocation per
//! message. A recipient is rendered at ingest to validate it (the result is dropped) and
//! rendered again when it may go.
//!
//! Like [`Pending`], a waiting message owes a terminal receipt: it counts as in flight from the
//! moment it is accepted, and if it is dropped without being turned into a job or resolved it
//! emits FAILED (through the `Pending` it becomes) and counts as an unresolved drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use super::Job;
use super::packed::{Fields, Packed, PackedAt, PackedRecipients};
use crate::domain::{
    FieldError, MessageMeta, Platform, Priority, ProviderRequest, ReceiptStatus, Template,
};
use crate::receipts::{CallerSink, Pending, ReceiptHub, Resolution};
use crate::registry::AppRuntime;
use crate::render::{CompiledTemplate, RenderContext, Stamp};

/// What every message of one accepted batch shares.
pub struct AcceptedBatch {
    pub app: Arc<AppRuntime>,
    /// Unique to this accepted batch (a caller may send two batches with one `batch_id`): a
    /// durable store names the batch's saved context with it.
    pub key: Arc<str>,
    pub batch_id: Arc<str>,
    pub campaign_id: Arc<str>,
    /// The template as the caller sent it, for a durable store to save.
    pub source: Template,
    pub template: CompiledTemplate,
    pub ctx: RenderContext,
    pub priority: Priority,
    pub ttl: Option<Duration>,
    /// The request's campaign rate limit, messages per minute; 0 means none.
    pub campaign_rate_per_minute: u32,
    /// Where the caller hears about its messages, if it listens.
    pub sink: Option<CallerSink>,
    pub hub: Arc<ReceiptHub>,
    /// The accept-window slots of this batch's waiting messages, merged into one permit (one
    /// slot each is split off as a message becomes a job).
    window_slots: Mutex<Option<OwnedSemaphorePermit>>,
    /// When acceptance of the batch began; each message's own instant is an offset from it.
    started: SystemTime,
    /// The accepted recipients, packed one after the other (see [`PackedRecipients`]).
    recipients: Box<[u8]>,
    /// Set once a durable store has saved the batch's context (the first of its chunks).
    saved: AtomicBool,
}

impl AcceptedBatch {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: Arc<AppRuntime>,
        batch_id: Arc<str>,
        campaign_id: Arc<str>,
        source: Template,
        template: CompiledTemplate,
        ctx: RenderContext,
        ttl: Option<Duration>,
        campaign_rate_per_minute: u32,
        sink: Option<CallerSink>,
        hub: Arc<ReceiptHub>,
    ) -> Self {
        Self {
            app,
            key: crate::domain::random_uuid().simple().to_string().into(),
            batch_id,
            campaign_id,
            priority: template.priority(),
            source,
            template,
            ctx,
            ttl,
            campaign_rate_per_minute,
            sink,
            hub,
            window_slots: Mutex::new(None),
            started: SystemTime::now(),
            recipients: Box::default(),
            saved: AtomicBool::new(false),
        }
    }

    /// A batch as a durable store saved it, for rendering its messages after a crash or a
    /// hand-off. It has no caller sink (the caller that sent it is gone) and holds no window
    /// slots: its messages become detached jobs ([`Self::job_at`]).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        app: Arc<AppRuntime>,
        key: Arc<str>,
        batch_id: Arc<str>,
        campaign_id: Arc<str>,
        source: Template,
        ctx: RenderContext,
        ttl: Option<Duration>,
        campaign_rate_per_minute: u32,
        started: SystemTime,
        recipients: Box<[u8]>,
        hub: Arc<ReceiptHub>,
    ) -> Result<Self, FieldError> {
        let template = CompiledTemplate::compile(&source)?;
        let mut batch = Self::new(
            app,
            batch_id,
            campaign_id,
            source,
            template,
            ctx,
            ttl,
            campaign_rate_per_minute,
            None,
            hub,
        );
        batch.key = key;
        batch.started = started;
        batch.recipients = recipients;
        batch.saved = AtomicBool::new(true);
        Ok(batch)
    }

    /// When acceptance of the batch began; each message's instant is an offset from it.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The packed recipients, as a durable store saves them.
    pub fn packed_recipients(&self) -> &[u8] {
        &self.recipients
    }

    /// Whether a durable store has saved this batch's context already.
    pub fn is_saved(&self) -> bool {
        self.saved.load(Ordering::Acquire)
    }

    /// Records that a durable store saved this batch's context.
    pub fn mark_saved(&self) {
        self.saved.store(true, Ordering::Release);
    }

    /// The identity and rendered request of the recipient packed at byte `at` (its position in
    /// the batch `index`, accepted `accepted_ms` after the batch started): a message restored
    /// from a durable store.
    pub fn job_at(
        &self,
        at: u32,
        index: u32,
        accepted_ms: u32,
    ) -> (MessageMeta, Result<ProviderRequest, FieldError>) {
        let fields = self.recipient_at(at);
        let accepted_at = self.started + Duration::from_millis(u64::from(accepted_ms));
        let meta = self.meta_of(&fields, accepted_at);
        (meta, self.render(&fields, index, accepted_at))
    }

    fn render(
        &self,
        fields: &Fields<'_>,
        index: u32,
        accepted_at: SystemTime,
    ) -> Result<ProviderRequest, FieldError> {
        let stamp = Stamp {
            message_id: fields.message_id,
            accepted_at,
        };
        let token = fields.device_token.text();
        self.template
            .render_ref(fields.recipient(&token), index as usize, stamp, &self.ctx)
    }

    /// Sets the batch's packed recipients, before its messages are taken as waiting.
    pub fn set_recipients(&mut self, packed: PackedRecipients) {
        // Copied into an allocation of the exact size: shrinking the grown buffer in place
        // would keep its whole capacity (allocators keep a block that shrinks by less than
        // half), up to half as much again, for as long as any message of the batch waits.
        self.recipients = Box::from(packed.0.as_slice());
    }

    /// The message id of the recipient packed at `at`.
    pub fn message_id_at(&self, at: PackedAt) -> &str {
        self.recipient_at(at.offset).message_id
    }

    /// The identity of the recipient packed at `at`, as accepted at `accepted_at`.
    pub fn meta_at(&self, at: PackedAt, accepted_at: SystemTime) -> MessageMeta {
        self.meta_of(&self.recipient_at(at.offset), accepted_at)
    }

    fn meta_of(&self, fields: &Fields<'_>, accepted_at: SystemTime) -> MessageMeta {
        let mut meta = self.meta(
            fields.message_id.to_owned(),
            fields.platform,
            fields.user_id.to_owned(),
            accepted_at,
        );
        meta.content = self.template.contents().label(fields.content);
        meta
    }

    /// The fields of the recipient packed at `at`.
    fn recipient_at(&self, at: u32) -> Fields<'_> {
        let bytes = self.recipients.get(at as usize..).unwrap_or_default();
        Packed::unpack(bytes, &self.template)
    }

    /// The identity of one of this batch's messages.
    pub fn meta(
        &self,
        message_id: String,
        platform: Platform,
        user_id: String,
        accepted_at: SystemTime,
    ) -> MessageMeta {
        MessageMeta {
            app_id: Arc::clone(&self.app.id),
            batch_id: Arc::clone(&self.batch_id),
            campaign_id: Arc::clone(&self.campaign_id),
            message_id,
            platform,
            user_id,
            priority: self.priority,
            accepted_at,
            expires_at: self.ttl.map(|t| accepted_at + t),
            campaign_rate_per_minute: self.campaign_rate_per_minute,
            content: Default::default(),
        }
    }

    fn keep_slot(&self, slot: OwnedSemaphorePermit) {
        let mut slots = self.window_slots.lock();
        match slots.as_mut() {
            Some(kept) => kept.merge(slot),
            None => *slots = Some(slot),
        }
    }

    fn take_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.window_slots.lock().as_mut()?.split(1)
    }
}

/// An accepted message before its first attempt. See the module docs.
pub struct Waiting {
    batch: Arc<AcceptedBatch>,
    /// Where the recipient is packed in its batch's buffer; [`Self::LEFT`] once the message has
    /// left this form.
    at: u32,
    /// The recipient's position in its batch, for field names in errors.
    index: u32,
    /// Milliseconds from the batch's start to this message's acceptance.
    accepted_ms: u32,
}

impl Waiting {
    const LEFT: u32 = super::packed::NO_OFFSET;

    /// Takes the recipient packed at `at` in `batch` as accepted now, holding `slot` of the
    /// accept window.
    pub fn new(batch: Arc<AcceptedBatch>, at: PackedAt, slot: OwnedSemaphorePermit) -> Self {
        let accepted_ms = SystemTime::now()
            .duration_since(batch.started)
            .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        batch.keep_slot(slot);
        batch.hub.in_flight().enter();
        Self {
            batch,
            at: at.offset,
            index: at.index,
            accepted_ms,
        }
    }

    pub fn app(&self) -> &Arc<AppRuntime> {
        &self.batch.app
    }

    pub fn batch(&self) -> &Arc<AcceptedBatch> {
        &self.batch
    }

    /// Where the message is packed in its batch: byte offset, position in the batch, and
    /// milliseconds from the batch's start to its acceptance (what a durable store keeps).
    pub fn packed_position(&self) -> (u32, u32, u32) {
        (self.at, self.index, self.accepted_ms)
    }

    fn fields(&self) -> Fields<'_> {
        self.batch.recipient_at(self.at)
    }

    pub fn platform(&self) -> Platform {
        // The flag byte alone: the scheduler asks for every message it queues.
        let flags = self.batch.recipients.get(self.at as usize).copied();
        Packed::platform(flags.unwrap_or(0))
    }

    pub fn message_id(&self) -> &str {
        self.fields().message_id
    }

    pub fn accepted_at(&self) -> SystemTime {
        self.batch.started + Duration::from_millis(u64::from(self.accepted_ms))
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        self.batch.ttl.map(|ttl| self.accepted_at() + ttl)
    }

    /// The message's identity, as its receipt will carry it.
    pub fn meta(&self) -> MessageMeta {
        self.batch.meta_of(&self.fields(), self.accepted_at())
    }

    /// Renders the provider request, leaving the message as it is (a durable store persists
    /// what it will send).
    pub fn render(&self) -> Result<ProviderRequest, FieldError> {
        self.render_fields(&self.fields(), self.accepted_at())
    }

    fn render_fields(
        &self,
        fields: &Fields<'_>,
        accepted_at: SystemTime,
    ) -> Result<ProviderRequest, FieldError> {
        self.batch.render(fields, self.index, accepted_at)
    }

    /// Renders the message for its first attempt. A rendering error (the recipient passed the
    /// same rendering at ingest, so this is not expected) ends it REJECTED naming the field.
    pub fn into_job(mut self) -> Option<Job> {
        let (pending, rendered) = {
            let fields = self.fields();
            let pending = self.pending(&fields);
            let rendered = self.render_fields(&fields, pending.meta().accepted_at);
            (pending, rendered)
        };
        self.at = Self::LEFT;
        match rendered {
            Ok(request) => Some(Job {
                pending,
                request,
                app: Arc::clone(&self.batch.app),
                due: None,
            }),
            Err(error) => {
                pending.resolve(Resolution {
                    field: error.field,
                    ..Resolution::gateway(ReceiptStatus::Rejected, error.reason)
                });
                None
            }
        }
    }

    /// Releases the message without a terminal receipt: it lives on in a durable store, and
    /// whichever replica finishes it emits the receipt (shutdown).
    pub fn hand_off(mut self) {
        let pending = self.pending(&self.fields());
        self.at = Self::LEFT;
        pending.hand_off();
    }

    /// Ends the message without an attempt.
    pub fn resolve(mut self, resolution: Resolution) {
        let pending = self.pending(&self.fields());
        self.at = Self::LEFT;
        pending.resolve(resolution);
    }

    /// Ends a message the store could not make safe: it was not accepted after all (see
    /// [`Pending::resolve_unaccepted`]).
    pub fn resolve_unaccepted(mut self, resolution: Resolution) {
        let pending = self.pending(&self.fields());
        self.at = Self::LEFT;
        pending.resolve_unaccepted(resolution);
    }

    /// The receipt handle the message becomes (it was counted in flight when it was accepted).
    /// The caller marks the message as left ([`Self::LEFT`]).
    fn pending(&self, fields: &Fields<'_>) -> Pending {
        let batch = &self.batch;
        let meta = batch.meta_of(fields, self.accepted_at());
        Pending::accepted_earlier(
            Arc::new(meta),
            batch.sink.clone(),
            Arc::clone(&batch.hub),
            batch.take_slot(),
        )
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.at != Self::LEFT {
            let pending = self.pending(&self.fields());
            self.at = Self::LEFT;
            // Dropped unresolved: the Pending's own drop emits FAILED and counts it.
            drop(pending);
        }
    }
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("app", &self.batch.app.id)
            .field("message_id", &self.message_id())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Recipient;
    use crate::metrics::Metrics;
    use tokio::sync::{Semaphore, mpsc};

    fn recipient() -> Recipient {
        super::super::packed::tests::recipient()
    }

    fn template(title: &str) -> CompiledTemplate {
        super::super::packed::tests::template(title)
    }

    fn batch(hub: Arc<ReceiptHub>, sink: CallerSink, template: CompiledTemplate) -> AcceptedBatch {
        let app = Arc::new(AppRuntime {
            id: "app".into(),
            apns_topic: "com.example".into(),
            apns: None,
            fcm: None,
            retry: Default::default(),
        });
        let ctx = RenderContext {
            apns_topic: "com.example".into(),
            analytics_label: None,
        };
        AcceptedBatch::new(
            app,
            "b".into(),
            "c".into(),
            Template::default(),
            template,
            ctx,
            None,
            0,
            Some(sink),
            hub,
        )
    }

    #[test]
    fn a_waiting_message_renders_into_a_job_and_releases_its_window_slot_with_its_receipt() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(ReceiptHub::new(Arc::clone(&metrics)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(2));
        let template = template("Hi {{ first_name }}");
        let mut accepted = batch(Arc::clone(&hub), tx, template);
        let mut packed = PackedRecipients::default();
        let mut r = recipient();
        r.body = None;
        let at = [
            packed.push(&r, "m-0", 0, 0, &accepted.template).unwrap(),
            packed.push(&r, "m-1", 1, 0, &accepted.template).unwrap(),
        ];
        accepted.set_recipients(packed);
        let accepted = Arc::new(accepted);
        let slot = || Arc::clone(&window).try_acquire_owned().unwrap();
        let waiting: Vec<_> = at
            .into_iter()
            .map(|at| Waiting::new(Arc::clone(&accepted), at, slot()))
            .collect();
        assert_eq!(window.available_permits(), 0);
        assert_eq!(metrics.in_flight.get(), 2);
        let [first, second] = <[Waiting; 2]>::try_from(waiting).unwrap();
        assert_eq!(first.message_id(), "m-0");
        assert_eq!(second.platform(), Platform::Fcm);

        let job = first.into_job().expect("renders");
        assert_eq!(job.pending.meta().message_id, "m-0");
        assert_eq!(job.pending.meta().user_id, "user-1");
        let crate::domain::ProviderRequest::Fcm(request) = &job.request else {
            panic!("an FCM request");
        };
        assert_eq!(request.device_token, r.device_token);
        let body = std::str::from_utf8(&request.body).unwrap();
        assert!(body.contains(r#""title":"Hi Ada""#), "{body}");
        job.pending
            .resolve(Resolution::gateway(ReceiptStatus::Delivered, ""));
        let delivered = rx.try_recv().unwrap();
        assert_eq!(delivered.receipt.status, ReceiptStatus::Delivered);
        assert_eq!(
            window.available_permits(),
            0,
            "the slot travels with the receipt"
        );
        drop(delivered);
        assert_eq!(window.available_permits(), 1);

        drop(second);
        let dropped = rx.try_recv().unwrap();
        assert_eq!(dropped.receipt.status, ReceiptStatus::Failed);
        assert_eq!(dropped.receipt.meta.message_id, "m-1");
        assert!(rx.try_recv().is_err(), "one terminal receipt each");
        drop(dropped);
        assert_eq!(window.available_permits(), 2);
        assert_eq!(metrics.unresolved_drops.get(), 1);
        assert_eq!(metrics.in_flight.get(), 0);
    }
}
