//! Allocation-free JSON checks for the mocks' success paths.
//!
//! The mocks answer errors with texts derived from a `serde_json::Value` parse (map order,
//! rendered values). Building that tree costs an allocation per string, object and key, so the
//! common case is first checked with the visitors here, which accept **exactly** the JSON a
//! `Value` parse accepts (every scalar goes through `deserialize_any`, like `Value` does: same
//! number range, string escape and UTF-8 checks, same nesting limit) but keep nothing. A visitor
//! refusing something is never an answer by itself: the caller then runs the `Value`-based check,
//! which produces the exact error (or accepts what the fast path found unusual, e.g. duplicate
//! keys or escaped strings).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Any JSON value, validated and discarded.
pub(crate) struct Skip;

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

/// A JSON object, validated and discarded; anything else is an error.
pub(crate) struct Object;

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Object;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Object)
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        d.deserialize_any(ObjectVisitor)
    }
}

/// Parses `body` with a fast-path visitor. What `serde_json::from_slice` accepts is valid UTF-8
/// (bytes outside strings must be ASCII, strings are checked), so checking the whole body once and
/// parsing it as a `str` accepts the same inputs, without a UTF-8 check per string.
pub(crate) fn from_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    let text = std::str::from_utf8(body).ok()?;
    serde_json::from_str(text).ok()
}

/// True when `body` parses as a `serde_json::Value::Object`, without building it.
pub(crate) fn is_object(body: &[u8]) -> bool {
    from_body::<Object>(body).is_some()
}

/// A string borrowed from the input: one without escapes. An escaped string is an error (the
/// caller falls back to the `Value` path), so nothing is allocated.
pub(crate) struct Borrowed<'de>(pub &'de str);

struct BorrowedVisitor;

impl<'de> Visitor<'de> for BorrowedVisitor {
    type Value = Borrowed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string without escapes")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Borrowed<'de>, E> {
        Ok(Borrowed(s))
    }
}

impl<'de> Deserialize<'de> for Borrowed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Borrowed<'de>, D::Error> {
        d.deserialize_any(BorrowedVisitor)
    }
}

/// `null` (→ `None`) or a string without escapes; anything else is an error.
pub(crate) struct OptBorrowed<'de>(pub Option<&'de str>);

struct OptBorrowedVisitor;

impl<'de> Visitor<'de> for OptBorrowedVisitor {
    type Value = OptBorrowed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or a string without escapes")
    }

    fn visit_unit<E: de::Error>(self) -> Result<OptBorrowed<'de>, E> {
        Ok(OptBorrowed(None))
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<OptBorrowed<'de>, E> {
        Ok(OptBorrowed(Some(s)))
    }
}

impl<'de> Deserialize<'de> for OptBorrowed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OptBorrowed<'de>, D::Error> {
        d.deserialize_any(OptBorrowedVisitor)
    }
}

/// A string (escaped or not), validated and discarded; anything else is an error.
pub(crate) struct AnyStr;

struct AnyStrVisitor;

impl<'de> Visitor<'de> for AnyStrVisitor {
    type Value = AnyStr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyStr, E> {
        Ok(AnyStr)
    }
}

impl<'de> Deserialize<'de> for AnyStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AnyStr, D::Error> {
        d.deserialize_any(AnyStrVisitor)
    }
}

/// `null` or an object whose values are all strings (a proto `map<string, string>`); anything
/// else is an error.
pub(crate) struct StrMap;

struct StrMapVisitor;

impl<'de> Visitor<'de> for StrMapVisitor {
    type Value = StrMap;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or an object of strings")
    }

    fn visit_unit<E: de::Error>(self) -> Result<StrMap, E> {
        Ok(StrMap)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrMap, A::Error> {
        while map.next_entry::<Skip, AnyStr>()?.is_some() {}
        Ok(StrMap)
    }
}

impl<'de> Deserialize<'de> for StrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StrMap, D::Error> {
        d.deserialize_any(StrMapVisitor)
    }
}

/// `null` (→ `None`) or a boolean; anything else is an error.
pub(crate) struct OptBool(pub Option<bool>);

struct OptBoolVisitor;

impl<'de> Visitor<'de> for OptBoolVisitor {
    type Value = OptBool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or a boolean")
    }

    fn visit_unit<E: de::Error>(self) -> Result<OptBool, E> {
        Ok(OptBool(None))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<OptBool, E> {
        Ok(OptBool(Some(b)))
    }
}

impl<'de> Deserialize<'de> for OptBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OptBool, D::Error> {
        d.deserialize_any(OptBoolVisitor)
    }
}

/// The error a fast-path visitor gives up with (never shown: the caller falls back).
pub(crate) fn unusual<E: de::Error>() -> E {
    E::custom("unusual input: use the Value path")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// `is_object` agrees with a `Value` parse on edge cases of the JSON grammar.
    #[test]
    fn object_check_matches_value_parse() {
        let cases: &[&str] = &[
            r#"{}"#,
            r#"{"aps":{"alert":"hi"}}"#,
            r#" {"a":[1,2,{"b":null}],"c":true} "#,
            r#"{"a":1e400}"#,
            r#"{"a":-1e400}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\u00e9\n"}"#,
            r#"{"\u0061":1}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":01}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":tru}"#,
            r#"{"a":1} x"#,
            r#"[]"#,
            r#""s""#,
            r#"null"#,
            r#"1"#,
            "",
            "{\"a\":\"\u{7}\"}",
        ];
        for c in cases {
            let by_value = matches!(serde_json::from_str::<Value>(c), Ok(Value::Object(_)));
            assert_eq!(is_object(c.as_bytes()), by_value, "{c}");
        }
        let deep_ok = format!(
            "{}{}",
            "{\"a\":".repeat(127),
            "1".to_string() + &"}".repeat(127)
        );
        let deep_bad = format!(
            "{}{}",
            "{\"a\":".repeat(129),
            "1".to_string() + &"}".repeat(129)
        );
        for c in [&deep_ok, &deep_bad] {
            let by_value = matches!(serde_json::from_str::<Value>(c), Ok(Value::Object(_)));
            assert_eq!(is_object(c.as_bytes()), by_value);
        }
        let bad_utf8 = b"{\"a\":\"\xff\"}";
        assert!(!is_object(bad_utf8));
        assert!(serde_json::from_slice::<Value>(bad_utf8).is_err());
    }
}
