//! Per-key ingress limits (`[ingress]`) through the real gateway: a key over its batch or
//! recipient rate, or over its open streams or subscriptions, is answered RESOURCE_EXHAUSTED
//! naming the key it exceeded, while another key's traffic keeps flowing; and resumable
//! subscriptions share Redis connections, so many of them work on a Redis that allows few.

use std::time::{Duration, Instant};

use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::redis_server::RedisServer;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::harness::{self, Harness, MoreApp, Options, apns_batch, status};

const SHOP_KEY: &str = "shop-ingress-key-0123456789";
const NEWS_KEY: &str = "news-ingress-key-0123456789";

fn signed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

async fn start(ingress: &str, extra: &str) -> Harness {
    harness::start(Options {
        api_keys: vec![SHOP_KEY.into()],
        more_apps: vec![MoreApp {
            id: "news".into(),
            api_keys: vec![NEWS_KEY.into()],
            admin_keys: Vec::new(),
        }],
        pipeline: "shutdown_grace_secs = 5\nmax_batch_recipients = 10".into(),
        extra: format!("[ingress]\n{ingress}\n{extra}"),
        ..Default::default()
    })
    .await
}

/// Sends one-recipient batches as `key` until one is refused (a rate of a few per second is
/// over within a few calls); returns the refusal.
async fn send_until_refused(h: &Harness, app: &str, key: &str, size: u64) -> tonic::Status {
    let mut client = h.client().await;
    for _ in 0..100 {
        let mut request = apns_batch(app, 0..size);
        request.wait_for_receipts = false;
        if let Err(status) = client.send_batch(signed(request, key)).await {
            return status;
        }
    }
    panic!("100 batches in a row were all admitted");
}

/// `key`'s batch to `app` goes through and is delivered.
async fn flows(h: &Harness, app: &str, key: &str, ids: std::ops::Range<u64>) {
    let n = ids.end - ids.start;
    let response = h
        .client()
        .await
        .send_batch(signed(apns_batch(app, ids), key))
        .await
        .expect("another key's batch is admitted")
        .into_inner();
    let delivered = response
        .receipts
        .iter()
        .filter(|r| status(r) == ReceiptStatus::Delivered)
        .count() as u64;
    assert_eq!(delivered, n, "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_batch_rate_is_refused_while_another_key_sends() {
    let h = start("batches_per_second_per_key = 2", "").await;
    let refused = send_until_refused(&h, "shop", SHOP_KEY, 1).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("ingress.batches_per_second_per_key"),
        "{refused:?}"
    );
    flows(&h, "news", NEWS_KEY, 0..10).await;
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_recipient_rate_is_refused_while_another_key_sends() {
    let h = start("recipients_per_second_per_key = 10", "").await;
    let refused = send_until_refused(&h, "shop", SHOP_KEY, 5).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("ingress.recipients_per_second_per_key"),
        "{refused:?}"
    );
    flows(&h, "news", NEWS_KEY, 0..10).await;
}

/// Opens a StreamSend as `key`; keeps the request side open until the sender is dropped.
async fn open_stream(
    h: &Harness,
    key: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<proto::SendBatchRequest>,
        tonic::Streaming<proto::Receipt>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let response = h
        .client()
        .await
        .stream_send(signed(ReceiverStream::new(rx), key))
        .await?;
    Ok((tx, response.into_inner()))
}

async fn subscribe(
    h: &Harness,
    app: &str,
    key: &str,
    resume_after: &str,
) -> Result<tonic::Streaming<proto::Receipt>, tonic::Status> {
    let request = proto::SubscribeReceiptsRequest {
        app_id: app.into(),
        resume_after: resume_after.into(),
        ..Default::default()
    };
    Ok(h.client()
        .await
        .subscribe_receipts(signed(request, key))
        .await?
        .into_inner())
}

/// Retries `open` until it succeeds (the gateway notices a closed stream asynchronously).
async fn reopens<T, F, Fut>(mut open: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match open().await {
            Ok(t) => return t,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(Instant::now() < deadline, "the slot was never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn next_terminal(stream: &mut tonic::Streaming<proto::Receipt>) -> proto::Receipt {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a receipt arrives")
            .unwrap()
            .expect("the stream is open");
        if r.terminal {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_subscriptions_per_key_are_capped_and_freed_when_closed() {
    let h = start("streams_per_key = 2\nsubscriptions_per_key = 2", "").await;
    let first = open_stream(&h, SHOP_KEY).await.unwrap();
    let _second = open_stream(&h, SHOP_KEY).await.unwrap();
    let refused = open_stream(&h, SHOP_KEY).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("ingress.streams_per_key"),
        "{refused:?}"
    );
    // Another key streams meanwhile.
    let (tx, mut receipts) = open_stream(&h, NEWS_KEY).await.unwrap();
    tx.send(apns_batch("news", 0..3)).await.unwrap();
    for _ in 0..3 {
        let r = next_terminal(&mut receipts).await;
        assert_eq!(status(&r), ReceiptStatus::Delivered, "{r:?}");
    }
    // Closing a stream frees its slot.
    drop(first);
    let (tx, mut receipts) = reopens(|| open_stream(&h, SHOP_KEY)).await;
    tx.send(apns_batch("shop", 10..11)).await.unwrap();
    assert_eq!(
        status(&next_terminal(&mut receipts).await),
        ReceiptStatus::Delivered
    );

    let sub_one = subscribe(&h, "shop", SHOP_KEY, "").await.unwrap();
    let _sub_two = subscribe(&h, "shop", SHOP_KEY, "").await.unwrap();
    let refused = subscribe(&h, "shop", SHOP_KEY, "").await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("ingress.subscriptions_per_key"),
        "{refused:?}"
    );
    let mut news_sub = subscribe(&h, "news", NEWS_KEY, "").await.unwrap();
    flows(&h, "news", NEWS_KEY, 20..21).await;
    assert_eq!(
        status(&next_terminal(&mut news_sub).await),
        ReceiptStatus::Delivered
    );
    drop(sub_one);
    reopens(|| subscribe(&h, "shop", SHOP_KEY, "")).await;
    assert_eq!(h.unresolved_drops(), 0);
}

/// A caller that streams batches, never reads a receipt and drops its call while its request
/// side still has batches queued (tonic then never resets the call) gets its call ended after
/// `stream_unread_timeout_secs`, which frees its stream slot (without the timeout the slot is
/// held for as long as the connection lives: the test fails). The connection keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_unread_gets_its_call_ended_and_its_slot_back() {
    let h = harness::start(Options {
        api_keys: vec![SHOP_KEY.into()],
        pipeline:
            "shutdown_grace_secs = 5\nmax_unread_receipts = 20\nstream_unread_timeout_secs = 2"
                .into(),
        extra: "[ingress]\nstreams_per_key = 1".into(),
        ..Default::default()
    })
    .await;
    let channel = h.channel().await;
    let mut client = proto::push_gateway_client::PushGatewayClient::new(channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let receipts = client
        .stream_send(signed(ReceiverStream::new(rx), SHOP_KEY))
        .await
        .unwrap()
        .into_inner();
    // Refused whole (no platform): cheap REJECTED receipts, ~1 MB of request each, more than
    // the HTTP/2 windows the gateway grants while it reads nothing.
    for b in 0..16u64 {
        let mut batch = apns_batch("shop", b * 10_000..(b + 1) * 10_000);
        for r in &mut batch.recipients {
            r.platform = proto::Platform::Unspecified as i32;
        }
        tx.send(batch).await.unwrap();
    }
    drop(receipts);
    drop(tx);
    let subscription = tokio::time::timeout(
        Duration::from_secs(30),
        proto::push_gateway_client::PushGatewayClient::new(channel).subscribe_receipts(signed(
            proto::SubscribeReceiptsRequest {
                app_id: "shop".into(),
                ..Default::default()
            },
            SHOP_KEY,
        )),
    )
    .await
    .expect("a subscription on the same connection opens");
    assert!(subscription.is_ok(), "{subscription:?}");
    let (tx, mut receipts) = reopens(|| open_stream(&h, SHOP_KEY)).await;
    tx.send(apns_batch("shop", 1_000_000..1_000_001))
        .await
        .unwrap();
    assert_eq!(
        status(&next_terminal(&mut receipts).await),
        ReceiptStatus::Delivered
    );
    assert_eq!(h.unresolved_drops(), 0);
}

/// A reload (what SIGHUP runs) applies new `[ingress]` limits: a lowered stream limit refuses
/// new streams (open ones stay), a raised batch rate admits what the old one refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_limits_are_reloaded_as_on_sighup() {
    let h = start("streams_per_key = 3\nbatches_per_second_per_key = 1", "").await;
    let refused = send_until_refused(&h, "shop", SHOP_KEY, 1).await;
    assert!(
        refused
            .message()
            .contains("ingress.batches_per_second_per_key"),
        "{refused:?}"
    );
    let (tx, mut receipts) = open_stream(&h, SHOP_KEY).await.unwrap();
    let _second = open_stream(&h, SHOP_KEY).await.unwrap();

    let text = std::fs::read_to_string(&h.config_file).unwrap().replace(
        "streams_per_key = 3\nbatches_per_second_per_key = 1",
        "streams_per_key = 1\nbatches_per_second_per_key = 1000",
    );
    std::fs::write(&h.config_file, text).unwrap();
    pushgate::app::reload(&h.gateway.reloadable(), Some(&h.config_file)).unwrap();

    let refused = open_stream(&h, SHOP_KEY).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("may have 1 StreamSend"),
        "the new limit: {refused:?}"
    );
    // The raised rate: batches the old one refused within the second now go through.
    for n in 0..5 {
        flows(&h, "shop", SHOP_KEY, 100 + n..101 + n).await;
    }
    // A stream open before the reload still works.
    tx.send(apns_batch("shop", 200..201)).await.unwrap();
    assert_eq!(
        status(&next_terminal(&mut receipts).await),
        ReceiptStatus::Delivered
    );
    assert_eq!(h.unresolved_drops(), 0);
}

/// Redis' connected clients.
async fn clients(c: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(c)
        .await
        .unwrap();
    list.lines().count()
}

/// Many resumable subscriptions on a Redis that takes few connections: they share the store's
/// connection, so every one of them works and the count of Redis clients does not grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumable_subscriptions_share_redis_connections() {
    const SUBSCRIPTIONS: usize = 40;
    let redis = RedisServer::start();
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let h = start(
        "subscriptions_per_key = 0",
        &format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
    )
    .await;
    // Every connection the gateway needs, once it served a batch.
    flows(&h, "shop", SHOP_KEY, 0..1).await;
    let before = clients(&mut c).await;
    // Far fewer connections than subscriptions: one each could not work.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg((before + 4).to_string())
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let mut subscriptions = Vec::new();
    for _ in 0..SUBSCRIPTIONS {
        // From the oldest receipt kept: the first batch's, then the next one's, live.
        subscriptions.push(subscribe(&h, "shop", SHOP_KEY, "0").await.unwrap());
    }
    flows(&h, "shop", SHOP_KEY, 1..4).await;
    for s in &mut subscriptions {
        let mut ids = Vec::new();
        while ids.len() < 4 {
            ids.push(next_terminal(s).await.message_id);
        }
        ids.sort();
        assert_eq!(ids, ["m-0", "m-1", "m-2", "m-3"]);
    }
    let after = clients(&mut c).await;
    assert!(
        after <= before,
        "{SUBSCRIPTIONS} subscriptions opened Redis connections: {before} before, {after} after"
    );
}
