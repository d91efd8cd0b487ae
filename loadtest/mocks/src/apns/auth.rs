//! Token (JWT) authentication as APNs applies it (docs/providers.md, "APNs: token (JWT)
//! authentication"): ES256, a known key id and team, an `iat` within the hour, one token per
//! connection at a time, and verdicts cached per token.

use super::validate::*;
use super::*;

impl ApnsInner {
    /// Verifies a JWT's structure, header, issuer and signature. Cached by the caller.
    pub(super) fn verify_jwt(&self, jwt: &str) -> JwtVerdict {
        let mut it = jwt.split('.');
        let (Some(h), Some(c), Some(sig), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return JwtVerdict::Invalid;
        };
        let decode = |part: &str| -> Option<serde_json::Value> {
            let raw = URL_SAFE_NO_PAD.decode(part).ok()?;
            serde_json::from_slice(&raw).ok()
        };
        let (Some(header), Some(claims)) = (decode(h), decode(c)) else {
            return JwtVerdict::Invalid;
        };
        if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
            return JwtVerdict::Invalid;
        }
        let Some(kid) = header.get("kid").and_then(|k| k.as_str()) else {
            return JwtVerdict::Invalid;
        };
        let Some(key) = self.keys.get(kid) else {
            return JwtVerdict::Invalid;
        };
        let Some(iat) = claims.get("iat").and_then(|v| v.as_i64()) else {
            return JwtVerdict::Invalid;
        };
        if claims.get("iss").and_then(|v| v.as_str()) != Some(self.cfg.team_id.as_str()) {
            return JwtVerdict::Invalid;
        }
        self.counters.jwt_verifications.fetch_add(1, Relaxed);
        let signed = &jwt[..h.len() + 1 + c.len()];
        match jsonwebtoken::crypto::verify(sig, signed.as_bytes(), key, Algorithm::ES256) {
            Ok(true) => JwtVerdict::Valid {
                kid: Arc::from(kid),
                iat,
            },
            _ => JwtVerdict::Invalid,
        }
    }

    pub(super) fn verdict(&self, jwt: &str) -> JwtVerdict {
        if let Some(v) = self.jwt_cache.read().get(jwt) {
            return v.clone();
        }
        let v = self.verify_jwt(jwt);
        let mut cache = self.jwt_cache.write();
        if cache.len() >= JWT_CACHE_MAX {
            cache.clear();
        }
        cache.insert(jwt.to_string(), v.clone());
        v
    }

    pub(super) fn check_auth(&self, headers: &HeaderMap, conn: &ApnsConn) -> Result<(), Reject> {
        use ApnsReason::*;
        let f = &self.faults;
        let auth = match headers.get(AUTHORIZATION) {
            Some(v) if !v.is_empty() => v.to_str().unwrap_or(""),
            _ => return Err(MissingProviderToken.into()),
        };
        if f.has_reject_all.load(Relaxed)
            && let Some(reason) = *f.reject_all.read()
        {
            return Err(reason.into());
        }
        if f.force_expired.take() {
            // The token is expired, not this connection's copy of it: every connection that
            // used it must take a new one without a `TooManyProviderTokenUpdates`.
            if let Some((_, jwt)) = auth.split_once(' ') {
                f.expired_jwts.write().insert(Arc::from(jwt.trim()));
            }
            *conn.token.lock() = ConnToken::default();
            return Err(ExpiredProviderToken.into());
        }
        let jwt = match auth.split_once(' ') {
            Some((scheme, jwt)) if scheme.eq_ignore_ascii_case("bearer") => jwt.trim(),
            _ => return Err(InvalidProviderToken.into()),
        };
        // Fast path: the connection's current JWT was verified already.
        let known = {
            let t = conn.token.lock();
            match (&t.jwt, &t.kid) {
                (Some(cur), Some(kid)) if &**cur == jwt => Some((kid.clone(), t.iat)),
                _ => None,
            }
        };
        let (kid, iat) = match known {
            Some(k) => k,
            None => match self.verdict(jwt) {
                JwtVerdict::Valid { kid, iat } => (kid, iat),
                JwtVerdict::Invalid => return Err(InvalidProviderToken.into()),
            },
        };
        if f.has_wrong_env_keys.load(Relaxed) && f.wrong_env_keys.read().contains(&*kid) {
            return Err(match self.cfg.bad_environment_spelling {
                BadEnvironmentSpelling::Documented => BadEnvironmentKeyIdInToken,
                BadEnvironmentSpelling::Wire => BadEnvironmentKeyInToken,
            }
            .into());
        }
        let now = f.clock.now_secs();
        if iat > now + self.cfg.max_iat_skew.as_secs() as i64 {
            return Err(InvalidProviderToken.into());
        }
        let mut token = conn.token.lock();
        if now - iat > 3600 {
            if token.jwt.as_deref() == Some(jwt) {
                *token = ConnToken::default();
            }
            return Err(ExpiredProviderToken.into());
        }
        match &token.jwt {
            Some(current) if &**current == jwt => {}
            Some(current)
                if now - token.first_used < 1200 && !f.expired_jwts.read().contains(current) =>
            {
                return Err(TooManyProviderTokenUpdates.into());
            }
            _ => {
                *token = ConnToken {
                    jwt: Some(Arc::from(jwt)),
                    first_used: now,
                    kid: Some(kid),
                    iat,
                };
            }
        }
        drop(token);
        conn.authorized.store(true, Relaxed);
        Ok(())
    }
}
