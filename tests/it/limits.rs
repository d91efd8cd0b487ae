//! The limit stage end to end: real gateway, real gRPC client, one mock APNs per app (each app
//! with its own key, so each has its own connection pool). Assertions are on counts and on the
//! mocks' arrival timestamps (`received_at`), never on how fast the machine is.

use crate::harness;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::harness::{recipient, status, template};
use pushgate::app::Running;
use pushgate::config::Config;
use pushgate::domain::Platform;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::apns::{MockApns, MockApnsConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// One app of a test gateway: its id, its `[limits]` TOML and its mock's latency.
struct AppSpec {
    id: &'static str,
    limits: &'static str,
    latency: Duration,
}

struct Multi {
    gateway: Running,
    mocks: Vec<MockApns>,
    _dir: tempfile::TempDir,
}

/// Starts one mock APNs per app and a gateway serving all of them.
async fn start(apps: &[AppSpec], pipeline: &str) -> Multi {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\n[pipeline]\nshutdown_grace_secs = 5\n{pipeline}\n\
         [retry]\nbase_ms = 5\ncap_ms = 50\nmax_attempts = 6\n"
    );
    let mut mocks = Vec::new();
    for app in apps {
        let key = pushgate_mocks::keys::generate_apns_key();
        let mut cfg = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
        cfg.tls = false;
        cfg.topics = vec![harness::TOPIC.into()];
        cfg.latency = app.latency;
        let mock = MockApns::start(cfg).await.unwrap();
        let key_file = dir.path().join(format!("{}.p8", app.id));
        std::fs::write(&key_file, &key.private_p8_pem).unwrap();
        toml.push_str(&format!(
            "[apps.{id}.apns]\nkey_file = \"{file}\"\nkey_id = \"{kid}\"\nteam_id = \"{tid}\"\n\
             topic = \"{topic}\"\nendpoint = \"{url}\"\nconnections = 2\nrequest_timeout_ms = 5000\n\
             [apps.{id}.limits]\n{limits}\n",
            id = app.id,
            file = key_file.display(),
            kid = key.key_id,
            tid = key.team_id,
            topic = harness::TOPIC,
            url = mock.url(),
            limits = app.limits,
        ));
        mocks.push(mock);
    }
    let config = Config::from_toml(&toml).unwrap();
    let gateway = pushgate::app::start(config).await.unwrap();
    Multi {
        gateway,
        mocks,
        _dir: dir,
    }
}

async fn connect(
    addr: std::net::SocketAddr,
) -> proto::push_gateway_client::PushGatewayClient<tonic::transport::Channel> {
    proto::push_gateway_client::PushGatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn batch(app: &str, id: String, recipients: Vec<proto::Recipient>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: app.into(),
        batch_id: id,
        template: Some(template("Hi", "there")),
        recipients,
        ..Default::default()
    }
}

fn recipients(range: std::ops::Range<u64>) -> Vec<proto::Recipient> {
    range.map(|n| recipient(n, &[])).collect()
}

fn high(mut b: proto::SendBatchRequest) -> proto::SendBatchRequest {
    if let Some(t) = b.template.as_mut() {
        t.priority = proto::Priority::High as i32;
    }
    b
}

/// Sends with `wait_for_receipts` and returns the terminal receipts.
async fn send_and_wait(m: &Multi, mut b: proto::SendBatchRequest) -> Vec<proto::Receipt> {
    let mut client = connect(m.gateway.addr).await;
    b.wait_for_receipts = true;
    client.send_batch(b).await.unwrap().into_inner().receipts
}

/// Streams `batches` through StreamSend in the background; returns the terminal receipts.
fn stream_in_background(
    m: &Multi,
    batches: Vec<proto::SendBatchRequest>,
) -> tokio::task::JoinHandle<Vec<proto::Receipt>> {
    let addr = m.gateway.addr;
    tokio::spawn(async move {
        let mut client = connect(addr).await;
        let (tx, rx) = mpsc::channel(1);
        let mut inbound = client
            .stream_send(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tokio::spawn(async move {
            for b in batches {
                if tx.send(b).await.is_err() {
                    break;
                }
            }
        });
        let mut out = Vec::new();
        while let Some(r) = inbound.message().await.unwrap() {
            if r.terminal {
                out.push(r);
            }
        }
        out
    })
}

fn all_delivered(receipts: &[proto::Receipt], n: usize) {
    assert_eq!(receipts.len(), n);
    let ids: HashSet<_> = receipts.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids.len(), n, "one terminal receipt each");
    for r in receipts {
        assert_eq!(status(r), ReceiptStatus::Delivered, "{r:?}");
    }
}

/// Arrivals (seconds after `t0`) recorded by a mock.
fn arrivals(mock: &MockApns, t0: Instant) -> Vec<f64> {
    mock.accepted()
        .iter()
        .map(|a| a.received_at.saturating_duration_since(t0).as_secs_f64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_app_is_spaced_to_its_rate_with_the_burst() {
    const RATE: f64 = 50.0;
    const BURST: usize = 5;
    const N: usize = 200;
    let m = start(
        &[AppSpec {
            id: "rated",
            limits: "apns_per_second = 50\nburst = 5",
            latency: Duration::ZERO,
        }],
        "",
    )
    .await;
    // Warm the connection (its setup would otherwise bunch the first arrivals), then let the
    // bucket refill to its burst.
    all_delivered(
        &send_and_wait(&m, batch("rated", "warm".into(), recipients(0..1))).await,
        1,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.mocks[0].take_accepted();

    let receipts = send_and_wait(&m, batch("rated", "b".into(), recipients(1..1 + N as u64))).await;
    all_delivered(&receipts, N);
    let accepted = m.mocks[0].accepted();
    assert_eq!(accepted.len(), N);
    let t0 = accepted.iter().map(|a| a.received_at).min().unwrap();
    let times = arrivals(&m.mocks[0], t0);

    // Never faster than the GCRA allows: by `t0 + d` at most BURST + RATE * d arrivals.
    // Tolerance: +2 arrivals, for scheduling and network jitter that delays one arrival and lets
    // the next catch up (measured at the mock, not at the limiter).
    for step in 1..=((N as f64 / RATE) * 10.0) as usize + 5 {
        let d = step as f64 / 10.0;
        let count = times.iter().filter(|&&t| t <= d).count();
        let allowed = BURST as f64 + RATE * d + 2.0;
        assert!(
            count as f64 <= allowed,
            "{count} arrivals by +{d:.1}s, at most {allowed} allowed"
        );
    }
    // The burst was used: the first BURST went together (well inside one 20 ms interval plus
    // jitter), and the last arrival is no earlier than the rate allows: (N - BURST) / RATE.
    let span = times.iter().cloned().fold(0.0, f64::max);
    let earliest_possible = (N - BURST) as f64 / RATE;
    assert!(
        span >= earliest_possible - 0.05,
        "last arrival at +{span:.3}s; the rate allows +{earliest_possible:.3}s at the earliest"
    );
    // Not merely slow: the whole run stays within twice what the rate implies.
    assert!(
        span <= 2.0 * earliest_possible,
        "last arrival at +{span:.3}s"
    );
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(
        sorted[BURST - 1] < 0.1,
        "the burst of {BURST} arrives at once: {:?}",
        &sorted[..BURST + 1]
    );
    let wait = m
        .gateway
        .gateway
        .metrics()
        .encode()
        .lines()
        .any(|l| l.starts_with("pushgate_rate_limit_wait_seconds_count{app=\"rated\"}"));
    assert!(wait, "the wait histogram is exported per app");
    assert_eq!(m.gateway.gateway.metrics().unresolved_drops.get(), 0);
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_app_completes_before_a_flooding_apps_backlog_drains() {
    const FLOOD: u64 = 200_000;
    const SMALL: u64 = 100;
    let m = start(
        &[
            AppSpec {
                id: "flood",
                limits: "apns_per_second = 20000\nburst = 1000",
                latency: Duration::ZERO,
            },
            AppSpec {
                id: "small",
                limits: "",
                latency: Duration::ZERO,
            },
        ],
        "",
    )
    .await;
    let flood = stream_in_background(
        &m,
        (0..FLOOD / 1_000)
            .map(|b| {
                batch(
                    "flood",
                    format!("f{b}"),
                    recipients(b * 1_000..(b + 1) * 1_000),
                )
            })
            .collect(),
    );
    // Let the flood's backlog build up: at 20,000/s it needs at least 10 s to drain.
    while m.mocks[0].stats().accepted < 5_000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let small = send_and_wait(
        &m,
        batch("small", "s".into(), recipients(FLOOD..FLOOD + SMALL)),
    )
    .await;
    all_delivered(&small, SMALL as usize);
    let flood_done_when_small_done = m.mocks[0].stats().accepted;
    let flood = flood.await.unwrap();
    all_delivered(&flood, FLOOD as usize);

    // Compare on arrival timestamps: every small message arrived before the flood's last one,
    // and while most of the flood still waited.
    let last_small = m.mocks[1]
        .accepted()
        .iter()
        .map(|a| a.received_at)
        .max()
        .unwrap();
    let flood_arrivals = m.mocks[0].accepted();
    let flood_before = flood_arrivals
        .iter()
        .filter(|a| a.received_at <= last_small)
        .count() as u64;
    assert!(
        flood_before < FLOOD / 2,
        "{flood_before} flood messages arrived before the small app's last one"
    );
    assert!(flood_done_when_small_done < FLOOD / 2);
    assert_eq!(m.gateway.gateway.metrics().unresolved_drops.get(), 0);
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_overtakes_bulk_within_an_app() {
    const BULK: u64 = 600;
    const HIGH: u64 = 20;
    let m = start(
        &[AppSpec {
            id: "shop",
            limits: "apns_per_second = 200\nburst = 10",
            latency: Duration::ZERO,
        }],
        "",
    )
    .await;
    let bulk = stream_in_background(&m, vec![batch("shop", "bulk".into(), recipients(0..BULK))]);
    while m.mocks[0].stats().accepted < 50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let urgent = send_and_wait(
        &m,
        high(batch(
            "shop",
            "urgent".into(),
            recipients(BULK..BULK + HIGH),
        )),
    )
    .await;
    all_delivered(&urgent, HIGH as usize);
    all_delivered(&bulk.await.unwrap(), BULK as usize);

    // In the mock's arrival order, the HIGH messages form one run ahead of the bulk backlog.
    let order: Vec<bool> = m.mocks[0]
        .accepted()
        .iter()
        .map(|a| u64::from_str_radix(&a.device_token, 16).unwrap() >= BULK)
        .collect();
    let first = order.iter().position(|&h| h).unwrap();
    let last = order.iter().rposition(|&h| h).unwrap();
    let bulk_between = order[first..=last].iter().filter(|&&h| !h).count();
    let bulk_after = order[last..].iter().filter(|&&h| !h).count();
    // Tolerance: a few bulk messages already released to the provider when HIGH arrived.
    assert!(
        bulk_between <= 3,
        "{bulk_between} bulk interleaved with HIGH"
    );
    assert!(
        bulk_after as u64 > BULK / 2,
        "HIGH went ahead of most of the bulk backlog ({bulk_after} bulk after it)"
    );
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_slows_only_the_app_that_gets_it() {
    const N: u64 = 2_000;
    let m = start(
        &[
            AppSpec {
                id: "throttled",
                limits: "",
                latency: Duration::from_millis(10),
            },
            AppSpec {
                id: "healthy",
                limits: "",
                latency: Duration::from_millis(10),
            },
        ],
        "",
    )
    .await;
    m.mocks[0].faults().set_too_many_requests_per_mille(500);
    let throttled =
        stream_in_background(&m, vec![batch("throttled", "t".into(), recipients(0..N))]);
    let healthy = send_and_wait(&m, batch("healthy", "h".into(), recipients(N..2 * N))).await;
    all_delivered(&healthy, N as usize);
    let throttled_accepted_then = m.mocks[0].stats().accepted;
    let limits = m.gateway.gateway.limits();
    let t = limits.concurrency("throttled", Platform::Apns).unwrap();
    let h = limits.concurrency("healthy", Platform::Apns).unwrap();
    // The 429s cut the throttled app's concurrency, never the healthy app's. (Limits move with
    // RTT on a busy machine, and a cut window climbs back within a few round trips, so compare
    // the causes; the effect is the delivered counts below.)
    assert!(
        t.backpressure_decreases >= 1,
        "429s cut the throttled app's concurrency: {t:?}"
    );
    assert_eq!(
        h.backpressure_decreases, 0,
        "the healthy app was not slowed by the other's 429s: {h:?}"
    );
    // Counts over the same period: the healthy app got all of its messages through while the
    // throttled one, half of its requests refused and its window cut on each burst, got
    // clearly fewer (about half; a window cut by 429s climbs back within a few round trips).
    assert!(
        throttled_accepted_then < N * 3 / 4,
        "throttled app delivered {throttled_accepted_then} meanwhile"
    );
    // The throttled app still finishes: every message ends in exactly one terminal receipt.
    let throttled = throttled.await.unwrap();
    assert_eq!(throttled.len(), N as usize);
    assert!(m.mocks[0].stats().status(429) > 0);
    assert_eq!(m.gateway.gateway.metrics().unresolved_drops.get(), 0);
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_messages_stay_in_the_accept_window_and_slow_the_stream() {
    const WINDOW: usize = 20;
    const N: u64 = 300;
    let m = start(
        &[AppSpec {
            id: "shop",
            limits: "apns_per_second = 100\nburst = 1",
            latency: Duration::ZERO,
        }],
        // The pad is over the default `max_vars_bytes` (8 KiB), so this test raises the cap.
        &format!("accept_window = {WINDOW}\nmax_vars_bytes = 32768"),
    )
    .await;
    // 16 KiB of (unused) variables per recipient, so 1 MiB of HTTP/2 flow-control window holds
    // at most 64 recipients in transit.
    let pad = "x".repeat(16 * 1024);
    let batches: Vec<_> = (0..N)
        .map(|n| {
            batch(
                "shop",
                format!("b{n}"),
                vec![recipient(n, &[("pad", &pad)])],
            )
        })
        .collect();
    let addr = m.gateway.addr;
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<u64>();
    let stream = tokio::spawn(async move {
        let mut client = connect(addr).await;
        let (tx, rx) = mpsc::channel(1);
        let mut inbound = client
            .stream_send(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tokio::spawn(async move {
            for (i, b) in batches.into_iter().enumerate() {
                if tx.send(b).await.is_err() {
                    break;
                }
                let _ = sent_tx.send(i as u64 + 1);
            }
        });
        let mut out = Vec::new();
        while let Some(r) = inbound.message().await.unwrap() {
            if r.terminal {
                out.push(r);
            }
        }
        out
    });
    // When the caller has handed over its last batch, the gateway has delivered all but what
    // the window and the transport's buffers hold.
    let mut sent = 0;
    while sent < N {
        sent = sent_rx.recv().await.unwrap();
    }
    let delivered_when_all_sent = m.mocks[0].stats().accepted;
    let buffered = WINDOW as u64 + 64 + 16;
    assert!(
        delivered_when_all_sent + buffered >= N,
        "the caller got ahead of delivery: all {N} sent with only {delivered_when_all_sent} delivered"
    );
    all_delivered(&stream.await.unwrap(), N as usize);
    // The app may hold half the window waiting (default `max_queued`), plus what is in flight.
    let high_water = m.gateway.gateway.window_high_water();
    assert!(
        (WINDOW / 2..=WINDOW).contains(&high_water),
        "window high water {high_water}"
    );
    assert_eq!(m.gateway.gateway.metrics().unresolved_drops.get(), 0);
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_applies_while_waiting_and_limits_reload_without_restart() {
    let m = start(
        &[AppSpec {
            id: "shop",
            limits: "apns_per_minute = 60\nburst = 1",
            latency: Duration::ZERO,
        }],
        "",
    )
    .await;
    // 1/s: of 5 messages with a 1 s ttl, the first goes at once, the second after 1 s (too
    // late or just in time), the rest expire waiting, each with an EXPIRED receipt.
    let mut b = batch("shop", "ttl".into(), recipients(0..5));
    if let Some(t) = b.template.as_mut() {
        t.ttl_seconds = 1;
    }
    let receipts = send_and_wait(&m, b).await;
    assert_eq!(receipts.len(), 5);
    let expired = receipts
        .iter()
        .filter(|r| status(r) == ReceiptStatus::Expired)
        .count();
    assert!(expired >= 3, "{receipts:?}");
    assert!(
        receipts
            .iter()
            .all(|r| matches!(status(r), ReceiptStatus::Expired | ReceiptStatus::Delivered))
    );

    // Raise the limit at run time: 100 messages now go in one burst.
    m.gateway.gateway.update_limits(
        "shop",
        pushgate::config::LimitConfig {
            apns_per_second: Some(1_000),
            burst: Some(100),
            ..Default::default()
        },
    );
    m.mocks[0].take_accepted();
    let receipts = send_and_wait(&m, batch("shop", "fast".into(), recipients(100..200))).await;
    all_delivered(&receipts, 100);
    let accepted = m.mocks[0].accepted();
    assert_eq!(accepted.len(), 100);
    let first = accepted.iter().map(|a| a.received_at).min().unwrap();
    let span = arrivals(&m.mocks[0], first).into_iter().fold(0.0, f64::max);
    // Under the old 1/s limit the last of these could not arrive before +99 s.
    assert!(span < 10.0, "last arrival at +{span:.3}s");
    assert_eq!(m.gateway.gateway.metrics().unresolved_drops.get(), 0);
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_apps_backlog_cannot_fill_the_shared_accept_window() {
    const WINDOW: usize = 200;
    const FLOOD: u64 = 2_000;
    const SMALL: u64 = 50;
    let m = start(
        &[
            AppSpec {
                id: "slow",
                limits: "apns_per_second = 20\nburst = 1",
                latency: Duration::ZERO,
            },
            AppSpec {
                id: "small",
                limits: "",
                latency: Duration::ZERO,
            },
        ],
        &format!("accept_window = {WINDOW}"),
    )
    .await;
    // At 20/s the flood needs 100 s; it may hold at most half the window waiting.
    let flood = stream_in_background(
        &m,
        (0..FLOOD / 100)
            .map(|b| batch("slow", format!("f{b}"), recipients(b * 100..(b + 1) * 100)))
            .collect(),
    );
    let limits = std::sync::Arc::clone(m.gateway.gateway.limits());
    while limits.waiting("slow") < WINDOW / 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let small = send_and_wait(
        &m,
        batch("small", "s".into(), recipients(FLOOD..FLOOD + SMALL)),
    )
    .await;
    all_delivered(&small, SMALL as usize);
    let slow_delivered = m.mocks[0].stats().accepted;
    assert!(
        slow_delivered < FLOOD / 10,
        "the small app was admitted and delivered while the flood had {slow_delivered} through"
    );
    assert!(limits.waiting("slow") <= WINDOW / 2);
    // Lift the limit at run time so the flood drains now.
    m.gateway
        .gateway
        .update_limits("slow", pushgate::config::LimitConfig::default());
    all_delivered(&flood.await.unwrap(), FLOOD as usize);
    assert_eq!(limits.waiting("slow"), 0);
    assert_eq!(m.gateway.gateway.metrics().unresolved_drops.get(), 0);
    m.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_hold_one_cluster_wide_limit() {
    const REPLICAS: usize = 3;
    const RATE: f64 = 60.0;
    const BURST: usize = 6;
    const PER_REPLICA: u64 = 120;
    let redis = pushgate_mocks::redis_server::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = pushgate_mocks::keys::generate_apns_key();
    let mut cfg = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    cfg.tls = false;
    cfg.topics = vec![harness::TOPIC.into()];
    let mock = MockApns::start(cfg).await.unwrap();
    let key_file = dir.path().join("shop.p8");
    std::fs::write(&key_file, &key.private_p8_pem).unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[pipeline]\nshutdown_grace_secs = 5\n\
         [retry]\nbase_ms = 5\ncap_ms = 50\nmax_attempts = 6\n\
         [redis]\nurl = \"{redis}\"\npoll_ms = 20\n\
         [apps.shop.apns]\nkey_file = \"{file}\"\nkey_id = \"{kid}\"\nteam_id = \"{tid}\"\n\
         topic = \"{topic}\"\nendpoint = \"{url}\"\n\
         [apps.shop.limits]\napns_per_second = {RATE}\nburst = {BURST}\n",
        redis = redis.url(),
        file = key_file.display(),
        kid = key.key_id,
        tid = key.team_id,
        topic = harness::TOPIC,
        url = mock.url(),
    );
    let mut gateways = Vec::new();
    for _ in 0..REPLICAS {
        let config = Config::from_toml(&toml).unwrap();
        gateways.push(pushgate::app::start(config).await.unwrap());
    }
    // Wait for every replica to see the others' heartbeats.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateways
        .iter()
        .any(|g| g.gateway.limits().replicas() != REPLICAS as u32)
    {
        assert!(Instant::now() < deadline, "replicas never saw each other");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sends: Vec<_> = gateways
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let addr = g.addr;
            let from = i as u64 * PER_REPLICA;
            tokio::spawn(async move {
                let mut client = connect(addr).await;
                let mut b = batch(
                    "shop",
                    format!("r{i}"),
                    recipients(from..from + PER_REPLICA),
                );
                b.wait_for_receipts = true;
                client.send_batch(b).await.unwrap().into_inner().receipts
            })
        })
        .collect();
    for s in sends {
        all_delivered(&s.await.unwrap(), PER_REPLICA as usize);
    }
    let total = REPLICAS * PER_REPLICA as usize;
    let accepted = mock.accepted();
    assert_eq!(accepted.len(), total);
    let t0 = accepted.iter().map(|a| a.received_at).min().unwrap();
    let span = arrivals(&mock, t0).into_iter().fold(0.0, f64::max);
    // After the cluster's burst (each replica's share of it), the rest goes at RATE in total.
    let rate = (total - BURST) as f64 / span;
    assert!(
        (RATE * 0.9..=RATE * 1.1).contains(&rate),
        "cluster delivered {rate:.1}/s; the limit is {RATE}/s (+-10%)"
    );
    for g in gateways {
        assert_eq!(g.gateway.metrics().unresolved_drops.get(), 0);
        g.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reload_from_the_config_file_as_on_sighup() {
    let m = start(
        &[AppSpec {
            id: "shop",
            limits: "apns_per_second = 5",
            latency: Duration::ZERO,
        }],
        "",
    )
    .await;
    let gateway = &m.gateway.gateway;
    assert_eq!(gateway.limits().get("shop").apns_per_second, Some(5));
    // What SIGHUP does: re-read the file, apply each app's [limits].
    let file = m._dir.path().join("reloaded.toml");
    let app = "[apps.shop.apns]\nkey_pem = \"x\"\nkey_id = \"ABC123DEFG\"\n\
               team_id = \"DEF123GHIJ\"\ntopic = \"t\"\n";
    std::fs::write(
        &file,
        format!("{app}[apps.shop.limits]\napns_per_minute = 600\nweight = 3\n"),
    )
    .unwrap();
    assert_eq!(
        pushgate::app::reload_limits(gateway, Some(&file)).unwrap(),
        1
    );
    let now = gateway.limits().get("shop");
    assert_eq!((now.apns_per_minute, now.weight), (Some(600), 3));
    // An invalid file changes nothing, and the error names the key.
    std::fs::write(&file, format!("{app}[apps.shop.limits]\nweight = 0\n")).unwrap();
    let err = pushgate::app::reload_limits(gateway, Some(&file))
        .unwrap_err()
        .to_string();
    assert!(err.contains("apps.shop.limits.weight"), "{err}");
    assert_eq!(gateway.limits().get("shop").weight, 3);
    m.gateway.shutdown().await.unwrap();
}
