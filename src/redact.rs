//! Redaction for secrets and personal data in `Debug` output and log fields.
//!
//! Device tokens, user ids, personalization variables and Redis URLs with a password must never
//! reach a log line, an error or a `Debug` dump. [`Fingerprint`] shows a value as its length and
//! its last four characters (enough to tell two tokens apart in a log, not enough to use one);
//! [`redact_url`] keeps a URL's host but replaces its password.

use std::fmt;

/// `Debug`/`Display` of a string as `…<last 4>(<len>)`, or `<empty>`; never the whole value.
/// Values of 8 characters or fewer show only their length.
pub struct Fingerprint<'a>(pub &'a str);

impl fmt::Display for Fingerprint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let len = s.chars().count();
        if len == 0 {
            return f.write_str("<empty>");
        }
        if len <= 8 {
            return write!(f, "<redacted {len} chars>");
        }
        let tail: String = s.chars().skip(len - 4).collect();
        write!(f, "…{tail}({len})")
    }
}

impl fmt::Debug for Fingerprint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `Debug` of a text that may hold personal data (a template, a variable's value) as its
/// length only: `<12 bytes>`, or `<empty>`.
pub struct Len<'a>(pub &'a str);

impl fmt::Debug for Len<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.len() {
            0 => f.write_str("<empty>"),
            n => write!(f, "<{n} bytes>"),
        }
    }
}

/// A URL with its password (and user name) replaced by `<redacted>`, for `Debug` and errors.
/// Text that does not parse as a URL is redacted whole.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".into();
    };
    // Userinfo ends at the last '@' before the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_never_show_the_value() {
        let token = "a".repeat(60) + "9f3c";
        let shown = format!("{:?} {}", Fingerprint(&token), Fingerprint(&token));
        assert!(!shown.contains(&token));
        assert_eq!(format!("{}", Fingerprint(&token)), "…9f3c(64)");
        assert_eq!(format!("{}", Fingerprint("user-42")), "<redacted 7 chars>");
        assert_eq!(format!("{}", Fingerprint("")), "<empty>");
    }

    #[test]
    fn lengths_never_show_the_text() {
        assert_eq!(
            format!("{:?}", Len("Hi Ada, your code is 4242")),
            "<25 bytes>"
        );
        assert_eq!(format!("{:?}", Len("")), "<empty>");
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("redis://:hunter2hunter2@127.0.0.1:6379/0"),
            "redis://<redacted>@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p%40ss@host:1/"),
            "rediss://<redacted>@host:1/"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("not a url with secret"), "<redacted>");
    }
}
