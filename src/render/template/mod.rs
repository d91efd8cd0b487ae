//! The template engine: the subset of Liquid that push copy needs, parsed once per batch into a
//! small tree and rendered per recipient under a hard budget.
//!
//! Syntax (see the README's "Templates and experiments" for the full reference):
//!
//! - Output: `{{ first_name }}`, `{{ user.city | upcase }}`, `{{ price | money: "R$ ", ",", "." }}`.
//!   Filters: `default`, `upcase`, `downcase`, `capitalize`, `strip`, `lstrip`, `rstrip`,
//!   `truncate`, `truncatewords`, `replace`, `replace_first`, `append`, `prepend`, `size`,
//!   `join`, `first`, `last`, `plus`, `minus`, `times`, `divided_by`, `round`, `money`, `date`.
//! - Tags: `if`/`elsif`/`else`/`endif`, `unless`, `case`/`when`/`else`/`endcase`,
//!   `for x in list (limit: n) (offset: n) (reversed)` with `else`, `break`, `continue`,
//!   `comment`, `raw`; comparisons `== != <> < > <= >= contains`, `and`/`or` (right to left,
//!   as in Liquid); whitespace control with `{{-`, `-}}`, `{%-`, `-%}`.
//! - Variables are the recipient's `vars`, all strings. A dotted path `user.city` is first the
//!   key `user.city` verbatim, then the key `user` read as a JSON object. A value is a number
//!   where it parses as one (`"10" == 10`, `"9" < "10"`), a list where it is a JSON array
//!   (`for`), and false when it is missing, empty or `false`.
//! - An output whose variable is missing, without a `default` filter, is a [`RenderError::Missing`]
//!   (the recipient is rejected naming `vars.<name>`), never an empty string.
//!
//! Parse errors carry the line and column; a render is bounded by [`MAX_OUTPUT_BYTES`] of
//! output (and of any intermediate value) and [`MAX_ITERATIONS`] loop iterations, so no
//! template and no variables can make one render use unbounded memory or time.
//!
//! [`Text`] borrows (no allocation) when the text has no tags or is exactly one plain variable.

mod eval;
mod expr;
mod filters;
mod parse;
#[cfg(test)]
mod tests;
mod value;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

pub(crate) use parse::Node;

/// Output bytes one text may render to (also the cap on any intermediate value).
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024;
/// Loop iterations one render may run, across all its loops.
pub const MAX_ITERATIONS: usize = 1_000;
/// How deeply blocks and filters may nest.
pub const MAX_DEPTH: usize = 32;

/// Where a recipient's variables are looked up: its decoded map, or the packed form a waiting
/// message keeps (`crate::work`).
pub trait Vars {
    fn get(&self, name: &str) -> Option<&str>;

    /// The recipient's time zone, which `date` uses when it is given none (UTC without).
    fn zone(&self) -> Option<&jiff::tz::TimeZone> {
        None
    }
}

/// Variables with the recipient's time zone, looked up by name the first time a `date` filter
/// asks (a name the database does not know reads as none: UTC).
pub struct WithZone<'a> {
    vars: &'a dyn Vars,
    name: &'a str,
    zone: std::cell::OnceCell<Option<jiff::tz::TimeZone>>,
}

impl<'a> WithZone<'a> {
    pub fn new(vars: &'a dyn Vars, name: &'a str) -> Self {
        Self {
            vars,
            name,
            zone: std::cell::OnceCell::new(),
        }
    }
}

impl Vars for WithZone<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name)
    }

    fn zone(&self) -> Option<&jiff::tz::TimeZone> {
        self.zone
            .get_or_init(|| {
                (!self.name.is_empty())
                    .then(|| jiff::tz::TimeZone::get(self.name).ok())
                    .flatten()
            })
            .as_ref()
    }
}

impl Vars for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

/// A syntax error, at a 1-based line and column (in characters) of the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct TemplateError {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// Why one recipient's text could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A variable the text outputs, that the recipient does not have, without a default.
    #[error("variable `{name}` is not set and its tag has no default")]
    Missing { name: String },
    /// The render went over its budget.
    #[error("render budget exceeded: {what}")]
    Budget { what: String },
    /// A filter could not apply to its input (a date that is not one, an unknown time zone).
    #[error("line {line}, column {column}: {message}")]
    Filter {
        line: u32,
        column: u32,
        message: String,
    },
}

/// A parsed template text, rendered many times with different variables.
#[derive(Clone, Default)]
pub struct Text {
    source: String,
    nodes: Vec<Node>,
    /// Total bytes of the literal text, to size the output buffer.
    literal_len: usize,
    /// Variable names the text may look up (verbatim keys and roots of paths), with repeats.
    variables: Vec<String>,
}

/// Its length and the variables it uses, never its text (a template may carry personal data).
impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Text")
            .field("source", &crate::redact::Len(&self.source))
            .field("variables", &self.variables)
            .finish()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Parses `source` into a [`Text`]. Never panics, whatever the input.
pub fn parse(source: &str) -> Result<Text, TemplateError> {
    Text::parse(source)
}

impl Text {
    /// Parses `source`; see the module documentation for the syntax.
    pub fn parse(source: &str) -> Result<Text, TemplateError> {
        let parsed = parse::parse(source)?;
        Ok(Text {
            source: source.to_owned(),
            nodes: parsed.nodes,
            literal_len: parsed.literal_len,
            variables: parsed.variables,
        })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Bytes of the text's literal parts outside any block: every rendering is at least this
    /// long.
    pub fn literal_len(&self) -> usize {
        self.literal_len
    }

    /// True when the text may use a `date` filter (a conservative guess from its source, for
    /// deciding whether a waiting recipient must keep its time zone).
    pub fn may_use_dates(&self) -> bool {
        self.source.contains("date")
    }

    /// True when the source text is empty (it then always renders empty).
    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    /// True when the text has no tags: it renders to its source whatever the variables.
    pub fn is_static(&self) -> bool {
        self.nodes.iter().all(|n| matches!(n, Node::Text(_)))
    }

    /// The variable names the text may look up, in order of appearance (with repeats): each
    /// path's verbatim key (`user.city`) and its root (`user`).
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.variables.iter().map(String::as_str)
    }

    /// Renders with `vars`. Borrows (no allocation) when the text has no tags or is one plain
    /// variable.
    pub fn render<'a, V: Vars + ?Sized>(
        &'a self,
        vars: &'a V,
    ) -> Result<Cow<'a, str>, RenderError> {
        match self.nodes.as_slice() {
            [] => Ok(Cow::Borrowed("")),
            [Node::Text(r)] => Ok(Cow::Borrowed(slice(&self.source, r))),
            [Node::Out(out)] if out.is_plain() => match eval::plain(out, vars)? {
                Some(v) if v.len() <= MAX_OUTPUT_BYTES => Ok(Cow::Borrowed(v)),
                Some(_) => Err(eval::over_budget()),
                None => Ok(Cow::Borrowed("")),
            },
            _ => {
                let mut out = String::with_capacity(self.literal_len + 32);
                self.render_into(vars, &mut out)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Renders with `vars`, appending to `out` (left as it was on error).
    pub fn render_into<V: Vars + ?Sized>(
        &self,
        vars: &V,
        out: &mut String,
    ) -> Result<(), RenderError> {
        let start = out.len();
        let result = eval::render(self, vars, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The part of `source` a node's range names (empty should it ever be out of bounds).
fn slice<'a>(source: &'a str, r: &std::ops::Range<u32>) -> &'a str {
    source.get(r.start as usize..r.end as usize).unwrap_or("")
}

/// The 1-based line and column (in characters) of byte `at` of `source`.
pub(crate) fn line_col(source: &str, at: usize) -> (u32, u32) {
    let mut at = at.min(source.len());
    while !source.is_char_boundary(at) {
        at -= 1;
    }
    let before = &source[..at];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}
