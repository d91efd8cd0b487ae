//! Small JSON helpers for the render hot path: an append-only object writer over a `Vec<u8>`
//! (no intermediate `serde_json::Value`), and the deep merge used for raw JSON overrides.
//!
//! The writer escapes strings exactly as `serde_json` does, so a payload written here and one
//! re-serialized by `serde_json` after a merge differ only in key order.

use serde_json::{Map, Value};

/// Appends `s` as a JSON string literal (with quotes) to `out`.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// Appends the decimal digits of `value` to `out`, without allocating.
pub(crate) fn write_u64(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut v = value;
    for slot in digits.iter_mut().rev() {
        // u64::MAX has 20 digits, so the loop always ends by `break`.
        *slot = b'0' + (v % 10) as u8;
        start -= 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
}

/// An object being written: `{` on creation, `,` between members, `}` on [`Obj::end`].
pub(crate) struct Obj<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Obj<'a> {
    pub(crate) fn begin(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, empty: true }
    }

    /// Writes `"key":` and returns the buffer for the value.
    pub(crate) fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        write_str(self.out, key);
        self.out.push(b':');
        self.out
    }

    pub(crate) fn str(&mut self, key: &str, value: &str) {
        let out = self.key(key);
        write_str(out, value);
    }

    /// A string member, omitted when `value` is empty.
    pub(crate) fn str_nonempty(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.str(key, value);
        }
    }

    pub(crate) fn u64(&mut self, key: &str, value: u64) {
        let out = self.key(key);
        write_u64(out, value);
    }

    /// A nested object member, written by `f`.
    pub(crate) fn obj(&mut self, key: &str, f: impl FnOnce(&mut Obj<'_>)) {
        let out = self.key(key);
        let mut inner = Obj::begin(out);
        f(&mut inner);
        inner.end();
    }

    pub(crate) fn end(self) {
        self.out.push(b'}');
    }
}

/// Deep-merges `patch` into `target`: objects merge key by key, recursively; any other value
/// (including `null` and arrays) replaces what was there.
pub(crate) fn deep_merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match (target.get_mut(key), value) {
            (Some(Value::Object(t)), Value::Object(p)) => deep_merge(t, p),
            _ => {
                target.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Parses a raw override: it must be a JSON object. The error is the reason, without the field.
pub(crate) fn parse_object(raw: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "must be a JSON object, got {}",
            json_type_name(&other)
        )),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

pub(crate) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merge_is_deep_and_replaces_non_objects() {
        let mut t = parse_object(r#"{"aps":{"alert":{"title":"a","body":"b"},"badge":1},"k":[1]}"#)
            .unwrap();
        let p =
            parse_object(r#"{"aps":{"alert":{"title":"x"},"badge":null,"sound":"s"},"k":{"n":1}}"#)
                .unwrap();
        deep_merge(&mut t, &p);
        assert_eq!(
            Value::Object(t),
            serde_json::json!({"aps":{"alert":{"title":"x","body":"b"},"badge":null,"sound":"s"},"k":{"n":1}})
        );
    }

    #[test]
    fn parse_object_rejects_non_objects() {
        assert_eq!(
            parse_object("[1]").unwrap_err(),
            "must be a JSON object, got an array"
        );
        assert!(parse_object("{").unwrap_err().starts_with("invalid JSON: "));
    }

    #[test]
    fn writer_builds_objects() {
        let mut out = Vec::new();
        let mut o = Obj::begin(&mut out);
        o.str("a", "x");
        o.str_nonempty("skip", "");
        o.obj("b", |b| b.u64("n", 7));
        o.obj("c", |_| {});
        o.end();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"x","b":{"n":7},"c":{}}"#
        );
    }

    proptest! {
        #[test]
        fn write_u64_matches_to_string(v in any::<u64>()) {
            let mut out = Vec::new();
            write_u64(&mut out, v);
            prop_assert_eq!(out, v.to_string().into_bytes());
        }

        #[test]
        fn write_str_matches_serde_json(s in "\\PC*|[\\x00-\\x7f]*") {
            let mut out = Vec::new();
            write_str(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }
    }
}
