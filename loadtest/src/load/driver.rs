//! The gRPC side of a run: N StreamSend streams (or N SendBatch calls in flight), each on its own
//! HTTP/2 connection, sending synthetic personalized batches at a target rate or open loop.
//!
//! Receipt latency needs no shared state: each batch id carries the microsecond (since the run's
//! start) at which it was handed to the stream, and every receipt names its batch. Sending stops
//! at the duration or the message budget; receiving stops when every sent recipient has its
//! terminal receipt or the drain deadline passes. Nothing loops unbounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::env::{Mocks, apns_token, app_id, dead_token, fcm_token};
use super::proto::{self, push_gateway_client::PushGatewayClient};
use super::settings::{Mode, Settings};

/// Receipt statuses, indexed by their protobuf number.
pub const STATUS_NAMES: [&str; 8] = [
    "UNSPECIFIED",
    "DELIVERED",
    "INVALID_TOKEN",
    "REJECTED",
    "FAILED",
    "EXPIRED",
    "DROPPED",
    "RETRYING",
];

/// Live counters shared by the streams, the progress line and the sampler.
#[derive(Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub terminal: AtomicU64,
    pub rejected_at_ingest: AtomicU64,
    pub by_status: [AtomicU64; 8],
    pub grpc_errors: AtomicU64,
    /// Microseconds since the start at which the last batch was handed to a stream.
    pub last_sent_us: AtomicU64,
    /// Microseconds since the start at which the last terminal receipt arrived.
    pub last_terminal_us: AtomicU64,
    /// Recipients still allowed by the message budget.
    budget: AtomicU64,
    stop: AtomicBool,
}

impl Live {
    pub fn delivered(&self) -> u64 {
        self.by_status[1].load(Relaxed)
    }

    /// Terminal receipts that are neither DELIVERED nor INVALID_TOKEN, plus gRPC errors.
    pub fn errors(&self) -> u64 {
        let bad: u64 = [3, 4, 5, 6]
            .iter()
            .map(|i| self.by_status[*i].load(Relaxed))
            .sum();
        bad + self.grpc_errors.load(Relaxed)
    }

    /// Takes up to `n` recipients from the budget.
    fn take(&self, n: u64) -> u64 {
        let mut cur = self.budget.load(Relaxed);
        loop {
            let got = cur.min(n);
            if got == 0 {
                return 0;
            }
            match self
                .budget
                .compare_exchange_weak(cur, cur - got, Relaxed, Relaxed)
            {
                Ok(_) => return got,
                Err(now) => cur = now,
            }
        }
    }

    /// Asks every sender to stop.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }
}

/// What one stream observed.
pub struct StreamResult {
    pub histogram: Histogram<u64>,
    pub error: Option<String>,
}

/// Builds the synthetic traffic.
#[derive(Clone)]
pub struct Generator {
    apps: usize,
    fcm_per_mille: u64,
    token_pool: u64,
    campaign: String,
    next: Arc<AtomicU64>,
}

impl Generator {
    pub fn new(s: &Settings) -> Self {
        Generator {
            apps: s.apps,
            fcm_per_mille: (s.fcm_share * 1000.0).round() as u64,
            token_pool: s.token_pool,
            campaign: format!("load-{}", s.name),
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The batch template: personalized title and body, one data entry.
    pub fn template() -> proto::Template {
        proto::Template {
            title: "Hi {{ first_name }}".into(),
            body: "{{ first_name }}, {{ cart_items }} items are still waiting in your cart".into(),
            sound: "default".into(),
            data: [("screen".to_string(), "cart".to_string())].into(),
            ..Default::default()
        }
    }

    /// Platform of global recipient `k`: a fixed pseudo-random spread with the configured share.
    fn is_fcm(&self, k: u64) -> bool {
        (k.wrapping_mul(2_654_435_761) >> 7) % 1000 < self.fcm_per_mille
    }

    /// Batch `seq` of a stream, `n` recipients, sent `t_us` after the start.
    pub fn batch(
        &self,
        stream: usize,
        seq: u64,
        n: u64,
        t_us: u64,
        wait: bool,
    ) -> proto::SendBatchRequest {
        let first = self.next.fetch_add(n, Relaxed);
        let batch_id = format!("s{stream}-b{seq}-t{t_us}");
        let recipients = (0..n)
            .map(|i| {
                let k = first + i;
                let slot = k % self.token_pool;
                let fcm = self.is_fcm(k);
                proto::Recipient {
                    message_id: format!("{batch_id}-{i}"),
                    platform: if fcm {
                        proto::Platform::Fcm as i32
                    } else {
                        proto::Platform::Apns as i32
                    },
                    device_token: if fcm {
                        fcm_token(slot)
                    } else {
                        apns_token(slot)
                    },
                    vars: [
                        ("first_name".to_string(), format!("User{k}")),
                        ("cart_items".to_string(), (k % 7 + 1).to_string()),
                    ]
                    .into(),
                    user_id: format!("user-{k}"),
                    ..Default::default()
                }
            })
            .collect();
        proto::SendBatchRequest {
            app_id: app_id((seq as usize + stream) % self.apps),
            batch_id,
            campaign_id: self.campaign.clone(),
            template: Some(Self::template()),
            recipients,
            wait_for_receipts: wait,
            ..Default::default()
        }
    }
}

/// Parses the send instant (µs since start) out of a batch id.
fn sent_at_us(batch_id: &str) -> Option<u64> {
    batch_id.rsplit_once("-t")?.1.parse().ok()
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("histogram bounds")
}

/// When the sender of one stream should send its next batch.
struct Pacer {
    start: Instant,
    /// Seconds between batches of this stream; `None` = open loop.
    interval: Option<f64>,
    burst: Option<(f64, f64)>,
    sent_batches: u64,
    /// Seconds added by skipped "off" phases.
    skipped: f64,
}

impl Pacer {
    fn next(&mut self) -> Option<Instant> {
        let interval = self.interval?;
        let mut at = self.sent_batches as f64 * interval + self.skipped;
        if let Some((on, off)) = self.burst {
            let cycle = on + off;
            let phase = at % cycle;
            if phase >= on {
                self.skipped += cycle - phase;
                at += cycle - phase;
            }
        }
        self.sent_batches += 1;
        Some(self.start + Duration::from_secs_f64(at))
    }
}

/// Records one receipt.
fn record(live: &Live, hist: &mut Histogram<u64>, start: Instant, r: &proto::Receipt) {
    let status = usize::try_from(r.status).unwrap_or(0).min(7);
    live.by_status[status].fetch_add(1, Relaxed);
    if !r.terminal {
        return;
    }
    if status == 3 && r.attempt == 0 {
        live.rejected_at_ingest.fetch_add(1, Relaxed);
    }
    live.terminal.fetch_add(1, Relaxed);
    let now_us = start.elapsed().as_micros() as u64;
    live.last_terminal_us.fetch_max(now_us, Relaxed);
    if let Some(sent) = sent_at_us(&r.batch_id) {
        let _ = hist.record(now_us.saturating_sub(sent).max(1));
    }
}

/// Runs the whole client side against `target` (`http://127.0.0.1:PORT`) and returns each
/// stream's result. `live` is updated as receipts arrive.
pub async fn run(
    s: &Settings,
    target: &str,
    live: Arc<Live>,
    start: Instant,
) -> anyhow::Result<Vec<StreamResult>> {
    live.budget.store(s.messages.unwrap_or(u64::MAX), Relaxed);
    let generator = Generator::new(s);
    let send_until = start + Duration::from_secs_f64(s.duration_secs);
    let hard_deadline = send_until + Duration::from_secs_f64(s.drain_secs);
    let endpoint = Endpoint::from_shared(target.to_string())
        .context("gateway URL")?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20));
    let per_stream_interval = s.rate.map(|r| s.batch_size as f64 / (r / s.streams as f64));
    let burst = (s.burst_on_secs > 0.0 && s.burst_off_secs > 0.0)
        .then_some((s.burst_on_secs, s.burst_off_secs));
    let mut tasks = Vec::new();
    for stream in 0..s.streams {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the gateway at {target}"))?;
        let pacer = Pacer {
            start: start
                + Duration::from_secs_f64(
                    per_stream_interval.unwrap_or(0.0) * stream as f64 / s.streams as f64,
                ),
            interval: per_stream_interval,
            burst,
            sent_batches: 0,
            skipped: 0.0,
        };
        let ctx = StreamCtx {
            stream,
            batch_size: s.batch_size as u64,
            generator: generator.clone(),
            live: Arc::clone(&live),
            start,
            send_until,
            hard_deadline,
            pacer,
        };
        let histogram = new_histogram()?;
        tasks.push(match s.mode {
            Mode::Stream => tokio::spawn(stream_task(ctx, channel, histogram)),
            Mode::Unary => tokio::spawn(unary_task(ctx, channel, histogram)),
        });
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.context("stream task panicked")?);
    }
    Ok(results)
}

struct StreamCtx {
    stream: usize,
    batch_size: u64,
    generator: Generator,
    live: Arc<Live>,
    start: Instant,
    send_until: Instant,
    hard_deadline: Instant,
    pacer: Pacer,
}

impl StreamCtx {
    /// Waits for the next send slot; `None` when sending is over.
    async fn next_batch(&mut self, seq: u64, wait: bool) -> Option<proto::SendBatchRequest> {
        if let Some(at) = self.pacer.next() {
            if at >= self.send_until {
                return None;
            }
            tokio::time::sleep_until(at).await;
        }
        if Instant::now() >= self.send_until || self.live.stop.load(Relaxed) {
            return None;
        }
        let n = self.live.take(self.batch_size);
        if n == 0 {
            return None;
        }
        let t_us = self.start.elapsed().as_micros() as u64;
        Some(self.generator.batch(self.stream, seq, n, t_us, wait))
    }
}

async fn stream_task(
    mut ctx: StreamCtx,
    channel: Channel,
    mut histogram: Histogram<u64>,
) -> StreamResult {
    let mut client = PushGatewayClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<proto::SendBatchRequest>(2);
    let mut response = match client.stream_send(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            ctx.live.grpc_errors.fetch_add(1, Relaxed);
            return StreamResult {
                histogram,
                error: Some(format!("StreamSend: {status}")),
            };
        }
    };
    let live = Arc::clone(&ctx.live);
    let hard_deadline = ctx.hard_deadline;
    let start = ctx.start;
    let sent_here = Arc::new(AtomicU64::new(0));
    let sender_done = Arc::new(AtomicBool::new(false));
    let sender = {
        let sent_here = Arc::clone(&sent_here);
        let sender_done = Arc::clone(&sender_done);
        tokio::spawn(async move {
            let mut seq = 0u64;
            while let Some(batch) = ctx.next_batch(seq, false).await {
                let n = batch.recipients.len() as u64;
                // Count before the send: receipts may come back before `send` returns.
                sent_here.fetch_add(n, Relaxed);
                ctx.live.sent.fetch_add(n, Relaxed);
                let sent = tokio::time::timeout_at(ctx.send_until, tx.send(batch)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    // Not handed over (deadline while the gateway pushed back, or the stream
                    // closed): take the count back.
                    sent_here.fetch_sub(n, Relaxed);
                    ctx.live.sent.fetch_sub(n, Relaxed);
                    break;
                }
                let now_us = ctx.start.elapsed().as_micros() as u64;
                ctx.live.last_sent_us.fetch_max(now_us, Relaxed);
                seq += 1;
            }
            sender_done.store(true, Relaxed);
            // Dropping `tx` ends the request stream; the gateway ends the response stream once
            // every receipt of this stream has gone out.
        })
    };
    let mut error = None;
    let mut terminal_here = 0u64;
    loop {
        if sender_done.load(Relaxed) && terminal_here >= sent_here.load(Relaxed) {
            break;
        }
        let next = tokio::time::timeout_at(hard_deadline, response.message()).await;
        match next {
            Ok(Ok(Some(r))) => {
                if r.terminal {
                    terminal_here += 1;
                }
                record(&live, &mut histogram, start, &r);
            }
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                live.grpc_errors.fetch_add(1, Relaxed);
                error = Some(format!("StreamSend: {status}"));
                break;
            }
            Err(_) => {
                error = Some(format!(
                    "drain deadline: {} receipts missing on this stream",
                    sent_here.load(Relaxed).saturating_sub(terminal_here)
                ));
                break;
            }
        }
    }
    sender.abort();
    StreamResult { histogram, error }
}

async fn unary_task(
    mut ctx: StreamCtx,
    channel: Channel,
    mut histogram: Histogram<u64>,
) -> StreamResult {
    let mut client = PushGatewayClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut error = None;
    let mut seq = 0u64;
    while let Some(batch) = ctx.next_batch(seq, true).await {
        seq += 1;
        let n = batch.recipients.len() as u64;
        ctx.live.sent.fetch_add(n, Relaxed);
        let now_us = ctx.start.elapsed().as_micros() as u64;
        ctx.live.last_sent_us.fetch_max(now_us, Relaxed);
        let call = tokio::time::timeout_at(ctx.hard_deadline, client.send_batch(batch)).await;
        let response = match call {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                ctx.live.grpc_errors.fetch_add(1, Relaxed);
                error = Some(format!("SendBatch: {status}"));
                break;
            }
            Err(_) => {
                error = Some("drain deadline: a SendBatch call did not finish".into());
                break;
            }
        };
        for r in &response.receipts {
            record(&ctx.live, &mut histogram, ctx.start, r);
        }
        // Rejections come back as results, not receipts: count them as REJECTED receipts.
        let rejected = response.results.iter().filter(|r| !r.accepted).count() as u64;
        if rejected > 0 {
            ctx.live.by_status[3].fetch_add(rejected, Relaxed);
            ctx.live.rejected_at_ingest.fetch_add(rejected, Relaxed);
            ctx.live.terminal.fetch_add(rejected, Relaxed);
        }
    }
    StreamResult { histogram, error }
}

/// Status counts by name (non-zero only).
pub fn status_counts(live: &Live) -> BTreeMap<String, u64> {
    STATUS_NAMES
        .iter()
        .zip(live.by_status.iter())
        .map(|(name, v)| (name.to_string(), v.load(Relaxed)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Teaches the gateway `suppressed_tokens` dead APNs tokens per app before a `policies` run:
/// the mock answers 410 for each, and one message to each (waiting for its receipts) makes the
/// gateway remember it, as it would learn them in production.
pub async fn teach_suppressed_tokens(s: &Settings, url: &str, mocks: &Mocks) -> anyhow::Result<()> {
    let af = mocks.apns.faults();
    for n in 0..s.suppressed_tokens {
        af.add_unregistered(&dead_token(n), Some(1_700_000_000_000));
    }
    // Teaching is set-up, not the measured run: the mocks answer it at once, then go back to
    // the run's latency (200 ms answers made teaching 100,000 tokens take minutes).
    let latency = s.latency();
    af.set_latency(Duration::ZERO);
    let taught = teach(s, url).await;
    af.set_latency(latency);
    taught
}

async fn teach(s: &Settings, url: &str) -> anyhow::Result<()> {
    let mut client = PushGatewayClient::connect(url.to_owned())
        .await
        .context("connecting to the gateway to teach it dead tokens")?
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let started = std::time::Instant::now();
    for app in 0..s.apps {
        let mut n = 0;
        while n < s.suppressed_tokens {
            let end = (n + 1_000).min(s.suppressed_tokens);
            let recipients = (n..end)
                .map(|k| proto::Recipient {
                    message_id: format!("dead-{app}-{k}"),
                    platform: proto::Platform::Apns as i32,
                    device_token: dead_token(k),
                    vars: [
                        ("first_name".to_string(), "Gone".to_string()),
                        ("cart_items".to_string(), "1".to_string()),
                    ]
                    .into(),
                    user_id: format!("dead-user-{k}"),
                    ..Default::default()
                })
                .collect();
            let response = client
                .send_batch(proto::SendBatchRequest {
                    app_id: app_id(app),
                    template: Some(Generator::template()),
                    recipients,
                    wait_for_receipts: true,
                    ..Default::default()
                })
                .await
                .context("teaching dead tokens")?
                .into_inner();
            anyhow::ensure!(
                response.rejected == 0,
                "the gateway refused dead-token messages: {:?}",
                response.results.iter().find(|r| !r.accepted)
            );
            n = end;
        }
    }
    if !s.quiet {
        println!(
            "taught {} dead tokens to each of {} apps in {:.1} s",
            s.suppressed_tokens,
            s.apps,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_carry_the_send_instant() {
        assert_eq!(sent_at_us("s1-b22-t12345"), Some(12345));
        assert_eq!(sent_at_us("other"), None);
    }

    #[test]
    fn pacer_skips_off_phases() {
        let mut p = Pacer {
            start: Instant::now(),
            interval: Some(0.5),
            burst: Some((1.0, 1.0)),
            sent_batches: 0,
            skipped: 0.0,
        };
        let offsets: Vec<f64> = (0..4)
            .map(|_| (p.next().unwrap() - p.start).as_secs_f64())
            .collect();
        assert_eq!(offsets, [0.0, 0.5, 2.0, 2.5]);
    }

    #[test]
    fn budget_is_never_exceeded() {
        let live = Live::default();
        live.budget.store(1200, Relaxed);
        assert_eq!(live.take(500), 500);
        assert_eq!(live.take(500), 500);
        assert_eq!(live.take(500), 200);
        assert_eq!(live.take(500), 0);
    }
}
