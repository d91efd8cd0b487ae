//! A pool of long-lived HTTP/2 connections to one provider endpoint.
//!
//! The pool keeps `connections` connections open for its whole life: each such slot has a
//! supervisor task that connects, drives the connection, sends PING keep-alives, and reconnects
//! with exponential backoff when the connection ends (GOAWAY, reset, I/O error). Requests go to
//! the least loaded live connection; `h2` itself holds a request back until the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS allows another stream, so the pool honours that limit as the
//! server changes it. When no connection is live the pool waits briefly for one, then fails fast
//! instead of queueing forever.
//!
//! Demand opens more, up to `max_connections`: when the least loaded connection is three
//! quarters full of the streams its server allows, one more connection is opened (one at a
//! time, so a burst does not open them all at once; Apple treats connection churn as abuse).
//! Such an extra connection closes again once the others could carry the traffic for
//! `idle_timeout`: it first stops taking requests, then closes when its last one is answered.
//!
//! `https://` endpoints use TLS (rustls, ALPN `h2`); `http://` means cleartext HTTP/2 with prior
//! knowledge, meant only for local mock servers.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderMap, Request, StatusCode};
use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Where a pool connects, parsed and validated at start.
#[derive(Clone)]
pub struct Endpoint {
    /// `https` or `http`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// Invalid endpoint configuration.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid URL `{0}`: {1}")]
    Url(String, String),
    #[error("unsupported scheme in `{0}`: use https:// (or http:// for a local mock)")]
    Scheme(String),
    #[error("invalid CA certificate PEM: {0}")]
    Ca(String),
}

impl Endpoint {
    /// Parses `https://host[:port]` or `http://host[:port]`; `extra_ca_pem` adds trusted roots
    /// (for TLS mock servers) to the bundled web PKI roots.
    pub fn parse(url: &str, extra_ca_pem: Option<&str>) -> Result<Self, EndpointError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| EndpointError::Url(url.into(), e.to_string()))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| EndpointError::Scheme(url.into()))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| EndpointError::Url(url.into(), "missing host".into()))?;
        let tls = match scheme.as_str() {
            "https" => Some(Arc::new(client_tls_config(extra_ca_pem, &[b"h2"])?)),
            "http" => None,
            _ => return Err(EndpointError::Scheme(url.into())),
        };
        let host = authority.host().trim_matches(['[', ']']).to_string();
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(Self {
            scheme,
            authority,
            host,
            port,
            tls,
        })
    }
}

/// The client TLS settings of every outbound connection: the bundled web PKI roots plus
/// `extra_ca_pem`, offering the `alpn` protocols.
pub(crate) fn client_tls_config(
    extra_ca_pem: Option<&str>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, EndpointError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| EndpointError::Ca(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| EndpointError::Ca(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(EndpointError::Ca("no certificate found".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EndpointError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Tuning of one pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Log label, e.g. `apns:TEAMID:KEYID:production`.
    pub name: String,
    /// Connections kept open for the life of the pool.
    pub connections: usize,
    /// Most connections open at once when demand needs more (at least `connections`).
    pub max_connections: usize,
    /// An extra connection the others could do without for this long is closed.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// PING interval on a connection; a PING unanswered within `request_timeout` closes it.
    pub ping_interval: Duration,
    pub reconnect_base: Duration,
    pub reconnect_cap: Duration,
    /// Streams assumed before the server's SETTINGS arrive (APNs token connections start at 1).
    pub initial_max_streams: usize,
    /// Send one request at a time on a new connection until one succeeds (2xx). APNs allows a
    /// token-authenticated connection a single stream until it has seen a valid token.
    pub single_stream_until_success: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            name: "pool".into(),
            connections: 2,
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            ping_interval: Duration::from_secs(60),
            reconnect_base: Duration::from_millis(100),
            reconnect_cap: Duration::from_secs(30),
            initial_max_streams: 1,
            single_stream_until_success: false,
        }
    }
}

/// A complete HTTP/2 response.
#[derive(Debug)]
pub struct H2Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From the request leaving on its stream to the end of its answer: the provider's round
    /// trip, without the time spent waiting for a connection or a stream.
    pub round_trip: Duration,
}

/// Why a request got no response. Every variant is transient from the message's point of view.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("no healthy connection to {endpoint}: {last_error}")]
    NoConnection {
        endpoint: String,
        last_error: String,
    },
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("stream refused by the server (REFUSED_STREAM)")]
    Refused,
    #[error("connection closed: {0}")]
    ConnectionLost(String),
    #[error("HTTP/2 error: {0}")]
    Protocol(String),
}

impl TransportError {
    /// True when the server certainly did not process the request, so re-sending it at once on
    /// another stream cannot duplicate it.
    pub fn is_unprocessed(&self) -> bool {
        matches!(
            self,
            TransportError::Refused | TransportError::NoConnection { .. }
        )
    }
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    in_flight: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// Set once a request on this connection succeeded; until then `warmup` admits one at a time.
    warmed: AtomicBool,
    warmup: tokio::sync::Semaphore,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS as last read from h2. Reading it from h2
    /// takes the connection's stream lock, which the connection task holds while it works:
    /// read there once per finished request, not once per connection for every pick.
    max_streams: AtomicUsize,
}

struct Slot {
    conn: RwLock<Option<Arc<Conn>>>,
    /// A supervisor runs for this slot.
    running: AtomicBool,
}

struct Shared {
    endpoint: Endpoint,
    config: PoolConfig,
    slots: Vec<Slot>,
    /// The connections the slots hold now, republished whenever a slot's connection changes:
    /// a pick walks these few instead of locking every slot (FCM pools have 250).
    open: RwLock<Arc<[Arc<Conn>]>>,
    /// Signalled whenever a slot gets a fresh connection.
    connected: Notify,
    last_error: RwLock<String>,
    started: AtomicBool,
    next_conn_id: AtomicU64,
    connects: AtomicU64,
    /// Connections the server ended (GOAWAY, or an orderly close).
    goaways: AtomicU64,
    /// Connections re-established by a slot's supervisor after the previous one was lost.
    reconnects: AtomicU64,
    /// An extra connection is being opened (at most one at a time).
    growing: AtomicBool,
    /// An extra connection is being retired (at most one at a time).
    retiring: AtomicBool,
    /// The largest SETTINGS_MAX_CONCURRENT_STREAMS any connection was given.
    max_streams_seen: AtomicUsize,
    cancel: CancellationToken,
}

/// A pool of HTTP/2 connections to one endpoint. Cheap to share behind an `Arc`; dropping the
/// last handle stops the supervisors and closes the connections.
pub struct H2Pool {
    shared: Arc<Shared>,
}

impl Drop for H2Pool {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl H2Pool {
    /// Creates the pool; connections are opened lazily on the first request.
    pub fn new(endpoint: Endpoint, config: PoolConfig) -> Self {
        let slots = (0..config.max_connections.max(config.connections).max(1))
            .map(|_| Slot {
                conn: RwLock::new(None),
                running: AtomicBool::new(false),
            })
            .collect();
        let initial_streams = config.initial_max_streams.max(1);
        Self {
            shared: Arc::new(Shared {
                endpoint,
                config,
                slots,
                open: RwLock::new(Arc::from(Vec::new())),
                connected: Notify::new(),
                last_error: RwLock::new("not connected yet".into()),
                started: AtomicBool::new(false),
                next_conn_id: AtomicU64::new(1),
                connects: AtomicU64::new(0),
                goaways: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
                growing: AtomicBool::new(false),
                retiring: AtomicBool::new(false),
                max_streams_seen: AtomicUsize::new(initial_streams),
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// The endpoint's authority, for the `:authority` pseudo-header.
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// Connections established so far (reconnects included).
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// Connections the server ended with a GOAWAY (or an orderly close).
    pub fn goaways(&self) -> u64 {
        self.shared.goaways.load(Ordering::Relaxed)
    }

    /// Connections re-established after one was lost.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// The pool's name (metrics and logs).
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// Requests currently waiting for a response, over all connections.
    pub fn in_flight(&self) -> usize {
        self.shared
            .opened()
            .iter()
            .map(|c| c.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.live().count()
    }

    /// What the open connections carry, and what the pool could carry at most.
    pub fn capacity(&self) -> super::Capacity {
        let open = self.shared.live().map(|c| c.capacity()).sum();
        let most = self.shared.max_streams_seen.load(Ordering::Relaxed) * self.shared.slots.len();
        super::Capacity { open, most }
    }

    fn ensure_started(&self) {
        if self.shared.started.swap(true, Ordering::AcqRel) {
            return;
        }
        for index in 0..self.shared.config.connections.max(1) {
            self.shared.slots[index]
                .running
                .store(true, Ordering::Release);
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move { supervise(shared, index).await });
        }
    }

    /// Opens one more connection, unless one is already being opened or all slots run.
    fn grow(&self) {
        let shared = &self.shared;
        if shared.growing.swap(true, Ordering::AcqRel) {
            return;
        }
        let free = shared
            .slots
            .iter()
            .position(|slot| !slot.running.swap(true, Ordering::AcqRel));
        match free {
            Some(index) => {
                debug!(pool = %shared.config.name, slot = index, "opening another connection for demand");
                let shared = Arc::clone(shared);
                tokio::spawn(async move { supervise_extra(shared, index).await });
            }
            None => shared.growing.store(false, Ordering::Release),
        }
    }

    /// Sends one request with a complete body and reads the complete response, within the
    /// pool's request timeout. A stream refused before processing is re-sent once on another
    /// connection.
    pub async fn send(
        &self,
        request: Request<()>,
        body: Bytes,
    ) -> Result<H2Response, TransportError> {
        self.send_with(|| clone_request(&request), body).await
    }

    /// As [`H2Pool::send`], with the request built by `request` for each try: h2 consumes the
    /// request it sends, and building it again only when a try is refused is cheaper than
    /// copying it before every try.
    pub async fn send_with(
        &self,
        request: impl Fn() -> Request<()>,
        body: Bytes,
    ) -> Result<H2Response, TransportError> {
        self.ensure_started();
        let timeout = self.shared.config.request_timeout;
        let attempt = async {
            let mut last = None;
            for _ in 0..3 {
                let conn = self.pick().await?;
                let mut warmup = None;
                if !conn.warmed.load(Ordering::Acquire) {
                    let permit = conn.warmup.acquire().await.ok();
                    // Another request may have warmed the connection while this one waited.
                    if !conn.warmed.load(Ordering::Acquire) {
                        warmup = permit;
                    }
                }
                let result = send_on(&conn, request(), body.clone()).await;
                if let Ok(response) = &result
                    && response.status.is_success()
                {
                    conn.warmed.store(true, Ordering::Release);
                }
                drop(warmup);
                match result {
                    Ok(response) => return Ok(response),
                    Err(e) if e.is_unprocessed() => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(last.unwrap_or(TransportError::Refused))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout(timeout)),
        }
    }

    /// The least loaded live connection, waiting up to the connect timeout for one to come up.
    async fn pick(&self) -> Result<Arc<Conn>, TransportError> {
        let deadline = tokio::time::Instant::now() + self.shared.config.connect_timeout;
        loop {
            let notified = self.shared.connected.notified();
            if let Some(conn) = self.least_loaded() {
                // Three quarters full at the least loaded: the pool needs another connection.
                if conn.in_flight.load(Ordering::Relaxed) * 4 >= conn.capacity() * 3 {
                    self.grow();
                }
                return Ok(conn);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(TransportError::NoConnection {
                    endpoint: format!("{:?}", self.shared.endpoint),
                    last_error: self.shared.last_error.read().clone(),
                });
            }
        }
    }

    fn least_loaded(&self) -> Option<Arc<Conn>> {
        let mut best: Option<(usize, Arc<Conn>)> = None;
        for conn in self.shared.live() {
            // Load relative to what the server lets this connection carry.
            let capacity = conn.capacity();
            if capacity > self.shared.max_streams_seen.load(Ordering::Relaxed) {
                self.shared
                    .max_streams_seen
                    .fetch_max(capacity, Ordering::Relaxed);
            }
            let load = conn.in_flight.load(Ordering::Relaxed) * 1024 / capacity;
            if best.as_ref().is_none_or(|(l, _)| load < *l) {
                best = Some((load, conn));
            }
        }
        best.map(|(_, c)| c)
    }
}

impl Shared {
    /// The connections the slots hold (some may be closing).
    fn opened(&self) -> Arc<[Arc<Conn>]> {
        Arc::clone(&self.open.read())
    }

    /// The connections that take requests now.
    fn live(&self) -> impl Iterator<Item = Arc<Conn>> {
        let opened = self.opened();
        (0..opened.len())
            .map(move |i| Arc::clone(&opened[i]))
            .filter(|c| !c.closed.load(Ordering::Acquire))
    }

    /// Puts `conn` in slot `index` (or empties the slot when `conn` is `None` and the slot
    /// still holds connection `id`) and republishes the open connections.
    fn set_slot(&self, index: usize, conn: Option<Arc<Conn>>, id: u64) {
        let mut open = self.open.write();
        {
            let mut slot = self.slots[index].conn.write();
            match conn {
                Some(conn) => *slot = Some(conn),
                None if slot.as_ref().is_some_and(|c| c.id == id) => *slot = None,
                None => {}
            }
        }
        *open = self
            .slots
            .iter()
            .filter_map(|slot| slot.conn.read().clone())
            .collect();
    }
}

impl Conn {
    /// Streams the server lets this connection carry now (one while it warms up).
    fn capacity(&self) -> usize {
        if self.warmed.load(Ordering::Acquire) {
            self.max_streams.load(Ordering::Relaxed).max(1)
        } else {
            1
        }
    }

    /// Reads the server's current stream limit from h2 (it changes with SETTINGS frames).
    fn refresh_max_streams(&self) {
        self.max_streams
            .store(self.send.current_max_send_streams(), Ordering::Relaxed);
    }
}

fn clone_request(request: &Request<()>) -> Request<()> {
    let mut builder = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version());
    if let Some(headers) = builder.headers_mut() {
        headers.clone_from(request.headers());
    }
    // Cannot fail: every part was taken from a valid request.
    builder.body(()).unwrap_or_default()
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn send_on(
    conn: &Conn,
    request: Request<()>,
    body: Bytes,
) -> Result<H2Response, TransportError> {
    conn.in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlightGuard(Arc::clone(&conn.in_flight));
    // A connection being retired takes no new request (see `retire`): another one will.
    if conn.closed.load(Ordering::SeqCst) {
        return Err(TransportError::Refused);
    }
    let mut send = conn
        .send
        .clone()
        .ready()
        .await
        .map_err(|e| map_h2(e, conn))?;
    let end_of_stream = body.is_empty();
    let sent_at = tokio::time::Instant::now();
    let (response, mut stream) = send
        .send_request(request, end_of_stream)
        .map_err(|e| map_h2(e, conn))?;
    if !end_of_stream {
        stream.send_data(body, true).map_err(|e| map_h2(e, conn))?;
    }
    let response = response.await.map_err(|e| map_h2(e, conn))?;
    conn.refresh_max_streams();
    let (parts, mut recv) = response.into_parts();
    // Responses are small and usually one DATA frame: keep that frame as it is, and copy only
    // when there are more.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| map_h2(e, conn))?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        match &first {
            None => first = Some(chunk),
            Some(head) => {
                if rest.is_empty() {
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    let body = if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    };
    Ok(H2Response {
        status: parts.status,
        headers: parts.headers,
        body,
        round_trip: sent_at.elapsed(),
    })
}

fn map_h2(error: h2::Error, conn: &Conn) -> TransportError {
    if error.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return TransportError::Refused;
    }
    if error.is_go_away() || error.is_io() {
        conn.closed.store(true, Ordering::Release);
        // A GOAWAY's last-stream-id tells h2 which streams were never processed; h2 fails those
        // with the GOAWAY error. Streams the server did process complete normally.
        if error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR) {
            return TransportError::Refused;
        }
        return TransportError::ConnectionLost(error.to_string());
    }
    TransportError::Protocol(error.to_string())
}

/// Keeps slot `index` connected for the life of the pool.
async fn supervise(shared: Arc<Shared>, index: usize) {
    let mut failures: u32 = 0;
    let mut reconnect = false;
    loop {
        if shared.cancel.is_cancelled() {
            return;
        }
        let served = serve_slot(&shared, index, false, reconnect).await;
        reconnect = true;
        match served {
            Ok(Served::Cancelled | Served::Retired) => return,
            Ok(Served::Ended { reason, lived }) => {
                *shared.last_error.write() = reason;
                // A connection that lived a while resets the backoff; one that dies at once does not.
                if lived > Duration::from_secs(10) {
                    failures = 0;
                }
            }
            Err(error) => {
                warn!(pool = %shared.config.name, %error, "connect failed");
                *shared.last_error.write() = error;
            }
        }
        failures = failures.saturating_add(1).min(1_000);
        let delay = crate::backoff::backoff(
            shared.config.reconnect_base,
            shared.config.reconnect_cap,
            failures,
        );
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Serves one connection opened for demand on slot `index`; when it fails, ends or is retired,
/// the slot is free again (demand opens another when needed).
async fn supervise_extra(shared: Arc<Shared>, index: usize) {
    match serve_slot(&shared, index, true, false).await {
        Ok(Served::Retired) => {
            debug!(pool = %shared.config.name, slot = index, "closed a connection demand no longer needs");
        }
        Ok(Served::Ended { reason, .. }) => *shared.last_error.write() = reason,
        Ok(Served::Cancelled) => {}
        Err(error) => {
            warn!(pool = %shared.config.name, %error, "connect failed");
            *shared.last_error.write() = error;
            // Opening failed: wait before demand may try again.
            tokio::select! {
                _ = shared.cancel.cancelled() => {}
                _ = tokio::time::sleep(shared.config.reconnect_base) => {}
            }
        }
    }
    shared.growing.store(false, Ordering::Release);
    shared.slots[index].running.store(false, Ordering::Release);
}

/// How a slot's connection ended.
enum Served {
    Cancelled,
    /// Closed because the other connections carry the traffic (extra connections only).
    Retired,
    Ended {
        reason: String,
        lived: Duration,
    },
}

/// Connects slot `index` and serves requests on it until the connection ends; `Err` when it
/// could not connect. An `extra` connection retires when the others can do without it.
async fn serve_slot(
    shared: &Arc<Shared>,
    index: usize,
    extra: bool,
    reconnect: bool,
) -> Result<Served, String> {
    let (send, connection) = connect(shared).await?;
    let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    shared.connects.fetch_add(1, Ordering::Relaxed);
    if reconnect {
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    let conn = Arc::new(Conn {
        id,
        send,
        in_flight: Arc::new(AtomicUsize::new(0)),
        closed: Arc::new(AtomicBool::new(false)),
        warmed: AtomicBool::new(!shared.config.single_stream_until_success),
        warmup: tokio::sync::Semaphore::new(1),
        max_streams: AtomicUsize::new(0),
    });
    conn.refresh_max_streams();
    shared.set_slot(index, Some(Arc::clone(&conn)), id);
    if extra {
        shared.growing.store(false, Ordering::Release);
    }
    shared.connected.notify_waiters();
    debug!(pool = %shared.config.name, conn = id, extra, "connected");
    let started = tokio::time::Instant::now();
    let ended = drive(shared, connection, extra.then_some(&conn)).await;
    conn.closed.store(true, Ordering::SeqCst);
    shared.set_slot(index, None, conn.id);
    Ok(match ended {
        DriveEnd::Cancelled => Served::Cancelled,
        DriveEnd::Retired => Served::Retired,
        DriveEnd::Closed { reason, by_server } => {
            if by_server {
                shared.goaways.fetch_add(1, Ordering::Relaxed);
            }
            info!(pool = %shared.config.name, conn = id, %reason, "connection ended");
            Served::Ended {
                reason,
                lived: started.elapsed(),
            }
        }
    })
}

enum DriveEnd {
    Cancelled,
    Retired,
    /// `by_server`: the server sent GOAWAY (h2 ends such a connection with `Ok` once its
    /// streams are done, or with a remote GOAWAY error).
    Closed {
        reason: String,
        by_server: bool,
    },
}

impl DriveEnd {
    fn closed(result: Result<(), h2::Error>) -> Self {
        match result {
            Ok(()) => DriveEnd::Closed {
                reason: "closed by peer".into(),
                by_server: true,
            },
            Err(e) => DriveEnd::Closed {
                by_server: e.is_go_away() && e.is_remote(),
                reason: e.to_string(),
            },
        }
    }

    fn local(reason: String) -> Self {
        DriveEnd::Closed {
            reason,
            by_server: false,
        }
    }
}

type Connection = h2::client::Connection<Box<dyn Io>, Bytes>;

/// How often an extra connection checks whether it is still needed.
const NEED_CHECK: Duration = Duration::from_secs(1);

/// Runs the connection until it ends, with PING keep-alives. With `retirable`, the connection
/// is retired once the other connections could carry the pool's requests for the idle timeout.
async fn drive(shared: &Shared, connection: Connection, retirable: Option<&Arc<Conn>>) -> DriveEnd {
    let mut connection = std::pin::pin!(connection);
    let mut ping_pong = connection.ping_pong();
    let mut pings = tokio::time::interval(shared.config.ping_interval);
    pings.tick().await;
    let mut checks = tokio::time::interval(NEED_CHECK.min(shared.config.idle_timeout));
    let mut unneeded_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return DriveEnd::Cancelled,
            result = &mut connection => {
                return DriveEnd::closed(result);
            }
            _ = checks.tick(), if retirable.is_some() => {
                let Some(conn) = retirable else { continue };
                if !shared.unneeded(conn) {
                    unneeded_since = None;
                    continue;
                }
                let since = *unneeded_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= shared.config.idle_timeout
                    && !shared.retiring.swap(true, Ordering::AcqRel)
                {
                    let end = retire(shared, conn, connection.as_mut()).await;
                    shared.retiring.store(false, Ordering::Release);
                    return end;
                }
            }
            _ = pings.tick() => {
                let Some(pinger) = ping_pong.as_mut() else { continue };
                let ping = tokio::time::timeout(shared.config.request_timeout, pinger.ping(h2::Ping::opaque()));
                // The connection future must keep running while we wait for the PONG.
                tokio::select! {
                    _ = shared.cancel.cancelled() => return DriveEnd::Cancelled,
                    result = &mut connection => {
                        return DriveEnd::closed(result);
                    }
                    pong = ping => match pong {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return DriveEnd::local(format!("ping failed: {e}")),
                        Err(_) => return DriveEnd::local("ping timed out".into()),
                    },
                }
            }
        }
    }
}

/// Stops `conn` taking requests, then keeps it running until those in flight are answered
/// (or the request timeout passes), so retiring loses none.
async fn retire(shared: &Shared, conn: &Conn, mut connection: Pin<&mut Connection>) -> DriveEnd {
    // SeqCst pairs with `send_on`: either it sees `closed`, or this sees its request in flight.
    conn.closed.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + shared.config.request_timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while conn.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = shared.cancel.cancelled() => return DriveEnd::Cancelled,
            result = &mut connection => return DriveEnd::closed(result),
            _ = poll.tick() => {}
        }
    }
    DriveEnd::Retired
}

impl Shared {
    /// True when the other open connections could carry every request in flight at half
    /// their capacity.
    fn unneeded(&self, conn: &Conn) -> bool {
        let (mut in_flight, mut others) = (0, 0);
        for live in self.live() {
            in_flight += live.in_flight.load(Ordering::Relaxed);
            if live.id != conn.id {
                others += live.capacity();
            }
        }
        in_flight * 2 <= others
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

async fn connect(shared: &Shared) -> Result<(SendRequest<Bytes>, Connection), String> {
    let endpoint = &shared.endpoint;
    let config = &shared.config;
    let setup = async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| format!("TCP connect to {}:{}: {e}", endpoint.host, endpoint.port))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &endpoint.tls {
            Some(tls) => {
                let name = ServerName::try_from(endpoint.host.clone())
                    .map_err(|e| format!("invalid TLS server name {}: {e}", endpoint.host))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", endpoint.host))?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(format!(
                        "{} did not negotiate HTTP/2 (ALPN h2)",
                        endpoint.host
                    ));
                }
                Box::new(stream)
            }
            None => Box::new(tcp),
        };
        let io: Box<dyn Io> = Box::new(super::coalesce::CoalescingIo::new(io));
        h2::client::Builder::new()
            .initial_max_send_streams(config.initial_max_streams.max(1))
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))
    };
    tokio::time::timeout(config.connect_timeout, setup)
        .await
        .map_err(|_| format!("connect timed out after {:?}", config.connect_timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let e = Endpoint::parse("http://127.0.0.1:8443", None).unwrap();
        assert_eq!(e.port, 8443);
        assert!(e.tls.is_none());
        let e = Endpoint::parse("https://api.push.apple.com", None).unwrap();
        assert_eq!(e.port, 443);
        assert!(e.tls.is_some());
        assert!(matches!(
            Endpoint::parse("ftp://x", None),
            Err(EndpointError::Scheme(_))
        ));
        assert!(Endpoint::parse("https://x", Some("not a pem")).is_err());
    }

    /// A cleartext HTTP/2 server allowing `streams` concurrent streams per connection that
    /// answers every request 200 after `delay`. Returns its address and a count of the TCP
    /// connections it accepted.
    async fn slow_server(streams: u32, delay: Duration) -> (std::net::SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut connection = h2::server::Builder::new()
                        .max_concurrent_streams(streams)
                        .handshake::<_, Bytes>(socket)
                        .await
                        .unwrap();
                    while let Some(Ok((_request, mut respond))) = connection.accept().await {
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let response = http::Response::builder().status(200).body(()).unwrap();
                            let _ = respond.send_response(response, true);
                        });
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn request(addr: std::net::SocketAddr) -> Request<()> {
        Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/3/device/x"))
            .body(())
            .unwrap()
    }

    /// Demand beyond what the open connection's streams carry opens more connections (never
    /// past `max_connections`); once the demand is gone the extras close again and the pool
    /// keeps its `connections`, answering every request on the way.
    #[tokio::test]
    async fn grows_under_demand_and_retires_idle_extras() {
        let (addr, accepted) = slow_server(4, Duration::from_millis(100)).await;
        let endpoint = Endpoint::parse(&format!("http://{addr}"), None).unwrap();
        let pool = Arc::new(H2Pool::new(
            endpoint,
            PoolConfig {
                connections: 1,
                max_connections: 4,
                idle_timeout: Duration::from_millis(300),
                initial_max_streams: 4,
                request_timeout: Duration::from_secs(30),
                ..PoolConfig::default()
            },
        ));
        let mut peak = 0;
        for _round in 0..20 {
            let sends: Vec<_> = (0..32)
                .map(|_| {
                    let pool = Arc::clone(&pool);
                    tokio::spawn(async move { pool.send(request(addr), Bytes::new()).await })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            peak = peak.max(pool.open_connections());
            for send in sends {
                let response = send.await.unwrap().unwrap();
                assert_eq!(response.status, StatusCode::OK);
            }
        }
        assert!(
            peak > 1,
            "32 concurrent requests on 4-stream connections opened no extra connection"
        );
        assert!(
            peak <= 4,
            "opened {peak} connections, more than max_connections = 4"
        );
        assert!(accepted.load(Ordering::Relaxed) <= 4);

        // Idle: the extras retire, the configured connection stays.
        let mut open = pool.open_connections();
        for _ in 0..200 {
            open = pool.open_connections();
            if open == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(open, 1, "idle extra connections were not retired");
        let response = pool.send(request(addr), Bytes::new()).await.unwrap();
        assert_eq!(response.status, StatusCode::OK);
    }
}
