//! A raw HTTP/2 client for driving the mocks in tests (TLS with the mock's CA, or cleartext).
#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Request, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

pub struct Client {
    pub send: SendRequest<Bytes>,
    pub conn: tokio::task::JoinHandle<Result<(), h2::Error>>,
    pub authority: String,
    pub scheme: &'static str,
}

pub async fn connect(url: &str, ca_pem: Option<&str>) -> Client {
    let (scheme, authority) = url.split_once("://").unwrap();
    let tcp = TcpStream::connect(authority).await.unwrap();
    let (send, conn) = match ca_pem {
        None => {
            let (send, conn) = h2::client::handshake(tcp).await.unwrap();
            (send, tokio::spawn(conn))
        }
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
            let tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (send, conn) = h2::client::handshake(tls).await.unwrap();
            (send, tokio::spawn(conn))
        }
    };
    Client {
        send,
        conn,
        authority: authority.to_string(),
        scheme: if scheme == "https" { "https" } else { "http" },
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl Client {
    /// A request builder with `:scheme`/`:authority` filled in.
    pub fn req(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}://{}{}", self.scheme, self.authority, path))
    }

    /// Sends and collects the response; Err is the stream-level error (e.g. RST_STREAM).
    pub async fn send(&mut self, req: Request<()>, body: &[u8]) -> Result<Resp, h2::Error> {
        send_on(self.send.clone(), req, Bytes::copy_from_slice(body)).await
    }
}

pub async fn send_on(
    send: SendRequest<Bytes>,
    req: Request<()>,
    body: Bytes,
) -> Result<Resp, h2::Error> {
    let mut send = send.ready().await?;
    let end = body.is_empty();
    let (resp, mut stream) = send.send_request(req, end)?;
    if !end {
        stream.send_data(body, true)?;
    }
    let resp = resp.await?;
    let (parts, mut recv) = resp.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(out),
    })
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
