//! Delivery policies through the real gateway (memory and Redis), asserting on receipts and on
//! what the mock APNs received: dead-token suppression and ListInvalidTokens, frequency caps
//! (exact across two replicas on one Redis), quiet hours in the recipient's zone, opt-out,
//! ForgetUser, the transactional bypass, and the order of the stage. The Redis state is also
//! checked directly against the in-memory one on the same scenario.

use std::collections::HashMap;
use std::time::Duration;

use pushgate::proto::push_gateway_insights_client::PushGatewayInsightsClient;
use pushgate::proto::push_gateway_policy_client::PushGatewayPolicyClient;
use pushgate::proto::{self, Receipt, ReceiptStatus};
use pushgate_mocks::redis_server::RedisServer;
use tonic::transport::Channel;

use crate::harness::{self, Harness, Options, recipient, status, template, token};

fn batch(recipients: Vec<proto::Recipient>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: "shop".into(),
        template: Some(template("Hi", "there")),
        recipients,
        wait_for_receipts: true,
        ..Default::default()
    }
}

/// Recipient `n` addressed as user `user`, with message id `m-<n>`.
fn to_user(n: u64, user: &str) -> proto::Recipient {
    proto::Recipient {
        user_id: user.into(),
        ..recipient(n, &[])
    }
}

async fn send(h: &Harness, request: proto::SendBatchRequest) -> HashMap<String, Receipt> {
    let response = h
        .client()
        .await
        .send_batch(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.rejected, 0, "{:?}", response.results);
    harness::terminal_by_message(&response.receipts)
}

fn counts(receipts: &HashMap<String, Receipt>) -> HashMap<(ReceiptStatus, String), usize> {
    let mut out = HashMap::new();
    for r in receipts.values() {
        let reason = match status(r) {
            ReceiptStatus::Delivered => String::new(),
            _ => r.reason.clone(),
        };
        *out.entry((status(r), reason)).or_default() += 1;
    }
    out
}

async fn policy_client(h: &Harness) -> PushGatewayPolicyClient<Channel> {
    PushGatewayPolicyClient::new(h.channel().await)
}

fn redis_section(redis: &RedisServer) -> String {
    format!(
        "[redis]\nurl = \"{}\"\npoll_ms = 20\ncommand_timeout_ms = 2000",
        redis.url()
    )
}

async fn list_tokens(h: &Harness, after: &str, limit: u32) -> Vec<proto::InvalidToken> {
    let mut stream = policy_client(h)
        .await
        .list_invalid_tokens(proto::ListInvalidTokensRequest {
            app_id: "shop".into(),
            since_ms: 0,
            after: after.into(),
            limit,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(t) = stream.message().await.unwrap() {
        out.push(t);
    }
    out
}

/// Suppression: the dead token reaches the mock once; later sends end INVALID_TOKEN
/// (`suppressed`) without a request; ListInvalidTokens lists it (resumable); a token registered
/// after it died is sent again.
async fn suppression(h: &Harness) {
    let dead = [token(1), token(2), token(3)];
    for t in &dead {
        h.mock.faults().add_unregistered(t, Some(1_700_000_000_000));
    }
    let first = send(h, batch((1..5).map(|n| recipient(n, &[])).collect())).await;
    assert_eq!(status(&first["m-1"]), ReceiptStatus::InvalidToken);
    assert_eq!(first["m-1"].reason, "Unregistered");
    assert_eq!(status(&first["m-4"]), ReceiptStatus::Delivered);
    // Listed as soon as the receipts are in: the deliver stage records a dead token before
    // its INVALID_TOKEN receipt.
    let listed = list_tokens(h, "", 0).await;
    let mut names: Vec<_> = listed.iter().map(|t| t.device_token.clone()).collect();
    names.sort();
    assert_eq!(names, dead.to_vec());
    assert!(
        listed
            .iter()
            .all(|t| t.invalid_since_ms == 1_700_000_000_000)
    );
    // Resumed from the first token's cursor: the other two, in the same order.
    let rest = list_tokens(h, &listed[0].cursor, 0).await;
    assert_eq!(rest, listed[1..].to_vec());
    let one = list_tokens(h, "", 1).await;
    assert_eq!(one.len(), 1, "limit");

    let requests_before = h.mock.stats().by_reason.get("Unregistered").copied();
    let again = send(
        h,
        batch(
            (1..4)
                .map(|n| proto::Recipient {
                    message_id: format!("again-{n}"),
                    ..recipient(n, &[])
                })
                .collect(),
        ),
    )
    .await;
    for n in 1..4 {
        let r = &again[&format!("again-{n}")];
        assert_eq!(status(r), ReceiptStatus::InvalidToken);
        assert_eq!(r.reason, "suppressed");
        assert_eq!(r.token_invalid_since_ms, 1_700_000_000_000);
    }
    assert_eq!(
        h.mock.stats().by_reason.get("Unregistered").copied(),
        requests_before,
        "a suppressed token is not sent to"
    );
    // Registered again after it died: the token is tried (the mock still answers 410 here, so
    // the provider's own answer comes back).
    h.mock.faults().remove_token(&token(1));
    let revived = send(
        h,
        batch(vec![proto::Recipient {
            message_id: "revived".into(),
            token_registered_at_ms: 1_700_000_000_001,
            ..recipient(1, &[])
        }]),
    )
    .await;
    assert_eq!(status(&revived["revived"]), ReceiptStatus::Delivered);
    assert_eq!(
        list_tokens(h, "", 0).await.len(),
        2,
        "revived tokens are not listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_tokens_skip_the_provider_in_memory() {
    let h = harness::start(Options::default()).await;
    suppression(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_tokens_skip_the_provider_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    suppression(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

const CAPS: &str = r#"frequency_caps = [{ max = 3, window = "1d" }, { max = 5, window = "7d" }]"#;

/// Caps: three of five messages to one user go, the rest end DROPPED `frequency_cap`; other
/// users are counted apart; HIGH priority and `bypass_policies` pass uncounted.
async fn caps(h: &Harness) {
    let receipts = send(
        h,
        batch(
            (1..6)
                .map(|n| to_user(n, "u-cap"))
                .chain((6..8).map(|n| to_user(n, "u-other")))
                .collect(),
        ),
    )
    .await;
    let c = counts(&receipts);
    assert_eq!(c[&(ReceiptStatus::Delivered, String::new())], 5, "{c:?}");
    assert_eq!(
        c[&(ReceiptStatus::Dropped, "frequency_cap".into())],
        2,
        "{c:?}"
    );
    let mut high = batch(vec![to_user(10, "u-cap")]);
    high.template.as_mut().unwrap().priority = proto::Priority::High as i32;
    let mut bypass = batch(vec![to_user(11, "u-cap")]);
    bypass.bypass_policies = true;
    for request in [high, bypass] {
        let r = send(h, request).await;
        assert!(
            r.values().all(|r| status(r) == ReceiptStatus::Delivered),
            "{r:?}"
        );
    }
    let r = send(h, batch(vec![to_user(12, "u-cap")])).await;
    assert_eq!(r["m-12"].reason, "frequency_cap");
    // ForgetUser erases the counters: the user starts afresh.
    let forgotten = policy_client(h)
        .await
        .forget_user(proto::ForgetUserRequest {
            app_id: "shop".into(),
            user_id: "u-cap".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.cap_sends_erased, 3);
    assert!(!forgotten.opt_out_erased);
    let r = send(h, batch(vec![to_user(13, "u-cap")])).await;
    assert_eq!(status(&r["m-13"]), ReceiptStatus::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_caps_in_memory() {
    let h = harness::start(Options {
        shop: CAPS.into(),
        ..Default::default()
    })
    .await;
    caps(&h).await;
    let metrics = h.gateway.gateway.metrics().encode();
    assert!(
        metrics
            .contains(r#"pushgate_policy_decisions_total{app="shop",decision="frequency_cap"} 3"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_caps_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        shop: CAPS.into(),
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    caps(&h).await;
}

async fn send_all(h: &Harness, requests: Vec<proto::SendBatchRequest>) -> HashMap<String, Receipt> {
    let mut all = HashMap::new();
    for request in requests {
        all.extend(send(h, request).await);
    }
    all
}

/// Two replicas on one Redis, 40 messages to each of 5 users sent through both at once: exactly
/// `max` (3) per user are delivered in all, whichever replica sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_are_exact_across_two_replicas() {
    let redis = RedisServer::start();
    let options = || Options {
        shop: r#"frequency_caps = [{ max = 3, window = "1h" }]"#.into(),
        extra: redis_section(&redis),
        ..Default::default()
    };
    let a = harness::start(options()).await;
    let b = harness::start(options()).await;
    let users = 5u64;
    let per_replica_batches = 4u64;
    let batches = |offset: u64| {
        (0..per_replica_batches)
            .map(|k| {
                batch(
                    (0..users * 5)
                        .map(|i| {
                            let n = offset + k * 1_000 + i;
                            to_user(n, &format!("u-{}", i % users))
                        })
                        .collect(),
                )
            })
            .collect::<Vec<_>>()
    };
    let (ra, rb) = tokio::join!(send_all(&a, batches(0)), send_all(&b, batches(100_000)));
    let sent = (ra.len() + rb.len()) as u64;
    assert_eq!(sent, 2 * per_replica_batches * users * 5);
    let delivered = ra
        .values()
        .chain(rb.values())
        .filter(|r| status(r) == ReceiptStatus::Delivered);
    let mut per_user: HashMap<String, u64> = HashMap::new();
    for r in delivered {
        *per_user.entry(r.user_id.clone()).or_default() += 1;
    }
    assert_eq!(per_user.len() as u64, users, "{per_user:?}");
    assert!(per_user.values().all(|&n| n == 3), "{per_user:?}");
    let mock_accepted = a.mock.stats().accepted + b.mock.stats().accepted;
    assert_eq!(
        mock_accepted,
        3 * users,
        "the mocks received exactly max per user"
    );
    // What one replica learns (an opt-out) the other applies.
    policy_client(&a)
        .await
        .set_opt_out(proto::OptOutRequest {
            app_id: "shop".into(),
            user_id: "u-new".into(),
        })
        .await
        .unwrap();
    let r = send(&b, batch(vec![to_user(999_999, "u-new")])).await;
    assert_eq!(r["m-999999"].reason, "opted_out");
    assert_eq!(a.unresolved_drops() + b.unresolved_drops(), 0);
}

/// A quiet-hours window around the current UTC hour (one hour either side): recipients in UTC
/// are inside it, recipients in Tokyo (UTC+9) outside.
fn quiet_now() -> String {
    let hour = jiff::Timestamp::now().as_second().rem_euclid(86_400) / 3_600;
    let start = (hour + 23) % 24;
    let end = (hour + 2) % 24;
    format!(
        "default_timezone = \"UTC\"\nquiet_hours = {{ start = \"{start:02}:00\", end = \"{end:02}:00\", action = \"drop\" }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_follow_the_recipients_zone_and_transactional_passes() {
    let h = harness::start(Options {
        shop: quiet_now(),
        ..Default::default()
    })
    .await;
    let tokyo = proto::Recipient {
        timezone: "Asia/Tokyo".into(),
        ..recipient(2, &[])
    };
    let r = send(&h, batch(vec![recipient(1, &[]), tokyo])).await;
    assert_eq!(status(&r["m-1"]), ReceiptStatus::Dropped);
    assert_eq!(r["m-1"].reason, "quiet_hours");
    assert_eq!(status(&r["m-2"]), ReceiptStatus::Delivered);
    assert_eq!(
        h.mock.stats().accepted,
        1,
        "the quiet one never reached APNs"
    );
    let mut high = batch(vec![recipient(3, &[])]);
    high.template.as_mut().unwrap().priority = proto::Priority::High as i32;
    let r = send(&h, high).await;
    assert_eq!(status(&r["m-3"]), ReceiptStatus::Delivered);
    // An unknown zone is refused, naming the recipient's field.
    let response = h
        .client()
        .await
        .send_batch(batch(vec![
            recipient(4, &[]),
            proto::Recipient {
                timezone: "Mars/Olympus_Mons".into(),
                ..recipient(5, &[])
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.rejected, 1);
    let refused = response.results.iter().find(|r| !r.accepted).unwrap();
    assert_eq!(refused.field, "recipients[1].timezone");
    assert_eq!(h.unresolved_drops(), 0);
}

/// Opt-out comes first (before quiet hours and caps), applies to transactional messages unless
/// the app spares them, is cleared by ClearOptOut and erased by ForgetUser; the service is
/// authorized per app like PushGateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_out_clear_forget_and_authorization() {
    let h = harness::start(Options {
        api_keys: vec!["shop-key-0123456789".into()],
        more_apps: vec![harness::MoreApp {
            id: "news".into(),
            api_keys: vec!["news-key-0123456789".into()],
            ..Default::default()
        }],
        shop: format!("{}\n{CAPS}", quiet_now()),
        ..Default::default()
    })
    .await;
    let with_key = |key: &'static str| {
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
            Ok::<_, tonic::Status>(request)
        }
    };
    let channel = h.channel().await;
    let mut policy =
        PushGatewayPolicyClient::with_interceptor(channel.clone(), with_key("shop-key-0123456789"));
    let mut stranger =
        PushGatewayPolicyClient::with_interceptor(channel.clone(), with_key("news-key-0123456789"));
    let mut client = proto::push_gateway_client::PushGatewayClient::with_interceptor(
        channel,
        with_key("shop-key-0123456789"),
    );
    let opt_out = |user: &str| proto::OptOutRequest {
        app_id: "shop".into(),
        user_id: user.into(),
    };
    let denied = stranger.set_opt_out(opt_out("u-1")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let missing = policy.set_opt_out(opt_out("")).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(
        policy
            .set_opt_out(opt_out("u-1"))
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    assert!(
        !policy
            .set_opt_out(opt_out("u-1"))
            .await
            .unwrap()
            .into_inner()
            .changed
    );

    let mut send_one = async |n: u64, user: &str, high: bool| {
        let mut request = batch(vec![to_user(n, user)]);
        if high {
            request.template.as_mut().unwrap().priority = proto::Priority::High as i32;
        }
        let response = client.send_batch(request).await.unwrap().into_inner();
        response.receipts.into_iter().next().unwrap()
    };
    // Opted out and in quiet hours: opt-out is the reason (it comes first).
    let r = send_one(1, "u-1", false).await;
    assert_eq!(
        (status(&r), r.reason.as_str()),
        (ReceiptStatus::Dropped, "opted_out")
    );
    let r = send_one(2, "u-1", true).await;
    assert_eq!(
        r.reason, "opted_out",
        "transactional messages honour opt-outs by default"
    );
    let r = send_one(3, "u-2", false).await;
    assert_eq!(r.reason, "quiet_hours");
    assert!(
        policy
            .clear_opt_out(opt_out("u-1"))
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    let r = send_one(4, "u-1", true).await;
    assert_eq!(status(&r), ReceiptStatus::Delivered);

    policy.set_opt_out(opt_out("u-3")).await.unwrap();
    let forgotten = policy
        .forget_user(proto::ForgetUserRequest {
            app_id: "shop".into(),
            user_id: "u-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(forgotten.opt_out_erased);
    let r = send_one(5, "u-3", true).await;
    assert_eq!(status(&r), ReceiptStatus::Delivered);
    assert_eq!(h.unresolved_drops(), 0);
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Scheduled sends in memory: a SCHEDULED receipt at once (in the SendBatch answer), nothing
/// at the mock before the due time, the terminal receipt to subscribers after it; per-recipient
/// times override the batch's; more than 30 days ahead is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_sends_in_memory() {
    let h = harness::start(Options::default()).await;
    let mut subscription = h
        .client()
        .await
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    let due = now_ms() + 1_200;
    let mut request = batch(vec![
        recipient(1, &[]),
        proto::Recipient {
            send_at_ms: due + 600,
            ..recipient(2, &[])
        },
    ]);
    request.send_at_ms = due;
    let response = h
        .client()
        .await
        .send_batch(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 2);
    let scheduled: HashMap<_, _> = response
        .receipts
        .iter()
        .map(|r| (r.message_id.clone(), r.clone()))
        .collect();
    assert_eq!(status(&scheduled["m-1"]), ReceiptStatus::Scheduled);
    assert!(!scheduled["m-1"].terminal);
    assert_eq!(scheduled["m-1"].scheduled_for_ms, due);
    assert_eq!(scheduled["m-2"].scheduled_for_ms, due + 600);
    assert_eq!(h.mock.stats().accepted, 0, "nothing before the due time");
    let mut delivered = Vec::new();
    while delivered.len() < 2 {
        let r = tokio::time::timeout(Duration::from_secs(20), subscription.message())
            .await
            .expect("the scheduled messages are delivered")
            .unwrap()
            .unwrap();
        if r.terminal {
            assert_eq!(status(&r), ReceiptStatus::Delivered);
            delivered.push(r.message_id);
        }
    }
    let accepted = h.mock.accepted();
    assert_eq!(accepted.len(), 2);
    for a in &accepted {
        let min = if a.device_token == token(1) {
            1_150
        } else {
            1_750
        };
        assert!(
            a.received_at.duration_since(started) >= Duration::from_millis(min),
            "sent before its time"
        );
    }
    // More than 30 days ahead: the batch's field, or the recipient's.
    let mut far = batch(vec![recipient(3, &[])]);
    far.send_at_ms = now_ms() + 31 * 86_400_000;
    let e = h.client().await.send_batch(far).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("send_at_ms"), "{}", e.message());
    let response = h
        .client()
        .await
        .send_batch(batch(vec![proto::Recipient {
            send_at_ms: now_ms() + 31 * 86_400_000,
            ..recipient(4, &[])
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].field, "recipients[0].send_at_ms");
    assert_eq!(h.unresolved_drops(), 0);
}

/// The instant of `clock` ("HH:MM") on `day` in `zone`, computed here with jiff's own API.
fn local_instant(day: jiff::civil::Date, hour: i8, minute: i8, zone: &str) -> i64 {
    day.at(hour, minute, 0, 0)
        .in_tz(zone)
        .unwrap()
        .timestamp()
        .as_millisecond()
}

/// Local-time sends: one date and time, each recipient at it in its own zone (or the app's
/// default); a time already past goes tomorrow, or now with `late_sends_now`; an unknown zone
/// is refused naming the recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_time_sends_follow_each_recipients_zone() {
    let h = harness::start(Options {
        shop: "default_timezone = \"Europe/Paris\"".into(),
        ..Default::default()
    })
    .await;
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let day = today.checked_add(jiff::ToSpan::days(2)).unwrap();
    let zoned = |n: u64, zone: &str| proto::Recipient {
        timezone: zone.into(),
        ..recipient(n, &[])
    };
    let mut request = batch(vec![
        zoned(1, "Asia/Kolkata"),
        zoned(2, "America/New_York"),
        recipient(3, &[]),
        zoned(4, "Mars/Olympus_Mons"),
    ]);
    request.local_send_time = format!("{day} 09:00");
    let response = h
        .client()
        .await
        .send_batch(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 3);
    let refused = response.results.iter().find(|r| !r.accepted).unwrap();
    assert_eq!(refused.field, "recipients[3].timezone");
    let by_id: HashMap<_, _> = response
        .receipts
        .iter()
        .map(|r| (r.message_id.clone(), r.scheduled_for_ms))
        .collect();
    assert_eq!(by_id["m-1"], local_instant(day, 9, 0, "Asia/Kolkata"));
    assert_eq!(by_id["m-2"], local_instant(day, 9, 0, "America/New_York"));
    assert_eq!(by_id["m-3"], local_instant(day, 9, 0, "Europe/Paris"));

    // "HH:MM" an hour ago in UTC: tomorrow, or now with late_sends_now (unless an hour ago was
    // yesterday, when it is still ahead today).
    let hour_ago = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(1))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    let clock = format!("{:02}:{:02}", hour_ago.hour(), hour_ago.minute());
    let today_at = local_instant(today, hour_ago.hour(), hour_ago.minute(), "UTC");
    for late in [false, true] {
        let n = 10 + u64::from(late);
        let mut request = batch(vec![zoned(n, "UTC")]);
        request.local_send_time = clock.clone();
        request.late_sends_now = late;
        let response = h
            .client()
            .await
            .send_batch(request)
            .await
            .unwrap()
            .into_inner();
        let r = &response.receipts[0];
        if today_at > now_ms() {
            assert_eq!(r.scheduled_for_ms, today_at);
        } else if late {
            assert_eq!(status(r), ReceiptStatus::Delivered);
        } else {
            let tomorrow = today.checked_add(jiff::ToSpan::days(1)).unwrap();
            assert_eq!(
                r.scheduled_for_ms,
                local_instant(tomorrow, hour_ago.hour(), hour_ago.minute(), "UTC")
            );
        }
    }
    assert_eq!(h.unresolved_drops(), 0);
}

/// Quiet hours with `action = "defer"`: the message is SCHEDULED for the window's end plus at
/// most the spread; a recipient outside the window goes now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_defer_to_the_end_of_the_window() {
    let h = harness::start(Options {
        shop: quiet_now().replace("\"drop\"", "\"defer\""),
        extra: "[policy]\ndefer_spread_secs = 10".into(),
        ..Default::default()
    })
    .await;
    let tokyo = proto::Recipient {
        timezone: "Asia/Tokyo".into(),
        ..recipient(2, &[])
    };
    let response = h
        .client()
        .await
        .send_batch(batch(vec![recipient(1, &[]), tokyo]))
        .await
        .unwrap()
        .into_inner();
    let by_id: HashMap<_, _> = response
        .receipts
        .iter()
        .map(|r| (r.message_id.clone(), r.clone()))
        .collect();
    assert_eq!(status(&by_id["m-2"]), ReceiptStatus::Delivered);
    let deferred = &by_id["m-1"];
    assert_eq!(status(deferred), ReceiptStatus::Scheduled);
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let end_hour = (now.hour() + 2) % 24;
    let mut day = now.date();
    if end_hour < now.hour() {
        day = day.tomorrow().unwrap();
    }
    let end = local_instant(day, end_hour, 0, "UTC");
    assert!(
        (end..end + 10_000).contains(&deferred.scheduled_for_ms),
        "{} not within the spread after {end}",
        deferred.scheduled_for_ms
    );
    assert_eq!(h.mock.stats().accepted, 1);
}

/// Durable schedules: two `pushgate serve` processes on one Redis; messages scheduled through
/// the first, which is killed with `kill -9` before they are due and started again; each
/// message is delivered exactly once after its due time, by whichever process took it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_survive_kill_9_and_go_once_across_two_replicas() {
    use crate::redis_crash::{TOPIC, apns_mock, connect, free_port, spawn, stream_receipts};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (mock, key, key_file) = apns_mock(dir.path()).await;
    let config = |i: usize| {
        let addr = format!("127.0.0.1:{}", free_port());
        let path = dir.path().join(format!("pushgate-{i}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
                listen = "{addr}"
                [pipeline]
                shutdown_grace_secs = 1
                [redis]
                url = "{url}"
                lease_ms = 1000
                poll_ms = 20
                [apps.shop.apns]
                key_file = "{key_file}"
                key_id = "{key_id}"
                team_id = "{team_id}"
                topic = "{TOPIC}"
                endpoint = "{endpoint}"
                connections = 1
                "#,
                url = redis.url(),
                key_file = key_file.display(),
                key_id = key.key_id,
                team_id = key.team_id,
                endpoint = mock.url(),
            ),
        )
        .unwrap();
        (path, addr)
    };
    let (first_config, first_addr) = config(0);
    let (second_config, second_addr) = config(1);
    let first = spawn(&first_config, &dir.path().join("first.log"));
    let _second = spawn(&second_config, &dir.path().join("second.log"));
    let mut client = connect(&first_addr).await;
    connect(&second_addr).await;
    let n = 20u64;
    let due = now_ms() + 4_000;
    let mut request = batch((1..=n).map(|i| recipient(i, &[])).collect());
    request.send_at_ms = due;
    let response = client.send_batch(request).await.unwrap().into_inner();
    assert_eq!(response.accepted as u64, n);
    assert!(
        response
            .receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Scheduled && r.scheduled_for_ms == due)
    );
    drop(first); // SIGKILL
    let _first_again = spawn(&first_config, &dir.path().join("first-again.log"));
    connect(&first_addr).await;
    if now_ms() < due - 200 {
        assert_eq!(mock.stats().accepted, 0, "nothing sent before its time");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let terminal = stream_receipts(&redis)
            .await
            .into_iter()
            .filter(|r| r.terminal)
            .count() as u64;
        if terminal >= n || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Time for a duplicate to show, if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let receipts = stream_receipts(&redis).await;
    let terminal = harness::terminal_by_message(&receipts);
    assert_eq!(
        terminal.len() as u64,
        n,
        "every scheduled message ended once"
    );
    for r in terminal.values() {
        assert_eq!(status(r), ReceiptStatus::Delivered, "{r:?}");
        assert!(r.completed_at_ms >= due, "sent before its time: {r:?}");
    }
    let mut tokens: Vec<String> = mock
        .accepted()
        .into_iter()
        .map(|a| a.device_token)
        .collect();
    tokens.sort();
    let before = tokens.len();
    tokens.dedup();
    assert_eq!(before, tokens.len(), "no token reached APNs twice");
    assert_eq!(tokens.len() as u64, n);
}

/// CancelScheduled by campaign, by batch and by ids: each cancelled message ends DROPPED
/// `cancelled` (once: cancelling again finds nothing), the rest goes at its time.
async fn cancel(h: &Harness) {
    let mut subscription = h
        .client()
        .await
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let due = now_ms() + 1_500;
    let scheduled = |campaign: &str, batch_id: &str, ids: std::ops::Range<u64>| {
        let mut request = batch(ids.map(|n| recipient(n, &[])).collect());
        request.campaign_id = campaign.into();
        request.batch_id = batch_id.into();
        request.send_at_ms = due;
        request
    };
    for request in [
        scheduled("c1", "b1", 1..4),
        scheduled("c2", "b2", 4..6),
        scheduled("c3", "b3", 6..8),
    ] {
        let response = h
            .client()
            .await
            .send_batch(request)
            .await
            .unwrap()
            .into_inner();
        assert!(
            response
                .receipts
                .iter()
                .all(|r| status(r) == ReceiptStatus::Scheduled)
        );
    }
    let mut policy = policy_client(h).await;
    let cancel = |campaign: &str, batch_id: &str, ids: &[&str]| proto::CancelScheduledRequest {
        app_id: "shop".into(),
        campaign_id: campaign.into(),
        batch_id: batch_id.into(),
        message_ids: ids.iter().map(|s| s.to_string()).collect(),
    };
    let n = |r: tonic::Response<proto::CancelScheduledResponse>| r.into_inner().cancelled;
    assert_eq!(
        n(policy
            .cancel_scheduled(cancel("c1", "", &[]))
            .await
            .unwrap()),
        3
    );
    assert_eq!(
        n(policy
            .cancel_scheduled(cancel("", "b2", &[]))
            .await
            .unwrap()),
        2
    );
    assert_eq!(
        n(policy
            .cancel_scheduled(cancel("", "", &["m-6", "m-99"]))
            .await
            .unwrap()),
        1
    );
    assert_eq!(
        n(policy
            .cancel_scheduled(cancel("c1", "", &[]))
            .await
            .unwrap()),
        0
    );
    let both = policy
        .cancel_scheduled(cancel("c1", "b1", &[]))
        .await
        .unwrap_err();
    assert_eq!(both.code(), tonic::Code::InvalidArgument);
    let mut terminal = HashMap::new();
    while terminal.len() < 7 {
        let r = tokio::time::timeout(Duration::from_secs(20), subscription.message())
            .await
            .expect("every message ends")
            .unwrap()
            .unwrap();
        if r.terminal {
            assert!(
                terminal.insert(r.message_id.clone(), r).is_none(),
                "one terminal receipt each"
            );
        }
    }
    for id in ["m-1", "m-2", "m-3", "m-4", "m-5", "m-6"] {
        assert_eq!(status(&terminal[id]), ReceiptStatus::Dropped, "{id}");
        assert_eq!(terminal[id].reason, "cancelled");
    }
    assert_eq!(status(&terminal["m-7"]), ReceiptStatus::Delivered);
    assert_eq!(
        h.mock.stats().accepted,
        1,
        "cancelled messages never reach APNs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_scheduled_in_memory() {
    let h = harness::start(Options::default()).await;
    cancel(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_scheduled_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    cancel(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

/// ForgetUser with Redis: the user's scheduled message ends DROPPED `user_forgotten` without a
/// user id, and the receipts stream keeps no receipt naming the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_user_erases_scheduled_messages_and_stream_entries() {
    use crate::redis_crash::stream_receipts;
    let redis = RedisServer::start();
    let h = harness::start(Options {
        shop: CAPS.into(),
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    let now_sent = send(&h, batch(vec![to_user(1, "u-9"), to_user(2, "u-keep")])).await;
    assert_eq!(status(&now_sent["m-1"]), ReceiptStatus::Delivered);
    let mut later = batch(vec![to_user(3, "u-9")]);
    later.send_at_ms = now_ms() + 60_000;
    let scheduled = send(&h, later).await;
    assert!(scheduled.is_empty(), "a SCHEDULED receipt is not terminal");
    let names = |receipts: &[Receipt]| receipts.iter().filter(|r| r.user_id == "u-9").count();
    // The stream is written behind the receipts: wait for the user's two (DELIVERED, SCHEDULED).
    for _ in 0..100 {
        if names(&stream_receipts(&redis).await) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let forgotten = policy_client(&h)
        .await
        .forget_user(proto::ForgetUserRequest {
            app_id: "shop".into(),
            user_id: "u-9".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.scheduled_erased, 1);
    assert_eq!(
        forgotten.cap_sends_erased, 1,
        "the sent message (a scheduled one is counted when it comes due)"
    );
    assert_eq!(forgotten.receipts_erased, 2, "{forgotten:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stream = stream_receipts(&redis).await;
    assert_eq!(names(&stream), 0, "no receipt names the forgotten user");
    let dropped = stream
        .iter()
        .find(|r| r.message_id == "m-3" && r.terminal)
        .expect("the scheduled message has its terminal receipt");
    assert_eq!(status(dropped), ReceiptStatus::Dropped);
    assert_eq!(dropped.reason, "user_forgotten");
    assert!(
        stream.iter().any(|r| r.user_id == "u-keep"),
        "others are kept"
    );
    assert_eq!(h.unresolved_drops(), 0);
}

/// Terminal receipts from `subscription` until every id of `ids` has one.
async fn terminal_receipts(
    subscription: &mut tonic::Streaming<Receipt>,
    ids: &[&str],
) -> HashMap<String, Receipt> {
    let mut out = HashMap::new();
    while !ids.iter().all(|id| out.contains_key(*id)) {
        let r = tokio::time::timeout(Duration::from_secs(30), subscription.message())
            .await
            .expect("the terminal receipts come")
            .unwrap()
            .unwrap();
        if r.terminal && ids.contains(&r.message_id.as_str()) {
            out.insert(r.message_id.clone(), r);
        }
    }
    out
}

async fn subscribe(h: &Harness) -> tonic::Streaming<Receipt> {
    h.client()
        .await
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Recipient `n` as user `user` with message id `<prefix>-<n>`.
fn named(prefix: &str, n: u64, user: &str) -> proto::Recipient {
    proto::Recipient {
        message_id: format!("{prefix}-{n}"),
        ..to_user(n, user)
    }
}

/// Caps count messages handed to a provider, not decisions: two of three messages to a user
/// wait behind a campaign rate of 1 a minute until their 1 s ttl passes (EXPIRED, never sent),
/// so of the next three the user still has room for two. A message that reached the provider
/// and then failed (500 on every attempt, FAILED) stays counted.
async fn caps_count_hand_offs(h: &Harness) {
    let mut slow = batch((1..4).map(|n| named("slow", n, "u-1")).collect());
    slow.campaign_id = "slow".into();
    slow.campaign_rate_per_minute = 1;
    slow.template.as_mut().unwrap().ttl_seconds = 1;
    let c = counts(&send(h, slow).await);
    assert_eq!(c[&(ReceiptStatus::Delivered, String::new())], 1, "{c:?}");
    assert_eq!(
        c.iter()
            .filter(|((s, _), _)| *s == ReceiptStatus::Expired)
            .map(|(_, n)| n)
            .sum::<usize>(),
        2,
        "{c:?}"
    );
    let next = counts(
        &send(
            h,
            batch((11..14).map(|n| named("next", n, "u-1")).collect()),
        )
        .await,
    );
    assert_eq!(
        next.get(&(ReceiptStatus::Delivered, String::new())),
        Some(&2),
        "the expired messages gave their sends back: {next:?}"
    );
    assert_eq!(next[&(ReceiptStatus::Dropped, "frequency_cap".into())], 1);

    h.mock.faults().set_internal_error_per_mille(1000);
    let failed = send(h, batch(vec![named("fail", 21, "u-2")])).await;
    assert_eq!(status(&failed["fail-21"]), ReceiptStatus::Failed);
    assert!(failed["fail-21"].attempt > 1);
    h.mock.faults().clear();
    let after = counts(
        &send(
            h,
            batch((22..25).map(|n| named("after", n, "u-2")).collect()),
        )
        .await,
    );
    assert_eq!(
        after.get(&(ReceiptStatus::Delivered, String::new())),
        Some(&2),
        "the failed message was handed to APNs: it counts: {after:?}"
    );
    assert_eq!(after[&(ReceiptStatus::Dropped, "frequency_cap".into())], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_count_only_messages_handed_to_a_provider_in_memory() {
    let h = harness::start(Options {
        shop: CAPS.into(),
        ..Default::default()
    })
    .await;
    caps_count_hand_offs(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_count_only_messages_handed_to_a_provider_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        shop: CAPS.into(),
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    caps_count_hand_offs(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

/// A scheduled message is decided when it comes due: an opt-out, a dead token and a full cap
/// that happen after it was scheduled end it (DROPPED `opted_out`, INVALID_TOKEN `suppressed`,
/// DROPPED `frequency_cap`) and APNs never sees it; an untouched one is delivered.
async fn scheduled_decided_when_due(h: &Harness) {
    let mut subscription = subscribe(h).await;
    let mut later = batch(vec![
        named("s", 1, "u-out"),
        named("s", 2, "u-dead"),
        named("s", 3, "u-cap"),
        named("s", 4, "u-fine"),
    ]);
    later.send_at_ms = now_ms() + 2_000;
    let response = h
        .client()
        .await
        .send_batch(later)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 4);
    assert!(
        response
            .receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Scheduled),
        "{:?}",
        response.receipts
    );
    // Meanwhile: u-out opts out, s-2's token dies, u-cap gets its three sends of the day.
    policy_client(h)
        .await
        .set_opt_out(proto::OptOutRequest {
            app_id: "shop".into(),
            user_id: "u-out".into(),
        })
        .await
        .unwrap();
    h.mock.faults().add_unregistered(&token(2), None);
    let dead = send(h, batch(vec![named("d", 2, "u-other")])).await;
    assert_eq!(status(&dead["d-2"]), ReceiptStatus::InvalidToken);
    let capped = send(h, batch((31..34).map(|n| named("c", n, "u-cap")).collect())).await;
    assert!(
        capped
            .values()
            .all(|r| status(r) == ReceiptStatus::Delivered)
    );
    let before = h.mock.stats().accepted;

    let due = terminal_receipts(&mut subscription, &["s-1", "s-2", "s-3", "s-4"]).await;
    assert_eq!(
        (status(&due["s-1"]), due["s-1"].reason.as_str()),
        (ReceiptStatus::Dropped, "opted_out")
    );
    assert_eq!(
        (status(&due["s-2"]), due["s-2"].reason.as_str()),
        (ReceiptStatus::InvalidToken, "suppressed")
    );
    assert_eq!(
        (status(&due["s-3"]), due["s-3"].reason.as_str()),
        (ReceiptStatus::Dropped, "frequency_cap")
    );
    assert_eq!(status(&due["s-4"]), ReceiptStatus::Delivered);
    assert_eq!(h.mock.stats().accepted, before + 1, "only s-4 reached APNs");
    let seen: Vec<String> = h
        .mock
        .accepted()
        .into_iter()
        .map(|a| a.device_token)
        .collect();
    for n in [1, 3] {
        assert!(!seen.contains(&token(n)), "token {n} was sent to");
    }
    assert_eq!(
        h.mock.stats().by_reason.get("Unregistered").copied(),
        Some(1),
        "the dead token was tried once, by d-2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_are_decided_when_due_in_memory() {
    let h = harness::start(Options {
        shop: CAPS.into(),
        ..Default::default()
    })
    .await;
    scheduled_decided_when_due(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_are_decided_when_due_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        shop: CAPS.into(),
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    scheduled_decided_when_due(&h).await;
    assert_eq!(h.unresolved_drops(), 0);
}

/// ForgetUser erases everything kept about the user and answers with the counts: the cap
/// counter, the dead token reported for the user's message (no longer listed nor suppressed),
/// the user's exposure and the open and conversion tracked about it (an event id recorded
/// again is not a duplicate, and finds no exposure), the scheduled message. Another user's
/// dead token, exposure and events stay; so do the campaign counters.
async fn forget_everything(h: &Harness, durable: bool) {
    h.mock
        .faults()
        .add_unregistered(&token(5), Some(1_700_000_000_000));
    h.mock
        .faults()
        .add_unregistered(&token(6), Some(1_700_000_000_000));
    let mut now_batch = batch(vec![
        named("f", 1, "u-9"),
        named("f", 5, "u-9"),
        named("f", 2, "u-keep"),
        named("f", 6, "u-keep"),
    ]);
    now_batch.campaign_id = "spring".into();
    let sent = send(h, now_batch).await;
    assert_eq!(status(&sent["f-1"]), ReceiptStatus::Delivered);
    assert_eq!(status(&sent["f-5"]), ReceiptStatus::InvalidToken);
    let mut later = batch(vec![named("f", 3, "u-9")]);
    later.send_at_ms = now_ms() + 60_000;
    send(h, later).await;
    let mut insights = PushGatewayInsightsClient::new(h.channel().await);
    let event = |id: &str, kind: proto::EventType, message: &str, user: &str| proto::TrackedEvent {
        event_id: id.into(),
        r#type: kind as i32,
        message_id: message.into(),
        user_id: user.into(),
        ..Default::default()
    };
    let events = vec![
        event("e-open", proto::EventType::Open, "f-1", ""),
        event("e-buy", proto::EventType::Conversion, "", "u-9"),
        event("e-keep", proto::EventType::Open, "f-2", ""),
    ];
    // With Redis exposures are written behind the receipts: an event about one not yet known
    // is not remembered, so it may be sent again.
    let mut counted = 0;
    for _ in 0..200 {
        counted = insights
            .track_events(proto::TrackEventsRequest {
                app_id: "shop".into(),
                events: events.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .results
            .iter()
            .filter(|r| r.counted || r.reason.contains("duplicate"))
            .count();
        if counted == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 3);
    let forgotten = policy_client(h)
        .await
        .forget_user(proto::ForgetUserRequest {
            app_id: "shop".into(),
            user_id: "u-9".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.cap_sends_erased, 2, "f-1 and f-5 reached APNs");
    assert_eq!(forgotten.suppressed_tokens_erased, 1, "{forgotten:?}");
    assert_eq!(forgotten.exposures_erased, 1, "{forgotten:?}");
    assert_eq!(forgotten.events_erased, 2, "{forgotten:?}");
    assert_eq!(forgotten.scheduled_erased, 1);
    assert!(!forgotten.opt_out_erased);
    if !durable {
        assert_eq!(forgotten.receipts_erased, 0, "no receipts stream in memory");
    }
    let listed: Vec<String> = list_tokens(h, "", 0)
        .await
        .into_iter()
        .map(|t| t.device_token)
        .collect();
    assert_eq!(listed, [token(6)], "the other user's dead token stays");
    // Not suppressed any more: APNs is asked again (and still answers 410).
    let again = send(h, batch(vec![named("g", 5, "u-new")])).await;
    assert_eq!(again["g-5"].reason, "Unregistered");
    let results = insights
        .track_events(proto::TrackEventsRequest {
            app_id: "shop".into(),
            events,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(!results[0].counted && !results[1].counted);
    assert!(
        !results[0].reason.contains("duplicate"),
        "the event id was erased: {:?}",
        results[0]
    );
    assert!(results[2].reason.contains("duplicate"), "{:?}", results[2]);
    let stats = insights
        .get_campaign_stats(proto::GetCampaignStatsRequest {
            app_id: "shop".into(),
            campaign_id: "spring".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let opens: u64 = stats.variants.iter().map(|v| v.opens).sum();
    assert_eq!(opens, 2, "campaign counters hold no user id and stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_user_erases_everything_kept_about_the_user_in_memory() {
    let h = harness::start(Options {
        shop: CAPS.into(),
        ..Default::default()
    })
    .await;
    forget_everything(&h, false).await;
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_user_erases_everything_kept_about_the_user_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        shop: CAPS.into(),
        extra: redis_section(&redis),
        ..Default::default()
    })
    .await;
    forget_everything(&h, true).await;
    assert_eq!(h.unresolved_drops(), 0);
}

/// A local-time send across DST changes through the gateway, its clock set 2 s before New
/// York's spring change (2027-03-14 02:00 EST = 07:00 UTC). "03:00" in New York is 07:00 UTC
/// that day (EDT; the offset of now, EST, would give 08:00) and the message goes then; in
/// Berlin it is 03:00 CET the next day. "2027-03-28 09:00", after Berlin's change (that day
/// at 01:00 UTC) and New York's: 07:00 UTC (CEST) and 13:00 UTC (EDT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_time_sends_cross_dst_changes() {
    let ms = |t: &str| t.parse::<jiff::Timestamp>().unwrap().as_millisecond();
    let clock_at = ms("2027-03-14T06:59:58Z");
    let started = std::time::Instant::now();
    let h = harness::start(Options {
        clock: pushgate::domain::Clock::starting_at(clock_at),
        ..Default::default()
    })
    .await;
    let mut subscription = subscribe(&h).await;
    let zoned = |n: u64, zone: &str| proto::Recipient {
        timezone: zone.into(),
        ..recipient(n, &[])
    };
    let scheduled_for = |request: proto::SendBatchRequest| {
        let h = &h;
        async move {
            let response = h
                .client()
                .await
                .send_batch(request)
                .await
                .unwrap()
                .into_inner();
            assert_eq!(response.rejected, 0, "{:?}", response.results);
            response
                .receipts
                .iter()
                .map(|r| {
                    assert_eq!(status(r), ReceiptStatus::Scheduled);
                    (r.message_id.clone(), r.scheduled_for_ms)
                })
                .collect::<HashMap<_, _>>()
        }
    };
    let mut tonight = batch(vec![
        zoned(1, "America/New_York"),
        zoned(2, "Europe/Berlin"),
    ]);
    tonight.local_send_time = "03:00".into();
    let at = scheduled_for(tonight).await;
    assert_eq!(at["m-1"], ms("2027-03-14T07:00:00Z"));
    assert_eq!(
        at["m-1"],
        local_instant("2027-03-14".parse().unwrap(), 3, 0, "America/New_York")
    );
    assert_eq!(at["m-2"], ms("2027-03-15T02:00:00Z"));
    let mut dated = batch(vec![
        zoned(3, "America/New_York"),
        zoned(4, "Europe/Berlin"),
    ]);
    dated.local_send_time = "2027-03-28 09:00".into();
    let at = scheduled_for(dated).await;
    assert_eq!(at["m-3"], ms("2027-03-28T13:00:00Z"));
    assert_eq!(at["m-4"], ms("2027-03-28T07:00:00Z"));
    // The New York message goes at its computed time, 2 s after the clock was set (to the
    // millisecond, which the wait is rounded to).
    let delivered = terminal_receipts(&mut subscription, &["m-1"]).await;
    assert_eq!(status(&delivered["m-1"]), ReceiptStatus::Delivered);
    let accepted = h.mock.accepted();
    assert_eq!(accepted.len(), 1, "only the message due tonight went");
    assert_eq!(accepted[0].device_token, token(1));
    assert!(
        accepted[0].received_at.duration_since(started) >= Duration::from_millis(1_999),
        "sent before its time"
    );
    assert_eq!(h.unresolved_drops(), 0);
}
