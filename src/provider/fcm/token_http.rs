//! The HTTP client of the credential endpoints: OAuth token endpoints (`token_uri`), Google STS,
//! IAM Credentials and the GCE/GKE metadata server.
//!
//! These are not the FCM endpoint: they speak whatever their operator chose. RFC 6749 describes
//! HTTP/1.1, the metadata server speaks only HTTP/1.1 in cleartext, and proxies in front of
//! `oauth2.googleapis.com` often do too. So over TLS the client offers ALPN `h2` and `http/1.1`
//! and speaks what the server picked; a cleartext `http://` endpoint (the metadata server, or a
//! loopback stand-in) is spoken to in HTTP/1.1.
//!
//! Each request opens its own connection and closes it after the answer. A token lives about an
//! hour, so a credential makes a request or two an hour: a pool would only keep sockets that go
//! stale between refreshes (and an idle connection that a proxy dropped is one more failure mode).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::provider::h2pool::{EndpointError, client_tls_config};

/// Largest answer body read; a token response is a few hundred bytes.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A credential endpoint's answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The protocol the exchange used (HTTP/2 or HTTP/1.1).
    pub version: Version,
}

/// Sends one request per connection, HTTP/2 or HTTP/1.1 by ALPN, each within a timeout.
#[derive(Clone)]
pub struct CredentialHttp {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for CredentialHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialHttp")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl CredentialHttp {
    /// Trusts the bundled web PKI roots plus `extra_ca_pem`; every request, connection set-up
    /// included, ends within `timeout`.
    pub fn new(extra_ca_pem: Option<&str>, timeout: Duration) -> Result<Self, EndpointError> {
        let tls = client_tls_config(extra_ca_pem, &[b"h2", b"http/1.1"])?;
        Ok(Self {
            tls: Arc::new(tls),
            timeout,
        })
    }

    /// Sends `request` (an absolute `https://` or `http://` URI) and reads the whole answer.
    /// The error is a sentence for a log line or a receipt; it never holds the request body.
    pub async fn send(&self, request: Request<Bytes>) -> Result<HttpAnswer, String> {
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn exchange(&self, request: Request<Bytes>) -> Result<HttpAnswer, String> {
        let uri = request.uri().clone();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("`{uri}` is not an http(s) URL")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("`{uri}` has no host"))?
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !https {
            return exchange_on(tcp, false, request).await;
        }
        let name = ServerName::try_from(host.clone())
            .map_err(|e| format!("invalid TLS server name {host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        exchange_on(tls, h2, request).await
    }
}

/// One request on a fresh connection; `h2` says what ALPN chose.
async fn exchange_on<IO>(io: IO, h2: bool, request: Request<Bytes>) -> Result<HttpAnswer, String>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        sender
            .send_request(request.map(Full::new))
            .await
            .map_err(|e| format!("HTTP/2 request: {e}"))?
    } else {
        let request = origin_form(request)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        sender
            .send_request(request.map(Full::new))
            .await
            .map_err(|e| format!("HTTP/1.1 request: {e}"))?
    };
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    debug!(status = parts.status.as_u16(), version = ?parts.version, "credential endpoint answered");
    Ok(HttpAnswer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        version: parts.version,
    })
}

/// HTTP/1.1 sends the path on the request line and the authority in `Host` (hyper's client
/// connection writes the URI as given); the connection closes after this one exchange.
fn origin_form(mut request: Request<Bytes>) -> Result<Request<Bytes>, String> {
    let uri = request.uri().clone();
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{uri}` has no host"))?
        .as_str()
        .to_string();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    *request.uri_mut() = path
        .parse()
        .map_err(|e| format!("invalid request path `{path}`: {e}"))?;
    let host = HeaderValue::from_str(&authority).map_err(|e| format!("invalid host: {e}"))?;
    request.headers_mut().insert(HOST, host);
    request
        .headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    *request.version_mut() = Version::HTTP_11;
    Ok(request)
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749, appendix B).
pub fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// A form body from `(name, value)` pairs.
pub fn form(pairs: &[(&str, &str)]) -> Bytes {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect();
    Bytes::from(body.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes_reserved_characters() {
        assert_eq!(
            form_encode("//iam.googleapis.com/projects/1 x"),
            "%2F%2Fiam.googleapis.com%2Fprojects%2F1+x"
        );
        assert_eq!(
            form(&[("grant_type", "a:b"), ("x", "y")]),
            Bytes::from_static(b"grant_type=a%3Ab&x=y")
        );
    }

    #[test]
    fn http1_requests_use_origin_form_and_host() {
        let request = Request::builder()
            .uri("http://127.0.0.1:8080/computeMetadata/v1/x?a=b")
            .body(Bytes::new())
            .unwrap();
        let request = origin_form(request).unwrap();
        assert_eq!(request.uri().to_string(), "/computeMetadata/v1/x?a=b");
        assert_eq!(request.headers()[HOST], "127.0.0.1:8080");
    }
}
