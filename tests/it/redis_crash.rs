//! Tests with real `pushgate serve` child processes sharing one Redis.
//!
//! The first kills one with `kill -9` in the middle of a 50,000-recipient run (half APNs, half
//! FCM): a second process finishes every acknowledged recipient; each ends with exactly one
//! terminal receipt in the Redis receipts stream; the mocks saw every delivered token, and
//! provider duplicates stay within the crashed process's in-flight window. The others run three
//! processes at once: nothing is delivered twice, and one app's limit holds for the cluster.

use crate::harness;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use pushgate::proto::push_gateway_client::PushGatewayClient;
use pushgate::proto::push_gateway_insights_client::PushGatewayInsightsClient;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::apns::{MockApns, MockApnsConfig};
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig};
use pushgate_mocks::redis_server::RedisServer;

pub(crate) const TOPIC: &str = "com.example.shop";
const N: u64 = 50_000;
const PER_BATCH: u64 = 1_000;
const IN_FLIGHT: u64 = 200;
const WRITE_BATCH: u64 = 256;

pub(crate) struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(config: &std::path::Path, log: &std::path::Path) -> Gateway {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting pushgate serve");
    Gateway(child)
}

pub(crate) async fn connect(addr: &str) -> PushGatewayClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = PushGatewayClient::connect(format!("http://{addr}")).await {
            return client;
        }
        assert!(Instant::now() < deadline, "gateway did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every receipt in the app's receipts stream.
pub(crate) async fn stream_receipts(redis: &RedisServer) -> Vec<proto::Receipt> {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("pushgate:{shop}:receipts")
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some(last) = reply.ids.last().map(|e| e.id.clone()) else {
            break;
        };
        for entry in reply.ids {
            let bytes: Vec<u8> = entry.get("r").unwrap();
            out.push(proto::Receipt::decode(bytes.as_slice()).unwrap());
        }
        start = format!("({last}");
    }
    out
}

/// A cleartext mock APNs for the app `shop`, and the key it trusts written to `dir`.
pub(crate) async fn apns_mock(
    dir: &std::path::Path,
) -> (MockApns, pushgate_mocks::keys::ApnsKey, std::path::PathBuf) {
    let key = pushgate_mocks::keys::generate_apns_key();
    let mut mock_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    mock_config.tls = false;
    mock_config.topics = vec![TOPIC.into()];
    let mock = MockApns::start(mock_config).await.unwrap();
    let key_file = dir.join("AuthKey.p8");
    std::fs::write(&key_file, &key.private_p8_pem).unwrap();
    (mock, key, key_file)
}

/// Starts three `pushgate serve` processes on one Redis, each with the app `shop` pointed at
/// `mock`, plus the TOML tables in `extra`; returns them and their gRPC addresses.
fn start_three(
    dir: &std::path::Path,
    redis: &RedisServer,
    mock: &MockApns,
    key: &pushgate_mocks::keys::ApnsKey,
    key_file: &std::path::Path,
    extra: &str,
) -> (Vec<Gateway>, Vec<String>) {
    let mut processes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.join(format!("pushgate-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
                listen = "{addr}"
                [redis]
                url = "{url}"
                poll_ms = 20
                [apps.shop.apns]
                key_file = "{key_file}"
                key_id = "{key_id}"
                team_id = "{team_id}"
                topic = "{TOPIC}"
                endpoint = "{endpoint}"
                connections = 1
                {extra}
                "#,
                url = redis.url(),
                key_file = key_file.display(),
                key_id = key.key_id,
                team_id = key.team_id,
                endpoint = mock.url(),
            ),
        )
        .unwrap();
        processes.push(spawn(&config, &dir.join(format!("gateway-{i}.log"))));
        addrs.push(addr);
    }
    (processes, addrs)
}

/// APNs for even recipients (hex), FCM for odd ones.
fn token(n: u64) -> String {
    if n.is_multiple_of(2) {
        format!("{n:064x}")
    } else {
        format!("fcm-{n}:APA91b{n:016}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_acknowledged() {
    let redis = RedisServer::start();
    let key = pushgate_mocks::keys::generate_apns_key();
    let mut mock_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    mock_config.tls = false;
    mock_config.topics = vec![TOPIC.into()];
    // ~1,000 deliveries/s through one connection: the run takes seconds, so the kill lands
    // in the middle of it.
    mock_config.latency = Duration::from_millis(100);
    mock_config.max_concurrent_streams = 100;
    let mock = MockApns::start(mock_config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let account = pushgate_mocks::keys::generate_service_account(
        "pushgate-crash",
        "https://127.0.0.1:1/token",
    );
    let mut fcm_config = MockFcmConfig::new(
        &account.project_id,
        &account.client_email,
        &account.public_pem,
    );
    fcm_config.tls = false;
    fcm_config.latency = Duration::from_millis(100);
    fcm_config.max_concurrent_streams = 100;
    let fcm = MockFcm::start(fcm_config).await.unwrap();
    let mut account_json: serde_json::Value = serde_json::from_str(&account.json).unwrap();
    account_json["token_uri"] = serde_json::Value::from(fcm.token_uri());
    let account_file = dir.path().join("service-account.json");
    std::fs::write(&account_file, account_json.to_string()).unwrap();
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(&key_file, &key.private_p8_pem).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("pushgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            listen = "{addr}"
            [pipeline]
            max_in_flight_requests = {IN_FLIGHT}
            shutdown_grace_secs = 1
            [retry]
            base_ms = 50
            cap_ms = 200
            max_attempts = 5
            [redis]
            url = "{url}"
            lease_ms = 1500
            poll_ms = 20
            write_batch = {WRITE_BATCH}
            [apps.shop.apns]
            key_file = "{key_file}"
            key_id = "{key_id}"
            team_id = "{team_id}"
            topic = "{TOPIC}"
            endpoint = "{endpoint}"
            connections = 1
            request_timeout_ms = 5000
            [apps.shop.fcm]
            credentials_file = "{account_file}"
            endpoint = "{fcm_endpoint}"
            connections = 1
            request_timeout_ms = 5000
            "#,
            account_file = account_file.display(),
            fcm_endpoint = fcm.url(),
            url = redis.url(),
            key_file = key_file.display(),
            key_id = key.key_id,
            team_id = key.team_id,
            endpoint = mock.url(),
        ),
    )
    .unwrap();

    let first = spawn(&config, &dir.path().join("first.log"));
    let mut client = connect(&addr).await;
    for b in 0..N / PER_BATCH {
        let recipients = (b * PER_BATCH..(b + 1) * PER_BATCH)
            .map(|n| proto::Recipient {
                message_id: format!("m-{n}"),
                platform: if n % 2 == 0 {
                    proto::Platform::Apns as i32
                } else {
                    proto::Platform::Fcm as i32
                },
                device_token: token(n),
                ..Default::default()
            })
            .collect();
        let response = client
            .send_batch(proto::SendBatchRequest {
                app_id: "shop".into(),
                campaign_id: "crash".into(),
                template: Some(proto::Template {
                    title: "Hi".into(),
                    body: "there".into(),
                    ..Default::default()
                }),
                recipients,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.accepted as u64, PER_BATCH, "acknowledged");
    }
    // Every recipient is acknowledged; kill -9 while deliveries are in full swing.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let delivered_before = (mock.accepted().len() + fcm.accepted().len()) as u64;
    drop(first);
    assert!(
        delivered_before < N,
        "the kill must land mid-run ({delivered_before} of {N} delivered)"
    );

    let _second = spawn(&config, &dir.path().join("second.log"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let terminal: HashMap<String, Vec<proto::Receipt>> = loop {
        let mut by_id: HashMap<String, Vec<proto::Receipt>> = HashMap::new();
        for r in stream_receipts(&redis).await {
            if r.terminal {
                by_id.entry(r.message_id.clone()).or_default().push(r);
            }
        }
        if by_id.len() as u64 == N || Instant::now() > deadline {
            break by_id;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default();
    assert_eq!(
        terminal.len() as u64,
        N,
        "every acknowledged recipient has a terminal receipt; second process log:\n{log}"
    );
    let twice: Vec<_> = terminal.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "exactly one terminal receipt each: {:?}",
        &twice[..twice.len().min(3)]
    );
    assert!(
        terminal
            .values()
            .all(|v| v[0].status == ReceiptStatus::Delivered as i32),
        "all delivered"
    );
    // The campaign's counts are written with the terminal receipts, so across the crash they
    // equal the receipts stream exactly: none lost with the killed process, none twice.
    let stats = PushGatewayInsightsClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .get_campaign_stats(proto::GetCampaignStatsRequest {
            app_id: "shop".into(),
            campaign_id: "crash".into(),
            control: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.variants.len(), 1, "{stats:?}");
    let v = &stats.variants[0];
    assert_eq!((v.sent, v.delivered), (N, N), "{v:?}");
    assert_eq!(v.providers.len(), 2, "{v:?}");
    for p in &v.providers {
        assert_eq!(p.statuses.len(), 1, "{p:?}");
        assert_eq!(p.statuses[0].status, ReceiptStatus::Delivered as i32);
        assert_eq!(p.statuses[0].count, N / 2, "{p:?}");
    }
    let mut seen: HashMap<String, u32> = HashMap::new();
    for a in mock.accepted() {
        *seen.entry(a.device_token).or_default() += 1;
    }
    for a in fcm.accepted() {
        *seen.entry(a.token).or_default() += 1;
    }
    for n in 0..N {
        assert!(seen.contains_key(&token(n)), "m-{n} reached its mock");
    }
    let duplicates = seen.values().filter(|&&c| c > 1).count() as u64;
    println!(
        "kill -9 after {delivered_before} of {N} deliveries: {duplicates} provider-side duplicates"
    );
    assert!(
        duplicates <= IN_FLIGHT + WRITE_BATCH,
        "duplicates {duplicates} exceed the crashed process's in-flight window"
    );
}

/// Three `pushgate serve` processes on one Redis, each fed its own batches, with transient 503s
/// so retries are parked in and claimed back from Redis: no token reaches the mock twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_redis_deliver_nothing_twice() {
    const PER_PROCESS: u64 = 3_000;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (mock, key, key_file) = apns_mock(dir.path()).await;
    mock.faults().set_unavailable_per_mille(50);
    let (processes, addrs) = start_three(
        dir.path(),
        &redis,
        &mock,
        &key,
        &key_file,
        "[retry]\nbase_ms = 20\ncap_ms = 100\nmax_attempts = 8",
    );
    let mut senders = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let addr = addr.clone();
        senders.push(tokio::spawn(async move {
            let mut client = connect(&addr).await;
            let first = i as u64 * PER_PROCESS;
            let mut receipts = Vec::new();
            for b in 0..PER_PROCESS / 500 {
                let start = first + b * 500;
                let response = client
                    .send_batch(harness::apns_batch("shop", start..start + 500))
                    .await
                    .unwrap()
                    .into_inner();
                receipts.extend(response.receipts);
            }
            receipts
        }));
    }
    let mut terminal = 0;
    for sender in senders {
        for r in sender.await.unwrap() {
            assert!(r.terminal);
            assert_eq!(r.status, ReceiptStatus::Delivered as i32, "{r:?}");
            terminal += 1;
        }
    }
    assert_eq!(terminal, 3 * PER_PROCESS);
    let mut seen: HashMap<String, u32> = HashMap::new();
    for a in mock.accepted() {
        *seen.entry(a.device_token).or_default() += 1;
    }
    assert_eq!(
        seen.len() as u64,
        3 * PER_PROCESS,
        "every token reached the mock"
    );
    let twice = seen.values().filter(|&&c| c > 1).count();
    assert_eq!(twice, 0, "no message delivered twice without a crash");
    assert!(
        mock.stats().status(503) > 0,
        "retries really went through Redis"
    );
    drop(processes);
}

/// Three `pushgate serve` processes on one Redis share one app's limit of 60/s: together they
/// deliver at 60/s (+-10%, measured on the mock's arrival timestamps), not 3 x 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_hold_one_cluster_wide_limit() {
    const RATE: f64 = 60.0;
    const BURST: u64 = 6;
    const PER_PROCESS: u64 = 120;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (mock, key, key_file) = apns_mock(dir.path()).await;
    let (processes, addrs) = start_three(
        dir.path(),
        &redis,
        &mock,
        &key,
        &key_file,
        &format!("[apps.shop.limits]\napns_per_second = {RATE}\nburst = {BURST}"),
    );
    let mut clients = Vec::new();
    for addr in &addrs {
        clients.push(connect(addr).await);
    }
    // Every process heartbeats into the replica set; each then takes a third of the limit.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let live: u64 = redis::cmd("ZCARD")
            .arg("pushgate:limit:replicas")
            .query_async(&mut conn)
            .await
            .unwrap();
        if live == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "only {live} replicas registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One more heartbeat period (500 ms) so each process has read the count of three.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut sends = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        sends.push(tokio::spawn(async move {
            let first = i as u64 * PER_PROCESS;
            client
                .send_batch(harness::apns_batch("shop", first..first + PER_PROCESS))
                .await
                .unwrap()
                .into_inner()
                .receipts
        }));
    }
    for send in sends {
        let receipts = send.await.unwrap();
        assert_eq!(receipts.len() as u64, PER_PROCESS);
        assert!(
            receipts
                .iter()
                .all(|r| r.status == ReceiptStatus::Delivered as i32)
        );
    }
    let accepted = mock.accepted();
    let total = 3 * PER_PROCESS;
    assert_eq!(accepted.len() as u64, total);
    let first = accepted.iter().map(|a| a.received_at).min().unwrap();
    let last = accepted.iter().map(|a| a.received_at).max().unwrap();
    let span = (last - first).as_secs_f64();
    // After the cluster's burst, the rest goes at RATE in total.
    let rate = (total - BURST) as f64 / span;
    println!("three processes delivered at {rate:.1}/s against a cluster limit of {RATE}/s");
    assert!(
        (RATE * 0.9..=RATE * 1.1).contains(&rate),
        "three processes delivered {rate:.1}/s; the cluster-wide limit is {RATE}/s (+-10%)"
    );
    drop(processes);
}
