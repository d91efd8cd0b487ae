//! The mock's OAuth2 side: the `/token` JWT-bearer exchange and the access-token check on sends
//! (docs/providers.md, "FCM: OAuth2 service-account tokens").

use super::reply::*;
use super::*;

impl FcmInner {
    pub(super) fn token_endpoint(&self, method: &Method, body: &[u8]) -> Reply {
        self.token_endpoint_for(method, body, None)
    }

    /// The token endpoint, also accepting the assertion audience `also_aud` (a stand-in that
    /// serves this exchange at its own URL).
    pub(super) fn token_endpoint_for(
        &self,
        method: &Method,
        body: &[u8],
        also_aud: Option<&str>,
    ) -> Reply {
        self.counters.token_requests.fetch_add(1, Relaxed);
        if method != Method::POST {
            return oauth_error(
                405,
                "invalid_request",
                "Only POST is supported.",
                R_INVALID_REQUEST,
            );
        }
        if self.faults.token_endpoint_unavailable.hit() {
            return oauth_error(
                503,
                "temporarily_unavailable",
                "The service is currently unavailable.",
                R_TEMPORARILY_UNAVAILABLE,
            );
        }
        let body = String::from_utf8_lossy(body);
        let mut grant_type = None;
        let mut assertion = None;
        for pair in body.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match form_decode(k).as_str() {
                "grant_type" => grant_type = Some(form_decode(v)),
                "assertion" => assertion = Some(form_decode(v)),
                _ => {}
            }
        }
        match grant_type.as_deref() {
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {}
            Some(other) => {
                return oauth_error(
                    400,
                    "unsupported_grant_type",
                    &format!("Invalid grant_type: {other}"),
                    R_UNSUPPORTED_GRANT_TYPE,
                );
            }
            None => {
                return oauth_error(
                    400,
                    "invalid_request",
                    "Missing required parameter: grant_type",
                    R_INVALID_REQUEST,
                );
            }
        }
        let Some(assertion) = assertion else {
            return oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: assertion",
                R_INVALID_REQUEST,
            );
        };
        let claims = match self.verify_assertion(&assertion) {
            Ok(c) => c,
            Err(reply) => return reply,
        };
        if claims.get("iss").and_then(Value::as_str) != Some(self.cfg.client_email.as_str()) {
            return invalid_grant("Invalid grant: account not found");
        }
        let aud = claims.get("aud").and_then(Value::as_str).unwrap_or("");
        if aud != self.token_uri && aud != GOOGLE_TOKEN_AUD && Some(aud) != also_aud {
            return invalid_grant(
                "Invalid JWT: Failed audience check. The right audience is https://oauth2.googleapis.com/token",
            );
        }
        let (Some(iat), Some(exp)) = (
            claims.get("iat").and_then(Value::as_i64),
            claims.get("exp").and_then(Value::as_i64),
        ) else {
            return invalid_grant(SHORT_LIVED);
        };
        let now = self.faults.clock.now_secs();
        if exp - iat > 3600
            || exp < iat
            || exp <= now - TIME_SKEW_SECS
            || iat > now + TIME_SKEW_SECS
        {
            return invalid_grant(SHORT_LIVED);
        }
        let scope_ok = claims
            .get("scope")
            .and_then(Value::as_str)
            .is_some_and(|s| s.split(' ').any(|sc| FCM_SCOPES.contains(&sc)));
        if !scope_ok {
            return oauth_error(
                400,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
                R_INVALID_SCOPE,
            );
        }
        let (token, lifetime) = self.issue();
        Reply {
            status: 200,
            content_type: "application/json; charset=utf-8",
            body: Bytes::from(
                json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})
                    .to_string(),
            ),
            reason: None,
            retry_after: false,
            www_authenticate: false,
        }
    }

    /// Issues an access token `messages:send` accepts, valid for the configured lifetime.
    pub(super) fn issue(&self) -> (String, u64) {
        let token = format!("ya29.mock-{}", uuid::Uuid::new_v4().simple());
        let lifetime = self.cfg.token_lifetime.as_secs();
        let now = self.faults.clock.now_secs();
        self.issued.write().insert(
            token.clone(),
            Issued {
                expires_at: now + lifetime as i64,
                generation: self.faults.generation.load(Relaxed),
            },
        );
        self.counters.tokens_issued.fetch_add(1, Relaxed);
        (token, lifetime)
    }

    /// Checks the assertion's structure, algorithm and RS256 signature; returns its claims.
    pub(super) fn verify_assertion(&self, jwt: &str) -> Result<Map<String, Value>, Reply> {
        let bad_sig = || invalid_grant("Invalid JWT Signature.");
        let mut it = jwt.split('.');
        let (Some(h), Some(c), Some(sig), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(invalid_grant(
                "Invalid JWT: not a JWS compact serialization.",
            ));
        };
        let decode = |part: &str| -> Option<Value> {
            let raw = URL_SAFE_NO_PAD.decode(part).ok()?;
            serde_json::from_slice(&raw).ok()
        };
        let (Some(header), Some(Value::Object(claims))) = (decode(h), decode(c)) else {
            return Err(invalid_grant(
                "Invalid JWT: could not decode the header or claims.",
            ));
        };
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err(bad_sig());
        }
        self.counters.jwt_verifications.fetch_add(1, Relaxed);
        let signed = &jwt[..h.len() + 1 + c.len()];
        match jsonwebtoken::crypto::verify(sig, signed.as_bytes(), &self.key, Algorithm::RS256) {
            Ok(true) => Ok(claims),
            _ => Err(bad_sig()),
        }
    }

    pub(super) fn check_access_token(
        &self,
        headers: &http::HeaderMap,
        conn: &FcmConn,
    ) -> Result<(), GError> {
        let unauth = |m| GError::new(401, "UNAUTHENTICATED", m, R_UNAUTHENTICATED);
        let Some(auth) = headers.get(AUTHORIZATION) else {
            return Err(unauth(UNAUTH_MISSING));
        };
        let auth = auth.to_str().unwrap_or("");
        let token = match auth.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => return Err(unauth(UNAUTH_INVALID)),
        };
        let generation = self.faults.generation.load(Relaxed);
        let now = self.faults.clock.now_secs();
        let valid = |expires_at: i64, issued_generation: u64| {
            issued_generation == generation && expires_at > now
        };
        let mut cached = conn.token.lock();
        if let Some(c) = cached.as_ref()
            && &*c.token == token
        {
            return if valid(c.expires_at, c.generation) {
                Ok(())
            } else {
                Err(unauth(UNAUTH_INVALID))
            };
        }
        match self.issued.read().get(token) {
            Some(i) if valid(i.expires_at, i.generation) => {
                *cached = Some(CachedToken {
                    token: token.into(),
                    expires_at: i.expires_at,
                    generation: i.generation,
                });
                Ok(())
            }
            _ => Err(unauth(UNAUTH_INVALID)),
        }
    }
}
