//! `messages:send` and the routing of every request: token and rate faults, the project quota,
//! the 200 answer, and the server `Handler`.

use super::reply::*;
use super::validate::*;
use super::*;

impl FcmInner {
    pub(super) fn error_reply(&self, mut e: GError) -> Reply {
        if e.details.len() > 1 && self.error_seq.fetch_add(1, Relaxed) % 2 == 1 {
            e.details.reverse();
        }
        let mut err = json!({"code": e.code, "message": e.message, "status": e.status});
        if !e.details.is_empty() {
            err["details"] = Value::Array(e.details);
        }
        Reply {
            status: e.code,
            content_type: "application/json; charset=UTF-8",
            body: Bytes::from(json!({ "error": err }).to_string()),
            reason: Some(e.reason),
            retry_after: e.retry_after,
            www_authenticate: e.code == 401 && e.reason == R_UNAUTHENTICATED,
        }
    }

    pub(super) fn html(&self, status: u16, body: &'static str, reason: usize) -> Reply {
        Reply {
            status,
            content_type: "text/html; charset=UTF-8",
            body: Bytes::from_static(body.as_bytes()),
            reason: Some(reason),
            retry_after: false,
            www_authenticate: false,
        }
    }
}

impl FcmInner {
    fn token_fault(&self, token: &str) -> Option<GError> {
        let fault = {
            let faults = self.faults.tokens.read();
            if faults.is_empty() {
                return None;
            }
            *faults.get(token)?
        };
        Some(match fault {
            FcmTokenFault::Unregistered => GError::new(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                R_UNREGISTERED,
            )
            .fcm("UNREGISTERED"),
            FcmTokenFault::ApnsUnregistered => {
                GError::invalid_argument("APNs device token is disabled.")
                    .fcm("INVALID_ARGUMENT")
                    .detail(
                        json!({"@type": APNS_ERROR, "statusCode": 410, "reason": "Unregistered"}),
                    )
            }
            FcmTokenFault::InvalidToken => {
                GError::invalid_argument("Request contains an invalid argument.")
                    .fcm("INVALID_ARGUMENT")
                    .bad_request("message.token", "Invalid registration token")
            }
            FcmTokenFault::SenderIdMismatch => GError::new(
                403,
                "PERMISSION_DENIED",
                "SenderId mismatch",
                R_SENDER_ID_MISMATCH,
            )
            .fcm("SENDER_ID_MISMATCH"),
            FcmTokenFault::ThirdPartyAuthError => GError::new(
                401,
                "UNAUTHENTICATED",
                "Auth error from APNS or Web Push Service",
                R_THIRD_PARTY_AUTH_ERROR,
            )
            .fcm("THIRD_PARTY_AUTH_ERROR")
            .detail(
                json!({"@type": APNS_ERROR, "statusCode": 403, "reason": "InvalidProviderToken"}),
            ),
        })
    }

    fn quota_error(&self) -> GError {
        let mut e = GError::new(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Send messages' and limit 'Send messages per minute' of service 'fcm.googleapis.com'.",
            R_QUOTA_EXCEEDED,
        )
        .fcm("QUOTA_EXCEEDED")
        .detail(json!({"@type": QUOTA_FAILURE, "violations": [{
            "subject": format!("project:{}", self.cfg.project_id),
            "description": "Project send rate exceeded."
        }]}));
        e.retry_after = true;
        e
    }

    fn send_endpoint(
        &self,
        conn: &FcmConn,
        method: &Method,
        project: &str,
        parts: &http::request::Parts,
        body: &[u8],
        truncated: bool,
    ) -> Reply {
        if method != Method::POST {
            return self.error_reply(GError::new(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                R_NOT_FOUND,
            ));
        }
        if let Err(e) = self.check_access_token(&parts.headers, conn) {
            return self.error_reply(e);
        }
        if project != self.cfg.project_id {
            let perm = "cloudmessaging.messages.create";
            let resource = format!("//cloudresourcemanager.googleapis.com/projects/{project}");
            return self.error_reply(
                GError::new(
                    403,
                    "PERMISSION_DENIED",
                    format!(
                        "Permission '{perm}' denied on resource '{resource}' (or it may not exist)."
                    ),
                    R_PERMISSION_DENIED,
                )
                .detail(
                    json!({"@type": ERROR_INFO, "reason": "IAM_PERMISSION_DENIED",
                    "domain": "cloudresourcemanager.googleapis.com",
                    "metadata": {"permission": perm, "resource": format!("projects/{project}")}}),
                ),
            );
        }
        if truncated {
            return self.error_reply(GError::invalid_argument(
                "Request contains an invalid argument.",
            ));
        }
        let req = match validate_send(body, self.cfg.record_accepted) {
            Ok(r) => r,
            Err(e) => return self.error_reply(e),
        };
        if let Some(e) = req.token.as_deref().and_then(|t| self.token_fault(t)) {
            return self.error_reply(e);
        }
        let f = &self.faults;
        if f.quota_exceeded.hit() {
            return self.error_reply(self.quota_error());
        }
        if f.internal.hit() {
            return self.error_reply(
                GError::new(500, "INTERNAL", "Internal error encountered.", R_INTERNAL)
                    .fcm("INTERNAL"),
            );
        }
        if f.unavailable.hit() {
            let mut e = GError::new(
                503,
                "UNAVAILABLE",
                "The service is currently unavailable.",
                R_UNAVAILABLE,
            )
            .fcm("UNAVAILABLE");
            e.retry_after = true;
            return self.error_reply(e);
        }
        if f.bad_gateway.hit() {
            return self.html(502, HTML_502, R_HTML_502);
        }
        if !f.bucket_take() {
            return self.error_reply(self.quota_error());
        }
        let body = if req.validate_only {
            self.counters.validate_only.fetch_add(1, Relaxed);
            self.validate_only_body.clone()
        } else {
            let n = self.message_seq.fetch_add(1, Relaxed);
            let mut buf = [0u8; 48];
            let id = message_id(self.faults.clock.now_millis(), n, &mut buf);
            self.counters.accepted.fetch_add(1, Relaxed);
            if let Some(token) = req.token.as_deref() {
                self.faults.on_accepted.accepted(token);
            }
            if self.cfg.record_accepted {
                let record = AcceptedFcm {
                    token: req.token.map(Cow::into_owned).unwrap_or_default(),
                    topic: req.topic.map(Cow::into_owned),
                    condition: req.condition.map(Cow::into_owned),
                    message: req.message,
                    name: format!("{}{id}", self.name_prefix),
                    received_at: Instant::now(),
                };
                self.accepted.lock().push(record);
            }
            // `{"name":"projects/<p>/messages/<id>"}`, as `json!` renders it: the id needs no
            // escaping. Sized exactly, so `Bytes` takes the buffer without another allocation.
            let head = self.name_json_head.as_bytes();
            let mut out = Vec::with_capacity(head.len() + id.len() + 2);
            out.extend_from_slice(head);
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\"}");
            Bytes::from(out)
        };
        Reply {
            status: 200,
            content_type: "application/json; charset=UTF-8",
            body,
            reason: None,
            retry_after: false,
            www_authenticate: false,
        }
    }

    async fn handle(
        &self,
        conn: &FcmConn,
        req: http::Request<RecvStream>,
        resp: &mut SendResponse<Bytes>,
    ) {
        let (parts, mut body) = req.into_parts();
        let Ok((body, truncated)) = server::read_body(&mut body, MAX_BODY_READ).await else {
            return;
        };
        server::delay(self.faults.latency_micros.load(Relaxed)).await;
        let path = parts.uri.path();
        let reply = if path == "/token" {
            self.token_endpoint(&parts.method, &body)
        } else if path == "/batch" || path == "/fcm/send" {
            self.counters.legacy_requests.fetch_add(1, Relaxed);
            self.html(404, HTML_404, R_NOT_FOUND)
        } else if let Some(project) = path
            .strip_prefix("/v1/projects/")
            .and_then(|p| p.strip_suffix("/messages:send"))
            .filter(|p| !p.is_empty() && !p.contains('/'))
        {
            self.send_endpoint(conn, &parts.method, project, &parts, &body, truncated)
        } else {
            self.error_reply(GError::new(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                R_NOT_FOUND,
            ))
        };
        self.counters.record(reply.status, reply.reason);
        let mut builder = Response::builder()
            .status(reply.status)
            .header(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
        if reply.retry_after
            && let Some(v) = self.faults.retry_after_value()
        {
            builder = builder.header("retry-after", v);
        }
        if reply.www_authenticate {
            builder = builder.header(
                "www-authenticate",
                "Bearer realm=\"https://accounts.google.com/\"",
            );
        }
        if let Ok(r) = builder.body(()) {
            server::send(resp, r, Some(reply.body));
        }
    }
}

impl Handler for FcmInner {
    type ConnState = FcmConn;

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn conn_faults(&self) -> &ConnFaults {
        &self.faults.conn
    }

    fn h2_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.max_concurrent_streams(
            self.faults
                .conn
                .max_streams(self.cfg.max_concurrent_streams),
        )
        .max_local_error_reset_streams(None);
        b
    }

    async fn serve(
        self: Arc<Self>,
        conn: Arc<server::ConnCtx<FcmConn>>,
        req: http::Request<RecvStream>,
        mut resp: SendResponse<Bytes>,
    ) {
        self.handle(&conn.state, req, &mut resp).await
    }

    /// Google's token endpoint answers HTTP/1.1 too; `messages:send` here stays HTTP/2 only.
    fn http1(self: &Arc<Self>) -> Option<crate::http1::Http1Handler> {
        let inner = Arc::clone(self);
        Some(Arc::new(move |request: crate::http1::Http1Request| {
            inner.counters.requests.fetch_add(1, Relaxed);
            if request.path() == "/token" {
                return inner
                    .token_endpoint(&request.method, &request.body)
                    .into_http1();
            }
            crate::http1::Http1Response::new(
                505,
                "text/plain",
                "this mock serves messages:send over HTTP/2 only\n",
            )
        }))
    }
}
