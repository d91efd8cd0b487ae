//! Test harness: a real gateway on a free port, a real gRPC client, and a mock APNs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

pub mod reply_cut;
pub mod tls;

use pushgate::app::Running;
use pushgate::config::Config;
use pushgate::proto::push_gateway_client::PushGatewayClient;
use pushgate::proto::{self, Receipt, ReceiptStatus};
use pushgate_mocks::apns::{MockApns, MockApnsConfig};
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig};
use tonic::transport::Channel;

pub const TOPIC: &str = "com.example.shop";

pub struct Harness {
    pub mock: MockApns,
    /// Present when `Options::fcm` is set.
    pub fcm: Option<MockFcm>,
    pub gateway: Running,
    pub dir: tempfile::TempDir,
    pub key: pushgate_mocks::keys::ApnsKey,
    /// The gateway's config as a file (what a reload re-reads).
    pub config_file: std::path::PathBuf,
}

/// Extra TOML appended to the gateway config (pipeline/retry sections).
pub struct Options {
    pub tls: bool,
    pub pipeline: String,
    pub retry: String,
    pub mock: Box<dyn FnOnce(&mut MockApnsConfig)>,
    /// Also start a mock FCM (with its token endpoint) and give the app FCM credentials.
    pub fcm: bool,
    /// API keys of the app `shop` (none: the API is open).
    pub api_keys: Vec<String>,
    /// Admin keys of the app `shop`.
    pub admin_keys: Vec<String>,
    /// More apps, each with shop's APNs credentials and mock (same topic).
    pub more_apps: Vec<MoreApp>,
    /// Top-level keys (before any section), e.g. `allow_unauthenticated = true`.
    pub top: String,
    /// Appended at the end of the config (e.g. a `[redis]` or `[tls]` section).
    pub extra: String,
    /// Keys of the `[apps.shop]` table itself (e.g. `frequency_caps = [...]`).
    pub shop: String,
    /// The policy stage's clock (default: the system's).
    pub clock: pushgate::domain::Clock,
}

/// Another app of the harness gateway, sharing shop's APNs credentials.
#[derive(Default, Clone)]
pub struct MoreApp {
    pub id: String,
    pub api_keys: Vec<String>,
    pub admin_keys: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tls: false,
            pipeline: "shutdown_grace_secs = 5".into(),
            retry: "base_ms = 5\ncap_ms = 50\nmax_attempts = 6".into(),
            mock: Box::new(|_| {}),
            fcm: false,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            more_apps: Vec::new(),
            top: String::new(),
            extra: String::new(),
            shop: String::new(),
            clock: pushgate::domain::Clock::system(),
        }
    }
}

pub async fn start(options: Options) -> Harness {
    let key = pushgate_mocks::keys::generate_apns_key();
    let mut mock_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    mock_config.tls = options.tls;
    mock_config.topics = vec![TOPIC.into()];
    (options.mock)(&mut mock_config);
    let mock = MockApns::start(mock_config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(&key_file, &key.private_p8_pem).unwrap();
    let ca_line = match mock.ca_pem() {
        Some(pem) => {
            let ca = dir.path().join("ca.pem");
            std::fs::write(&ca, pem).unwrap();
            format!("ca_file = \"{}\"", ca.display())
        }
        None => String::new(),
    };
    let (fcm, fcm_section) = if options.fcm {
        let (mock, section) = start_fcm(dir.path()).await;
        (Some(mock), section)
    } else {
        (None, String::new())
    };
    let apns_section = |app: &str| {
        format!(
            "[apps.{app}.apns]\nkey_file = \"{}\"\nkey_id = \"{}\"\nteam_id = \"{}\"\ntopic = \"{TOPIC}\"\nendpoint = \"{}\"\nconnections = 2\nrequest_timeout_ms = 5000\n{ca_line}\n",
            key_file.display(),
            key.key_id,
            key.team_id,
            mock.url()
        )
    };
    let more_apps: String = options
        .more_apps
        .iter()
        .map(|a| {
            format!(
                "[apps.{}]\napi_keys = {:?}\nadmin_keys = {:?}\n{}",
                a.id,
                a.api_keys,
                a.admin_keys,
                apns_section(&a.id)
            )
        })
        .collect();
    let config_text = format!(
        r#"
        listen = "127.0.0.1:0"
        {top}
        [pipeline]
        {pipeline}
        [retry]
        {retry}
        [apps.shop]
        api_keys = {api_keys:?}
        admin_keys = {admin_keys:?}
        {shop}
        [apps.shop.apns]
        key_file = "{key_file}"
        key_id = "{key_id}"
        team_id = "{team_id}"
        topic = "{TOPIC}"
        endpoint = "{endpoint}"
        connections = 2
        request_timeout_ms = 5000
        {ca_line}
        {fcm_section}
        {more_apps}
        {extra}
        "#,
        top = options.top,
        shop = options.shop,
        extra = options.extra,
        pipeline = options.pipeline,
        api_keys = options.api_keys,
        admin_keys = options.admin_keys,
        retry = options.retry,
        key_file = key_file.display(),
        key_id = key.key_id,
        team_id = key.team_id,
        endpoint = mock.url(),
    );
    let config_file = dir.path().join("pushgate.toml");
    std::fs::write(&config_file, &config_text).unwrap();
    let config = Config::from_toml(&config_text).unwrap();
    let gateway = pushgate::app::start_with_clock(config, options.clock)
        .await
        .unwrap();
    Harness {
        mock,
        fcm,
        gateway,
        dir,
        key,
        config_file,
    }
}

/// RSA key generation is slow in debug builds: one service account per test binary.
fn service_account() -> &'static pushgate_mocks::keys::ServiceAccount {
    static ACCOUNT: std::sync::OnceLock<pushgate_mocks::keys::ServiceAccount> =
        std::sync::OnceLock::new();
    ACCOUNT.get_or_init(|| {
        pushgate_mocks::keys::generate_service_account("pushgate-test", "https://127.0.0.1:1/token")
    })
}

async fn start_fcm(dir: &std::path::Path) -> (MockFcm, String) {
    let account = service_account();
    let mut config = MockFcmConfig::new(
        &account.project_id,
        &account.client_email,
        &account.public_pem,
    );
    config.tls = false;
    let mock = MockFcm::start(config).await.unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&account.json).unwrap();
    json["token_uri"] = serde_json::Value::from(mock.token_uri());
    let file = dir.join("service-account.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let section = format!(
        "[apps.shop.fcm]\ncredentials_file = \"{}\"\nendpoint = \"{}\"\nconnections = 2\nrequest_timeout_ms = 5000\n",
        file.display(),
        mock.url()
    );
    (mock, section)
}

impl Harness {
    pub fn fcm(&self) -> &MockFcm {
        self.fcm.as_ref().unwrap()
    }

    pub async fn client(&self) -> PushGatewayClient<Channel> {
        PushGatewayClient::new(self.channel().await)
    }

    /// A connection to the gateway, for clients other than `PushGateway`.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.gateway.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn unresolved_drops(&self) -> u64 {
        self.gateway.gateway.metrics().unresolved_drops.get()
    }
}

pub fn token(n: u64) -> String {
    format!("{n:064x}")
}

pub fn recipient(n: u64, vars: &[(&str, &str)]) -> proto::Recipient {
    proto::Recipient {
        message_id: format!("m-{n}"),
        platform: proto::Platform::Apns as i32,
        device_token: token(n),
        vars: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        user_id: format!("u-{n}"),
        ..Default::default()
    }
}

pub fn fcm_token(n: u64) -> String {
    format!("fcm-{n}:APA91b{n:016}")
}

pub fn fcm_recipient(n: u64, vars: &[(&str, &str)]) -> proto::Recipient {
    proto::Recipient {
        platform: proto::Platform::Fcm as i32,
        device_token: fcm_token(n),
        ..recipient(n, vars)
    }
}

/// A batch of APNs recipients `ids` for `app_id` (title "Hi"), answered with its receipts.
pub fn apns_batch(app_id: &str, ids: std::ops::Range<u64>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: app_id.into(),
        template: Some(template("Hi", "")),
        recipients: ids.map(|n| recipient(n, &[])).collect(),
        wait_for_receipts: true,
        ..Default::default()
    }
}

pub fn template(title: &str, body: &str) -> proto::Template {
    proto::Template {
        title: title.into(),
        body: body.into(),
        ..Default::default()
    }
}

pub fn status(r: &Receipt) -> ReceiptStatus {
    ReceiptStatus::try_from(r.status).unwrap()
}

pub fn path(p: &str) -> PathBuf {
    PathBuf::from(p)
}

/// Streams `batches` through StreamSend and returns every receipt (terminal and not) in order.
pub async fn stream_all(h: &Harness, batches: Vec<proto::SendBatchRequest>) -> Vec<Receipt> {
    let mut client = h.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut inbound = client
        .stream_send(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let producer = tokio::spawn(async move {
        for b in batches {
            tx.send(b).await.unwrap();
        }
    });
    let mut receipts = Vec::new();
    while let Some(r) = inbound.message().await.unwrap() {
        receipts.push(r);
    }
    producer.await.unwrap();
    receipts
}

/// The terminal receipts by message id, asserting there is at most one per message.
pub fn terminal_by_message(receipts: &[Receipt]) -> std::collections::HashMap<String, Receipt> {
    let mut out = std::collections::HashMap::new();
    for r in receipts.iter().filter(|r| r.terminal) {
        assert!(
            out.insert(r.message_id.clone(), r.clone()).is_none(),
            "two terminal receipts for {}",
            r.message_id
        );
    }
    out
}
