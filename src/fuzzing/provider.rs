//! Targets over what providers answer: APNs responses, FCM responses with their `Retry-After`,
//! and `Retry-After` values through the backoff that honours them.
//!
//! Inputs are text: a status line (decimal), for FCM a `Retry-After` line (empty: no header),
//! then the body as sent.

use std::time::{Duration, SystemTime};

use crate::backoff::{RetryConfig, retry_delay};
use crate::domain::Outcome;
use crate::provider::apns::response::{self as apns, classify as classify_apns};
use crate::provider::fcm::response::{self as fcm, ApiError, classify as classify_fcm};
use crate::provider::retry_after::parse as parse_retry_after;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The first line of `data` as a status, and the rest.
fn status_line(data: &[u8]) -> Option<(u16, &[u8])> {
    let (line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };
    let status = std::str::from_utf8(line).ok()?.trim().parse().ok()?;
    Some((status, rest))
}

/// APNs: 200 and only 200 is delivered (with the `apns-id` as the provider's id); 410 is a dead
/// token; 429 and 5xx are retried, without a Retry-After (APNs sends none); a 403 is either a
/// token refresh (`ExpiredProviderToken`) or credentials to fix, never an outcome of the
/// message; every other outcome carries a reason.
pub fn apns_response(data: &[u8]) {
    let Some((status, body)) = status_line(data) else {
        return;
    };
    let apns_id = "8e7a4c36-2b1f-4c0e-9d3a-5b6f7e8d9c0a";
    let verdict = classify_apns(status, body, Some(apns_id));
    match verdict {
        apns::Verdict::Final(outcome) => {
            match &outcome {
                Outcome::Delivered {
                    provider_message_id,
                    ..
                } => {
                    assert_eq!(status, 200);
                    assert_eq!(provider_message_id, apns_id);
                }
                Outcome::InvalidToken { invalid_since, .. } => {
                    assert!(matches!(status, 400 | 410), "dead token on HTTP {status}");
                    if let Some(since) = invalid_since {
                        // What the deliver stage does with it: no overflow on any timestamp.
                        let _ = crate::domain::epoch_millis(*since);
                    }
                }
                Outcome::Retry { retry_after, .. } => {
                    assert!(retry_after.is_none());
                    assert!(matches!(status, 400 | 429 | 500..=599), "retry on {status}");
                }
                Outcome::Rejected { .. } | Outcome::Failed { .. } => {
                    assert!(
                        !matches!(status, 200 | 410 | 429 | 500..=599),
                        "{outcome:?}"
                    );
                }
            }
            assert_eq!(status == 200, matches!(outcome, Outcome::Delivered { .. }));
            assert_status_and_reason(&outcome, status);
            if matches!(status, 429 | 500..=599) {
                assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
            }
            if status == 410 {
                assert!(
                    matches!(outcome, Outcome::InvalidToken { .. }),
                    "{outcome:?}"
                );
            }
        }
        apns::Verdict::RefreshToken => assert_eq!(status, 403),
        apns::Verdict::CredentialsRejected(advice) => {
            assert_eq!(status, 403);
            assert!(!advice.is_empty());
        }
    }
}

/// Every outcome but delivery carries a reason, and its status is the response's.
fn assert_status_and_reason(outcome: &Outcome, status: u16) {
    let (reason, got) = match outcome {
        Outcome::Delivered { status, .. } => (None, *status),
        Outcome::InvalidToken { reason, status, .. }
        | Outcome::Rejected { reason, status }
        | Outcome::Retry { reason, status, .. }
        | Outcome::Failed { reason, status } => (Some(reason), *status),
    };
    assert_eq!(got, status);
    if let Some(reason) = reason {
        assert!(!reason.is_empty(), "{outcome:?}");
    }
}

/// FCM: delivered only on a 2xx naming the message (a 2xx without one is retried, never
/// failed); 429 and 5xx are always retried, with the header's Retry-After; a dead token only
/// on a Google API error body with one of the documented signals (`UNREGISTERED`,
/// `INVALID_ARGUMENT` on the token, a relayed APNs 410, `SENDER_ID_MISMATCH`), so never on a
/// 404 or HTML page; a token refresh only on 401; and the delay a retry is scheduled with stays
/// under the policy's caps ([`retry_after`]).
pub fn fcm_response(data: &[u8]) {
    let Some((status, rest)) = status_line(data) else {
        return;
    };
    let (header, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let header = std::str::from_utf8(header).ok().filter(|h| !h.is_empty());
    let verdict = classify_fcm(status, body, header, now());
    let outcome = match verdict {
        fcm::Verdict::Final(outcome) => outcome,
        fcm::Verdict::RefreshToken(_) => {
            assert_eq!(status, 401);
            return;
        }
    };
    assert_status_and_reason(&outcome, status);
    let success = (200..300).contains(&status);
    match &outcome {
        Outcome::Delivered {
            provider_message_id,
            ..
        } => {
            assert!(success, "delivered on HTTP {status}");
            assert!(!provider_message_id.is_empty());
        }
        Outcome::InvalidToken { reason, .. } => {
            assert!(
                !success && status != 429 && status < 500,
                "dead token on {status}"
            );
            assert!(
                ApiError::parse(body).is_some(),
                "dead token without a Google API error body"
            );
            assert!(
                ["UNREGISTERED", "INVALID_ARGUMENT", "SENDER_ID_MISMATCH"]
                    .iter()
                    .any(|signal| reason.starts_with(signal)),
                "dead token without a documented signal: {reason}"
            );
        }
        Outcome::Retry { retry_after, .. } => {
            if success {
                assert!(retry_after.is_none());
            } else {
                assert_eq!(
                    *retry_after,
                    header.and_then(|h| parse_retry_after(h, now())),
                    "the Retry-After is the header's"
                );
            }
            check_delays(*retry_after);
        }
        Outcome::Rejected { .. } | Outcome::Failed { .. } => {
            assert!(!success && status != 429 && status < 500, "{outcome:?}");
        }
    }
    if status == 429 || status >= 500 {
        assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
    }
}

/// `Retry-After`: delta-seconds are read exactly; a date is read relative to now (zero when
/// past) and can be added to now; and whatever the value, the retry it leads to is scheduled no
/// later than the policy allows ([`check_delays`]).
pub fn retry_after(data: &[u8]) {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_retry_after(value, now());
    if let Ok(secs) = value.trim().parse::<u64>() {
        assert_eq!(parsed, Some(Duration::from_secs(secs)));
    } else if let Some(after) = parsed {
        assert!(now().checked_add(after).is_some(), "{value:?} -> {after:?}");
    }
    check_delays(parsed);
}

/// The wait before the next attempt, for a few policies and attempts: at most the larger of
/// the backoff cap and the Retry-After cap, at least the (capped) Retry-After, and an instant
/// the deliver stage can compute (`now + delay` does not overflow).
fn check_delays(retry_after: Option<Duration>) {
    let policies = [
        RetryConfig::default(),
        RetryConfig {
            base_ms: 1,
            cap_ms: 10,
            max_attempts: 3,
            max_retry_after_secs: 0,
        },
        RetryConfig {
            base_ms: 1_000,
            cap_ms: 3_600_000,
            max_attempts: 40,
            max_retry_after_secs: 86_400,
        },
    ];
    for policy in &policies {
        for attempt in [1, 2, 5, 31, 40] {
            let delay = retry_delay(policy, attempt, retry_after);
            let most = policy.cap().max(policy.max_retry_after());
            assert!(delay <= most, "{delay:?} over {most:?}");
            if let Some(after) = retry_after {
                assert!(delay >= after.min(policy.max_retry_after()));
            }
            assert!(SystemTime::now().checked_add(delay).is_some());
            assert!(tokio::time::Instant::now().checked_add(delay).is_some());
        }
    }
}
