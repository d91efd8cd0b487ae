//! Filters: what each does to its input, checked for arity (and constant arguments such as
//! a date format or a time zone) at parse time.

use std::borrow::Cow;

use jiff::tz::TimeZone;

use super::MAX_OUTPUT_BYTES;
use super::expr::Expr;
use super::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FilterKind {
    Default,
    Upcase,
    Downcase,
    Capitalize,
    Strip,
    Lstrip,
    Rstrip,
    Truncate,
    Truncatewords,
    Replace,
    ReplaceFirst,
    Append,
    Prepend,
    Size,
    Join,
    First,
    Last,
    Plus,
    Minus,
    Times,
    DividedBy,
    Round,
    Money,
    Date,
}

impl FilterKind {
    pub fn from_name(name: &str) -> Option<Self> {
        use FilterKind::*;
        Some(match name {
            "default" => Default,
            "upcase" => Upcase,
            "downcase" => Downcase,
            "capitalize" => Capitalize,
            "strip" => Strip,
            "lstrip" => Lstrip,
            "rstrip" => Rstrip,
            "truncate" => Truncate,
            "truncatewords" => Truncatewords,
            "replace" => Replace,
            "replace_first" => ReplaceFirst,
            "append" => Append,
            "prepend" => Prepend,
            "size" => Size,
            "join" => Join,
            "first" => First,
            "last" => Last,
            "plus" => Plus,
            "minus" => Minus,
            "times" => Times,
            "divided_by" => DividedBy,
            "round" => Round,
            "money" => Money,
            "date" => Date,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use FilterKind::*;
        match self {
            Default => "default",
            Upcase => "upcase",
            Downcase => "downcase",
            Capitalize => "capitalize",
            Strip => "strip",
            Lstrip => "lstrip",
            Rstrip => "rstrip",
            Truncate => "truncate",
            Truncatewords => "truncatewords",
            Replace => "replace",
            ReplaceFirst => "replace_first",
            Append => "append",
            Prepend => "prepend",
            Size => "size",
            Join => "join",
            First => "first",
            Last => "last",
            Plus => "plus",
            Minus => "minus",
            Times => "times",
            DividedBy => "divided_by",
            Round => "round",
            Money => "money",
            Date => "date",
        }
    }

    /// How many arguments it takes, at least and at most.
    fn arity(self) -> (usize, usize) {
        use FilterKind::*;
        match self {
            Upcase | Downcase | Capitalize | Strip | Lstrip | Rstrip | Size | First | Last => {
                (0, 0)
            }
            Default | Append | Prepend | Plus | Minus | Times | DividedBy => (1, 1),
            Truncate | Truncatewords => (0, 2),
            Replace | ReplaceFirst => (2, 2),
            Join | Round => (0, 1),
            Money => (0, 3),
            Date => (1, 2),
        }
    }
}

/// One filter of an output tag.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub kind: FilterKind,
    pub args: Vec<Expr>,
    /// Byte offset of the filter's name, for errors.
    pub at: u32,
    /// `date`'s time zone when it is a literal, resolved once.
    pub zone: Option<TimeZone>,
}

impl Filter {
    pub fn new(kind: FilterKind, args: Vec<Expr>, at: u32) -> Result<Self, String> {
        let (min, max) = kind.arity();
        if args.len() < min || args.len() > max {
            let expected = match (min, max) {
                (0, 0) => "no arguments".to_owned(),
                (a, b) if a == b => format!("{a} argument{}", if a == 1 { "" } else { "s" }),
                (a, b) => format!("{a} to {b} arguments"),
            };
            return Err(format!(
                "filter `{}` takes {expected}, got {}",
                kind.name(),
                args.len()
            ));
        }
        let mut zone = None;
        if kind == FilterKind::Date {
            if let Some(Expr::Str(format)) = args.first() {
                check_format(format)?;
            }
            if let Some(Expr::Str(name)) = args.get(1) {
                zone = Some(time_zone(name)?);
            }
        }
        Ok(Self {
            kind,
            args,
            at,
            zone,
        })
    }
}

fn time_zone(name: &str) -> Result<TimeZone, String> {
    if name.is_empty() || name.eq_ignore_ascii_case("utc") {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|_| format!("date: unknown time zone `{name}`"))
}

fn check_format(format: &str) -> Result<(), String> {
    let probe = jiff::Timestamp::UNIX_EPOCH.to_zoned(TimeZone::UTC);
    jiff::fmt::strtime::format(format, &probe)
        .map(|_| ())
        .map_err(|e| format!("date: bad format `{format}`: {e}"))
}

/// Why a filter could not apply.
pub(crate) enum FilterFail {
    /// Its result would be over the render budget.
    Budget,
    /// Its input or an argument is not what it takes.
    Bad(String),
}

impl From<String> for FilterFail {
    fn from(s: String) -> Self {
        FilterFail::Bad(s)
    }
}

fn too_big() -> FilterFail {
    FilterFail::Budget
}

fn num(kind: FilterKind, v: &Value<'_>) -> Result<f64, String> {
    v.as_num().ok_or_else(|| {
        format!(
            "{}: `{}` is not a number",
            kind.name(),
            shorten(&v.to_text())
        )
    })
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(32).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn arg_usize(kind: FilterKind, v: Option<&Value<'_>>, default: usize) -> Result<usize, String> {
    match v {
        None => Ok(default),
        Some(v) => {
            let n = num(kind, v)?;
            Ok(if n <= 0.0 { 0 } else { n.min(1e9) as usize })
        }
    }
}

fn text_arg<'v>(v: Option<&'v Value<'_>>, default: &'static str) -> Cow<'v, str> {
    v.map_or(Cow::Borrowed(default), |v| v.to_text())
}

fn owned(s: String) -> Value<'static> {
    Value::Str(Cow::Owned(s))
}

/// Applies one filter. `args` are the evaluated arguments, in order.
pub(crate) fn apply<'a>(
    filter: &Filter,
    input: Value<'a>,
    args: &[Value<'_>],
    recipient_zone: Option<&TimeZone>,
) -> Result<Value<'a>, FilterFail> {
    use FilterKind::*;
    let kind = filter.kind;
    let arg = |i: usize| args.get(i);
    Ok(match kind {
        Default => {
            let unset = match &input {
                Value::Nil | Value::Bool(false) | Value::Empty | Value::Blank => true,
                Value::Str(s) => s.is_empty(),
                Value::Json(serde_json::Value::Array(a)) => a.is_empty(),
                _ => false,
            };
            if unset {
                arg(0).cloned().map_or(Value::Nil, Value::into_owned)
            } else {
                input
            }
        }
        Upcase => owned(input.to_text().to_uppercase()),
        Downcase => owned(input.to_text().to_lowercase()),
        Capitalize => {
            let text = input.to_text();
            let mut chars = text.chars();
            match chars.next() {
                None => Value::Str(Cow::Borrowed("")),
                Some(first) => {
                    let mut s: String = first.to_uppercase().collect();
                    s.push_str(&chars.as_str().to_lowercase());
                    owned(s)
                }
            }
        }
        Strip | Lstrip | Rstrip => match input {
            Value::Str(Cow::Borrowed(s)) => Value::Str(Cow::Borrowed(match kind {
                Strip => s.trim(),
                Lstrip => s.trim_start(),
                _ => s.trim_end(),
            })),
            other => {
                let t = other.to_text();
                owned(
                    match kind {
                        Strip => t.trim(),
                        Lstrip => t.trim_start(),
                        _ => t.trim_end(),
                    }
                    .to_owned(),
                )
            }
        },
        Truncate => {
            let n = arg_usize(kind, arg(0), 50)?;
            let ellipsis = text_arg(arg(1), "...");
            let text = input.to_text();
            if text.chars().count() <= n {
                return Ok(input);
            }
            let keep = n.saturating_sub(ellipsis.chars().count());
            let mut s: String = text.chars().take(keep).collect();
            s.push_str(&ellipsis);
            owned(s)
        }
        Truncatewords => {
            let n = arg_usize(kind, arg(0), 15)?.max(1);
            let ellipsis = text_arg(arg(1), "...");
            let text = input.to_text();
            let words: Vec<&str> = text.split_whitespace().take(n + 1).collect();
            if words.len() <= n {
                return Ok(input);
            }
            let mut s = words[..n].join(" ");
            s.push_str(&ellipsis);
            owned(s)
        }
        Replace | ReplaceFirst => {
            let from = text_arg(arg(0), "");
            let to = text_arg(arg(1), "");
            let text = input.to_text();
            if from.is_empty() {
                return Ok(input);
            }
            if kind == ReplaceFirst {
                owned(text.replacen(from.as_ref(), &to, 1))
            } else {
                // Size the result before making it: a chain of replaces could grow a value
                // geometrically.
                let hits = text.matches(from.as_ref()).count();
                let grown = text.len() - hits * from.len() + hits * to.len();
                if grown > MAX_OUTPUT_BYTES {
                    return Err(too_big());
                }
                owned(text.replace(from.as_ref(), &to))
            }
        }
        Append | Prepend => {
            let extra = text_arg(arg(0), "");
            let text = input.to_text();
            if text.len() + extra.len() > MAX_OUTPUT_BYTES {
                return Err(too_big());
            }
            owned(if kind == Append {
                format!("{text}{extra}")
            } else {
                format!("{extra}{text}")
            })
        }
        Size => match input.as_list() {
            Some(items) => Value::Num(items.len() as f64),
            None => match &input {
                Value::Json(serde_json::Value::Object(o)) => Value::Num(o.len() as f64),
                Value::Nil => Value::Num(0.0),
                other => Value::Num(other.to_text().chars().count() as f64),
            },
        },
        Join => {
            let sep = text_arg(arg(0), " ");
            match input.as_list() {
                Some(items) => {
                    let mut s = String::new();
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            s.push_str(&sep);
                        }
                        Value::from_json(item).write_to(&mut s);
                        if s.len() > MAX_OUTPUT_BYTES {
                            return Err(too_big());
                        }
                    }
                    owned(s)
                }
                None => input,
            }
        }
        First | Last => match input.as_list() {
            Some(items) => {
                let item = if kind == First {
                    items.first()
                } else {
                    items.last()
                };
                item.map_or(Value::Nil, Value::from_json)
            }
            None => {
                let text = input.to_text();
                let c = if kind == First {
                    text.chars().next()
                } else {
                    text.chars().next_back()
                };
                c.map_or(Value::Nil, |c| owned(c.to_string()))
            }
        },
        Plus | Minus | Times | DividedBy => {
            let a = num(kind, &input)?;
            let b = num(kind, arg(0).unwrap_or(&Value::Nil))?;
            let n = match kind {
                Plus => a + b,
                Minus => a - b,
                Times => a * b,
                _ => {
                    if b == 0.0 {
                        return Err(FilterFail::Bad("divided_by: division by zero".to_owned()));
                    }
                    // Integers divide as integers (Liquid), rounding down.
                    if a.fract() == 0.0 && b.fract() == 0.0 {
                        (a / b).floor()
                    } else {
                        a / b
                    }
                }
            };
            if !n.is_finite() {
                return Err(FilterFail::Bad(format!(
                    "{}: the result is not a finite number",
                    kind.name()
                )));
            }
            Value::Num(n)
        }
        Round => {
            let n = num(kind, &input)?;
            let digits = arg_usize(kind, arg(0), 0)?.min(10);
            let scale = 10f64.powi(digits as i32);
            Value::Num((n * scale).round() / scale)
        }
        Money => {
            let n = num(kind, &input)?;
            let symbol = text_arg(arg(0), "");
            let decimal = text_arg(arg(1), ".");
            let thousands = text_arg(arg(2), ",");
            owned(money(n, &symbol, &decimal, &thousands))
        }
        Date => {
            let format = text_arg(arg(0), "%Y-%m-%d");
            let zone = match (&filter.zone, arg(1)) {
                (Some(z), _) => z.clone(),
                (None, Some(name)) => time_zone(&name.to_text())?,
                // No zone given: the recipient's (its `timezone`, else the app's default).
                (None, None) => recipient_zone.cloned().unwrap_or(TimeZone::UTC),
            };
            let zoned = instant(&input, &zone)?;
            let s = jiff::fmt::strtime::format(format.as_bytes(), &zoned)
                .map_err(|e| FilterFail::Bad(format!("date: bad format `{format}`: {e}")))?;
            owned(s)
        }
    })
}

/// `1234.5` as `1,234.50` (with the given symbol and separators): two decimals, rounded half
/// away from zero, the sign before the symbol.
fn money(n: f64, symbol: &str, decimal: &str, thousands: &str) -> String {
    let cents = (n.abs() * 100.0).round();
    // Beyond 2^53 cents a float has no exact cents left; print what it has.
    let cents = if cents < 9.0e15 {
        cents as u64
    } else {
        9_000_000_000_000_000
    };
    let whole = (cents / 100).to_string();
    let mut grouped = String::with_capacity(whole.len() + whole.len() / 3 * thousands.len());
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push_str(thousands);
        }
        grouped.push(c);
    }
    let sign = if n < 0.0 && cents > 0 { "-" } else { "" };
    format!("{sign}{symbol}{grouped}{decimal}{:02}", cents % 100)
}

/// The instant a `date` input names, in `zone`: Unix seconds, `now`, an RFC 3339 timestamp,
/// or a civil date or date-time (read in `zone`).
fn instant(input: &Value<'_>, zone: &TimeZone) -> Result<jiff::Zoned, String> {
    let bad = || format!("date: `{}` is not a date", shorten(&input.to_text()));
    if let Some(secs) = input.as_num() {
        let ts = jiff::Timestamp::from_second(secs.trunc() as i64).map_err(|_| bad())?;
        return Ok(ts.to_zoned(zone.clone()));
    }
    let text = input.to_text();
    let text = text.trim();
    if text.eq_ignore_ascii_case("now") || text.eq_ignore_ascii_case("today") {
        return Ok(jiff::Timestamp::now().to_zoned(zone.clone()));
    }
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Ok(ts.to_zoned(zone.clone()));
    }
    if let Ok(dt) = text.parse::<jiff::civil::DateTime>() {
        return dt.to_zoned(zone.clone()).map_err(|_| bad());
    }
    if let Ok(d) = text.parse::<jiff::civil::Date>() {
        return d.to_zoned(zone.clone()).map_err(|_| bad());
    }
    Err(bad())
}

#[cfg(test)]
pub(crate) fn money_for_test(n: f64, symbol: &str, decimal: &str, thousands: &str) -> String {
    money(n, symbol, decimal, thousands)
}
