//! The packed form of a batch's accepted recipients: one buffer per batch, each recipient's
//! strings length-prefixed one after the other, read back without allocating. Private to
//! [`crate::work`]: only [`super::batch`] packs and reads it.

use crate::domain::{Platform, Recipient};
use crate::render::template::Vars;
use crate::render::{CompiledTemplate, RecipientRef};

/// Never a packed recipient's offset: marks a waiting message that has left its packed form.
pub(super) const NO_OFFSET: u32 = u32::MAX;

/// The accepted recipients of one batch, packed one after the other into one buffer.
///
/// A recipient is a flag byte (platform, which text overrides are present, how variables are
/// named), then length-prefixed (LEB128) strings: device token, message id, user id, title and
/// body when present, the APNs and FCM overrides, the time zone when present (kept only when a
/// text may use a `date` filter); then the number of variables and each name and
/// value. Only the variables the template uses are kept, named by their index in the template's
/// sorted list of names; a recipient that overrides a text (which may use any variable) keeps all
/// of them, by name.
#[derive(Default)]
pub struct PackedRecipients(pub(super) Vec<u8>);

/// Where [`PackedRecipients::push`] put a recipient.
#[derive(Debug, Clone, Copy)]
pub struct PackedAt {
    pub(super) offset: u32,
    pub(super) index: u32,
}

impl PackedAt {
    /// The recipient's position in its batch.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// The recipient's byte offset in its batch's packed buffer (what a durable store keeps).
    pub fn offset(&self) -> u32 {
        self.offset
    }
}

const FCM: u8 = 1;
const HAS_TITLE: u8 = 2;
const HAS_BODY: u8 = 4;
const NAMES_INLINE: u8 = 8;
const TOKEN_AS_BYTES: u8 = 16;
const HAS_ZONE: u8 = 32;

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
        content: u16,
        template: &CompiledTemplate,
    ) -> Option<PackedAt> {
        let offset = u32::try_from(self.0.len())
            .ok()
            .filter(|&o| o != NO_OFFSET)?;
        let out = &mut self.0;
        let names_inline = recipient.title.is_some() || recipient.body.is_some();
        let token_bytes = token_as_bytes(recipient.platform, &recipient.device_token);
        // A text override may use `date` too.
        let zone = !recipient.timezone.is_empty() && (template.uses_dates() || names_inline);
        let mut flags = match recipient.platform {
            Platform::Apns => 0,
            Platform::Fcm => FCM,
        };
        for (present, flag) in [
            (recipient.title.is_some(), HAS_TITLE),
            (recipient.body.is_some(), HAS_BODY),
            (names_inline, NAMES_INLINE),
            (token_bytes, TOKEN_AS_BYTES),
            (zone, HAS_ZONE),
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
            .chain(zone.then_some(recipient.timezone.as_str()))
        {
            put_str(out, s);
        }
        put_len(out, usize::from(content));
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
pub(super) struct Fields<'a> {
    pub(super) platform: Platform,
    pub(super) device_token: Token<'a>,
    pub(super) message_id: &'a str,
    pub(super) user_id: &'a str,
    pub(super) title: Option<&'a str>,
    pub(super) body: Option<&'a str>,
    pub(super) apns_json: &'a str,
    pub(super) fcm_json: &'a str,
    /// Empty unless kept (see [`PackedRecipients`]).
    pub(super) timezone: &'a str,
    /// The content set (variant and locale) the recipient is rendered with.
    pub(super) content: u16,
    pub(super) vars: PackedVars<'a>,
}

/// A packed device token.
pub(super) enum Token<'a> {
    Text(&'a str),
    /// An APNs token's bytes (see [`token_as_bytes`]).
    Bytes(&'a [u8]),
}

impl<'a> Token<'a> {
    pub(super) fn text(&self) -> std::borrow::Cow<'a, str> {
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
    pub(super) fn recipient(&'a self, device_token: &'a str) -> RecipientRef<'a> {
        RecipientRef {
            platform: self.platform,
            device_token,
            vars: &self.vars,
            title: self.title,
            body: self.body,
            apns_json: self.apns_json,
            fcm_json: self.fcm_json,
            content: self.content,
            timezone: self.timezone,
        }
    }
}

pub(super) struct Packed;

impl Packed {
    pub(super) fn platform(flags: u8) -> Platform {
        if flags & FCM != 0 {
            Platform::Fcm
        } else {
            Platform::Apns
        }
    }

    /// Reads the recipient at the start of `bytes`, packed for `template`.
    pub(super) fn unpack<'a>(bytes: &'a [u8], template: &'a CompiledTemplate) -> Fields<'a> {
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
        let timezone = if flags & HAS_ZONE != 0 { r.str() } else { "" };
        let content = u16::try_from(r.len()).unwrap_or(0);
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
            timezone,
            content,
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
pub(super) struct PackedVars<'a> {
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
                // A damaged count (from a store's copy) must not loop past the bytes there are.
                for _ in 0..self.count.min(self.bytes.len()) {
                    let index = r.len();
                    let value = r.str();
                    if index == wanted {
                        return Some(value);
                    }
                }
            }
            None => {
                for _ in 0..self.count.min(self.bytes.len()) {
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

/// The packed codec's fuzz target body (`crate::fuzzing::packed`): kept here because the codec
/// is private to this module.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz {
    use super::*;

    /// Reads `bytes` as a packed recipient, every field and variable: a damaged buffer (a
    /// durable store's copy) never panics.
    pub(crate) fn unpack_anything(bytes: &[u8], template: &CompiledTemplate, names: &[&str]) {
        let f = Packed::unpack(bytes, template);
        let _ = f.device_token.text();
        let _ = (
            f.message_id,
            f.user_id,
            f.title,
            f.body,
            f.apns_json,
            f.fcm_json,
        );
        for name in names {
            let _ = f.vars.get(name);
        }
        for name in template.variable_names() {
            let _ = f.vars.get(name);
        }
    }

    /// Packs `recipient` after `before` others and reads it back: every field comes back as it
    /// was, and every variable rendering can read (all of them for a recipient that overrides a
    /// text, those the template uses otherwise).
    pub(crate) fn round_trip(
        before: &[Recipient],
        recipient: &Recipient,
        message_id: &str,
        content: u16,
        template: &CompiledTemplate,
    ) {
        let mut packed = PackedRecipients::default();
        for (i, other) in before.iter().enumerate() {
            packed.push(other, &other.message_id, i, 0, template);
        }
        let at = packed
            .push(recipient, message_id, before.len(), content, template)
            .expect("a small buffer has room");
        assert_eq!(at.index(), before.len());
        let f = Packed::unpack(&packed.0[at.offset as usize..], template);
        assert_eq!(f.platform, recipient.platform);
        assert_eq!(f.device_token.text(), recipient.device_token);
        assert_eq!(f.message_id, message_id);
        assert_eq!(f.user_id, recipient.user_id);
        assert_eq!(f.title, recipient.title.as_deref());
        assert_eq!(f.body, recipient.body.as_deref());
        assert_eq!(f.apns_json, recipient.apns_json);
        assert_eq!(f.fcm_json, recipient.fcm_json);
        assert_eq!(f.content, content);
        let overrides = recipient.title.is_some() || recipient.body.is_some();
        for (name, value) in &recipient.vars {
            let kept = overrides || template.variable_index(name).is_some();
            let expected = kept.then_some(value.as_str());
            assert_eq!(f.vars.get(name), expected, "variable `{name}`");
        }
        for name in template.variable_names() {
            assert_eq!(
                f.vars.get(name),
                recipient.vars.get(name).map(String::as_str),
                "variable `{name}` the template uses"
            );
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::domain::Template;
    use std::collections::BTreeMap;

    pub(in crate::work) fn recipient() -> Recipient {
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
            token_registered_at_ms: 0,
            send_at_ms: 0,
        }
    }

    pub(in crate::work) fn template(title: &str) -> CompiledTemplate {
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
        let first = packed.push(&plain, "m-0", 0, 0, &template).unwrap();
        let r = recipient();
        let second = packed.push(&r, "m-1", 1, 0, &template).unwrap();
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
    fn the_time_zone_is_kept_only_when_a_text_may_use_dates() {
        let mut r = recipient();
        r.body = None;
        r.timezone = "Europe/Paris".into();
        for (title, kept) in [
            (
                "Hi {{ first_name }}, ends {{ at | date: '%H:%M' }}",
                "Europe/Paris",
            ),
            ("Hi {{ first_name }}", ""),
        ] {
            let template = template(title);
            let mut packed = PackedRecipients::default();
            let at = packed.push(&r, "m", 0, 0, &template).unwrap();
            let f = Packed::unpack(&packed.0[at.offset as usize..], &template);
            assert_eq!(f.timezone, kept, "{title}");
            assert_eq!(f.fcm_json, r.fcm_json);
            assert_eq!(f.vars.get("first_name"), Some("Ada"));
        }
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
            packed.push(&r, "m", 0, 0, &template).unwrap();
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
        packed.push(&r, "m", 0, 0, &template).unwrap();
        let f = Packed::unpack(&packed.0, &template);
        assert!(
            matches!(f.device_token, Token::Text(_)),
            "FCM tokens stay text"
        );
    }

    /// Found by the `packed` fuzz target: a damaged variable count (2^35) made every lookup
    /// loop that many times over an empty buffer, for minutes. Each pair takes at least one
    /// byte, so no more pairs are read than there are bytes.
    #[test]
    fn a_damaged_variable_count_does_not_loop_past_the_bytes() {
        let template = template("{{ a }}");
        // Flags, five empty strings, content 0, then a count of 2^35 - 1 with nothing after.
        for flags in [0u8, NAMES_INLINE] {
            let bytes = [flags, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x7f];
            let f = Packed::unpack(&bytes, &template);
            assert!(f.vars.count > 1 << 30);
            assert_eq!(f.vars.get("a"), None);
        }
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
}
