//! The parser: text into [`Node`]s. A scanner cuts the text into literal text, `{{ output }}`
//! and `{% tag %}` (respecting quotes, so `"}}"` inside a string does not close a tag), a lexer
//! reads the inside of each, and a recursive descent builds blocks. Every error names the line
//! and column of the offending tag; nothing here panics on any input.

use std::ops::Range;

use super::expr::{Expr, Path, Seg};
use super::filters::{Filter, FilterKind};
use super::{MAX_DEPTH, TemplateError, line_col};

/// One piece of a parsed text.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// Verbatim text: a range of the source.
    Text(Range<u32>),
    Out(Box<Output>),
    If(Box<If>),
    Case(Box<Case>),
    For(Box<For>),
    Break,
    Continue,
}

/// `{{ expr | filter: args ... }}`.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub expr: Expr,
    pub filters: Vec<Filter>,
    /// Whether a `default` filter catches a missing variable.
    pub has_default: bool,
}

impl Output {
    /// A variable looked up verbatim, without filters: rendered by borrowing its value.
    pub fn is_plain(&self) -> bool {
        self.filters.is_empty() && matches!(&self.expr, Expr::Path(p) if p.is_plain())
    }
}

/// `if`/`unless` with its `elsif` branches: the first branch whose condition holds renders.
#[derive(Debug, Clone)]
pub(crate) struct If {
    pub branches: Vec<(Cond, Vec<Node>)>,
    pub otherwise: Vec<Node>,
}

#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub subject: Expr,
    pub whens: Vec<(Vec<Expr>, Vec<Node>)>,
    pub otherwise: Vec<Node>,
}

#[derive(Debug, Clone)]
pub(crate) struct For {
    pub var: String,
    pub source: Expr,
    pub limit: Option<Expr>,
    pub offset: Option<Expr>,
    pub reversed: bool,
    pub body: Vec<Node>,
    pub otherwise: Vec<Node>,
    /// Byte offset of the tag, for errors.
    pub at: u32,
}

/// A condition: comparisons joined by `and`/`or`, evaluated right to left (Liquid's rule).
#[derive(Debug, Clone)]
pub(crate) enum Cond {
    Test(Expr),
    Cmp(Expr, Op, Expr),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Contains,
}

/// What [`parse`] returns.
pub(crate) struct Parsed {
    pub nodes: Vec<Node>,
    pub literal_len: usize,
    pub variables: Vec<String>,
}

/// Parses a whole text.
pub(crate) fn parse(source: &str) -> Result<Parsed, TemplateError> {
    let tokens = scan(source)?;
    let mut p = Parser {
        source,
        tokens,
        pos: 0,
        locals: Vec::new(),
        variables: Vec::new(),
        depth: 0,
    };
    let (nodes, end) = p.block(&[])?;
    if let Some(end) = end {
        return Err(p.error(end.at, format!("unexpected `{}`", end.name)));
    }
    let literal_len = nodes
        .iter()
        .map(|n| match n {
            Node::Text(r) => (r.end - r.start) as usize,
            _ => 0,
        })
        .sum();
    Ok(Parsed {
        nodes,
        literal_len,
        variables: p.variables,
    })
}

/// A scanned piece of the text.
#[derive(Debug, Clone)]
enum Token {
    Text(Range<u32>),
    /// The inside of `{{ }}`, and the offset of its `{{`.
    Out(Range<u32>, u32),
    /// The inside of `{% %}`, and the offset of its `{%`.
    Tag(Range<u32>, u32),
}

fn error_at(source: &str, at: usize, message: impl Into<String>) -> TemplateError {
    let (line, column) = line_col(source, at);
    TemplateError {
        line,
        column,
        message: message.into(),
    }
}

fn r(a: usize, b: usize) -> Range<u32> {
    // Texts are bounded far below 4 GiB by the request caps; saturate rather than wrap.
    let c = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    c(a)..c(b)
}

/// Cuts the text into literal text, outputs and tags; applies whitespace control and `raw`.
fn scan(source: &str) -> Result<Vec<Token>, TemplateError> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut pos = 0;
    // Strip leading whitespace of the next text (after a `-}}` or `-%}`).
    let mut strip_next = false;
    while pos < bytes.len() {
        let Some(open) = find_open(bytes, pos) else {
            break;
        };
        let is_tag = bytes.get(open + 1) == Some(&b'%');
        let mut text_end = open;
        let trim_left = bytes.get(open + 2) == Some(&b'-');
        if trim_left {
            while text_end > pos && bytes[text_end - 1].is_ascii_whitespace() {
                text_end -= 1;
            }
        }
        push_text(&mut tokens, bytes, pos, text_end, strip_next);
        let inner_start = open + 2 + usize::from(trim_left);
        let closer: &[u8] = if is_tag { b"%}" } else { b"}}" };
        let Some(close) = find_close(bytes, inner_start, closer) else {
            let what = if is_tag {
                "`{%` without a closing `%}`"
            } else {
                "`{{` without a closing `}}`"
            };
            return Err(error_at(source, open, format!("unterminated tag: {what}")));
        };
        let trim_right = close > inner_start && bytes[close - 1] == b'-';
        let inner_end = if trim_right { close - 1 } else { close };
        pos = close + 2;
        strip_next = trim_right;
        if is_tag {
            let inner = source.get(inner_start..inner_end).unwrap_or("").trim();
            if inner == "raw" {
                // Everything up to `{% endraw %}` is literal text.
                let Some((raw_end, after)) = find_endraw(source, pos) else {
                    return Err(error_at(source, open, "`raw` without `{% endraw %}`"));
                };
                push_text(&mut tokens, bytes, pos, raw_end, strip_next);
                strip_next = false;
                pos = after;
                continue;
            }
            tokens.push(Token::Tag(r(inner_start, inner_end), open as u32));
        } else {
            tokens.push(Token::Out(r(inner_start, inner_end), open as u32));
        }
    }
    push_text(&mut tokens, bytes, pos, bytes.len(), strip_next);
    Ok(tokens)
}

fn push_text(tokens: &mut Vec<Token>, bytes: &[u8], mut from: usize, to: usize, strip: bool) {
    if strip {
        while from < to && bytes[from].is_ascii_whitespace() {
            from += 1;
        }
    }
    if from < to {
        tokens.push(Token::Text(r(from, to)));
    }
}

/// The next `{{` or `{%` at or after `from`.
fn find_open(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < bytes.len() {
        if bytes[i] == b'{' && matches!(bytes[i + 1], b'{' | b'%') {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The closing `}}` or `%}` of a tag whose inside starts at `from`, outside quoted strings.
fn find_close(bytes: &[u8], from: usize, closer: &[u8]) -> Option<usize> {
    let mut quote = None;
    let mut i = from;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if bytes.get(i..i + 2) == Some(closer) => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

/// Where `{% endraw %}` starts at or after `from`, and the offset just past it.
fn find_endraw(source: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = source.as_bytes();
    let mut i = from;
    while let Some(open) = find_open(bytes, i) {
        if bytes.get(open + 1) == Some(&b'%') {
            let close = find_close(bytes, open + 2, b"%}")?;
            let inner = source
                .get(open + 2..close)?
                .trim_matches(|c: char| c == '-' || c.is_whitespace());
            if inner == "endraw" {
                return Some((open, close + 2));
            }
        }
        i = open + 2;
    }
    None
}

/// A block-closing tag met by [`Parser::block`].
struct End {
    name: String,
    /// The rest of the tag after its name.
    args: Range<u32>,
    at: u32,
}

struct Parser<'s> {
    source: &'s str,
    tokens: Vec<Token>,
    pos: usize,
    /// Loop variables in scope, innermost last.
    locals: Vec<String>,
    variables: Vec<String>,
    depth: usize,
}

impl<'s> Parser<'s> {
    fn error(&self, at: u32, message: impl Into<String>) -> TemplateError {
        error_at(self.source, at as usize, message)
    }

    fn text(&self, r: &Range<u32>) -> &'s str {
        self.source
            .get(r.start as usize..r.end as usize)
            .unwrap_or("")
    }

    /// Nodes up to one of the tags in `ends` (returned), or to the end of the text (`None`).
    fn block(&mut self, ends: &[&str]) -> Result<(Vec<Node>, Option<End>), TemplateError> {
        let mut nodes = Vec::new();
        while let Some(token) = self.tokens.get(self.pos).cloned() {
            self.pos += 1;
            match token {
                Token::Text(r) => nodes.push(Node::Text(r)),
                Token::Out(inner, at) => nodes.push(Node::Out(Box::new(self.output(inner, at)?))),
                Token::Tag(inner, at) => {
                    let src = self.text(&inner);
                    let trimmed = src.trim_start();
                    let name_len = trimmed
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(trimmed.len());
                    let name = &trimmed[..name_len];
                    let args_start = inner.start as usize + (src.len() - trimmed.len()) + name_len;
                    let args = r(args_start, inner.end as usize);
                    if name.is_empty() {
                        return Err(self.error(at, "empty tag: expected a tag name inside `{% %}`"));
                    }
                    if ends.contains(&name) {
                        return Ok((
                            nodes,
                            Some(End {
                                name: name.to_owned(),
                                args,
                                at,
                            }),
                        ));
                    }
                    let node = self.tag(name, args, at)?;
                    if let Some(node) = node {
                        nodes.push(node);
                    }
                }
            }
        }
        Ok((nodes, None))
    }

    /// A block that must be closed by one of `ends`; an error names the opening tag otherwise.
    fn closed_block(
        &mut self,
        ends: &[&str],
        opener: &str,
        at: u32,
    ) -> Result<(Vec<Node>, End), TemplateError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(at, format!("blocks nested more than {MAX_DEPTH} deep")));
        }
        let (nodes, end) = self.block(ends)?;
        self.depth -= 1;
        match end {
            Some(end) => Ok((nodes, end)),
            None => Err(self.error(
                at,
                format!(
                    "`{opener}` is never closed: expected `{}`",
                    ends.last().copied().unwrap_or("end")
                ),
            )),
        }
    }

    fn no_args(&self, end: &End) -> Result<(), TemplateError> {
        if self.text(&end.args).trim().is_empty() {
            Ok(())
        } else {
            Err(self.error(end.at, format!("`{}` takes no arguments", end.name)))
        }
    }

    fn tag(
        &mut self,
        name: &str,
        args: Range<u32>,
        at: u32,
    ) -> Result<Option<Node>, TemplateError> {
        match name {
            "if" | "unless" => {
                let negate = name == "unless";
                let end_name = if negate { "endunless" } else { "endif" };
                let mut cond = self.cond(args.clone(), at)?;
                if negate {
                    cond = Cond::Not(Box::new(cond));
                }
                let mut branches = Vec::new();
                let mut otherwise = Vec::new();
                let mut current = cond;
                loop {
                    let (nodes, end) = self.closed_block(&["elsif", "else", end_name], name, at)?;
                    branches.push((current, nodes));
                    match end.name.as_str() {
                        "elsif" => current = self.cond(end.args, end.at)?,
                        "else" => {
                            self.no_args(&end)?;
                            let (nodes, end) = self.closed_block(&[end_name], name, at)?;
                            self.no_args(&end)?;
                            otherwise = nodes;
                            break;
                        }
                        _ => {
                            self.no_args(&end)?;
                            break;
                        }
                    }
                }
                Ok(Some(Node::If(Box::new(If { branches, otherwise }))))
            }
            "case" => {
                let subject = self.expr_only(args, at)?;
                // Text before the first `when` renders nothing (Liquid).
                let (_, mut end) = self.closed_block(&["when", "else", "endcase"], "case", at)?;
                let mut whens = Vec::new();
                let mut otherwise = Vec::new();
                loop {
                    match end.name.as_str() {
                        "when" => {
                            let values = self.when_values(end.args.clone(), end.at)?;
                            let (nodes, next) = self.closed_block(&["when", "else", "endcase"], "case", at)?;
                            whens.push((values, nodes));
                            end = next;
                        }
                        "else" => {
                            self.no_args(&end)?;
                            let (nodes, next) = self.closed_block(&["endcase"], "case", at)?;
                            self.no_args(&next)?;
                            otherwise = nodes;
                            break;
                        }
                        _ => {
                            self.no_args(&end)?;
                            break;
                        }
                    }
                }
                Ok(Some(Node::Case(Box::new(Case { subject, whens, otherwise }))))
            }
            "for" => {
                let mut lx = Lexer::new(self.source, args.clone(), at);
                let var = match lx.next()? {
                    Some(Lx::Ident(v)) => v,
                    _ => return Err(self.error(at, "expected `for <name> in <list>`")),
                };
                if !matches!(lx.next()?, Some(Lx::Ident(w)) if w == "in") {
                    return Err(self.error(at, "expected `in` after the loop variable"));
                }
                let source = self.expr(&mut lx)?;
                let mut limit = None;
                let mut offset = None;
                let mut reversed = false;
                while let Some(t) = lx.next()? {
                    match t {
                        Lx::Ident(w) if w == "reversed" => reversed = true,
                        Lx::Ident(w) if w == "limit" || w == "offset" => {
                            if lx.next()? != Some(Lx::Colon) {
                                return Err(self.error(at, format!("expected `:` after `{w}`")));
                            }
                            let e = self.expr(&mut lx)?;
                            if w == "limit" {
                                limit = Some(e);
                            } else {
                                offset = Some(e);
                            }
                        }
                        other => {
                            return Err(self.error(at, format!("unexpected {} in `for`", other.describe())));
                        }
                    }
                }
                self.locals.push(var.clone());
                let result = (|| {
                    let (body, end) = self.closed_block(&["else", "endfor"], "for", at)?;
                    let mut otherwise = Vec::new();
                    self.no_args(&end)?;
                    if end.name == "else" {
                        let (nodes, end) = self.closed_block(&["endfor"], "for", at)?;
                        self.no_args(&end)?;
                        otherwise = nodes;
                    }
                    Ok((body, otherwise))
                })();
                self.locals.pop();
                let (body, otherwise) = result?;
                Ok(Some(Node::For(Box::new(For {
                    var,
                    source,
                    limit,
                    offset,
                    reversed,
                    body,
                    otherwise,
                    at,
                }))))
            }
            "break" | "continue" => {
                if self.locals.is_empty() {
                    return Err(self.error(at, format!("`{name}` outside a `for` loop")));
                }
                if !self.text(&args).trim().is_empty() {
                    return Err(self.error(at, format!("`{name}` takes no arguments")));
                }
                Ok(Some(if name == "break" { Node::Break } else { Node::Continue }))
            }
            "comment" => {
                self.skip_comment(at)?;
                Ok(None)
            }
            "elsif" | "else" | "when" | "endif" | "endunless" | "endcase" | "endfor" | "endcomment" | "endraw" => {
                Err(self.error(at, format!("unexpected `{name}`: no open block it could close")))
            }
            other => Err(self.error(at, format!(
                "unknown tag `{other}` (supported: if, elsif, else, unless, case, when, for, break, continue, comment, raw)"
            ))),
        }
    }

    /// Skips tokens up to the matching `endcomment` (comments nest).
    fn skip_comment(&mut self, at: u32) -> Result<(), TemplateError> {
        let mut depth = 1usize;
        while let Some(token) = self.tokens.get(self.pos) {
            self.pos += 1;
            if let Token::Tag(inner, _) = token {
                match self.text(inner).split_whitespace().next() {
                    Some("comment") => depth += 1,
                    Some("endcomment") => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
        Err(self.error(at, "`comment` is never closed: expected `endcomment`"))
    }

    fn output(&mut self, inner: Range<u32>, at: u32) -> Result<Output, TemplateError> {
        if self.text(&inner).trim().is_empty() {
            return Err(self.error(
                at,
                "empty tag: expected a variable or a value inside `{{ }}`",
            ));
        }
        let mut lx = Lexer::new(self.source, inner, at);
        let expr = self.expr(&mut lx)?;
        let mut filters = Vec::new();
        loop {
            match lx.next()? {
                None => break,
                Some(Lx::Pipe) => {}
                Some(other) => {
                    return Err(self.error(
                        lx.last_at,
                        format!(
                            "unexpected {} after the value: expected `|` and a filter, or `}}}}`",
                            other.describe()
                        ),
                    ));
                }
            }
            let name_at = lx.peek_at();
            let name = match lx.next()? {
                Some(Lx::Ident(n)) => n,
                other => {
                    return Err(self.error(
                        name_at,
                        format!(
                            "expected a filter name after `|`, found {}",
                            other.map_or("the end of the tag".to_owned(), |t| t.describe())
                        ),
                    ));
                }
            };
            let Some(kind) = FilterKind::from_name(&name) else {
                return Err(self.error(name_at, format!("unknown filter `{name}`")));
            };
            let mut args = Vec::new();
            if lx.peek()? == Some(Lx::Colon) {
                lx.next()?;
                loop {
                    args.push(self.expr(&mut lx)?);
                    if lx.peek()? == Some(Lx::Comma) {
                        lx.next()?;
                    } else {
                        break;
                    }
                }
            }
            if filters.len() >= MAX_DEPTH {
                return Err(
                    self.error(name_at, format!("more than {MAX_DEPTH} filters in one tag"))
                );
            }
            let filter = Filter::new(kind, args, name_at).map_err(|m| self.error(name_at, m))?;
            filters.push(filter);
        }
        let has_default = filters.iter().any(|f| f.kind == FilterKind::Default);
        Ok(Output {
            expr,
            filters,
            has_default,
        })
    }

    /// A whole tag argument that must be one expression.
    fn expr_only(&mut self, args: Range<u32>, at: u32) -> Result<Expr, TemplateError> {
        let mut lx = Lexer::new(self.source, args, at);
        let e = self.expr(&mut lx)?;
        match lx.next()? {
            None => Ok(e),
            Some(t) => Err(self.error(lx.last_at, format!("unexpected {}", t.describe()))),
        }
    }

    fn when_values(&mut self, args: Range<u32>, at: u32) -> Result<Vec<Expr>, TemplateError> {
        let mut lx = Lexer::new(self.source, args, at);
        let mut values = vec![self.expr(&mut lx)?];
        loop {
            match lx.next()? {
                None => return Ok(values),
                Some(Lx::Comma) => {}
                Some(Lx::Ident(w)) if w == "or" => {}
                Some(t) => {
                    return Err(
                        self.error(lx.last_at, format!("unexpected {} in `when`", t.describe()))
                    );
                }
            }
            values.push(self.expr(&mut lx)?);
        }
    }

    fn cond(&mut self, args: Range<u32>, at: u32) -> Result<Cond, TemplateError> {
        let mut lx = Lexer::new(self.source, args, at);
        if lx.peek()?.is_none() {
            return Err(self.error(at, "expected a condition"));
        }
        let c = self.cond_chain(&mut lx, 0)?;
        match lx.next()? {
            None => Ok(c),
            Some(t) => Err(self.error(
                lx.last_at,
                format!("unexpected {} in the condition", t.describe()),
            )),
        }
    }

    fn cond_chain(&mut self, lx: &mut Lexer<'_>, depth: usize) -> Result<Cond, TemplateError> {
        if depth > MAX_DEPTH {
            return Err(self.error(
                lx.last_at,
                format!("more than {MAX_DEPTH} `and`/`or` in one condition"),
            ));
        }
        let left = self.expr(lx)?;
        let op = match lx.peek()? {
            Some(Lx::Op(op)) => {
                lx.next()?;
                Some(op)
            }
            Some(Lx::Ident(w)) if w == "contains" => {
                lx.next()?;
                Some(Op::Contains)
            }
            _ => None,
        };
        let test = match op {
            Some(op) => Cond::Cmp(left, op, self.expr(lx)?),
            None => Cond::Test(left),
        };
        match lx.peek()? {
            Some(Lx::Ident(w)) if w == "and" || w == "or" => {
                lx.next()?;
                let rest = Box::new(self.cond_chain(lx, depth + 1)?);
                Ok(if w == "and" {
                    Cond::And(Box::new(test), rest)
                } else {
                    Cond::Or(Box::new(test), rest)
                })
            }
            _ => Ok(test),
        }
    }

    fn expr(&mut self, lx: &mut Lexer<'_>) -> Result<Expr, TemplateError> {
        let at = lx.peek_at();
        match lx.next()? {
            Some(Lx::Str(s)) => Ok(Expr::Str(s)),
            Some(Lx::Num(n)) => Ok(Expr::Num(n)),
            Some(Lx::LParen) => {
                let from = self.expr(lx)?;
                if lx.next()? != Some(Lx::DotDot) {
                    return Err(self.error(at, "expected a range `(a..b)`"));
                }
                let to = self.expr(lx)?;
                if lx.next()? != Some(Lx::RParen) {
                    return Err(self.error(at, "expected `)` closing the range"));
                }
                Ok(Expr::Range(Box::new(from), Box::new(to)))
            }
            Some(Lx::Ident(name)) => {
                match name.as_str() {
                    "true" => return Ok(Expr::Bool(true)),
                    "false" => return Ok(Expr::Bool(false)),
                    "nil" | "null" => return Ok(Expr::Nil),
                    "empty" => return Ok(Expr::Empty),
                    "blank" => return Ok(Expr::Blank),
                    _ => {}
                }
                let mut segs = Vec::new();
                loop {
                    match lx.peek()? {
                        Some(Lx::Dot) => {
                            lx.next()?;
                            match lx.next()? {
                                Some(Lx::Ident(k)) => segs.push(Seg::Key(k)),
                                Some(Lx::Num(n)) if n.fract() == 0.0 && n >= 0.0 => {
                                    segs.push(Seg::Key(format!("{n}")))
                                }
                                _ => {
                                    return Err(
                                        self.error(at, format!("expected a name after `{name}.`"))
                                    );
                                }
                            }
                        }
                        Some(Lx::LBracket) => {
                            lx.next()?;
                            match lx.next()? {
                                Some(Lx::Num(n)) if n.fract() == 0.0 => {
                                    segs.push(Seg::Index(n as i64))
                                }
                                Some(Lx::Str(k)) => segs.push(Seg::Key(k)),
                                _ => {
                                    return Err(self.error(
                                        at,
                                        "expected a number or a quoted key inside `[ ]`",
                                    ));
                                }
                            }
                            if lx.next()? != Some(Lx::RBracket) {
                                return Err(self.error(at, "expected `]`"));
                            }
                        }
                        _ => break,
                    }
                    if segs.len() > MAX_DEPTH {
                        return Err(self.error(at, "path too long"));
                    }
                }
                let local = name == "forloop" || self.locals.contains(&name);
                let dotted = segs
                    .iter()
                    .try_fold(name.clone(), |mut acc, s| match s {
                        Seg::Key(k) => {
                            acc.push('.');
                            acc.push_str(k);
                            Some(acc)
                        }
                        Seg::Index(_) => None,
                    })
                    .filter(|_| !segs.is_empty());
                if !local {
                    if let Some(d) = &dotted {
                        self.variables.push(d.clone());
                    }
                    self.variables.push(name.clone());
                }
                Ok(Expr::Path(Path {
                    root: name,
                    segs,
                    dotted,
                    local,
                }))
            }
            Some(t) => Err(self.error(at, format!("expected a value, found {}", t.describe()))),
            None => Err(self.error(at, "expected a value, found the end of the tag")),
        }
    }
}

/// A lexeme inside a tag.
#[derive(Debug, Clone, PartialEq)]
enum Lx {
    Ident(String),
    Str(String),
    Num(f64),
    Op(Op),
    Pipe,
    Colon,
    Comma,
    Dot,
    DotDot,
    LBracket,
    RBracket,
    LParen,
    RParen,
}

impl Lx {
    fn describe(&self) -> String {
        match self {
            Lx::Ident(s) => format!("`{s}`"),
            Lx::Str(_) => "a string".to_owned(),
            Lx::Num(_) => "a number".to_owned(),
            Lx::Op(_) => "an operator".to_owned(),
            Lx::Pipe => "`|`".to_owned(),
            Lx::Colon => "`:`".to_owned(),
            Lx::Comma => "`,`".to_owned(),
            Lx::Dot => "`.`".to_owned(),
            Lx::DotDot => "`..`".to_owned(),
            Lx::LBracket => "`[`".to_owned(),
            Lx::RBracket => "`]`".to_owned(),
            Lx::LParen => "`(`".to_owned(),
            Lx::RParen => "`)`".to_owned(),
        }
    }
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'?'
}

/// Reads lexemes from the inside of one tag.
struct Lexer<'s> {
    source: &'s str,
    pos: usize,
    end: usize,
    /// Offset of the lexeme last returned (for errors).
    last_at: u32,
    peeked: Option<(Option<Lx>, u32, usize)>,
    tag_at: u32,
}

impl<'s> Lexer<'s> {
    fn new(source: &'s str, inner: Range<u32>, tag_at: u32) -> Self {
        Self {
            source,
            pos: inner.start as usize,
            end: (inner.end as usize).min(source.len()),
            last_at: tag_at,
            peeked: None,
            tag_at,
        }
    }

    fn error(&self, at: usize, message: impl Into<String>) -> TemplateError {
        error_at(self.source, at, message)
    }

    fn peek(&mut self) -> Result<Option<Lx>, TemplateError> {
        if self.peeked.is_none() {
            let save = self.pos;
            let (lx, at) = self.read()?;
            self.peeked = Some((lx, at, self.pos));
            self.pos = save;
        }
        Ok(self.peeked.as_ref().and_then(|p| p.0.clone()))
    }

    /// Where the next lexeme starts.
    fn peek_at(&mut self) -> u32 {
        match self.peek() {
            Ok(_) => self.peeked.as_ref().map_or(self.tag_at, |p| p.1),
            Err(_) => self.tag_at,
        }
    }

    fn next(&mut self) -> Result<Option<Lx>, TemplateError> {
        if let Some((lx, at, pos)) = self.peeked.take() {
            self.pos = pos;
            self.last_at = at;
            return Ok(lx);
        }
        let (lx, at) = self.read()?;
        self.last_at = at;
        Ok(lx)
    }

    fn read(&mut self) -> Result<(Option<Lx>, u32), TemplateError> {
        let bytes = self.source.as_bytes();
        while self.pos < self.end && bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
        let at = self.pos as u32;
        if self.pos >= self.end {
            return Ok((None, at));
        }
        let b = bytes[self.pos];
        let two = bytes
            .get(self.pos..(self.pos + 2).min(self.end))
            .unwrap_or_default();
        let single = |lx: Lx, me: &mut Self| {
            me.pos += 1;
            Ok((Some(lx), at))
        };
        let double = |lx: Lx, me: &mut Self| {
            me.pos += 2;
            Ok((Some(lx), at))
        };
        match (b, two) {
            (_, b"==") => double(Lx::Op(Op::Eq), self),
            (_, b"!=") => double(Lx::Op(Op::Ne), self),
            (_, b"<>") => double(Lx::Op(Op::Ne), self),
            (_, b"<=") => double(Lx::Op(Op::Le), self),
            (_, b">=") => double(Lx::Op(Op::Ge), self),
            (_, b"..") => double(Lx::DotDot, self),
            (b'<', _) => single(Lx::Op(Op::Lt), self),
            (b'>', _) => single(Lx::Op(Op::Gt), self),
            (b'|', _) => single(Lx::Pipe, self),
            (b':', _) => single(Lx::Colon, self),
            (b',', _) => single(Lx::Comma, self),
            (b'.', _) => single(Lx::Dot, self),
            (b'[', _) => single(Lx::LBracket, self),
            (b']', _) => single(Lx::RBracket, self),
            (b'(', _) => single(Lx::LParen, self),
            (b')', _) => single(Lx::RParen, self),
            (b'"' | b'\'', _) => {
                let start = self.pos + 1;
                let Some(len) = bytes
                    .get(start..self.end)
                    .and_then(|s| s.iter().position(|&c| c == b))
                else {
                    return Err(self.error(self.pos, "unterminated string"));
                };
                self.pos = start + len + 1;
                let s = self.source.get(start..start + len).unwrap_or("").to_owned();
                Ok((Some(Lx::Str(s)), at))
            }
            (b'-' | b'0'..=b'9', _) => {
                let start = self.pos;
                let mut i = self.pos + 1;
                while i < self.end && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if i + 1 < self.end && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
                    i += 1;
                    while i < self.end && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                // `1abc` or `-x` are names, not numbers.
                if i < self.end && is_ident_byte(bytes[i]) && bytes[i] != b'-'
                    || (b == b'-' && i == start + 1)
                {
                    return self.ident(at);
                }
                self.pos = i;
                let text = self.source.get(start..i).unwrap_or("");
                match text.parse::<f64>() {
                    Ok(n) if n.is_finite() => Ok((Some(Lx::Num(n)), at)),
                    _ => Err(self.error(start, format!("`{text}` is not a number"))),
                }
            }
            _ if is_ident_byte(b) => self.ident(at),
            _ => {
                let c = self
                    .source
                    .get(self.pos..)
                    .and_then(|s| s.chars().next())
                    .unwrap_or('?');
                Err(self.error(self.pos, format!("unexpected `{}`", c.escape_debug())))
            }
        }
    }

    fn ident(&mut self, at: u32) -> Result<(Option<Lx>, u32), TemplateError> {
        let bytes = self.source.as_bytes();
        let start = self.pos;
        while self.pos < self.end && is_ident_byte(bytes[self.pos]) {
            self.pos += 1;
        }
        let s = self.source.get(start..self.pos).unwrap_or("").to_owned();
        Ok((Some(Lx::Ident(s)), at))
    }
}
