//! APNs rendering: the `aps` dictionary (shared with FCM's `apns` block) and the direct APNs
//! request. The conventions are described in the parent module's documentation.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::json::{self, Obj};
use super::{
    CompiledTemplate, Content, Effective, MAX_APNS_TOKEN_CHARS, RecipientRef, Stamp, expiration,
    recipient_field,
};
use crate::domain::{ApnsRequest, FieldError, Priority, PushType};
use crate::render::RenderContext;
use crate::render::template::{Text, Vars};

/// A rendered APNs payload with the push type and priority it was rendered for.
#[derive(Debug, Clone)]
pub(super) struct Built {
    pub(super) payload: Bytes,
    pub(super) push_type: PushType,
    pub(super) priority: u8,
}

/// The members of an `aps` dictionary, before writing.
pub(super) struct Aps<'a> {
    pub(super) background: bool,
    pub(super) title: &'a str,
    pub(super) subtitle: &'a str,
    pub(super) body: &'a str,
    pub(super) badge: Option<u32>,
    pub(super) sound: &'a str,
    pub(super) thread_id: &'a str,
    pub(super) category: &'a str,
    pub(super) mutable_content: bool,
    pub(super) content_available: bool,
}

/// Writes the `"aps"` member. A background push gets exactly `{"content-available":1}`.
pub(super) fn write_aps(o: &mut Obj<'_>, aps: &Aps<'_>) {
    o.obj("aps", |a| {
        if aps.background {
            a.u64("content-available", 1);
            return;
        }
        if !(aps.title.is_empty() && aps.subtitle.is_empty() && aps.body.is_empty()) {
            a.obj("alert", |alert| {
                alert.str_nonempty("title", aps.title);
                alert.str_nonempty("subtitle", aps.subtitle);
                alert.str_nonempty("body", aps.body);
            });
        }
        if let Some(badge) = aps.badge {
            a.u64("badge", u64::from(badge));
        }
        a.str_nonempty("sound", aps.sound);
        a.str_nonempty("thread-id", aps.thread_id);
        a.str_nonempty("category", aps.category);
        if aps.mutable_content {
            a.u64("mutable-content", 1);
        }
        if aps.content_available {
            a.u64("content-available", 1);
        }
    });
}

/// Checks an APNs device token: non-empty, hexadecimal, even length, at most 200 characters.
pub(super) fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("device token is empty".to_owned());
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "device token must be hexadecimal; found `{}`",
            c.escape_debug()
        ));
    }
    if token.len() > MAX_APNS_TOKEN_CHARS {
        return Err(format!(
            "device token is {} characters; the limit is {MAX_APNS_TOKEN_CHARS}",
            token.len()
        ));
    }
    if !token.len().is_multiple_of(2) {
        return Err(format!(
            "device token has an odd number of hex digits ({})",
            token.len()
        ));
    }
    Ok(())
}

/// The `apns-id` for a message id: the id itself, lower-cased, when it is a canonical UUID
/// (8-4-4-4-12 hex digits), else a fresh random UUID.
pub fn sanitize_apns_id(message_id: &str) -> uuid::Uuid {
    let canonical = message_id.len() == 36
        && message_id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    match canonical.then(|| uuid::Uuid::try_parse(message_id)) {
        Some(Ok(id)) => id,
        _ => crate::domain::random_uuid(),
    }
}

/// Checks a payload after a raw override was merged: `aps` is an object, and a background push
/// still carries only `content-available: 1`. The error is the reason, without the field.
fn check_merged(payload: &Map<String, Value>, background: bool) -> Result<(), String> {
    let aps = match payload.get("aps") {
        Some(Value::Object(aps)) => aps,
        Some(other) => {
            return Err(format!(
                "aps must be an object, got {}",
                json::json_type_name(other)
            ));
        }
        None => return Err("aps is missing".to_owned()),
    };
    if background {
        if let Some(key) = aps.keys().find(|k| *k != "content-available") {
            return Err(format!(
                "aps.{key} is not allowed in a background push (aps may only contain content-available)"
            ));
        }
        if aps.get("content-available") != Some(&Value::from(1)) {
            return Err("aps.content-available must be 1 in a background push".to_owned());
        }
    }
    Ok(())
}

impl CompiledTemplate {
    /// `apns-topic` for `push_type`: the bundle id plus the push type's suffix, built once per
    /// batch and shared.
    fn apns_topic_for(&self, bundle_id: &str, push_type: PushType) -> Bytes {
        let suffix = push_type.topic_suffix();
        let build = || Bytes::from(format!("{bundle_id}{suffix}"));
        let (cached_type, cached) = self.apns_topic.get_or_init(|| (push_type, build()));
        let same_bundle = cached.len() == bundle_id.len() + suffix.len()
            && cached.starts_with(bundle_id.as_bytes());
        if *cached_type == push_type && same_bundle {
            cached.clone()
        } else {
            build()
        }
    }

    /// A template problem that rejects every APNs recipient, if any.
    pub(super) fn find_apns_problem(&self) -> Option<FieldError> {
        self.data.iter().find_map(|(key, _)| {
            let reason = match key.as_str() {
                "aps" => "`aps` is reserved by APNs (custom keys are peers of aps)",
                "deep_link" if !self.deep_link.is_empty() => {
                    "`deep_link` is where template.deep_link goes in the APNs payload"
                }
                "image_url" if !self.image_url.is_empty() => {
                    "`image_url` is where template.image_url goes in the APNs payload"
                }
                _ => return None,
            };
            Some(FieldError::new(format!("template.data.{key}"), reason))
        })
    }

    /// `apns-priority` for a push type: 10 unless asked otherwise, always 5 for background.
    pub(super) fn apns_priority(&self, push_type: PushType) -> Result<u8, FieldError> {
        match (push_type, self.priority) {
            (PushType::Background, Priority::High) => Err(FieldError::new(
                "template.priority",
                "HIGH (apns-priority 10) is not allowed for a background push; APNs requires 5",
            )),
            (PushType::Background, _) | (_, Priority::Normal) => Ok(5),
            (_, Priority::High | Priority::Default) => Ok(10),
        }
    }

    /// The `aps` members for `content`; `with_text` false leaves out title and body (FCM
    /// sends them in `notification`).
    pub(super) fn aps<'a>(&'a self, content: &'a Content<'_>, with_text: bool) -> Aps<'a> {
        Aps {
            background: content.is_background(),
            title: if with_text { &content.title } else { "" },
            subtitle: &content.subtitle,
            body: if with_text { &content.body } else { "" },
            badge: self.badge,
            sound: &self.sound,
            thread_id: &self.thread_id,
            category: &self.category,
            mutable_content: self.mutable_content || !self.image_url.is_empty(),
            content_available: self.content_available,
        }
    }

    /// Renders the APNs payload (without the size check, which names the recipient).
    /// `recipient_json` is the recipient's raw override, empty for none.
    pub(super) fn build_apns_payload(
        &self,
        title: &Effective<'_>,
        subtitle: &Text,
        body: &Effective<'_>,
        vars: &dyn Vars,
        index: usize,
        recipient_json: &str,
    ) -> Result<Built, FieldError> {
        let content = self.content(title, subtitle, body, vars, index)?;
        let priority = self.apns_priority(content.push_type)?;
        let mut buf = Vec::with_capacity(256);
        let mut o = Obj::begin(&mut buf);
        write_aps(&mut o, &self.aps(&content, true));
        for (key, value) in &content.data {
            o.str(key, value);
        }
        o.str_nonempty("deep_link", &self.deep_link);
        o.str_nonempty("image_url", &self.image_url);
        o.end();
        if self.apns_json.is_some() || !recipient_json.trim().is_empty() {
            buf = self.merge_apns(&buf, content.is_background(), recipient_json, index)?;
        }
        Ok(Built {
            payload: Bytes::from(buf),
            push_type: content.push_type,
            priority,
        })
    }

    /// The slow path: deep-merges the raw overrides into the payload in `buf`.
    fn merge_apns(
        &self,
        buf: &[u8],
        background: bool,
        recipient_json: &str,
        index: usize,
    ) -> Result<Vec<u8>, FieldError> {
        let internal = |e: serde_json::Error| {
            FieldError::new(
                recipient_field(index, "payload"),
                format!("internal error: {e}"),
            )
        };
        let mut payload: Map<String, Value> = serde_json::from_slice(buf).map_err(internal)?;
        if let Some(patch) = &self.apns_json {
            json::deep_merge(&mut payload, patch);
            check_merged(&payload, background)
                .map_err(|reason| FieldError::new("template.apns_json", reason))?;
        }
        if !recipient_json.trim().is_empty() {
            let field = || recipient_field(index, "apns_json");
            let patch = json::parse_object(recipient_json)
                .map_err(|reason| FieldError::new(field(), reason))?;
            json::deep_merge(&mut payload, &patch);
            check_merged(&payload, background)
                .map_err(|reason| FieldError::new(field(), reason))?;
        }
        serde_json::to_vec(&payload).map_err(internal)
    }

    /// Renders the APNs request of one recipient.
    pub(super) fn render_apns(
        &self,
        recipient: RecipientRef<'_>,
        index: usize,
        stamp: Stamp<'_>,
        ctx: &RenderContext,
    ) -> Result<ApnsRequest, FieldError> {
        if let Some(problem) = &self.apns_problem {
            return Err(problem.clone());
        }
        if ctx.apns_topic.is_empty() {
            return Err(FieldError::new(
                "app.apns_topic",
                "the app has no APNs topic (bundle id) configured",
            ));
        }
        check_token(recipient.device_token)
            .map_err(|reason| FieldError::new(recipient_field(index, "device_token"), reason))?;
        let no_overrides = recipient.title.is_none()
            && recipient.body.is_none()
            && recipient.apns_json.trim().is_empty();
        let built = match &self.apns_cached {
            Some(cached) if no_overrides => cached.clone()?,
            _ => {
                let (title, subtitle, body) = self.effective_texts(recipient, index)?;
                self.build_apns_payload(
                    &title,
                    subtitle,
                    &body,
                    recipient.vars,
                    index,
                    recipient.apns_json,
                )?
            }
        };
        let limit = built.push_type.max_payload_bytes();
        if built.payload.len() > limit {
            return Err(FieldError::new(
                recipient_field(index, "payload"),
                format!(
                    "APNs payload is {} bytes; the limit is {limit}",
                    built.payload.len()
                ),
            ));
        }
        Ok(ApnsRequest {
            device_token: recipient.device_token.to_owned(),
            topic: self.apns_topic_for(&ctx.apns_topic, built.push_type),
            push_type: built.push_type,
            priority: built.priority,
            expiration: expiration(stamp.accepted_at, self.ttl_secs),
            collapse_id: (!self.collapse_key.is_empty()).then(|| self.collapse_key.clone()),
            apns_id: sanitize_apns_id(stamp.message_id),
            payload: built.payload,
        })
    }
}
