//! The result of a run: printed as a summary, written as JSON and as a self-contained HTML page
//! (a latency histogram and a throughput-over-time chart in inline SVG, no external assets).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::ceiling::CeilingReport;
use super::settings::Settings;

/// Receipt latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// One bar of the latency histogram (log-spaced buckets).
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub upper_ms: f64,
    pub count: u64,
}

/// Log-spaced buckets (4 per power of two) from 0.125 ms up.
pub fn buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let mut lower = 0u64;
    let mut upper = 125f64; // µs
    while lower <= h.max() && out.len() < 200 {
        let up = upper as u64;
        out.push(Bucket {
            upper_ms: upper / 1000.0,
            count: h.count_between(lower, up),
        });
        lower = up + 1;
        upper *= 2f64.powf(0.25);
    }
    out
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    pub sent_per_sec: f64,
    pub terminal_per_sec: f64,
    pub delivered_per_sec: f64,
}

/// The gateway child's cost.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayCost {
    pub pid: u32,
    pub cpu_secs: f64,
    pub cpu_secs_per_100k: f64,
    pub peak_rss_mb: f64,
}

/// The load tool's own cost (this process: load client plus the mocks).
#[derive(Debug, Clone, Serialize)]
pub struct ToolCost {
    pub process_cpu_secs: f64,
    pub mock_cpu_secs: f64,
    pub mock_requests: u64,
    pub mock_cpu_us_per_request: f64,
    pub client_cpu_secs: f64,
    pub peak_rss_mb: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub settings: Settings,
    pub target: String,
    pub send_secs: f64,
    pub elapsed_secs: f64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected_at_ingest: u64,
    pub terminal: u64,
    pub delivered: u64,
    pub missing_receipts: u64,
    pub grpc_errors: u64,
    pub stream_errors: Vec<String>,
    /// Accepted recipients / seconds of sending.
    pub accepted_per_sec: f64,
    /// DELIVERED receipts / seconds from the start to the last terminal receipt (drain included).
    pub delivered_per_sec: f64,
    pub statuses: BTreeMap<String, u64>,
    pub latency: Latency,
    pub latency_buckets: Vec<Bucket>,
    pub timeline: Vec<Sample>,
    pub gateway: Option<GatewayCost>,
    pub tool: ToolCost,
    /// Mock counters since the mock started (a ceiling run before this one is included).
    pub mock_apns: Option<MockSummary>,
    pub mock_fcm: Option<MockSummary>,
    pub ceiling: Option<CeilingReport>,
    /// Durable-mode runs: what Redis spent.
    #[serde(default)]
    pub redis: Option<super::redis::RedisCost>,
    /// delivered_per_sec / ceiling req_per_sec.
    pub ceiling_ratio: Option<f64>,
}

/// The interesting mock counters.
#[derive(Debug, Clone, Serialize)]
pub struct MockSummary {
    pub requests: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub jwt_verifications: u64,
    pub tokens_issued: u64,
    pub connections_opened: u64,
    pub max_concurrent_streams_seen: u64,
    pub refused_streams: u64,
}

impl From<pushgate_mocks::MockStats> for MockSummary {
    fn from(s: pushgate_mocks::MockStats) -> Self {
        MockSummary {
            requests: s.requests,
            by_status: s.by_status,
            jwt_verifications: s.jwt_verifications,
            tokens_issued: s.tokens_issued,
            connections_opened: s.connections_opened,
            max_concurrent_streams_seen: s.max_concurrent_streams_seen,
            refused_streams: s.refused_streams,
        }
    }
}

/// Prints a ceiling report.
pub fn print_ceiling(c: &CeilingReport) {
    println!(
        "ceiling ({} mock, raw h2 client, {} conns x {} streams, {:.1} s): {:.0} req/s \
         ({} ok, {} non-2xx, {} errors), latency p50 {:.2} ms p99 {:.2} ms",
        c.target,
        c.connections,
        c.streams_per_connection,
        c.secs,
        c.req_per_sec,
        c.ok,
        c.non_2xx,
        c.errors,
        c.latency_p50_ms,
        c.latency_p99_ms
    );
    println!(
        "  mock CPU {:.2} s = {:.2} µs/request (mock threads); client CPU {:.2} s",
        c.mock_cpu_secs, c.mock_cpu_us_per_request, c.client_cpu_secs
    );
}

/// Prints the human summary.
pub fn print(s: &Summary) {
    println!();
    println!(
        "== pushgate-loadtest: {} ({}) ==",
        s.settings.name, s.target
    );
    println!(
        "sent {} recipients in {:.1} s ({} accepted, {} rejected at ingest); {} terminal receipts, {} missing",
        s.sent, s.send_secs, s.accepted, s.rejected_at_ingest, s.terminal, s.missing_receipts
    );
    println!(
        "throughput: {:.0} msg/s accepted, {:.0} msg/s delivered",
        s.accepted_per_sec, s.delivered_per_sec
    );
    let l = &s.latency;
    println!(
        "receipt latency (batch sent -> receipt received): p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
    );
    let statuses: Vec<String> = s.statuses.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("statuses: {}", statuses.join(" "));
    if s.grpc_errors > 0 || !s.stream_errors.is_empty() {
        println!("gRPC errors: {} {:?}", s.grpc_errors, s.stream_errors);
    }
    if let Some(g) = &s.gateway {
        println!(
            "gateway (pid {}): CPU {:.2} s = {:.2} CPU s per 100k messages; peak RSS {:.1} MB",
            g.pid, g.cpu_secs, g.cpu_secs_per_100k, g.peak_rss_mb
        );
    }
    if let Some(r) = &s.redis {
        println!(
            "redis: {:.1} commands, {:.0} B in, {:.0} B out per message; CPU {:.2} s = {:.2} CPU s per 100k; memory {:.1} MB (peak {:.1} MB)",
            r.commands_per_message,
            r.bytes_in_per_message,
            r.bytes_out_per_message,
            r.cpu_secs,
            r.cpu_secs_per_100k,
            r.used_memory_mb,
            r.peak_memory_mb
        );
        println!("redis per message by command: {}", r.top_commands(8));
    }
    let t = &s.tool;
    println!(
        "load tool process (client + mocks): CPU {:.2} s, peak RSS {:.1} MB; of which mock threads {:.2} s \
         over {} requests = {:.2} µs/request, client threads {:.2} s",
        t.process_cpu_secs,
        t.peak_rss_mb,
        t.mock_cpu_secs,
        t.mock_requests,
        t.mock_cpu_us_per_request,
        t.client_cpu_secs
    );
    for (name, m) in [("APNs", &s.mock_apns), ("FCM", &s.mock_fcm)] {
        if let Some(m) = m {
            println!(
                "mock {name} (since mock start, ceiling included): {} requests {:?}, {} JWT verifications, {} tokens issued, {} connections",
                m.requests, m.by_status, m.jwt_verifications, m.tokens_issued, m.connections_opened
            );
        }
    }
    if let Some(c) = &s.ceiling {
        print_ceiling(c);
    }
    if let Some(r) = s.ceiling_ratio {
        println!("gateway delivered/s as a ratio of the ceiling: {r:.3}");
    }
}

/// Writes the summary as pretty JSON.
pub fn write_json(s: &Summary, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(s)?)?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: f64 = 760.0;
const H: f64 = 240.0;
const PAD: f64 = 50.0;

fn histogram_svg(buckets: &[Bucket]) -> String {
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{}' font-size='10'>",
        H + 30.0
    );
    let max = buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1) as f64;
    let n = buckets.len().max(1) as f64;
    let bw = (W - PAD) / n;
    for (i, b) in buckets.iter().enumerate() {
        let h = (b.count as f64 / max) * (H - 20.0);
        let x = PAD + i as f64 * bw;
        let _ = write!(
            svg,
            "<rect x='{x:.1}' y='{:.1}' width='{:.1}' height='{h:.1}' fill='#4a7bd0'><title>≤ {:.3} ms: {}</title></rect>",
            H - h,
            (bw - 1.0).max(0.5),
            b.upper_ms,
            b.count
        );
        if i % 8 == 0 {
            let _ = write!(
                svg,
                "<text x='{x:.1}' y='{:.1}'>{:.2}</text>",
                H + 12.0,
                b.upper_ms
            );
        }
    }
    let _ = write!(
        svg,
        "<text x='{PAD}' y='{:.1}'>receipt latency, ms (log buckets)</text><text x='2' y='12'>{max:.0}</text></svg>",
        H + 26.0
    );
    svg
}

/// A chart line: label, colour, value.
type Series = (&'static str, &'static str, fn(&Sample) -> f64);

fn timeline_svg(samples: &[Sample]) -> String {
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{}' font-size='10'>",
        H + 30.0
    );
    let tmax = samples.last().map(|s| s.t_secs).unwrap_or(1.0).max(1.0);
    let vmax = samples
        .iter()
        .flat_map(|s| [s.sent_per_sec, s.delivered_per_sec, s.terminal_per_sec])
        .fold(1.0f64, f64::max);
    let series: [Series; 3] = [
        ("sent/s", "#999", |s| s.sent_per_sec),
        ("terminal receipts/s", "#e08a2c", |s| s.terminal_per_sec),
        ("delivered/s", "#2a9d4a", |s| s.delivered_per_sec),
    ];
    for (k, (name, color, f)) in series.iter().enumerate() {
        let points: Vec<String> = samples
            .iter()
            .map(|s| {
                format!(
                    "{:.1},{:.1}",
                    PAD + s.t_secs / tmax * (W - PAD - 10.0),
                    H - f(s) / vmax * (H - 20.0)
                )
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{}'/>\
             <text x='{:.0}' y='12' fill='{color}'>{name}</text>",
            points.join(" "),
            PAD + 10.0 + k as f64 * 160.0
        );
    }
    let _ = write!(
        svg,
        "<text x='2' y='24'>{vmax:.0}</text><text x='2' y='{H}'>0</text>\
         <text x='{PAD}' y='{:.1}'>time, s (0 .. {tmax:.0})</text></svg>",
        H + 26.0
    );
    svg
}

/// Writes the self-contained HTML report.
pub fn write_html(s: &Summary, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(s)?;
    let mut rows = String::new();
    let mut row = |k: &str, v: String| {
        let _ = write!(rows, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    };
    row("target", s.target.clone());
    row("sent / accepted", format!("{} / {}", s.sent, s.accepted));
    row("accepted msg/s", format!("{:.0}", s.accepted_per_sec));
    row("delivered msg/s", format!("{:.0}", s.delivered_per_sec));
    row(
        "latency p50 / p90 / p99 / p99.9",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} ms",
            s.latency.p50_ms, s.latency.p90_ms, s.latency.p99_ms, s.latency.p999_ms
        ),
    );
    row("statuses", format!("{:?}", s.statuses));
    if let Some(g) = &s.gateway {
        row(
            "gateway CPU s per 100k",
            format!("{:.2} ({:.2} s total)", g.cpu_secs_per_100k, g.cpu_secs),
        );
        row("gateway peak RSS", format!("{:.1} MB", g.peak_rss_mb));
    }
    row(
        "mock CPU per request (load tool process)",
        format!("{:.2} µs", s.tool.mock_cpu_us_per_request),
    );
    if let Some(c) = &s.ceiling {
        row(
            "ceiling req/s (raw h2 client)",
            format!("{:.0}", c.req_per_sec),
        );
    }
    if let Some(r) = s.ceiling_ratio {
        row("gateway / ceiling", format!("{r:.3}"));
    }
    if let Some(r) = &s.redis {
        row(
            "redis per message",
            format!(
                "{:.1} commands, {:.0} B in, {:.0} B out",
                r.commands_per_message, r.bytes_in_per_message, r.bytes_out_per_message
            ),
        );
        row(
            "redis CPU s per 100k",
            format!("{:.2} ({:.2} s total)", r.cpu_secs_per_100k, r.cpu_secs),
        );
        row(
            "redis memory",
            format!(
                "{:.1} MB (peak {:.1} MB)",
                r.used_memory_mb, r.peak_memory_mb
            ),
        );
    }
    let html = format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>pushgate load: {name}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:1em}}\
         pre{{background:#f4f4f4;padding:1em;font-size:11px}}</style></head><body>\
         <h1>pushgate load run: {name}</h1><table>{rows}</table>\
         <h2>Receipt latency</h2>{hist}<h2>Throughput over time</h2>{timeline}\
         <h2>Raw</h2><pre>{json}</pre></body></html>",
        name = esc(&s.settings.name),
        hist = histogram_svg(&s.latency_buckets),
        timeline = timeline_svg(&s.timeline),
        json = esc(&json),
    );
    std::fs::write(path, html)?;
    Ok(())
}
