//! Credentials for the mocks and for the clients under test.
//!
//! [`generate_apns_key`] makes a P-256 key shaped like an Apple `.p8` auth key (PKCS#8 PEM) with a
//! 10-character key id and team id. [`generate_service_account`] makes an RSA-2048 Google
//! service-account key file (JSON) whose `token_uri` points wherever the caller says (usually
//! [`crate::fcm::MockFcm::token_uri`]). Nothing is cached on disk.

use rand::Rng;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

/// Errors while generating credentials.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// EC key generation failed.
    #[error("ec key generation: {0}")]
    Ec(#[from] rcgen::Error),
    /// RSA key generation failed.
    #[error("rsa key generation: {0}")]
    Rsa(#[from] rsa::Error),
    /// PKCS#8 / SPKI encoding failed.
    #[error("key encoding: {0}")]
    Encoding(String),
}

/// An APNs token-auth key as Apple hands it out, plus its public half for the mock.
#[derive(Clone)]
pub struct ApnsKey {
    /// The 10-character key id (JWT `kid`).
    pub key_id: String,
    /// The 10-character team id (JWT `iss`).
    pub team_id: String,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the content of an `AuthKey_<kid>.p8` file.
    pub private_p8_pem: String,
    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`) for [`crate::apns::MockApnsConfig::keys`].
    pub public_pem: String,
}

impl std::fmt::Debug for ApnsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsKey")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("private_p8_pem", &"<redacted>")
            .finish()
    }
}

/// A Google service-account key file plus the public key the mock verifies against.
#[derive(Clone)]
pub struct ServiceAccount {
    /// The key file content (`type`, `project_id`, `private_key_id`, `private_key`,
    /// `client_email`, `client_id`, `auth_uri`, `token_uri`, ...).
    pub json: String,
    /// SPKI PEM of the RSA public key, for [`crate::fcm::MockFcmConfig::public_key_pem`].
    pub public_pem: String,
    /// `client_email` from the key file (the JWT `iss`).
    pub client_email: String,
    /// `project_id` from the key file.
    pub project_id: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("project_id", &self.project_id)
            .field("json", &"<redacted>")
            .finish()
    }
}

const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

fn random_id(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char)
        .collect()
}

/// Generates a fresh APNs P-256 auth key with random 10-character key and team ids.
///
/// # Panics
/// Only if the system RNG or the key encoder fails; see [`try_generate_apns_key`].
pub fn generate_apns_key() -> ApnsKey {
    try_generate_apns_key().expect("P-256 key generation failed")
}

/// Fallible form of [`generate_apns_key`].
pub fn try_generate_apns_key() -> Result<ApnsKey, KeyError> {
    let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    Ok(ApnsKey {
        key_id: random_id(10),
        team_id: random_id(10),
        private_p8_pem: kp.serialize_pem(),
        public_pem: kp.public_key_pem(),
    })
}

/// Generates an RSA-2048 service account for `project_id` whose key file names `token_uri`.
///
/// RSA generation takes from a fraction of a second to a few seconds in debug builds; callers
/// that need several mocks should generate once and share.
///
/// # Panics
/// Only if the system RNG or the key encoder fails; see [`try_generate_service_account`].
pub fn generate_service_account(project_id: &str, token_uri: &str) -> ServiceAccount {
    try_generate_service_account(project_id, token_uri).expect("RSA key generation failed")
}

/// Fallible form of [`generate_service_account`].
pub fn try_generate_service_account(
    project_id: &str,
    token_uri: &str,
) -> Result<ServiceAccount, KeyError> {
    let mut rng = rsa::rand_core::OsRng;
    let private = rsa::RsaPrivateKey::new(&mut rng, 2048)?;
    let private_pem = private
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encoding(e.to_string()))?
        .to_string();
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encoding(e.to_string()))?;
    let client_email = format!("pushgate-mock@{project_id}.iam.gserviceaccount.com");
    let mut key_id_bytes = [0u8; 20];
    rand::rng().fill(&mut key_id_bytes[..]);
    let private_key_id: String = key_id_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let client_id: String = (0..21)
        .map(|_| char::from(b'0' + rand::rng().random_range(0..10u8)))
        .collect();
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": private_key_id,
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": format!(
            "https://www.googleapis.com/robot/v1/metadata/x509/{}",
            client_email.replace('@', "%40")
        ),
        "universe_domain": "googleapis.com"
    });
    Ok(ServiceAccount {
        json: serde_json::to_string_pretty(&json).map_err(|e| KeyError::Encoding(e.to_string()))?,
        public_pem,
        client_email,
        project_id: project_id.to_string(),
    })
}
