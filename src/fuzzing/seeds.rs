//! The committed seed corpora, written from here so they stay meaningful and reviewable:
//! `PUSHGATE_WRITE_FUZZ_SEEDS=1 cargo test --locked --lib fuzzing::seeds` rewrites
//! `fuzz/corpus/<target>/seed-*` (libFuzzer's own finds never go there: `scripts/fuzz.sh`
//! keeps them under `target/`). Without the variable the test checks that the committed seeds
//! are the ones written here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message;

use crate::proto;

fn recipient(platform: proto::Platform, token: &str, vars: &[(&str, &str)]) -> proto::Recipient {
    proto::Recipient {
        message_id: String::new(),
        platform: platform as i32,
        device_token: token.into(),
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        user_id: "user-17".into(),
        ..Default::default()
    }
}

const APNS_TOKEN: &str = "7a1f0c2e9b4d8a6f3e5c7b9d1f2a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f80";
const FCM_TOKEN: &str = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

fn requests() -> Vec<(&'static str, proto::SendBatchRequest)> {
    let mut simple = proto::SendBatchRequest {
        app_id: "shop".into(),
        batch_id: "b-1".into(),
        campaign_id: "spring-sale".into(),
        template: Some(proto::Template {
            title: "Hi {{ first_name | default: \"there\" }}".into(),
            body: "Your cart has {{ count }} items".into(),
            deep_link: "shop://cart".into(),
            ttl_seconds: 3_600,
            ..Default::default()
        }),
        recipients: vec![
            recipient(
                proto::Platform::Apns,
                APNS_TOKEN,
                &[("first_name", "Ada"), ("count", "3")],
            ),
            recipient(proto::Platform::Fcm, FCM_TOKEN, &[("count", "1")]),
        ],
        ..Default::default()
    };
    simple.recipients[0].message_id = "0b6f2f9e-3c1a-4d8e-9f7a-2b5c8d1e4f60".into();
    simple.recipients[1].message_id = "m-2".into();

    let mut locales = BTreeMap::new();
    locales.insert(
        "fr".to_owned(),
        proto::LocalizedText {
            title: "Bonjour {{ first_name }}".into(),
            body: "Les soldes commencent".into(),
            ..Default::default()
        },
    );
    let experiment = proto::SendBatchRequest {
        app_id: "shop".into(),
        campaign_id: "ab-test".into(),
        template: Some(proto::Template {
            title: "Hello {{ first_name }}".into(),
            body: "Sale starts now".into(),
            locales: locales.clone(),
            experiment: Some(proto::Experiment {
                variants: vec![
                    proto::Variant {
                        name: "control".into(),
                        weight: 1,
                        ..Default::default()
                    },
                    proto::Variant {
                        name: "urgent".into(),
                        weight: 1,
                        title: "Last chance, {{ first_name }}!".into(),
                        locales,
                        ..Default::default()
                    },
                ],
                holdout_share: 0.1,
            }),
            ..Default::default()
        }),
        recipients: (0..4)
            .map(|i| {
                let mut r = recipient(
                    if i % 2 == 0 {
                        proto::Platform::Apns
                    } else {
                        proto::Platform::Fcm
                    },
                    if i % 2 == 0 { APNS_TOKEN } else { FCM_TOKEN },
                    &[("first_name", "Grace")],
                );
                r.user_id = format!("u-{i}");
                r.locale = if i < 2 { "fr-CA" } else { "en" }.into();
                r
            })
            .collect(),
        ..Default::default()
    };

    let mut data = BTreeMap::new();
    data.insert("order_id".to_owned(), "{{ order }}".to_owned());
    data.insert("kind".to_owned(), "receipt".to_owned());
    let mut overrides = proto::SendBatchRequest {
        app_id: "shop".into(),
        template: Some(proto::Template {
            title: "Order {{ order }}".into(),
            subtitle: "{% if paid == \"yes\" %}Paid{% else %}Unpaid{% endif %}".into(),
            body: "{% for item in items limit: 2 %}{{ item | upcase }}{% unless forloop.last %}, {% endunless %}{% endfor %}".into(),
            image_url: "https://cdn.example.com/o.png".into(),
            sound: "default".into(),
            badge: Some(2),
            category: "ORDER".into(),
            thread_id: "orders".into(),
            collapse_key: "order-status".into(),
            priority: proto::Priority::High as i32,
            mutable_content: true,
            data,
            apns_json: r#"{"aps":{"interruption-level":"time-sensitive"}}"#.into(),
            fcm_json: r#"{"android":{"priority":"HIGH"}}"#.into(),
            android_channel_id: "orders".into(),
            ..Default::default()
        }),
        recipients: vec![
            recipient(
                proto::Platform::Apns,
                APNS_TOKEN,
                &[("order", "A-17"), ("paid", "yes"), ("items", r#"["tea","cups","pot"]"#)],
            ),
            recipient(
                proto::Platform::Fcm,
                FCM_TOKEN,
                &[("order", "A-18"), ("paid", "no"), ("items", "[]")],
            ),
        ],
        ..Default::default()
    };
    overrides.recipients[0].apns_json = r#"{"aps":{"relevance-score":0.5}}"#.into();
    overrides.recipients[1].fcm_json = r#"{"data":{"extra":"1"}}"#.into();
    overrides.recipients[1].title = Some("Your order {{ order }} shipped".into());

    let background = proto::SendBatchRequest {
        app_id: "shop".into(),
        template: Some(proto::Template {
            content_available: true,
            push_type: proto::PushType::Background as i32,
            data: [("sync".to_owned(), "inbox".to_owned())].into(),
            ..Default::default()
        }),
        recipients: vec![
            recipient(proto::Platform::Apns, APNS_TOKEN, &[]),
            recipient(proto::Platform::Fcm, FCM_TOKEN, &[]),
        ],
        ..Default::default()
    };

    let mut scheduled = simple.clone();
    scheduled.local_send_time = "09:30".into();
    scheduled.late_sends_now = true;
    for r in &mut scheduled.recipients {
        r.timezone = "America/Sao_Paulo".into();
    }

    let mut refused = simple.clone();
    refused.recipients[1].platform = 0;
    if let Some(t) = refused.template.as_mut() {
        t.priority = 7;
    }

    vec![
        ("simple", simple),
        ("experiment", experiment),
        ("overrides", overrides),
        ("background", background),
        ("scheduled", scheduled),
        ("refused", refused),
    ]
}

/// NUL-separated fields, as `Fields::parse` reads them.
fn fields(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

fn render_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // options, title, subtitle, body, data, t.apns_json, t.fcm_json, token, vars, r.apns_json,
    // r.fcm_json, title override, body override, image, deep link, sound, collapse key,
    // category, thread id, channel, message id
    vec![
        (
            "alert",
            fields(&[
                "t",
                "Hi {{ first_name }}",
                "",
                "{{ count }} items wait in your cart",
                "",
                "",
                "",
                APNS_TOKEN,
                "first_name=Ada\ncount=3",
            ]),
        ),
        (
            "everything",
            fields(&[
                "hmt5",
                "Order {{ order }}",
                "{{ status | capitalize }}",
                "{% if total > 100 %}Free shipping{% else %}{{ total | money: \"$\" }}{% endif %}",
                "order_id={{ order }}\nkind=receipt",
                r#"{"aps":{"interruption-level":"time-sensitive"}}"#,
                r#"{"android":{"priority":"HIGH"}}"#,
                "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                "order=A-17\nstatus=shipped\ntotal=120",
                r#"{"aps":{"relevance-score":0.5}}"#,
                r#"{"data":{"extra":"1"}}"#,
                "",
                "",
                "https://cdn.example.com/o.png",
                "shop://orders/A-17",
                "default",
                "order-A-17",
                "ORDER",
                "orders",
                "orders",
                "8e7a4c36-2b1f-4c0e-9d3a-5b6f7e8d9c0",
            ]),
        ),
        (
            "background",
            fields(&["bc", "", "", "", "sync=inbox", "", "", APNS_TOKEN, ""]),
        ),
        (
            "overrides",
            fields(&[
                "oO",
                "Template title",
                "",
                "Template body",
                "",
                "",
                "",
                APNS_TOKEN,
                "name=Grace\nunused=x",
                "",
                "",
                "Hey {{ name }}",
                "{{ name | upcase }}, your order shipped",
            ]),
        ),
        (
            "voip",
            fields(&[
                "v",
                "Incoming call",
                "",
                "{{ caller }}",
                "",
                r#"{"aps":{}}"#,
                "",
                APNS_TOKEN,
                "caller=Ada",
            ]),
        ),
        (
            "bad_override",
            fields(&[
                "",
                "Hi",
                "",
                "",
                "",
                r#"{"aps":"not an object"}"#,
                r#"{"token":"someone-else","data":{"n":1}}"#,
                "not-hex",
                "",
            ]),
        ),
    ]
}

fn template_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "plain",
            fields(&["Hello {{ first_name }}!", "first_name=Ada"]),
        ),
        (
            "filters",
            fields(&[
                "{{ name | default: \"friend\" | capitalize }} - {{ price | money: \"R$ \", \",\", \".\" }} {{ note | truncate: 12 }}",
                "price=1234.5",
                "note=a long note that gets cut",
            ]),
        ),
        (
            "control_flow",
            fields(&[
                "{%- if tier == \"gold\" -%}VIP{%- elsif tier contains \"sil\" %}Silver{% else %}Hi{% endif %} {% case n %}{% when 1 %}one{% when 2 %}two{% else %}many{% endcase %}",
                "tier=silver",
                "n=2",
            ]),
        ),
        (
            "loops",
            fields(&[
                "{% for x in items limit: 3 offset: 1 reversed %}{{ forloop.index }}:{{ x | upcase }}{% if forloop.last %}.{% else %}, {% endif %}{% else %}none{% endfor %}",
                r#"items=["a","b","c","d"]"#,
            ]),
        ),
        (
            "paths_and_raw",
            fields(&[
                "{{ user.city }} {% raw %}{{ not a tag }}{% endraw %}{% comment %}x{% endcomment %} {{ d | date: \"%Y-%m-%d\" }}",
                r#"user={"city":"Lisbon"}"#,
                "d=2026-03-01T10:00:00Z",
            ]),
        ),
        ("unclosed", fields(&["Hi {{ name", "name=x"])),
        (
            "arithmetic",
            fields(&[
                "{{ a | plus: b | times: 2 | divided_by: 3 | round: 1 }} {{ list | join: \"-\" }} {{ list | size }}",
                "a=10",
                "b=2.5",
                r#"list=[1,2,3]"#,
            ]),
        ),
    ]
}

fn packed_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = render_seeds();
    seeds.retain(|(name, _)| matches!(*name, "alert" | "everything" | "overrides"));
    // A packed recipient as ingest writes it, and damaged ones.
    seeds.push(("raw_lengths", vec![0, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]));
    seeds.push((
        "raw_token_bytes",
        vec![
            16, 4, 0xde, 0xad, 0xbe, 0xef, 1, b'm', 0, 0, 0, 0, 0, 1, 0, 1, b'x',
        ],
    ));
    seeds
}

fn apns_seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("ok", "200\n"),
        ("bad_device_token", "400\n{\"reason\":\"BadDeviceToken\"}"),
        (
            "unregistered",
            "410\n{\"reason\":\"Unregistered\",\"timestamp\":1700000000000}",
        ),
        (
            "expired_token",
            "403\n{\"reason\":\"ExpiredProviderToken\"}",
        ),
        (
            "invalid_token",
            "403\n{\"reason\":\"InvalidProviderToken\"}",
        ),
        ("too_many", "429\n{\"reason\":\"TooManyRequests\"}"),
        ("shutdown", "503\n{\"reason\":\"Shutdown\"}"),
        ("idle_timeout", "400\n{\"reason\":\"IdleTimeout\"}"),
        ("payload_too_large", "413\n{\"reason\":\"PayloadTooLarge\"}"),
        ("html", "502\n<html><body>Bad Gateway</body></html>"),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.as_bytes().to_vec()))
    .collect()
}

fn fcm_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const E: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
    let fcm = |status: u16, canonical: &str, code: &str| {
        format!(
            r#"{{"error":{{"code":{status},"message":"m","status":"{canonical}","details":[{{"@type":"{E}","errorCode":"{code}"}}]}}}}"#
        )
    };
    vec![
        (
            "ok",
            "200\n\n{\"name\":\"projects/p/messages/0:1700000000000000%abc\"}".to_owned(),
        ),
        ("ok_without_name", "200\n\n{}".to_owned()),
        (
            "unregistered",
            format!("404\n\n{}", fcm(404, "NOT_FOUND", "UNREGISTERED")),
        ),
        (
            "token_violation",
            format!(
                "400\n\n{}",
                r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#
            ),
        ),
        (
            "apns_relayed_410",
            format!(
                "400\n\n{}",
                r#"{"error":{"code":400,"message":"APNs device token is disabled.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},{"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":410,"reason":"Unregistered"}]}}"#
            ),
        ),
        (
            "quota_seconds",
            format!("429\n30\n{}", fcm(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")),
        ),
        (
            "unavailable_date",
            format!(
                "503\nWed, 21 Oct 2026 07:28:00 GMT\n{}",
                fcm(503, "UNAVAILABLE", "UNAVAILABLE")
            ),
        ),
        (
            "internal",
            format!("500\n\n{}", fcm(500, "INTERNAL", "INTERNAL")),
        ),
        (
            "third_party_auth",
            format!(
                "401\n\n{}",
                r#"{"error":{"code":401,"message":"Auth error from APNS or Web Push Service","status":"UNAUTHENTICATED","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"THIRD_PARTY_AUTH_ERROR"},{"@type":"type.googleapis.com/google.firebase.fcm.v1.ApnsError","statusCode":403,"reason":"InvalidProviderToken"}]}}"#
            ),
        ),
        (
            "oauth_expired",
            "401\n\n{\"error\":{\"code\":401,\"message\":\"Request had invalid authentication credentials.\",\"status\":\"UNAUTHENTICATED\"}}".to_owned(),
        ),
        (
            "sender_mismatch",
            format!("403\n\n{}", fcm(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")),
        ),
        (
            "not_found_plain",
            "404\n\n{\"error\":{\"code\":404,\"message\":\"Requested entity was not found.\",\"status\":\"NOT_FOUND\"}}".to_owned(),
        ),
        (
            "html_502",
            "502\n120\n<html><head><title>502 Server Error</title></head></html>".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.into_bytes()))
    .collect()
}

fn retry_after_seeds() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("seconds", "30"),
        ("padded", " 120 "),
        ("zero", "0"),
        ("huge", "18446744073709551615"),
        ("imf_date", "Wed, 21 Oct 2026 07:28:00 GMT"),
        ("rfc850_date", "Wednesday, 21-Oct-26 07:28:00 GMT"),
        ("asctime_date", "Wed Oct 21 07:28:00 2026"),
        ("past_date", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ("far_date", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ("negative", "-5"),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.as_bytes().to_vec()))
    .collect()
}

/// Named seeds.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        (
            "request",
            requests()
                .into_iter()
                .map(|(n, r)| (n, r.encode_to_vec()))
                .collect(),
        ),
        ("render", render_seeds()),
        ("template", template_seeds()),
        ("packed", packed_seeds()),
        ("apns_response", apns_seeds()),
        ("fcm_response", fcm_seeds()),
        ("retry_after", retry_after_seeds()),
    ]
}

#[test]
fn committed_seeds_are_the_ones_written_here() {
    let write = std::env::var_os("PUSHGATE_WRITE_FUZZ_SEEDS").is_some();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, seeds) in all() {
        let dir = root.join(target);
        for (name, bytes) in seeds {
            let path = dir.join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}; run PUSHGATE_WRITE_FUZZ_SEEDS=1 cargo test --locked --lib fuzzing::seeds",
                        path.display()
                    )
                });
                assert_eq!(committed, bytes, "{} differs", path.display());
            }
            // A seed that does not reach the code it is for is no seed.
            (super::TARGETS.iter().find(|(t, _)| *t == target).unwrap().1)(&bytes);
        }
    }
}
