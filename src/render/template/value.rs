//! Values while rendering: what a variable, a literal or a filter result is, and Liquid's rules
//! for truth, equality and order over them. Recipient variables are strings; they are read as a
//! number, a boolean or a JSON list or object where a rule needs one.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::Write as _;

use serde_json::Value as Json;

#[derive(Debug, Clone)]
pub(crate) enum Value<'a> {
    Nil,
    Bool(bool),
    Num(f64),
    Str(Cow<'a, str>),
    /// A JSON array or object (from a variable holding JSON, or a loop item).
    Json(Json),
    /// `empty` and `blank`, only ever compared against.
    Empty,
    Blank,
}

/// A string as a number, when the whole of it (trimmed) is one. `inf` and `NaN` are not.
pub(crate) fn parse_num(s: &str) -> Option<f64> {
    let t = s.trim();
    let first = t.bytes().next()?;
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return None;
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// A number as Liquid prints it: integers without a fraction, others shortest.
pub(crate) fn write_num(out: &mut String, n: f64) {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        let _ = write!(out, "{}", n as i64);
    } else {
        let _ = write!(out, "{n}");
    }
}

impl<'a> Value<'a> {
    pub fn from_json(j: &Json) -> Value<'static> {
        match j {
            Json::Null => Value::Nil,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => n.as_f64().map_or(Value::Nil, Value::Num),
            Json::String(s) => Value::Str(Cow::Owned(s.clone())),
            other => Value::Json(other.clone()),
        }
    }

    /// Liquid truth, with two changes for string variables: empty and `false` are false.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Nil | Value::Empty | Value::Blank => false,
            Value::Bool(b) => *b,
            Value::Str(s) => !(s.is_empty() || s.as_ref() == "false"),
            Value::Num(_) | Value::Json(_) => true,
        }
    }

    pub fn as_num(&self) -> Option<f64> {
        match self {
            Value::Num(n) => Some(*n),
            Value::Str(s) => parse_num(s),
            _ => None,
        }
    }

    /// The value as a list: a JSON array, or a string holding one.
    pub fn as_list(&self) -> Option<Vec<Json>> {
        match self {
            Value::Json(Json::Array(a)) => Some(a.clone()),
            Value::Str(s) if s.trim_start().starts_with('[') => match serde_json::from_str(s) {
                Ok(Json::Array(a)) => Some(a),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value as text, appended to `out`.
    pub fn write_to(&self, out: &mut String) {
        match self {
            Value::Nil | Value::Empty | Value::Blank => {}
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Num(n) => write_num(out, *n),
            Value::Str(s) => out.push_str(s),
            Value::Json(Json::Array(items)) => {
                for item in items {
                    Value::from_json(item).write_to(out);
                }
            }
            Value::Json(j) => out.push_str(&j.to_string()),
        }
    }

    /// The value as text.
    pub fn to_text(&self) -> Cow<'_, str> {
        match self {
            Value::Str(s) => Cow::Borrowed(s.as_ref()),
            other => {
                let mut s = String::new();
                other.write_to(&mut s);
                Cow::Owned(s)
            }
        }
    }

    /// Bytes the value takes as text, at least (for the budget).
    pub fn text_len(&self) -> usize {
        match self {
            Value::Str(s) => s.len(),
            Value::Json(j) => j.to_string().len(),
            _ => 0,
        }
    }

    fn is_empty_like(&self) -> bool {
        match self {
            Value::Str(s) => s.is_empty(),
            Value::Json(Json::Array(a)) => a.is_empty(),
            Value::Json(Json::Object(o)) => o.is_empty(),
            Value::Empty => true,
            _ => false,
        }
    }

    fn is_blank_like(&self) -> bool {
        match self {
            Value::Nil | Value::Blank | Value::Empty => true,
            Value::Bool(b) => !b,
            Value::Str(s) => s.trim().is_empty(),
            other => other.is_empty_like(),
        }
    }

    /// `==`: numbers where both sides read as numbers, else text; `empty` and `blank` as in
    /// Liquid.
    pub fn equals(&self, other: &Value<'_>) -> bool {
        match (self, other) {
            (Value::Empty, v) | (v, Value::Empty) => v.is_empty_like(),
            (Value::Blank, v) | (v, Value::Blank) => v.is_blank_like(),
            (Value::Nil, Value::Nil) => true,
            (Value::Nil, _) | (_, Value::Nil) => false,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Bool(a), Value::Str(s)) | (Value::Str(s), Value::Bool(a)) => {
                s.as_ref() == if *a { "true" } else { "false" }
            }
            (Value::Num(a), b) | (b, Value::Num(a)) => b.as_num().is_some_and(|b| b == *a),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Json(a), Value::Json(b)) => a == b,
            _ => false,
        }
    }

    /// `<` and friends: numbers where both read as numbers, else strings; `None` otherwise.
    pub fn compare(&self, other: &Value<'_>) -> Option<Ordering> {
        if let (Some(a), Some(b)) = (self.as_num(), other.as_num()) {
            return a.partial_cmp(&b);
        }
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => Some(a.as_ref().cmp(b.as_ref())),
            _ => None,
        }
    }

    /// `contains`: a substring of a string, an element of a list, a key of an object.
    pub fn contains(&self, needle: &Value<'_>) -> bool {
        if let Some(items) = self.as_list() {
            return items.iter().any(|i| Value::from_json(i).equals(needle));
        }
        match self {
            Value::Str(s) => s.contains(needle.to_text().as_ref()),
            Value::Json(Json::Object(o)) => o.contains_key(needle.to_text().as_ref()),
            _ => false,
        }
    }

    /// The value at `key` of an object (a JSON object, or a string holding one).
    pub fn get_key(&self, key: &str) -> Value<'static> {
        match self {
            Value::Json(Json::Object(o)) => o.get(key).map_or(Value::Nil, Value::from_json),
            Value::Json(Json::Array(a)) => match key {
                "size" => Value::Num(a.len() as f64),
                "first" => a.first().map_or(Value::Nil, Value::from_json),
                "last" => a.last().map_or(Value::Nil, Value::from_json),
                _ => Value::Nil,
            },
            Value::Str(s) if s.trim_start().starts_with(['{', '[']) => {
                match serde_json::from_str::<Json>(s) {
                    Ok(j @ (Json::Object(_) | Json::Array(_))) => Value::Json(j).get_key(key),
                    _ => Value::Nil,
                }
            }
            Value::Str(s) if key == "size" => Value::Num(s.chars().count() as f64),
            _ => Value::Nil,
        }
    }

    /// The element at `index` of a list (negative counts from the end).
    pub fn get_index(&self, index: i64) -> Value<'static> {
        let Some(items) = self.as_list() else {
            return Value::Nil;
        };
        let len = items.len() as i64;
        let i = if index < 0 { len + index } else { index };
        if i < 0 || i >= len {
            return Value::Nil;
        }
        Value::from_json(&items[i as usize])
    }

    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Str(s) => Value::Str(Cow::Owned(s.into_owned())),
            Value::Nil => Value::Nil,
            Value::Bool(b) => Value::Bool(b),
            Value::Num(n) => Value::Num(n),
            Value::Json(j) => Value::Json(j),
            Value::Empty => Value::Empty,
            Value::Blank => Value::Blank,
        }
    }
}
