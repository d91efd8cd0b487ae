//! Domain types shared by every stage of the data path: what a batch, a recipient, a message's
//! identity, a provider outcome and a receipt are.
//!
//! These are plain Rust types: they know nothing of protobuf, HTTP or Redis. The gRPC edge
//! translates protobuf into them, providers translate them into requests. The unit of work that
//! carries a message through the stages is in [`crate::work`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

/// Which push service a recipient is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    Apns,
    Fcm,
}

impl Platform {
    /// Lower-case name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
        }
    }
}

/// Delivery urgency requested by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// The provider's default for the kind of push.
    #[default]
    Default,
    /// Power-aware delivery (APNs 5, FCM NORMAL).
    Normal,
    /// Immediate delivery (APNs 10, FCM HIGH); also the transactional lane.
    High,
}

/// The APNs push type; FCM ignores it except for background (data-only) pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushType {
    Alert,
    Background,
    Voip,
    Complication,
    FileProvider,
    Mdm,
    LiveActivity,
    Location,
    PushToTalk,
    Widgets,
    Controls,
}

impl PushType {
    /// The `apns-push-type` header value.
    pub fn header_value(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Background => "background",
            PushType::Voip => "voip",
            PushType::Complication => "complication",
            PushType::FileProvider => "fileprovider",
            PushType::Mdm => "mdm",
            PushType::LiveActivity => "liveactivity",
            PushType::Location => "location",
            PushType::PushToTalk => "pushtotalk",
            PushType::Widgets => "widgets",
            PushType::Controls => "controls",
        }
    }

    /// The suffix APNs requires on `apns-topic` for this push type (appended to the bundle id).
    pub fn topic_suffix(self) -> &'static str {
        match self {
            PushType::Alert | PushType::Background | PushType::Mdm => "",
            PushType::Voip => ".voip",
            PushType::Complication => ".complication",
            PushType::FileProvider => ".pushkit.fileprovider",
            PushType::LiveActivity => ".push-type.liveactivity",
            PushType::Location => ".location-query",
            PushType::PushToTalk => ".voip-ptt",
            PushType::Widgets => ".push-type.widgets",
            PushType::Controls => ".push-type.controls",
        }
    }

    /// Largest APNs payload for this push type, in bytes.
    pub fn max_payload_bytes(self) -> usize {
        match self {
            PushType::Voip => 5120,
            _ => 4096,
        }
    }
}

/// The content shared by every recipient of a batch, before personalization. Its `Debug`
/// shows texts, URLs and raw JSON as lengths and `data` by key only: a batch's template can
/// carry personal data (a transactional message, a deep link with an id).
#[derive(Clone, Default)]
pub struct Template {
    pub title: String,
    pub subtitle: String,
    pub body: String,
    pub image_url: String,
    pub deep_link: String,
    pub sound: String,
    pub badge: Option<u32>,
    pub category: String,
    pub thread_id: String,
    pub data: BTreeMap<String, String>,
    pub collapse_key: String,
    /// How long the provider may hold the message; `None` means the provider default.
    pub ttl: Option<Duration>,
    pub priority: Priority,
    /// `None` means alert, or background when only `content_available` is set.
    pub push_type: Option<PushType>,
    pub content_available: bool,
    pub mutable_content: bool,
    /// Raw JSON (an object) deep-merged into the APNs payload last.
    pub apns_json: String,
    /// Raw JSON (an object) deep-merged into the FCM `message` last.
    pub fcm_json: String,
    pub android_channel_id: String,
    /// Per-locale texts by language tag (`pt-BR`, `pt`): see [`crate::render::content`].
    pub locales: BTreeMap<String, LocalizedText>,
    /// An A/B test of the campaign's texts, with an optional holdout.
    pub experiment: Option<Experiment>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::Len;
        f.debug_struct("Template")
            .field("title", &Len(&self.title))
            .field("subtitle", &Len(&self.subtitle))
            .field("body", &Len(&self.body))
            .field("image_url", &Len(&self.image_url))
            .field("deep_link", &Len(&self.deep_link))
            .field("sound", &self.sound)
            .field("badge", &self.badge)
            .field("category", &self.category)
            .field("thread_id", &Len(&self.thread_id))
            .field("data", &self.data.keys().collect::<Vec<_>>())
            .field("collapse_key", &Len(&self.collapse_key))
            .field("ttl", &self.ttl)
            .field("priority", &self.priority)
            .field("push_type", &self.push_type)
            .field("content_available", &self.content_available)
            .field("mutable_content", &self.mutable_content)
            .field("apns_json", &Len(&self.apns_json))
            .field("fcm_json", &Len(&self.fcm_json))
            .field("android_channel_id", &self.android_channel_id)
            .field("locales", &self.locales)
            .field("experiment", &self.experiment)
            .finish()
    }
}

/// A title, subtitle and body; an empty one falls back to the text it replaces. Its `Debug`
/// shows lengths only.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LocalizedText {
    pub title: String,
    pub subtitle: String,
    pub body: String,
}

impl std::fmt::Debug for LocalizedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::Len;
        f.debug_struct("LocalizedText")
            .field("title", &Len(&self.title))
            .field("subtitle", &Len(&self.subtitle))
            .field("body", &Len(&self.body))
            .finish()
    }
}

impl LocalizedText {
    pub fn is_empty(&self) -> bool {
        self.title.is_empty() && self.subtitle.is_empty() && self.body.is_empty()
    }
}

/// Variants of a campaign's texts and a holdout, each recipient assigned deterministically.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Experiment {
    pub variants: Vec<Variant>,
    /// The share of recipients held out (not sent), in basis points (1/10,000).
    pub holdout_bp: u32,
}

/// One variant: its weight among the variants, its texts (empty: the template's) and its own
/// per-locale texts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Variant {
    pub name: String,
    pub weight: u32,
    pub texts: LocalizedText,
    pub locales: BTreeMap<String, LocalizedText>,
}

/// Which content a message got: its experiment variant (`holdout` for a held-out recipient)
/// and the locale whose texts it was rendered with (none: the default texts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentLabel {
    pub variant: Option<Arc<str>>,
    pub locale: Option<Arc<str>>,
}

/// One addressee of a batch with its personalization variables. Its `Debug` shows the device
/// token and user id as fingerprints and the variables' names only (they are personal data).
#[derive(Clone)]
pub struct Recipient {
    pub message_id: String,
    pub platform: Platform,
    pub device_token: String,
    pub vars: BTreeMap<String, String>,
    pub user_id: String,
    pub locale: String,
    pub timezone: String,
    pub apns_json: String,
    pub fcm_json: String,
    pub title: Option<String>,
    pub body: Option<String>,
    /// When the app registered the device token (epoch ms), 0 when unknown: a token remembered
    /// as dead is sent to again when it was registered after it was reported dead.
    pub token_registered_at_ms: i64,
    /// Send at this instant (epoch ms) instead of now; 0 means the batch's timing.
    pub send_at_ms: i64,
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::Fingerprint;
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Recipient")
            .field("message_id", &self.message_id)
            .field("platform", &self.platform)
            .field("device_token", &Fingerprint(&self.device_token))
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("user_id", &Fingerprint(&self.user_id))
            .field("locale", &self.locale)
            .field("timezone", &self.timezone)
            .field("apns_json", &Fingerprint(&self.apns_json))
            .field("fcm_json", &Fingerprint(&self.fcm_json))
            .field("title", &redacted(&self.title))
            .field("body", &redacted(&self.body))
            .field("token_registered_at_ms", &self.token_registered_at_ms)
            .field("send_at_ms", &self.send_at_ms)
            .finish()
    }
}

/// A batch as the domain sees it: one template, many recipients.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub app_id: String,
    pub batch_id: String,
    pub campaign_id: String,
    pub template: Template,
    pub recipients: Vec<Recipient>,
    /// The campaign's rate limit (messages per minute) carried in the request; 0 means none.
    pub campaign_rate_per_minute: u32,
    /// Transactional: quiet hours and frequency caps do not apply (opt-outs and dead-token
    /// suppression still do).
    pub bypass_policies: bool,
    /// Send at this instant (epoch ms) instead of now; 0 means now.
    pub send_at_ms: i64,
    /// Send at this local time (`HH:MM` or `YYYY-MM-DD HH:MM`) in each recipient's zone.
    pub local_send_time: String,
    /// With `local_send_time`: a time already past today goes now instead of tomorrow.
    pub late_sends_now: bool,
    /// `send_time = OPTIMAL`: each recipient at its user's best hour of the coming 24 hours.
    pub optimal_send_time: bool,
}

/// What is known of a batch that could not be read into a [`Batch`] at all (a structural error)
/// or was refused as a whole: enough to give every recipient its REJECTED receipt. Its `Debug`
/// shows only how many recipients it has (they carry user ids).
#[derive(Clone, Default)]
pub struct BatchOutline {
    pub app_id: String,
    pub batch_id: String,
    pub campaign_id: String,
    /// Per recipient: its message id, platform (when valid) and user id.
    pub recipients: Vec<(String, Option<Platform>, String)>,
}

impl std::fmt::Debug for BatchOutline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchOutline")
            .field("app_id", &self.app_id)
            .field("batch_id", &self.batch_id)
            .field("campaign_id", &self.campaign_id)
            .field("recipients", &self.recipients.len())
            .finish()
    }
}

impl std::fmt::Debug for MessageMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageMeta")
            .field("app_id", &self.app_id)
            .field("batch_id", &self.batch_id)
            .field("campaign_id", &self.campaign_id)
            .field("message_id", &self.message_id)
            .field("platform", &self.platform)
            .field("user_id", &crate::redact::Fingerprint(&self.user_id))
            .field("priority", &self.priority)
            .field("accepted_at", &self.accepted_at)
            .field("expires_at", &self.expires_at)
            .field("campaign_rate_per_minute", &self.campaign_rate_per_minute)
            .field("content", &self.content)
            .finish()
    }
}

/// Identity and bookkeeping of one accepted message, carried from ingest to its receipt.
/// Its `Debug` shows the user id as a fingerprint.
#[derive(Clone)]
pub struct MessageMeta {
    pub app_id: Arc<str>,
    pub batch_id: Arc<str>,
    pub campaign_id: Arc<str>,
    pub message_id: String,
    pub platform: Platform,
    pub user_id: String,
    pub priority: Priority,
    pub accepted_at: SystemTime,
    /// After this instant the message must not be handed to a provider any more.
    pub expires_at: Option<SystemTime>,
    /// The request's campaign rate limit, messages per minute; 0 means none.
    pub campaign_rate_per_minute: u32,
    /// The variant and locale the message was rendered with (receipts carry them).
    pub content: ContentLabel,
}

/// A validation failure that names the offending field, e.g. `recipients[3].vars.first_name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A fully rendered APNs request: everything the APNs client needs, nothing it must compute.
/// Its `Debug` shows the device token as a fingerprint and the payload's length only.
#[derive(Clone)]
pub struct ApnsRequest {
    pub device_token: String,
    /// Bundle id plus the push type's suffix (UTF-8). Bytes so that every message of a batch
    /// shares one copy and the header is built without copying it.
    pub topic: Bytes,
    pub push_type: PushType,
    /// 10, 5 or 1.
    pub priority: u8,
    /// Absolute `apns-expiration` in Unix seconds; `None` omits the header.
    pub expiration: Option<u64>,
    pub collapse_id: Option<String>,
    /// Sent as `apns-id`, in canonical lower-case form.
    pub apns_id: uuid::Uuid,
    /// The JSON body (`aps` plus custom keys), already size-checked.
    pub payload: Bytes,
}

impl std::fmt::Debug for ApnsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsRequest")
            .field(
                "device_token",
                &crate::redact::Fingerprint(&self.device_token),
            )
            .field("topic", &String::from_utf8_lossy(&self.topic))
            .field("push_type", &self.push_type)
            .field("priority", &self.priority)
            .field("expiration", &self.expiration)
            .field("collapse_id", &self.collapse_id)
            .field("apns_id", &self.apns_id)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// A fully rendered FCM HTTP v1 request body (`{"message":{...}}`). Its `Debug` shows the
/// device token as a fingerprint and the body's length only (the body holds the token and the
/// personalized text).
#[derive(Clone)]
pub struct FcmRequest {
    pub device_token: String,
    pub body: Bytes,
}

impl std::fmt::Debug for FcmRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmRequest")
            .field(
                "device_token",
                &crate::redact::Fingerprint(&self.device_token),
            )
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

/// What a provider is asked to send for one message.
#[derive(Debug, Clone)]
pub enum ProviderRequest {
    Apns(ApnsRequest),
    Fcm(FcmRequest),
}

impl ProviderRequest {
    /// The device token the request is addressed to.
    pub fn device_token(&self) -> &str {
        match self {
            ProviderRequest::Apns(r) => &r.device_token,
            ProviderRequest::Fcm(r) => &r.device_token,
        }
    }

    pub fn platform(&self) -> Platform {
        match self {
            ProviderRequest::Apns(_) => Platform::Apns,
            ProviderRequest::Fcm(_) => Platform::Fcm,
        }
    }
}

/// What one delivery attempt came to, as classified by the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the message (hand-off, not display on the device).
    Delivered {
        provider_message_id: String,
        status: u16,
    },
    /// The token is dead; the caller should delete it.
    InvalidToken {
        reason: String,
        status: u16,
        invalid_since: Option<SystemTime>,
    },
    /// Permanently refused for this message (bad request, payload too large, ...).
    Rejected { reason: String, status: u16 },
    /// Transient: worth another attempt, no sooner than `retry_after` when the provider said so.
    Retry {
        reason: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Terminal failure not caused by this message (credentials rejected, ...).
    Failed { reason: String, status: u16 },
}

/// The state a receipt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReceiptStatus {
    Delivered,
    InvalidToken,
    Rejected,
    Failed,
    Expired,
    Dropped,
    /// Non-terminal: another attempt is scheduled.
    Retrying,
    /// Non-terminal: the message waits for its send time (`next_attempt_at`).
    Scheduled,
}

impl ReceiptStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, ReceiptStatus::Retrying | ReceiptStatus::Scheduled)
    }

    /// Lower-case name used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Delivered => "delivered",
            ReceiptStatus::InvalidToken => "invalid_token",
            ReceiptStatus::Rejected => "rejected",
            ReceiptStatus::Failed => "failed",
            ReceiptStatus::Expired => "expired",
            ReceiptStatus::Dropped => "dropped",
            ReceiptStatus::Retrying => "retrying",
            ReceiptStatus::Scheduled => "scheduled",
        }
    }
}

/// A report about one message, terminal or not. Made only by [`Receipt::new`].
#[derive(Debug, Clone)]
pub struct Receipt {
    pub meta: Arc<MessageMeta>,
    pub status: ReceiptStatus,
    pub reason: String,
    pub field: String,
    pub provider_status: u16,
    pub provider_message_id: String,
    pub attempt: u32,
    pub completed_at: Option<SystemTime>,
    pub next_attempt_at: Option<SystemTime>,
    pub token_invalid_since: Option<SystemTime>,
    /// False for a recipient refused at ingest: it never entered the gateway, so no stage holds
    /// anything of it (a durable store must not release a message of the same id).
    pub accepted: bool,
}

impl Receipt {
    /// The one constructor: `resolution` says what the receipt reports (a terminal status, or
    /// RETRYING with `next_attempt_at`) after `attempt` provider attempts.
    pub fn new(
        meta: Arc<MessageMeta>,
        attempt: u32,
        resolution: Resolution,
        next_attempt_at: Option<SystemTime>,
    ) -> Self {
        let terminal = resolution.status.is_terminal();
        Self {
            meta,
            status: resolution.status,
            reason: resolution.reason,
            field: resolution.field,
            provider_status: resolution.provider_status,
            provider_message_id: resolution.provider_message_id,
            attempt,
            completed_at: terminal.then(SystemTime::now),
            next_attempt_at,
            token_invalid_since: resolution.token_invalid_since,
            accepted: true,
        }
    }

    pub fn terminal(&self) -> bool {
        self.status.is_terminal()
    }
}

/// How a message ended (or, with RETRYING, why it waits): the content of a receipt.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub status: ReceiptStatus,
    pub reason: String,
    pub field: String,
    pub provider_status: u16,
    pub provider_message_id: String,
    pub token_invalid_since: Option<SystemTime>,
}

impl Resolution {
    /// A gateway-side ending with a reason.
    pub fn gateway(status: ReceiptStatus, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            field: String::new(),
            provider_status: 0,
            provider_message_id: String::new(),
            token_invalid_since: None,
        }
    }

    /// A recipient refused for bad input: REJECTED naming the field.
    pub fn invalid(error: &FieldError) -> Self {
        Self {
            field: error.field.clone(),
            ..Self::gateway(ReceiptStatus::Rejected, error.reason.clone())
        }
    }

    /// The terminal resolution of a provider outcome. `Retry` outcomes reach here only when no
    /// further attempt is possible, so they end FAILED.
    pub fn from_outcome(outcome: Outcome) -> Self {
        let mut r = Self::gateway(ReceiptStatus::Failed, "");
        match outcome {
            Outcome::Delivered {
                provider_message_id,
                status,
            } => {
                r.status = ReceiptStatus::Delivered;
                r.provider_message_id = provider_message_id;
                r.provider_status = status;
            }
            Outcome::InvalidToken {
                reason,
                status,
                invalid_since,
            } => {
                r.status = ReceiptStatus::InvalidToken;
                r.reason = reason;
                r.provider_status = status;
                r.token_invalid_since = invalid_since;
            }
            Outcome::Rejected { reason, status } => {
                r.status = ReceiptStatus::Rejected;
                r.reason = reason;
                r.provider_status = status;
            }
            Outcome::Retry { reason, status, .. } => {
                r.reason = format!("retries exhausted; last error: {reason}");
                r.provider_status = status;
            }
            Outcome::Failed { reason, status } => {
                r.reason = reason;
                r.provider_status = status;
            }
        }
        r
    }
}

/// A random (version 4) UUID from the thread-local generator: `Uuid::new_v4` without the
/// `fast-rng` feature asks the kernel for every one, a system call per message.
pub fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn epoch_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The instant `ms` milliseconds after the Unix epoch (the epoch for a negative `ms`).
pub fn from_epoch_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_device_token_user_id_or_variable() {
        let token = "f00dfeed".repeat(8);
        let recipient = Recipient {
            message_id: "m-1".into(),
            platform: Platform::Apns,
            device_token: token.clone(),
            vars: [("name".to_string(), "Private Person".to_string())].into(),
            user_id: "user-secret-000001".into(),
            locale: String::new(),
            timezone: String::new(),
            apns_json: String::new(),
            fcm_json: String::new(),
            title: Some("Hello Private Person".into()),
            body: None,
            token_registered_at_ms: 0,
            send_at_ms: 0,
        };
        let fcm = FcmRequest {
            device_token: token.clone(),
            body: Bytes::from(format!("{{\"message\":{{\"token\":\"{token}\"}}}}")),
        };
        let shown = format!("{recipient:?} {fcm:?}");
        for secret in [token.as_str(), "user-secret-000001", "Private Person"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("…feed(64)") && shown.contains("name"),
            "{shown}"
        );
    }

    #[test]
    fn template_debug_shows_no_text_url_or_data_value() {
        let secret = "Ada Lovelace, your code is 424242";
        let texts = LocalizedText {
            title: secret.into(),
            subtitle: String::new(),
            body: secret.into(),
        };
        let template = Template {
            title: secret.into(),
            body: secret.into(),
            deep_link: format!("app://reset?name={secret}"),
            data: [("code".to_string(), secret.to_string())].into(),
            apns_json: format!("{{\"x\":\"{secret}\"}}"),
            locales: [("pt".to_string(), texts.clone())].into(),
            experiment: Some(Experiment {
                variants: vec![Variant {
                    name: "b".into(),
                    weight: 1,
                    texts,
                    locales: Default::default(),
                }],
                holdout_bp: 0,
            }),
            ..Default::default()
        };
        let batch = Batch {
            template: template.clone(),
            ..Default::default()
        };
        let compiled = crate::render::CompiledTemplate::compile(&Template {
            locales: Default::default(),
            experiment: None,
            title: format!("{secret} {{{{ name }}}}"),
            ..template.clone()
        })
        .unwrap();
        let shown = format!("{template:?} {batch:?} {compiled:?}");
        for leaked in ["Ada Lovelace", "424242"] {
            assert!(!shown.contains(leaked), "{leaked} in {shown}");
        }
        assert!(
            shown.contains("code") && shown.contains("bytes>"),
            "{shown}"
        );
    }
}

/// The wall clock the policy stage reads: send times (`send_at_ms` bounds, `local_send_time`),
/// quiet hours and cap windows. The system clock by default; a gateway started with
/// [`Clock::starting_at`] sees that instant at its start and time passing from there, so a test
/// can compute schedules around a chosen date (a DST change) however far it is from today.
/// The store's timers wait real time: a message scheduled for `t` by this clock goes
/// `t - now` (by this clock) from now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    offset_ms: i64,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that reads `epoch_ms` now and advances with the system clock.
    pub fn starting_at(epoch_ms: i64) -> Self {
        Self {
            offset_ms: epoch_ms.saturating_sub(epoch_millis(SystemTime::now())),
        }
    }

    /// Now, epoch ms.
    pub fn now_ms(&self) -> i64 {
        epoch_millis(SystemTime::now()).saturating_add(self.offset_ms)
    }
}
