//! Classification of FCM HTTP v1 `messages:send` responses into outcomes (docs/providers.md, "FCM: error responses").
//!
//! The FCM-specific error code lives only in the `error.details[]` entry whose `@type` is
//! `type.googleapis.com/google.firebase.fcm.v1.FcmError`; the entries come in any order, so they
//! are found by type, never by position. Without that entry the canonical `error.status`
//! (`NOT_FOUND`, `UNAUTHENTICATED`, ...) is used, and a body that is not JSON at all (the Google
//! HTML 502 page) is classified by the HTTP status alone.
//!
//! Tokens are reported dead only on the documented signals (docs/providers.md, "FCM: when a token is dead"): `UNREGISTERED`,
//! `INVALID_ARGUMENT` with a `message.token` field violation, and a relayed APNs `410
//! Unregistered`. `SENDER_ID_MISMATCH` is also reported as an invalid token (for this gateway's
//! callers the token is unusable with this app), with a reason that warns against deleting it
//! blindly.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::domain::Outcome;

const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const APNS_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.ApnsError";
const BAD_REQUEST: &str = "type.googleapis.com/google.rpc.BadRequest";
const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// What the client must do with a response, beyond reporting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Report this outcome.
    Final(Outcome),
    /// FCM refused our OAuth access token (401 without an `FcmError`): drop the cached token,
    /// fetch a new one and send again, once. The string is FCM's message.
    RefreshToken(String),
}

/// The parts of a Google API error body that matter for classification.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// `error.message`.
    pub message: Option<String>,
    /// `error.status`, the canonical gRPC code.
    pub status: Option<String>,
    /// `errorCode` of the `FcmError` detail.
    pub fcm_code: Option<String>,
    /// `statusCode` (or `status_code`) of the relayed `ApnsError` detail.
    pub apns_status: Option<u16>,
    /// `reason` of the relayed `ApnsError` detail.
    pub apns_reason: Option<String>,
    /// `BadRequest.fieldViolations[]` as `(field, description)`.
    pub field_violations: Vec<(String, String)>,
    /// `reason` of a `google.rpc.ErrorInfo` detail.
    pub error_info_reason: Option<String>,
}

impl ApiError {
    /// Parses `{"error":{...}}`; `None` when the body is not that shape (HTML, empty, ...).
    pub fn parse(body: &[u8]) -> Option<Self> {
        let root: Value = serde_json::from_slice(body).ok()?;
        let error = root.get("error")?.as_object()?;
        // An empty string says no more than none (a receipt must carry a reason).
        let text = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
        };
        let mut info = ApiError {
            message: text(error.get("message")),
            status: text(error.get("status")),
            ..ApiError::default()
        };
        let details = error.get("details").and_then(Value::as_array);
        for detail in details.into_iter().flatten() {
            match detail.get("@type").and_then(Value::as_str) {
                Some(FCM_ERROR) => {
                    info.fcm_code = info.fcm_code.or(text(detail.get("errorCode")));
                }
                Some(APNS_ERROR) => {
                    let code = detail
                        .get("statusCode")
                        .or_else(|| detail.get("status_code"));
                    info.apns_status = info.apns_status.or(code.and_then(as_u16));
                    info.apns_reason = info.apns_reason.or(text(detail.get("reason")));
                }
                Some(BAD_REQUEST) => {
                    let violations = detail.get("fieldViolations").and_then(Value::as_array);
                    for violation in violations.into_iter().flatten() {
                        let field = text(violation.get("field")).unwrap_or_default();
                        let description = text(violation.get("description")).unwrap_or_default();
                        info.field_violations.push((field, description));
                    }
                }
                Some(ERROR_INFO) => {
                    info.error_info_reason = info.error_info_reason.or(text(detail.get("reason")));
                }
                _ => {}
            }
        }
        Some(info)
    }

    /// The FCM error code, falling back to the canonical status.
    pub fn code(&self) -> Option<&str> {
        self.fcm_code.as_deref().or(self.status.as_deref())
    }

    fn relayed_apns_unregistered(&self) -> bool {
        self.apns_status == Some(410) || self.apns_reason.as_deref() == Some("Unregistered")
    }

    fn token_violation(&self) -> Option<&(String, String)> {
        self.field_violations
            .iter()
            .find(|(field, _)| field == "message.token")
    }

    fn sender_id_mismatch(&self) -> bool {
        self.fcm_code.as_deref() == Some("SENDER_ID_MISMATCH")
            || self.error_info_reason.as_deref() == Some("SENDER_ID_MISMATCH")
            // Seen in the wild with neither detail: 403 "SenderId mismatch".
            || (self.status.as_deref() == Some("PERMISSION_DENIED")
                && self
                    .message
                    .as_deref()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("SenderId mismatch")))
    }

    /// `CODE: message [APNs 410 Unregistered] [field: description, ...]`.
    fn describe(&self, http_status: u16) -> String {
        let mut out = match (self.code(), self.message.as_deref()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_string(),
            (None, Some(message)) => format!("HTTP {http_status}: {message}"),
            (None, None) => format!("HTTP {http_status}"),
        };
        if let Some(apns) = self.apns_suffix() {
            out.push_str(&apns);
        }
        if !self.field_violations.is_empty() {
            let list: Vec<String> = self
                .field_violations
                .iter()
                .map(|(field, description)| format!("{field}: {description}"))
                .collect();
            out.push_str(&format!(" [{}]", list.join("; ")));
        }
        out
    }

    fn apns_suffix(&self) -> Option<String> {
        match (self.apns_status, self.apns_reason.as_deref()) {
            (None, None) => None,
            (Some(status), Some(reason)) => Some(format!(" (APNs {status} {reason})")),
            (Some(status), None) => Some(format!(" (APNs {status})")),
            (None, Some(reason)) => Some(format!(" (APNs {reason})")),
        }
    }
}

fn as_u16(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Classifies one `messages:send` response. `retry_after` is the raw `Retry-After` header (delta
/// seconds or an HTTP-date, read relative to `now`).
pub fn classify(status: u16, body: &[u8], retry_after: Option<&str>, now: SystemTime) -> Verdict {
    if (200..300).contains(&status) {
        return Verdict::Final(classify_success(status, body));
    }
    let retry_after = retry_after.and_then(|v| crate::provider::retry_after::parse(v, now));
    match ApiError::parse(body) {
        Some(info) => classify_error(status, &info, retry_after),
        None => Verdict::Final(classify_status_only(status, retry_after)),
    }
}

/// A 2xx is success only with the documented `{"name":"projects/*/messages/*"}` body.
///
/// A 2xx without a `name` did not come from FCM's send handler as documented (a proxy page, a
/// truncated body): we cannot prove FCM accepted the message, so it is retried rather than
/// reported delivered (a false "delivered" would hide a lost message) or failed (the message is
/// fine). The retry policy's attempt limit bounds it if the endpoint keeps answering like that.
fn classify_success(status: u16, body: &[u8]) -> Outcome {
    let name = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string))
        .filter(|n| !n.is_empty());
    match name {
        Some(provider_message_id) => Outcome::Delivered {
            provider_message_id,
            status,
        },
        None => Outcome::Retry {
            reason: format!(
                "FCM answered HTTP {status} without a message name; not counted as delivered \
                 (is fcm.endpoint a proxy?)"
            ),
            status,
            retry_after: None,
        },
    }
}

fn classify_error(status: u16, info: &ApiError, retry_after: Option<Duration>) -> Verdict {
    let reason = info.describe(status);
    let code = info.code().unwrap_or_default();
    // Server-side trouble and quota always retry, whatever the code says.
    if status == 429 || status >= 500 {
        return Verdict::Final(retry(reason, status, retry_after));
    }
    let outcome = match code {
        "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL" => {
            retry(reason, status, retry_after)
        }
        "UNREGISTERED" => invalid_token(reason, status),
        _ if info.sender_id_mismatch() => invalid_token(
            format!(
                "SENDER_ID_MISMATCH: token belongs to another Firebase project; check the app's \
                 project before deleting ({reason})"
            ),
            status,
        ),
        "THIRD_PARTY_AUTH_ERROR" | "APNS_AUTH_ERROR" => Outcome::Failed {
            reason: format!(
                "{reason}: FCM could not authenticate to APNs or Web Push; fix the APNs auth key \
                 or certificate (or the Web Push credentials) of this app in the Firebase console \
                 (Project settings > Cloud Messaging)"
            ),
            status,
        },
        "INVALID_ARGUMENT" if info.relayed_apns_unregistered() => invalid_token(reason, status),
        "INVALID_ARGUMENT" if info.token_violation().is_some() => invalid_token(reason, status),
        "INVALID_ARGUMENT" => Outcome::Rejected { reason, status },
        // Our OAuth access token: no FcmError detail.
        _ if status == 401 && info.fcm_code.is_none() => {
            return Verdict::RefreshToken(
                info.message
                    .clone()
                    .unwrap_or_else(|| "HTTP 401 UNAUTHENTICATED".into()),
            );
        }
        _ => return Verdict::Final(classify_status_only_with(status, reason, retry_after)),
    };
    Verdict::Final(outcome)
}

fn classify_status_only(status: u16, retry_after: Option<Duration>) -> Outcome {
    let name = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let reason = format!("HTTP {status} {name} from FCM (body is not a Google API error)")
        .replace("  ", " ");
    classify_status_only_with(status, reason, retry_after)
}

/// The HTTP status decides: used for bodies without a usable error code.
fn classify_status_only_with(
    status: u16,
    reason: String,
    retry_after: Option<Duration>,
) -> Outcome {
    match status {
        400 | 413 => Outcome::Rejected { reason, status },
        // Our token, but the body could not tell us so for sure: a re-send with a fresh token is
        // only done for a recognisable 401; this one fails and names the likely cause.
        401 => Outcome::Failed {
            reason: format!("FCM rejected the access token: {reason}"),
            status,
        },
        403 => Outcome::Failed {
            reason: format!(
                "{reason}: permission denied; check that the service account may send with FCM \
                 (role Firebase Cloud Messaging API Admin), that the FCM API is enabled and that \
                 project_id is right"
            ),
            status,
        },
        // Never a dead token without an UNREGISTERED code: a 404 without one is a wrong
        // project id or endpoint, and deleting tokens on it would be a disaster.
        404 => Outcome::Failed {
            reason: format!("{reason}: not found; check fcm.project_id and fcm.endpoint"),
            status,
        },
        408 | 429 | 500..=599 => retry(reason, status, retry_after),
        400..=499 => Outcome::Rejected { reason, status },
        _ => retry(reason, status, retry_after),
    }
}

fn retry(reason: String, status: u16, retry_after: Option<Duration>) -> Outcome {
    Outcome::Retry {
        reason,
        status,
        retry_after,
    }
}

fn invalid_token(reason: String, status: u16) -> Outcome {
    Outcome::InvalidToken {
        reason,
        status,
        invalid_since: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `fcm_response` fuzz target: `"status":""` became the code, and a receipt
    /// with an empty reason.
    #[test]
    fn empty_strings_in_the_error_are_read_as_none() {
        let body = br#"{"error":{"code":403,"status":"","message":""}}"#;
        let info = ApiError::parse(body).unwrap();
        assert_eq!((info.status, info.message), (None, None));
        let Verdict::Final(outcome) = classify(0, body, None, now()) else {
            panic!("not a token refresh");
        };
        assert_eq!(reason(&outcome), "HTTP 0");
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_000_000)
    }

    fn outcome(status: u16, body: &str) -> Outcome {
        outcome_ra(status, body, None)
    }

    fn outcome_ra(status: u16, body: &str, retry_after: Option<&str>) -> Outcome {
        match classify(status, body.as_bytes(), retry_after, now()) {
            Verdict::Final(o) => o,
            other => panic!("expected an outcome, got {other:?}"),
        }
    }

    fn reason(o: &Outcome) -> &str {
        match o {
            Outcome::Delivered {
                provider_message_id,
                ..
            } => provider_message_id,
            Outcome::InvalidToken { reason, .. }
            | Outcome::Rejected { reason, .. }
            | Outcome::Retry { reason, .. }
            | Outcome::Failed { reason, .. } => reason,
        }
    }

    // Bodies verbatim from docs/providers.md, "FCM: recorded error bodies".
    const INVALID_TOKEN: &str = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},
            {"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#;
    const INVALID_TOKEN_REVERSED: &str = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT",
 "details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
    const TOO_LARGE: &str = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT"}}"#;
    const UNREGISTERED: &str = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
    const INTERNAL: &str = r#"{"error":{"code":500,"message":"Internal error encountered.","status":"INTERNAL",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INTERNAL"}]}}"#;
    const UNAVAILABLE: &str = r#"{"error":{"code":503,"message":"The service is currently unavailable.","status":"UNAVAILABLE",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNAVAILABLE"}]}}"#;
    const THIRD_PARTY: &str = r#"{"error":{"code":401,"message":"Auth error from APNS or Web Push Service","status":"UNAUTHENTICATED",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"THIRD_PARTY_AUTH_ERROR"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":403,"reason":"InvalidProviderToken"}]}}"#;
    const THIRD_PARTY_REVERSED: &str = r#"{"error":{"code":401,"message":"Auth error from APNS or Web Push Service","status":"UNAUTHENTICATED",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":403,"reason":"InvalidProviderToken"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"THIRD_PARTY_AUTH_ERROR"}]}}"#;
    const DEAD_IOS: &str = r#"{"error":{"code":400,"message":"APNs device token is disabled.","status":"INVALID_ARGUMENT",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":410,"reason":"Unregistered"}]}}"#;
    const DEAD_IOS_REVERSED: &str = r#"{"error":{"code":400,"message":"APNs device token is disabled.","status":"INVALID_ARGUMENT",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":410,"reason":"Unregistered"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
    const DEAD_IOS_404: &str = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":410,"reason":"Unregistered"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
    const BAD_ACCESS_TOKEN: &str = r#"{"error":{"code":401,"message":"Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.","status":"UNAUTHENTICATED"}}"#;
    const SENDER_MISMATCH_FCM: &str = r#"{"error":{"code":403,"message":"SenderId mismatch","status":"PERMISSION_DENIED",
 "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"SENDER_ID_MISMATCH"}]}}"#;
    const SENDER_MISMATCH_INFO: &str = r#"{"error":{"code":403,"message":"SenderId mismatch","status":"PERMISSION_DENIED",
 "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SENDER_ID_MISMATCH","domain":"googleapis.com"}]}}"#;
    const SENDER_MISMATCH_BARE: &str =
        r#"{"error":{"code":403,"message":"SenderId mismatch","status":"PERMISSION_DENIED"}}"#;
    const SERVICE_DISABLED: &str = r#"{"error":{"code":403,"message":"Firebase Cloud Messaging API has not been used in project 1 before or it is disabled.","status":"PERMISSION_DENIED",
 "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","domain":"googleapis.com"}]}}"#;
    const QUOTA: &str = r#"{"error":{"code":429,"message":"Quota exceeded for quota metric 'Send requests'.","status":"RESOURCE_EXHAUSTED",
 "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"subject":"project","description":"too many"}]},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"QUOTA_EXCEEDED"}]}}"#;
    const HTML_502: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 502 (Server Error)!!1</title>\n  <p><b>502.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The server encountered a temporary error and could not complete your request.<p>Please try again in 30 seconds.  <ins>That\u{2019}s all we know.</ins>";
    const DATA_NOT_STRING: &str = r#"{"error":{"code":400,"message":"Invalid value at 'message.data[0].value' (TYPE_STRING), 12","status":"INVALID_ARGUMENT",
 "details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.data[0].value","description":"Invalid value at 'message.data[0].value' (TYPE_STRING), 12"}]}]}}"#;

    #[test]
    fn success_uses_the_message_name() {
        let body = r#"{ "name": "projects/myproject-b5ae1/messages/0:1500415314455276%31bd1c9631bd1c96" }"#;
        assert_eq!(
            outcome(200, body),
            Outcome::Delivered {
                provider_message_id:
                    "projects/myproject-b5ae1/messages/0:1500415314455276%31bd1c9631bd1c96".into(),
                status: 200
            }
        );
    }

    #[test]
    fn success_without_name_is_not_delivered() {
        for body in [
            "",
            "{}",
            r#"{"name":""}"#,
            r#"{"name":5}"#,
            "<html>ok</html>",
        ] {
            let o = outcome(200, body);
            assert!(
                matches!(o, Outcome::Retry { status: 200, .. }),
                "{body}: {o:?}"
            );
            assert!(reason(&o).contains("without a message name"));
        }
    }

    #[test]
    fn token_field_violation_is_invalid_token_in_both_orders() {
        for body in [INVALID_TOKEN, INVALID_TOKEN_REVERSED] {
            let o = outcome(400, body);
            assert!(
                matches!(o, Outcome::InvalidToken { status: 400, .. }),
                "{o:?}"
            );
            assert!(
                reason(&o).contains("message.token: Invalid registration token"),
                "{o:?}"
            );
        }
    }

    #[test]
    fn other_invalid_argument_is_rejected() {
        let o = outcome(400, TOO_LARGE);
        assert_eq!(
            o,
            Outcome::Rejected {
                reason: "INVALID_ARGUMENT: Request contains an invalid argument.".into(),
                status: 400
            }
        );
        let o = outcome(400, DATA_NOT_STRING);
        assert!(matches!(o, Outcome::Rejected { status: 400, .. }), "{o:?}");
        assert!(reason(&o).contains("message.data[0].value"), "{o:?}");
    }

    #[test]
    fn unregistered_is_invalid_token() {
        let o = outcome(404, UNREGISTERED);
        assert_eq!(
            o,
            Outcome::InvalidToken {
                reason: "UNREGISTERED: Requested entity was not found.".into(),
                status: 404,
                invalid_since: None
            }
        );
        let o = outcome(404, DEAD_IOS_404);
        assert!(
            matches!(o, Outcome::InvalidToken { status: 404, .. }),
            "{o:?}"
        );
        assert!(reason(&o).contains("APNs 410 Unregistered"), "{o:?}");
    }

    #[test]
    fn dead_ios_token_as_400_with_apns_error_is_invalid_token_in_both_orders() {
        for body in [DEAD_IOS, DEAD_IOS_REVERSED] {
            let o = outcome(400, body);
            assert!(
                matches!(o, Outcome::InvalidToken { status: 400, .. }),
                "{o:?}"
            );
            assert!(reason(&o).contains("APNs 410 Unregistered"), "{o:?}");
        }
        // snake_case schema name, reason only, status only.
        let body = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","status_code":"410"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert!(matches!(outcome(400, body), Outcome::InvalidToken { .. }));
        let body = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","reason":"Unregistered"}]}}"#;
        assert!(matches!(outcome(400, body), Outcome::InvalidToken { .. }));
        // A relayed APNs error that is not about a dead token stays a rejection.
        let body = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":400,"reason":"BadTopic"}]}}"#;
        assert!(matches!(outcome(400, body), Outcome::Rejected { .. }));
    }

    #[test]
    fn sender_id_mismatch_is_invalid_token_with_a_warning() {
        for body in [
            SENDER_MISMATCH_FCM,
            SENDER_MISMATCH_INFO,
            SENDER_MISMATCH_BARE,
        ] {
            let o = outcome(403, body);
            assert!(
                matches!(o, Outcome::InvalidToken { status: 403, .. }),
                "{o:?}"
            );
            let r = reason(&o);
            assert!(r.starts_with("SENDER_ID_MISMATCH: "), "{r}");
            assert!(
                r.contains("token belongs to another Firebase project"),
                "{r}"
            );
            assert!(r.contains("check the app's project before deleting"), "{r}");
        }
    }

    #[test]
    fn other_403_is_failed() {
        let o = outcome(403, SERVICE_DISABLED);
        assert!(matches!(o, Outcome::Failed { status: 403, .. }), "{o:?}");
        assert!(reason(&o).contains("permission denied"), "{o:?}");
        let o = outcome(403, "");
        assert!(matches!(o, Outcome::Failed { status: 403, .. }), "{o:?}");
    }

    #[test]
    fn third_party_auth_error_is_failed_with_console_advice_in_both_orders() {
        for body in [THIRD_PARTY, THIRD_PARTY_REVERSED] {
            let o = outcome(401, body);
            assert!(matches!(o, Outcome::Failed { status: 401, .. }), "{o:?}");
            let r = reason(&o);
            assert!(r.contains("THIRD_PARTY_AUTH_ERROR"), "{r}");
            assert!(r.contains("APNs 403 InvalidProviderToken"), "{r}");
            assert!(r.contains("Firebase console"), "{r}");
        }
        // The older name.
        let body = r#"{"error":{"code":401,"status":"UNAUTHENTICATED","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"APNS_AUTH_ERROR"}]}}"#;
        assert!(matches!(outcome(401, body), Outcome::Failed { .. }));
    }

    #[test]
    fn our_expired_access_token_asks_for_a_refresh() {
        let v = classify(401, BAD_ACCESS_TOKEN.as_bytes(), None, now());
        let Verdict::RefreshToken(message) = v else {
            panic!("{v:?}")
        };
        assert!(message.starts_with("Request had invalid authentication credentials"));
        let v = classify(
            401,
            br#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#,
            None,
            now(),
        );
        assert!(matches!(v, Verdict::RefreshToken(_)));
        // An unparseable 401 is not re-sent: nothing says it was our token.
        assert!(matches!(
            outcome(401, "Unauthorized"),
            Outcome::Failed { status: 401, .. }
        ));
    }

    #[test]
    fn quota_exceeded_retries_with_retry_after_seconds_and_date() {
        let o = outcome_ra(429, QUOTA, Some("30"));
        assert_eq!(
            o,
            Outcome::Retry {
                reason: "QUOTA_EXCEEDED: Quota exceeded for quota metric 'Send requests'.".into(),
                status: 429,
                retry_after: Some(Duration::from_secs(30))
            }
        );
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(90));
        assert!(matches!(
            outcome_ra(429, QUOTA, Some(&date)),
            Outcome::Retry { status: 429, retry_after: Some(d), .. } if d == Duration::from_secs(90)
        ));
        assert!(matches!(
            outcome_ra(429, QUOTA, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Outcome::Retry {
                retry_after: Some(Duration::ZERO),
                ..
            }
        ));
        assert!(matches!(
            outcome_ra(429, QUOTA, Some("soon")),
            Outcome::Retry {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            outcome_ra(429, "", None),
            Outcome::Retry {
                status: 429,
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn server_errors_retry_and_honour_retry_after() {
        let o = outcome(500, INTERNAL);
        assert_eq!(
            o,
            Outcome::Retry {
                reason: "INTERNAL: Internal error encountered.".into(),
                status: 500,
                retry_after: None
            }
        );
        let o = outcome_ra(503, UNAVAILABLE, Some("7"));
        assert!(matches!(
            o,
            Outcome::Retry { status: 503, retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
    }

    #[test]
    fn html_502_is_retried_by_status() {
        let o = outcome_ra(502, HTML_502, Some("30"));
        assert_eq!(
            o,
            Outcome::Retry {
                reason: "HTTP 502 Bad Gateway from FCM (body is not a Google API error)".into(),
                status: 502,
                retry_after: Some(Duration::from_secs(30))
            }
        );
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(12));
        assert!(matches!(
            outcome_ra(502, HTML_502, Some(&date)),
            Outcome::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(12)
        ));
    }

    #[test]
    fn unparseable_bodies_classify_by_status() {
        for (status, body) in [(400, "bad"), (413, "<html/>"), (418, "")] {
            assert!(
                matches!(outcome(status, body), Outcome::Rejected { .. }),
                "{status}"
            );
        }
        // A bare 404 is never a dead token.
        assert!(matches!(
            outcome(404, "Not Found"),
            Outcome::Failed { status: 404, .. }
        ));
        let not_found = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND"}}"#;
        assert!(matches!(
            outcome(404, not_found),
            Outcome::Failed { status: 404, .. }
        ));
        for status in [408, 500, 503, 504] {
            assert!(
                matches!(outcome(status, "x"), Outcome::Retry { .. }),
                "{status}"
            );
        }
        // Not JSON of the right shape at all.
        for body in [
            r#"{"error":"x"}"#,
            "[]",
            r#"{"error":{"details":"nope"}}"#,
            "\u{0}\u{1}",
        ] {
            let _ = outcome(400, body);
        }
    }

    #[test]
    fn fcm_code_wins_over_status_and_position() {
        // FcmError last, after unrelated details, with a conflicting canonical status.
        let body = r#"{"error":{"code":404,"status":"NOT_FOUND","details":[
            {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},
            {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"X"},
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(outcome(404, body), Outcome::InvalidToken { .. }));
        let info = ApiError::parse(body.as_bytes()).unwrap();
        assert_eq!(info.code(), Some("UNREGISTERED"));
        assert_eq!(info.status.as_deref(), Some("NOT_FOUND"));
        assert_eq!(info.error_info_reason.as_deref(), Some("X"));
    }
}
