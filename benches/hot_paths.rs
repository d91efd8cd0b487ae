//! Criterion benchmarks of the gateway's hot paths, smallest first: template parsing and
//! rendering, APNs and FCM payload encoding, provider JWT signing and the cached token, protobuf
//! decode of a 1,000-recipient batch, receipt encoding, and the whole in-process pipeline
//! (ingest -> render -> deliver to a cleartext mock APNs -> terminal receipt) without gRPC.
//!
//! Sample sizes and measurement times are small so `cargo bench` stays a few minutes on 2 cores;
//! pass `-- --measurement-time 10` for steadier figures.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use pushgate::app::Gateway;
use pushgate::config::Config;
use pushgate::domain::Batch;
use pushgate::domain::{
    MessageMeta, Outcome, Platform, Priority, Receipt, ReceiptStatus, Recipient, Resolution,
    Template,
};
use pushgate::metrics::Metrics;
use pushgate::provider::apns::jwt::ApnsTokenSigner;
use pushgate::render::{CompiledTemplate, RenderContext, template};

const TITLE: &str = "Hi {{ first_name }}";
const BODY: &str = "{{ first_name }}, {{ cart_items }} items are still waiting in your cart";

fn template() -> Template {
    Template {
        title: TITLE.into(),
        body: BODY.into(),
        sound: "default".into(),
        data: [("screen".to_string(), "cart".to_string())].into(),
        ..Default::default()
    }
}

fn recipient(n: u64, platform: Platform) -> Recipient {
    Recipient {
        message_id: format!("m-{n}"),
        platform,
        device_token: match platform {
            Platform::Apns => format!("{n:064x}"),
            Platform::Fcm => format!("d{n:010}:APA91bH{}", "x".repeat(140)),
        },
        vars: [
            ("first_name".to_string(), format!("User{n}")),
            ("cart_items".to_string(), (n % 7 + 1).to_string()),
        ]
        .into(),
        user_id: format!("user-{n}"),
        locale: String::new(),
        timezone: String::new(),
        apns_json: String::new(),
        fcm_json: String::new(),
        title: None,
        body: None,
        token_registered_at_ms: 0,
        send_at_ms: 0,
    }
}

fn meta(n: u64, platform: Platform) -> MessageMeta {
    MessageMeta {
        app_id: Arc::from("shop"),
        batch_id: Arc::from("batch-1"),
        campaign_id: Arc::from("campaign"),
        message_id: format!("m-{n}"),
        platform,
        user_id: format!("user-{n}"),
        priority: Priority::Default,
        accepted_at: SystemTime::now(),
        expires_at: None,
        campaign_rate_per_minute: 0,
        content: Default::default(),
    }
}

fn render(c: &mut Criterion) {
    let mut g = c.benchmark_group("render");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("template_parse", |b| {
        b.iter(|| template::parse(black_box(BODY)).unwrap())
    });
    let text = template::parse(BODY).unwrap();
    let vars: BTreeMap<String, String> = [
        ("first_name".to_string(), "Ada".to_string()),
        ("cart_items".to_string(), "3".to_string()),
    ]
    .into();
    g.bench_function("text_render", |b| {
        b.iter(|| text.render(black_box(&vars)).unwrap().len())
    });
    // The floor of the content issue: a typical two-variable title and body, per recipient.
    let title = template::parse(TITLE).unwrap();
    g.bench_function("title_body_two_vars", |b| {
        b.iter(|| {
            let t = title.render(black_box(&vars)).unwrap();
            let b = text.render(black_box(&vars)).unwrap();
            t.len() + b.len()
        })
    });
    let rich = template::parse(RICH).unwrap();
    let rich_vars = rich_vars();
    g.bench_function("liquid_rich_body", |b| {
        b.iter(|| rich.render(black_box(&rich_vars)).unwrap().len())
    });
    let t = template();
    g.bench_function("compile", |b| {
        b.iter(|| CompiledTemplate::compile(black_box(&t)).unwrap())
    });
    let compiled = CompiledTemplate::compile(&t).unwrap();
    let ctx = RenderContext {
        apns_topic: "com.example.shop".into(),
        analytics_label: Some("campaign".into()),
    };
    for platform in [Platform::Apns, Platform::Fcm] {
        let r = recipient(42, platform);
        let m = meta(42, platform);
        g.bench_function(
            format!("{}_payload_per_recipient", platform.as_str()),
            |b| b.iter(|| compiled.render(black_box(&r), 7, &m, &ctx).unwrap()),
        );
    }
    g.finish();
}

/// A body with the tags and filters CRM copy uses: a condition, a case, a loop, number and
/// text filters.
const RICH: &str = "{% if tier == 'gold' %}Thanks, {{ first_name | capitalize }}!{% else %}Hi {{ first_name | default: 'there' }}.{% endif %} \
{% case cart_items %}{% when '1' %}One item{% else %}{{ cart_items }} items{% endcase %} ({{ total | money: '$' }}): \
{% for item in items limit: 3 %}{{ item | upcase }}{% unless forloop.last %}, {% endunless %}{% endfor %}";

fn rich_vars() -> BTreeMap<String, String> {
    [
        ("first_name", "ada"),
        ("tier", "gold"),
        ("cart_items", "3"),
        ("total", "1234.5"),
        ("items", r#"["tea","cake","jam","bread"]"#),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The engine choice: our renderer against the `liquid` crate on the same templates. The
/// `liquid` globals are built once, outside the loop (its best case; the gateway would have
/// to convert each recipient's variables too).
fn liquid_choice(c: &mut Criterion) {
    let mut g = c.benchmark_group("liquid_choice");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let vars: BTreeMap<String, String> = [
        ("first_name".to_string(), "Ada".to_string()),
        ("cart_items".to_string(), "3".to_string()),
    ]
    .into();
    let ours = (
        template::parse(TITLE).unwrap(),
        template::parse(BODY).unwrap(),
    );
    g.bench_function("ours_title_body", |b| {
        b.iter(|| {
            let t = ours.0.render(black_box(&vars)).unwrap();
            let b = ours.1.render(black_box(&vars)).unwrap();
            t.len() + b.len()
        })
    });
    let parser = liquid::ParserBuilder::with_stdlib().build().unwrap();
    let theirs = (parser.parse(TITLE).unwrap(), parser.parse(BODY).unwrap());
    let globals = liquid::object!({ "first_name": "Ada", "cart_items": "3" });
    g.bench_function("liquid_crate_title_body", |b| {
        b.iter(|| {
            let t = theirs.0.render(black_box(&globals)).unwrap();
            let b = theirs.1.render(black_box(&globals)).unwrap();
            t.len() + b.len()
        })
    });
    let rich = template::parse(RICH).unwrap();
    let rich_vars = rich_vars();
    g.bench_function("ours_rich_body", |b| {
        b.iter(|| rich.render(black_box(&rich_vars)).unwrap().len())
    });
    let rich_globals = liquid::object!({
        "first_name": "ada", "tier": "gold", "cart_items": "3", "total": 1234.5,
        "items": ["tea", "cake", "jam", "bread"],
    });
    // `money` is ours; the closest stdlib filter chain stands in so both render comparable text.
    let rich_liquid_src = RICH.replace("money: '$'", "round: 2 | prepend: '$'");
    let rich_liquid_alt = parser.parse(&rich_liquid_src).unwrap();
    g.bench_function("liquid_crate_rich_body", |b| {
        b.iter(|| {
            rich_liquid_alt
                .render(black_box(&rich_globals))
                .unwrap()
                .len()
        })
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    let mut g = c.benchmark_group("apns_jwt");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let key = pushgate_mocks::keys::generate_apns_key();
    let refresh = Duration::from_secs(40 * 60);
    g.bench_function("signer_new_and_sign", |b| {
        b.iter(|| {
            ApnsTokenSigner::new(
                &key.key_id,
                &key.team_id,
                key.private_p8_pem.as_bytes(),
                refresh,
            )
            .unwrap()
        })
    });
    let signer = ApnsTokenSigner::new(
        &key.key_id,
        &key.team_id,
        key.private_p8_pem.as_bytes(),
        refresh,
    )
    .unwrap();
    g.bench_function("token_cached", |b| b.iter(|| signer.token().unwrap()));
    g.finish();
}

fn proto_batch(n: u64) -> pushgate::proto::SendBatchRequest {
    use pushgate::proto;
    proto::SendBatchRequest {
        app_id: "shop".into(),
        batch_id: "batch-1".into(),
        campaign_id: "campaign".into(),
        template: Some(proto::Template {
            title: TITLE.into(),
            body: BODY.into(),
            sound: "default".into(),
            data: [("screen".to_string(), "cart".to_string())].into(),
            ..Default::default()
        }),
        recipients: (0..n)
            .map(|k| proto::Recipient {
                message_id: format!("m-{k}"),
                platform: proto::Platform::Apns as i32,
                device_token: format!("{k:064x}"),
                vars: [
                    ("first_name".to_string(), format!("User{k}")),
                    ("cart_items".to_string(), (k % 7 + 1).to_string()),
                ]
                .into(),
                user_id: format!("user-{k}"),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn protobuf(c: &mut Criterion) {
    let mut g = c.benchmark_group("protobuf");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let bytes = proto_batch(1000).encode_to_vec();
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_send_batch_1000_recipients", |b| {
        b.iter(|| pushgate::proto::SendBatchRequest::decode(black_box(bytes.as_slice())).unwrap())
    });
    g.bench_function("decode_and_into_batch_1000_recipients", |b| {
        b.iter(|| {
            let request =
                pushgate::proto::SendBatchRequest::decode(black_box(bytes.as_slice())).unwrap();
            pushgate::app::into_batch(request).unwrap()
        })
    });
    g.throughput(Throughput::Elements(1));
    let receipt = Receipt::new(
        Arc::new(meta(42, Platform::Apns)),
        1,
        Resolution::from_outcome(Outcome::Delivered {
            provider_message_id: "2b8a0f4e-1c9d-4c1e-9a55-3f1a7b2c9d10".into(),
            status: 200,
        }),
        None,
    );
    let mut buf = Vec::with_capacity(512);
    g.bench_function("receipt_to_proto_and_encode", |b| {
        b.iter(|| {
            buf.clear();
            pushgate::wire::receipt(black_box(&receipt))
                .encode(&mut buf)
                .unwrap();
            buf.len()
        })
    });
    g.finish();
}

/// The pipeline without gRPC: `Gateway::submit` of 1,000-recipient APNs batches against a
/// cleartext in-process mock APNs, timed until every terminal receipt is in the caller's sink.
fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = pushgate_mocks::keys::generate_apns_key();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(&key_file, &key.private_p8_pem).unwrap();
    let (gateway, mock) = rt.block_on(async {
        let mut cfg =
            pushgate_mocks::apns::MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
        cfg.tls = false;
        cfg.record_accepted = false;
        let mock = pushgate_mocks::apns::MockApns::start(cfg).await.unwrap();
        let config = Config::from_toml(&format!(
            r#"
            listen = "127.0.0.1:0"
            [apps.shop.apns]
            key_file = "{}"
            key_id = "{}"
            team_id = "{}"
            topic = "com.example.shop"
            endpoint = "{}"
            connections = 2
            "#,
            key_file.display(),
            key.key_id,
            key.team_id,
            mock.url()
        ))
        .unwrap();
        let apps = config.registry().unwrap();
        let gateway = Gateway::start(apps, config.pipeline.clone(), Arc::new(Metrics::new()));
        (gateway, mock)
    });
    let t = template();
    let batch = |seq: u64| Batch {
        app_id: "shop".into(),
        batch_id: format!("bench-{seq}"),
        campaign_id: "campaign".into(),
        template: t.clone(),
        recipients: (0..1000)
            .map(|k| recipient(seq * 1000 + k, Platform::Apns))
            .collect(),
        ..Default::default()
    };
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1000));
    let mut seq = 0u64;
    g.bench_function("apns_batch_1000_to_terminal_receipts", |b| {
        b.iter_batched(
            || {
                seq += 1;
                batch(seq)
            },
            |mut batch| {
                rt.block_on(async {
                    let (sink, mut receipts) = tokio::sync::mpsc::unbounded_channel();
                    let result = gateway
                        .submit(&mut batch, Some(&sink), false)
                        .await
                        .unwrap();
                    drop(sink);
                    let mut terminal = 0;
                    let expected = result.accepted();
                    while terminal < expected {
                        let envelope = receipts.recv().await.unwrap();
                        if envelope.receipt.terminal() {
                            assert_eq!(envelope.receipt.status, ReceiptStatus::Delivered);
                            terminal += 1;
                        }
                    }
                })
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    rt.block_on(async {
        gateway.shutdown(Duration::from_secs(5)).await;
        mock.shutdown().await;
    });
}

criterion_group!(benches, render, liquid_choice, jwt, protobuf, pipeline);
criterion_main!(benches);
