//! Accepted messages waiting for their turn, kept compact.
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
    /// The accepted recipients, packed one after the other (see [`PackedRecipients`]).
    recipients: Box<[u8]>,
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
            recipients: Box::default(),
        }
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
        self.meta(
            fields.message_id.to_owned(),
            fields.platform,
            fields.user_id.to_owned(),
            accepted_at,
        )
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
    const LEFT: u32 = u32::MAX;

    /// Takes the recipient packed at `at` in `batch` as accepted now, holding `slot` of the
    /// accept window.
    pub fn new(batch: Arc<AcceptedBatch>, at: PackedAt, slot: OwnedSemaphorePermit) -> Self {
        let accepted_ms = SystemTime::now()
            .duration_since(batch.started)
            .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        batch.keep_slot(slot);
        batch.hub.metrics().in_flight.inc();
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

    pub fn batch(&self) -> &AcceptedBatch {
        &self.batch
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

    /// Renders the message for its first attempt. A rendering error (the recipient passed the
    /// same rendering at ingest, so this is not expected) ends it REJECTED naming the field.
    pub fn into_job(mut self) -> Option<Job> {
        let (pending, rendered) = {
            let batch = &self.batch;
            let fields = self.fields();
            let pending = self.pending(&fields);
            let stamp = Stamp {
                message_id: fields.message_id,
                accepted_at: pending.meta().accepted_at,
            };
            let token = fields.device_token.text();
            let recipient = fields.recipient(&token);
            let index = self.index as usize;
            let rendered = batch
                .template
                .render_ref(recipient, index, stamp, &batch.ctx);
            (pending, rendered)
        };
        self.at = Self::LEFT;
        match rendered {
            Ok(request) => Some(Job {
                pending,
                request,
                app: Arc::clone(&self.batch.app),
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
        let pending = self.pending(&self.fields());
        self.at = Self::LEFT;
        pending.resolve(resolution);
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

/// The accepted recipients of one batch, packed one after the other into one buffer.
///
/// A recipient is a flag byte (platform, which text overrides are present, how variables are
/// named), then length-prefixed (LEB128) strings: device token, message id, user id, title and
/// body when present, the APNs and FCM overrides; then the number of variables and each name and
/// value. Only the variables the template uses are kept, named by their index in the template's
/// sorted list of names; a recipient that overrides a text (which may use any variable) keeps all
/// of them, by name.
#[derive(Default)]
pub struct PackedRecipients(Vec<u8>);

/// Where [`PackedRecipients::push`] put a recipient.
#[derive(Debug, Clone, Copy)]
pub struct PackedAt {
    offset: u32,
    index: u32,
}

impl PackedAt {
    /// The recipient's position in its batch.
    pub fn index(&self) -> usize {
        self.index as usize
    }
}

const FCM: u8 = 1;
const HAS_TITLE: u8 = 2;
const HAS_BODY: u8 = 4;
const NAMES_INLINE: u8 = 8;
const TOKEN_AS_BYTES: u8 = 16;

/// True for an APNs token kept as bytes: lower-case hex of whole bytes, which hex-encoding the
/// bytes gives back exactly (half the room of the text).
fn token_as_bytes(platform: Platform, token: &str) -> bool {
    platform == Platform::Apns
        && !token.is_empty()
        && token.len().is_multiple_of(2)
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        _ => digit.wrapping_sub(b'a').wrapping_add(10) & 0x0f,
    }
}

impl PackedRecipients {
    /// Packs `recipient` (the `index`th of its batch) under `message_id`; `None` when the
    /// buffer is full (4 GiB, far beyond any gRPC message).
    pub fn push(
        &mut self,
        recipient: &Recipient,
        message_id: &str,
        index: usize,
        template: &CompiledTemplate,
    ) -> Option<PackedAt> {
        let offset = u32::try_from(self.0.len())
            .ok()
            .filter(|&o| o != Waiting::LEFT)?;
        let out = &mut self.0;
        let names_inline = recipient.title.is_some() || recipient.body.is_some();
        let token_bytes = token_as_bytes(recipient.platform, &recipient.device_token);
        let mut flags = match recipient.platform {
            Platform::Apns => 0,
            Platform::Fcm => FCM,
        };
        for (present, flag) in [
            (recipient.title.is_some(), HAS_TITLE),
            (recipient.body.is_some(), HAS_BODY),
            (names_inline, NAMES_INLINE),
            (token_bytes, TOKEN_AS_BYTES),
        ] {
            if present {
                flags |= flag;
            }
        }
        out.push(flags);
        if token_bytes {
            let hex = recipient.device_token.as_bytes();
            put_len(out, hex.len() / 2);
            out.extend(
                hex.chunks_exact(2)
                    .map(|pair| hex_value(pair[0]) << 4 | hex_value(pair[1])),
            );
        } else {
            put_str(out, &recipient.device_token);
        }
        let strings = [message_id, &recipient.user_id];
        for s in strings
            .into_iter()
            .chain(recipient.title.as_deref())
            .chain(recipient.body.as_deref())
            .chain([recipient.apns_json.as_str(), &recipient.fcm_json])
        {
            put_str(out, s);
        }
        if names_inline {
            put_len(out, recipient.vars.len());
            for (name, value) in &recipient.vars {
                put_str(out, name);
                put_str(out, value);
            }
        } else {
            let used = || {
                recipient
                    .vars
                    .iter()
                    .filter_map(|(name, value)| Some((template.variable_index(name)?, value)))
            };
            put_len(out, used().count());
            for (name, value) in used() {
                put_len(out, name);
                put_str(out, value);
            }
        }
        Some(PackedAt {
            offset,
            index: u32::try_from(index).unwrap_or(u32::MAX),
        })
    }
}

/// The fields of a packed recipient, borrowed.
struct Fields<'a> {
    platform: Platform,
    device_token: Token<'a>,
    message_id: &'a str,
    user_id: &'a str,
    title: Option<&'a str>,
    body: Option<&'a str>,
    apns_json: &'a str,
    fcm_json: &'a str,
    vars: PackedVars<'a>,
}

/// A packed device token.
enum Token<'a> {
    Text(&'a str),
    /// An APNs token's bytes (see [`token_as_bytes`]).
    Bytes(&'a [u8]),
}

impl<'a> Token<'a> {
    fn text(&self) -> std::borrow::Cow<'a, str> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        match self {
            Token::Text(text) => std::borrow::Cow::Borrowed(text),
            Token::Bytes(bytes) => bytes
                .iter()
                .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0x0f)]])
                .map(char::from)
                .collect(),
        }
    }
}

impl<'a> Fields<'a> {
    /// What rendering reads; `device_token` is [`Token::text`].
    fn recipient(&'a self, device_token: &'a str) -> RecipientRef<'a> {
        RecipientRef {
            platform: self.platform,
            device_token,
            vars: &self.vars,
            title: self.title,
            body: self.body,
            apns_json: self.apns_json,
            fcm_json: self.fcm_json,
        }
    }
}

struct Packed;

impl Packed {
    fn platform(flags: u8) -> Platform {
        if flags & FCM != 0 {
            Platform::Fcm
        } else {
            Platform::Apns
        }
    }

    /// Reads the recipient at the start of `bytes`, packed for `template`.
    fn unpack<'a>(bytes: &'a [u8], template: &'a CompiledTemplate) -> Fields<'a> {
        let flags = bytes.first().copied().unwrap_or(0);
        let mut r = Reader(bytes.get(1..).unwrap_or_default());
        let device_token = if flags & TOKEN_AS_BYTES != 0 {
            Token::Bytes(r.bytes())
        } else {
            Token::Text(r.str())
        };
        let message_id = r.str();
        let user_id = r.str();
        let title = (flags & HAS_TITLE != 0).then(|| r.str());
        let body = (flags & HAS_BODY != 0).then(|| r.str());
        let apns_json = r.str();
        let fcm_json = r.str();
        let count = r.len();
        Fields {
            platform: Packed::platform(flags),
            device_token,
            message_id,
            user_id,
            title,
            body,
            apns_json,
            fcm_json,
            vars: PackedVars {
                bytes: r.0,
                count,
                names: (flags & NAMES_INLINE == 0).then_some(template),
            },
        }
    }
}

/// Name and value pairs, packed; looked up by a linear scan (a template uses a handful). Names
/// are inline, or indexes into the template's names.
struct PackedVars<'a> {
    bytes: &'a [u8],
    count: usize,
    names: Option<&'a CompiledTemplate>,
}

impl Vars for PackedVars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        let mut r = Reader(self.bytes);
        match self.names {
            Some(template) => {
                let wanted = template.variable_index(name)?;
                for _ in 0..self.count {
                    let index = r.len();
                    let value = r.str();
                    if index == wanted {
                        return Some(value);
                    }
                }
            }
            None => {
                for _ in 0..self.count {
                    let key = r.str();
                    let value = r.str();
                    if key == name {
                        return Some(value);
                    }
                }
            }
        }
        None
    }
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Reads what [`put_str`] wrote. The bytes are always our own packing; should they ever not be,
/// reading yields empty strings rather than a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn len(&mut self) -> usize {
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
        len
    }

    fn bytes(&mut self) -> &'a [u8] {
        let len = self.len().min(self.0.len());
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        bytes
    }

    fn str(&mut self) -> &'a str {
        std::str::from_utf8(self.bytes()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::Template;
    use std::collections::BTreeMap;
    use tokio::sync::{Semaphore, mpsc};

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
        CompiledTemplate::compile(&Template {
            title: title.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn packing_round_trips_every_field() {
        let template = template("Hi {{ first_name }}, {{ cart }}");
        let mut packed = PackedRecipients::default();
        let mut plain = recipient();
        plain.body = None;
        plain.platform = Platform::Apns;
        let first = packed.push(&plain, "m-0", 0, &template).unwrap();
        let r = recipient();
        let second = packed.push(&r, "m-1", 1, &template).unwrap();
        assert!(second.offset > first.offset);
        assert_eq!(second.index, 1);

        let f = Packed::unpack(&packed.0[second.offset as usize..], &template);
        assert_eq!(f.platform, Platform::Fcm);
        assert_eq!(
            f.device_token.text(),
            r.device_token,
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

        let f = Packed::unpack(&packed.0[first.offset as usize..], &template);
        assert_eq!(f.platform, Platform::Apns);
        assert_eq!(f.message_id, "m-0");
        assert_eq!(f.body, None);
        assert_eq!(f.vars.get("first_name"), Some("Ada"));
        assert_eq!(f.vars.get("cart"), None, "used by the template, absent");
        assert_eq!(
            f.vars.get("unused"),
            None,
            "not used by the template: not kept"
        );
        assert!(
            second.offset < 400,
            "the unused variable took no room: {} bytes",
            second.offset
        );
    }

    #[test]
    fn apns_tokens_of_lower_case_hex_are_kept_as_bytes_and_read_back_exactly() {
        let template = template("Hi");
        let mut r = recipient();
        r.platform = Platform::Apns;
        r.body = None;
        for (token, as_bytes) in [
            ("00ff7a9b".repeat(8), true),
            ("00FF7A9B".repeat(8), false),
            ("abc".to_owned(), false),
            ("zz".to_owned(), false),
        ] {
            r.device_token = token.clone();
            let mut packed = PackedRecipients::default();
            packed.push(&r, "m", 0, &template).unwrap();
            let f = Packed::unpack(&packed.0, &template);
            assert_eq!(f.device_token.text(), token);
            assert_eq!(
                matches!(f.device_token, Token::Bytes(_)),
                as_bytes,
                "{token}"
            );
            assert_eq!(f.message_id, "m");
        }
        r.platform = Platform::Fcm;
        r.device_token = "ab".repeat(40);
        let mut packed = PackedRecipients::default();
        packed.push(&r, "m", 0, &template).unwrap();
        let f = Packed::unpack(&packed.0, &template);
        assert!(
            matches!(f.device_token, Token::Text(_)),
            "FCM tokens stay text"
        );
    }

    #[test]
    fn a_damaged_packing_reads_as_empty_strings_not_a_panic() {
        let template = template("{{ a }}");
        for bytes in [
            &[][..],
            &[1],
            &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[0, 5, b'a'],
            &[0, 0, 0, 0, 0, 0, 9, 0],
        ] {
            let f = Packed::unpack(bytes, &template);
            assert!(f.message_id.is_empty());
            assert_eq!(f.vars.get("a").unwrap_or_default(), "");
        }
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
            packed.push(&r, "m-0", 0, &accepted.template).unwrap(),
            packed.push(&r, "m-1", 1, &accepted.template).unwrap(),
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
        let crate::model::ProviderRequest::Fcm(request) = &job.request else {
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
