//! `pushgate-loadtest`: drives a pushgate gateway with personalized push traffic and reports
//! throughput, receipt latency and cost; or measures the mock providers' ceiling with a raw
//! HTTP/2 client. See `pushgate-loadtest run --help`.

use pushgate_loadtest::load;

// mimalloc, as in the gateway: glibc malloc/free was a fifth of the mocks' CPU in a profile, and
// every cycle the mocks spend is taken from the gateway they share the machine with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use load::driver::{self, Live};
use load::env::{self, GatewayChild, Mocks, Scratch};
use load::procstat::{self, CLIENT_THREAD, MOCK_THREAD};
use load::redis::{RedisCost, RedisTarget};
use load::report::{self, GatewayCost, Latency, Sample, Summary, ToolCost};
use load::settings::{CeilingTarget, Mode, Settings};

#[derive(Parser)]
#[command(
    name = "pushgate-loadtest",
    version,
    about = "Load generator for pushgate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drives a gateway (a child started with --gateway-bin, or a running one with --gateway).
    Run(Flags),
    /// Blasts the mock providers with a raw HTTP/2 client (no gateway) and reports req/s.
    Ceiling(Flags),
    /// Runs a mixed workload against 2-3 gateway replicas on one Redis while injecting faults,
    /// then reconciles what was accepted, delivered and receipted. Exits 1 when anything
    /// accepted was lost or a status was wrong.
    Chaos(ChaosFlags),
    /// Runs abusive request shapes (decode bombs, oversized batches, floods of streams and
    /// subscriptions, unread streams) from one key against a gateway child while another key
    /// keeps sending; reports the gateway's memory and answer per case. Exits 1 when the other
    /// caller saw a failure.
    Hostile(HostileFlags),
}

/// `hostile` flags.
#[derive(Args)]
struct HostileFlags {
    /// The pushgate binary to start.
    #[arg(long, default_value = "target/release/pushgate")]
    gateway_bin: PathBuf,
    /// Durable mode on a private redis-server.
    #[arg(long)]
    redis: bool,
    /// Only the cases whose name contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn hostile(f: HostileFlags) -> anyhow::Result<()> {
    let settings = load::hostile::HostileSettings {
        gateway_bin: f.gateway_bin,
        redis: f.redis,
        only: f.only,
    };
    let rt = runtime(CLIENT_THREAD, 2)?;
    let report = rt.block_on(load::hostile::run(&settings))?;
    load::hostile::print(&report);
    if let Some(path) = &f.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    if report.bystander_failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// `chaos` flags (defaults: a 60 s run at 500 msg/s with every fault this machine allows).
#[derive(Args)]
struct ChaosFlags {
    /// The pushgate binary the replicas run.
    #[arg(long, default_value = "target/release/pushgate")]
    gateway_bin: PathBuf,
    /// Seconds of sending.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Target messages/s over all senders.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Gateway replicas (2 or 3).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    #[arg(long, default_value_t = 3)]
    apps: usize,
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Concurrent SendBatch loops.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// A primary and a replica under three Sentinels (the Redis fault becomes a failover).
    #[arg(long)]
    sentinel: bool,
    /// `redis.min_replicas_acked` of the replicas in --sentinel runs.
    #[arg(long, default_value_t = 1)]
    min_replicas_acked: u32,
    /// Seconds between the starts of two faults.
    #[arg(long, default_value_t = 8.0)]
    fault_every: f64,
    /// Only these faults (comma-separated names, as the report prints them).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Network faults (Redis in its own namespace): auto, off, require.
    #[arg(long, value_enum, default_value = "auto")]
    netns: load::chaos::netns::Mode,
    /// Seconds to wait after sending for the last receipts.
    #[arg(long, default_value_t = 120.0)]
    drain: f64,
    /// The replicas' provider request timeout, ms (the slow-response fault exceeds it).
    #[arg(long, default_value_t = 1_000)]
    request_timeout_ms: u64,
    #[arg(long, default_value_t = 3_000)]
    lease_ms: u64,
    /// Mock response latency, ms.
    #[arg(long, default_value_t = 5)]
    latency_ms: u64,
    /// Worker threads of the tool's runtime (senders, mocks, receipts reader).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

fn chaos(f: ChaosFlags) -> anyhow::Result<()> {
    let settings = load::chaos::ChaosSettings {
        gateway_bin: f.gateway_bin,
        duration_secs: f.duration,
        rate: f.rate,
        replicas: f.replicas,
        apps: f.apps,
        batch_size: f.batch_size,
        senders: f.senders,
        sentinel: f.sentinel,
        min_replicas_acked: f.min_replicas_acked,
        fault_every_secs: f.fault_every,
        only: f.only,
        netns: f.netns,
        drain_secs: f.drain,
        latency_ms: f.latency_ms,
        request_timeout_ms: f.request_timeout_ms,
        lease_ms: f.lease_ms,
        json: f.json.clone(),
        quiet: f.quiet,
    };
    let rt = runtime(CLIENT_THREAD, f.threads)?;
    let report = rt.block_on(load::chaos::run(&settings))?;
    load::chaos::print(&report);
    if let Some(path) = &f.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    if !report.pass {
        std::process::exit(1);
    }
    Ok(())
}

/// Every flag overrides the scenario file's value of the same name.
#[derive(Args)]
struct Flags {
    /// Scenario TOML (loadtest/scenarios/*.toml).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// A running gateway, http://127.0.0.1:PORT (no mocks, no child).
    #[arg(long)]
    gateway: Option<String>,
    /// The pushgate binary to start as a child against the mocks.
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Concurrent StreamSend streams (or SendBatch calls).
    #[arg(long)]
    streams: Option<usize>,
    /// Target recipients/s over all streams.
    #[arg(long, conflicts_with = "open_loop")]
    rate: Option<f64>,
    /// As fast as the gateway takes them (clears a scenario's rate).
    #[arg(long)]
    open_loop: bool,
    /// Seconds of sending.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many recipients.
    #[arg(long)]
    messages: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    apps: Option<usize>,
    /// Share of FCM recipients, 0..1.
    #[arg(long)]
    fcm_share: Option<f64>,
    #[arg(long)]
    token_pool: Option<u64>,
    /// Per mille of tokens the mocks report as unregistered.
    #[arg(long)]
    unregistered_per_mille: Option<u32>,
    /// Mocks serve cleartext HTTP/2 (default TLS).
    #[arg(long)]
    cleartext: bool,
    /// Mock response latency, ms.
    #[arg(long)]
    latency_ms: Option<f64>,
    #[arg(long)]
    fault_429_per_mille: Option<u32>,
    #[arg(long)]
    fault_500_per_mille: Option<u32>,
    #[arg(long)]
    fault_503_per_mille: Option<u32>,
    /// Retry-After seconds on the FCM mock's injected 429/503 (0 = none).
    #[arg(long)]
    fcm_retry_after_secs: Option<u64>,
    #[arg(long)]
    burst_on_secs: Option<f64>,
    #[arg(long)]
    burst_off_secs: Option<f64>,
    /// Seconds to wait for outstanding receipts after sending stops.
    #[arg(long)]
    drain_secs: Option<f64>,
    #[arg(long)]
    gateway_connections: Option<usize>,
    #[arg(long)]
    accept_window: Option<usize>,
    #[arg(long)]
    max_in_flight_requests: Option<usize>,
    /// Every app's `frequency_caps` (TOML), e.g. '[{ max = 3, window = "1d" }]'.
    #[arg(long)]
    frequency_caps: Option<String>,
    /// Every delivery policy on: caps, quiet hours that do not fire, and a suppression list
    /// taught to the gateway before the run (see --suppressed-tokens).
    #[arg(long)]
    policies: bool,
    /// With --policies: dead APNs tokens per app suppressed during the run (default 100000).
    #[arg(long)]
    suppressed_tokens: Option<u64>,
    #[arg(long)]
    mock_threads: Option<usize>,
    #[arg(long)]
    client_threads: Option<usize>,
    /// Run the ceiling first (ceiling_secs) and report the ratio.
    #[arg(long)]
    with_ceiling: bool,
    #[arg(long)]
    ceiling_secs: Option<f64>,
    #[arg(long, value_enum)]
    ceiling_target: Option<CeilingTarget>,
    #[arg(long)]
    ceiling_connections: Option<usize>,
    #[arg(long)]
    ceiling_streams: Option<usize>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Durable mode: start a private redis-server for the gateway.
    #[arg(long, conflicts_with = "redis_url")]
    redis: bool,
    /// Durable mode against this Redis (redis://HOST:PORT/DB; the run writes keys there).
    #[arg(long)]
    redis_url: Option<String>,
}

impl Flags {
    fn settings(self) -> anyhow::Result<Settings> {
        let mut s = match &self.scenario {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        macro_rules! set {
            ($($flag:ident => $field:ident),* $(,)?) => {
                $(if let Some(v) = self.$flag { s.$field = v; })*
            };
        }
        set!(
            mode => mode, streams => streams, duration => duration_secs,
            batch_size => batch_size, apps => apps, fcm_share => fcm_share,
            token_pool => token_pool, unregistered_per_mille => unregistered_per_mille,
            latency_ms => latency_ms, fault_429_per_mille => fault_429_per_mille,
            fault_500_per_mille => fault_500_per_mille, fault_503_per_mille => fault_503_per_mille,
            burst_on_secs => burst_on_secs, burst_off_secs => burst_off_secs,
            drain_secs => drain_secs, gateway_connections => gateway_connections,
            mock_threads => mock_threads, client_threads => client_threads,
            ceiling_secs => ceiling_secs, ceiling_target => ceiling_target,
            ceiling_connections => ceiling_connections, ceiling_streams => ceiling_streams,
            suppressed_tokens => suppressed_tokens,
        );
        s.policies |= self.policies;
        if self.gateway.is_some() {
            s.gateway = self.gateway;
        }
        if self.gateway_bin.is_some() {
            s.gateway_bin = self.gateway_bin;
        }
        if self.frequency_caps.is_some() {
            s.frequency_caps = self.frequency_caps;
        }
        if self.rate.is_some() {
            s.rate = self.rate;
        }
        if self.open_loop {
            s.rate = None;
        }
        if self.fcm_retry_after_secs.is_some() {
            s.fcm_retry_after_secs = self.fcm_retry_after_secs;
        }
        if self.messages.is_some() {
            s.messages = self.messages;
        }
        if self.accept_window.is_some() {
            s.accept_window = self.accept_window;
        }
        if self.max_in_flight_requests.is_some() {
            s.max_in_flight_requests = self.max_in_flight_requests;
        }
        if self.json.is_some() {
            s.json = self.json;
        }
        if self.redis_url.is_some() {
            s.redis_url = self.redis_url;
        }
        s.redis |= self.redis;
        if self.html.is_some() {
            s.html = self.html;
        }
        s.cleartext |= self.cleartext;
        s.with_ceiling |= self.with_ceiling;
        s.quiet |= self.quiet;
        s.validate()?;
        Ok(s)
    }
}

fn runtime(name: &'static str, threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("starting the {name} runtime"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (flags, ceiling_only) = match cli.command {
        Command::Run(f) => (f, false),
        Command::Ceiling(f) => (f, true),
        Command::Chaos(f) => return chaos(f),
        Command::Hostile(f) => return hostile(f),
    };
    let settings = flags.settings()?;
    let client_rt = runtime(CLIENT_THREAD, settings.client_threads)?;
    if let Some(url) = settings.gateway.clone() {
        if ceiling_only || settings.with_ceiling {
            bail!("--gateway runs use no mocks: the ceiling needs the tool's own mocks");
        }
        let summary = client_rt.block_on(run_gateway(&settings, &url, None, None))?;
        return finish(&settings, &summary);
    }
    // The mocks get their own runtime so their CPU is measured apart from the client's.
    let mock_rt = runtime(MOCK_THREAD, settings.mock_threads)?;
    let mocks = mock_rt.block_on(env::start_mocks(&settings))?;
    let result = client_rt.block_on(async {
        if ceiling_only {
            let c = load::ceiling::run(&settings, &mocks).await?;
            report::print_ceiling(&c);
            if let Some(path) = &settings.json {
                std::fs::write(path, serde_json::to_string_pretty(&c)?)?;
            }
            return Ok(None);
        }
        let Some(bin) = settings.gateway_bin.clone() else {
            bail!("give --gateway-bin path/to/pushgate (or --gateway http://127.0.0.1:PORT)");
        };
        let ceiling = if settings.with_ceiling {
            let c = load::ceiling::run(&settings, &mocks).await?;
            report::print_ceiling(&c);
            Some(c)
        } else {
            None
        };
        let scratch = Scratch::new()?;
        let port = env::free_port()?;
        let redis = match (&settings.redis_url, settings.redis) {
            (Some(url), _) => Some(RedisTarget::external(url.clone())),
            (None, true) => Some(RedisTarget::start_private()?),
            (None, false) => None,
        };
        let redis_url = redis.as_ref().map(|r| r.url.as_str());
        let config = env::write_gateway_config(&settings, &mocks, &scratch.0, port, redis_url)?;
        let child = GatewayChild::start(&bin, &config, port, &scratch.0).await?;
        let url = format!("http://{}", child.addr);
        if settings.policies {
            driver::teach_suppressed_tokens(&settings, &url, &mocks).await?;
        }
        let redis_before = match &redis {
            Some(r) => Some(r.snapshot().await?),
            None => None,
        };
        let mut outcome = run_gateway(&settings, &url, Some(&child), Some(&mocks)).await;
        if let (Some(r), Some(before), Ok(summary)) = (&redis, &redis_before, &mut outcome) {
            let after = r.snapshot().await?;
            summary.redis = Some(RedisCost::between(before, &after, summary.terminal));
        }
        if outcome.is_err() {
            let log = std::fs::read_to_string(&child.log).unwrap_or_default();
            let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            eprintln!("gateway log (last lines, reversed):\n{tail}");
        }
        child.stop().await?;
        let mut summary = outcome?;
        if let Some(c) = ceiling {
            summary.ceiling_ratio = Some(summary.delivered_per_sec / c.req_per_sec.max(1e-9));
            summary.ceiling = Some(c);
        }
        Ok(Some(summary))
    });
    mock_rt.block_on(mocks.shutdown());
    if let Some(summary) = result? {
        finish(&settings, &summary)?;
    }
    Ok(())
}

fn finish(settings: &Settings, summary: &Summary) -> anyhow::Result<()> {
    report::print(summary);
    if let Some(path) = &settings.json {
        report::write_json(summary, path)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &settings.html {
        report::write_html(summary, path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Drives the gateway at `url`, with a live progress line, and builds the summary.
async fn run_gateway(
    s: &Settings,
    url: &str,
    child: Option<&GatewayChild>,
    mocks: Option<&Mocks>,
) -> anyhow::Result<Summary> {
    let ticks = procstat::clock_ticks();
    let gw_cpu0 = child.and_then(|c| procstat::process_cpu_secs(c.pid, ticks));
    let tool_cpu0 = procstat::self_cpu_secs(ticks).unwrap_or(0.0);
    let mock_cpu0 = procstat::threads_cpu_secs(MOCK_THREAD, ticks);
    let client_cpu0 = procstat::threads_cpu_secs(CLIENT_THREAD, ticks);
    let mock_req0 = mocks.map(Mocks::requests).unwrap_or(0);

    let live = Arc::new(Live::default());
    let start = tokio::time::Instant::now();
    // Ctrl-C stops sending; the run then drains and reports as usual.
    let interrupt = {
        let live = Arc::clone(&live);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                live.stop();
            }
        })
    };
    let bar = if s.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new((s.duration_secs * 10.0) as u64);
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:24}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let live = Arc::clone(&live);
        let done = Arc::clone(&done);
        let bar = bar.clone();
        let duration = s.duration_secs;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut last = (0u64, 0u64, 0u64);
            let mut last_t = 0.0f64;
            let mut n = 0u64;
            while !done.load(Relaxed) {
                tick.tick().await;
                n += 1;
                let t = start.elapsed().as_secs_f64();
                let now = (
                    live.sent.load(Relaxed),
                    live.terminal.load(Relaxed),
                    live.delivered(),
                );
                bar.set_position((t.min(duration) * 10.0) as u64);
                if n.is_multiple_of(4) {
                    let dt = (t - last_t).max(1e-9);
                    let sample = Sample {
                        t_secs: t,
                        sent_per_sec: (now.0 - last.0.min(now.0)) as f64 / dt,
                        terminal_per_sec: (now.1 - last.1.min(now.1)) as f64 / dt,
                        delivered_per_sec: (now.2 - last.2.min(now.2)) as f64 / dt,
                    };
                    bar.set_message(format!(
                        "sent {} ({:.0}/s) | receipts {} ({:.0}/s) | delivered {} | errors {}",
                        now.0,
                        sample.sent_per_sec,
                        now.1,
                        sample.terminal_per_sec,
                        now.2,
                        live.errors()
                    ));
                    samples.push(sample);
                    last = now;
                    last_t = t;
                }
            }
            samples
        })
    };
    let results = driver::run(s, url, Arc::clone(&live), start).await;
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Relaxed);
    interrupt.abort();
    let timeline: Vec<Sample> = sampler.await.unwrap_or_default();
    bar.finish_and_clear();
    let results = results?;

    let gw = child.map(|c| {
        let cpu = procstat::process_cpu_secs(c.pid, ticks).unwrap_or(0.0) - gw_cpu0.unwrap_or(0.0);
        (c.pid, cpu, procstat::peak_rss_bytes(c.pid).unwrap_or(0))
    });
    let tool_cpu = procstat::self_cpu_secs(ticks).unwrap_or(0.0) - tool_cpu0;
    let mock_cpu = procstat::threads_cpu_secs(MOCK_THREAD, ticks) - mock_cpu0;
    let client_cpu = procstat::threads_cpu_secs(CLIENT_THREAD, ticks) - client_cpu0;
    let mock_requests = mocks
        .map(Mocks::requests)
        .unwrap_or(0)
        .saturating_sub(mock_req0);

    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut stream_errors = Vec::new();
    for r in results {
        hist.add(&r.histogram)?;
        if let Some(e) = r.error {
            stream_errors.push(e);
        }
    }
    let sent = live.sent.load(Relaxed);
    let terminal = live.terminal.load(Relaxed);
    let rejected = live.rejected_at_ingest.load(Relaxed);
    let delivered = live.delivered();
    // Until the last batch was handed over (a message budget can end sending early).
    let last_sent = live.last_sent_us.load(Relaxed) as f64 / 1e6;
    let send_secs = if last_sent > 0.0 {
        last_sent.min(s.duration_secs)
    } else {
        s.duration_secs.min(elapsed)
    };
    let last_terminal = live.last_terminal_us.load(Relaxed) as f64 / 1e6;
    let completed = terminal as f64;
    Ok(Summary {
        settings: s.clone(),
        target: url.to_string(),
        send_secs,
        elapsed_secs: elapsed,
        sent,
        accepted: sent.saturating_sub(rejected),
        rejected_at_ingest: rejected,
        terminal,
        delivered,
        missing_receipts: sent.saturating_sub(terminal),
        grpc_errors: live.grpc_errors.load(Relaxed),
        stream_errors,
        accepted_per_sec: sent.saturating_sub(rejected) as f64 / send_secs.max(1e-9),
        delivered_per_sec: delivered as f64 / last_terminal.max(1e-9),
        statuses: driver::status_counts(&live),
        latency: Latency::of(&hist),
        latency_buckets: report::buckets(&hist),
        timeline,
        gateway: gw.map(|(pid, cpu, rss)| GatewayCost {
            pid,
            cpu_secs: cpu,
            // NaN (null in JSON) when nothing completed.
            cpu_secs_per_100k: if terminal > 0 {
                cpu * 100_000.0 / completed
            } else {
                f64::NAN
            },
            peak_rss_mb: rss as f64 / 1_048_576.0,
        }),
        tool: ToolCost {
            process_cpu_secs: tool_cpu,
            mock_cpu_secs: mock_cpu,
            mock_requests,
            mock_cpu_us_per_request: mock_cpu * 1e6 / (mock_requests.max(1) as f64),
            client_cpu_secs: client_cpu,
            peak_rss_mb: procstat::peak_rss_bytes(std::process::id()).unwrap_or(0) as f64
                / 1_048_576.0,
        },
        mock_apns: mocks.map(|m| m.apns.stats().into()),
        mock_fcm: mocks.map(|m| m.fcm.stats().into()),
        ceiling: None,
        ceiling_ratio: None,
        redis: None,
    })
}
