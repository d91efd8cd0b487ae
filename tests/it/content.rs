//! Campaign content and measurement through the real gateway: Liquid templates rendered into
//! what the mock APNs received, per-recipient render errors and the budget, locale fallback,
//! experiment variants sticky across batches, holdouts that never reach a provider, and
//! TrackEvents / GetCampaignStats in memory and with Redis, checked against the receipts and
//! a confidence interval computed here.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::harness::{self, Harness, Options, recipient, status, token};
use pushgate::proto::push_gateway_insights_client::PushGatewayInsightsClient;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::redis_server::RedisServer;
use tonic::Code;

fn batch(template: proto::Template, recipients: Vec<proto::Recipient>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: "shop".into(),
        campaign_id: "spring".into(),
        template: Some(template),
        recipients,
        wait_for_receipts: true,
        ..Default::default()
    }
}

/// What the mock received, by device token: (title, body).
fn received(h: &Harness) -> HashMap<String, (String, String)> {
    h.mock
        .accepted()
        .into_iter()
        .map(|a| {
            let alert = &a.payload["aps"]["alert"];
            let text = |k: &str| alert[k].as_str().unwrap_or_default().to_owned();
            (a.device_token.clone(), (text("title"), text("body")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liquid_templates_render_into_what_the_provider_receives() {
    let h = harness::start(Options::default()).await;
    let mut client = h.client().await;
    let title = "{% if tier == 'gold' %}Thanks, {{ first_name | capitalize }}!{% else %}Hi {{ first_name | default: 'there' | upcase }}{% endif %}";
    let body = "{% case items.size %}{% when 0 %}Your cart is empty{% when 1 %}One item{% else %}{{ items.size }} items{% endcase %}: \
{% for i in items limit: 2 %}{{ i.name | truncate: 6 }} {{ i.price | money: '$' }}{% unless forloop.last %}, {% endunless %}{% endfor %} \
({{ total | round: 1 }}; ends {{ ends | date: '%b %d %H:%M', 'America/Sao_Paulo' }}; {{ note | strip | truncatewords: 2 }} {{ code | replace: '-', '' }})";
    let items = r#"[{"name":"Chamomile","price":3.5},{"name":"Cake","price":1234},{"name":"Jam","price":2}]"#;
    let common = [
        ("items", items),
        ("total", "12.345"),
        ("ends", "2025-06-01T15:00:00Z"),
        ("note", "  hurry up before it goes  "),
        ("code", "A-B-C"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = common.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let recipients = vec![
        recipient(1, &with(&[("tier", "gold"), ("first_name", "ADA")])),
        recipient(2, &with(&[("first_name", "grace")])),
        recipient(3, &with(&[("first_name", "")])),
        // Not a date: this recipient is rejected, naming the text and the position.
        recipient(
            4,
            &[
                ("items", "[]"),
                ("total", "1"),
                ("ends", "soon"),
                ("note", ""),
                ("code", ""),
            ],
        ),
        // Over the render budget (a 4 KiB variable repeated by a loop of 2,000 items).
        recipient(5, &[]),
    ];
    let big = "x".repeat(3_000);
    let many = format!("[{}]", vec!["0"; 900].join(","));
    let mut hostile = recipients[4].clone();
    hostile.vars = [("items".to_string(), many), ("big".to_string(), big)].into();
    hostile.title = Some("{% for i in items %}{{ big }}{% endfor %}".into());
    let mut recipients = recipients;
    recipients[4] = hostile;
    let response = client
        .send_batch(batch(harness::template(title, body), recipients))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 3, "{:?}", response.results);
    let r4 = &response.results[3];
    assert_eq!(r4.field, "template.body");
    assert!(
        r4.reason.contains("is not a date") && r4.reason.contains("line 1, column"),
        "{r4:?}"
    );
    let r5 = &response.results[4];
    assert_eq!(r5.field, "recipients[4].title");
    assert!(r5.reason.contains("render budget exceeded"), "{r5:?}");
    let got = received(&h);
    let tail = "3 items: Cha... $3.50, Cake $1,234.00 (12.3; ends Jun 01 12:00; hurry up... ABC)";
    assert_eq!(got[&token(1)], ("Thanks, Ada!".to_owned(), tail.to_owned()));
    assert_eq!(got[&token(2)].0, "Hi GRACE");
    assert_eq!(got[&token(3)].0, "Hi THERE");
    assert_eq!(got.len(), 3);

    // A syntax error refuses the batch at SendBatch time, naming the field, line and column.
    let e = client
        .send_batch(batch(
            harness::template("Hi", "Line one\n{% if x %}never closed"),
            vec![recipient(9, &[])],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("template.body: line 2, column 1: `if` is never closed"),
        "{}",
        e.message()
    );
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locales_fall_back_and_receipts_say_which_was_used() {
    let h = harness::start(Options::default()).await;
    let mut client = h.client().await;
    let mut template = harness::template("Hello {{ name }}", "Default body");
    let text = |t: &str, b: &str| proto::LocalizedText {
        title: t.into(),
        body: b.into(),
        ..Default::default()
    };
    template.locales = [
        ("pt".to_string(), text("Olá {{ name }}", "")),
        ("pt-BR".to_string(), text("Oi {{ name }}", "Corpo")),
    ]
    .into();
    let with_locale = |n: u64, locale: &str| proto::Recipient {
        locale: locale.into(),
        ..recipient(n, &[("name", "Ana")])
    };
    let response = client
        .send_batch(batch(
            template,
            vec![
                with_locale(1, "pt-BR"),
                with_locale(2, "pt_PT"),
                with_locale(3, "de-DE"),
                with_locale(4, ""),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let got = received(&h);
    assert_eq!(got[&token(1)], ("Oi Ana".into(), "Corpo".into()));
    assert_eq!(got[&token(2)], ("Olá Ana".into(), "Default body".into()));
    assert_eq!(got[&token(3)], ("Hello Ana".into(), "Default body".into()));
    assert_eq!(got[&token(4)].0, "Hello Ana");
    let locales: BTreeMap<String, String> = response
        .receipts
        .iter()
        .map(|r| (r.message_id.clone(), r.locale.clone()))
        .collect();
    assert_eq!(locales["m-1"], "pt-BR");
    assert_eq!(locales["m-2"], "pt");
    assert_eq!(locales["m-3"], "");
    assert!(response.receipts.iter().all(|r| r.variant.is_empty()));
}

fn experiment_template() -> proto::Template {
    let mut t = harness::template("Spring sale", "Everything -20%");
    t.experiment = Some(proto::Experiment {
        variants: vec![
            proto::Variant {
                name: "control".into(),
                weight: 1,
                ..Default::default()
            },
            proto::Variant {
                name: "urgent".into(),
                weight: 1,
                title: "Last hours: spring sale".into(),
                ..Default::default()
            },
        ],
        holdout_share: 0.25,
    });
    t
}

fn users(range: std::ops::Range<u64>, round: u64) -> Vec<proto::Recipient> {
    range
        .map(|n| proto::Recipient {
            message_id: format!("r{round}-m-{n}"),
            ..recipient(n, &[])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_are_sticky_across_batches_and_holdouts_are_never_sent() {
    let h = harness::start(Options::default()).await;
    let mut client = h.client().await;
    let mut seen: HashMap<String, String> = HashMap::new();
    for round in 0..2 {
        let response = client
            .send_batch(batch(experiment_template(), users(0..80, round)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.accepted, 80,
            "holdouts are accepted (then dropped)"
        );
        assert_eq!(response.receipts.len(), 80);
        for r in &response.receipts {
            let held_out = r.variant == "holdout";
            assert_eq!(
                status(r),
                if held_out {
                    ReceiptStatus::Dropped
                } else {
                    ReceiptStatus::Delivered
                },
                "{r:?}"
            );
            if held_out {
                assert_eq!(r.reason, "holdout");
            }
            let previous = seen.insert(r.user_id.clone(), r.variant.clone());
            if let Some(previous) = previous {
                assert_eq!(previous, r.variant, "{} changed variant", r.user_id);
            }
        }
    }
    let count = |v: &str| seen.values().filter(|x| *x == v).count();
    assert!(
        count("holdout") > 5 && count("control") > 5 && count("urgent") > 5,
        "{seen:?}"
    );
    assert_eq!(count("holdout") + count("control") + count("urgent"), 80);
    // Held-out users never reached the provider; the others got their variant's title.
    let got = received(&h);
    for (user, variant) in &seen {
        let n: u64 = user.trim_start_matches("u-").parse().unwrap();
        match (variant.as_str(), got.get(&token(n))) {
            ("holdout", None) => {}
            ("control", Some((title, _))) => assert_eq!(title, "Spring sale"),
            ("urgent", Some((title, _))) => assert_eq!(title, "Last hours: spring sale"),
            other => panic!("{user}: {other:?}"),
        }
    }
    assert_eq!(h.mock.accepted().len(), 2 * (80 - count("holdout")));
    // An experiment needs a campaign to assign by.
    let mut no_campaign = batch(experiment_template(), users(0..1, 9));
    no_campaign.campaign_id.clear();
    let e = client.send_batch(no_campaign).await.unwrap_err();
    assert!(
        e.message().starts_with("campaign_id: required"),
        "{}",
        e.message()
    );
}

fn event(id: &str, kind: proto::EventType, message: &str, user: &str) -> proto::TrackedEvent {
    proto::TrackedEvent {
        event_id: id.into(),
        r#type: kind as i32,
        message_id: message.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

async fn stats(h: &Harness) -> proto::CampaignStats {
    PushGatewayInsightsClient::new(h.channel().await)
        .get_campaign_stats(proto::GetCampaignStatsRequest {
            app_id: "shop".into(),
            campaign_id: "spring".into(),
            control: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Sends a campaign, tracks opens and conversions (with repeats), and checks the stats
/// against the receipts, the events counted, and a confidence interval computed here.
async fn measure(h: &Harness) {
    let mut client = h.client().await;
    let response = client
        .send_batch(batch(experiment_template(), users(0..120, 0)))
        .await
        .unwrap()
        .into_inner();
    let by_variant = |v: &str| -> Vec<proto::Receipt> {
        response
            .receipts
            .iter()
            .filter(|r| r.variant == v)
            .cloned()
            .collect()
    };
    let (control, urgent, holdout) = (
        by_variant("control"),
        by_variant("urgent"),
        by_variant("holdout"),
    );
    assert_eq!(control.len() + urgent.len() + holdout.len(), 120);
    // The receipts are counted as they pass the hub (with Redis, by a write loop): wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(h).await;
        let total: u64 = s.variants.iter().map(|v| v.delivered + v.holdout).sum();
        if total == 120 {
            break;
        }
        assert!(Instant::now() < deadline, "stats never caught up: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Opens: every control message once (twice sent), every third urgent one.
    // Conversions: half the control, every second urgent, a third of the holdout by user id.
    let mut events = Vec::new();
    let mut expected: HashMap<&str, (u64, u64)> = HashMap::new();
    for (i, r) in control.iter().enumerate() {
        events.push(event(
            &format!("o-{}", r.message_id),
            proto::EventType::Open,
            &r.message_id,
            "",
        ));
        events.push(event(
            &format!("o-{}", r.message_id),
            proto::EventType::Open,
            &r.message_id,
            "",
        ));
        expected.entry("control").or_default().0 += 1;
        if i % 2 == 0 {
            events.push(event(
                &format!("c-{}", r.message_id),
                proto::EventType::Conversion,
                &r.message_id,
                "",
            ));
            expected.entry("control").or_default().1 += 1;
        }
    }
    for (i, r) in urgent.iter().enumerate() {
        if i % 3 == 0 {
            events.push(event(
                &format!("o-{}", r.message_id),
                proto::EventType::Open,
                &r.message_id,
                "",
            ));
            // A second open of the same message with another id: the exposure counts once.
            events.push(event(
                &format!("o2-{}", r.message_id),
                proto::EventType::Open,
                &r.message_id,
                "",
            ));
            expected.entry("urgent").or_default().0 += 1;
        }
        if i % 2 == 1 {
            events.push(event(
                &format!("c-{}", r.message_id),
                proto::EventType::Conversion,
                "",
                &r.user_id,
            ));
            expected.entry("urgent").or_default().1 += 1;
        }
    }
    for (i, r) in holdout.iter().enumerate() {
        if i % 3 == 0 {
            events.push(event(
                &format!("c-{}", r.user_id),
                proto::EventType::Conversion,
                "",
                &r.user_id,
            ));
            expected.entry("holdout").or_default().1 += 1;
        }
    }
    events.push(event(
        "stranger",
        proto::EventType::Conversion,
        "",
        "nobody",
    ));
    let mut insights = PushGatewayInsightsClient::new(h.channel().await);
    let tracked = insights
        .track_events(proto::TrackEventsRequest {
            app_id: "shop".into(),
            events: events.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let want: u64 = expected.values().map(|(o, c)| o + c).sum();
    assert_eq!(u64::from(tracked.counted), want);
    assert_eq!(
        tracked.results.last().unwrap().reason.split(' ').next(),
        Some("no")
    );
    // Idempotent: the same events again count nothing.
    let again = insights
        .track_events(proto::TrackEventsRequest {
            app_id: "shop".into(),
            events,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.counted, 0);
    assert!(
        again
            .results
            .iter()
            .take(3)
            .all(|r| r.reason == "duplicate event_id")
    );

    let s = stats(h).await;
    assert_eq!(s.control, "holdout");
    let v = |name: &str| s.variants.iter().find(|v| v.name == name).cloned().unwrap();
    for (name, receipts) in [("control", &control), ("urgent", &urgent)] {
        let x = v(name);
        assert_eq!(x.delivered, receipts.len() as u64, "{name}");
        assert_eq!(x.sent, receipts.len() as u64);
        assert_eq!(
            x.opens,
            expected.get(name).map_or(0, |e| e.0),
            "{name} opens"
        );
        assert_eq!(
            x.conversions,
            expected.get(name).map_or(0, |e| e.1),
            "{name} conversions"
        );
        assert_eq!(x.providers.len(), 1);
        assert_eq!(x.providers[0].statuses.len(), 1);
        assert_eq!(x.providers[0].statuses[0].count, receipts.len() as u64);
    }
    let hold = v("holdout");
    assert_eq!(
        (hold.holdout, hold.dropped, hold.delivered),
        (holdout.len() as u64, holdout.len() as u64, 0)
    );
    assert!(hold.is_control && !hold.compared);
    assert_eq!(hold.conversions, expected["holdout"].1);
    // The interval, computed independently: Wald, unpooled, 95%.
    for name in ["control", "urgent"] {
        let x = v(name);
        let (x1, n1) = (x.conversions as f64, x.delivered as f64);
        let (x0, n0) = (hold.conversions as f64, hold.holdout as f64);
        let (p1, p0) = (x1 / n1, x0 / n0);
        let half = 1.96 * (p1 * (1.0 - p1) / n1 + p0 * (1.0 - p0) / n0).sqrt();
        assert!(x.compared);
        assert!((x.lift - (p1 - p0)).abs() < 1e-12, "{name}: {x:?}");
        assert!((x.ci_low - (p1 - p0 - half)).abs() < 1e-4, "{name}: {x:?}");
        assert!((x.ci_high - (p1 - p0 + half)).abs() < 1e-4, "{name}: {x:?}");
        assert_eq!(x.significant, x.ci_low > 0.0 || x.ci_high < 0.0);
        assert!((x.conversion_rate - p1).abs() < 1e-12);
        assert!((x.open_rate - x.opens as f64 / n1).abs() < 1e-12);
        assert!(x.p_value > 0.0 && x.p_value <= 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_conversions_and_stats_in_memory() {
    let h = harness::start(Options::default()).await;
    measure(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_conversions_and_stats_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        extra: format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
        ..Options::default()
    })
    .await;
    measure(&h).await;
    // The counters live in Redis: a second gateway on the same Redis reads the same stats.
    let other = harness::start(Options {
        extra: format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
        ..Options::default()
    })
    .await;
    assert_eq!(stats(&other).await, stats(&h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insights_are_authorized_per_app() {
    let h = harness::start(Options {
        api_keys: vec!["shop-key-0123456789".into()],
        more_apps: vec![harness::MoreApp {
            id: "news".into(),
            api_keys: vec!["news-key-0123456789".into()],
            admin_keys: vec![],
        }],
        ..Options::default()
    })
    .await;
    let mut insights = PushGatewayInsightsClient::new(h.channel().await);
    let ask = |key: &str, app: &str| {
        let mut r = tonic::Request::new(proto::GetCampaignStatsRequest {
            app_id: app.into(),
            campaign_id: "spring".into(),
            control: String::new(),
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    assert!(
        insights
            .get_campaign_stats(ask("shop-key-0123456789", "shop"))
            .await
            .is_ok()
    );
    for (key, app) in [
        ("news-key-0123456789", "shop"),
        ("shop-key-0123456789", "nope"),
    ] {
        let e = insights
            .get_campaign_stats(ask(key, app))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{key} {app}");
    }
    let e = insights
        .get_campaign_stats(ask("wrong", "shop"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut r = tonic::Request::new(proto::TrackEventsRequest {
        app_id: "news".into(),
        events: vec![event("", proto::EventType::Open, "", "")],
    });
    r.metadata_mut().insert(
        "authorization",
        "Bearer news-key-0123456789".parse().unwrap(),
    );
    let e = insights.track_events(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("events[0].event_id"),
        "{}",
        e.message()
    );
}

/// The start of the hour of `at` in `zone`, epoch ms: computed here with jiff alone, apart
/// from the gateway's arithmetic.
fn local_hour_start(at: jiff::Timestamp, zone: &str) -> i64 {
    let z = at.to_zoned(jiff::tz::TimeZone::get(zone).unwrap());
    let start = z
        .with()
        .minute(0)
        .second(0)
        .subsec_nanosecond(0)
        .build()
        .unwrap();
    start.timestamp().as_millisecond()
}

/// Send-time optimization through the real gateway, from a seeded open history: campaign
/// messages are delivered, opens are tracked with their timestamps a week back, and a batch
/// with `send_time = OPTIMAL` is SCHEDULED at the hour each user opened most (its own
/// history, else the population's, in its zone); an app with no history sends now.
async fn optimal_send_times(h: &Harness) {
    const ZONE: &str = "Asia/Kolkata";
    let mut client = h.client().await;
    let person = |id: &str, user: &str, n: u64| proto::Recipient {
        message_id: id.into(),
        user_id: user.into(),
        timezone: ZONE.into(),
        ..recipient(n, &[])
    };
    // History: four messages to `ana`, one to each of five other users.
    let mut history: Vec<proto::Recipient> = (0..4)
        .map(|i| person(&format!("h-ana-{i}"), "ana", i))
        .collect();
    history.extend((0..5).map(|i| person(&format!("h-pop-{i}"), &format!("pop{i}"), 10 + i)));
    let mut request = batch(harness::template("History", "b"), history);
    request.campaign_id = "history".into();
    let response = client.send_batch(request).await.unwrap().into_inner();
    assert!(
        response
            .receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Delivered),
        "{:?}",
        response.receipts
    );
    // `ana` opened four times a week ago at the hour five hours from now; the others five
    // times a week ago at the hour ten hours from now. (A week back is the same hour of the
    // week; Kolkata has no DST.)
    let now = jiff::Timestamp::now();
    let week = jiff::SignedDuration::from_hours(7 * 24);
    let at = |hours: i64| now + jiff::SignedDuration::from_hours(hours);
    let ana_hour = at(5);
    let pop_hour = at(10);
    let mut events: Vec<proto::TrackedEvent> = (0..4)
        .map(|i| proto::TrackedEvent {
            occurred_at_ms: (ana_hour - week).as_millisecond(),
            timezone: ZONE.into(),
            ..event(
                &format!("o-ana-{i}"),
                proto::EventType::Open,
                &format!("h-ana-{i}"),
                "",
            )
        })
        .collect();
    events.extend((0..5).map(|i| proto::TrackedEvent {
        occurred_at_ms: (pop_hour - week).as_millisecond(),
        timezone: ZONE.into(),
        ..event(
            &format!("o-pop-{i}"),
            proto::EventType::Open,
            &format!("h-pop-{i}"),
            "",
        )
    }));
    let mut insights = PushGatewayInsightsClient::new(h.channel().await);
    // With Redis the exposures are written with the receipts, by the writer, just after the
    // caller has them: an event about one not yet written is `Unknown` and not remembered, so
    // the events are sent again until all nine counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut counted = 0;
    while counted < 9 {
        let tracked = insights
            .track_events(proto::TrackEventsRequest {
                app_id: "shop".into(),
                events: events.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        counted += tracked.counted;
        assert!(
            tracked.results.iter().all(|r| r.counted
                || r.reason.contains("duplicate")
                || r.reason.contains("no known exposure")),
            "{:?}",
            tracked.results
        );
        assert!(
            Instant::now() < deadline,
            "opens never counted: {:?}",
            tracked.results
        );
        if counted < 9 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(counted, 9);
    // An unknown zone is refused, naming the event's field.
    let e = insights
        .track_events(proto::TrackEventsRequest {
            app_id: "shop".into(),
            events: vec![proto::TrackedEvent {
                timezone: "Mars/Olympus_Mons".into(),
                ..event("o-bad", proto::EventType::Open, "h-ana-0", "")
            }],
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("events[0].timezone"),
        "{}",
        e.message()
    );

    // `ana` has opens enough of her own (4 x 2^(-7/28) = 3.4 >= 3): her hour. `newbie` has
    // none: the population's, where five opens outweigh ana's four.
    let mut request = batch(
        harness::template("Spring", "b"),
        vec![
            person("s-ana", "ana", 100),
            person("s-newbie", "newbie", 101),
        ],
    );
    request.send_time = proto::SendTime::Optimal as i32;
    let response = client.send_batch(request).await.unwrap().into_inner();
    let due: HashMap<_, _> = response
        .receipts
        .iter()
        .map(|r| {
            assert_eq!(status(r), ReceiptStatus::Scheduled, "{r:?}");
            (r.message_id.clone(), r.scheduled_for_ms)
        })
        .collect();
    assert_eq!(due["s-ana"], local_hour_start(ana_hour, ZONE));
    assert_eq!(due["s-newbie"], local_hour_start(pop_hour, ZONE));
    // Kolkata is UTC+5:30: its hours start at half past in UTC.
    assert_eq!(due["s-ana"] % 3_600_000, 1_800_000);

    // OPTIMAL with a send time of the batch is refused naming the field.
    let mut request = batch(harness::template("x", "b"), vec![person("s-x", "x", 102)]);
    request.send_time = proto::SendTime::Optimal as i32;
    request.send_at_ms = at(1).as_millisecond();
    let e = client.send_batch(request).await.unwrap_err();
    assert!(e.message().contains("send_time"), "{}", e.message());

    // The optimally scheduled messages wait in the policy stage's schedule: cancel works.
    let cancelled = pushgate::proto::push_gateway_policy_client::PushGatewayPolicyClient::new(
        h.channel().await,
    )
    .cancel_scheduled(proto::CancelScheduledRequest {
        app_id: "shop".into(),
        message_ids: vec!["s-ana".into(), "s-newbie".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .cancelled;
    assert_eq!(cancelled, 2);
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimal_send_times_from_a_seeded_open_history_in_memory() {
    let h = harness::start(Options {
        more_apps: vec![harness::MoreApp {
            id: "news".into(),
            ..Default::default()
        }],
        ..Options::default()
    })
    .await;
    optimal_send_times(&h).await;
    no_history_sends_now(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimal_send_times_from_a_seeded_open_history_with_redis() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        extra: format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
        more_apps: vec![harness::MoreApp {
            id: "news".into(),
            ..Default::default()
        }],
        ..Options::default()
    })
    .await;
    optimal_send_times(&h).await;
    no_history_sends_now(&h).await;
}

/// An app without any tracked open (`news`; its users' opens are `shop`'s) sends OPTIMAL
/// batches now.
async fn no_history_sends_now(h: &Harness) {
    let mut request = batch(
        harness::template("News", "b"),
        vec![proto::Recipient {
            user_id: "ana".into(),
            ..recipient(200, &[])
        }],
    );
    request.app_id = "news".into();
    request.send_time = proto::SendTime::Optimal as i32;
    let response = h
        .client()
        .await
        .send_batch(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.receipts.len(), 1);
    assert_eq!(status(&response.receipts[0]), ReceiptStatus::Delivered);
}

/// `date` without a zone argument renders in the recipient's `timezone`, else the app's
/// `default_timezone`; a zone argument still wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_date_filter_defaults_to_the_recipients_zone() {
    let h = harness::start(Options {
        shop: "default_timezone = \"America/Sao_Paulo\"".into(),
        ..Options::default()
    })
    .await;
    let mut client = h.client().await;
    let title = "{{ ends | date: '%H:%M' }}";
    let body = "{{ ends | date: '%H:%M', 'Asia/Tokyo' }}";
    let ends = [("ends", "2025-06-01T15:00:00Z")];
    let request = batch(
        harness::template(title, body),
        vec![
            proto::Recipient {
                timezone: "Europe/Paris".into(),
                ..recipient(1, &ends)
            },
            recipient(2, &ends),
        ],
    );
    // Rendered at dispatch from the packed recipient: the zone survives packing.
    let response = client.send_batch(request).await.unwrap().into_inner();
    assert_eq!(response.accepted, 2, "{:?}", response.results);
    let got = received(&h);
    // 15:00 UTC is 17:00 in Paris (CEST), 12:00 in Sao Paulo, 00:00 in Tokyo.
    assert_eq!(got[&token(1)], ("17:00".to_owned(), "00:00".to_owned()));
    assert_eq!(got[&token(2)], ("12:00".to_owned(), "00:00".to_owned()));
}

/// The rest of the Liquid corpus through the gateway, one recipient per case (its own title,
/// rendered by the same engine as the template's, is what the mock receives), and hostile
/// texts that hit each part of the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liquid_corpus_and_hostile_texts_through_the_gateway() {
    let h = harness::start(Options::default()).await;
    let mut client = h.client().await;
    let vars: &[(&str, &str)] = &[
        ("name", "  Ada Lovelace  "),
        ("tier", "silver"),
        ("n", "7"),
        ("tags", r#"["a","b","c"]"#),
        ("user", r#"{"city":"Porto","visits":12}"#),
        ("price", "1234.5"),
    ];
    let corpus: &[(&str, &str)] = &[
        ("{{ 'MiXeD' | downcase }}", "mixed"),
        (
            "[{{ name | lstrip }}|{{ name | rstrip }}]",
            "[Ada Lovelace  |  Ada Lovelace]",
        ),
        ("{{ 'a-b-a' | replace_first: 'a', 'x' }}", "x-b-a"),
        ("{{ 'mid' | prepend: '<' | append: '>' }}", "<mid>"),
        ("{{ name | strip | size }}", "12"),
        (
            "{{ n | plus: 3 }} {{ n | minus: 10 }} {{ n | times: 2 }} {{ n | divided_by: 2 }}",
            "10 -3 14 3",
        ),
        ("{{ price | money: 'R$ ', ',', '.' }}", "R$ 1.234,50"),
        (
            "{{ tags | join: '+' }} {{ tags | first }}{{ tags | last }} {{ tags.size }}",
            "a+b+c ac 3",
        ),
        ("{{ user.city }} {{ user.visits | plus: 1 }}", "Porto 13"),
        (
            "{% if tier == 'gold' %}G{% elsif tier == 'silver' %}S{% else %}B{% endif %}",
            "S",
        ),
        ("{% if n > 5 and tier != 'gold' %}yes{% endif %}", "yes"),
        ("{% if n < 5 or tier contains 'il' %}yes{% endif %}", "yes"),
        ("{% unless n >= 8 %}under{% endunless %}", "under"),
        (
            "{% case tier %}{% when 'gold', 'silver' %}metal{% else %}none{% endcase %}",
            "metal",
        ),
        (
            "{% for i in (1..5) reversed %}{% if i == 2 %}{% break %}{% endif %}{% if i == 4 %}{% continue %}{% endif %}{{ i }}{% endfor %}",
            "53",
        ),
        (
            "{% for t in tags offset: 1 %}{{ forloop.index }}{{ t }}{% endfor %}",
            "1b2c",
        ),
        (
            "{% for t in missing_list %}x{% else %}empty{% endfor %}",
            "empty",
        ),
        ("a {%- comment %} hidden {% endcomment -%} b", "ab"),
        (
            "{% raw %}{{ not rendered }}{% endraw %}",
            "{{ not rendered }}",
        ),
        ("{{ nothing | default: 'fallback' }}", "fallback"),
    ];
    let mut recipients: Vec<proto::Recipient> = corpus
        .iter()
        .enumerate()
        .map(|(i, (text, _))| proto::Recipient {
            title: Some((*text).into()),
            ..recipient(i as u64, vars)
        })
        .collect();
    // Hostile: 10,000 loop iterations (over the 1,000 budget) with no output at all; an
    // output that doubles past 16 KiB; nesting deeper than 32.
    let base = corpus.len() as u64;
    let hostile = [
        "{% for a in (1..100) %}{% for b in (1..100) %}{% endfor %}{% endfor %}".to_owned(),
        format!("{{{{ big{} }}}}", " | append: big".repeat(8)),
        format!("{}x{}", "{% if n %}".repeat(40), "{% endif %}".repeat(40)),
    ];
    for (i, text) in hostile.iter().enumerate() {
        recipients.push(proto::Recipient {
            title: Some(text.clone()),
            ..recipient(base + i as u64, &[("n", "1"), ("big", &"x".repeat(3_000))])
        });
    }
    let response = client
        .send_batch(batch(harness::template("t", "b"), recipients))
        .await
        .unwrap()
        .into_inner();
    let got = received(&h);
    for (i, (text, expected)) in corpus.iter().enumerate() {
        let title = got.get(&token(i as u64)).map(|(t, _)| t.as_str());
        assert_eq!(title, Some(*expected), "{text}: {:?}", response.results[i]);
    }
    for (i, why) in ["render budget exceeded", "render budget exceeded", "nest"]
        .iter()
        .enumerate()
    {
        let r = &response.results[corpus.len() + i];
        assert!(!r.accepted, "{r:?}");
        assert_eq!(r.field, format!("recipients[{}].title", corpus.len() + i));
        assert!(r.reason.contains(why), "{r:?}");
    }
    assert_eq!(got.len(), corpus.len());
    assert_eq!(h.unresolved_drops(), 0);
}
