//! Criterion benchmark of the Redis store's retry path against a private `redis-server`: a round
//! of 2,000 jobs parked due at once (serialization and pipelined MULTI writes), claimed back
//! through the Lua claim script into the ready channel, and resolved (pipelined lease acks).
//!
//! ```text
//! cargo bench --bench redis_queue
//! ```
//!
//! Reported as jobs per second through the whole round (park, claim, ack).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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
use pushgate_mocks::redis_server::RedisServer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Jobs per measured round.
const ROUND: usize = 2_000;

fn retry_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let redis = RedisServer::start();
    let _guard = rt.enter();
    let config = RedisConfig {
        url: Some(redis.url()),
        poll_ms: 5,
        claim_batch: 2_000,
        write_batch: 4_000,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let store = RedisClient::connect(&config, stop.clone()).unwrap();
    assert!(rt.block_on(store.wait_healthy(Duration::from_secs(5))));
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
        None,
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
            content: Default::default(),
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
            due: None,
        }
    };
    let mut next = 0usize;
    let mut group = c.benchmark_group("redis_store");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(ROUND as u64));
    group.bench_function("park_claim_ack_2000", |b| {
        b.iter_custom(|rounds| {
            let mut spent = Duration::ZERO;
            for _ in 0..rounds {
                let built: Vec<Job> = (next..next + ROUND).map(make).collect();
                next += ROUND;
                let acked_before = queue.stats().acked;
                let started = Instant::now();
                rt.block_on(async {
                    let due = tokio::time::Instant::now();
                    for job in built {
                        queue.park(job, due);
                    }
                    for _ in 0..ROUND {
                        let work = tokio::time::timeout(Duration::from_secs(30), claimed.recv())
                            .await
                            .expect("claims stalled")
                            .expect("ready channel closed");
                        work.resolve(Resolution::gateway(ReceiptStatus::Delivered, ""));
                    }
                    while queue.stats().acked < acked_before + ROUND as u64 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
                spent += started.elapsed();
            }
            spent
        })
    });
    group.finish();
    stop.cancel();
}

criterion_group!(benches, retry_round_trip);
criterion_main!(benches);
