//! Drives the mock APNs with a raw h2 client and real ES256 JWTs.

use std::time::Duration;

use crate::client::{Client, Resp, connect, now_secs, send_on};
use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushgate_mocks::apns::{ApnsReason, BadEnvironmentSpelling, MockApns, MockApnsConfig};
use pushgate_mocks::keys::{ApnsKey, generate_apns_key};

const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const TOPIC: &str = "com.example.app";

fn jwt(key: &ApnsKey, iat: i64) -> String {
    jwt_with(key, &key.key_id, &key.team_id, iat, Algorithm::ES256)
}

fn jwt_with(key: &ApnsKey, kid: &str, iss: &str, iat: i64, alg: Algorithm) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    let claims = serde_json::json!({"iss": iss, "iat": iat});
    let enc = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(key.private_p8_pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_secret(b"secret"),
    };
    jsonwebtoken::encode(&header, &claims, &enc).unwrap()
}

async fn start(key: &ApnsKey, tls: bool) -> MockApns {
    let mut cfg = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    cfg.tls = tls;
    cfg.topics = vec![TOPIC.to_string()];
    MockApns::start(cfg).await.unwrap()
}

/// A push request with sane defaults; `f` edits the builder.
fn push(c: &Client, jwt: &str, path: &str) -> http::request::Builder {
    c.req("POST", path)
        .header("authorization", format!("bearer {jwt}"))
        .header("apns-topic", TOPIC)
        .header("apns-push-type", "alert")
}

fn reason(r: &Resp) -> String {
    r.json()["reason"].as_str().unwrap().to_string()
}

const ALERT: &[u8] = br#"{"aps":{"alert":"hi"}}"#;

#[tokio::test]
async fn valid_request_is_accepted_recorded_and_jwt_verified_once() {
    let key = generate_apns_key();
    let mock = start(&key, true).await;
    assert!(mock.url().starts_with("https://127.0.0.1:"));
    let mut c = connect(&mock.url(), mock.ca_pem().as_deref()).await;
    let j = jwt(&key, now_secs());
    let id = "eabeae54-14a8-11e5-b60b-1697f925ec7b";
    let req = push(&c, &j, &format!("/3/device/{TOKEN}"))
        .header("apns-id", id)
        .header("apns-priority", "5")
        .header("apns-expiration", (now_secs() + 3600).to_string())
        .header("apns-collapse-id", "c1")
        .body(())
        .unwrap();
    let r = c.send(req, ALERT).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["apns-id"], id);
    assert!(r.body.is_empty());
    // Second request without apns-id: one is generated.
    let req = push(&c, &j, &format!("/3/device/{TOKEN}"))
        .body(())
        .unwrap();
    let r = c.send(req, ALERT).await.unwrap();
    assert_eq!(r.status, 200);
    let generated = r.headers["apns-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36);

    let acc = mock.accepted();
    assert_eq!(acc.len(), 2);
    assert_eq!(acc[0].device_token, TOKEN);
    assert_eq!(acc[0].topic, TOPIC);
    assert_eq!(acc[0].push_type, "alert");
    assert_eq!(acc[0].priority, 5);
    assert_eq!(acc[0].collapse_id.as_deref(), Some("c1"));
    assert_eq!(acc[0].apns_id, id);
    assert_eq!(acc[0].payload["aps"]["alert"], "hi");
    assert_eq!(acc[1].priority, 10);
    assert_eq!(acc[1].apns_id, generated);
    let s = mock.stats();
    assert_eq!(s.accepted, 2);
    assert_eq!(s.status(200), 2);
    assert_eq!(s.jwt_verifications, 1, "the JWT verdict is cached");
    assert_eq!(s.connections_opened, 1);
    mock.shutdown().await;
}

#[tokio::test]
async fn each_check_answers_the_documented_status_and_reason() {
    let key = generate_apns_key();
    let mock = start(&key, false).await;
    let mut c = connect(&mock.url(), None).await;
    let now = now_secs();
    let j = jwt(&key, now);
    let p = format!("/3/device/{TOKEN}");
    // Authorize the connection first so stream refusal never interferes.
    let r = c
        .send(push(&c, &j, &p).body(()).unwrap(), ALERT)
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let other = generate_apns_key();
    let big = format!(r#"{{"aps":{{"alert":"{}"}}}}"#, "x".repeat(4100));
    let voip_ok = format!(r#"{{"aps":{{}},"x":"{}"}}"#, "x".repeat(5000));
    let cases: Vec<(&str, http::request::Builder, Vec<u8>, u16, &str)> = vec![
        (
            "GET",
            c.req("GET", "/").header("apns-topic", TOPIC),
            vec![],
            405,
            "MethodNotAllowed",
        ),
        (
            "bad apns-id",
            push(&c, &j, &p).header("apns-id", "not-a-uuid"),
            ALERT.to_vec(),
            400,
            "BadMessageId",
        ),
        (
            "uppercase apns-id",
            push(&c, &j, &p).header("apns-id", "EABEAE54-14A8-11E5-B60B-1697F925EC7B"),
            ALERT.to_vec(),
            400,
            "BadMessageId",
        ),
        (
            "bad apns-id wins over method",
            c.req("GET", &p).header("apns-id", "x"),
            vec![],
            400,
            "BadMessageId",
        ),
        (
            "missing topic",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}")),
            ALERT.to_vec(),
            400,
            "MissingTopic",
        ),
        (
            "collapse id 65 bytes",
            push(&c, &j, &p).header("apns-collapse-id", "c".repeat(65)),
            ALERT.to_vec(),
            400,
            "BadCollapseId",
        ),
        (
            "priority 7",
            push(&c, &j, &p).header("apns-priority", "7"),
            ALERT.to_vec(),
            400,
            "BadPriority",
        ),
        (
            "unknown push type",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "banana"),
            ALERT.to_vec(),
            400,
            "InvalidPushType",
        ),
        (
            "voip without .voip topic",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "voip"),
            ALERT.to_vec(),
            400,
            "BadTopic",
        ),
        (
            "topic not allowed",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", "com.other.app"),
            ALERT.to_vec(),
            400,
            "TopicDisallowed",
        ),
        (
            "empty token",
            push(&c, &j, "/3/device/"),
            ALERT.to_vec(),
            400,
            "MissingDeviceToken",
        ),
        (
            "bad path",
            push(&c, &j, "/4/device/abcd"),
            ALERT.to_vec(),
            404,
            "BadPath",
        ),
        (
            "non-hex token",
            push(&c, &j, "/3/device/zz12"),
            ALERT.to_vec(),
            400,
            "BadDeviceToken",
        ),
        (
            "odd-length token",
            push(&c, &j, "/3/device/abc"),
            ALERT.to_vec(),
            400,
            "BadDeviceToken",
        ),
        (
            "relative expiration",
            push(&c, &j, &p).header("apns-expiration", "300"),
            ALERT.to_vec(),
            400,
            "BadExpirationDate",
        ),
        (
            "garbage expiration",
            push(&c, &j, &p).header("apns-expiration", "soon"),
            ALERT.to_vec(),
            400,
            "BadExpirationDate",
        ),
        (
            "no authorization",
            c.req("POST", &p).header("apns-topic", TOPIC),
            ALERT.to_vec(),
            403,
            "MissingProviderToken",
        ),
        (
            "not bearer",
            c.req("POST", &p)
                .header("apns-topic", TOPIC)
                .header("authorization", j.clone()),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "garbage jwt",
            push(&c, "a.b.c", &p),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "HS256",
            push(
                &c,
                &jwt_with(&key, &key.key_id, &key.team_id, now, Algorithm::HS256),
                &p,
            ),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "unknown kid",
            push(
                &c,
                &jwt_with(&other, &other.key_id, &key.team_id, now, Algorithm::ES256),
                &p,
            ),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "bad signature",
            push(
                &c,
                &jwt_with(&other, &key.key_id, &key.team_id, now, Algorithm::ES256),
                &p,
            ),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "wrong team",
            push(
                &c,
                &jwt_with(&key, &key.key_id, "OTHERTEAM1", now, Algorithm::ES256),
                &p,
            ),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "iat in the future",
            push(&c, &jwt(&key, now + 600), &p),
            ALERT.to_vec(),
            403,
            "InvalidProviderToken",
        ),
        (
            "iat too old",
            push(&c, &jwt(&key, now - 3700), &p),
            ALERT.to_vec(),
            403,
            "ExpiredProviderToken",
        ),
        (
            "new JWT within 20 min",
            push(&c, &jwt(&key, now - 1), &p),
            ALERT.to_vec(),
            429,
            "TooManyProviderTokenUpdates",
        ),
        ("empty body", push(&c, &j, &p), vec![], 400, "PayloadEmpty"),
        (
            "too large",
            push(&c, &j, &p),
            big.clone().into_bytes(),
            413,
            "PayloadTooLarge",
        ),
        (
            "not JSON",
            push(&c, &j, &p),
            b"hello".to_vec(),
            400,
            "BadRequestPayload",
        ),
        (
            "JSON array",
            push(&c, &j, &p),
            b"[1]".to_vec(),
            400,
            "BadRequestPayload",
        ),
        (
            "background at priority 10",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "background"),
            br#"{"aps":{"content-available":1}}"#.to_vec(),
            400,
            "BadPriority",
        ),
        (
            "background with alert",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "background")
                .header("apns-priority", "5"),
            br#"{"aps":{"content-available":1,"alert":"x"}}"#.to_vec(),
            400,
            "BadPriority",
        ),
        (
            "duplicate topic",
            push(&c, &j, &p).header("apns-topic", TOPIC),
            ALERT.to_vec(),
            400,
            "DuplicateHeaders",
        ),
    ];
    for (name, builder, body, status, expected) in cases {
        let r = c.send(builder.body(()).unwrap(), &body).await.unwrap();
        assert_eq!(r.status.as_u16(), status, "{name}");
        assert_eq!(r.headers["content-type"], "application/json", "{name}");
        assert!(r.headers.contains_key("apns-id"), "{name}");
        assert_eq!(reason(&r), expected, "{name}");
    }
    // Passing variants.
    let ok: Vec<(&str, http::request::Builder, Vec<u8>)> = vec![
        (
            "voip 5000 bytes",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", "com.example.app.voip")
                .header("apns-push-type", "voip"),
            voip_ok.into_bytes(),
        ),
        (
            "background done right",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "background")
                .header("apns-priority", "5"),
            br#"{"aps":{"content-available":1},"k":"v"}"#.to_vec(),
        ),
        (
            "expiration 0",
            push(&c, &j, &p)
                .header("apns-expiration", "0")
                .header("apns-priority", "1"),
            ALERT.to_vec(),
        ),
        (
            "liveactivity suffix",
            c.req("POST", &p)
                .header("authorization", format!("bearer {j}"))
                .header("apns-topic", "com.example.app.push-type.liveactivity")
                .header("apns-push-type", "liveactivity"),
            ALERT.to_vec(),
        ),
    ];
    for (name, builder, body) in ok {
        let r = c.send(builder.body(()).unwrap(), &body).await.unwrap();
        assert_eq!(r.status, 200, "{name}: {:?}", r.body);
    }
    let s = mock.stats();
    assert_eq!(s.reason("BadMessageId"), 3);
    assert_eq!(s.status(403), 9);
    assert_eq!(s.accepted, 5);

    // After 20 minutes a new JWT is accepted on the same connection.
    mock.faults().advance_clock(Duration::from_secs(1201));
    let r = c
        .send(
            push(&c, &jwt(&key, now + 1200), &p).body(()).unwrap(),
            ALERT,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // And an hour later the (old) JWT is expired.
    mock.faults().advance_clock(Duration::from_secs(3600));
    let r = c
        .send(
            push(&c, &jwt(&key, now + 1200), &p).body(()).unwrap(),
            ALERT,
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (403, "ExpiredProviderToken")
    );
}

#[tokio::test]
async fn unregistered_carries_a_millisecond_timestamp_and_bad_tokens_are_rejected() {
    let key = generate_apns_key();
    let mock = start(&key, false).await;
    let mut c = connect(&mock.url(), None).await;
    let j = jwt(&key, now_secs());
    let dead = "00ff00ff";
    let fixed = "0123abcd";
    mock.faults().add_unregistered(dead, None);
    mock.faults()
        .add_unregistered(fixed, Some(1_700_000_000_000));
    mock.faults().add_bad_device_token("beef");
    let r = c
        .send(
            push(&c, &j, &format!("/3/device/{dead}")).body(()).unwrap(),
            ALERT,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 410);
    let v = r.json();
    assert_eq!(v["reason"], "Unregistered");
    let ts = v["timestamp"].as_i64().unwrap();
    assert!(
        (ts - now_secs() * 1000).abs() < 60_000,
        "milliseconds, not seconds: {ts}"
    );
    let r = c
        .send(
            push(&c, &j, &format!("/3/device/{fixed}"))
                .body(())
                .unwrap(),
            ALERT,
        )
        .await
        .unwrap();
    assert_eq!(r.json()["timestamp"], 1_700_000_000_000i64);
    let r = c
        .send(push(&c, &j, "/3/device/BEEF").body(()).unwrap(), ALERT)
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (400, "BadDeviceToken")
    );
    assert!(r.json().get("timestamp").is_none());
    assert_eq!(mock.stats().reason("Unregistered"), 2);
}

#[tokio::test]
async fn streams_are_refused_until_the_connection_is_authorized() {
    let key = generate_apns_key();
    let mock = start(&key, true).await;
    mock.faults().set_latency(Duration::from_millis(150));
    let c = connect(&mock.url(), mock.ca_pem().as_deref()).await;
    let j = jwt(&key, now_secs());
    let p = format!("/3/device/{TOKEN}");
    let first = tokio::spawn(send_on(
        c.send.clone(),
        push(&c, &j, &p).body(()).unwrap(),
        Bytes::from_static(ALERT),
    ));
    tokio::time::sleep(Duration::from_millis(40)).await;
    let second = send_on(
        c.send.clone(),
        push(&c, &j, &p).body(()).unwrap(),
        Bytes::from_static(ALERT),
    )
    .await;
    let err = second.err().expect("second stream must be refused");
    assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM));
    assert_eq!(first.await.unwrap().unwrap().status, 200);
    // Authorized now: concurrency is allowed.
    mock.faults().set_latency(Duration::from_millis(30));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(send_on(
            c.send.clone(),
            push(&c, &j, &p).body(()).unwrap(),
            Bytes::from_static(ALERT),
        )));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    let s = mock.stats();
    assert_eq!(s.refused_streams, 1);
    assert!(s.max_concurrent_streams_seen >= 2, "{s:?}");
    assert_eq!(s.accepted, 9);
}

#[tokio::test]
async fn auth_faults_rate_faults_and_connection_faults() {
    let key = generate_apns_key();
    let mut cfg = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    cfg.tls = false;
    cfg.bad_environment_spelling = BadEnvironmentSpelling::Wire;
    let mock = MockApns::start(cfg).await.unwrap();
    let f = mock.faults();
    let mut c = connect(&mock.url(), None).await;
    let now = now_secs();
    let p = format!("/3/device/{TOKEN}");
    let send = |c: &Client, j: &str| push(c, j, &p).body(()).unwrap();

    // Forced expiry, then a re-signed JWT on the same connection is accepted (no 429) ...
    let mut other = connect(&mock.url(), None).await;
    let j1 = jwt(&key, now - 10);
    assert_eq!(c.send(send(&c, &j1), ALERT).await.unwrap().status, 200);
    assert_eq!(
        other.send(send(&other, &j1), ALERT).await.unwrap().status,
        200
    );
    f.force_expired_provider_token(1);
    let r = c.send(send(&c, &j1), ALERT).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (403, "ExpiredProviderToken")
    );
    let j2 = jwt(&key, now);
    assert_eq!(c.send(send(&c, &j2), ALERT).await.unwrap().status, 200);
    // ... and on another connection that used the expired token too: it is expired there as
    // well (a sender shares one token across its connections).
    assert_eq!(
        other.send(send(&other, &j2), ALERT).await.unwrap().status,
        200
    );
    // A change of a token that did not expire is still refused within 20 minutes.
    let j3 = jwt(&key, now - 1);
    let r = other.send(send(&other, &j3), ALERT).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (429, "TooManyProviderTokenUpdates")
    );

    f.reject_all_auth(Some(ApnsReason::InvalidProviderToken));
    let r = c.send(send(&c, &j2), ALERT).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (403, "InvalidProviderToken")
    );
    f.reject_all_auth(None);

    f.add_wrong_environment_key(&key.key_id);
    let r = c.send(send(&c, &j2), ALERT).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (403, "BadEnvironmentKeyInToken")
    );
    f.clear();

    // Per-mille faults are deterministic: 500 per mille = every second request.
    f.set_too_many_requests_per_mille(500);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(c.send(send(&c, &j2), ALERT).await.unwrap().status.as_u16());
    }
    assert_eq!(statuses, vec![200, 429, 200, 429]);
    f.set_too_many_requests_per_mille(0);
    f.set_internal_error_per_mille(1000);
    assert_eq!(c.send(send(&c, &j2), ALERT).await.unwrap().status, 500);
    f.set_internal_error_per_mille(0);
    f.set_unavailable_per_mille(1000);
    let r = c.send(send(&c, &j2), ALERT).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), reason(&r).as_str()),
        (503, "ServiceUnavailable")
    );
    f.set_unavailable_per_mille(0);

    // RST_STREAM on the next request.
    f.reset_after(1);
    let err = c.send(send(&c, &j2), ALERT).await.err().unwrap();
    assert_eq!(err.reason(), Some(h2::Reason::INTERNAL_ERROR));
    assert_eq!(c.send(send(&c, &j2), ALERT).await.unwrap().status, 200);

    // GOAWAY after the 2nd request: both answered, then the connection ends.
    f.goaway_after(2);
    assert_eq!(c.send(send(&c, &j2), ALERT).await.unwrap().status, 200);
    assert_eq!(c.send(send(&c, &j2), ALERT).await.unwrap().status, 200);
    let conn_result = tokio::time::timeout(Duration::from_secs(2), &mut c.conn).await;
    assert!(conn_result.is_ok(), "connection closes after GOAWAY");
    assert!(c.send(send(&c, &j2), ALERT).await.is_err());
    let s = mock.stats();
    assert_eq!(s.goaways_sent, 1);
    assert_eq!(s.resets_sent, 1);

    // A new connection works (and needs no new JWT); then drop it hard.
    let mut c2 = connect(&mock.url(), None).await;
    assert_eq!(c2.send(send(&c2, &j2), ALERT).await.unwrap().status, 200);
    f.drop_connection_after(1);
    assert!(c2.send(send(&c2, &j2), ALERT).await.is_err());
    assert_eq!(mock.stats().connections_dropped, 1);
    assert_eq!(mock.stats().connections_opened, 3, "c, other and c2");
    mock.shutdown().await;
}

/// Rough throughput probe (run with `--ignored --nocapture`; meaningful in release builds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_probe() {
    let key = generate_apns_key();
    let mut cfg = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    cfg.tls = false;
    cfg.record_accepted = false;
    let mock = MockApns::start(cfg).await.unwrap();
    let c = connect(&mock.url(), None).await;
    let j = jwt(&key, now_secs());
    let p = format!("/3/device/{TOKEN}");
    let mut warm = connect(&mock.url(), None).await;
    let _ = warm.send(push(&c, &j, &p).body(()).unwrap(), ALERT).await;
    // Authorize the measuring connection.
    assert_eq!(
        send_on(
            c.send.clone(),
            push(&c, &j, &p).body(()).unwrap(),
            Bytes::from_static(ALERT)
        )
        .await
        .unwrap()
        .status,
        200
    );
    let n = 20_000usize;
    let conc = 200usize;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let send = c.send.clone();
        let req = push(&c, &j, &p);
        let headers = req.body(()).unwrap();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / conc {
                let mut r = http::Request::builder()
                    .method("POST")
                    .uri(headers.uri().clone())
                    .body(())
                    .unwrap();
                *r.headers_mut() = headers.headers().clone();
                let resp = send_on(send.clone(), r, Bytes::from_static(ALERT))
                    .await
                    .unwrap();
                assert_eq!(resp.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} req in {secs:.2}s = {:.0} req/s (client and server share the process)",
        n,
        n as f64 / secs
    );
    assert_eq!(mock.stats().jwt_verifications, 1);
}

/// `set_max_concurrent_streams(Some(1))`: open connections get GOAWAY, new ones advertise one
/// stream; `None` restores the configured limit for connections opened after it.
#[tokio::test]
async fn max_concurrent_streams_drops_to_one_for_new_connections() {
    let key = generate_apns_key();
    let mock = start(&key, false).await;
    let j = jwt(&key, now_secs());
    let request = |c: &Client| push(c, &j, &format!("/3/device/{TOKEN}")).body(()).unwrap();
    let mut before = connect(&mock.url(), None).await;
    assert_eq!(
        before.send(request(&before), ALERT).await.unwrap().status,
        200
    );
    assert_eq!(before.send.current_max_send_streams(), 1000);

    mock.faults().set_max_concurrent_streams(Some(1));
    let closed = tokio::time::timeout(Duration::from_secs(2), &mut before.conn).await;
    assert!(closed.is_ok(), "the open connection got GOAWAY");
    let mut c = connect(&mock.url(), None).await;
    assert_eq!(c.send(request(&c), ALERT).await.unwrap().status, 200);
    assert_eq!(c.send.current_max_send_streams(), 1);

    mock.faults().set_max_concurrent_streams(None);
    let mut c = connect(&mock.url(), None).await;
    assert_eq!(c.send(request(&c), ALERT).await.unwrap().status, 200);
    assert_eq!(c.send.current_max_send_streams(), 1000);
    mock.shutdown().await;
}
