//! What a job looks like at rest in Redis, as JSON, in one of two forms:
//!
//! - **Packed** ([`PackedJob`]): an accepted message before its first attempt, as it waits in
//!   memory: a reference to its batch's context ([`StoredBatch`]: the template source, the render
//!   context and the batch's packed recipients, written once per batch) and where its recipient
//!   is packed there. It is rendered when it is claimed, like a waiting message in memory.
//! - **Rendered** ([`StoredJob`]): a job after an attempt (parked for a retry, or a dead
//!   letter): identity, rendered provider request, attempts so far.
//!
//! These mirror types keep the domain types in `model` free of serde and Redis concerns; the
//! conversions are total in one direction (domain -> record) and validated in the other, so a
//! corrupt or foreign record is an error, never a panic.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::domain::{
    ApnsRequest, FcmRequest, MessageMeta, Platform, Priority, ProviderRequest, PushType, Template,
    epoch_millis,
};

/// An accepted message that has not been attempted yet: where its recipient is packed in the
/// batch context `batch` (a key suffix, see `AppKeys::batch`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackedJob {
    pub batch: String,
    /// Byte offset of the recipient in the batch's packed buffer.
    pub at: u32,
    /// The recipient's position in its batch (field names in errors).
    pub index: u32,
    /// Milliseconds from the batch's start to this message's acceptance.
    pub accepted_ms: u32,
}

/// The JSON envelope of a packed record: `{"packed":{...}}`. Rendered records never have a
/// `packed` key, so the two forms cannot be mistaken for each other.
#[derive(Serialize, Deserialize)]
struct PackedEnvelope {
    packed: PackedJob,
}

/// The leading bytes of every packed record (the Lua scripts test for them).
pub const PACKED_PREFIX: &str = "{\"packed\":";

impl PackedJob {
    pub fn to_json(&self) -> String {
        serde_json::to_string(&PackedEnvelope {
            packed: self.clone(),
        })
        .unwrap_or_default()
    }

    /// The packed job of `record`, or `None` when it is a rendered record.
    pub fn from_record(record: &[u8]) -> Option<Result<Self, RecordError>> {
        record.starts_with(PACKED_PREFIX.as_bytes()).then(|| {
            serde_json::from_slice::<PackedEnvelope>(record)
                .map(|e| e.packed)
                .map_err(|e| RecordError(e.to_string()))
        })
    }
}

/// What every packed message of one accepted batch shares, at rest. The packed recipients
/// themselves are stored beside it as raw bytes (hash field `buf`), not in this JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredBatch {
    pub batch_id: String,
    pub campaign_id: String,
    pub template: StoredTemplate,
    pub apns_topic: String,
    #[serde(default)]
    pub analytics_label: Option<String>,
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub campaign_rate_per_minute: u32,
    /// When acceptance of the batch began (epoch ms); messages store offsets from it.
    pub started_ms: i64,
}

impl StoredBatch {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &[u8]) -> Result<Self, RecordError> {
        serde_json::from_slice(s).map_err(|e| RecordError(format!("batch context: {e}")))
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.ttl_ms.map(Duration::from_millis)
    }

    pub fn started(&self) -> SystemTime {
        crate::domain::from_epoch_millis(self.started_ms)
    }
}

/// The template source of a batch, as the caller sent it (it is compiled again on claim).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct StoredTemplate {
    pub title: String,
    pub subtitle: String,
    pub body: String,
    pub image_url: String,
    pub deep_link: String,
    pub sound: String,
    pub badge: Option<u32>,
    pub category: String,
    pub thread_id: String,
    pub data: std::collections::BTreeMap<String, String>,
    pub collapse_key: String,
    pub ttl_ms: Option<u64>,
    pub priority: u8,
    pub push_type: Option<String>,
    pub content_available: bool,
    pub mutable_content: bool,
    pub apns_json: String,
    pub fcm_json: String,
    pub android_channel_id: String,
    pub locales: std::collections::BTreeMap<String, crate::domain::LocalizedText>,
    pub experiment: Option<crate::domain::Experiment>,
}

impl From<&Template> for StoredTemplate {
    fn from(t: &Template) -> Self {
        Self {
            title: t.title.clone(),
            subtitle: t.subtitle.clone(),
            body: t.body.clone(),
            image_url: t.image_url.clone(),
            deep_link: t.deep_link.clone(),
            sound: t.sound.clone(),
            badge: t.badge,
            category: t.category.clone(),
            thread_id: t.thread_id.clone(),
            data: t.data.clone(),
            collapse_key: t.collapse_key.clone(),
            ttl_ms: t
                .ttl
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            priority: priority_code(t.priority),
            push_type: t.push_type.map(|p| p.header_value().to_owned()),
            content_available: t.content_available,
            mutable_content: t.mutable_content,
            apns_json: t.apns_json.clone(),
            fcm_json: t.fcm_json.clone(),
            android_channel_id: t.android_channel_id.clone(),
            locales: t.locales.clone(),
            experiment: t.experiment.clone(),
        }
    }
}

impl StoredTemplate {
    pub fn template(&self) -> Result<Template, RecordError> {
        let push_type = match &self.push_type {
            None => None,
            Some(p) => Some(
                push_type_from_header(p)
                    .ok_or_else(|| RecordError(format!("unknown push type `{p}`")))?,
            ),
        };
        Ok(Template {
            title: self.title.clone(),
            subtitle: self.subtitle.clone(),
            body: self.body.clone(),
            image_url: self.image_url.clone(),
            deep_link: self.deep_link.clone(),
            sound: self.sound.clone(),
            badge: self.badge,
            category: self.category.clone(),
            thread_id: self.thread_id.clone(),
            data: self.data.clone(),
            collapse_key: self.collapse_key.clone(),
            ttl: self.ttl_ms.map(Duration::from_millis),
            priority: priority_from_code(self.priority),
            push_type,
            content_available: self.content_available,
            mutable_content: self.mutable_content,
            apns_json: self.apns_json.clone(),
            fcm_json: self.fcm_json.clone(),
            android_channel_id: self.android_channel_id.clone(),
            locales: self.locales.clone(),
            experiment: self.experiment.clone(),
        })
    }
}

/// A parked job. Its `Debug` shows the user id as a fingerprint (see [`StoredRequest`]).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredJob {
    pub app_id: String,
    pub batch_id: String,
    pub campaign_id: String,
    pub message_id: String,
    pub user_id: String,
    pub priority: u8,
    pub accepted_at_ms: i64,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    /// The experiment variant and locale the message was rendered with (empty: none).
    #[serde(default)]
    pub variant: String,
    #[serde(default)]
    pub locale: String,
    /// The campaign rate limit the message was sent under (messages per minute; 0 = none).
    #[serde(default)]
    pub campaign_rate_per_minute: u32,
    /// Provider attempts made so far.
    pub attempt: u32,
    pub request: StoredRequest,
    /// The last transient error (dead letters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// A scheduled message not yet due: what the policy stage decides it on then
    /// (`crate::work::DueCheck`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_check: Option<StoredDueCheck>,
}

/// [`crate::work::DueCheck`] in a job record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredDueCheck {
    #[serde(default)]
    pub registered_at_ms: i64,
    #[serde(default)]
    pub timezone: String,
    #[serde(default)]
    pub transactional: bool,
}

impl std::fmt::Debug for StoredJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredJob")
            .field("app_id", &self.app_id)
            .field("batch_id", &self.batch_id)
            .field("campaign_id", &self.campaign_id)
            .field("message_id", &self.message_id)
            .field("user_id", &crate::redact::Fingerprint(&self.user_id))
            .field("priority", &self.priority)
            .field("accepted_at_ms", &self.accepted_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("campaign_rate_per_minute", &self.campaign_rate_per_minute)
            .field("attempt", &self.attempt)
            .field("request", &self.request)
            .field("last_error", &self.last_error)
            .field("due_check", &self.due_check)
            .finish()
    }
}

/// The rendered provider request. Its `Debug` shows the device token as a fingerprint and the
/// payload's length only.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "p", rename_all = "lowercase")]
pub enum StoredRequest {
    Apns {
        device_token: String,
        topic: String,
        push_type: String,
        priority: u8,
        #[serde(default)]
        expiration: Option<u64>,
        #[serde(default)]
        collapse_id: Option<String>,
        apns_id: String,
        payload: Payload,
    },
    Fcm {
        device_token: String,
        body: Payload,
    },
}

impl std::fmt::Debug for StoredRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::Fingerprint;
        match self {
            StoredRequest::Apns {
                device_token,
                topic,
                push_type,
                priority,
                apns_id,
                payload,
                ..
            } => f
                .debug_struct("Apns")
                .field("device_token", &Fingerprint(device_token))
                .field("topic", topic)
                .field("push_type", push_type)
                .field("priority", priority)
                .field("apns_id", apns_id)
                .field("payload", payload)
                .finish_non_exhaustive(),
            StoredRequest::Fcm { device_token, body } => f
                .debug_struct("Fcm")
                .field("device_token", &Fingerprint(device_token))
                .field("body", body)
                .finish(),
        }
    }
}

/// Provider bodies are JSON (UTF-8) in practice; anything else is kept as base64. Its `Debug`
/// shows the length only (bodies hold device tokens and personalized text).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    Text(String),
    B64(String),
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Text(s) => write!(f, "Text(<{} bytes>)", s.len()),
            Payload::B64(s) => write!(f, "B64(<{} chars>)", s.len()),
        }
    }
}

impl Payload {
    fn of(bytes: &Bytes) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => Payload::Text(s.to_owned()),
            Err(_) => Payload::B64(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    }
    fn bytes(&self) -> Result<Bytes, RecordError> {
        match self {
            Payload::Text(s) => Ok(Bytes::from(s.clone().into_bytes())),
            Payload::B64(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(Bytes::from)
                .map_err(|e| RecordError(format!("payload: {e}"))),
        }
    }
}

/// A record that cannot be turned back into a job.
#[derive(Debug, thiserror::Error)]
#[error("stored job: {0}")]
pub struct RecordError(pub String);

impl StoredJob {
    /// The record of `meta` + `request` after `attempt` attempts.
    pub fn new(meta: &MessageMeta, request: &ProviderRequest, attempt: u32) -> Self {
        Self {
            app_id: meta.app_id.to_string(),
            batch_id: meta.batch_id.to_string(),
            campaign_id: meta.campaign_id.to_string(),
            message_id: meta.message_id.clone(),
            user_id: meta.user_id.clone(),
            priority: priority_code(meta.priority),
            accepted_at_ms: epoch_millis(meta.accepted_at),
            expires_at_ms: meta.expires_at.map(epoch_millis),
            campaign_rate_per_minute: meta.campaign_rate_per_minute,
            variant: meta
                .content
                .variant
                .as_deref()
                .unwrap_or_default()
                .to_owned(),
            locale: meta
                .content
                .locale
                .as_deref()
                .unwrap_or_default()
                .to_owned(),
            attempt,
            request: match request {
                ProviderRequest::Apns(a) => StoredRequest::Apns {
                    device_token: a.device_token.clone(),
                    topic: String::from_utf8_lossy(&a.topic).into_owned(),
                    push_type: a.push_type.header_value().to_owned(),
                    priority: a.priority,
                    expiration: a.expiration,
                    collapse_id: a.collapse_id.clone(),
                    apns_id: a.apns_id.to_string(),
                    payload: Payload::of(&a.payload),
                },
                ProviderRequest::Fcm(f) => StoredRequest::Fcm {
                    device_token: f.device_token.clone(),
                    body: Payload::of(&f.body),
                },
            },
            last_error: String::new(),
            due_check: None,
        }
    }

    /// The record with a scheduled message's due-time check.
    pub fn with_due_check(mut self, due: Option<&crate::work::DueCheck>) -> Self {
        self.due_check = due.map(|d| StoredDueCheck {
            registered_at_ms: d.registered_at_ms,
            timezone: d.timezone.clone(),
            transactional: d.transactional,
        });
        self
    }

    /// The due-time check the record carries.
    pub fn due_check(&self) -> Option<crate::work::DueCheck> {
        self.due_check.as_ref().map(|d| crate::work::DueCheck {
            registered_at_ms: d.registered_at_ms,
            timezone: d.timezone.clone(),
            transactional: d.transactional,
        })
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings and numbers cannot fail; an empty object is never stored
        // because `from_json` would reject it.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &[u8]) -> Result<Self, RecordError> {
        serde_json::from_slice(s).map_err(|e| RecordError(e.to_string()))
    }

    pub fn platform(&self) -> Platform {
        match self.request {
            StoredRequest::Apns { .. } => Platform::Apns,
            StoredRequest::Fcm { .. } => Platform::Fcm,
        }
    }

    /// The message identity, with `app_id` shared with the app registry.
    pub fn meta(&self, app_id: Arc<str>) -> MessageMeta {
        MessageMeta {
            app_id,
            batch_id: self.batch_id.as_str().into(),
            campaign_id: self.campaign_id.as_str().into(),
            message_id: self.message_id.clone(),
            platform: self.platform(),
            user_id: self.user_id.clone(),
            priority: priority_from_code(self.priority),
            accepted_at: crate::domain::from_epoch_millis(self.accepted_at_ms),
            expires_at: self.expires_at_ms.map(crate::domain::from_epoch_millis),
            // Not persisted yet (limit stage): a recovered message has no campaign rate.
            campaign_rate_per_minute: self.campaign_rate_per_minute,
            content: crate::domain::ContentLabel {
                variant: (!self.variant.is_empty()).then(|| self.variant.as_str().into()),
                locale: (!self.locale.is_empty()).then(|| self.locale.as_str().into()),
            },
        }
    }

    /// The provider request, ready to send again.
    pub fn provider_request(&self) -> Result<ProviderRequest, RecordError> {
        Ok(match &self.request {
            StoredRequest::Apns {
                device_token,
                topic,
                push_type,
                priority,
                expiration,
                collapse_id,
                apns_id,
                payload,
            } => ProviderRequest::Apns(ApnsRequest {
                device_token: device_token.clone(),
                topic: Bytes::copy_from_slice(topic.as_bytes()),
                push_type: push_type_from_header(push_type)
                    .ok_or_else(|| RecordError(format!("unknown push type `{push_type}`")))?,
                priority: *priority,
                expiration: *expiration,
                collapse_id: collapse_id.clone(),
                apns_id: uuid::Uuid::try_parse(apns_id)
                    .map_err(|e| RecordError(format!("apns_id `{apns_id}`: {e}")))?,
                payload: payload.bytes()?,
            }),
            StoredRequest::Fcm { device_token, body } => ProviderRequest::Fcm(FcmRequest {
                device_token: device_token.clone(),
                body: body.bytes()?,
            }),
        })
    }
}

fn priority_code(p: Priority) -> u8 {
    match p {
        Priority::Default => 0,
        Priority::Normal => 1,
        Priority::High => 2,
    }
}

fn priority_from_code(c: u8) -> Priority {
    match c {
        1 => Priority::Normal,
        2 => Priority::High,
        _ => Priority::Default,
    }
}

fn push_type_from_header(s: &str) -> Option<PushType> {
    const ALL: [PushType; 11] = [
        PushType::Alert,
        PushType::Background,
        PushType::Voip,
        PushType::Complication,
        PushType::FileProvider,
        PushType::Mdm,
        PushType::LiveActivity,
        PushType::Location,
        PushType::PushToTalk,
        PushType::Widgets,
        PushType::Controls,
    ];
    ALL.into_iter().find(|p| p.header_value() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_device_token_or_payload() {
        let token = "fcm-abcdefghijklmnop:APA91bsecret0001";
        let request = StoredRequest::Fcm {
            device_token: token.into(),
            body: Payload::Text(format!("{{\"message\":{{\"token\":\"{token}\"}}}}")),
        };
        let shown = format!("{request:?}");
        assert!(
            !shown.contains(token) && !shown.contains("message"),
            "{shown}"
        );
        assert!(shown.contains("0001"), "{shown}");
    }

    #[test]
    fn round_trips_apns_and_fcm() {
        let meta = MessageMeta {
            app_id: "shop".into(),
            batch_id: "b".into(),
            campaign_id: "c".into(),
            message_id: "m-1".into(),
            platform: Platform::Apns,
            user_id: "u".into(),
            priority: Priority::High,
            accepted_at: crate::domain::from_epoch_millis(1_700_000_000_123),
            expires_at: Some(crate::domain::from_epoch_millis(1_700_000_100_000)),
            campaign_rate_per_minute: 0,
            content: crate::domain::ContentLabel {
                variant: Some("urgent".into()),
                locale: Some("pt-BR".into()),
            },
        };
        let apns = ProviderRequest::Apns(ApnsRequest {
            device_token: "ab".into(),
            topic: "t.voip".into(),
            push_type: PushType::Voip,
            priority: 10,
            expiration: Some(5),
            collapse_id: None,
            apns_id: uuid::Uuid::new_v4(),
            payload: Bytes::from_static(b"{\"aps\":{}}"),
        });
        let rec = StoredJob::new(&meta, &apns, 3);
        let back = StoredJob::from_json(rec.to_json().as_bytes()).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.attempt, 3);
        let m = back.meta("shop".into());
        assert_eq!(m.accepted_at, meta.accepted_at);
        assert_eq!(m.expires_at, meta.expires_at);
        assert_eq!(m.priority, Priority::High);
        // A parked retry reports the variant and locale it was rendered with.
        assert_eq!(m.content, meta.content);
        match back.provider_request().unwrap() {
            ProviderRequest::Apns(a) => {
                assert_eq!(a.push_type, PushType::Voip);
                assert_eq!(&a.payload[..], b"{\"aps\":{}}");
            }
            other => panic!("{other:?}"),
        }
        let fcm = ProviderRequest::Fcm(FcmRequest {
            device_token: "t".into(),
            body: Bytes::from_static(&[0xff, 0x00]),
        });
        let rec = StoredJob::new(&meta, &fcm, 1);
        let back = StoredJob::from_json(rec.to_json().as_bytes()).unwrap();
        match back.provider_request().unwrap() {
            ProviderRequest::Fcm(f) => assert_eq!(&f.body[..], &[0xff, 0x00]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_records_are_errors() {
        assert!(StoredJob::from_json(b"{}").is_err());
        assert!(StoredJob::from_json(b"\xff").is_err());
        assert!(matches!(
            PackedJob::from_record(br#"{"packed":{"batch":1}}"#),
            Some(Err(_))
        ));
        assert!(StoredBatch::from_json(b"[]").is_err());
    }

    #[test]
    fn packed_records_are_told_apart_from_rendered_ones() {
        let packed = PackedJob {
            batch: "b1".into(),
            at: 7,
            index: 3,
            accepted_ms: 12,
        };
        let record = packed.to_json();
        // The Lua scripts read the batch with the pattern `^{"packed":{"batch":"([^"]+)"`.
        assert!(
            record.starts_with(r#"{"packed":{"batch":"b1","#),
            "{record}"
        );
        assert!(record.starts_with(PACKED_PREFIX));
        assert_eq!(
            PackedJob::from_record(record.as_bytes()).map(|r| r.ok()),
            Some(Some(packed))
        );
        assert!(PackedJob::from_record(br#"{"app_id":"shop"}"#).is_none());
    }

    #[test]
    fn templates_round_trip_through_their_stored_form() {
        let template = Template {
            title: "Hi {{ name }}".into(),
            ttl: Some(Duration::from_secs(90)),
            priority: Priority::High,
            push_type: Some(PushType::Background),
            badge: Some(3),
            data: [("k".to_string(), "{{ v }}".to_string())].into(),
            fcm_json: r#"{"android":{}}"#.into(),
            locales: [(
                "pt-BR".to_string(),
                crate::domain::LocalizedText {
                    title: "Oi {{ name }}".into(),
                    ..Default::default()
                },
            )]
            .into(),
            experiment: Some(crate::domain::Experiment {
                variants: vec![crate::domain::Variant {
                    name: "a".into(),
                    weight: 2,
                    ..Default::default()
                }],
                holdout_bp: 500,
            }),
            ..Default::default()
        };
        let stored = StoredTemplate::from(&template);
        let json = serde_json::to_string(&stored).unwrap();
        let back: StoredTemplate = serde_json::from_str(&json).unwrap();
        let again = back.template().unwrap();
        assert_eq!(StoredTemplate::from(&again), stored);
        assert_eq!(again.push_type, Some(PushType::Background));
        assert_eq!(again.ttl, Some(Duration::from_secs(90)));
        assert_eq!(again.locales, template.locales);
        assert_eq!(again.experiment, template.experiment);
        let bad = StoredTemplate {
            push_type: Some("nope".into()),
            ..stored
        };
        assert!(bad.template().is_err());
    }
}
