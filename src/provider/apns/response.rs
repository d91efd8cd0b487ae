//! Classification of APNs responses into outcomes, per Apple's "Handling notification responses".

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::domain::Outcome;

/// What the client must do with a response, beyond reporting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Report this outcome.
    Final(Outcome),
    /// `ExpiredProviderToken`: re-sign the token and send again.
    RefreshToken,
    /// The key, team or environment is wrong: fail this and the app's next messages without
    /// contacting APNs for a while. The string tells the operator what to fix.
    CredentialsRejected(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: Option<String>,
    timestamp: Option<i64>,
}

/// Classifies one APNs response.
pub fn classify(status: u16, body: &[u8], apns_id: Option<&str>) -> Verdict {
    if status == 200 {
        return Verdict::Final(Outcome::Delivered {
            provider_message_id: apns_id.unwrap_or_default().to_string(),
            status,
        });
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let reason = parsed
        .as_ref()
        .and_then(|b| b.reason.clone())
        // An empty reason says no more than none: the receipt names the status instead.
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| format!("HTTP {status} without a reason"));
    let timestamp_ms = parsed.as_ref().and_then(|b| b.timestamp);
    Verdict::Final(match (status, reason.as_str()) {
        (410, _) | (400, "BadDeviceToken") | (400, "DeviceTokenNotForTopic") => {
            Outcome::InvalidToken {
                invalid_since: timestamp_ms
                    .filter(|ms| *ms > 0)
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())),
                reason,
                status,
            }
        }
        (403, "ExpiredProviderToken") => return Verdict::RefreshToken,
        (403, other) => return Verdict::CredentialsRejected(credentials_advice(other)),
        (429, _) | (500..=599, _) => Outcome::Retry {
            reason,
            status,
            retry_after: None,
        },
        // 400 IdleTimeout is about the connection, not the message.
        (400, "IdleTimeout") => Outcome::Retry {
            reason,
            status,
            retry_after: None,
        },
        _ => Outcome::Rejected { reason, status },
    })
}

/// Turns a 403 reason into a sentence an operator can act on.
fn credentials_advice(reason: &str) -> String {
    let advice = match reason {
        "InvalidProviderToken" => {
            "the token signature, key id or team id is wrong: check apns.key_id, apns.team_id and the .p8 key file"
        }
        "MissingProviderToken" => "no provider token was sent: check the APNs key configuration",
        "BadEnvironmentKeyInToken" | "BadEnvironmentKeyIdInToken" => {
            "the key is limited to the other APNs environment: check apns.environment (production or sandbox)"
        }
        "UnrelatedKeyIdInToken" => {
            "the key is not related to the key first used on this connection: use one key per pool"
        }
        "BadCertificate" | "BadCertificateEnvironment" => "the client certificate is wrong",
        "Forbidden" => "APNs forbids this action for these credentials",
        _ => "APNs rejected the credentials",
    };
    format!("{reason}: {advice}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `apns_response` fuzz target: `{"reason":""}` made a receipt without a
    /// reason.
    #[test]
    fn an_empty_reason_is_read_as_none() {
        let verdict = classify(410, br#"{"reason":"","timestamp":1700000000000}"#, None);
        let Verdict::Final(Outcome::InvalidToken { reason, .. }) = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!(reason, "HTTP 410 without a reason");
        let Verdict::Final(Outcome::Retry { reason, .. }) =
            classify(503, br#"{"reason":" "}"#, None)
        else {
            panic!("503 is retried");
        };
        assert_eq!(reason, "HTTP 503 without a reason");
    }

    fn outcome(status: u16, body: &str) -> Outcome {
        match classify(status, body.as_bytes(), Some("id-1")) {
            Verdict::Final(o) => o,
            other => panic!("expected an outcome, got {other:?}"),
        }
    }

    #[test]
    fn success_keeps_apns_id() {
        assert_eq!(
            outcome(200, ""),
            Outcome::Delivered {
                provider_message_id: "id-1".into(),
                status: 200
            }
        );
    }

    #[test]
    fn unregistered_keeps_millisecond_timestamp() {
        let o = outcome(
            410,
            r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
        );
        let Outcome::InvalidToken {
            invalid_since,
            reason,
            status,
        } = o
        else {
            panic!("{o:?}")
        };
        assert_eq!(reason, "Unregistered");
        assert_eq!(status, 410);
        assert_eq!(
            invalid_since,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert!(matches!(
            outcome(410, r#"{"reason":"ExpiredToken"}"#),
            Outcome::InvalidToken { .. }
        ));
    }

    #[test]
    fn token_errors_are_invalid_token() {
        for reason in ["BadDeviceToken", "DeviceTokenNotForTopic"] {
            let body = format!(r#"{{"reason":"{reason}"}}"#);
            assert!(
                matches!(outcome(400, &body), Outcome::InvalidToken { .. }),
                "{reason}"
            );
        }
    }

    #[test]
    fn other_4xx_rejected_with_reason() {
        assert_eq!(
            outcome(413, r#"{"reason":"PayloadTooLarge"}"#),
            Outcome::Rejected {
                reason: "PayloadTooLarge".into(),
                status: 413
            }
        );
        assert!(matches!(
            outcome(400, r#"{"reason":"BadTopic"}"#),
            Outcome::Rejected { .. }
        ));
        assert!(matches!(
            outcome(400, r#"{"reason":"SomethingNew"}"#),
            Outcome::Rejected { .. }
        ));
    }

    #[test]
    fn retryable() {
        for (status, body) in [
            (429, r#"{"reason":"TooManyRequests"}"#),
            (429, r#"{"reason":"TooManyProviderTokenUpdates"}"#),
            (500, r#"{"reason":"InternalServerError"}"#),
            (503, r#"{"reason":"ServiceUnavailable"}"#),
            (503, r#"{"reason":"Shutdown"}"#),
            (502, "<html>bad gateway</html>"),
        ] {
            assert!(
                matches!(outcome(status, body), Outcome::Retry { .. }),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn credentials() {
        assert_eq!(
            classify(403, br#"{"reason":"ExpiredProviderToken"}"#, None),
            Verdict::RefreshToken
        );
        for reason in [
            "InvalidProviderToken",
            "BadEnvironmentKeyInToken",
            "BadEnvironmentKeyIdInToken",
        ] {
            let body = format!(r#"{{"reason":"{reason}"}}"#);
            let Verdict::CredentialsRejected(text) = classify(403, body.as_bytes(), None) else {
                panic!("{reason}")
            };
            assert!(text.starts_with(reason));
        }
        let Verdict::CredentialsRejected(text) =
            classify(403, br#"{"reason":"BadEnvironmentKeyInToken"}"#, None)
        else {
            panic!()
        };
        assert!(text.contains("apns.environment"));
    }

    #[test]
    fn unparseable_body_is_never_success() {
        assert!(matches!(outcome(400, "{{{"), Outcome::Rejected { .. }));
    }
}
