//! One request from arrival to answer: the checks in order, the faults, the recorded payload and
//! the response; and the server `Handler` that admits connections.

use super::validate::*;
use super::*;

impl ApnsInner {
    fn respond(
        &self,
        resp: &mut SendResponse<Bytes>,
        apns_id: &HeaderValue,
        reject: Option<Reject>,
    ) {
        let builder = Response::builder().header(APNS_ID, apns_id.clone());
        match reject {
            None => {
                self.counters.record(200, None);
                if let Ok(r) = builder.status(StatusCode::OK).body(()) {
                    server::send(resp, r, None);
                }
            }
            Some(Reject {
                reason,
                timestamp_ms,
            }) => {
                let status = reason.status();
                self.counters.record(status, Some(reason as usize));
                let body = match timestamp_ms {
                    Some(ts) => format!(r#"{{"reason":"{reason}","timestamp":{ts}}}"#),
                    None => format!(r#"{{"reason":"{reason}"}}"#),
                };
                if let Ok(r) = builder
                    .status(status)
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(())
                {
                    server::send(resp, r, Some(Bytes::from(body)));
                }
            }
        }
    }

    async fn handle(
        &self,
        conn: &ApnsConn,
        req: http::Request<RecvStream>,
        resp: &mut SendResponse<Bytes>,
    ) {
        let (parts, mut body) = req.into_parts();
        let Ok((body, truncated)) = server::read_body(&mut body, MAX_VOIP_PAYLOAD).await else {
            return; // the client reset the stream
        };
        server::delay(self.faults.latency_micros.load(Relaxed)).await;
        // Echo the client's id (sharing its bytes) or make one.
        let apns_id = match parts.headers.get(&APNS_ID) {
            Some(id) if id.to_str().is_ok_and(is_canonical_uuid) => {
                let mut id = id.clone();
                id.set_sensitive(false);
                id
            }
            _ => {
                let mut buf = uuid::Uuid::encode_buffer();
                let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
                HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static(""))
            }
        };
        let v = match self.check_headers(&parts) {
            Ok(v) => v,
            Err(r) => return self.respond(resp, &apns_id, Some(r)),
        };
        if let Err(r) = self.check_auth(&parts.headers, conn) {
            return self.respond(resp, &apns_id, Some(r));
        }
        let payload = match self.check_body(&v, &body, truncated) {
            Ok(p) => p,
            Err(r) => return self.respond(resp, &apns_id, Some(r)),
        };
        let f = &self.faults;
        let injected = if f.too_many_requests.hit() {
            Some(ApnsReason::TooManyRequests)
        } else if f.internal_error.hit() {
            Some(ApnsReason::InternalServerError)
        } else if f.unavailable.hit() {
            Some(ApnsReason::ServiceUnavailable)
        } else {
            None
        };
        if let Some(reason) = injected {
            return self.respond(resp, &apns_id, Some(reason.into()));
        }
        self.counters.accepted.fetch_add(1, Relaxed);
        self.faults.on_accepted.accepted(v.token);
        if self.cfg.record_accepted {
            let record = AcceptedApns {
                device_token: v.token.to_string(),
                topic: v.topic.to_string(),
                push_type: v.push_type.to_string(),
                priority: v.priority,
                expiration: v.expiration,
                collapse_id: v.collapse_id.map(str::to_string),
                apns_id: apns_id.to_str().unwrap_or_default().to_string(),
                payload: payload.unwrap_or_default(),
                received_at: Instant::now(),
            };
            self.accepted.lock().push(record);
        }
        self.respond(resp, &apns_id, None);
    }
}

impl Handler for ApnsInner {
    type ConnState = ApnsConn;

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
        .max_header_list_size(8000)
        .max_local_error_reset_streams(None);
        b
    }

    fn admit(&self, conn: &ConnCtx<ApnsConn>) -> Admission {
        if self.cfg.refuse_streams_before_auth
            && !conn.state.authorized.load(Relaxed)
            && conn.in_flight.load(Relaxed) >= 1
        {
            Admission::Refuse
        } else {
            Admission::Serve
        }
    }

    async fn serve(
        self: Arc<Self>,
        conn: Arc<ConnCtx<ApnsConn>>,
        req: http::Request<RecvStream>,
        mut resp: SendResponse<Bytes>,
    ) {
        self.handle(&conn.state, req, &mut resp).await
    }
}
