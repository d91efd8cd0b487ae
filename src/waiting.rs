//! Accepted messages waiting for their turn, kept compact.
//!
//! Between ingest and its first provider attempt a message may wait a long time (rate limits, a
//! slow provider), and the accept window lets a million of them do so. Rendered, a message holds
//! its payload (an FCM body repeats the token), its identity strings and a job: well over 1 KB.
//! Waiting, it needs only what its rendering will read. So a [`Waiting`] message is the batch's
//! shared context ([`AcceptedBatch`], once per batch) plus the recipient's own strings packed in
//! one allocation: its token, ids, the variables the template uses and any overrides. It is
//! rendered at ingest to validate it (the result is dropped), and rendered again when it may go.
//!
//! Like [`Pending`], a waiting message owes a terminal receipt: it counts as in flight from the
//! moment it is accepted, and if it is dropped without being turned into a job or resolved it
//! emits FAILED (through the `Pending` it becomes) and counts as an unresolved drop.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use crate::model::{MessageMeta, Platform, Priority, ReceiptStatus, Recipient};
use crate::pipeline::Job;
use crate::receipts::{CallerSink, Pending, ReceiptHub, Resolution};
use crate::registry::AppRuntime;
use crate::render::template::Vars;
use crate::render::{CompiledTemplate, RecipientRef, RenderContext, Stamp};

/// What every message of one accepted batch shares.
pub struct AcceptedBatch {
    pub app: Arc<AppRuntime>,
    pub batch_id: Arc<str>,
    pub campaign_id: Arc<str>,
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
}

impl AcceptedBatch {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: Arc<AppRuntime>,
        batch_id: Arc<str>,
        campaign_id: Arc<str>,
        template: CompiledTemplate,
        ctx: RenderContext,
        ttl: Option<Duration>,
        campaign_rate_per_minute: u32,
        sink: Option<CallerSink>,
        hub: Arc<ReceiptHub>,
    ) -> Self {
        Self {
            app,
            batch_id,
            campaign_id,
            priority: template.priority(),
            template,
            ctx,
            ttl,
            campaign_rate_per_minute,
            sink,
            hub,
            window_slots: Mutex::new(None),
            started: SystemTime::now(),
        }
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
    /// The recipient's strings (see [`Packed`]); empty once the message has left this form.
    packed: Box<[u8]>,
    /// The recipient's position in its batch, for field names in errors.
    index: u32,
    /// Milliseconds from the batch's start to this message's acceptance.
    accepted_ms: u32,
}

impl Waiting {
    /// Takes `recipient` (validated) as accepted at `accepted_at`, holding `slot` of the accept
    /// window. `message_id` is its own or the one the gateway gave it.
    pub fn new(
        batch: Arc<AcceptedBatch>,
        recipient: &Recipient,
        message_id: &str,
        index: usize,
        accepted_at: SystemTime,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        let packed = Packed::pack(recipient, message_id, &batch.template);
        let accepted_ms = accepted_at
            .duration_since(batch.started)
            .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        batch.keep_slot(slot);
        batch.hub.metrics().in_flight.inc();
        Self {
            batch,
            packed,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            accepted_ms,
        }
    }

    pub fn app(&self) -> &Arc<AppRuntime> {
        &self.batch.app
    }

    pub fn batch(&self) -> &AcceptedBatch {
        &self.batch
    }

    pub fn platform(&self) -> Platform {
        Packed::platform(&self.packed)
    }

    pub fn message_id(&self) -> &str {
        Packed::unpack(&self.packed).message_id
    }

    pub fn accepted_at(&self) -> SystemTime {
        self.batch.started + Duration::from_millis(u64::from(self.accepted_ms))
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        self.batch.ttl.map(|ttl| self.accepted_at() + ttl)
    }

    /// Renders the message for its first attempt. A rendering error (the recipient passed the
    /// same rendering at ingest, so this is not expected) ends it REJECTED naming the field.
    pub fn into_job(mut self) -> Option<Job> {
        let packed = std::mem::take(&mut self.packed);
        let fields = Packed::unpack(&packed);
        let pending = self.pending(&fields);
        let stamp = Stamp {
            message_id: fields.message_id,
            accepted_at: pending.meta().accepted_at,
        };
        let batch = &self.batch;
        let index = self.index as usize;
        match batch
            .template
            .render_ref(fields.recipient(), index, stamp, &batch.ctx)
        {
            Ok(request) => Some(Job {
                pending,
                request,
                app: Arc::clone(&batch.app),
                durable: false,
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

    /// Ends the message without an attempt.
    pub fn resolve(mut self, resolution: Resolution) {
        let packed = std::mem::take(&mut self.packed);
        self.pending(&Packed::unpack(&packed)).resolve(resolution);
    }

    /// The receipt handle the message becomes; it was counted in flight when it was accepted.
    fn pending(&self, fields: &Fields<'_>) -> Pending {
        let batch = &self.batch;
        let meta = batch.meta(
            fields.message_id.to_owned(),
            fields.platform,
            fields.user_id.to_owned(),
            self.accepted_at(),
        );
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
        if !self.packed.is_empty() {
            let packed = std::mem::take(&mut self.packed);
            // Dropped unresolved: the Pending's own drop emits FAILED and counts it.
            drop(self.pending(&Packed::unpack(&packed)));
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

/// The packed recipient: a flag byte (platform, and which text overrides are present), then
/// length-prefixed (LEB128) strings: device token, message id, user id, title and body when
/// present, APNs and FCM overrides, then variable name and value pairs to the end. Only the
/// variables the template uses are kept, unless the recipient overrides a text (which may use
/// any of them).
struct Packed;

const FCM: u8 = 1;
const HAS_TITLE: u8 = 2;
const HAS_BODY: u8 = 4;

/// The fields of a packed recipient, borrowed.
struct Fields<'a> {
    platform: Platform,
    device_token: &'a str,
    message_id: &'a str,
    user_id: &'a str,
    title: Option<&'a str>,
    body: Option<&'a str>,
    apns_json: &'a str,
    fcm_json: &'a str,
    vars: PackedVars<'a>,
}

impl<'a> Fields<'a> {
    fn recipient(&'a self) -> RecipientRef<'a> {
        RecipientRef {
            platform: self.platform,
            device_token: self.device_token,
            vars: &self.vars,
            title: self.title,
            body: self.body,
            apns_json: self.apns_json,
            fcm_json: self.fcm_json,
        }
    }
}

impl Packed {
    fn pack(recipient: &Recipient, message_id: &str, template: &CompiledTemplate) -> Box<[u8]> {
        let keep_all = recipient.title.is_some() || recipient.body.is_some();
        let vars = recipient
            .vars
            .iter()
            .filter(|(name, _)| keep_all || template.uses_variable(name));
        let strings = [
            recipient.device_token.as_str(),
            message_id,
            &recipient.user_id,
        ];
        let optional = [recipient.title.as_deref(), recipient.body.as_deref()];
        let overrides = [recipient.apns_json.as_str(), &recipient.fcm_json];
        let len = 1
            + strings
                .iter()
                .chain(optional.iter().flatten())
                .chain(&overrides)
                .map(|s| encoded_len(s))
                .sum::<usize>()
            + vars
                .clone()
                .map(|(k, v)| encoded_len(k) + encoded_len(v))
                .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        let mut flags = match recipient.platform {
            Platform::Apns => 0,
            Platform::Fcm => FCM,
        };
        if recipient.title.is_some() {
            flags |= HAS_TITLE;
        }
        if recipient.body.is_some() {
            flags |= HAS_BODY;
        }
        out.push(flags);
        for s in strings
            .iter()
            .chain(optional.iter().flatten())
            .chain(&overrides)
        {
            put_str(&mut out, s);
        }
        for (name, value) in vars {
            put_str(&mut out, name);
            put_str(&mut out, value);
        }
        out.into_boxed_slice()
    }

    fn platform(packed: &[u8]) -> Platform {
        match packed.first() {
            Some(flags) if flags & FCM != 0 => Platform::Fcm,
            _ => Platform::Apns,
        }
    }

    fn unpack(packed: &[u8]) -> Fields<'_> {
        let flags = packed.first().copied().unwrap_or(0);
        let mut r = Reader(packed.get(1..).unwrap_or_default());
        let device_token = r.str();
        let message_id = r.str();
        let user_id = r.str();
        let title = (flags & HAS_TITLE != 0).then(|| r.str());
        let body = (flags & HAS_BODY != 0).then(|| r.str());
        let apns_json = r.str();
        let fcm_json = r.str();
        Fields {
            platform: Packed::platform(packed),
            device_token,
            message_id,
            user_id,
            title,
            body,
            apns_json,
            fcm_json,
            vars: PackedVars(r.0),
        }
    }
}

/// Name and value pairs, packed; looked up by a linear scan (a template uses a handful).
struct PackedVars<'a>(&'a [u8]);

impl Vars for PackedVars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        let mut r = Reader(self.0);
        while !r.0.is_empty() {
            let key = r.str();
            let value = r.str();
            if key == name {
                return Some(value);
            }
        }
        None
    }
}

fn encoded_len(s: &str) -> usize {
    let mut n = s.len();
    let mut prefix = 1;
    while n >= 0x80 {
        n >>= 7;
        prefix += 1;
    }
    prefix + s.len()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Reads what [`put_str`] wrote. The bytes are always our own packing; should they ever not be,
/// reading yields empty strings rather than a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn str(&mut self) -> &'a str {
        let mut len = 0usize;
        let mut shift = 0;
        while let Some((&byte, rest)) = self.0.split_first() {
            self.0 = rest;
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 || shift > 28 {
                break;
            }
        }
        let len = len.min(self.0.len());
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn recipient() -> Recipient {
        Recipient {
            message_id: String::new(),
            platform: Platform::Fcm,
            device_token: "t".repeat(300),
            vars: BTreeMap::from([
                ("first_name".to_owned(), "Ada".to_owned()),
                ("unused".to_owned(), "x".repeat(1000)),
            ]),
            user_id: "user-1".into(),
            locale: String::new(),
            timezone: String::new(),
            apns_json: String::new(),
            fcm_json: r#"{"data":{"k":"v"}}"#.into(),
            title: None,
            body: Some("Ünïcode {{ first_name }}".into()),
        }
    }

    fn template(title: &str) -> CompiledTemplate {
        CompiledTemplate::compile(&crate::model::Template {
            title: title.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn packing_round_trips_every_field() {
        let r = recipient();
        let packed = Packed::pack(&r, "m-1", &template("Hi {{ first_name }}"));
        let f = Packed::unpack(&packed);
        assert_eq!(f.platform, Platform::Fcm);
        assert_eq!(
            f.device_token, r.device_token,
            "a length over one LEB128 byte"
        );
        assert_eq!(f.message_id, "m-1");
        assert_eq!(f.user_id, "user-1");
        assert_eq!(f.title, None);
        assert_eq!(f.body, Some("Ünïcode {{ first_name }}"));
        assert_eq!(f.apns_json, "");
        assert_eq!(f.fcm_json, r.fcm_json);
        assert_eq!(f.vars.get("first_name"), Some("Ada"));
        assert_eq!(
            f.vars.get("unused").map(str::len),
            Some(1000),
            "a text override may use any variable, so all are kept"
        );
        assert_eq!(f.vars.get("missing"), None);
    }

    #[test]
    fn keeps_only_the_variables_the_template_uses() {
        let mut r = recipient();
        r.body = None;
        let packed = Packed::pack(&r, "m-1", &template("Hi {{ first_name }}"));
        let f = Packed::unpack(&packed);
        assert_eq!(f.vars.get("first_name"), Some("Ada"));
        assert_eq!(f.vars.get("unused"), None);
        assert!(packed.len() < 400, "{} bytes", packed.len());
    }

    #[test]
    fn a_damaged_packing_reads_as_empty_strings_not_a_panic() {
        for packed in [
            &[][..],
            &[1],
            &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[0, 5, b'a'],
        ] {
            let f = Packed::unpack(packed);
            assert!(f.message_id.is_empty());
            assert_eq!(f.vars.get("x"), None);
        }
    }
}
