//! Throughput of the Redis retry queue (the issue's floor: 50,000 retries scheduled and claimed
//! per second on the 2-core dev machine with a local Redis). Ignored by default; run with
//!
//! ```text
//! cargo test --release --test redis_bench -- --ignored --nocapture
//! ```
//!
//! It parks `PUSHGATE_BENCH_JOBS` (default 200,000) jobs due at once through
//! `RetryQueue::schedule` (serialization + pipelined MULTI writes), claims them back through
//! the Lua claim script into the dispatch channel, then resolves them (pipelined lease acks),
//! and prints each rate.

#[path = "common/redis.rs"]
mod redis_harness;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pushgate::config::RetryConfig;
use pushgate::domain::{
    ApnsRequest, MessageMeta, Platform, Priority, ProviderRequest, PushType, ReceiptStatus,
};
use pushgate::metrics::Metrics;
use pushgate::receipts::{Pending, ReceiptHub, Resolution};
use pushgate::registry::AppRuntime;
use pushgate::store::Store;
use pushgate::store::redis::{RedisClient, RedisConfig, RedisStore};
use pushgate::work::{Job, Work};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn retries_scheduled_and_claimed_per_second() {
    let jobs: usize = std::env::var("PUSHGATE_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let redis = redis_harness::RedisServer::start();
    let config = RedisConfig {
        url: Some(redis.url()),
        poll_ms: 5,
        claim_batch: 2_000,
        write_batch: 4_000,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let store = RedisClient::connect(&config, stop.clone()).unwrap();
    assert!(store.wait_healthy(Duration::from_secs(5)).await);
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(ReceiptHub::new(Arc::clone(&metrics)));
    let app = Arc::new(AppRuntime {
        id: "shop".into(),
        apns_topic: "com.example.shop".into(),
        apns: None,
        fcm: None,
        retry: RetryConfig::default(),
    });
    let (dispatch, mut claimed) = mpsc::channel::<Work>(65_536);
    let queue = RedisStore::start(
        Arc::clone(&store),
        Arc::clone(&hub),
        [Arc::clone(&app)],
        dispatch,
        stop.clone(),
    );
    hub.add_observer(Arc::clone(&queue) as _);
    let payload = Bytes::from_static(
        br#"{"aps":{"alert":{"title":"Your order shipped","body":"Hello Ada, parcel 1234 is on its way"},"sound":"default"},"order":"1234"}"#,
    );
    let make = |i: usize| {
        let meta = Arc::new(MessageMeta {
            app_id: Arc::clone(&app.id),
            batch_id: "b".into(),
            campaign_id: "c".into(),
            message_id: format!("m-{i}"),
            platform: Platform::Apns,
            user_id: format!("u-{i}"),
            priority: Priority::High,
            accepted_at: SystemTime::now(),
            expires_at: None,
            campaign_rate_per_minute: 0,
        });
        let mut pending = Pending::new(meta, None, Arc::clone(&hub), None);
        pending.begin_attempt();
        Job {
            pending,
            request: ProviderRequest::Apns(ApnsRequest {
                device_token: format!("{i:064x}"),
                topic: "com.example.shop".into(),
                push_type: PushType::Alert,
                priority: 10,
                expiration: None,
                collapse_id: None,
                apns_id: uuid::Uuid::new_v4(),
                payload: payload.clone(),
            }),
            app: Arc::clone(&app),
        }
    };
    let built: Vec<Job> = (0..jobs).map(make).collect();

    let started = Instant::now();
    let due = tokio::time::Instant::now();
    for job in built {
        queue.park(job, due);
    }
    let mut got = Vec::with_capacity(jobs);
    while got.len() < jobs {
        match tokio::time::timeout(Duration::from_secs(30), claimed.recv()).await {
            Ok(Some(job)) => got.push(job),
            _ => panic!("claimed only {} of {jobs}", got.len()),
        }
    }
    let claim_elapsed = started.elapsed();
    let ack_started = Instant::now();
    for work in got {
        work.resolve(Resolution::gateway(ReceiptStatus::Delivered, ""));
    }
    while queue.stats().acked < jobs as u64 {
        assert!(
            ack_started.elapsed() < Duration::from_secs(30),
            "acks stalled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let rate = jobs as f64 / claim_elapsed.as_secs_f64();
    println!(
        "redis retry queue: {jobs} jobs scheduled+claimed in {:.3} s = {:.0} retries/s; \
         with lease acks {:.3} s = {:.0} jobs/s (reclaimed {})",
        claim_elapsed.as_secs_f64(),
        rate,
        total.as_secs_f64(),
        jobs as f64 / total.as_secs_f64(),
        queue.stats().reclaimed,
    );
    assert_eq!(queue.stats().claimed, jobs as u64);
    stop.cancel();
}
