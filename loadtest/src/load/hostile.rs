//! `pushgate-loadtest hostile`: what one hostile or buggy caller costs the gateway.
//!
//! One gateway child (mocks, optional private Redis), two apps with a key each. The hostile key
//! runs the cases below one after another while the other key (the bystander) keeps sending a
//! small batch every 50 ms. For each case the report gives the gateway's answer, its resident
//! memory (sampled every 10 ms from `/proc`: the highest during the case, above the level before
//! it) and how the bystander fared (batches accepted, failed, slowest answer).
//!
//! Cases that need requests too large to build as protobuf structs (ten million empty
//! recipients) are encoded by hand and sent through a pass-through codec, so the tool itself
//! stays small.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

use super::env::{self, GatewayChild, Scratch};
use super::proto;
use super::redis::RedisTarget;
use super::settings::Settings;

const HOSTILE_KEY: &str = "hostile-caller-key";
const BYSTANDER_KEY: &str = "bystander-caller-key";
/// The gateway's defaults the cases are sized against (`[pipeline]`).
const MAX_BATCH_RECIPIENTS: usize = 10_000;
const MAX_REQUEST_BYTES: usize = MAX_BATCH_RECIPIENTS * 2048 + (1 << 20);
const HTTP_MAX_BODY_BYTES: usize = 2 * MAX_REQUEST_BYTES;

pub struct HostileSettings {
    pub gateway_bin: std::path::PathBuf,
    pub redis: bool,
    /// Cases whose name contains one of these (all when empty).
    pub only: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CaseReport {
    pub name: &'static str,
    pub what: &'static str,
    /// What the gateway answered (status codes and counts).
    pub answer: String,
    pub rss_before_mb: f64,
    /// Highest resident memory during the case.
    pub rss_peak_mb: f64,
    pub rss_after_mb: f64,
    pub bystander_accepted: u64,
    pub bystander_failed: u64,
    pub bystander_slowest_ms: f64,
    pub secs: f64,
}

#[derive(Debug, Serialize)]
pub struct HostileReport {
    pub store: &'static str,
    pub rss_idle_mb: f64,
    pub gateway_peak_rss_mb: f64,
    pub cases: Vec<CaseReport>,
    /// Bystander failures over all cases (expected 0).
    pub bystander_failed: u64,
}

type CaseFuture<'a> = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<String>> + Send + 'a>>;

struct Case {
    name: &'static str,
    what: &'static str,
    run: for<'a> fn(&'a Ctx) -> CaseFuture<'a>,
}

struct Ctx {
    channel: Channel,
    http: std::net::SocketAddr,
}

pub async fn run(s: &HostileSettings) -> anyhow::Result<HostileReport> {
    let settings = Settings {
        apps: 2,
        cleartext: false,
        latency_ms: 5.0,
        ..Settings::default()
    };
    let mocks = env::start_mocks(&settings).await?;
    let redis = if s.redis {
        Some(RedisTarget::start_private()?)
    } else {
        None
    };
    let scratch = Scratch::new()?;
    let port = env::free_port()?;
    let http_port = env::free_port()?;
    let config = env::write_gateway_config(
        &settings,
        &mocks,
        &scratch.0,
        port,
        redis.as_ref().map(|r| r.url.as_str()),
    )?;
    let mut text = std::fs::read_to_string(&config)?;
    text = format!("http_listen = \"127.0.0.1:{http_port}\"\n{text}");
    text.push_str(&format!(
        "\n[apps.{}]\napi_keys = [\"{HOSTILE_KEY}\"]\n\n[apps.{}]\napi_keys = [\"{BYSTANDER_KEY}\"]\n",
        env::app_id(0),
        env::app_id(1)
    ));
    std::fs::write(&config, text)?;
    let gateway = GatewayChild::start(&s.gateway_bin, &config, port, &scratch.0).await?;
    let pid = gateway.pid;
    let channel = Endpoint::from_shared(format!("http://{}", gateway.addr))?
        .connect()
        .await
        .context("connecting to the gateway")?;
    let ctx = Ctx {
        channel: channel.clone(),
        http: format!("127.0.0.1:{http_port}").parse()?,
    };

    // Another caller is another client: its own connection, as in production.
    let bystander_channel = Endpoint::from_shared(format!("http://{}", gateway.addr))?
        .connect()
        .await
        .context("connecting the bystander to the gateway")?;
    let bystander = Bystander::start(bystander_channel);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle_mb = rss_mb(pid);
    let mut cases = Vec::new();
    for case in CASES
        .iter()
        .filter(|c| s.only.is_empty() || s.only.iter().any(|o| c.name.contains(o.as_str())))
    {
        // Let the previous case's memory go back and the bystander settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sampler = Sampler::start(pid);
        bystander.reset();
        let started = Instant::now();
        eprintln!("{}: running", case.name);
        let answer = match (case.run)(&ctx).await {
            Ok(answer) => answer,
            Err(e) => format!("tool error: {e:#}"),
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (before, peak) = sampler.stop().await;
        let (accepted, failed, slowest) = bystander.counts();
        eprintln!(
            "{}: {answer} (peak {peak:.0} MB, {:.1} s)",
            case.name,
            started.elapsed().as_secs_f64()
        );
        cases.push(CaseReport {
            name: case.name,
            what: case.what,
            answer,
            rss_before_mb: before,
            rss_peak_mb: peak,
            rss_after_mb: rss_mb(pid),
            bystander_accepted: accepted,
            bystander_failed: failed,
            bystander_slowest_ms: slowest,
            secs: started.elapsed().as_secs_f64(),
        });
    }
    bystander.stop();
    let gateway_peak_rss_mb = super::procstat::peak_rss_bytes(pid).unwrap_or(0) as f64 / 1e6;
    gateway.stop().await?;
    mocks.shutdown().await;
    let bystander_failed = cases.iter().map(|c| c.bystander_failed).sum();
    Ok(HostileReport {
        store: if s.redis { "redis" } else { "memory" },
        rss_idle_mb,
        gateway_peak_rss_mb,
        cases,
        bystander_failed,
    })
}

pub fn print(r: &HostileReport) {
    println!(
        "hostile callers, {} store: gateway idle {:.0} MB, peak {:.0} MB over the run; bystander failures {}",
        r.store, r.rss_idle_mb, r.gateway_peak_rss_mb, r.bystander_failed
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>8} {:>6} {:>9}  answer",
        "case", "before MB", "peak MB", "+MB", "bys ok", "bys x", "bys max"
    );
    for c in &r.cases {
        println!(
            "{:<28} {:>9.0} {:>9.0} {:>9.0} {:>8} {:>6} {:>7.0}ms  {}",
            c.name,
            c.rss_before_mb,
            c.rss_peak_mb,
            (c.rss_peak_mb - c.rss_before_mb).max(0.0),
            c.bystander_accepted,
            c.bystander_failed,
            c.bystander_slowest_ms,
            c.answer
        );
    }
}

const CASES: &[Case] = &[
    Case {
        name: "decode_limit_empty_recips",
        what: "4 concurrent SendBatch requests at the decode limit, all empty recipients (2 bytes each: ~10.7M per request)",
        run: |c| Box::pin(empty_recipients_at_decode_limit(c)),
    },
    Case {
        name: "twice_cap_recipients",
        what: "8 concurrent SendBatch requests of 2x max_batch_recipients (20,000) recipients, decoded and refused by the cap",
        run: |c| Box::pin(twice_the_cap(c)),
    },
    Case {
        name: "vars_bomb",
        what: "SendBatch: one recipient with 200,000 vars",
        run: |c| Box::pin(vars_bomb(c)),
    },
    Case {
        name: "template_1mb",
        what: "SendBatch: a 1 MB template body, 10,000 recipients",
        run: |c| Box::pin(big_template(c)),
    },
    Case {
        name: "raw_json_bomb",
        what: "SendBatch: 10,000 recipients each with 2 KB of raw apns_json (within the caps: accepted and delivered)",
        run: |c| Box::pin(raw_json_bomb(c)),
    },
    Case {
        name: "stream_refused_whole",
        what: "StreamSend: 10 batches of 10,000 recipients with no platform (each batch refused whole), receipts read",
        run: |c| Box::pin(stream_refused(c, true)),
    },
    Case {
        name: "stream_never_read",
        what: "StreamSend: 10 such batches (100,000 refused recipients), receipts never read, held 5 s",
        run: |c| Box::pin(stream_refused(c, false)),
    },
    Case {
        name: "streams_flood",
        what: "200 StreamSend streams opened at once by one key",
        run: |c| Box::pin(streams_flood(c)),
    },
    Case {
        name: "subscriptions_flood",
        what: "200 SubscribeReceipts opened at once by one key",
        run: |c| Box::pin(subscriptions_flood(c)),
    },
    Case {
        name: "batch_rate_flood",
        what: "SendBatch of 1 recipient, 16 callers as fast as answered, 5 s",
        run: |c| Box::pin(batch_rate_flood(c)),
    },
    Case {
        name: "over_decode_limit",
        what: "SendBatch: one request 1 byte over the decode limit",
        run: |c| Box::pin(over_decode_limit(c)),
    },
    Case {
        name: "http_empty_recipients",
        what: "4 concurrent HTTP POSTs at the body limit, all `{}` recipients (~14M each)",
        run: |c| Box::pin(http_empty_recipients(c)),
    },
];

// ---------------------------------------------------------------------------------------------
// The cases.

async fn empty_recipients_at_decode_limit(c: &Ctx) -> anyhow::Result<String> {
    let mut body = proto::SendBatchRequest {
        app_id: env::app_id(0),
        template: Some(template()),
        ..Default::default()
    }
    .encode_to_vec();
    while body.len() + 2 <= MAX_REQUEST_BYTES {
        body.extend_from_slice(&[(5 << 3) | 2, 0]);
    }
    let body = Bytes::from(body);
    let calls = (0..4).map(|_| raw_send_batch(c.channel.clone(), body.clone()));
    Ok(tally(futures::future::join_all(calls).await))
}

async fn twice_the_cap(c: &Ctx) -> anyhow::Result<String> {
    let mut request = batch(0, 2 * MAX_BATCH_RECIPIENTS);
    for r in &mut request.recipients {
        r.vars
            .insert("name".into(), "a personalization value".into());
    }
    let calls = (0..8).map(|_| send(c.channel.clone(), request.clone(), HOSTILE_KEY));
    Ok(tally(futures::future::join_all(calls).await))
}

async fn vars_bomb(c: &Ctx) -> anyhow::Result<String> {
    let mut request = batch(0, 1);
    request.recipients[0].vars = (0..200_000)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    Ok(tally(vec![
        send(c.channel.clone(), request, HOSTILE_KEY).await,
    ]))
}

async fn big_template(c: &Ctx) -> anyhow::Result<String> {
    let mut request = batch(0, MAX_BATCH_RECIPIENTS);
    if let Some(t) = request.template.as_mut() {
        t.body = "{{ name }} ".repeat(100_000);
    }
    Ok(tally(vec![
        send(c.channel.clone(), request, HOSTILE_KEY).await,
    ]))
}

async fn raw_json_bomb(c: &Ctx) -> anyhow::Result<String> {
    let mut request = batch(0, MAX_BATCH_RECIPIENTS);
    let raw = format!("{{\"x\":\"{}\"}}", "a".repeat(2000));
    for r in &mut request.recipients {
        r.apns_json = raw.clone();
    }
    Ok(tally(vec![
        send(c.channel.clone(), request, HOSTILE_KEY).await,
    ]))
}

async fn stream_refused(c: &Ctx, read: bool) -> anyhow::Result<String> {
    let mut client = proto::push_gateway_client::PushGatewayClient::new(c.channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut inbound = client
        .stream_send(authorized(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            HOSTILE_KEY,
        ))
        .await?
        .into_inner();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        for b in 0..10 {
            let mut request = batch(b * MAX_BATCH_RECIPIENTS, MAX_BATCH_RECIPIENTS);
            request.wait_for_receipts = false;
            for r in &mut request.recipients {
                r.platform = proto::Platform::Unspecified as i32;
            }
            match tokio::time::timeout(Duration::from_secs(5), tx.send(request)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        (sent, tx)
    });
    if read {
        let mut receipts = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while receipts < 10 * MAX_BATCH_RECIPIENTS as u64 && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
                Ok(Ok(Some(_))) => receipts += 1,
                _ => break,
            }
        }
        let (sent, _tx) = sender.await?;
        Ok(format!(
            "{sent} batches sent, {receipts} REJECTED receipts read"
        ))
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (sent, tx) = sender.await?;
        drop(tx);
        drop(inbound);
        // `sent` counts what the client's own channel (16 deep) took too, not what the
        // gateway read: the memory columns tell the gateway's side.
        Ok(format!(
            "{sent} of 10 batches handed to the client's stream while nothing was read"
        ))
    }
}

async fn streams_flood(c: &Ctx) -> anyhow::Result<String> {
    let opens = (0..200).map(|_| {
        let mut client = proto::push_gateway_client::PushGatewayClient::new(c.channel.clone());
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<proto::SendBatchRequest>(1);
            let r = client
                .stream_send(authorized(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    HOSTILE_KEY,
                ))
                .await;
            (r.map(|s| (s.into_inner(), tx)), ())
        }
    });
    let results = futures::future::join_all(opens).await;
    let mut open = Vec::new();
    let mut answers = Vec::new();
    for (r, ()) in results {
        match r {
            Ok(s) => {
                open.push(s);
                answers.push(Ok(()));
            }
            Err(status) => answers.push(Err(status)),
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(open);
    Ok(tally(answers))
}

async fn subscriptions_flood(c: &Ctx) -> anyhow::Result<String> {
    let opens = (0..200).map(|_| {
        let mut client = proto::push_gateway_client::PushGatewayClient::new(c.channel.clone());
        async move {
            client
                .subscribe_receipts(authorized(
                    proto::SubscribeReceiptsRequest {
                        app_id: env::app_id(0),
                        ..Default::default()
                    },
                    HOSTILE_KEY,
                ))
                .await
                .map(|s| s.into_inner())
        }
    });
    let results = futures::future::join_all(opens).await;
    let answers = results
        .iter()
        .map(|r| r.as_ref().map(drop).map_err(Clone::clone))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(results);
    Ok(tally(answers))
}

async fn batch_rate_flood(c: &Ctx) -> anyhow::Result<String> {
    let until = Instant::now() + Duration::from_secs(5);
    let callers = (0..16).map(|k| {
        let channel = c.channel.clone();
        async move {
            let mut answers = Vec::new();
            let mut n = 0;
            while Instant::now() < until {
                let mut request = batch(1_000_000 * (k + 1) + n, 1);
                request.wait_for_receipts = false;
                n += 1;
                answers.push(send(channel.clone(), request, HOSTILE_KEY).await);
            }
            answers
        }
    });
    let all = futures::future::join_all(callers).await;
    Ok(tally(all.into_iter().flatten().collect()))
}

async fn over_decode_limit(c: &Ctx) -> anyhow::Result<String> {
    let mut request = batch(0, 1);
    request.recipients[0].device_token = "a".repeat(MAX_REQUEST_BYTES);
    Ok(tally(vec![
        send(c.channel.clone(), request, HOSTILE_KEY).await,
    ]))
}

async fn http_empty_recipients(c: &Ctx) -> anyhow::Result<String> {
    let mut body = String::from(r#"{"template":{"title":"t"},"recipients":["#);
    // Just under the body limit (`{}]}` closes it), so the count, not the length, refuses it.
    while body.len() + 3 + 4 <= HTTP_MAX_BODY_BYTES {
        body.push_str("{},");
    }
    body.push_str("{}]}");
    let body = Bytes::from(body);
    let posts = (0..4).map(|_| http_post(c.http, body.clone()));
    let answers = futures::future::join_all(posts).await;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for a in answers {
        *counts
            .entry(a.unwrap_or_else(|e| format!("error {e:#}")))
            .or_default() += 1;
    }
    Ok(counts
        .iter()
        .map(|(k, v)| format!("{v}x {k}"))
        .collect::<Vec<_>>()
        .join(", "))
}

// ---------------------------------------------------------------------------------------------
// Requests.

fn template() -> proto::Template {
    proto::Template {
        title: "Hi {{ name | default: \"there\" }}".into(),
        body: "Your cart misses you".into(),
        ..Default::default()
    }
}

fn batch(first: usize, n: usize) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: env::app_id(0),
        template: Some(template()),
        recipients: (first..first + n)
            .map(|i| proto::Recipient {
                platform: proto::Platform::Apns as i32,
                device_token: env::apns_token(i as u64),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn authorized<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn send(
    channel: Channel,
    request: proto::SendBatchRequest,
    key: &str,
) -> Result<(), tonic::Status> {
    proto::push_gateway_client::PushGatewayClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .send_batch(authorized(request, key))
        .await
        .map(drop)
}

/// Counts answers by status code: `"3x OK, 5x InvalidArgument (recipients: ...)"`.
fn tally(answers: Vec<Result<(), tonic::Status>>) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for a in answers {
        let key = match a {
            Ok(()) => "OK".to_string(),
            Err(s) => {
                let message: String = s.message().chars().take(70).collect();
                format!("{:?} ({message})", s.code())
            }
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v}x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// SendBatch with an already encoded request body.
async fn raw_send_batch(channel: Channel, body: Bytes) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/pushgate.v1.PushGateway/SendBatch");
    grpc.unary::<Bytes, proto::SendBatchResponse, RawCodec>(
        authorized(body, HOSTILE_KEY),
        path,
        RawCodec,
    )
    .await
    .map(drop)
}

/// Sends `Bytes` as they are; decodes responses with prost.
#[derive(Default, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = proto::SendBatchResponse;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder {
        ProstDecoder
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

struct ProstDecoder;

impl Decoder for ProstDecoder {
    type Item = proto::SendBatchResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        proto::SendBatchResponse::decode(bytes)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// A plain HTTP/1.1 POST; returns the status line's code and the start of the body.
async fn http_post(addr: std::net::SocketAddr, body: Bytes) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST /v1/apps/{}/batches HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         authorization: Bearer {HOSTILE_KEY}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        env::app_id(0),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    // The server may answer and close before taking the whole body.
    let _ = stream.write_all(&body).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut reply)).await;
    let text = String::from_utf8_lossy(&reply);
    let status = text.lines().next().unwrap_or("no answer").to_string();
    let message = text
        .split("\"message\":\"")
        .nth(1)
        .map(|m| m.chars().take(60).collect::<String>())
        .unwrap_or_default();
    Ok(format!("{status} ({message})"))
}

// ---------------------------------------------------------------------------------------------
// Measuring.

fn rss_mb(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0.0;
    };
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0 / 1e6)
}

/// Samples the gateway's RSS every 10 ms on a thread of its own (so a busy runtime does not
/// skip a peak).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
    before: f64,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let before = rss_mb(pid);
        let thread = std::thread::spawn(move || {
            let mut peak = 0.0f64;
            while !flag.load(Relaxed) {
                peak = peak.max(rss_mb(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(rss_mb(pid))
        });
        Sampler {
            stop,
            thread,
            before,
        }
    }

    async fn stop(self) -> (f64, f64) {
        self.stop.store(true, Relaxed);
        let peak = tokio::task::spawn_blocking(move || self.thread.join().unwrap_or(0.0))
            .await
            .unwrap_or(0.0);
        (self.before, peak)
    }
}

/// The other caller: one 10-recipient SendBatch every 50 ms on its own key and app.
struct Bystander {
    accepted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    slowest_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    fn start(channel: Channel) -> Self {
        let accepted = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let slowest_us = Arc::new(AtomicU64::new(0));
        let (a, f, s) = (
            Arc::clone(&accepted),
            Arc::clone(&failed),
            Arc::clone(&slowest_us),
        );
        let task = tokio::spawn(async move {
            let mut n = 50_000_000usize;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let mut request = batch(n, 10);
                request.app_id = env::app_id(1);
                request.wait_for_receipts = false;
                n += 10;
                let started = Instant::now();
                let answer = proto::push_gateway_client::PushGatewayClient::new(channel.clone())
                    .send_batch(authorized(request, BYSTANDER_KEY))
                    .await;
                s.fetch_max(started.elapsed().as_micros() as u64, Relaxed);
                match answer {
                    Ok(r) if r.get_ref().accepted == 10 => a.fetch_add(1, Relaxed),
                    _ => f.fetch_add(1, Relaxed),
                };
            }
        });
        Bystander {
            accepted,
            failed,
            slowest_us,
            task,
        }
    }

    fn reset(&self) {
        self.accepted.store(0, Relaxed);
        self.failed.store(0, Relaxed);
        self.slowest_us.store(0, Relaxed);
    }

    fn counts(&self) -> (u64, u64, f64) {
        (
            self.accepted.load(Relaxed),
            self.failed.load(Relaxed),
            self.slowest_us.load(Relaxed) as f64 / 1000.0,
        )
    }

    fn stop(self) {
        self.task.abort();
    }
}
