//! The APNs provider token: an ES256 JWT signed once and shared by every connection of a pool.
//!
//! Apple rejects tokens older than an hour (`ExpiredProviderToken`) and answers
//! `TooManyProviderTokenUpdates` when a connection sees a new token more often than every 20
//! minutes, so the token is re-signed on a fixed cadence clamped to [20, 60) minutes, and on
//! `ExpiredProviderToken` only when the rejected token is still the current one (many in-flight
//! requests failing together cause one re-sign, not a stampede).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

/// Shortest re-signing interval Apple allows.
pub const MIN_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Apple rejects tokens older than this.
pub const MAX_AGE: Duration = Duration::from_secs(60 * 60);

/// Signing the token failed (a bad key).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("APNs key is not a PKCS#8 P-256 private key (.p8): {0}")]
    Key(String),
    #[error("signing the APNs token failed: {0}")]
    Sign(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

struct Current {
    token: Arc<str>,
    signed_at: Instant,
}

/// Caches and refreshes one key's provider token.
pub struct ApnsTokenSigner {
    key_id: String,
    team_id: String,
    key: EncodingKey,
    refresh_every: Duration,
    current: Mutex<Option<Current>>,
    /// The last token dropped by `expire`; re-signing within the same second can produce the
    /// very same string, which must not be dropped again.
    last_expired: Mutex<Option<Arc<str>>>,
    signatures: std::sync::atomic::AtomicU64,
    sign_failures: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ApnsTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsTokenSigner")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ApnsTokenSigner {
    /// `p8_pem` is the contents of Apple's `AuthKey_<KEYID>.p8` file. `refresh_every` is clamped
    /// to Apple's [20, 60) minute window.
    pub fn new(
        key_id: &str,
        team_id: &str,
        p8_pem: &[u8],
        refresh_every: Duration,
    ) -> Result<Self, JwtError> {
        let key = EncodingKey::from_ec_pem(p8_pem).map_err(|e| JwtError::Key(e.to_string()))?;
        let signer = Self {
            key_id: key_id.to_string(),
            team_id: team_id.to_string(),
            key,
            refresh_every: refresh_every.clamp(MIN_REFRESH, MAX_AGE - Duration::from_secs(60)),
            current: Mutex::new(None),
            last_expired: Mutex::new(None),
            signatures: Default::default(),
            sign_failures: Default::default(),
        };
        // Fail at start, not on the first push, if the key cannot sign.
        signer.sign()?;
        Ok(signer)
    }

    /// The current token, re-signed when it is due.
    pub fn token(&self) -> Result<Arc<str>, JwtError> {
        let mut current = self.current.lock();
        if let Some(c) = current.as_ref()
            && c.signed_at.elapsed() < self.refresh_every
        {
            return Ok(Arc::clone(&c.token));
        }
        let token: Arc<str> = match self.sign() {
            Ok(token) => token.into(),
            Err(error) => {
                self.sign_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(error);
            }
        };
        *current = Some(Current {
            token: Arc::clone(&token),
            signed_at: Instant::now(),
        });
        Ok(token)
    }

    /// Called on `ExpiredProviderToken`: re-signs only if `rejected` is still the current token.
    pub fn expire(&self, rejected: &str) {
        let mut current = self.current.lock();
        let mut last_expired = self.last_expired.lock();
        if last_expired.as_deref() == Some(rejected) {
            return;
        }
        if let Some(c) = current.as_ref()
            && &*c.token == rejected
        {
            *last_expired = Some(Arc::clone(&c.token));
            *current = None;
        }
    }

    /// How many tokens have been signed (for tests and metrics).
    pub fn signatures(&self) -> u64 {
        self.signatures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Signing attempts that failed.
    pub fn sign_failures(&self) -> u64 {
        self.sign_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn sign(&self) -> Result<String, JwtError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        header.typ = None;
        let iat = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            iss: &self.team_id,
            iat,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| JwtError::Sign(e.to_string()))?;
        self.signatures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn signer(refresh: Duration) -> (ApnsTokenSigner, String) {
        let key = pushgate_mocks::keys::generate_apns_key();
        let s = ApnsTokenSigner::new(
            &key.key_id,
            &key.team_id,
            key.private_p8_pem.as_bytes(),
            refresh,
        )
        .unwrap();
        (s, key.public_pem)
    }

    #[tokio::test(start_paused = true)]
    async fn token_is_valid_es256_with_kid_iss_iat() {
        let (s, public) = signer(MIN_REFRESH);
        let token = s.token().unwrap();
        let header = jsonwebtoken::decode_header(&*token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(s.key_id.as_str()));
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &*token,
            &DecodingKey::from_ec_pem(public.as_bytes()).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["iss"], s.team_id.as_str());
        let iat = data.claims["iat"].as_u64().unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(iat) < 5, "iat is in seconds");
        // Only iss and iat: Apple documents no other claims.
        assert_eq!(data.claims.as_object().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_cadence_is_clamped_to_apple_window() {
        // ES256 signing is deterministic and paused time does not move the wall clock, so count
        // signatures rather than compare token strings.
        // Asked for 1 minute: clamped up to 20.
        let (s, _) = signer(Duration::from_secs(60));
        s.token().unwrap();
        let base = s.signatures();
        tokio::time::advance(Duration::from_secs(19 * 60)).await;
        s.token().unwrap();
        assert_eq!(s.signatures(), base, "never re-signed before 20 minutes");
        tokio::time::advance(Duration::from_secs(61)).await;
        s.token().unwrap();
        assert_eq!(s.signatures(), base + 1, "re-signed once 20 minutes passed");
        // Asked for 3 hours: clamped below 60 minutes.
        let (s, _) = signer(Duration::from_secs(3 * 3600));
        s.token().unwrap();
        let base = s.signatures();
        tokio::time::advance(Duration::from_secs(59 * 60)).await;
        s.token().unwrap();
        assert_eq!(
            s.signatures(),
            base + 1,
            "re-signed before Apple's 60-minute limit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expire_resigns_once_for_many_rejections() {
        let (s, _) = signer(MIN_REFRESH);
        let old = s.token().unwrap();
        let before = s.signatures();
        // A burst of in-flight requests all rejected with the same token.
        for _ in 0..50 {
            s.expire(&old);
            let _ = s.token().unwrap();
        }
        assert_eq!(s.signatures() - before, 1);
    }

    #[test]
    fn bad_key_fails_at_construction() {
        let err = ApnsTokenSigner::new("K", "T", b"not a key", MIN_REFRESH).unwrap_err();
        assert!(err.to_string().contains(".p8"));
    }
}
