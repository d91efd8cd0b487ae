//! Parsing of the `Retry-After` response header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

use std::time::{Duration, SystemTime};

/// Parses a `Retry-After` value relative to `now`. A date in the past means "now" (zero).
/// Returns `None` for values that are neither form.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_form() {
        assert_eq!(
            parse(" 30 ", SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn http_date_form_is_relative_to_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_000_000);
        let later = now + Duration::from_secs(90);
        let header = httpdate::fmt_http_date(later);
        assert_eq!(parse(&header, now), Some(Duration::from_secs(90)));
        assert_eq!(
            parse(&header, later + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(parse("soon", SystemTime::now()), None);
        assert_eq!(parse("-5", SystemTime::now()), None);
    }
}
