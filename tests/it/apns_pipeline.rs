//! End-to-end through the real gateway: gRPC client -> gateway on a free port -> mock APNs.

use crate::harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::harness::{
    Options, recipient, status, stream_all, template, terminal_by_message, token,
};
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::apns::ApnsReason;
use tonic_types::StatusExt;

fn batch(
    n: usize,
    recipients: Vec<proto::Recipient>,
    t: proto::Template,
) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: "shop".into(),
        batch_id: format!("batch-{n}"),
        campaign_id: "spring".into(),
        template: Some(t),
        recipients,
        wait_for_receipts: false,
        campaign_rate_per_minute: 0,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_personalized_recipients_under_faults() {
    let h = harness::start(Options::default()).await;
    const TOTAL: u64 = 10_000;
    const PER_BATCH: u64 = 1_000;
    let faults = h.mock.faults();
    let mut expected = HashMap::new();
    for n in 1..=TOTAL {
        let status = match n % 100 {
            1 => {
                faults.add_unregistered(&token(n), Some(1_700_000_000_000));
                ReceiptStatus::InvalidToken
            }
            2 => {
                faults.add_bad_device_token(&token(n));
                ReceiptStatus::InvalidToken
            }
            _ if n % 500 == 3 => ReceiptStatus::Rejected,
            _ => ReceiptStatus::Delivered,
        };
        expected.insert(format!("m-{n}"), status);
    }
    faults.set_too_many_requests_per_mille(20);
    faults.set_internal_error_per_mille(20);
    faults.goaway_after(3_000);

    let t = template(
        "Hi {{ first_name }}",
        "Your {{ item | default: \"cart\" }} is waiting",
    );
    let batches = (0..TOTAL / PER_BATCH)
        .map(|b| {
            let recipients = (1..=PER_BATCH)
                .map(|i| {
                    let n = b * PER_BATCH + i;
                    if n % 500 == 3 {
                        recipient(n, &[("item", "shoes")])
                    } else {
                        recipient(n, &[("first_name", &format!("User{n}"))])
                    }
                })
                .collect();
            batch(b as usize, recipients, t.clone())
        })
        .collect();
    let receipts = stream_all(&h, batches).await;

    let terminal = terminal_by_message(&receipts);
    assert_eq!(
        terminal.len() as u64,
        TOTAL,
        "exactly one terminal receipt each"
    );
    for (id, want) in &expected {
        let got = &terminal[id];
        assert_eq!(status(got), *want, "{id}: {got:?}");
        if *want == ReceiptStatus::Rejected {
            assert!(got.field.ends_with("vars.first_name"), "{got:?}");
            assert!(got.field.starts_with("recipients["), "{got:?}");
        }
    }
    let unregistered = terminal["m-101"].clone();
    assert_eq!(unregistered.reason, "Unregistered");
    assert_eq!(unregistered.provider_status, 410);
    assert_eq!(unregistered.token_invalid_since_ms, 1_700_000_000_000);
    assert_eq!(terminal["m-102"].reason, "BadDeviceToken");

    // Faults really happened and were retried.
    let stats = h.mock.stats();
    assert!(stats.status(429) > 0 && stats.status(500) > 0, "{stats:?}");
    assert!(stats.goaways_sent >= 1, "{stats:?}");
    assert!(
        receipts
            .iter()
            .any(|r| !r.terminal && status(r) == ReceiptStatus::Retrying)
    );
    assert!(h.gateway.gateway.apps().get("shop").is_some());

    // The mock received exactly the delivered payloads, rendered for each recipient.
    let delivered: HashSet<String> = terminal
        .values()
        .filter(|r| status(r) == ReceiptStatus::Delivered)
        .map(|r| r.message_id.clone())
        .collect();
    let accepted = h.mock.accepted();
    assert_eq!(
        accepted.len(),
        delivered.len(),
        "no duplicates, nothing missing"
    );
    for a in &accepted {
        let n = u64::from_str_radix(&a.device_token, 16).unwrap();
        assert!(delivered.contains(&format!("m-{n}")));
        assert_eq!(a.topic, harness::TOPIC);
        assert_eq!(a.push_type, "alert");
        let alert = &a.payload["aps"]["alert"];
        assert_eq!(alert["title"], format!("Hi User{n}"));
        assert_eq!(alert["body"], "Your cart is waiting");
        assert!(!a.payload.to_string().contains("{{"));
    }
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_caller_is_held_to_the_accept_window() {
    const WINDOW: usize = 64;
    let h = harness::start(Options {
        pipeline: format!("accept_window = {WINDOW}\nshutdown_grace_secs = 5"),
        mock: Box::new(|c| c.latency = Duration::from_millis(5)),
        ..Default::default()
    })
    .await;
    let t = template("Hello {{ first_name }}", "x");
    let batches: Vec<_> = (0..40u64)
        .map(|b| {
            let recipients = (1..=100)
                .map(|i| recipient(b * 100 + i, &[("first_name", "A")]))
                .collect();
            batch(b as usize, recipients, t.clone())
        })
        .collect();
    let receipts = stream_all(&h, batches).await;
    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len(), 4_000);
    assert!(
        terminal
            .values()
            .all(|r| status(r) == ReceiptStatus::Delivered)
    );
    let high_water = h.gateway.gateway.window_high_water();
    assert!(
        high_water <= WINDOW,
        "in flight {high_water} exceeded the window"
    );
    assert_eq!(
        high_water, WINDOW,
        "the caller outpaced the provider, so the window filled"
    );
    assert!(h.mock.stats().max_concurrent_streams_seen <= WINDOW as u64);
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_and_resets_are_retried() {
    let h = harness::start(Options::default()).await;
    h.mock.faults().drop_connection_after(150);
    h.mock.faults().reset_after(400);
    let t = template("Hi", "there");
    let batches = (0..5u64)
        .map(|b| {
            batch(
                b as usize,
                (1..=200).map(|i| recipient(b * 200 + i, &[])).collect(),
                t.clone(),
            )
        })
        .collect();
    let receipts = stream_all(&h, batches).await;
    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len(), 1_000);
    assert!(
        terminal
            .values()
            .all(|r| status(r) == ReceiptStatus::Delivered),
        "{:?}",
        terminal
            .values()
            .find(|r| status(r) != ReceiptStatus::Delivered)
    );
    let stats = h.mock.stats();
    assert!(
        stats.connections_dropped >= 1 && stats.resets_sent >= 1,
        "{stats:?}"
    );
    assert!(stats.connections_opened >= 2, "reconnected: {stats:?}");
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_fail_fast_with_operator_advice() {
    let h = harness::start(Options::default()).await;
    h.mock
        .faults()
        .reject_all_auth(Some(ApnsReason::InvalidProviderToken));
    let t = template("Hi", "there");
    let receipts = stream_all(
        &h,
        vec![batch(0, (1..=300).map(|i| recipient(i, &[])).collect(), t)],
    )
    .await;
    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len(), 300);
    for r in terminal.values() {
        assert_eq!(status(r), ReceiptStatus::Failed);
        assert!(r.reason.starts_with("InvalidProviderToken"), "{}", r.reason);
        assert!(r.reason.contains("apns.key_id"), "{}", r.reason);
    }
    // Not hammered: after the first rejections the gateway stops calling APNs.
    let requests = h.mock.stats().requests;
    assert!(requests < 50, "{requests} requests reached APNs");
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_provider_token_is_resigned_and_sent_again() {
    let h = harness::start(Options::default()).await;
    let t = template("Hi", "there");
    // Warm the connection, then make APNs call the token expired.
    let first = stream_all(&h, vec![batch(0, vec![recipient(1, &[])], t.clone())]).await;
    assert_eq!(status(first.last().unwrap()), ReceiptStatus::Delivered);
    h.mock.faults().force_expired_provider_token(1);
    let receipts = stream_all(&h, vec![batch(1, vec![recipient(2, &[])], t)]).await;
    let last = receipts.last().unwrap();
    assert_eq!(status(last), ReceiptStatus::Delivered, "{last:?}");
    assert_eq!(h.mock.stats().reason("ExpiredProviderToken"), 1);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_token_refused_as_expired_again_is_retried_later_not_failed() {
    let h = harness::start(Options::default()).await;
    let t = template("Hi", "there");
    let first = stream_all(&h, vec![batch(0, vec![recipient(1, &[])], t.clone())]).await;
    assert_eq!(status(first.last().unwrap()), ReceiptStatus::Delivered);
    // The first refusal is re-signed and sent again at once; the second (with the new token)
    // makes it a retry through the retry queue, which then delivers it.
    h.mock.faults().force_expired_provider_token(2);
    let receipts = stream_all(&h, vec![batch(1, vec![recipient(2, &[])], t)]).await;
    let last = receipts.last().unwrap();
    assert_eq!(status(last), ReceiptStatus::Delivered, "{last:?}");
    assert!(
        receipts.iter().any(|r| status(r) == ReceiptStatus::Retrying
            && r.reason.starts_with("ExpiredProviderToken")),
        "{receipts:?}"
    );
    assert_eq!(h.mock.stats().reason("ExpiredProviderToken"), 2);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_within_grace() {
    let h = harness::start(Options {
        mock: Box::new(|c| c.latency = Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let mut client = h.client().await;
    let mut subscription = client
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let response = client
        .send_batch(batch(
            0,
            (1..=200).map(|i| recipient(i, &[])).collect(),
            template("a", "b"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 200);
    h.gateway.shutdown().await.unwrap();
    let mut receipts = Vec::new();
    while let Some(r) = subscription.message().await.unwrap() {
        receipts.push(r);
    }
    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len(), 200);
    assert!(
        terminal
            .values()
            .all(|r| status(r) == ReceiptStatus::Delivered),
        "{:?}",
        terminal
            .values()
            .find(|r| status(r) != ReceiptStatus::Delivered)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_grace_fails_the_rest_with_a_receipt_each() {
    let h = harness::start(Options {
        pipeline: "shutdown_grace_secs = 0".into(),
        mock: Box::new(|c| c.latency = Duration::from_secs(3)),
        ..Default::default()
    })
    .await;
    let mut client = h.client().await;
    let mut subscription = client
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let response = client
        .send_batch(batch(
            0,
            (1..=100).map(|i| recipient(i, &[])).collect(),
            template("a", "b"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 100);
    let metrics = std::sync::Arc::clone(h.gateway.gateway.metrics());
    h.gateway.shutdown().await.unwrap();
    let mut receipts = Vec::new();
    while let Some(r) = subscription.message().await.unwrap() {
        receipts.push(r);
    }
    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len(), 100);
    for r in terminal.values() {
        assert_eq!(status(r), ReceiptStatus::Failed);
        assert!(r.reason.contains("shut down"), "{}", r.reason);
    }
    assert_eq!(metrics.unresolved_drops.get(), 0);
    assert_eq!(metrics.in_flight.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_validates_and_waits_for_receipts() {
    let h = harness::start(Options::default()).await;
    let mut client = h.client().await;

    // Unknown app: the whole call fails, answered as for another tenant's app (authorization
    // comes before the app is looked up; security::authorization_matrix).
    let mut b = batch(0, vec![recipient(1, &[])], template("a", "b"));
    b.app_id = "nope".into();
    let err = client.send_batch(b).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().starts_with("app_id"), "{}", err.message());

    // No app id at all: INVALID_ARGUMENT naming it.
    let mut b = batch(0, vec![recipient(1, &[])], template("a", "b"));
    b.app_id.clear();
    let err = client.send_batch(b).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let details = err.get_error_details();
    let violations = &details.bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "app_id");

    // Unspecified platform: named per recipient.
    let mut bad = recipient(2, &[]);
    bad.platform = 0;
    let err = client
        .send_batch(batch(0, vec![recipient(1, &[]), bad], template("a", "b")))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("recipients[1].platform"),
        "{}",
        err.message()
    );

    // Malformed template: named.
    let err = client
        .send_batch(batch(
            0,
            vec![recipient(1, &[])],
            template("Hi {{ name", "b"),
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("template.title"),
        "{}",
        err.message()
    );

    // Mixed batch with wait_for_receipts.
    let mut b = batch(
        7,
        vec![
            recipient(1, &[("name", "Ann")]),
            recipient(2, &[]),
            proto::Recipient {
                device_token: "zz-not-hex".into(),
                ..recipient(3, &[("name", "Bob")])
            },
        ],
        template("Hi {{ name }}", "b"),
    );
    b.wait_for_receipts = true;
    let response = client.send_batch(b).await.unwrap().into_inner();
    assert_eq!(response.batch_id, "batch-7");
    assert_eq!((response.accepted, response.rejected), (1, 2));
    assert_eq!(response.results[1].field, "recipients[1].vars.name");
    assert_eq!(response.results[2].field, "recipients[2].device_token");
    assert_eq!(response.receipts.len(), 1);
    assert_eq!(status(&response.receipts[0]), ReceiptStatus::Delivered);
    assert_eq!(response.receipts[0].message_id, "m-1");
    assert!(!response.receipts[0].provider_message_id.is_empty());
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_receipts_filters_by_campaign() {
    let h = harness::start(Options::default()).await;
    let mut client = h.client().await;
    let mut sub = client
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            campaign_id: "wanted".into(),
            include_non_terminal: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (n, campaign) in [(1, "other"), (2, "wanted"), (3, "other"), (4, "wanted")] {
        let mut b = batch(n, vec![recipient(n as u64, &[])], template("a", "b"));
        b.campaign_id = campaign.into();
        b.wait_for_receipts = true;
        client.send_batch(b).await.unwrap();
    }
    let first = sub.message().await.unwrap().unwrap();
    let second = sub.message().await.unwrap().unwrap();
    assert_eq!(
        BTreeMap::from([
            (first.message_id.clone(), first.campaign_id.clone()),
            (second.message_id.clone(), second.campaign_id.clone())
        ]),
        BTreeMap::from([
            ("m-2".to_string(), "wanted".to_string()),
            ("m-4".to_string(), "wanted".to_string())
        ])
    );
    let err = client
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving_over_tls_upstream() {
    let h = harness::start(Options {
        tls: true,
        ..Default::default()
    })
    .await;
    let channel = h.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pushgate.v1.PushGateway".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // And a delivery over TLS to the mock works.
    let receipts = stream_all(
        &h,
        vec![batch(0, vec![recipient(9, &[])], template("a", "b"))],
    )
    .await;
    assert_eq!(status(receipts.last().unwrap()), ReceiptStatus::Delivered);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_gate_each_app() {
    let key = "shop-secret-key-0123456789";
    let h = harness::start(Options {
        api_keys: vec![key.to_string()],
        ..Default::default()
    })
    .await;
    let channel = h.channel().await;

    // No key: unauthenticated.
    let mut anonymous = proto::push_gateway_client::PushGatewayClient::new(channel.clone());
    let err = anonymous
        .send_batch(batch(0, vec![recipient(1, &[])], template("a", "b")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The right key: accepted.
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    let mut client = proto::push_gateway_client::PushGatewayClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
            Ok(request)
        },
    );
    let mut b = batch(0, vec![recipient(1, &[])], template("a", "b"));
    b.wait_for_receipts = true;
    let response = client.send_batch(b).await.unwrap().into_inner();
    assert_eq!(status(&response.receipts[0]), ReceiptStatus::Delivered);

    // The key does not grant other apps.
    let mut other = batch(0, vec![recipient(2, &[])], template("a", "b"));
    other.app_id = "news".into();
    let err = client.send_batch(other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    h.gateway.shutdown().await.unwrap();
}
