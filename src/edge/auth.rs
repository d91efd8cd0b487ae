//! API authentication: a tonic interceptor that maps `authorization: Bearer <key>` to the set of
//! apps the caller may send for and subscribe to. Handlers only ask [`Caller::may_use`].
//!
//! Keys are compared by their SHA-256 digest in constant time, so neither the lookup nor a log
//! line ever handles a key in the clear beyond the header itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::config::Config;

/// Which apps a request may use; inserted into request extensions by [`ApiKeys::intercept`].
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off (no app has API keys).
    Open,
    /// An authenticated caller limited to these apps.
    Apps(Arc<HashSet<String>>),
}

impl Caller {
    /// Whether the caller may use `app_id`.
    pub fn may_use(&self, app_id: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Apps(apps) => apps.contains(app_id),
        }
    }

    /// The caller of `request` (open when the interceptor did not run, e.g. in unit tests).
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Open)
    }
}

/// The configured API keys, by digest.
#[derive(Clone, Default)]
pub struct ApiKeys {
    by_digest: Arc<HashMap<[u8; 32], Arc<HashSet<String>>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.by_digest.len())
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// Collects every app's keys; a key listed under several apps grants all of them.
    pub fn from_config(config: &Config) -> Self {
        let mut apps_by_key: HashMap<[u8; 32], HashSet<String>> = HashMap::new();
        for (app, app_config) in &config.apps {
            for key in &app_config.api_keys {
                apps_by_key
                    .entry(digest(&key.0))
                    .or_default()
                    .insert(app.clone());
            }
        }
        Self {
            by_digest: Arc::new(
                apps_by_key
                    .into_iter()
                    .map(|(k, v)| (k, Arc::new(v)))
                    .collect(),
            ),
        }
    }

    /// True when at least one key is configured.
    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// The interceptor: rejects requests without a known key when keys are configured.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if !self.enabled() {
            request.extensions_mut().insert(Caller::Open);
            return Ok(request);
        }
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <api key>`"))?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <api key>`"))?
            .trim();
        let wanted = digest(key);
        // Constant-time comparison against every digest: no early exit on the first byte.
        let mut found = None;
        for (candidate, apps) in self.by_digest.iter() {
            let diff = candidate
                .iter()
                .zip(wanted.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(Arc::clone(apps));
            }
        }
        let apps = found.ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        request.extensions_mut().insert(Caller::Apps(apps));
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        let config = Config::from_toml(
            r#"
            [apps.shop]
            api_keys = ["shop-key-0123456789", "shared-key-0123456789"]
            [apps.shop.fcm]
            credentials_json = "{}"
            [apps.news]
            api_keys = ["shared-key-0123456789"]
            [apps.news.fcm]
            credentials_json = "{}"
            "#,
        )
        .unwrap();
        ApiKeys::from_config(&config)
    }

    fn with_auth(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", value.parse().unwrap());
        r
    }

    #[test]
    fn keys_map_to_their_apps() {
        let keys = keys();
        let caller = Caller::of(
            &keys
                .intercept(with_auth("Bearer shop-key-0123456789"))
                .unwrap(),
        );
        assert!(caller.may_use("shop"));
        assert!(!caller.may_use("news"));
        let caller = Caller::of(
            &keys
                .intercept(with_auth("Bearer shared-key-0123456789"))
                .unwrap(),
        );
        assert!(caller.may_use("shop") && caller.may_use("news"));
    }

    #[test]
    fn missing_or_unknown_keys_are_unauthenticated() {
        let keys = keys();
        for request in [
            Request::new(()),
            with_auth("Bearer nope-nope-nope-nope"),
            with_auth("Basic x"),
        ] {
            let status = keys.intercept(request).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn no_keys_means_open() {
        let keys = ApiKeys::default();
        let caller = Caller::of(&keys.intercept(Request::new(())).unwrap());
        assert!(caller.may_use("anything"));
    }

    #[test]
    fn short_keys_are_rejected_naming_the_key() {
        let err = Config::from_toml(
            "[apps.a]\napi_keys = [\"short\"]\n[apps.a.fcm]\ncredentials_json = \"{}\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("apps.a.api_keys[0]"), "{err}");
    }
}
