//! Render stage: a batch's template compiled once, rendered per recipient into a provider request.
//!
//! [`CompiledTemplate::compile`] parses the placeholders of the template (see [`template`]),
//! parses the raw JSON overrides and validates everything that does not depend on the recipient.
//! [`CompiledTemplate::render`] then turns one [`Recipient`] into a ready-to-send
//! [`ProviderRequest`], validating what does (device token, variables, overrides, final size).
//! Every error is a [`FieldError`] naming the offending field, e.g. `template.data.count`,
//! `recipients[3].vars.first_name` or `recipients[3].payload`.
//!
//! Problems that concern only one provider (a `data` key named `aps` for APNs, a reserved FCM
//! data key, an FCM ttl over four weeks) are found at compile time but reported per recipient of
//! that provider, naming the template field: a batch that reaches only iOS devices is not
//! rejected because its data would be invalid for FCM.
//!
//! # APNs payload conventions
//!
//! - `aps.alert` is a dictionary `{title, subtitle, body}` with empty members omitted (no `alert`
//!   at all when all are empty); then `badge`, `sound`, `thread-id`, `category`,
//!   `mutable-content: 1`, `content-available: 1`.
//! - Template `data` entries are top-level custom keys, peers of `aps`.
//! - The deep link is the top-level custom key `"deep_link"`; the image URL is the top-level
//!   custom key `"image_url"` and implies `mutable-content: 1`, so the app's Notification Service
//!   Extension can download and attach it. A `data` key with the same name as one of these, when
//!   the template field is set, is rejected.
//! - Push type: the template's, or `background` when `content_available` is set and there is no
//!   title, subtitle, body, sound or badge, else `alert`. A background push has priority 5 and an
//!   `aps` of exactly `{"content-available":1}`: alert text, sound or badge are rejected, thread
//!   id, category and mutable-content are not sent; `HIGH` priority is rejected.
//! - Raw overrides (`template.apns_json`, then `recipients[i].apns_json`) are deep-merged last:
//!   objects merge key by key, any other value (arrays, `null`) replaces. The result must still
//!   obey the background rule and have an object `aps`.
//!
//! # FCM message conventions
//!
//! - `notification {title, body, image}` only when the rendered title or body is non-empty and
//!   the push is not background; otherwise the message is data-only, with no
//!   `android.notification` either (its presence would make Android display something).
//! - `android.notification`: `channel_id`, `click_action` (the deep link), `sound`, and `tag` =
//!   the collapse key, so a newer notification replaces the displayed one, as
//!   `apns-collapse-id` does on iOS.
//! - `apns` mirrors the APNs request for iOS devices reached through FCM: headers
//!   `apns-priority` (`5` for data-only messages, as FCM requires), `apns-push-type`,
//!   `apns-expiration`, `apns-collapse-id`; `payload.aps` with the same rules, except that the
//!   alert carries only the `subtitle` (FCM fills title and body from `notification`, so they are
//!   not sent twice), plus the `deep_link` custom key; the image goes in `apns.fcm_options.image`.
//!   Unlike direct APNs, `HIGH` with a background push is allowed (Android high-priority data
//!   message) and sends `apns-priority: 5` to iOS.
//! - `fcm_options.analytics_label` = the context's label, sanitized to FCM's
//!   `^[a-zA-Z0-9-_.~%]{1,50}$`: other bytes are percent-encoded (UTF-8), the result is cut to
//!   50 characters without splitting an escape, and the option is omitted when nothing is left.
//! - Raw overrides (`template.fcm_json`, then `recipients[i].fcm_json`) are deep-merged into
//!   `message`; afterwards `data`, `android.data`, `webpush.data` and `apns.headers` must hold only
//!   strings, data keys must not be reserved, and the target (`token`, `topic`, `condition`,
//!   `fid`) cannot be changed.

mod apns;
pub mod content;
mod fcm;
mod json;
pub mod template;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::domain::{
    FieldError, MessageMeta, Platform, Priority, ProviderRequest, PushType, Recipient, Template,
};
use content::{Contents, Texts};
use template::{Text, Vars, WithZone};

pub use apns::sanitize_apns_id;
pub use fcm::sanitize_analytics_label;

/// APNs `apns-collapse-id` limit, in bytes; the proto applies it to `collapse_key` for both.
pub const MAX_COLLAPSE_KEY_BYTES: usize = 64;
/// Longest APNs device token accepted, in hex characters (Apple: do not assume 64).
pub const MAX_APNS_TOKEN_CHARS: usize = 200;
/// Longest FCM registration token accepted, in characters.
pub const MAX_FCM_TOKEN_CHARS: usize = 4096;
/// FCM `android.ttl` maximum: four weeks, in seconds.
pub const MAX_FCM_TTL_SECS: u64 = 2_419_200;
/// FCM message size limit, in bytes, counted on the request body minus the token.
pub const MAX_FCM_PAYLOAD_BYTES: usize = 4096;

/// The largest payload any provider takes (APNs VoIP), in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 5120;

/// Per-app settings the renderer needs.
#[derive(Debug, Clone, Default)]
pub struct RenderContext {
    /// The app's bundle id, e.g. `com.example.app`; the push type's suffix is appended.
    pub apns_topic: String,
    /// Set from the campaign id; sent (sanitized) as FCM `fcm_options.analytics_label`.
    pub analytics_label: Option<String>,
}

/// What rendering reads of one recipient, borrowed from a decoded [`Recipient`] or from the
/// packed form a waiting message keeps (`crate::work`).
#[derive(Clone, Copy)]
pub struct RecipientRef<'a> {
    pub platform: Platform,
    pub device_token: &'a str,
    pub vars: &'a dyn Vars,
    pub title: Option<&'a str>,
    pub body: Option<&'a str>,
    pub apns_json: &'a str,
    pub fcm_json: &'a str,
    /// The content set (variant and locale) chosen for the recipient; see [`content`].
    pub content: u16,
    /// The recipient's IANA zone (its `timezone`, else its app's `default_timezone`), which
    /// `date` filters without a zone use; empty: UTC.
    pub timezone: &'a str,
}

impl<'a> From<&'a Recipient> for RecipientRef<'a> {
    fn from(r: &'a Recipient) -> Self {
        RecipientRef {
            platform: r.platform,
            device_token: &r.device_token,
            vars: &r.vars,
            title: r.title.as_deref(),
            body: r.body.as_deref(),
            apns_json: &r.apns_json,
            fcm_json: &r.fcm_json,
            content: 0,
            timezone: &r.timezone,
        }
    }
}

impl RecipientRef<'_> {
    /// True when the recipient overrides the template's title or body (its own texts may then
    /// use any of its variables).
    pub fn overrides_texts(&self) -> bool {
        self.title.is_some() || self.body.is_some()
    }
}

/// The identity a rendered request carries: the message id (APNs `apns-id` when it is a UUID)
/// and the acceptance instant (expiration is counted from it).
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub message_id: &'a str,
    pub accepted_at: SystemTime,
}

impl<'a> From<&'a MessageMeta> for Stamp<'a> {
    fn from(meta: &'a MessageMeta) -> Self {
        Stamp {
            message_id: &meta.message_id,
            accepted_at: meta.accepted_at,
        }
    }
}

/// A batch's template, parsed and validated once, rendered per recipient. Its `Debug` shows
/// the shape, never the texts, URLs or JSON (see [`crate::domain::Template`]).
#[derive(Clone)]
pub struct CompiledTemplate {
    /// The title, subtitle and body of every variant and locale.
    contents: Contents,
    /// Data entries in key order, values parsed.
    data: Vec<(String, Text)>,
    image_url: String,
    deep_link: String,
    sound: String,
    badge: Option<u32>,
    category: String,
    thread_id: String,
    collapse_key: String,
    ttl_secs: Option<u64>,
    priority: Priority,
    push_type: Option<PushType>,
    content_available: bool,
    mutable_content: bool,
    apns_json: Option<Map<String, Value>>,
    fcm_json: Option<Map<String, Value>>,
    android_channel_id: String,
    /// A template problem that makes every APNs recipient fail (reported per recipient).
    apns_problem: Option<FieldError>,
    /// A template problem that makes every FCM recipient fail (reported per recipient).
    fcm_problem: Option<FieldError>,
    /// The APNs payload, when nothing in it depends on the recipient (no placeholders): built
    /// once, shared by every recipient without overrides.
    apns_cached: Option<Result<apns::Built, FieldError>>,
    /// The last `apns-topic` built (push type and value), shared by the batch's messages.
    apns_topic: std::sync::OnceLock<(PushType, bytes::Bytes)>,
    /// The variable names the template's texts use, sorted: all a waiting recipient without
    /// text overrides needs to keep of its variables.
    variables: Vec<String>,
    /// Some text may use a `date` filter: a waiting recipient keeps its time zone.
    uses_dates: bool,
}

/// Where a title or body text comes from, to name it in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Template,
    Recipient(usize),
}

impl Origin {
    fn field(self, name: &str) -> String {
        match self {
            Origin::Template => format!("template.{name}"),
            Origin::Recipient(i) => recipient_field(i, name),
        }
    }
}

fn recipient_field(index: usize, name: &str) -> String {
    format!("recipients[{index}].{name}")
}

/// A title or body text for one recipient: the template's, or the recipient's override.
struct Effective<'a> {
    text: Cow<'a, Text>,
    origin: Origin,
}

/// The personalized content of one recipient, shared by both providers.
struct Content<'a> {
    push_type: PushType,
    title: Cow<'a, str>,
    subtitle: Cow<'a, str>,
    body: Cow<'a, str>,
    data: Vec<(&'a str, Cow<'a, str>)>,
}

impl Content<'_> {
    fn is_background(&self) -> bool {
        self.push_type == PushType::Background
    }
}

impl std::fmt::Debug for CompiledTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::Len;
        f.debug_struct("CompiledTemplate")
            .field("contents", &self.contents)
            .field("data", &self.data)
            .field("image_url", &Len(&self.image_url))
            .field("deep_link", &Len(&self.deep_link))
            .field("priority", &self.priority)
            .field("push_type", &self.push_type)
            .field("apns_json", &self.apns_json.as_ref().map(|m| m.len()))
            .field("fcm_json", &self.fcm_json.as_ref().map(|m| m.len()))
            .field("variables", &self.variables)
            .finish_non_exhaustive()
    }
}

impl CompiledTemplate {
    /// Parses and validates `template`. Field errors name `template.title`,
    /// `template.data.<key>`, `template.apns_json`, `template.collapse_key`, ...
    pub fn compile(template: &Template) -> Result<CompiledTemplate, FieldError> {
        let text = |name: &str, source: &str| {
            Text::parse(source)
                .map_err(|e| FieldError::new(format!("template.{name}"), e.to_string()))
        };
        let contents = Contents::compile(template)?;
        let mut data = Vec::with_capacity(template.data.len());
        for (key, value) in &template.data {
            if key.is_empty() {
                return Err(FieldError::new(
                    "template.data",
                    "data keys must not be empty",
                ));
            }
            data.push((key.clone(), text(&format!("data.{key}"), value)?));
        }
        if template.collapse_key.len() > MAX_COLLAPSE_KEY_BYTES {
            return Err(FieldError::new(
                "template.collapse_key",
                format!(
                    "collapse key is {} bytes; the limit is {MAX_COLLAPSE_KEY_BYTES} (APNs apns-collapse-id)",
                    template.collapse_key.len()
                ),
            ));
        }
        let raw = |name: &str, source: &str| {
            if source.trim().is_empty() {
                return Ok(None);
            }
            json::parse_object(source)
                .map(Some)
                .map_err(|reason| FieldError::new(format!("template.{name}"), reason))
        };
        let apns_json = raw("apns_json", &template.apns_json)?;
        let fcm_json = raw("fcm_json", &template.fcm_json)?;

        let mut compiled = CompiledTemplate {
            contents,
            data,
            image_url: template.image_url.clone(),
            deep_link: template.deep_link.clone(),
            sound: template.sound.clone(),
            badge: template.badge,
            category: template.category.clone(),
            thread_id: template.thread_id.clone(),
            collapse_key: template.collapse_key.clone(),
            ttl_secs: template.ttl.map(|d| d.as_secs()),
            priority: template.priority,
            push_type: template.push_type,
            content_available: template.content_available,
            mutable_content: template.mutable_content,
            apns_json,
            fcm_json,
            android_channel_id: template.android_channel_id.clone(),
            apns_problem: None,
            fcm_problem: None,
            apns_cached: None,
            apns_topic: std::sync::OnceLock::new(),
            variables: Vec::new(),
            uses_dates: false,
        };
        compiled.uses_dates = compiled
            .contents
            .texts()
            .chain(compiled.data.iter().map(|(_, text)| text))
            .any(|text| text.may_use_dates());
        let mut variables: Vec<String> = compiled
            .contents
            .texts()
            .chain(compiled.data.iter().map(|(_, text)| text))
            .flat_map(|text| text.variables())
            .map(str::to_owned)
            .collect();
        variables.sort_unstable();
        variables.dedup();
        compiled.variables = variables;
        if compiled.push_type == Some(PushType::Background) {
            for set in compiled.contents.sets() {
                compiled.check_background(
                    &Effective {
                        text: Cow::Borrowed(&set.title),
                        origin: Origin::Template,
                    },
                    &set.subtitle,
                    &Effective {
                        text: Cow::Borrowed(&set.body),
                        origin: Origin::Template,
                    },
                )?;
            }
        }
        compiled.apns_problem = compiled.find_apns_problem();
        compiled.fcm_problem = compiled.find_fcm_problem();
        if compiled.apns_problem.is_none()
            && compiled.is_static()
            && compiled.contents.sets().len() == 1
        {
            let set = compiled.contents.set(0);
            compiled.apns_cached = Some(compiled.build_apns_payload(
                &compiled.template_title(set),
                &set.subtitle,
                &compiled.template_body(set),
                &BTreeMap::new(),
                0,
                "",
            ));
        }
        Ok(compiled)
    }

    /// Renders one recipient. Field errors name `recipients[<index>].device_token`,
    /// `recipients[<index>].vars.<name>`, `recipients[<index>].apns_json`,
    /// `recipients[<index>].payload`, ..., or the template field at fault.
    pub fn render(
        &self,
        recipient: &Recipient,
        index: usize,
        meta: &MessageMeta,
        ctx: &RenderContext,
    ) -> Result<ProviderRequest, FieldError> {
        self.render_ref(recipient.into(), index, meta.into(), ctx)
    }

    /// [`render`](Self::render) from borrowed parts.
    pub fn render_ref(
        &self,
        recipient: RecipientRef<'_>,
        index: usize,
        stamp: Stamp<'_>,
        ctx: &RenderContext,
    ) -> Result<ProviderRequest, FieldError> {
        let zoned = WithZone::new(recipient.vars, recipient.timezone);
        let recipient = RecipientRef {
            vars: &zoned,
            ..recipient
        };
        match recipient.platform {
            Platform::Apns => self
                .render_apns(recipient, index, stamp, ctx)
                .map(ProviderRequest::Apns),
            Platform::Fcm => self
                .render_fcm(recipient, index, stamp, ctx)
                .map(ProviderRequest::Fcm),
        }
    }

    /// A lower bound on the payload bytes of every recipient of either provider: the literal
    /// parts of the texts both put in the payload (title and body unless `texts_overridden`,
    /// and the data values; the subtitle is APNs-only). Rendering only adds (variables, JSON
    /// syntax and escaping), so a bound over [`MAX_PAYLOAD_BYTES`] means no recipient can fit.
    pub fn min_payload_bytes(&self, texts_overridden: bool) -> usize {
        let data: usize = self.data.iter().map(|(_, v)| v.literal_len()).sum();
        let texts = if texts_overridden {
            0
        } else {
            self.contents
                .sets()
                .iter()
                .map(|set| set.title.literal_len() + set.body.literal_len())
                .min()
                .unwrap_or(0)
        };
        data + texts
    }

    /// True when a recipient's time zone may matter to its texts (a `date` filter): a
    /// waiting recipient then keeps it.
    pub fn uses_dates(&self) -> bool {
        self.uses_dates
    }

    /// The template's priority.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The position of the variable `name` among those the template's texts use (sorted by
    /// name), or `None` when no text uses it.
    pub fn variable_index(&self, name: &str) -> Option<usize> {
        self.variables
            .binary_search_by(|v| v.as_str().cmp(name))
            .ok()
    }

    /// The variable names the template's texts use, sorted (see [`Self::variable_index`]).
    pub fn variable_names(&self) -> &[String] {
        &self.variables
    }

    /// True when no text of the template has a placeholder: every recipient without overrides
    /// gets the same content.
    pub fn is_static(&self) -> bool {
        self.contents.texts().all(Text::is_static) && self.data.iter().all(|(_, v)| v.is_static())
    }

    /// The variants, locales and holdout of the template.
    pub fn contents(&self) -> &Contents {
        &self.contents
    }

    fn template_title<'a>(&self, set: &'a Texts) -> Effective<'a> {
        Effective {
            text: Cow::Borrowed(&set.title),
            origin: Origin::Template,
        }
    }

    fn template_body<'a>(&self, set: &'a Texts) -> Effective<'a> {
        Effective {
            text: Cow::Borrowed(&set.body),
            origin: Origin::Template,
        }
    }

    /// The title and body for one recipient: its overrides (parsed now) or the template's.
    fn effective_texts(
        &self,
        recipient: RecipientRef<'_>,
        index: usize,
    ) -> Result<(Effective<'_>, &Text, Effective<'_>), FieldError> {
        let set = self.contents.set(recipient.content);
        // Overrides are rare: they are parsed per recipient, only when present.
        let own = |source: &str, name: &str| {
            Text::parse(source)
                .map(|t| Effective {
                    text: Cow::Owned(t),
                    origin: Origin::Recipient(index),
                })
                .map_err(|e| FieldError::new(recipient_field(index, name), e.to_string()))
        };
        let title = match recipient.title {
            None => self.template_title(set),
            Some(source) => own(source, "title")?,
        };
        let body = match recipient.body {
            None => self.template_body(set),
            Some(source) => own(source, "body")?,
        };
        Ok((title, &set.subtitle, body))
    }

    /// The push type for a recipient whose title and body are `title` and `body`.
    fn resolve_push_type(
        &self,
        title: &Effective<'_>,
        subtitle: &Text,
        body: &Effective<'_>,
    ) -> PushType {
        match self.push_type {
            Some(p) => p,
            None if self.content_available
                && title.text.is_empty()
                && subtitle.is_empty()
                && body.text.is_empty()
                && self.sound.is_empty()
                && self.badge.is_none() =>
            {
                PushType::Background
            }
            None => PushType::Alert,
        }
    }

    /// A background push carries only `content-available`: reject what would show something.
    fn check_background(
        &self,
        title: &Effective<'_>,
        subtitle: &Text,
        body: &Effective<'_>,
    ) -> Result<(), FieldError> {
        const WHY: &str =
            "not allowed in a background push (aps may only contain content-available)";
        let conflict = if !title.text.is_empty() {
            Some(title.origin.field("title"))
        } else if !subtitle.is_empty() {
            Some("template.subtitle".to_owned())
        } else if !body.text.is_empty() {
            Some(body.origin.field("body"))
        } else if !self.sound.is_empty() {
            Some("template.sound".to_owned())
        } else if self.badge.is_some() {
            Some("template.badge".to_owned())
        } else {
            None
        };
        match conflict {
            Some(field) => Err(FieldError::new(field, WHY)),
            None => Ok(()),
        }
    }

    /// Renders the texts of one recipient and settles its push type.
    fn content<'a>(
        &'a self,
        title: &'a Effective<'_>,
        subtitle: &'a Text,
        body: &'a Effective<'_>,
        vars: &'a dyn Vars,
        index: usize,
    ) -> Result<Content<'a>, FieldError> {
        let push_type = self.resolve_push_type(title, subtitle, body);
        if push_type == PushType::Background {
            self.check_background(title, subtitle, body)?;
        }
        let title_text = title
            .text
            .render(vars)
            .map_err(|e| render_error(e, index, || title.origin.field("title")))?;
        let subtitle = subtitle
            .render(vars)
            .map_err(|e| render_error(e, index, || "template.subtitle".to_owned()))?;
        let body_text = body
            .text
            .render(vars)
            .map_err(|e| render_error(e, index, || body.origin.field("body")))?;
        let mut data = Vec::with_capacity(self.data.len());
        for (key, value) in &self.data {
            let rendered = value
                .render(vars)
                .map_err(|e| render_error(e, index, || format!("template.data.{key}")))?;
            data.push((key.as_str(), rendered));
        }
        let (title, body) = (title_text, body_text);
        Ok(Content {
            push_type,
            title,
            subtitle,
            body,
            data,
        })
    }
}

/// A recipient's rendering failure as a field error: a missing variable names the variable
/// (`recipients[3].vars.first_name`); anything else (budget, a filter's input) names the text.
fn render_error(
    e: template::RenderError,
    index: usize,
    text_field: impl FnOnce() -> String,
) -> FieldError {
    match &e {
        template::RenderError::Missing { name } => FieldError::new(
            recipient_field(index, &format!("vars.{name}")),
            e.to_string(),
        ),
        _ => FieldError::new(text_field(), format!("recipients[{index}]: {e}")),
    }
}

/// Unix seconds of `t` (0 before the epoch).
fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Absolute expiration for a ttl counted from `accepted_at`; a zero ttl means "now or never",
/// which APNs spells `0` (deliver once, do not store).
fn expiration(accepted_at: SystemTime, ttl_secs: Option<u64>) -> Option<u64> {
    match ttl_secs {
        None => None,
        Some(0) => Some(0),
        Some(ttl) => Some(epoch_secs(accepted_at).saturating_add(ttl)),
    }
}
