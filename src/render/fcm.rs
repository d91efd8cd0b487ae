//! FCM HTTP v1 rendering: the `{"message":{...}}` request body. The conventions are described
//! in the parent module's documentation.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::apns::write_aps;
use super::json::{self, Obj};
use super::{
    CompiledTemplate, MAX_FCM_PAYLOAD_BYTES, MAX_FCM_TOKEN_CHARS, MAX_FCM_TTL_SECS, RecipientRef,
    RenderContext, Stamp, expiration, recipient_field,
};
use crate::domain::{FcmRequest, FieldError, Priority};

/// Longest FCM `analytics_label`.
const MAX_ANALYTICS_LABEL: usize = 50;

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%')
}

/// Makes `label` match FCM's `^[a-zA-Z0-9-_.~%]{1,50}$`: bytes outside the set are
/// percent-encoded (`%XX` of their UTF-8), the result is cut to 50 characters without splitting
/// an escape, and `None` is returned when nothing is left (the option is then omitted).
pub fn sanitize_analytics_label(label: &str) -> Option<Cow<'_, str>> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if label.is_empty() {
        return None;
    }
    if label.len() <= MAX_ANALYTICS_LABEL && label.bytes().all(is_label_byte) {
        return Some(Cow::Borrowed(label));
    }
    let mut out = String::with_capacity(MAX_ANALYTICS_LABEL);
    for b in label.bytes() {
        let width = if is_label_byte(b) { 1 } else { 3 };
        if out.len() + width > MAX_ANALYTICS_LABEL {
            break;
        }
        if is_label_byte(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    Some(Cow::Owned(out))
}

/// Checks an FCM registration token: non-empty, at most 4096 characters of `[A-Za-z0-9_:\-.]`.
pub(super) fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("device token is empty".to_owned());
    }
    if let Some(c) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.')))
    {
        return Err(format!(
            "device token contains `{}`; allowed are letters, digits, `_`, `:`, `-` and `.`",
            c.escape_debug()
        ));
    }
    if token.len() > MAX_FCM_TOKEN_CHARS {
        return Err(format!(
            "device token is {} characters; the limit is {MAX_FCM_TOKEN_CHARS}",
            token.len()
        ));
    }
    Ok(())
}

/// FCM reserves `from`, `message_type` and keys starting with `google` or `gcm` in data.
fn is_reserved_data_key(key: &str) -> bool {
    let starts = |prefix: &[u8]| {
        key.as_bytes()
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    key == "from" || key == "message_type" || starts(b"google") || starts(b"gcm")
}

const RESERVED: &str = "is reserved by FCM (from, message_type, google*, gcm*)";

/// Checks `message` after a raw override was merged. The error is the reason, without the field.
fn check_merged(message: &Map<String, Value>, token: &str) -> Result<(), String> {
    if message.get("token").and_then(Value::as_str) != Some(token) {
        return Err("message.token cannot be changed by an override".to_owned());
    }
    for key in ["topic", "condition", "fid"] {
        if message.contains_key(key) {
            return Err(format!(
                "message.{key} cannot be set by an override: the target is the recipient's token"
            ));
        }
    }
    for key in ["notification", "android", "apns", "webpush", "fcm_options"] {
        match message.get(key) {
            None | Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(format!(
                    "message.{key} must be an object, got {}",
                    json::json_type_name(other)
                ));
            }
        }
    }
    // Proto map<string, string> fields: FCM rejects any other value type.
    let nested = |outer: &str, inner: &str| message.get(outer).and_then(|o| o.get(inner));
    let maps = [
        ("data", message.get("data"), true),
        ("android.data", nested("android", "data"), true),
        ("webpush.data", nested("webpush", "data"), true),
        ("apns.headers", nested("apns", "headers"), false),
    ];
    for (name, value, is_data) in maps {
        let map = match value {
            None => continue,
            Some(Value::Object(map)) => map,
            Some(other) => {
                return Err(format!(
                    "message.{name} must be an object, got {}",
                    json::json_type_name(other)
                ));
            }
        };
        for (key, v) in map {
            if !v.is_string() {
                return Err(format!("message.{name}.{key} must be a string"));
            }
            if is_data && is_reserved_data_key(key) {
                return Err(format!("message.{name}.{key} {RESERVED}"));
            }
        }
    }
    Ok(())
}

impl CompiledTemplate {
    /// A template problem that rejects every FCM recipient, if any.
    pub(super) fn find_fcm_problem(&self) -> Option<FieldError> {
        if let Some((key, _)) = self.data.iter().find(|(k, _)| is_reserved_data_key(k)) {
            return Some(FieldError::new(
                format!("template.data.{key}"),
                format!("`{key}` {RESERVED}"),
            ));
        }
        match self.ttl_secs {
            Some(ttl) if ttl > MAX_FCM_TTL_SECS => Some(FieldError::new(
                "template.ttl_seconds",
                format!("ttl is {ttl} s; FCM allows at most {MAX_FCM_TTL_SECS} s (4 weeks)"),
            )),
            _ => None,
        }
    }

    /// Renders the FCM request of one recipient.
    pub(super) fn render_fcm(
        &self,
        recipient: RecipientRef<'_>,
        index: usize,
        stamp: Stamp<'_>,
        ctx: &RenderContext,
    ) -> Result<FcmRequest, FieldError> {
        if let Some(problem) = &self.fcm_problem {
            return Err(problem.clone());
        }
        let token = recipient.device_token;
        check_token(token)
            .map_err(|reason| FieldError::new(recipient_field(index, "device_token"), reason))?;
        let (title, subtitle, body) = self.effective_texts(recipient, index)?;
        let content = self.content(&title, subtitle, &body, recipient.vars, index)?;
        let has_text = !(content.title.is_empty() && content.body.is_empty());
        let notification = has_text && !content.is_background();
        let android_priority = match (self.priority, notification) {
            (Priority::High, _) | (Priority::Default, true) => "HIGH",
            (Priority::Normal, _) | (Priority::Default, false) => "NORMAL",
        };
        // FCM: "a data-only message to iOS may use only apns-priority 5".
        let apns_priority = if notification {
            self.apns_priority(content.push_type)?
        } else {
            5
        };
        let expiration = expiration(stamp.accepted_at, self.ttl_secs);
        let label = ctx
            .analytics_label
            .as_deref()
            .and_then(sanitize_analytics_label);

        let mut buf = Vec::with_capacity(512 + token.len());
        let mut root = Obj::begin(&mut buf);
        root.obj("message", |m| {
            m.str("token", token);
            if notification {
                m.obj("notification", |n| {
                    n.str_nonempty("title", &content.title);
                    n.str_nonempty("body", &content.body);
                    n.str_nonempty("image", &self.image_url);
                });
            }
            if !content.data.is_empty() {
                m.obj("data", |d| {
                    for (key, value) in &content.data {
                        d.str(key, value);
                    }
                });
            }
            m.obj("android", |a| {
                a.str("priority", android_priority);
                if let Some(ttl) = self.ttl_secs {
                    let out = a.key("ttl");
                    out.push(b'"');
                    json::write_u64(out, ttl);
                    out.extend_from_slice(b"s\"");
                }
                a.str_nonempty("collapse_key", &self.collapse_key);
                let has_android_notification = !(self.android_channel_id.is_empty()
                    && self.deep_link.is_empty()
                    && self.sound.is_empty()
                    && self.collapse_key.is_empty());
                if notification && has_android_notification {
                    a.obj("notification", |n| {
                        n.str_nonempty("channel_id", &self.android_channel_id);
                        n.str_nonempty("click_action", &self.deep_link);
                        n.str_nonempty("sound", &self.sound);
                        n.str_nonempty("tag", &self.collapse_key);
                    });
                }
            });
            m.obj("apns", |a| {
                a.obj("headers", |h| {
                    let out = h.key("apns-priority");
                    out.push(b'"');
                    json::write_u64(out, u64::from(apns_priority));
                    out.push(b'"');
                    h.str("apns-push-type", content.push_type.header_value());
                    if let Some(exp) = expiration {
                        let out = h.key("apns-expiration");
                        out.push(b'"');
                        json::write_u64(out, exp);
                        out.push(b'"');
                    }
                    h.str_nonempty("apns-collapse-id", &self.collapse_key);
                });
                a.obj("payload", |p| {
                    write_aps(p, &self.aps(&content, false));
                    p.str_nonempty("deep_link", &self.deep_link);
                });
                if notification && !self.image_url.is_empty() {
                    a.obj("fcm_options", |o| o.str("image", &self.image_url));
                }
            });
            if let Some(label) = &label {
                m.obj("fcm_options", |o| o.str("analytics_label", label));
            }
        });
        root.end();

        if self.fcm_json.is_some() || !recipient.fcm_json.trim().is_empty() {
            buf = self.merge_fcm(&buf, token, recipient.fcm_json, index)?;
        }
        let size = buf.len().saturating_sub(token.len());
        if size > MAX_FCM_PAYLOAD_BYTES {
            return Err(FieldError::new(
                recipient_field(index, "payload"),
                format!(
                    "FCM message is {size} bytes (without the token); the limit is {MAX_FCM_PAYLOAD_BYTES}"
                ),
            ));
        }
        Ok(FcmRequest {
            device_token: recipient.device_token.to_owned(),
            body: Bytes::from(buf),
        })
    }

    /// The slow path: deep-merges the raw overrides into `message`.
    fn merge_fcm(
        &self,
        buf: &[u8],
        token: &str,
        recipient_json: &str,
        index: usize,
    ) -> Result<Vec<u8>, FieldError> {
        let internal = |reason: String| {
            FieldError::new(
                recipient_field(index, "payload"),
                format!("internal error: {reason}"),
            )
        };
        let mut root: Map<String, Value> =
            serde_json::from_slice(buf).map_err(|e| internal(e.to_string()))?;
        let Some(Value::Object(message)) = root.get_mut("message") else {
            return Err(internal("message is not an object".to_owned()));
        };
        if let Some(patch) = &self.fcm_json {
            json::deep_merge(message, patch);
            check_merged(message, token)
                .map_err(|reason| FieldError::new("template.fcm_json", reason))?;
        }
        if !recipient_json.trim().is_empty() {
            let field = || recipient_field(index, "fcm_json");
            let patch = json::parse_object(recipient_json)
                .map_err(|reason| FieldError::new(field(), reason))?;
            json::deep_merge(message, &patch);
            check_merged(message, token).map_err(|reason| FieldError::new(field(), reason))?;
        }
        serde_json::to_vec(&root).map_err(|e| internal(e.to_string()))
    }
}
