//! What the deployment kit relies on: every metric the Prometheus alert rules in
//! `k8s/overlays/prod/monitoring.yaml` and the Grafana dashboard `deploy/grafana/pushgate.json`
//! use is exported on `/metrics` by a running gateway, and the connection, token and queue
//! figures move when they should (in Redis mode too).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{self, Options};

/// The `pushgate_*` names in PromQL expressions.
fn metric_names<'a>(exprs: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = exprs
        .flat_map(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("pushgate_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The `pushgate_*` metric names an alert expression uses.
fn metrics_in_rules() -> Vec<String> {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/k8s/overlays/prod/monitoring.yaml"
    ))
    .unwrap();
    metric_names(
        rules
            .lines()
            .filter(|l| l.trim_start().starts_with("expr:")),
    )
}

/// The `pushgate_*` metric names the dashboard's panels query.
fn metrics_in_dashboard() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/pushgate.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "panels read: {exprs:?}");
    metric_names(exprs.iter().map(String::as_str))
}

/// The family a sample name belongs to: histograms export `_bucket`, `_count` and `_sum`
/// series, counters `_total` ones.
fn family_of(name: &str) -> &str {
    let name = ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    name.strip_suffix("_total").unwrap_or(name)
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: pushgate\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the first sample whose line starts with `prefix` (name and labels).
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_and_the_dashboard_use_is_exported() {
    let rules = metrics_in_rules();
    assert!(rules.len() >= 3, "rules read: {rules:?}");
    let dashboard = metrics_in_dashboard();
    let mut wanted = rules.clone();
    wanted.extend(dashboard.iter().cloned());
    let h = harness::start(Options {
        top: "metrics_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"".into(),
        fcm: true,
        ..Default::default()
    })
    .await;
    // The HTTP API's families have series once it has answered a request.
    let mut http = tokio::net::TcpStream::connect(h.gateway.http_addr.expect("http_listen"))
        .await
        .unwrap();
    http.write_all(b"GET /healthz HTTP/1.1\r\nHost: pushgate\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Labelled families are exported once they have a series: send a batch with one valid
    // recipient and one the template cannot render (a missing variable).
    let mut batch = harness::apns_batch("shop", 0..2);
    batch.template = Some(harness::template("Hi {{ name }}", "there"));
    batch.recipients[0] = harness::recipient(0, &[("name", "Ada")]);
    batch.wait_for_receipts = true;
    let answer = h
        .client()
        .await
        .send_batch(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 1, "{answer:?}");
    let mut fcm_batch = harness::apns_batch("shop", 0..1);
    fcm_batch.recipients = vec![harness::fcm_recipient(7, &[])];
    let answer = h
        .client()
        .await
        .send_batch(fcm_batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 1, "{answer:?}");
    let addr = h.gateway.metrics_addr.expect("metrics listener");
    let body = scrape(addr).await;
    let exported: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &wanted {
        let family = family_of(name);
        let user = if rules.contains(name) {
            "alert rules use"
        } else {
            "the dashboard uses"
        };
        assert!(
            exported.contains(&family) || exported.contains(&name.as_str()),
            "{user} {name}, /metrics has {exported:?}"
        );
    }
    // The figures read at scrape time have series for both providers.
    for prefix in [
        "pushgate_provider_connections_open{provider=\"apns\"",
        "pushgate_provider_connections_open{provider=\"fcm\",pool=\"fcm:shop\"}",
        "pushgate_token_refreshes_total{provider=\"apns\"",
        "pushgate_token_refreshes_total{provider=\"fcm\",pool=\"fcm:shop\",kind=\"oauth\"}",
    ] {
        let value = sample(&body, prefix);
        assert!(
            value.is_some_and(|v| v >= 1.0),
            "{prefix}: {value:?}\n{body}"
        );
    }
    h.gateway.shutdown().await.unwrap();
}

/// A GOAWAY from APNs shows as a GOAWAY received and a reconnect of that pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaways_and_reconnects_are_counted_per_pool() {
    let h = harness::start(Options {
        top: "metrics_listen = \"127.0.0.1:0\"".into(),
        ..Default::default()
    })
    .await;
    let mut client = h.client().await;
    let answer = client
        .send_batch(harness::apns_batch("shop", 0..5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.receipts.len(), 5);
    let addr = h.gateway.metrics_addr.expect("metrics listener");
    let body = scrape(addr).await;
    let goaways = "pushgate_provider_goaways_received_total{provider=\"apns\"";
    let reconnects = "pushgate_provider_reconnects_total{provider=\"apns\"";
    assert_eq!(sample(&body, goaways), Some(0.0), "{body}");
    h.mock.faults().goaway_after(1);
    let answer = client
        .send_batch(harness::apns_batch("shop", 10..20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.receipts.len(), 10);
    // The pool reconnects after its backoff; wait for it (bounded), then read both.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        let body = scrape(addr).await;
        if sample(&body, reconnects).is_some_and(|v| v >= 1.0) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reconnect:\n{body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(sample(&body, goaways).is_some_and(|v| v >= 1.0), "{body}");
    h.gateway.shutdown().await.unwrap();
}

/// Redis mode: retries parked in Redis show in `pushgate_retry_queue_depth_messages` (it stayed
/// at 0 before), and the PING round trip is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_queue_depth_moves_in_redis_mode() {
    let redis = pushgate_mocks::redis_server::RedisServer::start();
    let h = harness::start(Options {
        top: "metrics_listen = \"127.0.0.1:0\"".into(),
        // Backoff ceilings of a minute: parked retries stay parked while we look.
        retry: "base_ms = 60000\ncap_ms = 60000\nmax_attempts = 3".into(),
        extra: format!("[redis]\nurl = \"{}\"\n", redis.url()),
        ..Default::default()
    })
    .await;
    h.mock.faults().set_unavailable_per_mille(1000);
    let mut batch = harness::apns_batch("shop", 0..20);
    batch.wait_for_receipts = false;
    let answer = h
        .client()
        .await
        .send_batch(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 20, "{answer:?}");
    let addr = h.gateway.metrics_addr.expect("metrics listener");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        let body = scrape(addr).await;
        if sample(&body, "pushgate_retry_queue_depth_messages").is_some_and(|v| v >= 1.0)
            && sample(&body, "pushgate_redis_ping_seconds_count").is_some_and(|v| v >= 1.0)
        {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retry queue depth never moved:\n{body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&body, "pushgate_redis_errors_total"), Some(0.0));
    h.gateway.shutdown().await.unwrap();
}

/// `log_format = "json"`: every line the binary logs is one JSON object (log shippers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pushgate.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nlog_format = \"json\"\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let listening = line.contains("pushgate listening");
        lines.push(line);
        if listening || lines.len() > 50 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("pushgate listening")),
        "{lines:?}"
    );
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"]["message"].is_string(),
            "{line}"
        );
    }
}
