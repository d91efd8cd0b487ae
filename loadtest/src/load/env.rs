//! The environment of a run: the mock APNs and FCM (started here, on the caller's runtime), and
//! the gateway as a child process with a generated config pointing at them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use pushgate_mocks::apns::{MockApns, MockApnsConfig};
use pushgate_mocks::fcm::{MockFcm, MockFcmConfig, RetryAfter};
use pushgate_mocks::keys::{ApnsKey, ServiceAccount};

use super::settings::Settings;

/// The FCM project every app's service account belongs to.
pub const PROJECT_ID: &str = "pushgate-load";

/// The APNs device token of pool slot `n`: 64 hex digits.
pub fn apns_token(n: u64) -> String {
    format!("{n:064x}")
}

/// The FCM registration token of pool slot `n`, shaped (and sized, ~160 chars) like a real one.
pub fn fcm_token(n: u64) -> String {
    format!(
        "d{n:010}:APA91bH{}",
        "Xq7vLk2mPz9TbR4sWn8yJc3FgDh6KeUa1oQi5lMrNtVbZxCw0EpYuGjHs_-"
            .repeat(3)
            .get(..150)
            .unwrap_or_default()
    )
}

/// APNs bundle id of app `i`.
pub fn topic(i: usize) -> String {
    format!("com.example.load{i}")
}

/// App id of app `i`.
pub fn app_id(i: usize) -> String {
    format!("app{i}")
}

/// True when pool slot `n` is registered as dead at the mocks.
pub fn is_dead(n: u64, per_mille: u32) -> bool {
    n % 1000 < u64::from(per_mille)
}

/// The running mocks and the credentials they trust.
pub struct Mocks {
    pub apns: MockApns,
    pub fcm: MockFcm,
    pub apns_key: ApnsKey,
    pub account: ServiceAccount,
    /// The service-account JSON with `token_uri` pointing at the FCM mock.
    pub account_json: String,
}

impl Mocks {
    /// Requests both mocks answered so far.
    pub fn requests(&self) -> u64 {
        self.apns.stats().requests + self.fcm.stats().requests
    }

    /// Drains and stops both.
    pub async fn shutdown(self) {
        self.apns.shutdown().await;
        self.fcm.shutdown().await;
    }
}

/// Generates credentials and starts both mocks with the run's latency and faults.
pub async fn start_mocks(s: &Settings) -> anyhow::Result<Mocks> {
    let apns_key = pushgate_mocks::keys::try_generate_apns_key()?;
    // The token_uri is only known once the FCM mock listens; the key pair does not depend on it.
    let account = pushgate_mocks::keys::try_generate_service_account(
        PROJECT_ID,
        "https://127.0.0.1:1/token",
    )?;
    let latency = s.latency();

    let mut apns_cfg =
        MockApnsConfig::new(&apns_key.team_id, &apns_key.key_id, &apns_key.public_pem);
    apns_cfg.tls = !s.cleartext;
    apns_cfg.latency = latency;
    apns_cfg.record_accepted = false;
    let apns = MockApns::start(apns_cfg).await?;

    let mut fcm_cfg = MockFcmConfig::new(PROJECT_ID, &account.client_email, &account.public_pem);
    fcm_cfg.tls = !s.cleartext;
    fcm_cfg.latency = latency;
    fcm_cfg.record_accepted = false;
    let fcm = MockFcm::start(fcm_cfg).await?;

    let mut json: serde_json::Value =
        serde_json::from_str(&account.json).context("generated service account JSON")?;
    json["token_uri"] = serde_json::Value::String(fcm.token_uri());
    let account_json = serde_json::to_string_pretty(&json)?;

    let af = apns.faults();
    af.set_too_many_requests_per_mille(s.fault_429_per_mille);
    af.set_internal_error_per_mille(s.fault_500_per_mille);
    af.set_unavailable_per_mille(s.fault_503_per_mille);
    let ff = fcm.faults();
    ff.set_quota_exceeded_per_mille(s.fault_429_per_mille);
    ff.set_internal_per_mille(s.fault_500_per_mille);
    ff.set_unavailable_per_mille(s.fault_503_per_mille);
    match s.fcm_retry_after_secs {
        Some(0) => ff.set_retry_after(RetryAfter::None),
        Some(secs) => ff.set_retry_after(RetryAfter::Seconds(secs)),
        None => {}
    }
    if s.unregistered_per_mille > 0 {
        for n in (0..s.token_pool).filter(|n| is_dead(*n, s.unregistered_per_mille)) {
            af.add_unregistered(&apns_token(n), None);
            ff.add_unregistered(&fcm_token(n));
        }
    }
    Ok(Mocks {
        apns,
        fcm,
        apns_key,
        account,
        account_json,
    })
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> anyhow::Result<Scratch> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("pushgate-loadtest-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// Writes credentials and the gateway config into `dir`; returns the config path.
pub fn write_gateway_config(
    s: &Settings,
    mocks: &Mocks,
    dir: &Path,
    port: u16,
    redis_url: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let key_file = dir.join(format!("AuthKey_{}.p8", mocks.apns_key.key_id));
    std::fs::write(&key_file, &mocks.apns_key.private_p8_pem)?;
    let sa_file = dir.join("service-account.json");
    std::fs::write(&sa_file, &mocks.account_json)?;
    let mut ca_lines = (String::new(), String::new());
    if let Some(pem) = mocks.apns.ca_pem() {
        let f = dir.join("apns-ca.pem");
        std::fs::write(&f, pem)?;
        ca_lines.0 = format!("ca_file = {}\n", toml_path(&f));
    }
    if let Some(pem) = mocks.fcm.ca_pem() {
        let f = dir.join("fcm-ca.pem");
        std::fs::write(&f, pem)?;
        ca_lines.1 = format!("ca_file = {}\n", toml_path(&f));
    }
    let mut cfg = format!("listen = \"127.0.0.1:{port}\"\n\n[pipeline]\n");
    if let Some(w) = s.accept_window {
        writeln!(cfg, "accept_window = {w}")?;
    }
    if let Some(m) = s.max_in_flight_requests {
        writeln!(cfg, "max_in_flight_requests = {m}")?;
    }
    writeln!(cfg, "shutdown_grace_secs = 5")?;
    write!(
        cfg,
        "\n[retry]\nbase_ms = {}\ncap_ms = {}\nmax_attempts = {}\n",
        s.retry_base_ms,
        (s.retry_base_ms * 20).max(1000),
        s.retry_max_attempts
    )?;
    if let Some(url) = redis_url {
        write!(cfg, "\n[redis]\nurl = {}\n", toml_str(url))?;
    }
    // Quiet hours that do not fire during the run: a minute, twelve hours from now (UTC).
    let quiet_from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60 + 12 * 60);
    let hh_mm = |minute: u64| format!("{:02}:{:02}", (minute / 60) % 24, minute % 60);
    for i in 0..s.apps {
        let caps = match (&s.frequency_caps, s.policies) {
            (Some(caps), _) => Some(caps.as_str()),
            (None, true) => Some(r#"[{ max = 3, window = "1d" }, { max = 10, window = "7d" }]"#),
            (None, false) => None,
        };
        if let Some(caps) = caps {
            write!(cfg, "\n[apps.{}]\nfrequency_caps = {caps}\n", app_id(i))?;
        }
        if s.policies {
            write!(
                cfg,
                "default_timezone = \"UTC\"\n\n[apps.{}.quiet_hours]\nstart = \"{}\"\nend = \"{}\"\naction = \"defer\"\n",
                app_id(i),
                hh_mm(quiet_from),
                hh_mm(quiet_from + 1),
            )?;
        }
        write!(
            cfg,
            "\n[apps.{app}.apns]\nkey_file = {key}\nkey_id = {kid}\nteam_id = {team}\n\
             topic = {topic}\nendpoint = {ep}\nconnections = {conns}\n{ca}\
             \n[apps.{app}.fcm]\ncredentials_file = {sa}\nendpoint = {fep}\nconnections = {conns}\n{fca}",
            app = app_id(i),
            key = toml_path(&key_file),
            kid = toml_str(&mocks.apns_key.key_id),
            team = toml_str(&mocks.apns_key.team_id),
            topic = toml_str(&topic(i)),
            ep = toml_str(&mocks.apns.url()),
            conns = s.gateway_connections,
            ca = ca_lines.0,
            sa = toml_path(&sa_file),
            fep = toml_str(&mocks.fcm.url()),
            fca = ca_lines.1,
        )?;
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// A free port on 127.0.0.1 (bound, then released: a small race the caller accepts).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The gateway child process.
pub struct GatewayChild {
    child: tokio::process::Child,
    pub pid: u32,
    pub addr: String,
    pub log: PathBuf,
}

impl GatewayChild {
    /// Starts `bin serve --config <config>` and waits (up to 20 s) until it accepts connections.
    pub async fn start(
        bin: &Path,
        config: &Path,
        port: u16,
        dir: &Path,
    ) -> anyhow::Result<GatewayChild> {
        let log = dir.join("gateway.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut child = gateway_command(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("gateway child has no pid")?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("the gateway exited at start ({status}):\n{tail}");
            }
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the gateway did not listen on {addr} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(GatewayChild {
            child,
            pid,
            addr,
            log,
        })
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(r) => {
                r?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(())
    }
}

/// A command that runs the gateway binary `bin` with the tool's environment minus every
/// `PUSHGATE_*` variable: the gateway reads those as configuration keys, and the tool's own
/// (`PUSHGATE_LOG`, `PUSHGATE_CHAOS_KEEP`) are none. `PUSHGATE_LOG` becomes its `RUST_LOG`.
pub fn gateway_command(bin: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PUSHGATE_") {
            command.env_remove(key);
        }
    }
    command.env(
        "RUST_LOG",
        std::env::var("PUSHGATE_LOG").unwrap_or("warn".into()),
    );
    command
}

/// The APNs token of dead slot `n` (apart from the traffic's pool).
pub fn dead_token(n: u64) -> String {
    format!("dead{n:060x}")
}
