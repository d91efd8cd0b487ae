//! TLS material for the mock providers.
//!
//! At start each mock generates a throw-away certificate authority and a leaf certificate for
//! `localhost` / `127.0.0.1` (rcgen, P-256), and builds a rustls server config with the ALPN
//! protocols it offers. Clients trust [`MockTls::ca_pem`]. Nothing is written to disk.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Errors while building the mock TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate or key generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the generated material.
    #[error("rustls config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A generated CA plus a leaf certificate for `localhost` and `127.0.0.1`.
pub struct MockTls {
    ca_pem: String,
    leaf_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for MockTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockTls").finish_non_exhaustive()
    }
}

impl MockTls {
    /// Generates fresh material and a server config offering `alpn` (e.g. `[b"h2"]`).
    pub fn generate(alpn: &[&[u8]]) -> Result<MockTls, TlsError> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pushgate mock provider CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()])?;
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;
        let leaf_pem = leaf_cert.pem();

        let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(MockTls {
            ca_pem,
            leaf_pem,
            config: Arc::new(config),
        })
    }

    /// PEM of the CA certificate that signed the server certificate: the one to trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// PEM of the server (leaf) certificate itself.
    pub fn leaf_pem(&self) -> &str {
        &self.leaf_pem
    }

    /// A TLS acceptor for the generated config.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}
