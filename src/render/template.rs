//! The placeholder engine: a small, strict subset of Liquid output tags.
//!
//! Supported syntax, as CRM teams write it for Braze, OneSignal or novu:
//!
//! - `{{ name }}`, `{{name}}`, `{{ user.first_name }}`: the value of the variable `name`. Names are
//!   made of ASCII letters, digits, `_`, `.` and `-`, and are looked up verbatim (a dotted name is
//!   one key of the recipient's variables, not a path).
//! - `{{ first_name | default: "there" }}` (double or single quotes, any whitespace around the
//!   tokens): the default applies when the variable is missing **or empty** (Liquid semantics).
//!   Quotes have no escapes; the default ends at the next matching quote.
//!
//! Everything else inside `{{ ... }}` is a compile error: unknown filters (`upcase`), several
//! filters, empty tags (`{{}}`), unterminated tags (`{{ x`), invalid names. Text outside tags is
//! copied verbatim (a lone `{` or `}}` is plain text). A variable without a default that the
//! recipient does not have is a [`MissingVar`] error, never an empty string or a literal `{{`.
//!
//! [`Text`] is parsed once per batch and rendered per recipient; text without tags renders as a
//! borrowed [`Cow`] with no allocation, and so does a text that is exactly one tag.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Where a recipient's variables are looked up: its decoded map, or the packed form a waiting
/// message keeps (`crate::work`).
pub trait Vars {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Vars for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

/// What is wrong with a template text, with the byte offset of the offending tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unterminated tag at byte {at}: `{{{{` without a closing `}}}}`")]
    Unterminated { at: usize },
    #[error("empty tag at byte {at}: expected a variable name inside `{{{{ }}}}`")]
    EmptyTag { at: usize },
    #[error(
        "unexpected {found} in the tag at byte {at}: expected {expected} (names use letters, digits, `_`, `.` and `-`)"
    )]
    Unexpected {
        at: usize,
        found: String,
        expected: &'static str,
    },
    #[error("unknown filter `{name}` in the tag at byte {at}: only `default` is supported")]
    UnknownFilter { at: usize, name: String },
    #[error("unterminated string in the tag at byte {at}")]
    UnterminatedString { at: usize },
    #[error("several filters in the tag at byte {at}: only one `default` filter is supported")]
    SeveralFilters { at: usize },
}

/// A variable the text needs, that the recipient does not have, and whose tag has no default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("variable `{name}` is not set and its tag has no default")]
pub struct MissingVar {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Verbatim text: a range of `Text::source`.
    Literal(Range<usize>),
    /// A tag: the variable name and its optional default, both ranges of `Text::source`.
    Var {
        name: Range<usize>,
        default: Option<Range<usize>>,
    },
}

/// A parsed template text, rendered many times with different variables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Text {
    source: String,
    segments: Vec<Segment>,
    /// Total bytes of the literal segments, to size the output buffer.
    literal_len: usize,
}

/// Parses `source` into a [`Text`]. Never panics, whatever the input.
pub fn parse(source: &str) -> Result<Text, TemplateError> {
    Text::parse(source)
}

impl Text {
    /// Parses `source`; see the module documentation for the syntax.
    pub fn parse(source: &str) -> Result<Text, TemplateError> {
        let bytes = source.as_bytes();
        let mut segments = Vec::new();
        let mut literal_len = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            let Some(open) = find(bytes, pos, b"{{") else {
                break;
            };
            if open > pos {
                segments.push(Segment::Literal(pos..open));
                literal_len += open - pos;
            }
            let (segment, end) = parse_tag(bytes, open)?;
            segments.push(segment);
            pos = end;
        }
        if pos < bytes.len() {
            segments.push(Segment::Literal(pos..bytes.len()));
            literal_len += bytes.len() - pos;
        }
        Ok(Text {
            source: source.to_owned(),
            segments,
            literal_len,
        })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Bytes of the text's literal parts: every rendering is at least this long.
    pub fn literal_len(&self) -> usize {
        self.literal_len
    }

    /// True when the source text is empty (it then always renders empty).
    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    /// True when the text has no tags: it renders to its source whatever the variables.
    pub fn is_static(&self) -> bool {
        !self
            .segments
            .iter()
            .any(|s| matches!(s, Segment::Var { .. }))
    }

    /// The variable names the text refers to, in order of appearance (with repeats).
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Var { name, .. } => self.source.get(name.clone()),
            Segment::Literal(_) => None,
        })
    }

    /// Renders with `vars`. Borrows (no allocation) when the text has no tags or is one tag.
    pub fn render<'a, V: Vars + ?Sized>(&'a self, vars: &'a V) -> Result<Cow<'a, str>, MissingVar> {
        match self.segments.as_slice() {
            [] => Ok(Cow::Borrowed("")),
            [Segment::Literal(_)] => Ok(Cow::Borrowed(&self.source)),
            [only @ Segment::Var { .. }] => self.value(only, vars).map(Cow::Borrowed),
            segments => {
                let mut out = String::with_capacity(self.literal_len + 16 * segments.len());
                self.render_segments(vars, &mut out)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Renders with `vars`, appending to `out` (left as it was on error).
    pub fn render_into<V: Vars + ?Sized>(
        &self,
        vars: &V,
        out: &mut String,
    ) -> Result<(), MissingVar> {
        let start = out.len();
        let result = self.render_segments(vars, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn render_segments<V: Vars + ?Sized>(
        &self,
        vars: &V,
        out: &mut String,
    ) -> Result<(), MissingVar> {
        for segment in &self.segments {
            out.push_str(self.value(segment, vars)?);
        }
        Ok(())
    }

    /// The text a segment renders to.
    fn value<'a, V: Vars + ?Sized>(
        &'a self,
        segment: &Segment,
        vars: &'a V,
    ) -> Result<&'a str, MissingVar> {
        let slice = |r: &Range<usize>| self.source.get(r.clone()).unwrap_or("");
        match segment {
            Segment::Literal(r) => Ok(slice(r)),
            Segment::Var { name, default } => {
                let name = slice(name);
                match (vars.get(name), default) {
                    (Some(""), Some(d)) => Ok(slice(d)),
                    (Some(v), _) => Ok(v),
                    (None, Some(d)) => Ok(slice(d)),
                    (None, None) => Err(MissingVar {
                        name: name.to_owned(),
                    }),
                }
            }
        }
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn find(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Describes the byte at `pos` (or the end of the tag) for error messages.
fn found_at(bytes: &[u8], pos: usize) -> String {
    match bytes.get(pos..) {
        None | Some([]) => "end of text".to_owned(),
        // `pos` is always at a char boundary: the parser only steps over ASCII bytes.
        Some(rest) => match std::str::from_utf8(rest)
            .ok()
            .and_then(|s| s.chars().next())
        {
            Some(c) => format!("`{}`", c.escape_debug()),
            None => format!("byte 0x{:02x}", rest.first().copied().unwrap_or(0)),
        },
    }
}

/// A cursor over the inside of one tag.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Offset of the tag's `{{`, for error messages.
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn take_while(&mut self, pred: impl Fn(u8) -> bool) -> Range<usize> {
        let start = self.pos;
        while self.peek().is_some_and(&pred) {
            self.pos += 1;
        }
        start..self.pos
    }

    fn at_close(&self) -> bool {
        self.bytes.get(self.pos..self.pos + 2) == Some(b"}}")
    }

    /// Where the tag ends when the cursor is inside it, or an unterminated-tag error.
    fn unexpected(&self, expected: &'static str) -> TemplateError {
        if find(self.bytes, self.pos, b"}}").is_none() {
            return TemplateError::Unterminated { at: self.at };
        }
        TemplateError::Unexpected {
            at: self.at,
            found: found_at(self.bytes, self.pos),
            expected,
        }
    }
}

/// Parses the tag whose `{{` is at `open`; returns it and the offset just past its `}}`.
fn parse_tag(bytes: &[u8], open: usize) -> Result<(Segment, usize), TemplateError> {
    let mut c = Cursor {
        bytes,
        pos: open + 2,
        at: open,
    };
    c.skip_ws();
    if c.at_close() {
        return Err(TemplateError::EmptyTag { at: open });
    }
    let name = c.take_while(is_name_byte);
    if name.is_empty() {
        return Err(c.unexpected("a variable name"));
    }
    c.skip_ws();
    let mut default = None;
    if c.peek() == Some(b'|') {
        c.pos += 1;
        c.skip_ws();
        let filter = c.take_while(|b| b.is_ascii_alphanumeric() || b == b'_');
        if filter.is_empty() {
            return Err(c.unexpected("a filter name after `|`"));
        }
        let filter_name = bytes.get(filter).unwrap_or_default();
        if filter_name != b"default" {
            return Err(TemplateError::UnknownFilter {
                at: open,
                name: String::from_utf8_lossy(filter_name).into_owned(),
            });
        }
        c.skip_ws();
        if c.peek() != Some(b':') {
            return Err(c.unexpected("`:` after `default`"));
        }
        c.pos += 1;
        c.skip_ws();
        let quote = match c.peek() {
            Some(q @ (b'"' | b'\'')) => q,
            _ => return Err(c.unexpected("a quoted default value")),
        };
        c.pos += 1;
        let value = c.take_while(|b| b != quote);
        if c.peek() != Some(quote) {
            return Err(TemplateError::UnterminatedString { at: open });
        }
        c.pos += 1;
        default = Some(value);
        c.skip_ws();
        if c.peek() == Some(b'|') {
            return Err(TemplateError::SeveralFilters { at: open });
        }
    }
    if !c.at_close() {
        return Err(c.unexpected(if default.is_some() {
            "`}}` after the default value"
        } else {
            "`}}` or `| default: \"...\"` after the name"
        }));
    }
    Ok((Segment::Var { name, default }, c.pos + 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn render(src: &str, v: &BTreeMap<String, String>) -> Result<String, MissingVar> {
        let text = parse(src).map_err(|e| MissingVar {
            name: format!("parse error: {e}"),
        })?;
        text.render(v).map(Cow::into_owned)
    }

    #[test]
    fn plain_text_is_borrowed() {
        let t = parse("Hello there } { }} |").unwrap();
        assert!(t.is_static());
        assert!(matches!(
            t.render(&BTreeMap::new()),
            Ok(Cow::Borrowed("Hello there } { }} |"))
        ));
        assert!(matches!(
            parse("").unwrap().render(&BTreeMap::new()),
            Ok(Cow::Borrowed(""))
        ));
    }

    #[test]
    fn single_tag_is_borrowed() {
        let v = vars(&[("name", "Ada")]);
        let t = parse("{{ name }}").unwrap();
        assert!(matches!(t.render(&v), Ok(Cow::Borrowed("Ada"))));
    }

    #[test]
    fn variables_and_spacing() {
        let v = vars(&[
            ("name", "Ada"),
            ("user.first_name", "Grace"),
            ("a-b_c", "x"),
        ]);
        assert_eq!(render("Hi {{name}}!", &v).unwrap(), "Hi Ada!");
        assert_eq!(render("Hi {{   name\t}}!", &v).unwrap(), "Hi Ada!");
        assert_eq!(
            render("{{ user.first_name }} & {{a-b_c}}", &v).unwrap(),
            "Grace & x"
        );
        assert_eq!(
            parse("{{ a }}{{ b | default: 'x' }}")
                .unwrap()
                .variables()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn default_applies_when_missing_or_empty() {
        let v = vars(&[("empty", ""), ("set", "Ada")]);
        assert_eq!(
            render("Hi {{ missing | default: \"there\" }}", &v).unwrap(),
            "Hi there"
        );
        assert_eq!(
            render("Hi {{ empty|default:'there' }}", &v).unwrap(),
            "Hi there"
        );
        assert_eq!(
            render("Hi {{ set | default: \"there\" }}", &v).unwrap(),
            "Hi Ada"
        );
        assert_eq!(
            render("Hi {{ missing | default: \"}} {{ x\" }}", &v).unwrap(),
            "Hi }} {{ x"
        );
        assert_eq!(render("[{{ missing | default: '' }}]", &v).unwrap(), "[]");
        // Without a default, an empty variable renders empty; a missing one is an error.
        assert_eq!(render("[{{ empty }}]", &v).unwrap(), "[]");
        assert_eq!(
            render("Hi {{ first_name }}", &v),
            Err(MissingVar {
                name: "first_name".into()
            })
        );
    }

    #[test]
    fn render_into_leaves_buffer_on_error() {
        let t = parse("a {{ x }} b").unwrap();
        let mut out = String::from("keep");
        assert!(t.render_into(&BTreeMap::new(), &mut out).is_err());
        assert_eq!(out, "keep");
        t.render_into(&vars(&[("x", "1")]), &mut out).unwrap();
        assert_eq!(out, "keepa 1 b");
    }

    #[test]
    fn malformed_tags_are_errors() {
        assert_eq!(parse("Hi {{ x"), Err(TemplateError::Unterminated { at: 3 }));
        assert_eq!(parse("{{"), Err(TemplateError::Unterminated { at: 0 }));
        assert_eq!(parse("a {{}}"), Err(TemplateError::EmptyTag { at: 2 }));
        assert_eq!(parse("{{   }}"), Err(TemplateError::EmptyTag { at: 0 }));
        assert_eq!(
            parse("{{ a | upcase }}"),
            Err(TemplateError::UnknownFilter {
                at: 0,
                name: "upcase".into()
            })
        );
        assert_eq!(
            parse("{{ a | default: 'x' | upcase }}"),
            Err(TemplateError::SeveralFilters { at: 0 })
        );
        assert_eq!(
            parse("{{ a | default: \"x }}"),
            Err(TemplateError::UnterminatedString { at: 0 })
        );
        assert!(matches!(
            parse("{{ a b }}"),
            Err(TemplateError::Unexpected { .. })
        ));
        assert!(matches!(
            parse("{{{ a }}}"),
            Err(TemplateError::Unexpected { .. })
        ));
        assert!(matches!(
            parse("{{ a | default \"x\" }}"),
            Err(TemplateError::Unexpected { .. })
        ));
        assert!(matches!(
            parse("{{ a | default: x }}"),
            Err(TemplateError::Unexpected { .. })
        ));
        assert!(matches!(
            parse("{{ a | }}"),
            Err(TemplateError::Unexpected { .. })
        ));
        assert!(matches!(
            parse("{{ é }}"),
            Err(TemplateError::Unexpected { .. })
        ));
        let msg = parse("{{ a | upcase }}").unwrap_err().to_string();
        assert_eq!(
            msg,
            "unknown filter `upcase` in the tag at byte 0: only `default` is supported"
        );
        let msg = parse("{{ x").unwrap_err().to_string();
        assert_eq!(
            msg,
            "unterminated tag at byte 0: `{{` without a closing `}}`"
        );
    }

    /// One piece of a generated template: literal text or a tag.
    #[derive(Debug, Clone)]
    enum Piece {
        Lit(String),
        Tag {
            name: String,
            default: Option<String>,
            single_quote: bool,
            ws: (String, String, String),
        },
    }

    fn piece() -> impl Strategy<Value = Piece> {
        let lit = "[a-z {}|:'\".é\n-]{0,12}"
            .prop_filter("no tag opener", |s: &String| {
                !s.contains("{{") && !s.ends_with('{')
            })
            .prop_map(Piece::Lit);
        let ws = || "[ \t\n]{0,2}";
        let tag = (
            "[a-z][a-z0-9_.-]{0,6}",
            proptest::option::of("[a-z }|]{0,6}"),
            any::<bool>(),
            (ws(), ws(), ws()),
        )
            .prop_map(|(name, default, single_quote, ws)| Piece::Tag {
                name,
                default,
                single_quote,
                ws,
            });
        prop_oneof![lit, tag]
    }

    /// The source text of the pieces, and what it should render to (reference implementation).
    fn reference(
        pieces: &[Piece],
        vars: &BTreeMap<String, String>,
    ) -> (String, Result<String, String>) {
        let mut src = String::new();
        let mut out = Ok(String::new());
        for p in pieces {
            match p {
                Piece::Lit(s) => {
                    src.push_str(s);
                    if let Ok(o) = &mut out {
                        o.push_str(s);
                    }
                }
                Piece::Tag {
                    name,
                    default,
                    single_quote,
                    ws,
                } => {
                    src.push_str("{{");
                    src.push_str(&ws.0);
                    src.push_str(name);
                    src.push_str(&ws.1);
                    if let Some(d) = default {
                        let q = if *single_quote { '\'' } else { '"' };
                        src.push_str(&format!("|{}default:{q}{d}{q}", ws.0));
                    }
                    src.push_str(&ws.2);
                    src.push_str("}}");
                    let value = match (vars.get(name), default) {
                        (Some(v), Some(d)) if v.is_empty() => Ok(d.clone()),
                        (Some(v), _) => Ok(v.clone()),
                        (None, Some(d)) => Ok(d.clone()),
                        (None, None) => Err(name.clone()),
                    };
                    out = match (out, value) {
                        (Ok(mut o), Ok(v)) => {
                            o.push_str(&v);
                            Ok(o)
                        }
                        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                    };
                }
            }
        }
        (src, out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn text_without_tags_renders_unchanged(s in "\\PC*") {
            prop_assume!(!s.contains("{{"));
            let t = parse(&s).unwrap();
            prop_assert!(t.is_static());
            let vars = BTreeMap::new();
            let r = t.render(&vars).unwrap();
            prop_assert!(matches!(r, Cow::Borrowed(_)));
            prop_assert_eq!(r.as_ref(), s.as_str());
        }

        #[test]
        fn parser_never_panics(s in "(\\PC|\\{\\{|\\}\\}|\\|| default: |'|\")*") {
            if let Ok(t) = parse(&s) {
                let _ = t.render(&BTreeMap::new());
            }
        }

        #[test]
        fn parser_never_panics_on_bytes(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&b);
            let _ = parse(&s);
        }

        #[test]
        fn matches_reference(
            pieces in proptest::collection::vec(piece(), 0..8),
            vars in proptest::collection::btree_map("[a-z][a-z0-9_.-]{0,6}", "[a-z }]{0,4}", 0..6),
            names_set in proptest::collection::vec(any::<bool>(), 8),
        ) {
            // Give some tags a value (possibly empty) so every branch is exercised.
            let mut vars = vars;
            for (p, set) in pieces.iter().zip(&names_set) {
                if let (Piece::Tag { name, .. }, true) = (p, set) {
                    vars.entry(name.clone()).or_default();
                }
            }
            let (src, expected) = reference(&pieces, &vars);
            let text = parse(&src).map_err(|e| TestCaseError::fail(format!("{src:?}: {e}")))?;
            let got = text.render(&vars).map(Cow::into_owned).map_err(|m| m.name);
            prop_assert_eq!(&got, &expected);
            if let Ok(out) = got {
                // No literal, value or default contains `{`, so a `{{` could only come from a tag.
                prop_assert!(!out.contains("{{"), "{:?} rendered {:?}", src, out);
            }
        }
    }
}
