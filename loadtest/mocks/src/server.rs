//! The listener and HTTP/2 connection driver shared by the mock providers.
//!
//! A mock supplies a [`Handler`]: `admit` decides, at the moment a stream's HEADERS arrive, whether
//! the stream is served, refused, reset, or the connection dropped; `serve` answers one request.
//! This module owns everything else: binding `127.0.0.1:0`, TLS (or cleartext HTTP/2 with prior
//! knowledge), the h2 handshake, the live-adjustable connection faults (GOAWAY / RST_STREAM /
//! drop after *n* requests), the counters every mock reports, and an explicit shutdown that sends
//! GOAWAY on every connection and drains in-flight streams.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use h2::server::SendResponse;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::tls::MockTls;

/// Counters shared by both mocks. All atomics; `snapshot` turns them into a [`MockStats`].
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub accepted: AtomicU64,
    statuses: Box<[AtomicU64]>,
    reason_names: &'static [&'static str],
    reasons: Box<[AtomicU64]>,
    pub connections_opened: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub jwt_verifications: AtomicU64,
    pub goaways_sent: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub refused_streams: AtomicU64,
    pub resets_sent: AtomicU64,
    pub connections_dropped: AtomicU64,
    pub token_requests: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub legacy_requests: AtomicU64,
    pub validate_only: AtomicU64,
}

impl Counters {
    pub fn new(reason_names: &'static [&'static str]) -> Counters {
        Counters {
            requests: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            statuses: (0..600).map(|_| AtomicU64::new(0)).collect(),
            reason_names,
            reasons: reason_names.iter().map(|_| AtomicU64::new(0)).collect(),
            connections_opened: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            jwt_verifications: AtomicU64::new(0),
            goaways_sent: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            refused_streams: AtomicU64::new(0),
            resets_sent: AtomicU64::new(0),
            connections_dropped: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            legacy_requests: AtomicU64::new(0),
            validate_only: AtomicU64::new(0),
        }
    }

    /// Counts one answered request with its status and (for errors) a reason index.
    pub fn record(&self, status: u16, reason: Option<usize>) {
        if let Some(c) = self.statuses.get(usize::from(status)) {
            c.fetch_add(1, Relaxed);
        }
        if let Some(c) = reason.and_then(|r| self.reasons.get(r)) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> MockStats {
        let by_status = self
            .statuses
            .iter()
            .enumerate()
            .filter_map(|(s, c)| {
                let n = c.load(Relaxed);
                (n > 0).then_some((s as u16, n))
            })
            .collect();
        let by_reason = self
            .reasons
            .iter()
            .zip(self.reason_names)
            .filter_map(|(c, name)| {
                let n = c.load(Relaxed);
                (n > 0).then(|| (name.to_string(), n))
            })
            .collect();
        MockStats {
            requests: self.requests.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            by_status,
            by_reason,
            connections_opened: self.connections_opened.load(Relaxed),
            connections_rejected: self.connections_rejected.load(Relaxed),
            jwt_verifications: self.jwt_verifications.load(Relaxed),
            goaways_sent: self.goaways_sent.load(Relaxed),
            max_concurrent_streams_seen: self.max_in_flight.load(Relaxed),
            refused_streams: self.refused_streams.load(Relaxed),
            resets_sent: self.resets_sent.load(Relaxed),
            connections_dropped: self.connections_dropped.load(Relaxed),
            token_requests: self.token_requests.load(Relaxed),
            tokens_issued: self.tokens_issued.load(Relaxed),
            legacy_requests: self.legacy_requests.load(Relaxed),
            validate_only: self.validate_only.load(Relaxed),
        }
    }
}

/// A point-in-time copy of a mock's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockStats {
    /// Streams whose HEADERS were accepted (including refused, reset and dropped ones). For FCM
    /// this counts token-endpoint and legacy-endpoint requests too.
    pub requests: u64,
    /// Notifications answered 200 and recorded: APNs pushes, FCM `messages:send` (not counting
    /// `validate_only` requests or token-endpoint responses).
    pub accepted: u64,
    /// Responses by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Error responses by reason: the APNs `reason`, or for FCM the `FcmError.errorCode` when the
    /// body carries one, else the canonical `error.status` (e.g. `UNAUTHENTICATED`), or the OAuth
    /// `error` for the token endpoint (`invalid_grant`), or `HTML_502`.
    pub by_reason: BTreeMap<String, u64>,
    /// TCP connections accepted.
    pub connections_opened: u64,
    /// Connections closed before serving anything: failed TLS, failed h2 handshake, or ALPN
    /// `http/1.1` on the FCM mock (only HTTP/2 is served).
    pub connections_rejected: u64,
    /// JWT signature checks actually performed (cache misses).
    pub jwt_verifications: u64,
    /// GOAWAY sequences started (fault injection or shutdown).
    pub goaways_sent: u64,
    /// The largest number of streams seen in flight at once on a single connection.
    pub max_concurrent_streams_seen: u64,
    /// Streams answered RST_STREAM(REFUSED_STREAM) (APNs: before the connection was authorized).
    pub refused_streams: u64,
    /// Streams answered RST_STREAM(INTERNAL_ERROR) by the `reset_after` fault.
    pub resets_sent: u64,
    /// Connections dropped without GOAWAY by the `drop_connection_after` fault.
    pub connections_dropped: u64,
    /// FCM: requests to the token endpoint.
    pub token_requests: u64,
    /// FCM: access tokens issued.
    pub tokens_issued: u64,
    /// FCM: requests to the dead legacy endpoints `/batch` and `/fcm/send`.
    pub legacy_requests: u64,
    /// FCM: accepted `validate_only` requests (not recorded in `accepted()`).
    pub validate_only: u64,
}

impl MockStats {
    /// Responses with this status.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Error responses with this reason.
    pub fn reason(&self, reason: &str) -> u64 {
        self.by_reason.get(reason).copied().unwrap_or(0)
    }
}

/// The mock's notion of wall-clock time: the system clock plus an adjustable offset, so tests can
/// age JWTs and access tokens without sleeping.
#[derive(Default)]
pub(crate) struct MockClock {
    offset_secs: AtomicI64,
}

impl MockClock {
    pub fn now_secs(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        now + self.offset_secs.load(Relaxed)
    }

    pub fn now_millis(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        now + self.offset_secs.load(Relaxed) * 1000
    }

    pub fn advance(&self, by: Duration) {
        self.offset_secs.fetch_add(by.as_secs() as i64, Relaxed);
    }
}

/// A deterministic "per mille" fault: exactly `p` of every 1000 consecutive requests fail, evenly
/// spaced (Bresenham), the first at request `ceil(1000 / p)`.
#[derive(Default)]
pub(crate) struct PerMille {
    rate: AtomicU32,
    n: AtomicU64,
}

impl PerMille {
    pub fn set(&self, per_mille: u32) {
        self.rate.store(per_mille.min(1000), Relaxed);
        self.n.store(0, Relaxed);
    }

    pub fn hit(&self) -> bool {
        let p = u64::from(self.rate.load(Relaxed));
        if p == 0 {
            return false;
        }
        let n = self.n.fetch_add(1, Relaxed);
        (n + 1) * p / 1000 > n * p / 1000
    }
}

/// A "fire on the n-th next event" countdown; negative means disarmed.
pub(crate) struct Countdown(AtomicI64);

impl Default for Countdown {
    fn default() -> Self {
        Countdown(AtomicI64::new(-1))
    }
}

impl Countdown {
    pub fn arm(&self, n: u64) {
        self.0.store(n.min(i64::MAX as u64) as i64, Relaxed);
    }

    pub fn disarm(&self) {
        self.0.store(-1, Relaxed);
    }

    /// Counts one event; true exactly once, for the event that brings the count to zero.
    pub fn tick(&self) -> bool {
        if self.0.load(Relaxed) <= 0 {
            return false;
        }
        matches!(
            self.0
                .fetch_update(Relaxed, Relaxed, |v| (v > 0).then(|| v - 1)),
            Ok(1)
        )
    }

    /// Takes one unit if any are left (for "the next n requests" faults).
    pub fn take(&self) -> bool {
        if self.0.load(Relaxed) <= 0 {
            return false;
        }
        self.0
            .fetch_update(Relaxed, Relaxed, |v| (v > 0).then(|| v - 1))
            .is_ok()
    }
}

/// Connection-level faults common to both mocks.
#[derive(Default)]
pub(crate) struct ConnFaults {
    pub goaway: Countdown,
    pub reset: Countdown,
    pub drop: Countdown,
    pub goaway_all: watch::Sender<u64>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS of connections opened from now on; 0: the configured one.
    pub max_streams: AtomicU32,
}

impl ConnFaults {
    pub fn goaway_all_now(&self) {
        self.goaway_all.send_modify(|v| *v += 1);
    }

    /// `configured`, or the live override.
    pub fn max_streams(&self, configured: u32) -> u32 {
        match self.max_streams.load(Relaxed) {
            0 => configured,
            n => n,
        }
    }

    /// Connections opened from now on advertise `n` streams (`None`: the configured number),
    /// and every open one gets GOAWAY, so clients reconnect and meet the new limit.
    pub fn set_max_streams(&self, n: Option<u32>) {
        self.max_streams.store(n.unwrap_or(0), Relaxed);
        self.goaway_all_now();
    }
}

/// Called with the device token of every request a mock accepted (answered 200).
pub type OnAccepted = Arc<dyn Fn(&str) + Send + Sync>;

/// The accepted-request observer of a mock, set once (a chaos run's delivery ledger: a
/// per-message counter costs far less than [`crate::apns::MockApnsConfig::record_accepted`]).
#[derive(Default)]
pub(crate) struct AcceptObserver(std::sync::OnceLock<OnAccepted>);

impl AcceptObserver {
    pub fn set(&self, f: OnAccepted) -> bool {
        self.0.set(f).is_ok()
    }

    pub fn accepted(&self, token: &str) {
        if let Some(f) = self.0.get() {
            f(token);
        }
    }
}

/// What to do with a stream whose HEADERS just arrived.
pub(crate) enum Admission {
    Serve,
    Refuse,
}

/// Per-connection context handed to the handler.
pub(crate) struct ConnCtx<S> {
    /// Streams being served on this connection. `admit` sees the count without the new stream.
    pub in_flight: AtomicU32,
    pub state: S,
}

/// A mock provider's request logic.
pub(crate) trait Handler: Send + Sync + 'static {
    type ConnState: Default + Send + Sync + 'static;

    fn counters(&self) -> &Counters;
    fn conn_faults(&self) -> &ConnFaults;
    fn h2_builder(&self) -> h2::server::Builder;
    fn admit(&self, _conn: &ConnCtx<Self::ConnState>) -> Admission {
        Admission::Serve
    }
    fn serve(
        self: Arc<Self>,
        conn: Arc<ConnCtx<Self::ConnState>>,
        req: http::Request<RecvStream>,
        resp: SendResponse<Bytes>,
    ) -> impl Future<Output = ()> + Send + 'static;
    /// The answers of a mock that also speaks HTTP/1.1 (a cleartext connection not opening with
    /// the HTTP/2 preface, or TLS with ALPN `http/1.1`); `None`: HTTP/2 only.
    fn http1(self: &Arc<Self>) -> Option<crate::http1::Http1Handler> {
        None
    }
}

/// What a cleartext HTTP/2 client sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// True when a cleartext connection opens with something other than the HTTP/2 preface (waits
/// for the first bytes; a connection that sends nothing is left to the HTTP/2 handshake).
async fn opens_as_http1(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        match tcp.peek(&mut first).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                if first[..n] != H2_PREFACE[..n] {
                    return true;
                }
                if n == H2_PREFACE.len() {
                    return false;
                }
                // A prefix of the preface so far: wait for more.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// A running listener: its address and the handle to stop it.
pub(crate) struct Running {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Sends GOAWAY on every connection, waits up to `grace` for in-flight streams, then stops.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(grace + Duration::from_millis(200), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Binds `127.0.0.1:0`.
pub(crate) async fn bind() -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves `handler` on `listener` until shut down. With `require_h2`, a TLS connection that
/// negotiated another ALPN protocol is closed.
pub(crate) fn spawn<H: Handler>(
    listener: TcpListener,
    addr: SocketAddr,
    handler: Arc<H>,
    tls: Option<Arc<MockTls>>,
    require_h2: bool,
) -> Running {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, handler, tls, require_h2, shutdown_rx));
    Running {
        addr,
        shutdown: shutdown_tx,
        task: Some(task),
    }
}

const DRAIN_GRACE: Duration = Duration::from_secs(2);

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    tls: Option<Arc<MockTls>>,
    require_h2: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _peer)) = accepted else { continue };
                let _ = tcp.set_nodelay(true);
                handler.counters().connections_opened.fetch_add(1, Relaxed);
                let handler = handler.clone();
                let tls = tls.clone();
                let shutdown = shutdown.clone();
                conns.spawn(async move {
                    let http1 = handler.http1();
                    match tls {
                        None => match http1 {
                            Some(http1) if opens_as_http1(&tcp).await => {
                                crate::http1::serve_conn(tcp, http1).await
                            }
                            _ => serve_conn(handler, tcp, shutdown).await,
                        },
                        Some(tls) => match tls.acceptor().accept(tcp).await {
                            Ok(stream) => {
                                let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                                if let Some(http1) = http1
                                    && alpn.as_deref() == Some(b"http/1.1")
                                {
                                    crate::http1::serve_conn(stream, http1).await;
                                    return;
                                }
                                if require_h2 && alpn.is_some_and(|p| p != b"h2") {
                                    // We offered http/1.1 but only speak h2: close.
                                    handler.counters().connections_rejected.fetch_add(1, Relaxed);
                                    return;
                                }
                                serve_conn(handler, stream, shutdown).await
                            }
                            Err(_) => {
                                handler.counters().connections_rejected.fetch_add(1, Relaxed);
                            }
                        },
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
}

/// Decrements the connection's in-flight count when a stream's handling ends, however it ends.
struct InFlight<S>(Arc<ConnCtx<S>>);

impl<S> Drop for InFlight<S> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

async fn serve_conn<H, IO>(handler: Arc<H>, io: IO, mut shutdown: watch::Receiver<bool>)
where
    H: Handler,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let counters_handler = handler.clone();
    let counters = counters_handler.counters();
    let mut conn = match handler.h2_builder().handshake::<_, Bytes>(io).await {
        Ok(c) => c,
        Err(_) => {
            counters.connections_rejected.fetch_add(1, Relaxed);
            return;
        }
    };
    let mut goaway_all = handler.conn_faults().goaway_all.subscribe();
    goaway_all.mark_unchanged();
    let ctx = Arc::new(ConnCtx {
        in_flight: AtomicU32::new(0),
        state: H::ConnState::default(),
    });
    let mut going_away = false;
    // Created once, not per request (each `changed()` registers with the channel): neither is
    // polled again after it fired, since either sets `going_away`.
    let shutdown_changed = shutdown.changed();
    let goaway_all_changed = goaway_all.changed();
    tokio::pin!(shutdown_changed, goaway_all_changed);
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = &mut shutdown_changed, if !going_away => {
                going_away = true;
                counters.goaways_sent.fetch_add(1, Relaxed);
                conn.graceful_shutdown();
                continue;
            }
            _ = &mut goaway_all_changed, if !going_away => {
                going_away = true;
                counters.goaways_sent.fetch_add(1, Relaxed);
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(Ok((req, mut resp))) = next else {
            break;
        };
        counters.requests.fetch_add(1, Relaxed);
        let faults = handler.conn_faults();
        if faults.drop.tick() {
            counters.connections_dropped.fetch_add(1, Relaxed);
            return; // dropping `conn` closes the socket without GOAWAY
        }
        if faults.reset.tick() {
            counters.resets_sent.fetch_add(1, Relaxed);
            resp.send_reset(h2::Reason::INTERNAL_ERROR);
            continue;
        }
        if let Admission::Refuse = handler.admit(&ctx) {
            counters.refused_streams.fetch_add(1, Relaxed);
            resp.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        let now_in_flight = ctx.in_flight.fetch_add(1, Relaxed) + 1;
        counters
            .max_in_flight
            .fetch_max(u64::from(now_in_flight), Relaxed);
        let guard = InFlight(ctx.clone());
        // Boxed: the task then holds a pointer, not the whole (large) handler future, which tokio
        // would otherwise copy several times per request (spawn, completion, output taken).
        let fut = Box::pin(handler.clone().serve(ctx.clone(), req, resp));
        tokio::spawn(async move {
            fut.await;
            drop(guard);
        });
        if faults.goaway.tick() && !going_away {
            going_away = true;
            counters.goaways_sent.fetch_add(1, Relaxed);
            conn.graceful_shutdown();
        }
    }
}

/// Reads a request body, releasing flow-control capacity as it goes. Stops reading once more
/// than `limit` bytes arrived and reports `truncated`; the caller answers before the end.
pub(crate) async fn read_body(
    body: &mut RecvStream,
    limit: usize,
) -> Result<(Bytes, bool), h2::Error> {
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        total += chunk.len();
        if total > limit {
            return Ok((Bytes::new(), true));
        }
        match (&mut first, &mut buf) {
            (None, None) => first = Some(chunk),
            (Some(f), None) => {
                let mut b = BytesMut::with_capacity(f.len() + chunk.len());
                b.extend_from_slice(f);
                b.extend_from_slice(&chunk);
                first = None;
                buf = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, buf) {
        (_, Some(b)) => (b.freeze(), false),
        (Some(f), None) => (f, false),
        (None, None) => (Bytes::new(), false),
    })
}

/// Sends a complete response; errors (the client went away) are ignored.
pub(crate) fn send(
    resp: &mut SendResponse<Bytes>,
    response: http::Response<()>,
    body: Option<Bytes>,
) {
    match body {
        None => {
            let _ = resp.send_response(response, true);
        }
        Some(body) => {
            if let Ok(mut stream) = resp.send_response(response, false) {
                let _ = stream.send_data(body, true);
            }
        }
    }
}

/// Sleeps for the configured latency, if any.
pub(crate) async fn delay(latency_micros: u64) {
    if latency_micros > 0 {
        tokio::time::sleep(Duration::from_micros(latency_micros)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_mille_is_exact_and_evenly_spread() {
        let p = PerMille::default();
        p.set(250);
        let hits: Vec<bool> = (0..8).map(|_| p.hit()).collect();
        assert_eq!(hits, [false, false, false, true, false, false, false, true]);
        p.set(7);
        assert_eq!((0..1000).filter(|_| p.hit()).count(), 7);
        p.set(0);
        assert!(!(0..100).any(|_| p.hit()));
        p.set(1000);
        assert!((0..100).all(|_| p.hit()));
    }

    #[test]
    fn countdown_fires_once_on_the_nth_event() {
        let c = Countdown::default();
        assert!(!c.tick());
        c.arm(3);
        assert_eq!(
            (0..5).map(|_| c.tick()).collect::<Vec<_>>(),
            [false, false, true, false, false]
        );
        c.arm(2);
        assert_eq!(
            (0..3).map(|_| c.take()).collect::<Vec<_>>(),
            [true, true, false]
        );
    }

    #[test]
    fn stats_snapshot_names_reasons() {
        let c = Counters::new(&["A", "B"]);
        c.record(400, Some(1));
        c.record(400, Some(1));
        c.record(200, None);
        c.record(999, Some(7)); // out of range: ignored, no panic
        let s = c.snapshot();
        assert_eq!(s.status(400), 2);
        assert_eq!(s.status(200), 1);
        assert_eq!(s.reason("B"), 2);
        assert_eq!(s.reason("A"), 0);
    }
}
