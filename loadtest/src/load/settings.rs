//! Every knob of a run, in one struct. A scenario file (`loadtest/scenarios/*.toml`) sets any of
//! them by name; command-line flags override the file; the defaults fill the rest.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// How the client talks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `StreamSend`: N long-lived bidirectional streams.
    Stream,
    /// `SendBatch` with `wait_for_receipts`, N calls in flight.
    Unary,
}

/// Which mock the ceiling client blasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CeilingTarget {
    Apns,
    Fcm,
    /// Both, connections split by `fcm_share`.
    Both,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Scenario name, for reports.
    pub name: String,
    /// A running gateway (`http://127.0.0.1:PORT`); then no mocks and no child are started.
    pub gateway: Option<String>,
    /// The `pushgate` binary to start as a child (with generated config and mocks).
    pub gateway_bin: Option<PathBuf>,
    pub mode: Mode,
    /// Concurrent StreamSend streams (or SendBatch calls in flight).
    pub streams: usize,
    /// Target recipients per second over all streams; absent = open loop.
    pub rate: Option<f64>,
    /// Sending stops after this many seconds...
    pub duration_secs: f64,
    /// ...or after this many recipients, whichever comes first.
    pub messages: Option<u64>,
    /// Recipients per batch.
    pub batch_size: usize,
    /// Apps (tenants), each with APNs and FCM credentials; batches rotate over them.
    pub apps: usize,
    /// Share of recipients on FCM (0..=1); the rest are APNs.
    pub fcm_share: f64,
    /// Distinct device tokens per platform (recipients cycle over them).
    pub token_pool: u64,
    /// Per mille of the token pool registered as dead (410 Unregistered / 404 UNREGISTERED).
    pub unregistered_per_mille: u32,
    /// Mocks serve cleartext HTTP/2 instead of TLS.
    pub cleartext: bool,
    /// Mock response latency, milliseconds.
    pub latency_ms: f64,
    /// Mock injected faults, per mille of requests.
    pub fault_429_per_mille: u32,
    pub fault_500_per_mille: u32,
    pub fault_503_per_mille: u32,
    /// `Retry-After` seconds the FCM mock sends with injected 429/503 (0 = no header; absent =
    /// the mock's default of 30 s, as Google).
    pub fcm_retry_after_secs: Option<u64>,
    /// Bursts: send for `burst_on_secs`, pause for `burst_off_secs` (0 = no bursts).
    pub burst_on_secs: f64,
    pub burst_off_secs: f64,
    /// After sending stops, how long to wait for the remaining receipts.
    pub drain_secs: f64,
    /// Gateway config: connections per provider per app.
    pub gateway_connections: usize,
    /// Gateway config: `[pipeline] accept_window` (absent = gateway default).
    pub accept_window: Option<usize>,
    /// Gateway config: `[pipeline] max_in_flight_requests` (absent = gateway default).
    pub max_in_flight_requests: Option<usize>,
    /// Gateway config: every app's `frequency_caps`, as TOML (e.g.
    /// `[{ max = 3, window = "1d" }]`); absent = no caps.
    pub frequency_caps: Option<String>,
    /// Every delivery policy on (README "Campaign delivery"): each app gets frequency caps
    /// (`frequency_caps`, else 3 a day and 10 a week), a default time zone and quiet hours that
    /// do not fire during the run (a one-minute window twelve hours from its start), and before
    /// the measured run `suppressed_tokens` dead APNs tokens per app are taught to the gateway
    /// (sent once to tokens the mock answers 410 for). Recipients have distinct user ids, so
    /// every message is counted under its own user's caps.
    pub policies: bool,
    /// With `policies`: dead tokens per app the gateway suppresses during the run.
    pub suppressed_tokens: u64,
    /// Gateway config: `[retry] base_ms` and `max_attempts`.
    pub retry_base_ms: u64,
    pub retry_max_attempts: u32,
    /// Worker threads of the mock runtime and of the client runtime.
    pub mock_threads: usize,
    pub client_threads: usize,
    /// Run the ceiling for `ceiling_secs` before the gateway run.
    pub with_ceiling: bool,
    pub ceiling_secs: f64,
    pub ceiling_target: CeilingTarget,
    /// Ceiling client: HTTP/2 connections and concurrent streams per connection.
    pub ceiling_connections: usize,
    pub ceiling_streams: usize,
    /// Durable mode: the gateway uses a private `redis-server` the tool starts...
    pub redis: bool,
    /// ...or this Redis (a database of its own: the run writes keys there).
    pub redis_url: Option<String>,
    /// Outputs.
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
    /// No live progress bar (CI logs).
    pub quiet: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: "adhoc".into(),
            gateway: None,
            gateway_bin: None,
            mode: Mode::Stream,
            streams: 4,
            rate: None,
            duration_secs: 20.0,
            messages: None,
            batch_size: 500,
            apps: 2,
            fcm_share: 0.5,
            token_pool: 100_000,
            unregistered_per_mille: 0,
            cleartext: false,
            latency_ms: 0.0,
            fault_429_per_mille: 0,
            fault_500_per_mille: 0,
            fault_503_per_mille: 0,
            fcm_retry_after_secs: None,
            burst_on_secs: 0.0,
            burst_off_secs: 0.0,
            drain_secs: 30.0,
            gateway_connections: 2,
            accept_window: None,
            frequency_caps: None,
            policies: false,
            suppressed_tokens: 100_000,
            max_in_flight_requests: None,
            retry_base_ms: 50,
            retry_max_attempts: 5,
            mock_threads: 1,
            client_threads: 1,
            with_ceiling: false,
            ceiling_secs: 5.0,
            ceiling_target: CeilingTarget::Both,
            ceiling_connections: 4,
            ceiling_streams: 100,
            redis: false,
            redis_url: None,
            json: None,
            html: None,
            quiet: false,
        }
    }
}

/// Hard limits that keep every loop bounded.
pub const MAX_DURATION_SECS: f64 = 3600.0;
pub const MAX_STREAMS: usize = 256;
pub const MAX_BATCH: usize = 10_000;

impl Settings {
    /// How long the mocks wait before each answer.
    pub fn latency(&self) -> std::time::Duration {
        std::time::Duration::from_micros((self.latency_ms.max(0.0) * 1000.0) as u64)
    }

    /// Reads a scenario file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        let settings: Settings = toml::from_str(&text)
            .with_context(|| format!("parsing scenario {}", path.display()))?;
        Ok(settings)
    }

    /// Checks ranges, naming the key at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        let check = |ok: bool, key: &str, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("`{key}`: {why}"))
            }
        };
        check(
            self.duration_secs > 0.0 && self.duration_secs <= MAX_DURATION_SECS,
            "duration_secs",
            "must be in (0, 3600]",
        )?;
        check(
            (1..=MAX_STREAMS).contains(&self.streams),
            "streams",
            "must be in 1..=256",
        )?;
        check(
            (1..=MAX_BATCH).contains(&self.batch_size),
            "batch_size",
            "must be in 1..=10000",
        )?;
        check(
            (1..=1000).contains(&self.apps),
            "apps",
            "must be in 1..=1000",
        )?;
        check(
            (0.0..=1.0).contains(&self.fcm_share),
            "fcm_share",
            "must be in [0, 1]",
        )?;
        check(
            self.rate.is_none_or(|r| r > 0.0 && r.is_finite()),
            "rate",
            "must be > 0",
        )?;
        check(
            (1..=10_000_000).contains(&self.token_pool),
            "token_pool",
            "must be in 1..=10000000",
        )?;
        for (key, v) in [
            ("unregistered_per_mille", self.unregistered_per_mille),
            ("fault_429_per_mille", self.fault_429_per_mille),
            ("fault_500_per_mille", self.fault_500_per_mille),
            ("fault_503_per_mille", self.fault_503_per_mille),
        ] {
            check(v <= 1000, key, "must be at most 1000")?;
        }
        check(
            self.latency_ms >= 0.0 && self.latency_ms <= 60_000.0,
            "latency_ms",
            "must be in [0, 60000]",
        )?;
        check(
            self.drain_secs >= 0.0 && self.drain_secs <= 600.0,
            "drain_secs",
            "must be in [0, 600]",
        )?;
        check(
            self.burst_on_secs >= 0.0 && self.burst_off_secs >= 0.0,
            "burst_on_secs",
            "must be >= 0",
        )?;
        check(
            self.ceiling_secs > 0.0 && self.ceiling_secs <= 600.0,
            "ceiling_secs",
            "must be in (0, 600]",
        )?;
        check(
            (1..=64).contains(&self.ceiling_connections),
            "ceiling_connections",
            "must be in 1..=64",
        )?;
        check(
            (1..=1000).contains(&self.ceiling_streams),
            "ceiling_streams",
            "must be in 1..=1000",
        )?;
        check(
            (1..=64).contains(&self.mock_threads) && (1..=64).contains(&self.client_threads),
            "mock_threads",
            "threads must be in 1..=64",
        )?;
        check(
            (1..=64).contains(&self.gateway_connections),
            "gateway_connections",
            "must be in 1..=64",
        )?;
        check(
            !(self.redis && self.redis_url.is_some()),
            "redis",
            "give either redis (a private server) or redis_url, not both",
        )?;
        if let Some(url) = &self.redis_url {
            check(
                url.starts_with("redis://") || url.starts_with("rediss://"),
                "redis_url",
                "must be a redis:// or rediss:// URL",
            )?;
        }
        if let Some(url) = &self.gateway {
            check(
                url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:"),
                "gateway",
                "only http://127.0.0.1:PORT targets are allowed",
            )?;
        }
        Ok(())
    }
}
