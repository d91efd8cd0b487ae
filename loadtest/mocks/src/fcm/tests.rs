//! Unit tests of the mock FCM's parsing helpers and validators.

use super::reply::*;
use super::validate::*;
use super::*;

#[test]
fn durations() {
    assert_eq!(parse_duration("3600s"), Some(3600.0));
    assert_eq!(parse_duration("3.000000001s"), Some(3.000000001));
    assert_eq!(parse_duration("0s"), Some(0.0));
    for bad in ["3600", "1h", "s", ".5s", "1.s", "-1s", "1.0000000001s", ""] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn form_decoding() {
    assert_eq!(
        form_decode("urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"),
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert_eq!(form_decode("a+b%2"), "a b%2");
    assert_eq!(form_decode("%zz%"), "%zz%");
}

#[test]
fn camel_case_alias() {
    let m: Map<String, Value> =
        serde_json::from_str(r#"{"validateOnly":true,"fcmOptions":{}}"#).unwrap();
    assert_eq!(field(&m, "validate_only"), Some(&Value::Bool(true)));
    assert!(field(&m, "fcm_options").is_some());
    assert!(field(&m, "direct_boot_ok").is_none());
}

/// Whatever the fast path accepts, the `Value` path accepts with the same targets; the
/// shapes clients send do take the fast path.
#[test]
fn fast_path_accepts_only_what_the_value_path_accepts() {
    let common = [
        r#"{"message":{"token":"t1","notification":{"title":"Hi","body":"x"},"data":{"screen":"cart"},"android":{"priority":"HIGH","notification":{"sound":"default"}},"fcm_options":{"analytics_label":"l"}}}"#,
        r#"{"message":{"topic":"news","data":null,"android":{"ttl":"3600s","priority":"normal","data":{"a":"b"}}}}"#,
        r#"{"validateOnly":true,"message":{"condition":"'a' in topics","apns":{"payload":{"aps":{}}}}}"#,
        r#"{"validate_only":null,"message":{"fid":"f","fcmOptions":{},"name":"n"}}"#,
        " {\"message\" : {\"token\":\"t\"}}\n",
    ];
    for b in common {
        assert!(validate_send_fast(b.as_bytes()).is_some(), "{b}");
    }
    let unusual = [
        r#"{"message":{"token":"t","token":null}}"#,
        r#"{"message":{"token":"t"},"message":{"token":"u"}}"#,
        r#"{"message":{"token":"t\u0031"}}"#,
        r#"{"message":{"tok\u0065n":"t"}}"#,
        r#"{"validate_only":true,"validateOnly":false,"message":{"token":"t"}}"#,
        r#"{"validate_only":1,"message":{"token":"t"}}"#,
        r#"{"message":{"token":"t","topic":"u"}}"#,
        r#"{"message":{"token":"t","fid":null,"topic":null}}"#,
        r#"{"message":{}}"#,
        r#"{"message":null}"#,
        r#"{"message":[]}"#,
        r#"{"message":["t"]}"#,
        r#"{}"#,
        r#"[]"#,
        r#"{"message":{"token":7}}"#,
        r#"{"message":{"token":"t","extra":1}}"#,
        r#"{"message":{"token":"t"},"extra":1}"#,
        r#"{"message":{"token":"t","data":{"a":1}}}"#,
        r#"{"message":{"token":"t","data":{"a":1,"a":"x"}}}"#,
        r#"{"message":{"token":"t","data":[]}}"#,
        r#"{"message":{"token":"t","data":{"a":"\u00e9"}}}"#,
        r#"{"message":{"token":"t","android":{"ttl":"1h"}}}"#,
        r#"{"message":{"token":"t","android":{"ttl":null}}}"#,
        r#"{"message":{"token":"t","android":{"ttl":"9999999s"}}}"#,
        r#"{"message":{"token":"t","android":{"ttl":"1s","ttl":"2s"}}}"#,
        r#"{"message":{"token":"t","android":{"priority":"urgent"}}}"#,
        r#"{"message":{"token":"t","android":{"priority":"High","x":[1,{"y":2}]}}}"#,
        r#"{"message":{"token":"t","android":{"data":{"k":2}}}}"#,
        r#"{"message":{"token":"t","android":7}}"#,
        r#"{"message":{"token":"t","android":null}}"#,
        r#"{"message":{"token":"t","webpush":{"data":{"k":"v"}}}}"#,
        r#"{"message":{"token":"t","webpush":7}}"#,
        r#"{"message":{"token":"t","webpush":{"data":{"k":false}}}}"#,
        r#"{"message":{"token":"t","webpush":[1,2,{"data":1}]}}"#,
        r#"{"message":{"token":"t","webpush":{"da\u0074a":{"k":1}}}}"#,
        r#"{"message":{"token":"t","notification":{"title":1e400}}}"#,
        r#"{"message":{"token":"t","notification":{"title":"\ud800"}}}"#,
        r#"{"message":{"token":"t"}} trailing"#,
        r#"{"message":{"token":"t"},}"#,
        "",
    ];
    let big = json!({"message": {"token": "t".repeat(5000), "data": {"k": "v"}}}).to_string();
    let too_big = json!({"message": {"topic": "t".repeat(5000)}}).to_string();
    for b in unusual
        .iter()
        .copied()
        .chain(common)
        .chain([big.as_str(), too_big.as_str()])
    {
        let Some(fast) = validate_send_fast(b.as_bytes()) else {
            continue;
        };
        match validate_send_slow(b.as_bytes()) {
            Ok(slow) => {
                assert_eq!(fast.token, slow.token.as_deref(), "{b}");
                assert_eq!(fast.topic, slow.topic.as_deref(), "{b}");
                assert_eq!(fast.condition, slow.condition.as_deref(), "{b}");
                assert_eq!(fast.validate_only, slow.validate_only, "{b}");
            }
            Err(e) => panic!(
                "fast path accepted what the Value path refuses: {b}: {}",
                e.message
            ),
        }
    }
    assert!(validate_send_fast(big.as_bytes()).is_some());
    assert!(validate_send_fast(too_big.as_bytes()).is_none());
    // Invalid UTF-8, in a target and in a skipped field: both paths refuse it.
    for b in [
        &b"{\"message\":{\"token\":\"\xff\"}}"[..],
        &b"{\"message\":{\"token\":\"t\",\"name\":\"\xc3\"}}"[..],
    ] {
        assert!(validate_send_fast(b).is_none());
        assert!(validate_send_slow(b).is_err());
    }
}

#[test]
fn accepted_name_body_is_what_json_renders() {
    let mut buf = [0u8; 48];
    assert_eq!(
        message_id(1_700_000_000_123, 255, &mut buf),
        "0:1700000000123%00000000000000ff"
    );
    for (millis, seq) in [(0, 0), (-5, 1), (i64::MIN, u64::MAX), (i64::MAX, 1 << 63)] {
        let expected = format!("0:{millis}%{seq:016x}");
        assert_eq!(message_id(millis, seq, &mut buf), expected);
    }
}

#[test]
fn size_limit_excludes_the_token() {
    let token = "t".repeat(5000);
    let body = json!({"message": {"token": token}}).to_string();
    assert!(validate_send(body.as_bytes(), true).is_ok());
    let body = json!({"message": {"topic": "x".repeat(5000)}}).to_string();
    let err = validate_send(body.as_bytes(), true).err().unwrap();
    assert!(err.details.is_empty());
}
