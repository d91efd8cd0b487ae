//! Rendering a parsed text for one recipient, within the budget: at most
//! [`MAX_OUTPUT_BYTES`] of output (and per intermediate value), at most [`MAX_ITERATIONS`]
//! loop iterations in all.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value as Json;

use super::expr::{Expr, Path, Seg};
use super::filters;
use super::parse::{Cond, Node, Op, Output};
use super::value::Value;
use super::{MAX_ITERATIONS, MAX_OUTPUT_BYTES, RenderError, Text, Vars, line_col};

pub(super) fn over_budget() -> RenderError {
    RenderError::Budget {
        what: format!("output over {MAX_OUTPUT_BYTES} bytes"),
    }
}

/// The value of a plain output (`{{ name }}`): borrowed from the variables.
pub(super) fn plain<'a, V: Vars + ?Sized>(
    out: &Output,
    vars: &'a V,
) -> Result<Option<&'a str>, RenderError> {
    let Expr::Path(p) = &out.expr else {
        return Ok(None);
    };
    match vars.get(&p.root) {
        Some(v) => Ok(Some(v)),
        None => Err(RenderError::Missing {
            name: p.root.clone(),
        }),
    }
}

/// Renders `text` with `vars`, appending to `out`.
pub(super) fn render<V: Vars + ?Sized>(
    text: &Text,
    vars: &V,
    out: &mut String,
) -> Result<(), RenderError> {
    let mut cx = Cx {
        source: &text.source,
        vars,
        locals: Vec::new(),
        iterations: 0,
        start: out.len(),
    };
    cx.nodes(&text.nodes, out).map(|_| ())
}

/// What a block asks of the loop around it.
#[derive(PartialEq, Eq)]
enum Flow {
    Normal,
    Break,
    Continue,
}

/// One loop variable in scope.
struct Local<'t> {
    name: &'t str,
    item: Json,
    index: usize,
    length: usize,
}

struct Cx<'t, V: ?Sized> {
    source: &'t str,
    vars: &'t V,
    locals: Vec<Local<'t>>,
    iterations: usize,
    /// Where this render's output starts in the buffer.
    start: usize,
}

impl<'t, V: Vars + ?Sized> Cx<'t, V> {
    fn push(&self, out: &mut String, s: &str) -> Result<(), RenderError> {
        if out.len() - self.start + s.len() > MAX_OUTPUT_BYTES {
            return Err(over_budget());
        }
        out.push_str(s);
        Ok(())
    }

    fn filter_error(&self, at: u32, message: String) -> RenderError {
        let (line, column) = line_col(self.source, at as usize);
        RenderError::Filter {
            line,
            column,
            message,
        }
    }

    fn nodes(&mut self, nodes: &'t [Node], out: &mut String) -> Result<Flow, RenderError> {
        for node in nodes {
            match node {
                Node::Text(r) => self.push(out, super::slice(self.source, r))?,
                Node::Out(o) if o.is_plain() => {
                    let value = plain(o, self.vars)?.unwrap_or("");
                    self.push(out, value)?;
                }
                Node::Out(o) => self.output(o, out)?,
                Node::If(i) => {
                    let mut chosen = &i.otherwise;
                    for (cond, body) in &i.branches {
                        if self.cond(cond)? {
                            chosen = body;
                            break;
                        }
                    }
                    let flow = self.nodes(chosen, out)?;
                    if flow != Flow::Normal {
                        return Ok(flow);
                    }
                }
                Node::Case(c) => {
                    let subject = self.expr(&c.subject)?;
                    let mut matched = false;
                    for (values, body) in &c.whens {
                        let mut hit = false;
                        for v in values {
                            if subject.equals(&self.expr(v)?) {
                                hit = true;
                                break;
                            }
                        }
                        if hit {
                            matched = true;
                            let flow = self.nodes(body, out)?;
                            if flow != Flow::Normal {
                                return Ok(flow);
                            }
                        }
                    }
                    if !matched {
                        let flow = self.nodes(&c.otherwise, out)?;
                        if flow != Flow::Normal {
                            return Ok(flow);
                        }
                    }
                }
                Node::For(f) => {
                    let source = self.expr(&f.source)?;
                    let mut items = match &source {
                        Value::Nil => Vec::new(),
                        v => match v.as_list() {
                            Some(items) => items,
                            None => {
                                return Err(self.filter_error(
                                    f.at,
                                    "for: the value is not a list (a JSON array)".to_owned(),
                                ));
                            }
                        },
                    };
                    let int =
                        |cx: &Self, e: &'t Option<Expr>| -> Result<Option<usize>, RenderError> {
                            match e {
                                None => Ok(None),
                                Some(e) => {
                                    let v = cx.expr(e)?;
                                    match v.as_num() {
                                        Some(n) => {
                                            Ok(Some(if n < 0.0 { 0 } else { n.min(1e9) as usize }))
                                        }
                                        None => Err(cx.filter_error(
                                            f.at,
                                            "for: `limit` and `offset` must be numbers".to_owned(),
                                        )),
                                    }
                                }
                            }
                        };
                    let offset = int(self, &f.offset)?.unwrap_or(0);
                    let limit = int(self, &f.limit)?;
                    items.drain(..offset.min(items.len()));
                    if let Some(limit) = limit {
                        items.truncate(limit);
                    }
                    if f.reversed {
                        items.reverse();
                    }
                    if items.is_empty() {
                        let flow = self.nodes(&f.otherwise, out)?;
                        if flow != Flow::Normal {
                            return Ok(flow);
                        }
                        continue;
                    }
                    let length = items.len();
                    for (index, item) in items.into_iter().enumerate() {
                        self.iterations += 1;
                        if self.iterations > MAX_ITERATIONS {
                            return Err(RenderError::Budget {
                                what: format!("more than {MAX_ITERATIONS} loop iterations"),
                            });
                        }
                        self.locals.push(Local {
                            name: &f.var,
                            item,
                            index,
                            length,
                        });
                        let flow = self.nodes(&f.body, out);
                        self.locals.pop();
                        if flow? == Flow::Break {
                            break;
                        }
                    }
                }
                Node::Break => return Ok(Flow::Break),
                Node::Continue => return Ok(Flow::Continue),
            }
        }
        Ok(Flow::Normal)
    }

    fn output(&mut self, o: &'t Output, out: &mut String) -> Result<(), RenderError> {
        let mut value = self.expr(&o.expr)?;
        if !o.has_default
            && matches!(value, Value::Nil)
            && let Expr::Path(p) = &o.expr
            && !p.local
        {
            return Err(RenderError::Missing { name: p.display() });
        }
        for f in &o.filters {
            let mut args = Vec::with_capacity(f.args.len());
            for a in &f.args {
                args.push(self.expr(a)?);
            }
            value =
                filters::apply(f, value, &args, self.vars.zone()).map_err(|fail| match fail {
                    filters::FilterFail::Budget => over_budget(),
                    filters::FilterFail::Bad(m) => self.filter_error(f.at, m),
                })?;
            if value.text_len() > MAX_OUTPUT_BYTES {
                return Err(over_budget());
            }
        }
        let before = out.len();
        value.write_to(out);
        if out.len() - self.start > MAX_OUTPUT_BYTES {
            out.truncate(before);
            return Err(over_budget());
        }
        Ok(())
    }

    fn cond(&self, c: &'t Cond) -> Result<bool, RenderError> {
        Ok(match c {
            Cond::Test(e) => self.expr(e)?.truthy(),
            Cond::Cmp(a, op, b) => {
                let (a, b) = (self.expr(a)?, self.expr(b)?);
                match op {
                    Op::Eq => a.equals(&b),
                    Op::Ne => !a.equals(&b),
                    Op::Lt => a.compare(&b) == Some(Ordering::Less),
                    Op::Gt => a.compare(&b) == Some(Ordering::Greater),
                    Op::Le => matches!(a.compare(&b), Some(Ordering::Less | Ordering::Equal)),
                    Op::Ge => matches!(a.compare(&b), Some(Ordering::Greater | Ordering::Equal)),
                    Op::Contains => a.contains(&b),
                }
            }
            Cond::And(a, b) => self.cond(a)? && self.cond(b)?,
            Cond::Or(a, b) => self.cond(a)? || self.cond(b)?,
            Cond::Not(c) => !self.cond(c)?,
        })
    }

    fn expr(&self, e: &'t Expr) -> Result<Value<'t>, RenderError> {
        Ok(match e {
            Expr::Str(s) => Value::Str(Cow::Borrowed(s)),
            Expr::Num(n) => Value::Num(*n),
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Nil => Value::Nil,
            Expr::Empty => Value::Empty,
            Expr::Blank => Value::Blank,
            Expr::Path(p) => self.lookup(p),
            Expr::Range(a, b) => {
                let bound = |e: &'t Expr| -> Result<i64, RenderError> {
                    self.expr(e)?
                        .as_num()
                        .map(|n| n.floor() as i64)
                        .ok_or_else(|| RenderError::Budget {
                            what: "a range bound that is not a number".to_owned(),
                        })
                };
                let (from, to) = (bound(a)?, bound(b)?);
                let len = to.saturating_sub(from).saturating_add(1).max(0);
                if len > MAX_ITERATIONS as i64 {
                    return Err(RenderError::Budget {
                        what: format!("a range of more than {MAX_ITERATIONS} numbers"),
                    });
                }
                Value::Json(Json::Array((from..=to).map(Json::from).collect()))
            }
        })
    }

    fn lookup(&self, p: &'t Path) -> Value<'t> {
        let (mut value, segs): (Value<'t>, &[Seg]) = if p.local {
            match self.locals.iter().rev().find(|l| l.name == p.root) {
                Some(local) => (Value::from_json(&local.item), &p.segs),
                None if p.root == "forloop" => match (self.locals.last(), p.segs.first()) {
                    (Some(l), Some(Seg::Key(k))) => {
                        return match k.as_str() {
                            "index" => Value::Num((l.index + 1) as f64),
                            "index0" => Value::Num(l.index as f64),
                            "rindex" => Value::Num((l.length - l.index) as f64),
                            "rindex0" => Value::Num((l.length - l.index - 1) as f64),
                            "first" => Value::Bool(l.index == 0),
                            "last" => Value::Bool(l.index + 1 == l.length),
                            "length" => Value::Num(l.length as f64),
                            _ => Value::Nil,
                        };
                    }
                    _ => return Value::Nil,
                },
                None => return Value::Nil,
            }
        } else {
            if let Some(d) = &p.dotted
                && let Some(v) = self.vars.get(d)
            {
                return Value::Str(Cow::Borrowed(v));
            }
            match self.vars.get(&p.root) {
                Some(v) => (Value::Str(Cow::Borrowed(v)), &p.segs),
                None => return Value::Nil,
            }
        };
        for seg in segs {
            value = match seg {
                Seg::Key(k) => value.get_key(k),
                Seg::Index(i) => value.get_index(*i),
            };
            if matches!(value, Value::Nil) {
                break;
            }
        }
        value
    }
}
