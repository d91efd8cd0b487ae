//! What the deployment kit relies on: every metric the Prometheus alert rules in
//! `k8s/overlays/prod/monitoring.yaml` use is exported on `/metrics` by a running gateway.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{self, Options};

/// The `pushgate_*` metric names an alert expression uses.
fn metrics_in_rules() -> Vec<String> {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/k8s/overlays/prod/monitoring.yaml"
    ))
    .unwrap();
    let mut names: Vec<String> = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_use_is_exported() {
    let wanted = metrics_in_rules();
    assert!(wanted.len() >= 3, "rules read: {wanted:?}");
    let h = harness::start(Options {
        top: "metrics_listen = \"127.0.0.1:0\"".into(),
        ..Default::default()
    })
    .await;
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
    let addr = h.gateway.metrics_addr.expect("metrics listener");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: pushgate\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let exported: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &wanted {
        // Counters are exported as `<name>_total` samples of a `<name>` family.
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            exported.contains(&family) || exported.contains(&name.as_str()),
            "alert rules use {name}, /metrics has {exported:?}"
        );
    }
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
