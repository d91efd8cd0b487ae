//! FCM provider tests: configuration errors, the quota pause on a paused clock, and end-to-end
//! behaviour against the mock FCM (`pushgate_mocks::fcm::MockFcm`, TLS, token endpoint included).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig, RetryAfter};
use pushgate_mocks::keys::ServiceAccount;
use serde_json::Value;

use super::*;

/// RSA generation is slow in debug builds: one key for every test, `token_uri` rewritten per use.
fn account() -> &'static ServiceAccount {
    static ACCOUNT: OnceLock<ServiceAccount> = OnceLock::new();
    ACCOUNT.get_or_init(|| {
        pushgate_mocks::keys::generate_service_account("pushgate-test", "https://127.0.0.1:1/token")
    })
}

fn json_with(token_uri: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut file: Value = serde_json::from_str(&account().json).unwrap();
    file["token_uri"] = Value::from(token_uri);
    edit(&mut file);
    file.to_string()
}

fn config(json: String, endpoint: &str) -> FcmConfig {
    FcmConfig {
        credentials: None,
        credentials_file: None,
        credentials_json: Some(json),
        project_id: None,
        endpoint: Some(endpoint.to_string()),
        ca_file: None,
        connections: 2,
        max_connections: 4,
        idle_timeout_secs: 300,
        request_timeout_ms: 5_000,
    }
}

fn build_err(config: &FcmConfig) -> (String, String) {
    match FcmProvider::from_config("apps.shop.fcm", config) {
        Err(ConfigError::Invalid { key, reason }) => (key, reason),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("expected a configuration error"),
    }
}

fn message(token: &str) -> ProviderRequest {
    let body = serde_json::json!({
        "message": {"token": token, "notification": {"title": "t", "body": "b"}, "data": {"k": "v"}}
    });
    ProviderRequest::Fcm(FcmRequest {
        device_token: token.to_string(),
        body: Bytes::from(body.to_string()),
    })
}

struct Harness {
    mock: MockFcm,
    provider: Arc<FcmProvider>,
    _ca: tempfile::NamedTempFile,
}

async fn harness() -> Harness {
    let sa = account();
    let mock = MockFcm::start(MockFcmConfig::new(
        &sa.project_id,
        &sa.client_email,
        &sa.public_pem,
    ))
    .await
    .unwrap();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), mock.ca_pem().unwrap()).unwrap();
    let mut cfg = config(json_with(&mock.token_uri(), |_| {}), &mock.url());
    cfg.ca_file = Some(ca.path().to_path_buf());
    let provider = Arc::new(FcmProvider::from_config("apps.shop.fcm", &cfg).unwrap());
    Harness {
        mock,
        provider,
        _ca: ca,
    }
}

async fn send_many(provider: &Arc<FcmProvider>, n: usize, prefix: &str) -> Vec<Outcome> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let provider = Arc::clone(provider);
            let request = message(&format!("{prefix}-{i}"));
            tokio::spawn(async move { provider.deliver(&request).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

fn assert_all_delivered(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(matches!(o, Outcome::Delivered { status: 200, .. }), "{o:?}");
    }
}

// ---- configuration -------------------------------------------------------------------------

#[test]
fn config_errors_name_the_key_and_the_problem() {
    let good = json_with("https://oauth2.googleapis.com/token", |_| {});
    let mut cfg = config("{not json".into(), "https://fcm.googleapis.com");
    let (key, reason) = build_err(&cfg);
    assert_eq!(key, "apps.shop.fcm.credentials_json");
    assert!(reason.contains("not valid JSON"), "{reason}");

    cfg.credentials_json = None;
    cfg.credentials_file = Some("/nonexistent/sa.json".into());
    let (key, reason) = build_err(&cfg);
    assert_eq!(key, "apps.shop.fcm.credentials_file");
    assert!(
        reason.contains("cannot read /nonexistent/sa.json"),
        "{reason}"
    );

    for field in ["client_email", "private_key", "token_uri", "project_id"] {
        let json = json_with("https://oauth2.googleapis.com/token", |f| {
            f.as_object_mut().unwrap().remove(field);
        });
        let (key, reason) = build_err(&config(json, "https://fcm.googleapis.com"));
        assert_eq!(key, "apps.shop.fcm.credentials_json");
        assert!(reason.contains(&format!("`{field}`")), "{field}: {reason}");
    }

    let json = json_with("https://oauth2.googleapis.com/token", |f| {
        f["private_key"] =
            Value::from("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n");
    });
    let (_, reason) = build_err(&config(json, "https://fcm.googleapis.com"));
    assert!(reason.contains("not an RSA private key"), "{reason}");

    let (key, _) = build_err(&config(good.clone(), "ftp://x"));
    assert_eq!(key, "apps.shop.fcm.endpoint");
    let (key, _) = build_err(&config(good.clone(), "https://fcm.googleapis.com/v1"));
    assert_eq!(key, "apps.shop.fcm.endpoint");

    let mut cfg = config(good.clone(), "https://fcm.googleapis.com");
    cfg.project_id = Some("a/b".into());
    assert_eq!(build_err(&cfg).0, "apps.shop.fcm.project_id");

    let mut cfg = config(good.clone(), "https://fcm.googleapis.com");
    cfg.ca_file = Some("/nonexistent/ca.pem".into());
    assert_eq!(build_err(&cfg).0, "apps.shop.fcm.ca_file");

    // The file's project id, overridden by the config's; the default endpoint.
    let mut cfg = config(good, "https://fcm.googleapis.com");
    cfg.endpoint = None;
    let p = FcmProvider::from_config("apps.shop.fcm", &cfg).unwrap();
    assert_eq!(p.project_id(), "pushgate-test");
    assert_eq!(
        p.target.get().unwrap().send_uri,
        "https://fcm.googleapis.com/v1/projects/pushgate-test/messages:send"
    );
    cfg.project_id = Some("other-project".into());
    let p = FcmProvider::from_config("apps.shop.fcm", &cfg).unwrap();
    assert_eq!(p.project_id(), "other-project");
    let text = format!("{p:?}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}

#[test]
fn credentials_json_wins_over_credentials_file() {
    let mut cfg = config(
        json_with("https://oauth2.googleapis.com/token", |_| {}),
        "https://fcm.googleapis.com",
    );
    cfg.credentials_file = Some("/nonexistent/sa.json".into());
    assert!(FcmProvider::from_config("k", &cfg).is_ok());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &account().json).unwrap();
    cfg.credentials_json = None;
    cfg.credentials_file = Some(file.path().to_path_buf());
    assert!(FcmProvider::from_config("k", &cfg).is_ok());
}

// ---- quota pause (paused clock, no I/O) ----------------------------------------------------

fn offline_provider(request_timeout_ms: u64) -> FcmProvider {
    let mut cfg = config(
        json_with("http://127.0.0.1:9/token", |_| {}),
        "http://127.0.0.1:9",
    );
    cfg.request_timeout_ms = request_timeout_ms;
    FcmProvider::from_config("k", &cfg).unwrap()
}

#[tokio::test(start_paused = true)]
async fn quota_pause_delays_sends_until_the_instant() {
    let p = offline_provider(10_000);
    assert!(p.wait_for_quota().await.is_ok());
    let start = Instant::now();
    p.pause_app(Duration::from_secs(4));
    // A shorter pause never shortens the one in force.
    p.pause_app(Duration::from_secs(1));
    assert!(p.wait_for_quota().await.is_ok());
    assert_eq!(start.elapsed(), Duration::from_secs(4));
    assert_eq!(p.paused_until(), None);
    assert!(p.wait_for_quota().await.is_ok());
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(4),
        "no wait once the pause is over"
    );
}

#[tokio::test(start_paused = true)]
async fn quota_pause_longer_than_a_request_hands_the_message_back() {
    let p = offline_provider(2_000);
    p.pause_app(Duration::from_secs(30));
    let start = Instant::now();
    let outcome = p.deliver(&message("t")).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    let Outcome::Retry {
        status: 429,
        retry_after: Some(remaining),
        reason,
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(remaining, Duration::from_secs(30));
    assert!(reason.contains("quota"), "{reason}");
    // Absurd Retry-After values are clamped.
    p.pause_app(Duration::from_secs(86_400));
    assert!(p.paused_until().unwrap() <= Instant::now() + MAX_APP_PAUSE);
}

#[tokio::test]
async fn wrong_platform_is_reported() {
    let p = offline_provider(1_000);
    let apns = ProviderRequest::Apns(crate::domain::ApnsRequest {
        device_token: "x".into(),
        topic: "t".into(),
        push_type: crate::domain::PushType::Alert,
        priority: 10,
        expiration: None,
        collapse_id: None,
        apns_id: uuid::Uuid::new_v4(),
        payload: Bytes::new(),
    });
    assert!(matches!(
        p.deliver(&apns).await,
        Outcome::Failed { status: 0, .. }
    ));
}

// ---- against the mock FCM ------------------------------------------------------------------

#[tokio::test]
async fn token_is_fetched_once_and_reused() {
    let h = harness().await;
    let outcomes = send_many(&h.provider, 40, "a").await;
    assert_all_delivered(&outcomes);
    for i in 0..10 {
        let o = h.provider.deliver(&message(&format!("b-{i}"))).await;
        assert!(matches!(o, Outcome::Delivered { .. }), "{o:?}");
    }
    let stats = h.mock.stats();
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    assert_eq!(stats.tokens_issued, 1);
    assert_eq!(stats.accepted, 50);
    assert_eq!(stats.legacy_requests, 0);
    assert_eq!(h.provider.tokens().requests(), 1);
    // The message id is FCM's resource name.
    let accepted = h.mock.accepted();
    assert_eq!(accepted.len(), 50);
    if let Outcome::Delivered {
        provider_message_id,
        ..
    } = &outcomes[0]
    {
        assert!(provider_message_id.starts_with("projects/pushgate-test/messages/"));
        assert!(accepted.iter().any(|a| &a.name == provider_message_id));
    }
}

#[tokio::test]
async fn concurrent_first_sends_make_exactly_one_token_request() {
    let h = harness().await;
    let outcomes = send_many(&h.provider, 64, "c").await;
    assert_all_delivered(&outcomes);
    let stats = h.mock.stats();
    assert_eq!(stats.token_requests, 1, "single-flight: {stats:?}");
    assert_eq!(stats.accepted, 64);
}

#[tokio::test]
async fn expired_access_tokens_are_refreshed_once_without_losing_messages() {
    let h = harness().await;
    assert_all_delivered(&send_many(&h.provider, 20, "before").await);
    h.mock.faults().expire_access_tokens_now();
    // Every concurrent send carries the dead token, gets 401, and re-sends once.
    let outcomes = send_many(&h.provider, 30, "after").await;
    assert_all_delivered(&outcomes);
    assert_all_delivered(&send_many(&h.provider, 10, "later").await);
    let stats = h.mock.stats();
    assert_eq!(stats.token_requests, 2, "refreshed exactly once: {stats:?}");
    assert_eq!(stats.tokens_issued, 2);
    assert_eq!(stats.accepted, 60, "no message lost");
    assert!(stats.status(401) >= 1);
    assert_eq!(h.provider.tokens().issued(), 2);
}

#[tokio::test]
async fn token_faults_map_to_outcomes() {
    let h = harness().await;
    let f = h.mock.faults();
    f.add_unregistered("dead");
    f.add_apns_unregistered("dead-ios");
    f.add_invalid_token("garbage");
    f.add_sender_id_mismatch("other-project");
    f.add_third_party_auth_error("apns-misconfigured");
    // Several rounds so both details orders the mock alternates between are seen.
    for _ in 0..2 {
        for token in ["dead", "dead-ios", "garbage"] {
            let o = h.provider.deliver(&message(token)).await;
            assert!(matches!(o, Outcome::InvalidToken { .. }), "{token}: {o:?}");
        }
        let o = h.provider.deliver(&message("other-project")).await;
        let Outcome::InvalidToken { reason, status, .. } = o else {
            panic!("{o:?}")
        };
        assert_eq!(status, 403);
        assert!(reason.starts_with("SENDER_ID_MISMATCH"), "{reason}");
        let o = h.provider.deliver(&message("apns-misconfigured")).await;
        let Outcome::Failed { reason, status } = o else {
            panic!("{o:?}")
        };
        assert_eq!(status, 401);
        assert!(reason.contains("Firebase console") && reason.contains("InvalidProviderToken"));
    }
    // A 401 that is not about our token never triggers a token refresh.
    assert_eq!(h.mock.stats().token_requests, 1);
    // A non-string data value is rejected with the field named.
    let bad = ProviderRequest::Fcm(FcmRequest {
        device_token: "t".into(),
        body: Bytes::from(r#"{"message":{"token":"t","data":{"n":12}}}"#),
    });
    let o = h.provider.deliver(&bad).await;
    let Outcome::Rejected { reason, status } = o else {
        panic!("{o:?}")
    };
    assert_eq!(status, 400);
    assert!(reason.contains("message.data[0].value"), "{reason}");
}

#[tokio::test]
async fn server_errors_retry_and_quota_pauses_the_app() {
    let h = harness().await;
    let f = h.mock.faults();
    f.set_bad_gateway_per_mille(1000);
    let o = h.provider.deliver(&message("x")).await;
    assert!(matches!(o, Outcome::Retry { status: 502, .. }), "{o:?}");
    f.clear();

    f.set_unavailable_per_mille(1000);
    f.set_retry_after(RetryAfter::HttpDate(20));
    let o = h.provider.deliver(&message("x")).await;
    let Outcome::Retry {
        status: 503,
        retry_after: Some(d),
        ..
    } = o
    else {
        panic!("{o:?}")
    };
    assert!(
        d > Duration::from_secs(15) && d <= Duration::from_secs(20),
        "{d:?}"
    );
    assert_eq!(
        h.provider.paused_until(),
        None,
        "503 does not pause the project"
    );
    f.clear();

    f.set_quota_exceeded_per_mille(1000);
    f.set_retry_after(RetryAfter::Seconds(30));
    let o = h.provider.deliver(&message("x")).await;
    assert_eq!(
        o,
        Outcome::Retry {
            reason: match &o {
                Outcome::Retry { reason, .. } => reason.clone(),
                _ => unreachable!(),
            },
            status: 429,
            retry_after: Some(Duration::from_secs(30))
        }
    );
    assert!(h.provider.paused_until().is_some());
    f.clear();
    // The next message does not reach FCM while the project is paused (30 s > request timeout).
    let before = h.mock.stats().requests;
    let o = h.provider.deliver(&message("y")).await;
    assert!(
        matches!(
            o,
            Outcome::Retry {
                status: 429,
                retry_after: Some(_),
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(h.mock.stats().requests, before);
    assert_eq!(h.mock.stats().legacy_requests, 0);
}

#[tokio::test]
async fn short_quota_pause_is_waited_out_then_sent() {
    let h = harness().await;
    let f = h.mock.faults();
    f.set_quota_exceeded_per_mille(1000);
    f.set_retry_after(RetryAfter::Seconds(1));
    let o = h.provider.deliver(&message("x")).await;
    assert!(matches!(o, Outcome::Retry { status: 429, .. }), "{o:?}");
    f.clear();
    let start = Instant::now();
    let o = h.provider.deliver(&message("y")).await;
    assert!(matches!(o, Outcome::Delivered { .. }), "{o:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn token_endpoint_outage_retries_then_gives_retry() {
    let h = harness().await;
    let f = h.mock.faults();
    f.set_token_endpoint_unavailable_per_mille(1000);
    let o = h.provider.deliver(&message("x")).await;
    let Outcome::Retry {
        reason, status: 0, ..
    } = o
    else {
        panic!("{o:?}")
    };
    assert!(reason.contains("token endpoint is unavailable"), "{reason}");
    assert_eq!(h.mock.stats().token_requests, 3, "a couple of retries");
    // Messages arriving right after share the failure instead of hammering the endpoint.
    let o = h.provider.deliver(&message("y")).await;
    assert!(matches!(o, Outcome::Retry { status: 0, .. }), "{o:?}");
    assert_eq!(h.mock.stats().token_requests, 3);
    assert_eq!(h.mock.stats().accepted, 0);

    // A flaky endpoint (every other request fails) is ridden out by the retries.
    let h = harness().await;
    h.mock
        .faults()
        .set_token_endpoint_unavailable_per_mille(500);
    let o = h.provider.deliver(&message("x")).await;
    assert!(matches!(o, Outcome::Delivered { .. }), "{o:?}");
}

#[tokio::test]
async fn invalid_grant_fails_with_a_clear_reason_and_no_retries() {
    let sa = account();
    // The mock trusts a different public key: our signature is invalid.
    let other = pushgate_mocks::keys::generate_service_account("x", "https://127.0.0.1:1/token");
    let mock = MockFcm::start(MockFcmConfig {
        tls: false,
        ..MockFcmConfig::new(&sa.project_id, &sa.client_email, &other.public_pem)
    })
    .await
    .unwrap();
    let cfg = config(json_with(&mock.token_uri(), |_| {}), &mock.url());
    let provider = FcmProvider::from_config("k", &cfg).unwrap();
    let o = provider.deliver(&message("x")).await;
    let Outcome::Failed { reason, .. } = o else {
        panic!("{o:?}")
    };
    assert!(reason.contains("invalid_grant"), "{reason}");
    assert!(
        reason.contains("rejected the service-account credentials"),
        "{reason}"
    );
    assert_eq!(mock.stats().token_requests, 1);
    let o = provider.deliver(&message("y")).await;
    assert!(matches!(o, Outcome::Failed { .. }), "{o:?}");
    assert_eq!(mock.stats().token_requests, 1, "fails fast for a while");
    assert_eq!(mock.stats().accepted, 0);
}

#[tokio::test]
async fn wrong_project_is_failed_not_invalid_token() {
    let h = harness().await;
    let sa = account();
    let mut cfg = config(json_with(&h.mock.token_uri(), |_| {}), &h.mock.url());
    cfg.project_id = Some("not-my-project".into());
    cfg.ca_file = Some(h._ca.path().to_path_buf());
    let provider = FcmProvider::from_config("k", &cfg).unwrap();
    let o = provider.deliver(&message("x")).await;
    assert!(matches!(o, Outcome::Failed { status: 403, .. }), "{o:?}");
    assert_ne!(sa.project_id, "not-my-project");
}

// ---- Application Default Credentials (environment injected) --------------------------------

#[tokio::test]
async fn adc_from_the_metadata_server_names_the_project_and_sends() {
    let sa = account();
    let mock = MockFcm::start(MockFcmConfig {
        tls: false,
        ..MockFcmConfig::new(&sa.project_id, &sa.client_email, &sa.public_pem)
    })
    .await
    .unwrap();
    let metadata = pushgate_mocks::google::MockGoogleAuth::start(
        pushgate_mocks::google::MockGoogleAuthConfig {
            project_id: sa.project_id.clone(),
            ..Default::default()
        },
        mock.issuer(),
    )
    .await
    .unwrap();
    let host = metadata.host();
    let env = |name: &str| (name == "GCE_METADATA_HOST").then(|| host.clone());
    let mut cfg = config(String::new(), &mock.url());
    cfg.credentials_json = None;
    cfg.credentials = Some("adc".into());
    let provider = FcmProvider::from_config_with_env("k", &cfg, &env).unwrap();
    assert_eq!(provider.project_id(), "", "not known before the first send");
    let o = provider.deliver(&message("adc-1")).await;
    assert!(matches!(o, Outcome::Delivered { .. }), "{o:?}");
    assert_eq!(provider.project_id(), sa.project_id);
    assert_eq!(provider.tokens().credential().kind(), "metadata_server");
    assert_eq!(metadata.stats().metadata_refused, 0);
    // "adc" and a key file exclude each other; other modes are named.
    cfg.credentials_json = Some(account().json.clone());
    let (key, _) = build_err(&cfg);
    assert_eq!(key, "apps.shop.fcm.credentials");
    cfg.credentials_json = None;
    cfg.credentials = Some("keyless".into());
    let (key, reason) = build_err(&cfg);
    assert_eq!(key, "apps.shop.fcm.credentials");
    assert!(reason.contains("keyless"), "{reason}");
}

#[tokio::test]
async fn external_account_refused_by_sts_fails_saying_what_to_check() {
    let sa = account();
    let mock = MockFcm::start(MockFcmConfig {
        tls: false,
        ..MockFcmConfig::new(&sa.project_id, &sa.client_email, &sa.public_pem)
    })
    .await
    .unwrap();
    let google = pushgate_mocks::google::MockGoogleAuth::start(
        pushgate_mocks::google::MockGoogleAuthConfig::default(),
        mock.issuer(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("token");
    std::fs::write(&subject, "a-token-sts-does-not-know").unwrap();
    let json = serde_json::json!({
        "type": "external_account",
        "audience": google.config().audience,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": google.sts_url(),
        "credential_source": {"file": subject.display().to_string()},
    })
    .to_string();
    let mut cfg = config(json.clone(), &mock.url());
    // No project anywhere: the key to set is named.
    let (key, reason) = build_err(&cfg);
    assert_eq!(key, "apps.shop.fcm.project_id");
    assert!(reason.contains("external_account"), "{reason}");
    cfg.project_id = Some(sa.project_id.clone());
    let provider = FcmProvider::from_config("k", &cfg).unwrap();
    let o = provider.deliver(&message("wif-1")).await;
    let Outcome::Failed { reason, .. } = o else {
        panic!("{o:?}")
    };
    assert!(
        reason.contains("Google STS rejected") && reason.contains("invalid_grant"),
        "{reason}"
    );
    assert_eq!(google.stats().sts_requests, 1, "a refusal is not retried");
    assert_eq!(provider.tokens().failures(), 1);
    // Without impersonation the federated token itself is sent to FCM.
    std::fs::write(&subject, &google.config().subject_token).unwrap();
    let provider = FcmProvider::from_config("k", &cfg).unwrap();
    let o = provider.deliver(&message("wif-2")).await;
    assert!(matches!(o, Outcome::Delivered { .. }), "{o:?}");
    assert_eq!(google.stats().impersonation_requests, 0);
}
