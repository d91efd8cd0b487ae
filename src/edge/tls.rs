//! TLS on the gRPC listener and the HTTP/JSON listener (rustls, ring): the server certificate,
//! and with `client_ca_file` mutual TLS (a client without a certificate signed by that CA fails
//! the handshake). Both listeners share one set of files, so one rule holds on both doors; they
//! differ only in ALPN (`h2` for gRPC, `http/1.1` for the HTTP API). The certificate files are
//! re-read on reload (SIGHUP): connections accepted afterwards, on either listener, use the new
//! ones, open connections keep theirs.
//!
//! Handshakes run in their own tasks, each within [`HANDSHAKE_TIMEOUT`] and at most
//! [`MAX_PENDING_HANDSHAKES`] at once, so a client that connects and stays silent holds up
//! neither the accept loop nor anyone else's handshake.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{ConfigError, TlsConfig};

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, at most; further connections wait to be accepted.
pub const MAX_PENDING_HANDSHAKES: usize = 1_024;

/// The listeners' TLS settings in effect; cheap to clone, and every clone sees a reload.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Current>>,
    mutual: bool,
}

/// One configuration per listener, made from the same files at once.
struct Current {
    grpc: Arc<rustls::ServerConfig>,
    http: Arc<rustls::ServerConfig>,
}

impl Current {
    fn new(grpc: rustls::ServerConfig) -> Self {
        let mut http = grpc.clone();
        // axum serves HTTP/1.1 only; a client offering h2 alone fails the handshake instead of
        // speaking a protocol the server would not understand.
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            grpc: Arc::new(grpc),
            http: Arc::new(http),
        }
    }
}

/// Which listener a connection arrives on.
#[derive(Clone, Copy)]
enum Door {
    Grpc,
    Http,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

/// A rustls server config from `[tls]`; errors name the key whose file is at fault.
pub fn server_config(settings: &TlsConfig) -> Result<rustls::ServerConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
    };
    let certs = |key: &str, path: &std::path::Path| {
        let pem = read(key, path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::invalid(key, format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(ConfigError::invalid(key, "no certificate in the file"));
        }
        Ok(certs)
    };
    let chain = certs("tls.cert_file", &settings.cert_file)?;
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key_file", &settings.key_file)?)
        .map_err(|e| ConfigError::invalid("tls.key_file", format!("no PEM private key: {e}")))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("tls", e.to_string()))?;
    let builder = match &settings.client_ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certs("tls.client_ca_file", path)? {
                roots
                    .add(ca)
                    .map_err(|e| ConfigError::invalid("tls.client_ca_file", e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| ConfigError::invalid("tls.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        ConfigError::invalid("tls.key_file", format!("does not fit tls.cert_file: {e}"))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl ServerTls {
    /// Reads the files of `[tls]`.
    pub fn load(settings: &TlsConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            current: Arc::new(RwLock::new(Current::new(server_config(settings)?))),
            mutual: settings.client_ca_file.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// Makes `config` the one new connections get (after a reload has read the files).
    pub fn replace(&self, config: rustls::ServerConfig) {
        *self.current.write() = Current::new(config);
    }

    /// The gRPC listener's connections (ALPN `h2`): accepts connections on `listener` and
    /// yields them once their TLS handshake is done, until `stop` fires. Failed handshakes are
    /// logged at debug level and dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        self.accept(listener, stop, Door::Grpc)
    }

    /// The HTTP/JSON listener's connections, as [`ServerTls::incoming`] but with ALPN
    /// `http/1.1`.
    pub fn incoming_http(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        self.accept(listener, stop, Door::Http)
    }

    fn accept(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
        door: Door,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let name = match door {
            Door::Grpc => "gRPC",
            Door::Http => "HTTP",
        };
        let (tx, rx) = mpsc::channel(64);
        let current = Arc::clone(&self.current);
        let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&pending).acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, listener = name, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // See `app::start`: Nagle delays receipts trickling back to callers.
                let _ = stream.set_nodelay(true);
                let config = match door {
                    Door::Grpc => Arc::clone(&current.read().grpc),
                    Door::Http => Arc::clone(&current.read().http),
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(error)) => {
                            debug!(%peer, %error, listener = name, "TLS handshake failed")
                        }
                        Err(_) => debug!(%peer, listener = name, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}
