//! The ceiling run: a raw HTTP/2 client (the `h2` crate, no gateway) blasting the same mocks the
//! gateway talks to, with valid credentials (an ES256 provider JWT for APNs, an OAuth access
//! token for FCM) and bodies shaped and sized like the gateway's. Its requests per second are
//! what this machine does at all with these mocks: the gateway's throughput is reported as a
//! ratio of it.
//!
//! Every connection first sends one request alone (the APNs mock refuses concurrent streams until
//! a connection has shown a valid JWT), then runs `streams` workers, each sending one request at
//! a time until the deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use super::env::{Mocks, PROJECT_ID, apns_token, fcm_token, topic};
use super::procstat;
use super::settings::{CeilingTarget, Settings};

/// What a ceiling run measured.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingReport {
    pub target: String,
    pub connections: usize,
    pub streams_per_connection: usize,
    pub secs: f64,
    pub requests: u64,
    pub ok: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub req_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// CPU of the mock runtime's threads during the run.
    pub mock_cpu_secs: f64,
    pub mock_cpu_us_per_request: f64,
    /// CPU of the client runtime's threads during the run.
    pub client_cpu_secs: f64,
}

type Sender = h2::client::SendRequest<Bytes>;

fn tls_config(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("mock CA PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn handshake<T>(io: T) -> anyhow::Result<Sender>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send.ready().await?)
}

async fn connect(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        Some(cfg) => {
            let name = ServerName::try_from("localhost")?.to_owned();
            let io = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
                .connect(name, tcp)
                .await?;
            handshake(io).await
        }
        None => handshake(tcp).await,
    }
}

/// Sends one request; returns (status, body).
async fn send(sender: &Sender, req: Request<()>, body: Bytes) -> anyhow::Result<(u16, Bytes)> {
    let mut ready = sender.clone().ready().await?;
    let (resp, mut stream) = ready.send_request(req, false)?;
    stream.send_data(body, true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok((status, Bytes::from(out)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One kind of request the ceiling sends.
#[derive(Clone)]
struct Kind {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    scheme: &'static str,
    authorization: HeaderValue,
    apns: bool,
    /// Pre-rendered bodies (with their path), cycled.
    bodies: Arc<Vec<(String, Bytes)>>,
}

impl Kind {
    fn request(&self, i: usize) -> anyhow::Result<(Request<()>, Bytes)> {
        let (path, body) = &self.bodies[i % self.bodies.len()];
        let uri = format!("{}://{}{}", self.scheme, self.addr, path);
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("authorization", self.authorization.clone());
        if self.apns {
            b = b
                .header("apns-topic", topic(0))
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .header("apns-id", uuid::Uuid::new_v4().to_string());
        } else {
            b = b.header("content-type", "application/json");
        }
        Ok((b.body(())?, body.clone()))
    }
}

/// Bodies shaped like what the gateway renders for the load tool's template.
fn apns_bodies() -> Vec<(String, Bytes)> {
    (0..1000u64)
        .map(|k| {
            let body = serde_json::json!({
                "aps": {
                    "alert": {
                        "title": format!("Hi User{k}"),
                        "body": format!("User{k}, {} items are still waiting in your cart", k % 7 + 1),
                    },
                    "sound": "default",
                },
                "screen": "cart",
            });
            (
                format!("/3/device/{}", apns_token(k)),
                Bytes::from(body.to_string()),
            )
        })
        .collect()
}

fn fcm_bodies() -> Vec<(String, Bytes)> {
    (0..1000u64)
        .map(|k| {
            let body = serde_json::json!({
                "message": {
                    "token": fcm_token(k),
                    "notification": {
                        "title": format!("Hi User{k}"),
                        "body": format!("User{k}, {} items are still waiting in your cart", k % 7 + 1),
                    },
                    "data": {"screen": "cart"},
                    "android": {"priority": "HIGH", "notification": {"sound": "default"}},
                    "fcm_options": {"analytics_label": "load-ceiling"},
                },
            });
            (
                format!("/v1/projects/{PROJECT_ID}/messages:send"),
                Bytes::from(body.to_string()),
            )
        })
        .collect()
}

fn apns_kind(mocks: &Mocks) -> anyhow::Result<Kind> {
    let key = &mocks.apns_key;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(key.key_id.clone());
    let claims = serde_json::json!({"iss": key.team_id, "iat": unix_now()});
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.private_p8_pem.as_bytes())?;
    let jwt = jsonwebtoken::encode(&header, &claims, &encoding)?;
    let tls = mocks.apns.ca_pem().map(|p| tls_config(&p)).transpose()?;
    Ok(Kind {
        addr: mocks.apns.addr(),
        scheme: if tls.is_some() { "https" } else { "http" },
        tls,
        authorization: HeaderValue::from_str(&format!("bearer {jwt}"))?,
        apns: true,
        bodies: Arc::new(apns_bodies()),
    })
}

/// Exchanges a signed service-account assertion for an access token at the FCM mock.
async fn fcm_kind(mocks: &Mocks) -> anyhow::Result<Kind> {
    let account: serde_json::Value = serde_json::from_str(&mocks.account_json)?;
    let pem = account["private_key"]
        .as_str()
        .ok_or_else(|| anyhow!("service account without private_key"))?;
    let token_uri = mocks.fcm.token_uri();
    let iat = unix_now();
    let claims = serde_json::json!({
        "iss": mocks.account.client_email,
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": token_uri,
        "iat": iat,
        "exp": iat + 3600,
    });
    let assertion = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())?,
    )?;
    let tls = mocks.fcm.ca_pem().map(|p| tls_config(&p)).transpose()?;
    let sender = connect(mocks.fcm.addr(), tls.as_ref()).await?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(())?;
    let form = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
    );
    let (status, body) = send(&sender, req, Bytes::from(form)).await?;
    if status != 200 {
        bail!(
            "FCM mock token endpoint answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let token = v["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("token response without access_token"))?;
    Ok(Kind {
        addr: mocks.fcm.addr(),
        scheme: if tls.is_some() { "https" } else { "http" },
        tls,
        authorization: HeaderValue::from_str(&format!("Bearer {token}"))?,
        apns: false,
        bodies: Arc::new(fcm_bodies()),
    })
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    non_2xx: AtomicU64,
    errors: AtomicU64,
}

/// Runs the ceiling for `settings.ceiling_secs` and reports.
pub async fn run(s: &Settings, mocks: &Mocks) -> anyhow::Result<CeilingReport> {
    let mut kinds = Vec::new();
    let conns = s.ceiling_connections;
    let (apns_conns, fcm_conns) = match s.ceiling_target {
        CeilingTarget::Apns => (conns, 0),
        CeilingTarget::Fcm => (0, conns),
        CeilingTarget::Both => {
            let f = ((conns as f64 * s.fcm_share).round() as usize).min(conns);
            let (mut a, mut f) = (conns - f, f);
            if conns >= 2 && s.fcm_share > 0.0 && s.fcm_share < 1.0 {
                a = a.max(1);
                f = f.max(1);
            }
            (a, f)
        }
    };
    if apns_conns > 0 {
        let k = apns_kind(mocks)?;
        kinds.extend(std::iter::repeat_n(k, apns_conns));
    }
    if fcm_conns > 0 {
        let k = fcm_kind(mocks).await?;
        kinds.extend(std::iter::repeat_n(k, fcm_conns));
    }
    let tally = Arc::new(Tally::default());
    let ticks = procstat::clock_ticks();
    let mock_cpu0 = procstat::threads_cpu_secs(procstat::MOCK_THREAD, ticks);
    let client_cpu0 = procstat::threads_cpu_secs(procstat::CLIENT_THREAD, ticks);
    let requests0 = mocks.requests();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(s.ceiling_secs);
    let mut workers = Vec::new();
    for (c, kind) in kinds.into_iter().enumerate() {
        let sender = connect(kind.addr, kind.tls.as_ref())
            .await
            .with_context(|| format!("ceiling connection {c}"))?;
        // One request alone first: the APNs mock refuses concurrency before a valid JWT.
        let (req, body) = kind.request(c)?;
        let (status, body) = send(&sender, req, body).await?;
        if !(200..300).contains(&status) {
            bail!(
                "the mock refused the ceiling client's first request: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        for w in 0..s.ceiling_streams {
            let sender = sender.clone();
            let kind = kind.clone();
            let tally = Arc::clone(&tally);
            workers.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
                let mut i = w * 7 + c * 1009;
                while Instant::now() < deadline {
                    i += 1;
                    let t0 = Instant::now();
                    let sent = match kind.request(i) {
                        Ok((req, body)) => {
                            tokio::time::timeout(Duration::from_secs(10), send(&sender, req, body))
                                .await
                        }
                        Err(e) => Ok(Err(e)),
                    };
                    match sent {
                        Ok(Ok((status, _))) if (200..300).contains(&status) => {
                            tally.ok.fetch_add(1, Relaxed);
                            if let Some(h) = hist.as_mut() {
                                let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                            }
                        }
                        Ok(Ok(_)) => {
                            tally.non_2xx.fetch_add(1, Relaxed);
                        }
                        _ => {
                            tally.errors.fetch_add(1, Relaxed);
                            break;
                        }
                    }
                }
                hist
            }));
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for w in workers {
        if let Ok(Some(h)) = w.await {
            let _ = hist.add(h);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mock_cpu = procstat::threads_cpu_secs(procstat::MOCK_THREAD, ticks) - mock_cpu0;
    let client_cpu = procstat::threads_cpu_secs(procstat::CLIENT_THREAD, ticks) - client_cpu0;
    let mock_requests = mocks.requests().saturating_sub(requests0);
    let ok = tally.ok.load(Relaxed);
    let non_2xx = tally.non_2xx.load(Relaxed);
    let errors = tally.errors.load(Relaxed);
    let requests = ok + non_2xx;
    Ok(CeilingReport {
        target: format!("{:?}", s.ceiling_target).to_lowercase(),
        connections: apns_conns + fcm_conns,
        streams_per_connection: s.ceiling_streams,
        secs,
        requests,
        ok,
        non_2xx,
        errors,
        req_per_sec: requests as f64 / secs.max(1e-9),
        latency_p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        latency_p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        mock_cpu_secs: mock_cpu,
        mock_cpu_us_per_request: mock_cpu * 1e6 / (mock_requests.max(1) as f64),
        client_cpu_secs: client_cpu,
    })
}
