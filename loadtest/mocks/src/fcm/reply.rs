//! What the mock FCM answers with: a reply, Google's error shape (`GError`) and the verbatim
//! texts real clients parse.

use super::*;

/// One response to send.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) body: Bytes,
    pub(super) reason: Option<usize>,
    pub(super) retry_after: bool,
    pub(super) www_authenticate: bool,
}

impl Reply {
    /// The same answer over HTTP/1.1.
    pub(super) fn into_http1(self) -> crate::http1::Http1Response {
        let mut response =
            crate::http1::Http1Response::new(self.status, self.content_type, self.body);
        if self.retry_after {
            response = response.with_header("retry-after", "1");
        }
        response
    }
}

/// A Google API error before serialisation.
pub(super) struct GError {
    pub(super) code: u16,
    pub(super) status: &'static str,
    pub(super) message: String,
    pub(super) details: Vec<Value>,
    pub(super) reason: usize,
    pub(super) retry_after: bool,
}

impl GError {
    pub(super) fn new(
        code: u16,
        status: &'static str,
        message: impl Into<String>,
        reason: usize,
    ) -> Self {
        GError {
            code,
            status,
            message: message.into(),
            details: Vec::new(),
            reason,
            retry_after: false,
        }
    }

    pub(super) fn detail(mut self, d: Value) -> Self {
        self.details.push(d);
        self
    }

    pub(super) fn fcm(self, code: &str) -> Self {
        self.detail(json!({"@type": FCM_ERROR, "errorCode": code}))
    }

    pub(super) fn bad_request(self, field: &str, description: &str) -> Self {
        self.detail(json!({"@type": BAD_REQUEST, "fieldViolations": [
            {"field": field, "description": description}
        ]}))
    }

    pub(super) fn invalid_argument(message: impl Into<String>) -> Self {
        GError::new(400, "INVALID_ARGUMENT", message, R_INVALID_ARGUMENT)
    }

    /// A JSON-level (proto parsing) error: INVALID_ARGUMENT with only a BadRequest detail.
    pub(super) fn invalid_json(field: &str, message: String) -> Self {
        GError::invalid_argument(message.clone()).bad_request(field, &message)
    }
}

pub(super) const UNAUTH_MISSING: &str = "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
pub(super) const UNAUTH_INVALID: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";

pub(super) const HTML_502: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  <title>Error 502 (Server Error)!!1</title>\n  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  <p><b>502.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The server encountered a temporary error and could not complete your request.<p>Please try again in 30 seconds.  <ins>That\u{2019}s all we know.</ins>\n";

pub(super) const HTML_404: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 404 (Not Found)!!1</title>\n  <p><b>404.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The requested URL was not found on this server.  <ins>That\u{2019}s all we know.</ins>\n";

/// Decodes one `application/x-www-form-urlencoded` component.
pub(super) fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn oauth_error(status: u16, error: &str, description: &str, reason: usize) -> Reply {
    Reply {
        status,
        content_type: "application/json; charset=utf-8",
        body: Bytes::from(json!({"error": error, "error_description": description}).to_string()),
        reason: Some(reason),
        retry_after: false,
        www_authenticate: false,
    }
}

pub(super) fn invalid_grant(description: &str) -> Reply {
    oauth_error(400, "invalid_grant", description, R_INVALID_GRANT)
}

pub(super) const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";
