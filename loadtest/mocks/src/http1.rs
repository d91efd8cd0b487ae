//! HTTP/1.1 serving for the mocks: the FCM mock's token endpoint (Google's speaks both HTTP/1.1
//! and HTTP/2) and the Google credential stand-ins, which speak only HTTP/1.1 as the metadata
//! server and many OAuth endpoints do.
//!
//! A handler answers a whole request at once ([`Http1Request`] in, [`Http1Response`] out); bodies
//! are small (forms and JSON), read up to [`MAX_BODY`].

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::tls::MockTls;

/// Largest request body read.
pub const MAX_BODY: usize = 256 * 1024;

/// A whole HTTP/1.1 request.
#[derive(Debug, Clone)]
pub struct Http1Request {
    pub method: http::Method,
    /// Path and query, as sent.
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Http1Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A whole HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Http1Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Http1Response {
    /// A response with a content type.
    pub fn new(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Answers requests.
pub type Http1Handler = Arc<dyn Fn(Http1Request) -> Http1Response + Send + Sync>;

/// Serves HTTP/1.1 on one connection until the client closes it.
pub(crate) async fn serve_conn<IO>(io: IO, handler: Http1Handler)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let handler = Arc::clone(&handler);
        async move {
            let (parts, body) = request.into_parts();
            let body = match Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return Ok::<_, Infallible>(to_hyper(Http1Response::new(
                        413,
                        "text/plain",
                        "request body too large\n",
                    )));
                }
            };
            let request = Http1Request {
                method: parts.method,
                target: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into()),
                headers: parts.headers,
                body,
            };
            Ok(to_hyper(handler(request)))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn to_hyper(response: Http1Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder().status(response.status);
    for (name, value) in &response.headers {
        builder = builder.header(*name, value.as_str());
    }
    builder
        .body(Full::new(response.body.clone()))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(response.body)))
}

/// A running HTTP/1.1-only listener. Dropping it stops accepting.
pub(crate) struct Http1Running {
    pub addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Http1Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` over HTTP/1.1 only on `listener` (TLS offering ALPN `http/1.1` alone when
/// `tls` is set).
pub(crate) fn spawn(
    listener: TcpListener,
    tls: Option<Arc<MockTls>>,
    handler: Http1Handler,
) -> std::io::Result<Http1Running> {
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    let handler = Arc::clone(&handler);
                    let tls = tls.clone();
                    conns.spawn(async move {
                        match tls {
                            None => serve_conn(tcp, handler).await,
                            Some(tls) => {
                                if let Ok(stream) = tls.acceptor().accept(tcp).await {
                                    serve_conn(stream, handler).await;
                                }
                            }
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = stopped.changed() => break,
            }
        }
        conns.abort_all();
    });
    Ok(Http1Running {
        addr,
        _stop: stop,
        task,
    })
}
