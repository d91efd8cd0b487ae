//! The request rules the mock applies, in Apple's order: headers (ids, topic, push type,
//! priority, expiration, collapse id) and the payload (size, JSON, `aps`).

use super::*;

/// What a request failed with.
pub(super) struct Reject {
    pub(super) reason: ApnsReason,
    pub(super) timestamp_ms: Option<u64>,
}

impl From<ApnsReason> for Reject {
    fn from(reason: ApnsReason) -> Self {
        Reject {
            reason,
            timestamp_ms: None,
        }
    }
}

pub(super) const PUSH_TYPES: &[(&str, &str)] = &[
    ("alert", ""),
    ("background", ""),
    ("complication", ".complication"),
    ("controls", ".push-type.controls"),
    ("fileprovider", ".pushkit.fileprovider"),
    ("liveactivity", ".push-type.liveactivity"),
    ("location", ".location-query"),
    ("mdm", ""),
    ("pushtotalk", ".voip-ptt"),
    ("voip", ".voip"),
    ("widgets", ".push-type.widgets"),
];

pub(super) const APNS_ID: HeaderName = HeaderName::from_static("apns-id");
pub(super) const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
pub(super) const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
pub(super) const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
pub(super) const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
pub(super) const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");

pub(super) const MAX_PAYLOAD: usize = 4096;
pub(super) const MAX_VOIP_PAYLOAD: usize = 5120;

pub(super) fn is_canonical_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

pub(super) fn has_duplicate_headers(headers: &HeaderMap) -> bool {
    // No name carries two values: nothing to look at.
    if headers.len() == headers.keys_len() {
        return false;
    }
    headers.keys().any(|k| {
        let n = k.as_str();
        (n.starts_with("apns-") || n == "authorization")
            && headers.get_all(k).iter().nth(1).is_some()
    })
}

/// The fields of a request that passed the header checks.
pub(super) struct Validated<'a> {
    pub(super) token: &'a str,
    pub(super) topic: &'a str,
    pub(super) push_type: &'a str,
    pub(super) priority: u8,
    pub(super) expiration: Option<u64>,
    pub(super) collapse_id: Option<&'a str>,
}

impl ApnsInner {
    pub(super) fn check_headers<'a>(
        &self,
        parts: &'a http::request::Parts,
    ) -> Result<Validated<'a>, Reject> {
        use ApnsReason::*;
        let h = &parts.headers;
        if has_duplicate_headers(h) {
            return Err(DuplicateHeaders.into());
        }
        if let Some(id) = header_str(h, &APNS_ID)
            && !is_canonical_uuid(id)
        {
            return Err(BadMessageId.into());
        }
        if parts.method != Method::POST {
            return Err(MethodNotAllowed.into());
        }
        let topic = match header_str(h, &APNS_TOPIC) {
            Some(t) if !t.is_empty() => t,
            _ => return Err(MissingTopic.into()),
        };
        let collapse_id = h.get(&APNS_COLLAPSE_ID);
        if collapse_id.is_some_and(|c| c.len() > 64) {
            return Err(BadCollapseId.into());
        }
        let collapse_id = collapse_id.map(|c| c.to_str().unwrap_or("\u{fffd}"));
        let priority = match header_str(h, &APNS_PRIORITY) {
            None => 10,
            Some("10") => 10,
            Some("5") => 5,
            Some("1") => 1,
            Some(_) => return Err(BadPriority.into()),
        };
        let (push_type, suffix) = match header_str(h, &APNS_PUSH_TYPE) {
            None if self.cfg.require_push_type => return Err(InvalidPushType.into()),
            None => ("alert", ""),
            Some(p) => match PUSH_TYPES.iter().find(|(name, _)| *name == p) {
                Some(&(name, suffix)) => (name, suffix),
                None => return Err(InvalidPushType.into()),
            },
        };
        let bundle = match topic.strip_suffix(suffix) {
            Some(b) if !b.is_empty() => b,
            _ => return Err(BadTopic.into()),
        };
        if !self.topics.is_empty() && push_type != "mdm" && !self.topics.contains(bundle) {
            return Err(TopicDisallowed.into());
        }
        let path = parts.uri.path();
        let token = match path.strip_prefix("/3/device/") {
            Some("") => return Err(MissingDeviceToken.into()),
            Some(t) => t,
            None => return Err(BadPath.into()),
        };
        if token.contains('/') {
            return Err(BadPath.into());
        }
        if token.len() % 2 != 0 || !token.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(BadDeviceToken.into());
        }
        let expiration = match header_str(h, &APNS_EXPIRATION) {
            None => None,
            Some(e) => match e.parse::<u64>() {
                Ok(v) => {
                    if self.cfg.flag_past_expiration
                        && v > 0
                        && (v as i64) < self.faults.clock.now_secs()
                    {
                        return Err(BadExpirationDate.into());
                    }
                    Some(v)
                }
                Err(_) => return Err(BadExpirationDate.into()),
            },
        };
        let f = &self.faults;
        if f.has_unregistered.load(Relaxed) {
            let lower = token.to_ascii_lowercase();
            if let Some(ts) = f.unregistered.read().get(&lower) {
                let ts = ts.unwrap_or_else(|| f.clock.now_millis().max(0) as u64);
                return Err(Reject {
                    reason: Unregistered,
                    timestamp_ms: Some(ts),
                });
            }
        }
        if f.has_bad_tokens.load(Relaxed)
            && f.bad_tokens.read().contains(&token.to_ascii_lowercase())
        {
            return Err(BadDeviceToken.into());
        }
        Ok(Validated {
            token,
            topic,
            push_type,
            priority,
            expiration,
            collapse_id,
        })
    }

    /// Checks the payload; returns it parsed when it is to be recorded.
    pub(super) fn check_body(
        &self,
        v: &Validated<'_>,
        body: &Bytes,
        truncated: bool,
    ) -> Result<Option<serde_json::Value>, Reject> {
        use ApnsReason::*;
        if body.is_empty() && !truncated {
            return Err(PayloadEmpty.into());
        }
        let limit = if v.push_type == "voip" {
            MAX_VOIP_PAYLOAD
        } else {
            MAX_PAYLOAD
        };
        if truncated || body.len() > limit {
            return Err(PayloadTooLarge.into());
        }
        // The common case needs no tree: an object, not a `background` push, not recorded.
        let background = v.push_type == "background" && self.cfg.background_error.is_some();
        if !background && !self.cfg.record_accepted && json::is_object(body) {
            return Ok(None);
        }
        let payload: serde_json::Value = match serde_json::from_slice(body) {
            Ok(p @ serde_json::Value::Object(_)) => p,
            _ => return Err(BadRequestPayload.into()),
        };
        if v.push_type == "background"
            && let Some(err) = self.cfg.background_error
        {
            let aps_ok = payload
                .get("aps")
                .and_then(|a| a.as_object())
                .is_some_and(|aps| {
                    aps.len() == 1
                        && aps.get("content-available").and_then(|c| c.as_i64()) == Some(1)
                });
            if v.priority != 5 || !aps_ok {
                return Err(err.into());
            }
        }
        Ok(Some(payload))
    }
}
