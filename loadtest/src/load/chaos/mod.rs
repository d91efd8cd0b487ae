//! `pushgate-loadtest chaos`: a long mixed workload against two or three gateway replicas on one
//! Redis, with faults injected on a schedule, checked afterwards against three ledgers (see
//! [`ledger`]).
//!
//! The workload: several apps, both providers in every batch (even message numbers APNs, odd
//! FCM), personalized templates, a few dead tokens (INVALID_TOKEN is their right answer), one
//! app with a frequency cap on a small pool of users (DROPPED `frequency_cap` is right there),
//! and every 20th batch scheduled two seconds ahead. Batches go through `SendBatch` to the
//! replicas in turn; a call that fails without an answer (its replica was killed) counts as
//! "unknown", not as accepted.
//!
//! The faults ([`faults`]) rotate through provider faults at the in-process mocks, process
//! faults (a replica killed and restarted, a SIGTERM rolling restart, Redis killed and restarted
//! from its AOF, or a Sentinel failover), and network faults below the application when the
//! machine allows network namespaces ([`netns`]).

pub mod cluster;
pub mod faults;
pub mod ledger;
pub mod netns;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use prost::Message as _;
use serde::Serialize;

use super::env::{self, Scratch, app_id, topic};
use super::proto;
use cluster::{Redis, Replica};
use faults::{Fault, FaultLog};
use ledger::{ACCEPTED, CAPPED, DEAD, Ledger, REFUSED, Reconciled, SCHEDULED, UNKNOWN};

/// What a chaos run does.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosSettings {
    /// The `pushgate` binary the replicas run.
    pub gateway_bin: PathBuf,
    /// Seconds of sending (faults are injected during it).
    pub duration_secs: f64,
    /// Target messages per second over all senders.
    pub rate: f64,
    /// Gateway replicas (2 or 3).
    pub replicas: usize,
    /// Apps (at least 2: app1 has the frequency cap).
    pub apps: usize,
    pub batch_size: usize,
    /// Concurrent SendBatch loops.
    pub senders: usize,
    /// A primary and a replica under three Sentinels instead of one Redis; the Redis fault is
    /// then a failover.
    pub sentinel: bool,
    /// `redis.min_replicas_acked` of the replicas (Sentinel runs).
    pub min_replicas_acked: u32,
    /// Seconds between the start of one fault and the next.
    pub fault_every_secs: f64,
    /// Only these faults (by name); empty: all that can run here.
    pub only: Vec<String>,
    /// Network faults with `ip netns` + `tc netem`: `auto` (when available), `off`, `require`.
    pub netns: netns::Mode,
    /// Seconds to wait after sending for every accepted message's terminal receipt.
    pub drain_secs: f64,
    /// Mock response latency, ms.
    pub latency_ms: u64,
    /// The providers' `request_timeout_ms` at the replicas (the slow-response fault exceeds it).
    pub request_timeout_ms: u64,
    pub lease_ms: u64,
    pub json: Option<PathBuf>,
    pub quiet: bool,
}

impl Default for ChaosSettings {
    fn default() -> Self {
        Self {
            gateway_bin: PathBuf::from("target/release/pushgate"),
            duration_secs: 60.0,
            rate: 500.0,
            replicas: 2,
            apps: 3,
            batch_size: 50,
            senders: 4,
            sentinel: false,
            min_replicas_acked: 1,
            fault_every_secs: 8.0,
            only: Vec::new(),
            netns: netns::Mode::Auto,
            drain_secs: 120.0,
            latency_ms: 5,
            request_timeout_ms: 1_000,
            lease_ms: 3_000,
            json: None,
            quiet: false,
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub settings: ChaosSettings,
    pub elapsed_secs: f64,
    pub send_secs: f64,
    /// Messages callers were told were accepted, per second of sending.
    pub accepted_per_sec: f64,
    pub messages_sent: u64,
    pub call_errors: u64,
    pub faults: std::collections::BTreeMap<String, u64>,
    pub faults_skipped: Vec<String>,
    pub windows: Vec<ledger::Window>,
    pub ledger: Reconciled,
    /// Accepted messages still without a terminal receipt when the drain ended.
    pub unfinished_at_end: u64,
    pub pass: bool,
}

impl ChaosReport {
    /// The run's verdict: nothing lost, no wrong status, every accepted message finished,
    /// nothing delivered that the caller was told was not accepted.
    fn verdict(&self) -> bool {
        self.ledger.lost == 0
            && self.ledger.wrong_status == 0
            && self.unfinished_at_end == 0
            && self.ledger.delivered_not_accepted == 0
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the chaos scenario and reconciles the ledgers. Errors are set-up failures; a run that
/// loses messages returns a report with `pass = false`.
pub async fn run(s: &ChaosSettings) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!((2..=3).contains(&s.replicas), "--replicas must be 2 or 3");
    anyhow::ensure!(
        s.apps >= 2,
        "--apps must be at least 2 (app1 carries the cap)"
    );
    anyhow::ensure!(
        s.rate > 0.0 && s.duration_secs > 0.0,
        "--rate and --duration must be > 0"
    );
    let scratch = Scratch::new()?;
    let dir = scratch.0.clone();

    let mocks = start_mocks(s).await?;
    let capacity = (s.rate * s.duration_secs * 1.25) as u64 + (s.batch_size * s.senders * 4) as u64;
    let ledger = Arc::new(Ledger::new(capacity, now_ms()));
    let l = Arc::clone(&ledger);
    mocks
        .apns
        .faults()
        .set_on_accepted(Arc::new(move |token: &str| l.delivered(token, now_ms())));
    let l = Arc::clone(&ledger);
    mocks
        .fcm
        .faults()
        .set_on_accepted(Arc::new(move |token: &str| l.delivered(token, now_ms())));
    // The dead tokens (see `batch`): each provider says 410/404 for them.
    for n in (0..capacity).filter(|n| is_dead(*n)) {
        if n.is_multiple_of(2) {
            mocks
                .apns
                .faults()
                .add_unregistered(&ledger::token(n), None);
        } else {
            mocks.fcm.faults().add_unregistered(&ledger::token(n));
        }
    }

    let net = netns::Net::prepare(s.netns).await?;
    let mut redis = match (s.sentinel, net.redis_home()) {
        (true, _) => Redis::sentinel().await?,
        (false, Some((ns, addr))) => Redis::single_in_netns(ns, addr)?,
        (false, None) => Redis::single()?,
    };
    let mut replicas = Vec::new();
    let mut metrics_ports = Vec::new();
    for i in 0..s.replicas {
        let port = env::free_port()?;
        let metrics_port = env::free_port()?;
        metrics_ports.push(metrics_port);
        let config = write_config(s, &mocks, &dir, i, port, metrics_port, &redis)?;
        let mut r = Replica::new(i, port, config, &dir, &s.gateway_bin);
        r.start().await?;
        replicas.push(r);
    }
    for r in &replicas {
        anyhow::ensure!(
            r.wait_serving(Duration::from_secs(30)).await,
            "replica {} never reported SERVING",
            r.index
        );
    }
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();

    let stop_sending = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let primary = Arc::new(parking_lot::Mutex::new(redis.node_urls()));
    let reader = tokio::spawn(read_receipts(
        Arc::clone(&ledger),
        Arc::clone(&primary),
        s.apps,
        Arc::clone(&stop_reading),
    ));
    let interrupted = Arc::new(AtomicBool::new(false));
    let ctrl_c = {
        let (stop, flag) = (Arc::clone(&stop_sending), Arc::clone(&interrupted));
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Relaxed);
                stop.store(true, Relaxed);
            }
        })
    };
    let start = tokio::time::Instant::now();
    let mut senders = Vec::new();
    for k in 0..s.senders {
        senders.push(tokio::spawn(send_loop(SendLoop {
            k,
            s: s.clone(),
            urls: urls.clone(),
            ledger: Arc::clone(&ledger),
            next: Arc::clone(&next),
            sent: Arc::clone(&sent),
            errors: Arc::clone(&errors),
            stop: Arc::clone(&stop_sending),
        })));
    }
    let progress = (!s.quiet).then(|| {
        let (sent, ledger, stop) = (
            Arc::clone(&sent),
            Arc::clone(&ledger),
            Arc::clone(&stop_reading),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            while !stop.load(Relaxed) {
                tick.tick().await;
                eprintln!(
                    "[{:>6.1}s] sent {} accepted {} unfinished {}",
                    start.elapsed().as_secs_f64(),
                    sent.load(Relaxed),
                    ledger.accepted_count(),
                    ledger.unfinished()
                );
            }
        })
    });

    // The fault schedule runs while the senders send.
    let mut log = FaultLog::default();
    let schedule = faults::schedule(s, &net);
    log.skipped = schedule.skipped.clone();
    let end = start + Duration::from_secs_f64(s.duration_secs);
    let settle_process = Duration::from_millis(s.lease_ms + 3_000);
    let mut i = 0usize;
    tokio::time::sleep(Duration::from_secs(3).min(Duration::from_secs_f64(s.duration_secs / 4.0)))
        .await;
    while !schedule.faults.is_empty() && !stop_sending.load(Relaxed) {
        let began = tokio::time::Instant::now();
        // The next fault in the rotation that can end, and settle, before the sending ends.
        let fits = |f: &Fault| began + f.budget(s) + settle_process <= end;
        let Some(fault) = (0..schedule.faults.len())
            .map(|k| schedule.faults[(i + k) % schedule.faults.len()])
            .find(fits)
        else {
            break;
        };
        i = schedule
            .faults
            .iter()
            .position(|f| *f == fault)
            .unwrap_or(0)
            + 1;
        let from = now_ms();
        let kind = faults::inject(fault, s, &mocks, &mut replicas, &mut redis, &net)
            .await
            .with_context(|| format!("injecting {}", fault.name()))?;
        *primary.lock() = redis.node_urls();
        log.record(&kind, from, now_ms(), fault.settle(s));
        let gap = Duration::from_secs_f64(s.fault_every_secs);
        let next_at = began + gap;
        while tokio::time::Instant::now() < next_at && !stop_sending.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while tokio::time::Instant::now() < end && !stop_sending.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_sending.store(true, Relaxed);
    for t in senders {
        let _ = t.await;
    }
    let send_secs = start.elapsed().as_secs_f64();
    // Drain: every accepted message's terminal receipt, or the deadline.
    let drain_end = tokio::time::Instant::now() + Duration::from_secs_f64(s.drain_secs);
    while ledger.unfinished() > 0 && tokio::time::Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The reader's last round, then stop it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop_reading.store(true, Relaxed);
    let _ = reader.await;
    if let Some(p) = progress {
        p.abort();
    }
    ctrl_c.abort();
    let elapsed = start.elapsed().as_secs_f64();
    let unfinished = ledger.unfinished();
    if keep_logs() {
        // What each replica still holds, by stage, for the kept logs.
        for (i, port) in metrics_ports.iter().enumerate() {
            let text = scrape_metrics(*port)
                .await
                .unwrap_or_else(|e| format!("# scrape failed: {e:#}\n"));
            let _ = std::fs::write(dir.join(format!("gateway-{i}.metrics")), text);
        }
    }
    for r in &mut replicas {
        r.terminate(Duration::from_secs(10)).await;
    }
    let reconciled = ledger.reconcile(&log.windows);
    let mut report = ChaosReport {
        settings: s.clone(),
        elapsed_secs: elapsed,
        send_secs,
        accepted_per_sec: reconciled.accepted as f64 / send_secs.max(1e-9),
        messages_sent: sent.load(Relaxed),
        call_errors: errors.load(Relaxed),
        faults: log.counts.clone(),
        faults_skipped: log.skipped.clone(),
        windows: log.windows.clone(),
        ledger: reconciled,
        unfinished_at_end: unfinished,
        pass: false,
    };
    report.pass = report.verdict() && !interrupted.load(Relaxed);
    mocks.apns.shutdown().await;
    mocks.fcm.shutdown().await;
    if keep_logs() {
        let kept = dir.with_extension("kept");
        let _ = std::fs::rename(&dir, &kept);
        eprintln!("logs kept in {}", kept.display());
    }
    drop(redis);
    net.teardown().await;
    Ok(report)
}

/// Prints the report's figures.
pub fn print(r: &ChaosReport) {
    let l = &r.ledger;
    println!(
        "chaos run: {:.0} s of sending ({:.0} s in all)",
        r.send_secs, r.elapsed_secs
    );
    println!(
        "  messages: {} sent, {} accepted ({:.0}/s), {} refused, {} unknown (calls cut by a kill), {} call errors",
        r.messages_sent, l.accepted, r.accepted_per_sec, l.refused, l.unknown, r.call_errors
    );
    let faults: Vec<String> = r.faults.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!("  faults injected: {}", faults.join(", "));
    if !r.faults_skipped.is_empty() {
        println!("  faults skipped: {}", r.faults_skipped.join("; "));
    }
    println!("  lost: {} {:?}", l.lost, l.lost_examples);
    println!(
        "  wrong statuses: {} {:?}",
        l.wrong_status, l.wrong_examples
    );
    println!(
        "  unfinished at the end: {}, delivered without a receipt: {}",
        r.unfinished_at_end, l.no_receipt
    );
    println!(
        "  duplicates delivered: {} extra deliveries of {} messages; by fault window {:?}; outside any: {}",
        l.duplicate_deliveries,
        l.duplicated_messages,
        l.duplicates_by_fault,
        l.duplicates_outside_faults
    );
    println!(
        "  receipts repeated with the same status: {} ({} outside fault windows); delivered though refused: {} (must be 0); delivered of those unknown: {}",
        l.repeated_receipts,
        l.repeated_receipts_outside_faults,
        l.delivered_not_accepted,
        l.delivered_unknown
    );
    println!("  terminal statuses: {:?}", l.statuses);
    println!(
        "  receipt latency outside fault windows ({} receipts): p50 {} ms, p99 {} ms (p99 over all: {} ms)",
        l.receipts_outside_faults,
        show(l.p50_receipt_ms_outside_faults),
        show(l.p99_receipt_ms_outside_faults),
        show(l.p99_receipt_ms_all)
    );
    println!("  verdict: {}", if r.pass { "PASS" } else { "FAIL" });
}

fn show(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

async fn start_mocks(s: &ChaosSettings) -> anyhow::Result<env::Mocks> {
    let settings = super::settings::Settings {
        cleartext: true,
        latency_ms: s.latency_ms as f64,
        apps: s.apps,
        ..Default::default()
    };
    env::start_mocks(&settings).await
}

/// `PUSHGATE_CHAOS_KEEP` set: the replicas' logs, configs and final metrics are kept.
fn keep_logs() -> bool {
    std::env::var_os("PUSHGATE_CHAOS_KEEP").is_some()
}

/// A replica's Prometheus metrics (plain HTTP/1.0 GET, read to the end).
async fn scrape_metrics(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await??;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body)).await??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[allow(clippy::too_many_arguments)]
fn write_config(
    s: &ChaosSettings,
    mocks: &env::Mocks,
    dir: &Path,
    index: usize,
    port: u16,
    metrics_port: u16,
    redis: &Redis,
) -> anyhow::Result<PathBuf> {
    let key_file = dir.join(format!("AuthKey_{}.p8", mocks.apns_key.key_id));
    std::fs::write(&key_file, &mocks.apns_key.private_p8_pem)?;
    let sa_file = dir.join("service-account.json");
    std::fs::write(&sa_file, &mocks.account_json)?;
    let mut cfg = format!(
        "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n[pipeline]\nshutdown_grace_secs = 5\n\n\
         [retry]\nbase_ms = 100\ncap_ms = 2000\nmax_attempts = 40\n\n\
         [redis]\n{redis}lease_ms = {lease}\npoll_ms = 20\ncommand_timeout_ms = 1000\n\
         receipts_stream_maxlen = 5000000\n",
        redis = redis.config_keys(),
        lease = s.lease_ms,
    );
    if s.sentinel && s.min_replicas_acked > 0 {
        writeln!(
            cfg,
            "min_replicas_acked = {}\nreplica_ack_timeout_ms = 500",
            s.min_replicas_acked
        )?;
    }
    for i in 0..s.apps {
        if i == 1 {
            write!(
                cfg,
                "\n[apps.{}]\nfrequency_caps = [{{ max = 20, window = \"1h\" }}]\n",
                app_id(i)
            )?;
        }
        write!(
            cfg,
            "\n[apps.{app}.apns]\nkey_file = \"{key}\"\nkey_id = \"{kid}\"\nteam_id = \"{team}\"\n\
             topic = \"{topic}\"\nendpoint = \"{ep}\"\nconnections = 2\nrequest_timeout_ms = {rt}\n\
             \n[apps.{app}.fcm]\ncredentials_file = \"{sa}\"\nendpoint = \"{fep}\"\nconnections = 2\n\
             request_timeout_ms = {rt}\n",
            app = app_id(i),
            key = key_file.display(),
            kid = mocks.apns_key.key_id,
            team = mocks.apns_key.team_id,
            topic = topic(i),
            ep = mocks.apns.url(),
            sa = sa_file.display(),
            fep = mocks.fcm.url(),
            rt = s.request_timeout_ms,
        )?;
    }
    let path = dir.join(format!("gateway-{index}.toml"));
    std::fs::write(&path, cfg)?;
    Ok(path)
}

struct SendLoop {
    k: usize,
    s: ChaosSettings,
    urls: Vec<String>,
    ledger: Arc<Ledger>,
    next: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// One sender: batches at its share of the rate, to its replica, moving to the next one when a
/// call fails.
async fn send_loop(l: SendLoop) {
    let s = &l.s;
    let per_sec = s.rate / s.senders as f64;
    let interval = Duration::from_secs_f64((s.batch_size as f64 / per_sec).max(0.001));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut target = l.k % l.urls.len();
    let mut client = None;
    let mut seq = 0u64;
    while !l.stop.load(Relaxed) {
        tick.tick().await;
        if client.is_none() {
            client = connect(&l.urls[target]).await;
            if client.is_none() {
                target = (target + 1) % l.urls.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let n0 = l.next.fetch_add(s.batch_size as u64, Relaxed);
        if n0 + s.batch_size as u64 > l.ledger.capacity() {
            return;
        }
        seq += 1;
        let app = ((seq as usize) + l.k) % s.apps;
        let scheduled = seq.is_multiple_of(20);
        let request = batch(&l.ledger, app, n0, s.batch_size as u64, scheduled);
        l.sent.fetch_add(s.batch_size as u64, Relaxed);
        let Some(c) = client.as_mut() else { continue };
        match c.send_batch(request).await {
            Ok(response) => {
                for r in response.into_inner().results {
                    if let Some(n) = ledger::id_number(&r.message_id) {
                        // A recipient whose accept may have been applied (its reply lost, not
                        // undone yet) is neither accepted nor refused.
                        let told = match (r.accepted, r.maybe_accepted) {
                            (true, _) => ACCEPTED,
                            (false, true) => UNKNOWN,
                            (false, false) => REFUSED,
                        };
                        l.ledger.told(n, told);
                    }
                }
            }
            Err(status) => {
                l.errors.fetch_add(1, Relaxed);
                // Refused as a whole by a live gateway (Redis away): nothing was accepted. Any
                // other failure (the replica died mid-call) leaves it unknown.
                let refused = status.code() == tonic::Code::Unavailable
                    && (status.message().contains("redis is unreachable")
                        || status.message().contains("shutting down"));
                for n in n0..n0 + s.batch_size as u64 {
                    l.ledger.told(n, if refused { REFUSED } else { UNKNOWN });
                }
                if !refused {
                    client = None;
                    target = (target + 1) % l.urls.len();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connect(
    url: &str,
) -> Option<proto::push_gateway_client::PushGatewayClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .ok()?;
    Some(proto::push_gateway_client::PushGatewayClient::new(channel))
}

/// Three messages in a thousand go to a token the providers call dead.
fn is_dead(n: u64) -> bool {
    n % 1000 < 3
}

/// The batch of messages `n0..n0 + count` for `app`.
fn batch(
    ledger: &Ledger,
    app: usize,
    n0: u64,
    count: u64,
    scheduled: bool,
) -> proto::SendBatchRequest {
    let recipients = (n0..n0 + count)
        .map(|n| {
            let mut class = 0;
            if is_dead(n) {
                class |= DEAD;
            }
            if app == 1 {
                class |= CAPPED;
            }
            if scheduled {
                class |= SCHEDULED;
            }
            ledger.set_class(n, class);
            proto::Recipient {
                message_id: ledger::message_id(n),
                platform: if n.is_multiple_of(2) {
                    proto::Platform::Apns as i32
                } else {
                    proto::Platform::Fcm as i32
                },
                device_token: ledger::token(n),
                vars: [
                    ("first_name".to_string(), format!("User{n}")),
                    ("cart_items".to_string(), (n % 7 + 1).to_string()),
                ]
                .into(),
                user_id: if app == 1 {
                    format!("capped-{}", n % 500)
                } else {
                    format!("u{n}")
                },
                ..Default::default()
            }
        })
        .collect();
    proto::SendBatchRequest {
        app_id: app_id(app),
        campaign_id: "chaos".into(),
        template: Some(super::driver::Generator::template()),
        recipients,
        send_at_ms: if scheduled { now_ms() + 2_000 } else { 0 },
        ..Default::default()
    }
}

/// Follows every app's receipts stream on the current primary and books each terminal
/// receipt; reconnects (to whichever node answers `ROLE` as primary) after an error.
async fn read_receipts(
    ledger: Arc<Ledger>,
    nodes: Arc<parking_lot::Mutex<Vec<String>>>,
    apps: usize,
    stop: Arc<AtomicBool>,
) {
    let keys: Vec<String> = (0..apps)
        .map(|i| format!("pushgate:{{{}}}:receipts", app_id(i)))
        .collect();
    let mut last: Vec<String> = vec!["0".into(); apps];
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    while !stop.load(Relaxed) {
        if conn.is_none() {
            let urls = nodes.lock().clone();
            conn = primary_conn(&urls).await;
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(20_000)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS");
        for k in &keys {
            cmd.arg(k);
        }
        for id in &last {
            cmd.arg(id);
        }
        let reply =
            tokio::time::timeout(Duration::from_secs(3), cmd.query_async::<redis::Value>(c)).await;
        match reply {
            Ok(Ok(value)) => book(&ledger, &keys, &mut last, value),
            _ => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn primary_conn(urls: &[String]) -> Option<redis::aio::MultiplexedConnection> {
    for url in urls {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            continue;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            continue;
        };
        let role: redis::RedisResult<Vec<redis::Value>> =
            redis::cmd("ROLE").query_async(&mut conn).await;
        let is_primary = role
            .ok()
            .and_then(|r| r.into_iter().next())
            .is_some_and(|v| matches!(&v, redis::Value::BulkString(b) if b == b"master"));
        if is_primary {
            return Some(conn);
        }
    }
    None
}

fn items(v: redis::Value) -> Vec<redis::Value> {
    match v {
        redis::Value::Array(a) => a,
        redis::Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

fn bytes(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Books an XREAD reply: `[[key, [[id, [field, value, ...]], ...]], ...]`.
fn book(ledger: &Ledger, keys: &[String], last: &mut [String], reply: redis::Value) {
    for stream in items(reply) {
        let mut parts = items(stream).into_iter();
        let (Some(key), Some(entries)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(slot) = bytes(&key).and_then(|k| keys.iter().position(|x| x.as_bytes() == k))
        else {
            continue;
        };
        for entry in items(entries) {
            let mut e = items(entry).into_iter();
            let (Some(id), Some(fields)) = (e.next(), e.next()) else {
                continue;
            };
            if let Some(id) = bytes(&id).and_then(|b| std::str::from_utf8(b).ok()) {
                last[slot] = id.to_string();
            }
            let fields = items(fields);
            for pair in fields.chunks(2) {
                if let [name, value] = pair
                    && bytes(name) == Some(b"r")
                    && let Some(encoded) = bytes(value)
                    && let Ok(r) = proto::Receipt::decode(encoded)
                    && r.terminal
                {
                    ledger.receipt(&r.message_id, r.status, r.accepted_at_ms, r.completed_at_ms);
                }
            }
        }
    }
}
