//! Durable delivery through the real gRPC server: the `[redis]` config section, the
//! `PushGatewayAdmin` dead-letter RPCs, and gRPC health / UNAVAILABLE while Redis is away.

use crate::harness;

use std::time::{Duration, Instant};

use crate::harness::{Options, recipient, status, template};
use pushgate::proto::push_gateway_admin_client::PushGatewayAdminClient;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::redis_server::RedisServer;
use tonic_health::pb::health_check_response::ServingStatus;

async fn health(addr: std::net::SocketAddr) -> i32 {
    service_health(addr, "pushgate.v1.PushGateway").await
}

/// The health of `service` (`""` is the server as a whole).
async fn service_health(addr: std::net::SocketAddr, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_health(addr: std::net::SocketAddr, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(addr).await != want as i32 {
        assert!(Instant::now() < deadline, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(ids: std::ops::Range<u64>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: "shop".into(),
        template: Some(template("Hi", "there")),
        recipients: ids.map(|n| recipient(n, &[])).collect(),
        wait_for_receipts: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_rpcs_and_health_follow_redis() {
    let mut redis = RedisServer::start_persistent();
    let h = harness::start(Options {
        // The `[redis]` section rides after the retry keys (the harness has no slot for it).
        retry: format!(
            "base_ms = 5\ncap_ms = 10\nmax_attempts = 2\n[redis]\nurl = \"{}\"\npoll_ms = 20\ncommand_timeout_ms = 500",
            redis.url()
        ),
        // Open mode (no keys): admin RPCs are served only when allowed explicitly.
        top: "allow_unauthenticated = true".into(),
        ..Default::default()
    })
    .await;
    wait_health(h.gateway.addr, ServingStatus::Serving).await;
    let mut client = h.client().await;
    let mut admin = PushGatewayAdminClient::connect(format!("http://{}", h.gateway.addr))
        .await
        .unwrap();

    // Every attempt fails with 503: after two attempts each message is a dead letter.
    h.mock.faults().set_unavailable_per_mille(1_000);
    let response = client.send_batch(request(1..4)).await.unwrap().into_inner();
    assert_eq!(response.receipts.len(), 3);
    assert!(
        response
            .receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Failed)
    );
    let mut listed = None;
    for _ in 0..100 {
        let r = admin
            .list_dead_letters(proto::ListDeadLettersRequest {
                app_id: "shop".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.total == 3 {
            listed = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = listed.expect("three dead letters");
    assert_eq!(listed.dead_letters.len(), 3);
    for d in &listed.dead_letters {
        assert_eq!(d.attempts, 2, "{d:?}");
        assert!(d.last_error.contains("after 2 attempts"), "{d:?}");
        assert_eq!(d.platform, proto::Platform::Apns as i32);
    }
    let unknown = admin
        .list_dead_letters(proto::ListDeadLettersRequest {
            app_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // Unknown apps get the answer other tenants' apps get (security::authorization_matrix).
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied);

    // Replay one after APNs recovered; its receipt reaches subscribers.
    h.mock.faults().set_unavailable_per_mille(0);
    let mut receipts = client
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let replayed = admin
        .replay_dead_letters(proto::ReplayDeadLettersRequest {
            app_id: "shop".into(),
            message_ids: vec!["m-1".into()],
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    let r = tokio::time::timeout(Duration::from_secs(10), receipts.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.message_id.as_str(), status(&r)),
        ("m-1", ReceiptStatus::Delivered)
    );
    let purged = admin
        .purge_dead_letters(proto::PurgeDeadLettersRequest {
            app_id: "shop".into(),
            message_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, 2);

    // Redis away: NOT_SERVING and UNAVAILABLE; back: SERVING and sends work.
    redis.stop();
    wait_health(h.gateway.addr, ServingStatus::NotServing).await;
    assert_eq!(
        service_health(h.gateway.addr, "").await,
        ServingStatus::NotServing as i32,
        "the server as a whole follows the store too"
    );
    let refused = client.send_batch(request(10..11)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("redis"), "{refused:?}");
    redis.restart();
    wait_health(h.gateway.addr, ServingStatus::Serving).await;
    let response = client
        .send_batch(request(20..22))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.receipts.len(), 2);
    assert!(
        response
            .receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Delivered)
    );
    assert_eq!(h.unresolved_drops(), 0);
}

type Client = pushgate::proto::push_gateway_client::PushGatewayClient<tonic::transport::Channel>;

async fn subscribe(client: &Client, cursor: &str) -> tonic::Streaming<proto::Receipt> {
    client
        .clone()
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            resume_after: cursor.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(s: &mut tonic::Streaming<proto::Receipt>) -> proto::Receipt {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a receipt in time")
        .unwrap()
        .unwrap()
}

/// A stream id `<ms>-<seq>` as a comparable pair.
fn cursor(c: &str) -> (u64, u64) {
    let (ms, seq) = c.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_receipts_resumed_from_a_cursor_returns_exactly_the_missing_ones() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        retry: format!(
            "base_ms = 5\ncap_ms = 10\nmax_attempts = 3\n[redis]\nurl = \"{}\"\npoll_ms = 20",
            redis.url()
        ),
        ..Default::default()
    })
    .await;
    let mut client = h.client().await;
    let mut first = subscribe(&client, "0").await;
    let response = client.send_batch(request(1..6)).await.unwrap().into_inner();
    assert_eq!(response.receipts.len(), 5);
    // Read two, then disconnect.
    let r1 = next(&mut first).await;
    let r2 = next(&mut first).await;
    assert!(cursor(&r1.cursor) < cursor(&r2.cursor), "{r1:?} {r2:?}");
    drop(first);
    // More receipts while the consumer is away.
    let response = client
        .send_batch(request(6..11))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.receipts.len(), 5);

    let mut resumed = subscribe(&client, &r2.cursor).await;
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(next(&mut resumed).await);
    }
    let ids: Vec<&str> = got.iter().map(|r| r.message_id.as_str()).collect();
    let mut expected: Vec<String> = (1..11).map(|n| format!("m-{n}")).collect();
    expected.retain(|id| *id != r1.message_id && *id != r2.message_id);
    let mut sorted = ids.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "exactly the missing receipts");
    assert!(
        got.iter()
            .all(|r| r.terminal && status(r) == ReceiptStatus::Delivered)
    );
    // Nothing more (no duplicates of what was already seen).
    let extra = tokio::time::timeout(Duration::from_millis(500), resumed.message()).await;
    assert!(extra.is_err(), "no further receipts: {extra:?}");

    let bad = client
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            resume_after: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}
