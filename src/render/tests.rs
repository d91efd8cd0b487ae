//! Tests of the render stage as a whole: exact payloads for representative cases, the error
//! fields, and property tests over arbitrary templates.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::domain::{ApnsRequest, FcmRequest};

const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const FCM_TOKEN: &str = "fcm-token_1:APA91b.xyz";
const ACCEPTED: u64 = 1_700_000_000;

fn meta(message_id: &str) -> MessageMeta {
    MessageMeta {
        app_id: Arc::from("app"),
        batch_id: Arc::from("batch"),
        campaign_id: Arc::from("campaign"),
        message_id: message_id.to_owned(),
        platform: Platform::Apns,
        user_id: String::new(),
        priority: Priority::Default,
        accepted_at: SystemTime::UNIX_EPOCH + Duration::from_secs(ACCEPTED),
        expires_at: None,
        campaign_rate_per_minute: 0,
        content: Default::default(),
    }
}

fn ctx() -> RenderContext {
    RenderContext {
        apns_topic: "com.example.app".to_owned(),
        analytics_label: Some("spring-sale".to_owned()),
    }
}

fn recipient(platform: Platform, token: &str, vars: &[(&str, &str)]) -> Recipient {
    Recipient {
        message_id: String::new(),
        platform,
        device_token: token.to_owned(),
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        user_id: String::new(),
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

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn apns(t: &CompiledTemplate, r: &Recipient) -> Result<ApnsRequest, FieldError> {
    match t.render(r, 0, &meta("7C9E6679-7425-40DE-944B-E07FC1F90AE7"), &ctx())? {
        ProviderRequest::Apns(a) => Ok(a),
        ProviderRequest::Fcm(_) => panic!("expected an APNs request"),
    }
}

fn fcm(t: &CompiledTemplate, r: &Recipient) -> Result<FcmRequest, FieldError> {
    match t.render(r, 0, &meta("m"), &ctx())? {
        ProviderRequest::Fcm(f) => Ok(f),
        ProviderRequest::Apns(_) => panic!("expected an FCM request"),
    }
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

fn value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn err(field: &str, reason: &str) -> FieldError {
    FieldError::new(field, reason)
}

fn alert_template() -> Template {
    Template {
        title: "Hi {{ first_name | default: \"there\" }}".into(),
        subtitle: "Order {{ order }}".into(),
        body: "Your order shipped".into(),
        image_url: "https://img.example/o.png".into(),
        deep_link: "app://orders/42".into(),
        sound: "default".into(),
        badge: Some(3),
        category: "ORDER".into(),
        thread_id: "orders".into(),
        data: data(&[("order_id", "{{ order }}"), ("kind", "shipping")]),
        collapse_key: "order-42".into(),
        ttl: Some(Duration::from_secs(3600)),
        android_channel_id: "orders".into(),
        ..Template::default()
    }
}

#[test]
fn apns_alert_exact_payload_and_headers() {
    let t = CompiledTemplate::compile(&alert_template()).unwrap();
    let r = recipient(
        Platform::Apns,
        TOKEN,
        &[("first_name", "Ada"), ("order", "42")],
    );
    let a = apns(&t, &r).unwrap();
    assert_eq!(
        text(&a.payload),
        r#"{"aps":{"alert":{"title":"Hi Ada","subtitle":"Order 42","body":"Your order shipped"},"badge":3,"sound":"default","thread-id":"orders","category":"ORDER","mutable-content":1},"kind":"shipping","order_id":"42","deep_link":"app://orders/42","image_url":"https://img.example/o.png"}"#
    );
    assert_eq!(a.topic, "com.example.app");
    assert_eq!(a.push_type, PushType::Alert);
    assert_eq!(a.priority, 10);
    assert_eq!(a.expiration, Some(ACCEPTED + 3600));
    assert_eq!(a.collapse_id.as_deref(), Some("order-42"));
    assert_eq!(
        a.apns_id.hyphenated().to_string(),
        "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    );
    assert_eq!(a.device_token, TOKEN);
}

#[test]
fn apns_default_filter_on_missing_and_empty_and_escaping() {
    let t = CompiledTemplate::compile(&Template {
        title: "Hi {{ first_name | default: 'there' }}".into(),
        body: "\"quoted\"\n{{ note }}".into(),
        ..Template::default()
    })
    .unwrap();
    for vars in [
        &[("note", "é\t")][..],
        &[("first_name", ""), ("note", "é\t")][..],
    ] {
        let a = apns(&t, &recipient(Platform::Apns, TOKEN, vars)).unwrap();
        assert_eq!(
            text(&a.payload),
            r#"{"aps":{"alert":{"title":"Hi there","body":"\"quoted\"\né\t"}}}"#
        );
    }
}

#[test]
fn apns_missing_variable_names_the_variable() {
    let t = CompiledTemplate::compile(&alert_template()).unwrap();
    let r = recipient(Platform::Apns, TOKEN, &[("first_name", "Ada")]);
    let e = t.render(&r, 2, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(e.field, "recipients[2].vars.order");
    assert_eq!(
        e.reason,
        "variable `order` is not set and its tag has no default"
    );
    // The same for FCM.
    let r = recipient(Platform::Fcm, FCM_TOKEN, &[]);
    let e = t.render(&r, 5, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(e.field, "recipients[5].vars.order");
}

#[test]
fn compile_errors_name_the_template_field() {
    let bad = |t: Template| CompiledTemplate::compile(&t).unwrap_err();
    let e = bad(Template {
        title: "Hi {{ name | shout }}".into(),
        ..Template::default()
    });
    assert_eq!(
        e,
        err(
            "template.title",
            "line 1, column 14: unknown filter `shout`"
        )
    );
    let e = bad(Template {
        data: data(&[("k", "{{ x")]),
        ..Template::default()
    });
    assert_eq!(e.field, "template.data.k");
    assert!(
        e.reason.starts_with("line 1, column 1: unterminated tag"),
        "{e}"
    );
    let e = bad(Template {
        body: "{{}}".into(),
        ..Template::default()
    });
    assert_eq!(e.field, "template.body");
    let e = bad(Template {
        apns_json: "{".into(),
        ..Template::default()
    });
    assert_eq!(e.field, "template.apns_json");
    assert!(e.reason.starts_with("invalid JSON"), "{e}");
    let e = bad(Template {
        fcm_json: "\"x\"".into(),
        ..Template::default()
    });
    assert_eq!(
        e,
        err("template.fcm_json", "must be a JSON object, got a string")
    );
}

#[test]
fn recipient_overrides_are_rendered_and_named() {
    let t = CompiledTemplate::compile(&alert_template()).unwrap();
    let mut r = recipient(Platform::Apns, TOKEN, &[("order", "7"), ("n", "Bo")]);
    r.title = Some("Yo {{ n }}".into());
    r.body = Some(String::new());
    let a = apns(&t, &r).unwrap();
    let v = value(&a.payload);
    assert_eq!(
        v["aps"]["alert"],
        json!({"title": "Yo Bo", "subtitle": "Order 7"})
    );
    r.title = Some("Yo {{ n ".into());
    let e = t.render(&r, 4, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(e.field, "recipients[4].title");
}

#[test]
fn apns_background_inferred() {
    let t = CompiledTemplate::compile(&Template {
        content_available: true,
        data: data(&[("sync", "inbox")]),
        category: "IGNORED".into(),
        mutable_content: true,
        ..Template::default()
    })
    .unwrap();
    let a = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap();
    assert_eq!(
        text(&a.payload),
        r#"{"aps":{"content-available":1},"sync":"inbox"}"#
    );
    assert_eq!(a.push_type, PushType::Background);
    assert_eq!(a.priority, 5);
    assert_eq!(a.topic, "com.example.app");
    assert_eq!(a.expiration, None);
    assert_eq!(a.collapse_id, None);
    // A recipient title override turns it into an alert with content-available.
    let mut r = recipient(Platform::Apns, TOKEN, &[]);
    r.title = Some("New mail".into());
    let a = apns(&t, &r).unwrap();
    assert_eq!(a.push_type, PushType::Alert);
    assert_eq!(a.priority, 10);
    assert_eq!(
        text(&a.payload),
        r#"{"aps":{"alert":{"title":"New mail"},"category":"IGNORED","mutable-content":1,"content-available":1},"sync":"inbox"}"#
    );
}

#[test]
fn apns_background_rules_are_enforced() {
    let bg = Template {
        push_type: Some(PushType::Background),
        ..Template::default()
    };
    let why = "not allowed in a background push (aps may only contain content-available)";
    for (t, field) in [
        (
            Template {
                sound: "default".into(),
                ..bg.clone()
            },
            "template.sound",
        ),
        (
            Template {
                badge: Some(0),
                ..bg.clone()
            },
            "template.badge",
        ),
        (
            Template {
                title: "x".into(),
                ..bg.clone()
            },
            "template.title",
        ),
        (
            Template {
                body: "{{ x }}".into(),
                ..bg.clone()
            },
            "template.body",
        ),
    ] {
        assert_eq!(CompiledTemplate::compile(&t).unwrap_err(), err(field, why));
    }
    // Explicit background: content-available is sent even if the flag is not set.
    let t = CompiledTemplate::compile(&bg).unwrap();
    let a = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap();
    assert_eq!(text(&a.payload), r#"{"aps":{"content-available":1}}"#);
    let mut r = recipient(Platform::Apns, TOKEN, &[]);
    r.body = Some("hello".into());
    assert_eq!(
        t.render(&r, 1, &meta("m"), &ctx()).unwrap_err(),
        err("recipients[1].body", why)
    );
    // HIGH priority with background is rejected for APNs.
    let t = CompiledTemplate::compile(&Template {
        priority: Priority::High,
        content_available: true,
        ..Template::default()
    })
    .unwrap();
    let e = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap_err();
    assert_eq!(e.field, "template.priority");
    // Normal priority and alerts.
    let t = CompiledTemplate::compile(&Template {
        priority: Priority::Normal,
        title: "x".into(),
        ..Template::default()
    })
    .unwrap();
    assert_eq!(
        apns(&t, &recipient(Platform::Apns, TOKEN, &[]))
            .unwrap()
            .priority,
        5
    );
    // An override may not sneak an alert into a background push.
    let t = CompiledTemplate::compile(&Template {
        content_available: true,
        apns_json: r#"{"aps":{"interruption-level":"passive"}}"#.into(),
        ..Template::default()
    })
    .unwrap();
    let e = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap_err();
    assert_eq!(
        e,
        err(
            "template.apns_json",
            "aps.interruption-level is not allowed in a background push (aps may only contain content-available)"
        )
    );
    let t = CompiledTemplate::compile(&Template {
        content_available: true,
        ..Template::default()
    })
    .unwrap();
    let mut r = recipient(Platform::Apns, TOKEN, &[]);
    r.apns_json = r#"{"aps":{"content-available":0}}"#.into();
    let e = t.render(&r, 3, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(
        e,
        err(
            "recipients[3].apns_json",
            "aps.content-available must be 1 in a background push"
        )
    );
}

#[test]
fn apns_voip_size_limit_is_5120_others_4096() {
    let body = "x".repeat(4500);
    let voip = CompiledTemplate::compile(&Template {
        body: body.clone(),
        push_type: Some(PushType::Voip),
        ..Template::default()
    })
    .unwrap();
    let a = apns(&voip, &recipient(Platform::Apns, TOKEN, &[])).unwrap();
    assert_eq!(a.topic, "com.example.app.voip");
    assert_eq!(a.push_type, PushType::Voip);
    assert_eq!(
        a.payload.len(),
        4500 + r#"{"aps":{"alert":{"body":""}}}"#.len()
    );
    let alert = CompiledTemplate::compile(&Template {
        body,
        ..Template::default()
    })
    .unwrap();
    let e = alert
        .render(
            &recipient(Platform::Apns, TOKEN, &[]),
            9,
            &meta("m"),
            &ctx(),
        )
        .unwrap_err();
    assert_eq!(
        e,
        err(
            "recipients[9].payload",
            "APNs payload is 4529 bytes; the limit is 4096"
        )
    );
    // Exactly at the limit passes.
    let exact = CompiledTemplate::compile(&Template {
        body: "x".repeat(4096 - 29),
        ..Template::default()
    })
    .unwrap();
    assert_eq!(
        apns(&exact, &recipient(Platform::Apns, TOKEN, &[]))
            .unwrap()
            .payload
            .len(),
        4096
    );
}

#[test]
fn apns_overrides_deep_merge() {
    let t = CompiledTemplate::compile(&Template {
        title: "T".into(),
        body: "B".into(),
        sound: "default".into(),
        data: data(&[("k", "v")]),
        apns_json: r#"{"aps":{"interruption-level":"time-sensitive","alert":{"launch-image":"L"}},"k":"template"}"#
            .into(),
        ..Template::default()
    })
    .unwrap();
    let mut r = recipient(Platform::Apns, TOKEN, &[]);
    r.apns_json =
        r#"{"aps":{"sound":{"critical":1,"name":"a.caf"},"alert":{"title":"R"}},"extra":[1]}"#
            .into();
    let a = apns(&t, &r).unwrap();
    assert_eq!(
        value(&a.payload),
        json!({
            "aps": {
                "alert": {"title": "R", "body": "B", "launch-image": "L"},
                "sound": {"critical": 1, "name": "a.caf"},
                "interruption-level": "time-sensitive"
            },
            "k": "template",
            "extra": [1]
        })
    );
    r.apns_json = "[]".into();
    let e = t.render(&r, 1, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(
        e,
        err(
            "recipients[1].apns_json",
            "must be a JSON object, got an array"
        )
    );
    r.apns_json = r#"{"aps":"x"}"#.into();
    let e = t.render(&r, 1, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(
        e,
        err(
            "recipients[1].apns_json",
            "aps must be an object, got a string"
        )
    );
}

#[test]
fn apns_data_key_rules() {
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        data: data(&[("aps", "x")]),
        ..Template::default()
    })
    .unwrap();
    let e = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap_err();
    assert_eq!(e.field, "template.data.aps");
    // FCM recipients of the same batch are not affected.
    let f = fcm(&t, &recipient(Platform::Fcm, FCM_TOKEN, &[])).unwrap();
    assert_eq!(value(&f.body)["message"]["data"], json!({"aps": "x"}));
    // deep_link collides only when the template sets a deep link.
    let mut tpl = Template {
        title: "x".into(),
        data: data(&[("deep_link", "app://x")]),
        ..Template::default()
    };
    let t = CompiledTemplate::compile(&tpl).unwrap();
    let a = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap();
    assert_eq!(value(&a.payload)["deep_link"], "app://x");
    tpl.deep_link = "app://y".into();
    let t = CompiledTemplate::compile(&tpl).unwrap();
    let e = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap_err();
    assert_eq!(e.field, "template.data.deep_link");
}

#[test]
fn collapse_key_limit() {
    let ok = Template {
        collapse_key: "k".repeat(64),
        ..Template::default()
    };
    assert!(CompiledTemplate::compile(&ok).is_ok());
    let bad = Template {
        collapse_key: "é".repeat(33),
        ..Template::default()
    };
    assert_eq!(
        CompiledTemplate::compile(&bad).unwrap_err(),
        err(
            "template.collapse_key",
            "collapse key is 66 bytes; the limit is 64 (APNs apns-collapse-id)"
        )
    );
}

#[test]
fn apns_token_validation() {
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        ..Template::default()
    })
    .unwrap();
    let long_ok = "ab".repeat(100);
    let upper = TOKEN.to_ascii_uppercase();
    for token in [TOKEN, long_ok.as_str(), upper.as_str(), "00"] {
        assert!(
            apns(&t, &recipient(Platform::Apns, token, &[])).is_ok(),
            "{token}"
        );
    }
    let too_long = "ab".repeat(101);
    for (token, reason) in [
        ("", "device token is empty"),
        ("abc", "device token has an odd number of hex digits (3)"),
        ("zz", "device token must be hexadecimal; found `z`"),
        ("<abcd ef>", "device token must be hexadecimal; found `<`"),
        (
            too_long.as_str(),
            "device token is 202 characters; the limit is 200",
        ),
    ] {
        let e = t.render(
            &recipient(Platform::Apns, token, &[]),
            6,
            &meta("m"),
            &ctx(),
        );
        assert_eq!(e.unwrap_err(), err("recipients[6].device_token", reason));
    }
}

#[test]
fn apns_topic_and_id() {
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        ..Template::default()
    })
    .unwrap();
    let r = recipient(Platform::Apns, TOKEN, &[]);
    let no_topic = RenderContext {
        apns_topic: String::new(),
        analytics_label: None,
    };
    let e = t.render(&r, 0, &meta("m"), &no_topic).unwrap_err();
    assert_eq!(e.field, "app.apns_topic");
    let a = match t.render(&r, 0, &meta("not-a-uuid"), &ctx()).unwrap() {
        ProviderRequest::Apns(a) => a,
        ProviderRequest::Fcm(_) => unreachable!(),
    };
    // A message id that is not a canonical UUID gets a fresh one.
    assert_eq!(a.apns_id.get_version_num(), 4);
    assert_ne!(a.apns_id, sanitize_apns_id("not-a-uuid"), "fresh each time");
    let upper = "7C9E6679-7425-40DE-944B-E07FC1F90AE7";
    assert_eq!(
        sanitize_apns_id(upper).hyphenated().to_string(),
        upper.to_ascii_lowercase()
    );
    let braced = "{7c9e6679-7425-40de-944b-e07fc1f90ae7}";
    assert_ne!(
        sanitize_apns_id(braced),
        sanitize_apns_id(&braced[1..37]),
        "only the canonical 36-character form is kept"
    );
}

#[test]
fn apns_static_cache_matches_uncached_path() {
    let tpl = Template {
        title: "Static".into(),
        body: "Body".into(),
        data: data(&[("a", "b")]),
        apns_json: r#"{"aps":{"relevance-score":0.5}}"#.into(),
        ..Template::default()
    };
    let t = CompiledTemplate::compile(&tpl).unwrap();
    assert!(t.apns_cached.is_some());
    let cached = apns(&t, &recipient(Platform::Apns, TOKEN, &[])).unwrap();
    let mut r = recipient(Platform::Apns, TOKEN, &[]);
    r.title = Some("Static".into());
    let fresh = apns(&t, &r).unwrap();
    assert_eq!(cached.payload, fresh.payload);
    assert_eq!(
        (cached.priority, cached.push_type),
        (fresh.priority, fresh.push_type)
    );
}

#[test]
fn fcm_alert_exact_body() {
    let t = CompiledTemplate::compile(&alert_template()).unwrap();
    let r = recipient(
        Platform::Fcm,
        FCM_TOKEN,
        &[("first_name", "Ada"), ("order", "42")],
    );
    let f = fcm(&t, &r).unwrap();
    assert_eq!(f.device_token, FCM_TOKEN);
    assert_eq!(
        text(&f.body),
        concat!(
            r#"{"message":{"token":"fcm-token_1:APA91b.xyz","#,
            r#""notification":{"title":"Hi Ada","body":"Your order shipped","image":"https://img.example/o.png"},"#,
            r#""data":{"kind":"shipping","order_id":"42"},"#,
            r#""android":{"priority":"HIGH","ttl":"3600s","collapse_key":"order-42","notification":{"channel_id":"orders","click_action":"app://orders/42","sound":"default","tag":"order-42"}},"#,
            r#""apns":{"headers":{"apns-priority":"10","apns-push-type":"alert","apns-expiration":"1700003600","apns-collapse-id":"order-42"},"#,
            r#""payload":{"aps":{"alert":{"subtitle":"Order 42"},"badge":3,"sound":"default","thread-id":"orders","category":"ORDER","mutable-content":1},"deep_link":"app://orders/42"},"#,
            r#""fcm_options":{"image":"https://img.example/o.png"}},"#,
            r#""fcm_options":{"analytics_label":"spring-sale"}}}"#
        )
    );
}

#[test]
fn fcm_data_only_background() {
    let t = CompiledTemplate::compile(&Template {
        content_available: true,
        data: data(&[("sync", "{{ what }}")]),
        deep_link: "app://x".into(),
        android_channel_id: "c".into(),
        priority: Priority::High,
        ..Template::default()
    })
    .unwrap();
    let f = fcm(
        &t,
        &recipient(Platform::Fcm, FCM_TOKEN, &[("what", "inbox")]),
    )
    .unwrap();
    assert_eq!(
        value(&f.body),
        json!({"message": {
            "token": FCM_TOKEN,
            "data": {"sync": "inbox"},
            "android": {"priority": "HIGH"},
            "apns": {
                "headers": {"apns-priority": "5", "apns-push-type": "background"},
                "payload": {"aps": {"content-available": 1}, "deep_link": "app://x"}
            },
            "fcm_options": {"analytics_label": "spring-sale"}
        }})
    );
    // Default priority without a notification is NORMAL.
    let t = CompiledTemplate::compile(&Template {
        content_available: true,
        ..Template::default()
    })
    .unwrap();
    let f = fcm(&t, &recipient(Platform::Fcm, FCM_TOKEN, &[])).unwrap();
    assert_eq!(
        value(&f.body)["message"]["android"],
        json!({"priority": "NORMAL"})
    );
}

#[test]
fn fcm_data_must_stay_strings_after_merge() {
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        data: data(&[("a", "b")]),
        fcm_json: r#"{"android":{"direct_boot_ok":true,"data":{"x":"y"}}}"#.into(),
        ..Template::default()
    })
    .unwrap();
    let mut r = recipient(Platform::Fcm, FCM_TOKEN, &[]);
    r.fcm_json = r#"{"data":{"count":3}}"#.into();
    let e = t.render(&r, 3, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "recipients[3].fcm_json: message.data.count must be a string"
    );
    r.fcm_json = r#"{"android":{"data":{"n":null}}}"#.into();
    let e = t.render(&r, 3, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(e.reason, "message.android.data.n must be a string");
    r.fcm_json = r#"{"data":{"google.x":"1"}}"#.into();
    let e = t.render(&r, 3, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(
        e.reason,
        "message.data.google.x is reserved by FCM (from, message_type, google*, gcm*)"
    );
    r.fcm_json = r#"{"topic":"all"}"#.into();
    let e = t.render(&r, 3, &meta("m"), &ctx()).unwrap_err();
    assert_eq!(e.field, "recipients[3].fcm_json");
    r.fcm_json = r#"{"token":"other"}"#.into();
    assert!(t.render(&r, 3, &meta("m"), &ctx()).is_err());
    r.fcm_json = r#"{"data":{"count":"3"},"android":{"priority":"normal"}}"#.into();
    let f = fcm(&t, &r).unwrap();
    let v = value(&f.body);
    assert_eq!(v["message"]["data"], json!({"a": "b", "count": "3"}));
    assert_eq!(v["message"]["android"]["priority"], "normal");
    assert_eq!(v["message"]["android"]["direct_boot_ok"], true);
    assert_eq!(v["message"]["android"]["data"], json!({"x": "y"}));
    let bad = CompiledTemplate::compile(&Template {
        fcm_json: r#"{"android":{"data":{"n":1}}}"#.into(),
        ..Template::default()
    })
    .unwrap();
    let e = fcm(&bad, &recipient(Platform::Fcm, FCM_TOKEN, &[])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "template.fcm_json: message.android.data.n must be a string"
    );
}

#[test]
fn fcm_reserved_keys_and_ttl_are_fcm_only() {
    for key in ["from", "message_type", "google.c.a", "gcm.n.e", "GoogleX"] {
        let t = CompiledTemplate::compile(&Template {
            title: "x".into(),
            data: data(&[(key, "v")]),
            ..Template::default()
        })
        .unwrap();
        let e = fcm(&t, &recipient(Platform::Fcm, FCM_TOKEN, &[])).unwrap_err();
        assert_eq!(e.field, format!("template.data.{key}"));
        assert!(apns(&t, &recipient(Platform::Apns, TOKEN, &[])).is_ok());
    }
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        data: data(&[("collapse_key", "v"), ("fromage", "v")]),
        ttl: Some(Duration::from_secs(MAX_FCM_TTL_SECS + 1)),
        ..Template::default()
    })
    .unwrap();
    let e = fcm(&t, &recipient(Platform::Fcm, FCM_TOKEN, &[])).unwrap_err();
    assert_eq!(
        e,
        err(
            "template.ttl_seconds",
            "ttl is 2419201 s; FCM allows at most 2419200 s (4 weeks)"
        )
    );
    assert!(apns(&t, &recipient(Platform::Apns, TOKEN, &[])).is_ok());
}

#[test]
fn fcm_token_validation() {
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        ..Template::default()
    })
    .unwrap();
    let max = "a".repeat(4096);
    assert!(fcm(&t, &recipient(Platform::Fcm, &max, &[])).is_ok());
    let over = "a".repeat(4097);
    for (token, reason) in [
        ("", "device token is empty".to_owned()),
        (
            over.as_str(),
            "device token is 4097 characters; the limit is 4096".to_owned(),
        ),
        (
            "abc def",
            "device token contains ` `; allowed are letters, digits, `_`, `:`, `-` and `.`"
                .to_owned(),
        ),
        (
            "a/b",
            "device token contains `/`; allowed are letters, digits, `_`, `:`, `-` and `.`"
                .to_owned(),
        ),
    ] {
        let e = t.render(&recipient(Platform::Fcm, token, &[]), 2, &meta("m"), &ctx());
        assert_eq!(e.unwrap_err(), err("recipients[2].device_token", &reason));
    }
}

#[test]
fn fcm_size_limit_excludes_the_token() {
    let tpl = |n: usize| {
        CompiledTemplate::compile(&Template {
            body: "x".repeat(n),
            ..Template::default()
        })
        .unwrap()
    };
    let small = fcm(&tpl(1), &recipient(Platform::Fcm, FCM_TOKEN, &[])).unwrap();
    let overhead = small.body.len() - FCM_TOKEN.len() - 1;
    // A body that fills the limit exactly passes, one more byte fails; a long token is free.
    let long_token = "t".repeat(3000);
    let at_limit = tpl(MAX_FCM_PAYLOAD_BYTES - overhead);
    let f = fcm(&at_limit, &recipient(Platform::Fcm, &long_token, &[])).unwrap();
    assert_eq!(f.body.len() - long_token.len(), MAX_FCM_PAYLOAD_BYTES);
    let over = tpl(MAX_FCM_PAYLOAD_BYTES - overhead + 1);
    let e = over
        .render(
            &recipient(Platform::Fcm, FCM_TOKEN, &[]),
            8,
            &meta("m"),
            &ctx(),
        )
        .unwrap_err();
    assert_eq!(
        e,
        err(
            "recipients[8].payload",
            "FCM message is 4097 bytes (without the token); the limit is 4096"
        )
    );
}

#[test]
fn analytics_label_sanitation() {
    assert_eq!(
        sanitize_analytics_label("spring-sale_2026.v1~%").as_deref(),
        Some("spring-sale_2026.v1~%")
    );
    assert!(matches!(
        sanitize_analytics_label("ok"),
        Some(Cow::Borrowed("ok"))
    ));
    assert_eq!(
        sanitize_analytics_label("Summer sale/é").as_deref(),
        Some("Summer%20sale%2F%C3%A9")
    );
    assert_eq!(sanitize_analytics_label(""), None);
    let sixty = "a".repeat(60);
    let long = sanitize_analytics_label(&sixty).unwrap();
    assert_eq!(long.len(), 50);
    // An escape is never split by the cut.
    let spaced = format!("{} x", "a".repeat(48));
    let cut = sanitize_analytics_label(&spaced).unwrap();
    assert_eq!(cut, "a".repeat(48));
    let t = CompiledTemplate::compile(&Template {
        title: "x".into(),
        ..Template::default()
    })
    .unwrap();
    let r = recipient(Platform::Fcm, FCM_TOKEN, &[]);
    let no_label = RenderContext {
        analytics_label: None,
        ..ctx()
    };
    let f = match t.render(&r, 0, &meta("m"), &no_label).unwrap() {
        ProviderRequest::Fcm(f) => f,
        ProviderRequest::Apns(_) => unreachable!(),
    };
    assert!(value(&f.body)["message"].get("fcm_options").is_none());
}

fn label_is_valid(label: &str) -> bool {
    (1..=50).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b))
}

// ---- property tests over whole renders -------------------------------------------------------

fn small_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        2 => "[a-zA-Z \"\\\\é]{1,12}",
        2 => Just("Hi {{ name | default: 'you' }}".to_owned()),
        1 => Just("{{ name }} {{ other }}".to_owned()),
        1 => (1usize..3000).prop_map(|n| "y".repeat(n)),
    ]
}

fn push_type() -> impl Strategy<Value = Option<PushType>> {
    proptest::option::of(prop_oneof![
        Just(PushType::Alert),
        Just(PushType::Background),
        Just(PushType::Voip),
        Just(PushType::LiveActivity),
    ])
}

fn override_json() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just(String::new()),
        1 => Just(r#"{"aps":{"alert":{"title":"o"}}}"#.to_owned()),
        1 => Just(r#"{"aps":{"content-available":1},"x":{"y":[1,2]}}"#.to_owned()),
        1 => Just(r#"{"aps":5}"#.to_owned()),
        1 => Just(r#"{"data":{"n":1}}"#.to_owned()),
        1 => Just(r#"{"data":{"n":"1"},"android":{"ttl":"5s"}}"#.to_owned()),
        1 => Just("not json".to_owned()),
    ]
}

prop_compose! {
    fn arb_template()(
        (title, subtitle, body) in (small_text(), small_text(), small_text()),
        sound in prop_oneof![3 => Just(String::new()), 1 => Just("default".to_owned())],
        badge in proptest::option::weighted(0.25, 0u32..100),
        push_type in push_type(),
        content_available in any::<bool>(),
        mutable_content in any::<bool>(),
        priority in prop_oneof![Just(Priority::Default), Just(Priority::Normal), Just(Priority::High)],
        data in proptest::collection::btree_map("[a-z_]{1,8}", small_text(), 0..3),
        (apns_json, fcm_json) in (override_json(), override_json()),
        image_url in prop_oneof![Just(String::new()), Just("https://i".to_owned())],
        ttl in proptest::option::of(0u64..3_000_000),
        blank in proptest::bool::weighted(0.3),
    ) -> Template {
        // Blank out the visible fields now and then, so background pushes are well represented.
        let (title, subtitle, body, sound, badge) = if blank {
            Default::default()
        } else {
            (title, subtitle, body, sound, badge)
        };
        Template {
            title, subtitle, body, sound, badge, push_type, content_available, mutable_content,
            priority, data, apns_json, fcm_json, image_url,
            ttl: ttl.map(Duration::from_secs),
            ..Template::default()
        }
    }
}

prop_compose! {
    fn arb_recipient()(
        name in proptest::option::weighted(0.8, "[a-z{} ]{0,8}"),
        other in proptest::option::weighted(0.8, "[a-z{} ]{0,8}"),
        title in proptest::option::weighted(0.2, small_text()),
        apns_json in override_json(),
        fcm_json in override_json(),
    ) -> (BTreeMap<String, String>, Option<String>, String, String) {
        let vars = [("name", name), ("other", other)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect();
        (vars, title, apns_json, fcm_json)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_successful_apns_render_is_valid(tpl in arb_template(), (vars, title, aj, _) in arb_recipient()) {
        let Ok(t) = CompiledTemplate::compile(&tpl) else { return Ok(()) };
        let mut r = recipient(Platform::Apns, TOKEN, &[]);
        r.vars = vars;
        r.title = title;
        r.apns_json = aj;
        let Ok(ProviderRequest::Apns(a)) = t.render(&r, 0, &meta("m"), &ctx()) else { return Ok(()) };
        prop_assert!(a.payload.len() <= a.push_type.max_payload_bytes());
        let v: Value = serde_json::from_slice(&a.payload)
            .map_err(|e| TestCaseError::fail(format!("invalid JSON: {e}")))?;
        let aps = v.get("aps").and_then(Value::as_object);
        prop_assert!(aps.is_some(), "aps missing or not an object: {}", v);
        prop_assert!(a.topic.starts_with(b"com.example.app"));
        prop_assert!(a.topic.ends_with(a.push_type.topic_suffix().as_bytes()));
        if a.push_type == PushType::Background {
            prop_assert_eq!(&v["aps"], &json!({"content-available": 1}));
            prop_assert_eq!(a.priority, 5);
        }
        // Output never carries an unrendered tag (values here have no `{{`).
        if !r.vars.values().any(|v| v.contains('{')) {
            prop_assert!(!text(&a.payload).contains("{{"));
        }
    }

    #[test]
    fn any_successful_fcm_render_is_valid(
        tpl in arb_template(),
        (vars, title, _, fj) in arb_recipient(),
        label in proptest::option::of("\\PC{0,80}"),
    ) {
        let Ok(t) = CompiledTemplate::compile(&tpl) else { return Ok(()) };
        let mut r = recipient(Platform::Fcm, FCM_TOKEN, &[]);
        r.vars = vars;
        r.title = title;
        r.fcm_json = fj;
        let ctx = RenderContext { analytics_label: label, ..ctx() };
        let Ok(ProviderRequest::Fcm(f)) = t.render(&r, 0, &meta("m"), &ctx) else { return Ok(()) };
        prop_assert!(f.body.len() - FCM_TOKEN.len() <= MAX_FCM_PAYLOAD_BYTES);
        let v: Value = serde_json::from_slice(&f.body)
            .map_err(|e| TestCaseError::fail(format!("invalid JSON: {e}")))?;
        let m = &v["message"];
        prop_assert_eq!(&m["token"], FCM_TOKEN);
        for data in [&m["data"], &m["android"]["data"]] {
            if let Some(map) = data.as_object() {
                prop_assert!(map.values().all(Value::is_string), "{}", v);
            }
        }
        if let Some(label) = m["fcm_options"]["analytics_label"].as_str() {
            prop_assert!(label_is_valid(label), "{}", label);
        }
        if m.get("notification").is_none() {
            prop_assert!(m["android"].get("notification").is_none());
        }
    }
}
