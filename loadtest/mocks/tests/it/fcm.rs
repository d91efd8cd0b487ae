//! Drives the mock FCM (token endpoint + messages:send) with a raw h2 client and RS256 assertions.

use std::sync::OnceLock;
use std::time::Duration;

use crate::client::{Client, Resp, connect, now_secs};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushgate_mocks::fcm::{GOOGLE_TOKEN_AUD, MockFcm, MockFcmConfig, RetryAfter};
use pushgate_mocks::keys::{ServiceAccount, generate_service_account};
use serde_json::{Value, json};

const PROJECT: &str = "demo-project";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// RSA generation is slow in debug builds: one service account for the whole test binary.
fn account() -> &'static ServiceAccount {
    static SA: OnceLock<ServiceAccount> = OnceLock::new();
    SA.get_or_init(|| generate_service_account(PROJECT, "https://oauth2.googleapis.com/token"))
}

fn private_key() -> EncodingKey {
    let v: Value = serde_json::from_str(&account().json).unwrap();
    EncodingKey::from_rsa_pem(v["private_key"].as_str().unwrap().as_bytes()).unwrap()
}

fn assertion(claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &private_key()).unwrap()
}

fn claims(aud: &str) -> Value {
    let now = now_secs();
    json!({"iss": account().client_email, "scope": SCOPE, "aud": aud, "iat": now, "exp": now + 3600})
}

async fn start(tls: bool) -> MockFcm {
    let sa = account();
    let mut cfg = MockFcmConfig::new(PROJECT, &sa.client_email, &sa.public_pem);
    cfg.tls = tls;
    MockFcm::start(cfg).await.unwrap()
}

async fn token_request(c: &mut Client, form: &str) -> Resp {
    let req = c
        .req("POST", "/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(())
        .unwrap();
    c.send(req, form.as_bytes()).await.unwrap()
}

fn form(assertion: &str) -> String {
    format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
    )
}

async fn access_token(c: &mut Client, mock: &MockFcm) -> String {
    let r = token_request(c, &form(&assertion(claims(&mock.token_uri())))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()["access_token"].as_str().unwrap().to_string()
}

async fn send(c: &mut Client, token: &str, project: &str, body: &Value) -> Resp {
    let req = c
        .req("POST", &format!("/v1/projects/{project}/messages:send"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    c.send(req, body.to_string().as_bytes()).await.unwrap()
}

/// The `errorCode` of the FcmError detail, found by `@type` (never by position).
fn fcm_code(v: &Value) -> Option<String> {
    v["error"]["details"].as_array()?.iter().find_map(|d| {
        (d["@type"] == "type.googleapis.com/google.firebase.fcm.v1.FcmError")
            .then(|| d["errorCode"].as_str().unwrap().to_string())
    })
}

fn detail<'a>(v: &'a Value, ty: &str) -> Option<&'a Value> {
    v["error"]["details"]
        .as_array()?
        .iter()
        .find(|d| d["@type"] == format!("type.googleapis.com/{ty}"))
}

#[tokio::test]
async fn token_endpoint_issues_and_rejects() {
    let mock = start(true).await;
    assert_eq!(mock.token_uri(), format!("{}/token", mock.url()));
    let mut c = connect(&mock.url(), mock.ca_pem().as_deref()).await;

    // aud = the mock's own token URL (Go) and Google's fixed URL (Python) both work.
    for aud in [mock.token_uri(), GOOGLE_TOKEN_AUD.to_string()] {
        let r = token_request(&mut c, &form(&assertion(claims(&aud)))).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert!(
            v["access_token"]
                .as_str()
                .unwrap()
                .starts_with("ya29.mock-")
        );
        assert_eq!(v["expires_in"], 3600);
        assert_eq!(v["token_type"], "Bearer");
    }
    // Go's empty jti and cloud-platform scope are fine.
    let mut cl = claims(GOOGLE_TOKEN_AUD);
    cl["jti"] = json!("");
    cl["scope"] = json!("https://www.googleapis.com/auth/cloud-platform");
    assert_eq!(
        token_request(&mut c, &form(&assertion(cl))).await.status,
        200
    );

    let expect = |r: Resp, error: &str, desc: Option<&str>| {
        assert_eq!(r.status, 400);
        let v = r.json();
        assert_eq!(v["error"], error, "{v}");
        if let Some(d) = desc {
            assert_eq!(v["error_description"], d);
        }
    };
    // Tampered signature.
    let a = assertion(claims(GOOGLE_TOKEN_AUD));
    let (signed, sig) = a.rsplit_once('.').unwrap();
    let mut sig = sig.to_string();
    let last = if sig.ends_with('A') { "B" } else { "A" };
    sig.replace_range(sig.len() - 1.., last);
    let r = token_request(&mut c, &form(&format!("{signed}.{sig}"))).await;
    expect(r, "invalid_grant", Some("Invalid JWT Signature."));
    // Too long-lived.
    let mut cl = claims(GOOGLE_TOKEN_AUD);
    cl["exp"] = json!(now_secs() + 7200);
    expect(
        token_request(&mut c, &form(&assertion(cl))).await,
        "invalid_grant",
        Some(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        ),
    );
    // Already expired.
    let mut cl = claims(GOOGLE_TOKEN_AUD);
    cl["iat"] = json!(now_secs() - 7200);
    cl["exp"] = json!(now_secs() - 3600);
    expect(
        token_request(&mut c, &form(&assertion(cl))).await,
        "invalid_grant",
        None,
    );
    // Wrong audience, issuer, scope, grant type.
    expect(
        token_request(
            &mut c,
            &form(&assertion(claims("https://evil.example/token"))),
        )
        .await,
        "invalid_grant",
        None,
    );
    let mut cl = claims(GOOGLE_TOKEN_AUD);
    cl["iss"] = json!("someone@else.iam.gserviceaccount.com");
    expect(
        token_request(&mut c, &form(&assertion(cl))).await,
        "invalid_grant",
        None,
    );
    let mut cl = claims(GOOGLE_TOKEN_AUD);
    cl["scope"] = json!("https://www.googleapis.com/auth/userinfo.email");
    expect(
        token_request(&mut c, &form(&assertion(cl))).await,
        "invalid_scope",
        None,
    );
    expect(
        token_request(&mut c, "grant_type=password&assertion=x").await,
        "unsupported_grant_type",
        None,
    );

    let s = mock.stats();
    assert_eq!(s.token_requests, 10);
    assert_eq!(s.tokens_issued, 3);
    assert_eq!(s.reason("invalid_grant"), 5);
}

#[tokio::test]
async fn send_succeeds_is_recorded_and_tokens_expire() {
    let mock = start(false).await;
    let mut c = connect(&mock.url(), None).await;
    let tok = access_token(&mut c, &mock).await;
    let body = json!({"validate_only": false, "message": {"token": "dev-token-1",
        "data": {"k": "v"},
        "notification": {"title": "t", "body": "b"},
        "android": {"priority": "high", "ttl": "3600s", "collapse_key": "c", "directBootOk": true}}});
    let r = send(&mut c, &tok, PROJECT, &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let name = r.json()["name"].as_str().unwrap().to_string();
    assert!(
        name.starts_with(&format!("projects/{PROJECT}/messages/")),
        "{name}"
    );
    // camelCase + validate_only: answered, not recorded.
    let r = send(&mut c, &tok, PROJECT, &json!({"validateOnly": true, "message": {"topic": "news", "fcmOptions": {"analyticsLabel": "x"}, "android": {"priority": "NORMAL", "ttl": "1.5s"}}})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json()["name"],
        format!("projects/{PROJECT}/messages/fake_message_id")
    );
    let acc = mock.accepted();
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0].token, "dev-token-1");
    assert_eq!(acc[0].message["data"]["k"], "v");
    assert_eq!(acc[0].name, name);

    // Missing, unknown, expired and invalidated tokens: 401 UNAUTHENTICATED without FcmError.
    let req = c
        .req("POST", &format!("/v1/projects/{PROJECT}/messages:send"))
        .body(())
        .unwrap();
    let r = c.send(req, body.to_string().as_bytes()).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    let v = r.json();
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request is missing required authentication credential")
    );
    assert_eq!(fcm_code(&v), None);
    let r = send(&mut c, "ya29.forged", PROJECT, &body).await;
    assert_eq!(r.status, 401);
    mock.faults().advance_clock(Duration::from_secs(3601));
    let r = send(&mut c, &tok, PROJECT, &body).await;
    assert_eq!(r.status, 401, "token expired after its lifetime");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request had invalid authentication credentials")
    );
    let tok2 = access_token(&mut c, &mock).await;
    assert_eq!(send(&mut c, &tok2, PROJECT, &body).await.status, 200);
    mock.faults().expire_access_tokens_now();
    assert_eq!(send(&mut c, &tok2, PROJECT, &body).await.status, 401);
    let tok3 = access_token(&mut c, &mock).await;
    assert_eq!(send(&mut c, &tok3, PROJECT, &body).await.status, 200);

    // Wrong project.
    let r = send(&mut c, &tok3, "other-project", &body).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["status"], "PERMISSION_DENIED");

    // Legacy endpoints are 404 and counted.
    for path in ["/batch", "/fcm/send"] {
        let req = c.req("POST", path).body(()).unwrap();
        assert_eq!(c.send(req, b"x").await.unwrap().status, 404);
    }
    let s = mock.stats();
    assert_eq!(s.legacy_requests, 2);
    assert_eq!(s.accepted, 3);
    assert_eq!(s.validate_only, 1);
    assert_eq!(s.reason("UNAUTHENTICATED"), 4);
    mock.shutdown().await;
}

#[tokio::test]
async fn validation_errors_have_google_shapes() {
    let mock = start(false).await;
    let mut c = connect(&mock.url(), None).await;
    let tok = access_token(&mut c, &mock).await;

    // No recipient.
    let r = send(
        &mut c,
        &tok,
        PROJECT,
        &json!({"message": {"data": {"k": "v"}}}),
    )
    .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["code"], 400);
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        v["error"]["message"],
        "Recipient of the message is not set."
    );
    assert_eq!(fcm_code(&v).as_deref(), Some("INVALID_ARGUMENT"));
    assert_eq!(
        detail(&v, "google.rpc.BadRequest").unwrap()["fieldViolations"][0]["field"],
        "message"
    );
    // Two recipients.
    let r = send(
        &mut c,
        &tok,
        PROJECT,
        &json!({"message": {"token": "a", "topic": "b"}}),
    )
    .await;
    assert_eq!(r.status, 400);
    // Non-string data value.
    let r = send(
        &mut c,
        &tok,
        PROJECT,
        &json!({"message": {"token": "a", "data": {"n": 12}}}),
    )
    .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(
        v["error"]["message"],
        "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"
    );
    let fv = &detail(&v, "google.rpc.BadRequest").unwrap()["fieldViolations"][0];
    assert_eq!(fv["field"], "message.data[0].value");
    let r = send(
        &mut c,
        &tok,
        PROJECT,
        &json!({"message": {"token": "a", "android": {"data": {"b": true}}}}),
    )
    .await;
    assert_eq!(
        r.json()["error"]["message"],
        "Invalid value at 'message.android.data[0].value' (TYPE_STRING), true"
    );
    // TTL and priority.
    for android in [
        json!({"ttl": "2419201s"}),
        json!({"ttl": "1h"}),
        json!({"ttl": 3600}),
        json!({"priority": "URGENT"}),
    ] {
        let r = send(
            &mut c,
            &tok,
            PROJECT,
            &json!({"message": {"token": "a", "android": android}}),
        )
        .await;
        assert_eq!(r.status, 400, "{android}");
        assert_eq!(r.json()["error"]["status"], "INVALID_ARGUMENT");
    }
    assert_eq!(send(&mut c, &tok, PROJECT, &json!({"message": {"token": "a", "android": {"ttl": "2419200s", "priority": "normal"}}})).await.status, 200);
    // Unknown field.
    let r = send(
        &mut c,
        &tok,
        PROJECT,
        &json!({"message": {"token": "a", "priority": "high"}}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unknown name \"priority\"")
    );
    // Size: body minus token bytes <= 4096; a long token does not count.
    let long_token = "t".repeat(3000);
    let fill = |n: usize| json!({"message": {"token": long_token, "data": {"k": "x".repeat(n)}}});
    let base = fill(0).to_string().len() - long_token.len();
    let r = send(&mut c, &tok, PROJECT, &fill(4096 - base)).await;
    assert_eq!(r.status, 200, "exactly 4096 counted bytes");
    let r = send(&mut c, &tok, PROJECT, &fill(4097 - base)).await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(
        v,
        json!({"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}})
    );
}

#[tokio::test]
async fn token_and_rate_faults_have_documented_shapes() {
    let mock = start(false).await;
    let f = mock.faults();
    let mut c = connect(&mock.url(), None).await;
    let tok = access_token(&mut c, &mock).await;
    let msg = |t: &str| json!({"message": {"token": t, "notification": {"title": "x"}}});

    f.add_unregistered("gone");
    f.add_apns_unregistered("dead-ios");
    f.add_invalid_token("garbage");
    f.add_sender_id_mismatch("foreign");
    f.add_third_party_auth_error("apns-broken");

    let r = send(&mut c, &tok, PROJECT, &msg("gone")).await;
    assert_eq!(r.status, 404);
    let v = r.json();
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert_eq!(fcm_code(&v).as_deref(), Some("UNREGISTERED"));

    // Details order alternates: find by @type both times.
    let mut firsts = Vec::new();
    for _ in 0..2 {
        let r = send(&mut c, &tok, PROJECT, &msg("dead-ios")).await;
        assert_eq!(r.status, 400);
        let v = r.json();
        assert_eq!(v["error"]["message"], "APNs device token is disabled.");
        assert_eq!(fcm_code(&v).as_deref(), Some("INVALID_ARGUMENT"));
        let apns = detail(&v, "google.firebase.fcm.v1.ApnsError").unwrap();
        assert_eq!(
            (apns["statusCode"].as_i64(), apns["reason"].as_str()),
            (Some(410), Some("Unregistered"))
        );
        firsts.push(v["error"]["details"][0]["@type"].clone());
    }
    assert_ne!(
        firsts[0], firsts[1],
        "detail order varies between responses"
    );

    let v = send(&mut c, &tok, PROJECT, &msg("garbage")).await.json();
    assert_eq!(
        detail(&v, "google.rpc.BadRequest").unwrap()["fieldViolations"][0]["field"],
        "message.token"
    );
    let r = send(&mut c, &tok, PROJECT, &msg("foreign")).await;
    assert_eq!(r.status, 403);
    assert_eq!(fcm_code(&r.json()).as_deref(), Some("SENDER_ID_MISMATCH"));
    let r = send(&mut c, &tok, PROJECT, &msg("apns-broken")).await;
    assert_eq!(r.status, 401);
    let v = r.json();
    assert_eq!(fcm_code(&v).as_deref(), Some("THIRD_PARTY_AUTH_ERROR"));
    assert_eq!(
        detail(&v, "google.firebase.fcm.v1.ApnsError").unwrap()["reason"],
        "InvalidProviderToken"
    );

    // 429 with Retry-After in seconds, then as an HTTP-date.
    f.set_quota_exceeded_per_mille(1000);
    f.set_retry_after(RetryAfter::Seconds(7));
    let r = send(&mut c, &tok, PROJECT, &msg("ok")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "7");
    let v = r.json();
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(fcm_code(&v).as_deref(), Some("QUOTA_EXCEEDED"));
    assert!(detail(&v, "google.rpc.QuotaFailure").is_some());
    f.set_retry_after(RetryAfter::HttpDate(60));
    let r = send(&mut c, &tok, PROJECT, &msg("ok")).await;
    let date = httpdate::parse_http_date(r.headers["retry-after"].to_str().unwrap()).unwrap();
    assert!(date > std::time::SystemTime::now());
    f.set_quota_exceeded_per_mille(0);

    f.set_internal_per_mille(1000);
    let r = send(&mut c, &tok, PROJECT, &msg("ok")).await;
    assert_eq!(
        (r.status.as_u16(), fcm_code(&r.json()).as_deref()),
        (500, Some("INTERNAL"))
    );
    f.set_internal_per_mille(0);
    f.set_unavailable_per_mille(1000);
    let r = send(&mut c, &tok, PROJECT, &msg("ok")).await;
    assert_eq!(
        (r.status.as_u16(), fcm_code(&r.json()).as_deref()),
        (503, Some("UNAVAILABLE"))
    );
    assert!(r.headers.contains_key("retry-after"));
    f.set_unavailable_per_mille(0);
    f.set_bad_gateway_per_mille(1000);
    let r = send(&mut c, &tok, PROJECT, &msg("ok")).await;
    assert_eq!(r.status, 502);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    f.set_bad_gateway_per_mille(0);

    // Per-project bucket: capacity 2, no refill.
    f.set_project_quota(Some(pushgate_mocks::fcm::ProjectQuota {
        capacity: 2,
        refill_per_sec: 0.0,
    }));
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                send(&mut c, &tok, PROJECT, &msg("ok"))
                    .await
                    .status
                    .as_u16(),
            );
        }
        v
    };
    assert_eq!(statuses, vec![200, 200, 429]);
    f.clear();
    assert_eq!(send(&mut c, &tok, PROJECT, &msg("ok")).await.status, 200);

    // GOAWAY after the next request.
    f.goaway_after(1);
    assert_eq!(send(&mut c, &tok, PROJECT, &msg("ok")).await.status, 200);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut c.conn)
            .await
            .is_ok()
    );
    let s = mock.stats();
    assert_eq!(s.goaways_sent, 1);
    assert_eq!(s.reason("QUOTA_EXCEEDED"), 3);
    assert_eq!(s.reason("HTML_502"), 1);
    assert_eq!(s.status(502), 1);
}
