//! The `messages:send` body rules (docs/providers.md, "FCM: message body rules"): a fast path for
//! the common shape and a full, slow validator that produces Google's error for anything else.

use super::reply::*;
use super::*;

/// Looks a field up under its snake_case or lowerCamelCase name.
pub(super) fn field<'a>(obj: &'a Map<String, Value>, snake: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(snake) {
        return Some(v);
    }
    if !snake.contains('_') {
        return None;
    }
    let mut camel = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            camel.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            camel.push(c);
        }
    }
    obj.get(&camel)
}

pub(super) const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "fcmOptions",
    "token",
    "topic",
    "condition",
    "fid",
];

/// A proto3-JSON rendering of a non-string value for "Invalid value" messages.
pub(super) fn render_value(v: &Value) -> String {
    v.to_string()
}

/// Checks a `map<string,string>` field.
pub(super) fn check_string_map(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<(), GError> {
    let Some(v) = field(obj, key) else {
        return Ok(());
    };
    match v {
        Value::Null => Ok(()),
        Value::Object(m) => {
            for (i, (_, value)) in m.iter().enumerate() {
                if !value.is_string() {
                    let f = format!("{path}[{i}].value");
                    let msg = format!(
                        "Invalid value at '{f}' (TYPE_STRING), {}",
                        render_value(value)
                    );
                    return Err(GError::invalid_json(&f, msg));
                }
            }
            Ok(())
        }
        other => {
            let msg = format!(
                "Invalid value at '{path}' (type.googleapis.com/google.protobuf.Struct), {}",
                render_value(other)
            );
            Err(GError::invalid_json(path, msg))
        }
    }
}

/// `0:<millis>%<seq as 16 hex digits>` (what `format!("0:{millis}%{seq:016x}")` gives), the id
/// part of an accepted message's name, written into `buf` without the formatting machinery. Only
/// digits, `:`, `-` and `%`: nothing JSON would escape.
pub(super) fn message_id(millis: i64, seq: u64, buf: &mut [u8; 48]) -> &str {
    pub(super) const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 20];
    let mut d = digits.len();
    let mut m = millis.unsigned_abs();
    loop {
        d -= 1;
        digits[d] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    buf[..2].copy_from_slice(b"0:");
    let mut i = 2;
    if millis < 0 {
        buf[i] = b'-';
        i += 1;
    }
    let n = digits.len() - d;
    buf[i..i + n].copy_from_slice(&digits[d..]);
    i += n;
    buf[i] = b'%';
    i += 1;
    for (k, out) in buf[i..i + 16].iter_mut().enumerate() {
        *out = HEX[((seq >> (60 - 4 * k)) & 0xf) as usize];
    }
    i += 16;
    std::str::from_utf8(&buf[..i]).unwrap_or("")
}

/// Parses a proto Duration string (`"3600s"`, `"3.5s"`) to seconds.
pub(super) fn parse_duration(s: &str) -> Option<f64> {
    let num = s.strip_suffix('s')?;
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    if int.is_empty() || !int.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if let Some(f) = frac
        && (f.is_empty() || f.len() > 9 || !f.bytes().all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    num.parse::<f64>().ok()
}

pub(super) fn check_android(message: &Map<String, Value>) -> Result<(), GError> {
    let Some(android) = field(message, "android") else {
        return Ok(());
    };
    let android = match android {
        Value::Null => return Ok(()),
        Value::Object(a) => a,
        other => {
            let msg = format!(
                "Invalid value at 'message.android' (type.googleapis.com/google.firebase.fcm.v1.AndroidConfig), {}",
                render_value(other)
            );
            return Err(GError::invalid_json("message.android", msg));
        }
    };
    check_string_map(android, "data", "message.android.data")?;
    if let Some(ttl) = field(android, "ttl") {
        let secs = ttl.as_str().and_then(parse_duration);
        match secs {
            Some(s) if s <= MAX_TTL_SECS => {}
            Some(_) => {
                return Err(
                    GError::invalid_argument("Request contains an invalid argument.")
                        .fcm("INVALID_ARGUMENT")
                        .bad_request(
                            "message.android.ttl",
                            "The value of ttl exceeds the maximum of 2419200s (4 weeks).",
                        ),
                );
            }
            None => {
                let msg = format!(
                    "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {}",
                    render_value(ttl)
                );
                return Err(GError::invalid_json("message.android.ttl", msg));
            }
        }
    }
    if let Some(p) = field(android, "priority") {
        let ok = p
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("normal") || s.eq_ignore_ascii_case("high"));
        if !ok {
            let msg = format!(
                "Invalid value at 'message.android.priority' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {}",
                render_value(p)
            );
            return Err(GError::invalid_json("message.android.priority", msg));
        }
    }
    Ok(())
}

/// The validated parts of a send request.
pub(super) struct SendRequest<'a> {
    /// The `message` object; `Null` unless asked for (only recording needs it).
    pub(super) message: Value,
    pub(super) token: Option<Cow<'a, str>>,
    pub(super) topic: Option<Cow<'a, str>>,
    pub(super) condition: Option<Cow<'a, str>>,
    pub(super) validate_only: bool,
}

/// Checks a `messages:send` body (steps 3 to 7 of the module docs). The common case goes
/// through [`validate_send_fast`], which builds nothing; whatever it does not accept is answered
/// by [`validate_send_slow`], whose `Value`-based checks define the error texts.
pub(super) fn validate_send(body: &[u8], want_message: bool) -> Result<SendRequest<'_>, GError> {
    let Some(fast) = validate_send_fast(body) else {
        return validate_send_slow(body);
    };
    let message = if want_message {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut root)) => root.remove("message").unwrap_or(Value::Null),
            _ => return validate_send_slow(body),
        }
    } else {
        Value::Null
    };
    Ok(SendRequest {
        message,
        token: fast.token.map(Cow::Borrowed),
        topic: fast.topic.map(Cow::Borrowed),
        condition: fast.condition.map(Cow::Borrowed),
        validate_only: fast.validate_only,
    })
}

/// The targets of a body [`validate_send_fast`] accepted.
#[derive(Debug, PartialEq)]
pub(super) struct FastSend<'a> {
    pub(super) token: Option<&'a str>,
    pub(super) topic: Option<&'a str>,
    pub(super) condition: Option<&'a str>,
    pub(super) validate_only: bool,
}

/// The allocation-free check of a send body. It accepts only bodies [`validate_send_slow`]
/// accepts, with the same targets and `validate_only`; it gives up (`None`) on every error and on
/// anything unusual (duplicate keys, both `validate_only` spellings, escaped keys or target
/// strings), leaving the answer to the slow path.
pub(super) fn validate_send_fast(body: &[u8]) -> Option<FastSend<'_>> {
    let root: fast::Root<'_> = crate::json::from_body(body)?;
    let token_len = root.targets[0].map_or(0, str::len);
    if body.len().saturating_sub(token_len) > MAX_MESSAGE_BYTES {
        return None;
    }
    let [token, topic, condition, _fid] = root.targets;
    Some(FastSend {
        token,
        topic,
        condition,
        validate_only: root.validate_only,
    })
}

/// The visitors of [`validate_send_fast`]: each mirrors one step of [`validate_send_slow`] and
/// fails where that step fails or where `Value`'s last-key-wins would matter.
pub(super) mod fast {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

    use super::{MAX_TTL_SECS, parse_duration};
    use crate::json::{Borrowed, OptBool, OptBorrowed, Skip, StrMap, unusual};

    /// The top level: `message` (an object) and at most one of `validate_only`/`validateOnly`.
    pub(super) struct Root<'a> {
        /// `token`, `topic`, `condition`, `fid`: exactly one is set.
        pub targets: [Option<&'a str>; 4],
        pub validate_only: bool,
    }

    pub(super) struct RootVisitor;

    impl<'de> Visitor<'de> for RootVisitor {
        type Value = Root<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a send request")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Root<'de>, A::Error> {
            let mut targets = None;
            let mut validate_only = None;
            while let Some(Borrowed(key)) = map.next_key()? {
                match key {
                    "message" if targets.is_none() => {
                        let Message(t) = map.next_value()?;
                        targets = Some(t);
                    }
                    "validate_only" | "validateOnly" if validate_only.is_none() => {
                        let OptBool(b) = map.next_value()?;
                        validate_only = Some(b.unwrap_or(false));
                    }
                    _ => return Err(unusual()),
                }
            }
            Ok(Root {
                targets: targets.ok_or_else(unusual)?,
                validate_only: validate_only.unwrap_or(false),
            })
        }
    }

    impl<'de> Deserialize<'de> for Root<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Root<'de>, D::Error> {
            d.deserialize_any(RootVisitor)
        }
    }

    /// `message`: only known fields, each once; exactly one target, a string without escapes;
    /// `data` a string map; `android` as below; no `webpush`; other fields any JSON.
    pub(super) struct Message<'a>([Option<&'a str>; 4]);

    pub(super) const MESSAGE_KEYS: [&str; 12] = [
        "token",
        "topic",
        "condition",
        "fid",
        "data",
        "android",
        "webpush",
        "name",
        "notification",
        "apns",
        "fcm_options",
        "fcmOptions",
    ];

    pub(super) struct MessageVisitor;

    impl<'de> Visitor<'de> for MessageVisitor {
        type Value = Message<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a message object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'de>, A::Error> {
            let mut seen = 0u16;
            let mut targets = [None; 4];
            while let Some(Borrowed(key)) = map.next_key()? {
                let i = MESSAGE_KEYS
                    .iter()
                    .position(|k| *k == key)
                    .ok_or_else(unusual)?;
                if seen & (1 << i) != 0 {
                    return Err(unusual());
                }
                seen |= 1 << i;
                match i {
                    0..=3 => {
                        let OptBorrowed(t) = map.next_value()?;
                        targets[i] = t;
                    }
                    4 => {
                        map.next_value::<StrMap>()?;
                    }
                    5 => {
                        map.next_value::<Android>()?;
                    }
                    // Rare in what the gateway sends (only from a caller's raw `fcm_json`):
                    // left to the `Value` path.
                    6 => return Err(unusual()),
                    _ => {
                        map.next_value::<Skip>()?;
                    }
                }
            }
            if targets.iter().flatten().count() != 1 {
                return Err(unusual());
            }
            Ok(Message(targets))
        }
    }

    impl<'de> Deserialize<'de> for Message<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Message<'de>, D::Error> {
            d.deserialize_any(MessageVisitor)
        }
    }

    /// `android`: `null`, or an object whose `data` is a string map, `ttl` a valid Duration
    /// within the limit and `priority` NORMAL/HIGH (each at most once); other fields any JSON.
    pub(super) struct Android;

    pub(super) struct AndroidVisitor;

    impl<'de> Visitor<'de> for AndroidVisitor {
        type Value = Android;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("null or an AndroidConfig object")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Android, E> {
            Ok(Android)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Android, A::Error> {
            let mut seen = 0u8;
            while let Some(Borrowed(key)) = map.next_key()? {
                let bit = match key {
                    "data" => 1,
                    "ttl" => 2,
                    "priority" => 4,
                    _ => {
                        map.next_value::<Skip>()?;
                        continue;
                    }
                };
                if seen & bit != 0 {
                    return Err(unusual());
                }
                seen |= bit;
                match bit {
                    1 => {
                        map.next_value::<StrMap>()?;
                    }
                    2 => {
                        let Borrowed(ttl) = map.next_value()?;
                        if !parse_duration(ttl).is_some_and(|s| s <= MAX_TTL_SECS) {
                            return Err(unusual());
                        }
                    }
                    _ => {
                        let Borrowed(p) = map.next_value()?;
                        if !(p.eq_ignore_ascii_case("normal") || p.eq_ignore_ascii_case("high")) {
                            return Err(unusual());
                        }
                    }
                }
            }
            Ok(Android)
        }
    }

    impl<'de> Deserialize<'de> for Android {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Android, D::Error> {
            d.deserialize_any(AndroidVisitor)
        }
    }
}

/// The `Value`-based check of a send body: the reference behaviour, and the source of every
/// error text.
pub(super) fn validate_send_slow(body: &[u8]) -> Result<SendRequest<'static>, GError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| {
        let msg = format!("Invalid JSON payload received. {e}");
        GError::invalid_json("", msg)
    })?;
    let Value::Object(mut root) = root else {
        let msg = "Invalid JSON payload received. Expected an object.".to_string();
        return Err(GError::invalid_json("", msg));
    };
    for k in root.keys() {
        if !matches!(k.as_str(), "message" | "validate_only" | "validateOnly") {
            let msg =
                format!("Invalid JSON payload received. Unknown name \"{k}\": Cannot find field.");
            return Err(GError::invalid_json("", msg));
        }
    }
    let validate_only = match field(&root, "validate_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            let msg = format!(
                "Invalid value at 'validate_only' (TYPE_BOOL), {}",
                render_value(other)
            );
            return Err(GError::invalid_json("validate_only", msg));
        }
    };
    let no_recipient = || {
        GError::invalid_argument("Recipient of the message is not set.")
            .fcm("INVALID_ARGUMENT")
            .bad_request("message", "Recipient of the message is not set.")
    };
    let message = match root.get("message") {
        None | Some(Value::Null) => return Err(no_recipient()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            let msg = format!(
                "Invalid value at 'message' (type.googleapis.com/google.firebase.fcm.v1.Message), {}",
                render_value(other)
            );
            return Err(GError::invalid_json("message", msg));
        }
    };
    for k in message.keys() {
        if !MESSAGE_FIELDS.contains(&k.as_str()) {
            let msg = format!(
                "Invalid JSON payload received. Unknown name \"{k}\" at 'message': Cannot find field."
            );
            return Err(GError::invalid_json("message", msg));
        }
    }
    let mut set: Option<&str> = None;
    let mut targets: [Option<String>; 3] = [None, None, None];
    for (i, name) in ["token", "topic", "condition", "fid"].iter().enumerate() {
        let v = match message.get(*name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => s,
            Some(other) => {
                let msg = format!(
                    "Invalid value at 'message.{name}' (TYPE_STRING), {}",
                    render_value(other)
                );
                return Err(GError::invalid_json(&format!("message.{name}"), msg));
            }
        };
        if set.is_some() {
            let msg = format!(
                "Invalid value at 'message' (oneof), oneof field 'target' is already set. Cannot set '{name}'"
            );
            return Err(GError::invalid_json("message", msg));
        }
        set = Some(name);
        if i < 3 {
            targets[i] = Some(v.clone());
        }
    }
    if set.is_none() {
        return Err(no_recipient());
    }
    check_string_map(message, "data", "message.data")?;
    check_android(message)?;
    if let Some(Value::Object(w)) = field(message, "webpush") {
        check_string_map(w, "data", "message.webpush.data")?;
    }
    let token_len = targets[0].as_ref().map_or(0, String::len);
    if body.len().saturating_sub(token_len) > MAX_MESSAGE_BYTES {
        return Err(GError::invalid_argument(
            "Request contains an invalid argument.",
        ));
    }
    let [token, topic, condition] = targets.map(|t| t.map(Cow::Owned));
    let message = root.remove("message").unwrap_or(Value::Null);
    Ok(SendRequest {
        message,
        token,
        topic,
        condition,
        validate_only,
    })
}
