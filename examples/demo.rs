//! The demo: the gateway, mock providers and a client in one process, no account needed.
//!
//! ```text
//! cargo run --release --example demo [-- --seconds 5 --batch-size 500]
//! ```
//!
//! Starts a TLS mock APNs and a TLS mock FCM (with its OAuth token endpoint), both with a few
//! dead tokens and a sprinkle of 503s, starts the gateway on the in-memory defaults pointed at
//! them, streams personalized batches (half iOS, half Android) through `StreamSend` for a few
//! seconds, and prints what happened. It is an example of the gateway crate, not a subcommand of
//! the `pushgate` binary, so the binary operators deploy links no mock server.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "demo",
    about = "Starts pushgate with mock APNs/FCM and pushes personalized traffic through it"
)]
struct Cli {
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Recipients per batch.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = runtime.block_on(run(DemoOptions {
        duration: Duration::from_secs(cli.seconds),
        batch_size: cli.batch_size.max(1),
    }))?;
    print(&report);
    anyhow::ensure!(
        report.terminal == report.sent,
        "{} messages sent but {} terminal receipts",
        report.sent,
        report.terminal
    );
    Ok(())
}

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use pushgate_mocks::apns::{MockApns, MockApnsConfig};
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use pushgate::config::Config;
use pushgate::proto::push_gateway_client::PushGatewayClient;
use pushgate::proto::{self, ReceiptStatus};
use tracing_subscriber::EnvFilter;

/// Demo knobs.
#[derive(Debug, Clone)]
struct DemoOptions {
    pub duration: Duration,
    pub batch_size: usize,
}

/// What the demo observed, also used by tests.
#[derive(Debug, Default)]
struct DemoReport {
    pub sent: u64,
    pub terminal: u64,
    pub by_status: BTreeMap<String, u64>,
    pub retry_receipts: u64,
    pub mock_accepted: u64,
    pub fcm_accepted: u64,
    pub fcm_token_requests: u64,
    pub elapsed: Duration,
    pub latency_ms: Option<(f64, f64, f64, f64)>,
}

const DEAD_TOKEN_EVERY: u64 = 50;
const MISSING_VAR_EVERY: u64 = 200;

/// Runs the demo and returns its report.
async fn run(options: DemoOptions) -> anyhow::Result<DemoReport> {
    let key =
        pushgate_mocks::keys::try_generate_apns_key().context("generating a demo APNs key")?;
    let mut mock_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    mock_config.tls = true;
    mock_config.topics = vec!["com.example.shop".into()];
    mock_config.record_accepted = false;
    let mock = MockApns::start(mock_config).await?;
    mock.faults().set_unavailable_per_mille(5);

    let account = pushgate_mocks::keys::try_generate_service_account(
        "demo-shop",
        "https://127.0.0.1:1/token",
    )
    .context("generating a demo service account")?;
    let mut fcm_config = MockFcmConfig::new(
        &account.project_id,
        &account.client_email,
        &account.public_pem,
    );
    fcm_config.record_accepted = false;
    let fcm = MockFcm::start(fcm_config).await?;
    fcm.faults().set_unavailable_per_mille(5);
    // The mock's default Retry-After is 30 s, which the gateway would honour; keep the demo short.
    fcm.faults()
        .set_retry_after(pushgate_mocks::fcm::RetryAfter::Seconds(1));
    let mut account_json: serde_json::Value = serde_json::from_str(&account.json)?;
    account_json["token_uri"] = serde_json::Value::from(fcm.token_uri());

    let dir = scratch_dir()?;
    let account_file = dir.join("service-account.json");
    std::fs::write(&account_file, serde_json::to_vec_pretty(&account_json)?)?;
    let fcm_ca_file = dir.join("mock-fcm-ca.pem");
    std::fs::write(&fcm_ca_file, fcm.ca_pem().unwrap_or_default())?;
    let key_file = dir.join(format!("AuthKey_{}.p8", key.key_id));
    std::fs::write(&key_file, &key.private_p8_pem)?;
    let ca_file = dir.join("mock-ca.pem");
    std::fs::write(&ca_file, mock.ca_pem().unwrap_or_default())?;

    let config = Config::from_toml(&format!(
        r#"
        listen = "127.0.0.1:0"
        [retry]
        base_ms = 50
        cap_ms = 1000
        max_attempts = 5
        [apps.shop.apns]
        key_file = "{key_file}"
        key_id = "{key_id}"
        team_id = "{team_id}"
        topic = "com.example.shop"
        endpoint = "{endpoint}"
        ca_file = "{ca_file}"
        connections = 2
        [apps.shop.fcm]
        credentials_file = "{account_file}"
        endpoint = "{fcm_endpoint}"
        ca_file = "{fcm_ca_file}"
        connections = 2
        "#,
        account_file = account_file.display(),
        fcm_endpoint = fcm.url(),
        fcm_ca_file = fcm_ca_file.display(),
        key_file = key_file.display(),
        key_id = key.key_id,
        team_id = key.team_id,
        endpoint = mock.url(),
        ca_file = ca_file.display(),
    ))?;
    let running = pushgate::app::start(config).await?;
    let endpoint = format!("http://{}", running.addr);
    println!(
        "gateway listening on {endpoint}, mock APNs at {}, mock FCM at {}",
        mock.url(),
        fcm.url()
    );

    let mut client = PushGatewayClient::connect(endpoint).await?;
    let (tx, rx) = mpsc::channel::<proto::SendBatchRequest>(4);
    let started = Instant::now();
    let mut response = client
        .stream_send(ReceiverStream::new(rx))
        .await?
        .into_inner();

    let producer = async {
        let mut n: u64 = 0;
        let mut batch_no = 0;
        let deadline = started + options.duration;
        let mut sent = 0u64;
        while Instant::now() < deadline {
            let mut recipients = Vec::with_capacity(options.batch_size);
            for _ in 0..options.batch_size {
                n += 1;
                let android = n.is_multiple_of(2);
                let token = if android {
                    format!("fcm-token-{n}:APA91b{n:020}")
                } else {
                    format!("{n:064x}")
                };
                if n.is_multiple_of(DEAD_TOKEN_EVERY) {
                    if android {
                        fcm.faults().add_unregistered(&token);
                    } else {
                        mock.faults().add_unregistered(&token, None);
                    }
                }
                let mut vars = BTreeMap::new();
                if !n.is_multiple_of(MISSING_VAR_EVERY) {
                    vars.insert("first_name".to_string(), format!("User{n}"));
                }
                vars.insert("cart_items".to_string(), (n % 7 + 1).to_string());
                recipients.push(proto::Recipient {
                    message_id: format!("demo-{n}"),
                    platform: if android {
                        proto::Platform::Fcm as i32
                    } else {
                        proto::Platform::Apns as i32
                    },
                    device_token: token,
                    vars,
                    user_id: format!("user-{n}"),
                    ..Default::default()
                });
            }
            batch_no += 1;
            let count = recipients.len() as u64;
            let request = proto::SendBatchRequest {
                app_id: "shop".into(),
                batch_id: format!("demo-batch-{batch_no}"),
                campaign_id: "abandoned-cart".into(),
                template: Some(demo_template()),
                recipients,
                wait_for_receipts: false,
                campaign_rate_per_minute: 0,
                ..Default::default()
            };
            if tx.send(request).await.is_err() {
                break;
            }
            sent += count;
        }
        drop(tx);
        sent
    };

    let consumer = async {
        let mut report = DemoReport::default();
        let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
        while let Some(receipt) = response.message().await? {
            if !receipt.terminal {
                report.retry_receipts += 1;
                continue;
            }
            report.terminal += 1;
            let status = ReceiptStatus::try_from(receipt.status)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| receipt.status.to_string());
            *report.by_status.entry(status).or_default() += 1;
            if receipt.accepted_at_ms > 0 && receipt.completed_at_ms >= receipt.accepted_at_ms {
                let millis = u64::try_from(receipt.completed_at_ms - receipt.accepted_at_ms)
                    .unwrap_or(0)
                    .max(1);
                let _ = latency.record(millis);
            }
        }
        if !latency.is_empty() {
            report.latency_ms = Some((
                latency.value_at_quantile(0.5) as f64,
                latency.value_at_quantile(0.9) as f64,
                latency.value_at_quantile(0.99) as f64,
                latency.max() as f64,
            ));
        }
        anyhow::Ok(report)
    };
    // The receipt stream ends once the request stream is closed and every message is final.
    let (sent, report) = tokio::join!(producer, consumer);
    let mut report = report?;
    report.sent = sent;
    report.elapsed = started.elapsed();
    report.mock_accepted = mock.stats().accepted;
    let fcm_stats = fcm.stats();
    report.fcm_accepted = fcm_stats.accepted;
    report.fcm_token_requests = fcm_stats.token_requests;
    running.shutdown().await?;
    mock.shutdown().await;
    fcm.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

fn demo_template() -> proto::Template {
    proto::Template {
        title: "{{ first_name }}, your cart misses you".into(),
        body: "{{ cart_items }} items are waiting. Free shipping ends tonight, \
               {{ first_name | default: \"friend\" }}!"
            .into(),
        sound: "default".into(),
        deep_link: "shop://cart".into(),
        ttl_seconds: 3600,
        data: BTreeMap::from([("campaign".to_string(), "abandoned-cart".to_string())]),
        ..Default::default()
    }
}

fn scratch_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pushgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Prints the report for a person.
fn print(report: &DemoReport) {
    let secs = report.elapsed.as_secs_f64().max(f64::EPSILON);
    println!();
    println!(
        "pushgate demo: {} notifications in {:.1} s",
        report.sent, secs
    );
    println!("  terminal receipts   {}", report.terminal);
    for (status, count) in &report.by_status {
        println!("    {status:<16}{count}");
    }
    println!("  retries (RETRYING)  {}", report.retry_receipts);
    println!("  mock APNs accepted  {}", report.mock_accepted);
    println!(
        "  mock FCM accepted   {} (OAuth token requests: {})",
        report.fcm_accepted, report.fcm_token_requests
    );
    println!(
        "  throughput          {:.0} receipts/s",
        report.terminal as f64 / secs
    );
    if let Some((p50, p90, p99, max)) = report.latency_ms {
        println!("  receipt latency     p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms");
    }
    println!(
        "  (DELIVERED means APNs/FCM accepted the notification: hand-off, not display on a device.)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's first command, shortened: every message sent ends in exactly one terminal
    /// receipt, and the demo's planted dead tokens and missing variables show as such.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_demo_message_ends_in_one_terminal_receipt() -> anyhow::Result<()> {
        let report = run(DemoOptions {
            duration: Duration::from_millis(1500),
            batch_size: 200,
        })
        .await?;
        assert!(report.sent > 0, "the demo sent nothing");
        assert_eq!(report.terminal, report.sent, "{report:?}");
        assert!(
            report.by_status.get("DELIVERED").copied().unwrap_or(0) > 0,
            "{report:?}"
        );
        assert!(
            report.by_status.get("INVALID_TOKEN").copied().unwrap_or(0) > 0,
            "{report:?}"
        );
        assert!(report.fcm_token_requests > 0, "{report:?}");
        Ok(())
    }
}
