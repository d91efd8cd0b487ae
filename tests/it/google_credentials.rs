//! Google credentials as GCP runs them, end to end: a `pushgate serve` child process with the
//! environment a GKE pod or a CI runner has, the HTTP/1.1-only Google credential stand-ins
//! (`pushgate_mocks::google::MockGoogleAuth`: metadata server, OAuth token endpoint, STS, IAM
//! Credentials) and the mock FCM, which accepts only the access tokens the stand-ins handed out.
//!
//! The child process is what makes the environment real: `GCE_METADATA_HOST`,
//! `GOOGLE_APPLICATION_CREDENTIALS` and `GOOGLE_CLOUD_PROJECT` are read exactly as in production.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pushgate::proto::push_gateway_client::PushGatewayClient;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig};
use pushgate_mocks::google::{MockGoogleAuth, MockGoogleAuthConfig};

use crate::harness::{fcm_recipient, status, template};

pub(crate) struct Gateway {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `pushgate serve` with `fcm_section` for the app `shop` and only `env` of the ADC
/// variables (HOME is a fresh directory, so no gcloud file is found by accident).
fn spawn(dir: &Path, fcm_section: &str, env: &[(&str, String)]) -> (Gateway, String) {
    spawn_with(dir, "", fcm_section, env)
}

/// As [`spawn`], with more TOML `tables` (e.g. an `[otlp]` section) before the app's.
pub(crate) fn spawn_with(
    dir: &Path,
    tables: &str,
    fcm_section: &str,
    env: &[(&str, String)],
) -> (Gateway, String) {
    let port = free_port();
    let config = dir.join("pushgate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n\n[retry]\nbase_ms = 5\ncap_ms = 50\nmax_attempts = 4\n\n\
             {tables}\n[apps.shop.fcm]\n{fcm_section}\nconnections = 1\nrequest_timeout_ms = 5000\n"
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let file = std::fs::File::create(&log).unwrap();
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushgate"));
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("HOME", &home)
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_HOST")
        .env_remove("GOOGLE_CLOUD_PROJECT")
        .env_remove("GCLOUD_PROJECT")
        .env_remove("CLOUDSDK_CONFIG")
        .env_remove("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command.spawn().expect("starting pushgate serve");
    (Gateway { child, log }, format!("127.0.0.1:{port}"))
}

pub(crate) async fn connect(
    gateway: &Gateway,
    addr: &str,
) -> PushGatewayClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = PushGatewayClient::connect(format!("http://{addr}")).await {
            return client;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not come up:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `ids` to FCM and returns the terminal receipts.
pub(crate) async fn send(
    client: &mut PushGatewayClient<tonic::transport::Channel>,
    ids: std::ops::Range<u64>,
) -> Vec<proto::Receipt> {
    let answer = client
        .send_batch(proto::SendBatchRequest {
            app_id: "shop".into(),
            template: Some(template("Hi {{ name }}", "from GCP")),
            recipients: ids.map(|n| fcm_recipient(n, &[("name", "Ada")])).collect(),
            wait_for_receipts: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.rejected, 0, "{answer:?}");
    answer.receipts
}

pub(crate) fn assert_delivered(receipts: &[proto::Receipt], n: usize, gateway: &Gateway) {
    assert_eq!(receipts.len(), n);
    for r in receipts {
        assert_eq!(
            status(r),
            ReceiptStatus::Delivered,
            "{r:?}\n{}",
            gateway.log()
        );
    }
}

/// RSA key generation is slow in debug builds: one service account for the file.
pub(crate) fn account() -> &'static pushgate_mocks::keys::ServiceAccount {
    static ACCOUNT: std::sync::OnceLock<pushgate_mocks::keys::ServiceAccount> =
        std::sync::OnceLock::new();
    ACCOUNT.get_or_init(|| {
        pushgate_mocks::keys::generate_service_account("pushgate-test", "https://127.0.0.1:1/token")
    })
}

pub(crate) async fn mock_fcm() -> MockFcm {
    let sa = account();
    MockFcm::start(MockFcmConfig {
        tls: false,
        ..MockFcmConfig::new(&sa.project_id, &sa.client_email, &sa.public_pem)
    })
    .await
    .unwrap()
}

/// GKE with Workload Identity: no key anywhere, `credentials = "adc"`, no project id in the
/// config. The gateway asks the metadata server (with `Metadata-Flavor: Google`) for the project
/// and a token, FCM accepts the token, and a token announced as short-lived is replaced before it
/// expires, without FCM ever having to reject one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_server_credentials_deliver_and_refresh_before_expiry() {
    let fcm = mock_fcm().await;
    let metadata = MockGoogleAuth::start(
        MockGoogleAuthConfig {
            project_id: account().project_id.clone(),
            advertised_lifetime: Some(Duration::from_secs(3)),
            ..Default::default()
        },
        fcm.issuer(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, addr) = spawn(
        dir.path(),
        &format!("credentials = \"adc\"\nendpoint = \"{}\"", fcm.url()),
        &[("GCE_METADATA_HOST", metadata.host())],
    );
    let mut client = connect(&gateway, &addr).await;
    let receipts = send(&mut client, 0..40).await;
    assert_delivered(&receipts, 40, &gateway);
    let stats = metadata.stats();
    assert_eq!(
        stats.metadata_refused, 0,
        "every request said Metadata-Flavor"
    );
    assert_eq!(
        stats.metadata_tokens, 1,
        "one token for 40 messages: {stats:?}"
    );
    assert_eq!(
        stats.metadata_requests, 2,
        "the token and the project id: {stats:?}"
    );
    assert_eq!(fcm.accepted().len(), 40);

    // The token was announced for 3 s: the gateway refreshes it 10% before that.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let receipts = send(&mut client, 100..140).await;
    assert_delivered(&receipts, 40, &gateway);
    let stats = metadata.stats();
    assert_eq!(
        stats.metadata_tokens, 2,
        "refreshed before expiry: {stats:?}"
    );
    assert_eq!(
        stats.metadata_requests, 3,
        "the project id is asked once: {stats:?}"
    );
    assert_eq!(fcm.stats().status(401), 0, "FCM never saw a stale token");
    assert_eq!(fcm.accepted().len(), 80);
    let log = gateway.log();
    assert!(
        log.contains("the metadata server") && log.contains("metadata_server"),
        "the start-up log says where the credentials came from:\n{log}"
    );
}

/// Workload identity federation from `GOOGLE_APPLICATION_CREDENTIALS`: a projected token file,
/// exchanged at STS, then traded for a service account's token at IAM Credentials, every
/// endpoint HTTPS with ALPN `http/1.1` only; the project from `GOOGLE_CLOUD_PROJECT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_federation_with_impersonation_over_http1_only_https() {
    let fcm = mock_fcm().await;
    let google = MockGoogleAuth::start(
        MockGoogleAuthConfig {
            tls: true,
            ..Default::default()
        },
        fcm.issuer(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("ksa-token");
    std::fs::write(&subject, format!("{}\n", google.config().subject_token)).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, google.ca_pem().unwrap()).unwrap();
    let adc = dir.path().join("adc.json");
    std::fs::write(
        &adc,
        serde_json::json!({
            "type": "external_account",
            "audience": google.config().audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": google.sts_url(),
            "service_account_impersonation_url": google.impersonation_url(),
            "credential_source": {"file": subject.display().to_string()},
        })
        .to_string(),
    )
    .unwrap();
    let (gateway, addr) = spawn(
        dir.path(),
        &format!(
            "endpoint = \"{}\"\nca_file = \"{}\"",
            fcm.url(),
            ca.display()
        ),
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", adc.display().to_string()),
            ("GOOGLE_CLOUD_PROJECT", account().project_id.clone()),
        ],
    );
    let mut client = connect(&gateway, &addr).await;
    let receipts = send(&mut client, 0..25).await;
    assert_delivered(&receipts, 25, &gateway);
    let stats = google.stats();
    assert_eq!(
        (stats.sts_tokens, stats.impersonation_tokens),
        (1, 1),
        "{stats:?}"
    );
    let form = google.last_sts_form().unwrap();
    assert_eq!(
        form.get("subject_token_type").map(String::as_str),
        Some("urn:ietf:params:oauth:token-type:jwt")
    );
    assert_eq!(
        form.get("scope").map(String::as_str),
        Some("https://www.googleapis.com/auth/cloud-platform")
    );
    assert_eq!(fcm.accepted().len(), 25);
    assert_eq!(fcm.stats().status(401), 0);
}

/// Executable-sourced credentials (Google's pluggable auth): a small script prints the subject
/// token in the documented JSON response, with an `expiration_time`; the gateway runs it with the
/// `GOOGLE_EXTERNAL_ACCOUNT_*` variables, exchanges the token at STS and delivers. Without
/// `GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1` it refuses to start, naming the variable.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_from_an_executable_credential_source() {
    use std::os::unix::fs::PermissionsExt;
    let fcm = mock_fcm().await;
    let google = MockGoogleAuth::start(MockGoogleAuthConfig::default(), fcm.issuer())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen-env");
    let script = dir.path().join("subject-token.sh");
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s %s %s' \"$GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE\" \"$GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE\" \"$GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE\" > {seen}\n\
             printf '{{\"version\": 1, \"success\": true, \"token_type\": \"urn:ietf:params:oauth:token-type:id_token\", \"id_token\": \"%s\", \"expiration_time\": {expires}}}' '{subject}'\n",
            seen = seen.display(),
            subject = google.config().subject_token,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let adc = dir.path().join("adc.json");
    std::fs::write(
        &adc,
        serde_json::json!({
            "type": "external_account",
            "audience": google.config().audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "token_url": google.sts_url(),
            "credential_source": {"executable": {"command": script.display().to_string(), "timeout_millis": 10000}},
        })
        .to_string(),
    )
    .unwrap();
    let env = |allow: bool| {
        let mut env = vec![
            ("GOOGLE_APPLICATION_CREDENTIALS", adc.display().to_string()),
            ("GOOGLE_CLOUD_PROJECT", account().project_id.clone()),
        ];
        if allow {
            env.push(("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1".to_string()));
        }
        env
    };
    let fcm_section = format!("endpoint = \"{}\"", fcm.url());

    // Not allowed: the gateway exits at start and says why.
    let refused = dir.path().join("refused");
    std::fs::create_dir_all(&refused).unwrap();
    let (mut gateway, _) = spawn(&refused, &fcm_section, &env(false));
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = gateway.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "started anyway:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!exit.success());
    assert!(
        gateway
            .log()
            .contains("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1"),
        "{}",
        gateway.log()
    );
    assert!(!seen.exists(), "the executable must not have run");

    let (gateway, addr) = spawn(dir.path(), &fcm_section, &env(true));
    let mut client = connect(&gateway, &addr).await;
    let receipts = send(&mut client, 0..10).await;
    assert_delivered(&receipts, 10, &gateway);
    assert_eq!(google.stats().sts_tokens, 1, "{:?}", google.stats());
    let form = google.last_sts_form().unwrap();
    assert_eq!(
        form.get("subject_token").map(String::as_str),
        Some(google.config().subject_token.as_str())
    );
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        format!(
            "{} urn:ietf:params:oauth:token-type:id_token 0",
            google.config().audience
        )
    );
    assert_eq!(fcm.accepted().len(), 10);
}

/// The failure of the issue: a service-account key whose `token_uri` speaks HTTP/1.1 only over
/// HTTPS. Before, every message failed with "did not negotiate HTTP/2 (ALPN h2)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_key_with_an_http1_only_token_endpoint() {
    let fcm = mock_fcm().await;
    let google = MockGoogleAuth::start(
        MockGoogleAuthConfig {
            tls: true,
            ..Default::default()
        },
        fcm.issuer(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut key: serde_json::Value = serde_json::from_str(&account().json).unwrap();
    key["token_uri"] = serde_json::Value::from(google.token_uri());
    let key_file = dir.path().join("sa.json");
    std::fs::write(&key_file, key.to_string()).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, google.ca_pem().unwrap()).unwrap();
    let (gateway, addr) = spawn(
        dir.path(),
        &format!(
            "credentials_file = \"{}\"\nendpoint = \"{}\"\nca_file = \"{}\"",
            key_file.display(),
            fcm.url(),
            ca.display()
        ),
        &[],
    );
    let mut client = connect(&gateway, &addr).await;
    let receipts = send(&mut client, 0..25).await;
    assert_delivered(&receipts, 25, &gateway);
    assert_eq!(google.stats().jwt_requests, 1);
    assert_eq!(fcm.stats().tokens_issued, 1);
    assert_eq!(fcm.accepted().len(), 25);
}
