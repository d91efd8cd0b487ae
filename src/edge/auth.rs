//! API authentication and authorization. An interceptor maps `authorization: Bearer <key>` to
//! a [`Caller`]: the apps the key may use and with which [`Scope`]. Handlers then ask
//! [`Caller::authorize`] for the request's app *before* looking the app up, and answer "not
//! yours" and "no such app" alike ([`forbidden`]), so a caller learns nothing of other tenants.
//!
//! Keys are configured in the clear or as `sha256:<hex>` digests; either way only digests are
//! kept, and a presented key is hashed and compared against every digest in constant time. The
//! table is swapped whole on reload (SIGHUP), so a request sees the old keys or the new ones.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use super::quota::KeyId;
use crate::config::{Config, ConfigError};

/// What a key may do for an app. `Admin` includes `Send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Send batches and read the app's receipts (`apps.<id>.api_keys`).
    Send,
    /// Also manage the app's dead letters (`apps.<id>.admin_keys`).
    Admin,
}

/// Who is calling; inserted into request extensions by [`ApiKeys::intercept`].
#[derive(Debug, Clone)]
pub enum Caller {
    /// No key is configured anywhere: every app may be used for sending and receipts; admin
    /// RPCs only when `allow_unauthenticated = true`.
    Open { admin: bool },
    /// An authenticated key (by digest, for per-key limits), with its scope per app.
    Key(Grants, KeyId),
    /// The interceptor did not run: nothing is allowed.
    Nobody,
}

/// The one answer to "this app is not yours" and "this app does not exist".
pub fn forbidden() -> Status {
    Status::permission_denied("app_id: this caller may not use this app (or there is no such app)")
}

impl Caller {
    /// Whether the caller may act with `scope` for `app_id`. Says nothing about whether the app
    /// exists: callers check that next and answer [`forbidden`] when it does not.
    #[allow(clippy::result_large_err)] // tonic::Status
    pub fn authorize(&self, app_id: &str, scope: Scope) -> Result<(), Status> {
        match self {
            Caller::Open { .. } if scope == Scope::Send => Ok(()),
            Caller::Open { admin: true } => Ok(()),
            Caller::Open { admin: false } => Err(Status::permission_denied(
                "admin RPCs need an admin key (apps.<id>.admin_keys); with no key configured \
                 they are served only with allow_unauthenticated = true",
            )),
            Caller::Key(grants, _) => match grants.get(app_id) {
                Some(granted) if *granted >= scope => Ok(()),
                _ => Err(forbidden()),
            },
            Caller::Nobody => Err(Status::unauthenticated("no credentials checked")),
        }
    }

    /// Who per-key ingress limits count this caller as (`None`: nobody, refused anyway).
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            Caller::Open { .. } => Some(KeyId::Open),
            Caller::Key(_, id) => Some(*id),
            Caller::Nobody => None,
        }
    }

    /// The caller of `request` ([`Caller::Nobody`] when the interceptor did not run).
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Nobody)
    }
}

/// What one key grants: its scope per app.
type Grants = Arc<HashMap<String, Scope>>;

/// The key table in effect.
#[derive(Default)]
struct KeyTable {
    /// Digest of each key and what it grants.
    keys: Vec<([u8; 32], Grants)>,
    allow_unauthenticated: bool,
}

/// The configured API keys, by digest; cheap to clone, and every clone sees a reload.
#[derive(Clone, Default)]
pub struct ApiKeys {
    table: Arc<RwLock<Arc<KeyTable>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.table.read().keys.len())
            .finish()
    }
}

fn table_of(config: &Config) -> Result<KeyTable, ConfigError> {
    let mut grants: HashMap<[u8; 32], HashMap<String, Scope>> = HashMap::new();
    for (app, app_config) in &config.apps {
        for (list, keys, scope) in [
            ("api_keys", &app_config.api_keys, Scope::Send),
            ("admin_keys", &app_config.admin_keys, Scope::Admin),
        ] {
            for (i, key) in keys.iter().enumerate() {
                let digest = key.digest().map_err(|reason| {
                    ConfigError::invalid(format!("apps.{app}.{list}[{i}]"), reason)
                })?;
                let granted = grants.entry(digest).or_default().entry(app.clone());
                let granted = granted.or_insert(scope);
                *granted = (*granted).max(scope);
            }
        }
    }
    Ok(KeyTable {
        keys: grants
            .into_iter()
            .map(|(digest, apps)| (digest, Arc::new(apps)))
            .collect(),
        allow_unauthenticated: config.allow_unauthenticated,
    })
}

impl ApiKeys {
    /// Collects every app's keys; a key listed under several apps grants each of them, with
    /// the widest scope it is listed with.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            table: Arc::new(RwLock::new(Arc::new(table_of(config)?))),
        })
    }

    /// Replaces the keys with `config`'s, for every clone at once (SIGHUP). Returns how many
    /// distinct keys are now in effect; on error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<usize, ConfigError> {
        let table = table_of(config)?;
        let count = table.keys.len();
        *self.table.write() = Arc::new(table);
        Ok(count)
    }

    /// True when at least one key is configured.
    pub fn enabled(&self) -> bool {
        !self.table.read().keys.is_empty()
    }

    /// The interceptor: rejects requests without a known key when keys are configured.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let table = Arc::clone(&self.table.read());
        if table.keys.is_empty() {
            request.extensions_mut().insert(Caller::Open {
                admin: table.allow_unauthenticated,
            });
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
        let wanted: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Constant-time comparison against every digest: no early exit on a byte or a match.
        let mut found = None;
        for (candidate, grants) in &table.keys {
            let diff = candidate
                .iter()
                .zip(wanted.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(Arc::clone(grants));
            }
        }
        let grants = found.ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        request
            .extensions_mut()
            .insert(Caller::Key(grants, KeyId::Key(wanted)));
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sha256:` of "news-admin-key-0123456789".
    fn news_admin_digest() -> String {
        let d: [u8; 32] = Sha256::digest(b"news-admin-key-0123456789").into();
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    fn config() -> Config {
        Config::from_toml(&format!(
            r#"
            [apps.shop]
            api_keys = ["shop-key-0123456789", "shared-key-0123456789"]
            [apps.shop.fcm]
            credentials_json = "{{}}"
            [apps.news]
            api_keys = ["shared-key-0123456789"]
            admin_keys = ["{}"]
            [apps.news.fcm]
            credentials_json = "{{}}"
            "#,
            news_admin_digest()
        ))
        .unwrap()
    }

    fn keys() -> ApiKeys {
        ApiKeys::from_config(&config()).unwrap()
    }

    fn with_auth(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", value.parse().unwrap());
        r
    }

    fn caller(keys: &ApiKeys, key: &str) -> Caller {
        Caller::of(&keys.intercept(with_auth(&format!("Bearer {key}"))).unwrap())
    }

    #[test]
    fn keys_map_to_their_apps_and_scopes() {
        let keys = keys();
        let shop = caller(&keys, "shop-key-0123456789");
        assert!(shop.authorize("shop", Scope::Send).is_ok());
        assert_eq!(
            shop.authorize("news", Scope::Send).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            shop.authorize("shop", Scope::Admin).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let shared = caller(&keys, "shared-key-0123456789");
        assert!(shared.authorize("shop", Scope::Send).is_ok());
        assert!(shared.authorize("news", Scope::Send).is_ok());
        // A digest-configured admin key: admin and send on its app, nothing elsewhere.
        let admin = caller(&keys, "news-admin-key-0123456789");
        assert!(admin.authorize("news", Scope::Admin).is_ok());
        assert!(admin.authorize("news", Scope::Send).is_ok());
        assert!(admin.authorize("shop", Scope::Send).is_err());
        // The digest itself is not a key.
        assert!(
            keys.intercept(with_auth(&format!("Bearer {}", news_admin_digest())))
                .is_err()
        );
    }

    #[test]
    fn not_yours_and_unknown_get_one_answer() {
        let keys = keys();
        let shop = caller(&keys, "shop-key-0123456789");
        let other = shop.authorize("news", Scope::Send).unwrap_err();
        let unknown = shop.authorize("does-not-exist", Scope::Send).unwrap_err();
        assert_eq!(other.code(), unknown.code());
        assert_eq!(other.message(), unknown.message());
        assert!(!other.message().contains("news"));
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
    fn no_keys_means_open_for_sending_but_not_admin() {
        let keys = ApiKeys::default();
        let caller = Caller::of(&keys.intercept(Request::new(())).unwrap());
        assert!(caller.authorize("anything", Scope::Send).is_ok());
        assert!(caller.authorize("anything", Scope::Admin).is_err());
        let open = Config::from_toml(
            "allow_unauthenticated = true\n[apps.a]\n[apps.a.fcm]\ncredentials_json = \"{}\"",
        )
        .unwrap();
        let keys = ApiKeys::from_config(&open).unwrap();
        let caller = Caller::of(&keys.intercept(Request::new(())).unwrap());
        assert!(caller.authorize("a", Scope::Admin).is_ok());
        assert!(
            Caller::Nobody.authorize("a", Scope::Send).is_err(),
            "no interceptor, no access"
        );
    }

    #[test]
    fn reload_swaps_the_keys_for_every_clone() {
        let keys = keys();
        let clone = keys.clone();
        let fewer = Config::from_toml(
            "[apps.shop]\napi_keys = [\"shop-key-rotated-0123\"]\n[apps.shop.fcm]\ncredentials_json = \"{}\"",
        )
        .unwrap();
        assert_eq!(keys.reload(&fewer).unwrap(), 1);
        assert!(
            clone
                .intercept(with_auth("Bearer shop-key-0123456789"))
                .is_err()
        );
        assert!(
            caller(&clone, "shop-key-rotated-0123")
                .authorize("shop", Scope::Send)
                .is_ok()
        );
    }

    #[test]
    fn bad_keys_are_rejected_naming_the_key() {
        for (keys, field) in [
            ("api_keys = [\"short\"]", "apps.a.api_keys[0]"),
            ("admin_keys = [\"sha256:abc\"]", "apps.a.admin_keys[0]"),
            (
                "api_keys = [\"ok-key-0123456789abc\", \"sha256:zz00000000000000000000000000000000000000000000000000000000000000\"]",
                "apps.a.api_keys[1]",
            ),
        ] {
            let err = Config::from_toml(&format!(
                "[apps.a]\n{keys}\n[apps.a.fcm]\ncredentials_json = \"{{}}\""
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(field), "{err}");
            assert!(!err.contains("zz000"), "the value is not quoted: {err}");
        }
    }
}
