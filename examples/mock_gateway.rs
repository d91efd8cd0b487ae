//! A gateway on mock APNs and FCM, for tools that test it from outside: the gRPC and HTTP/JSON
//! APIs on free loopback ports, one app `shop` with both providers and an API key, and the
//! addresses written to a file. `scripts/schemathesis.sh` runs schemathesis against it; it is
//! also a quick way to try `pushgate send` or curl without Apple or Google accounts.
//!
//! ```sh
//! cargo run --example mock_gateway -- --addr-file /tmp/gw.env --api-key my-test-key-0123456789
//! # /tmp/gw.env: GRPC=127.0.0.1:PORT, HTTP=127.0.0.1:PORT; runs until SIGINT/SIGTERM
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use pushgate::config::Config;
use pushgate_mocks::apns::{MockApns, MockApnsConfig};
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig};

#[derive(Parser)]
struct Options {
    /// Where to write `GRPC=<addr>` and `HTTP=<addr>` once listening.
    #[arg(long)]
    addr_file: PathBuf,
    /// The API key of app `shop` (none: the API is open, as in development); an admin key, so
    /// it may use the dead-letter operations too.
    #[arg(long)]
    api_key: Option<String>,
    /// Durable delivery on this Redis (`redis://127.0.0.1:PORT/0`): dead letters are kept, so
    /// the admin operations are served.
    #[arg(long)]
    redis_url: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    tokio::runtime::Runtime::new()?.block_on(run(options))
}

async fn run(options: Options) -> anyhow::Result<()> {
    let key = pushgate_mocks::keys::try_generate_apns_key().context("generating an APNs key")?;
    let mut apns_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    apns_config.tls = false;
    apns_config.topics = vec!["com.example.shop".into()];
    apns_config.record_accepted = false;
    let apns = MockApns::start(apns_config).await?;
    let account = pushgate_mocks::keys::try_generate_service_account(
        "mock-shop",
        "https://127.0.0.1:1/token",
    )
    .context("generating a service account")?;
    let mut fcm_config = MockFcmConfig::new(
        &account.project_id,
        &account.client_email,
        &account.public_pem,
    );
    fcm_config.tls = false;
    fcm_config.record_accepted = false;
    let fcm = MockFcm::start(fcm_config).await?;
    let mut account_json: serde_json::Value = serde_json::from_str(&account.json)?;
    account_json["token_uri"] = serde_json::Value::from(fcm.token_uri());

    let dir = tempfile::tempdir()?;
    let account_file = dir.path().join("service-account.json");
    std::fs::write(&account_file, serde_json::to_vec(&account_json)?)?;
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(&key_file, &key.private_p8_pem)?;
    let api_keys = match &options.api_key {
        Some(k) => format!("admin_keys = [{k:?}]"),
        None => String::new(),
    };
    let redis = options
        .redis_url
        .map(|url| format!("[redis]\nurl = {url:?}\n"))
        .unwrap_or_default();
    let config = Config::from_toml(&format!(
        r#"
        listen = "127.0.0.1:0"
        http_listen = "127.0.0.1:0"
        [pipeline]
        shutdown_grace_secs = 2
        [retry]
        base_ms = 20
        cap_ms = 200
        max_attempts = 3
        [apps.shop]
        {api_keys}
        [apps.shop.apns]
        key_file = "{key_file}"
        key_id = "{key_id}"
        team_id = "{team_id}"
        topic = "com.example.shop"
        endpoint = "{apns}"
        [apps.shop.fcm]
        credentials_file = "{account_file}"
        endpoint = "{fcm}"
        {redis}
        "#,
        key_file = key_file.display(),
        key_id = key.key_id,
        team_id = key.team_id,
        apns = apns.url(),
        account_file = account_file.display(),
        fcm = fcm.url(),
    ))?;
    let running = pushgate::app::start(config).await?;
    let http = running.http_addr.context("http_listen is set")?;
    let tmp = options.addr_file.with_extension("tmp");
    std::fs::write(&tmp, format!("GRPC={}\nHTTP={http}\n", running.addr))?;
    std::fs::rename(&tmp, &options.addr_file)?;
    pushgate::app::shutdown_signal().await;
    running.shutdown().await?;
    apns.shutdown().await;
    fcm.shutdown().await;
    Ok(())
}
