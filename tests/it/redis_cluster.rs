//! Durable delivery on a real three-node Redis Cluster (`redis.cluster_nodes`): retries parked
//! and claimed across slots owned by different nodes, receipts appended to each app's stream and
//! replayed from it.

use crate::harness;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pushgate::config::Config;
use pushgate::proto::push_gateway_client::PushGatewayClient;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::apns::{MockApns, MockApnsConfig};

const TOPIC: &str = "com.example.shop";
const APPS: [&str; 3] = ["shop", "news", "games"];

/// Three cluster-enabled redis-servers on free ports, joined into one cluster. Killed on drop.
struct Cluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for i in 0..3 {
            // A cluster node also listens on port + 10000 for its bus: keep both free.
            let port = loop {
                let p = free_port();
                if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                    break p;
                }
            };
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is not installed: run the README set-up (scripts/setup.sh)");
            ports.push(port);
            children.push(child);
        }
        for port in &ports {
            wait_for(|| cli(*port, &["PING"]).is_some_and(|o| o.contains("PONG")));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is not installed: run the README set-up (scripts/setup.sh)");
        assert!(status.success(), "redis-cli --cluster create failed");
        for port in &ports {
            wait_for(|| {
                cli(*port, &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok"))
            });
        }
        Self {
            ports,
            children,
            _dir: dir,
        }
    }

    fn seeds(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the node that owns `key` (the others answer MOVED).
    fn owner_of(&self, key: &str) -> u16 {
        *self
            .ports
            .iter()
            .find(|p| cli(**p, &["TYPE", key]).is_some_and(|o| !o.contains("MOVED")))
            .unwrap()
    }
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "redis cluster did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_delivery_on_a_redis_cluster() {
    let cluster = Cluster::start();
    let key = pushgate_mocks::keys::generate_apns_key();
    let mut mock_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    mock_config.tls = false;
    let mock = MockApns::start(mock_config).await.unwrap();
    // Every 10th request is a 503: those retries are parked in and claimed from the cluster.
    mock.faults().set_unavailable_per_mille(100);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("AuthKey.p8");
    std::fs::write(&key_file, &key.private_p8_pem).unwrap();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\n[retry]\nbase_ms = 20\ncap_ms = 100\nmax_attempts = 8\n\
         [redis]\ncluster_nodes = {seeds:?}\npoll_ms = 20\n",
        seeds = cluster.seeds()
    );
    for app in APPS {
        toml.push_str(&format!(
            "[apps.{app}.apns]\nkey_file = \"{file}\"\nkey_id = \"{kid}\"\nteam_id = \"{tid}\"\n\
             topic = \"{TOPIC}\"\nendpoint = \"{url}\"\n",
            file = key_file.display(),
            kid = key.key_id,
            tid = key.team_id,
            url = mock.url(),
        ));
    }
    let gateway = pushgate::app::start(Config::from_toml(&toml).unwrap())
        .await
        .unwrap();
    let store = gateway.gateway.store();
    assert_eq!(store.name(), "redis", "durable delivery on");
    let mut health = store.health();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), health.wait_for(|h| *h))
            .await
            .is_ok_and(|r| r.is_ok()),
        "the gateway reached the cluster"
    );
    let mut client = PushGatewayClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    const PER_APP: u64 = 300;
    let mut statuses: HashMap<String, i32> = HashMap::new();
    for (a, app) in APPS.iter().enumerate() {
        let first = a as u64 * PER_APP;
        let response = client
            .send_batch(harness::apns_batch(app, first..first + PER_APP))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u64::from(response.accepted), PER_APP);
        for r in response.receipts {
            assert!(statuses.insert(r.message_id.clone(), r.status).is_none());
        }
    }
    assert_eq!(statuses.len() as u64, 3 * PER_APP);
    assert!(
        statuses
            .values()
            .all(|s| *s == ReceiptStatus::Delivered as i32)
    );
    assert!(mock.stats().status(503) > 0, "some attempts were retried");
    let mut seen: HashMap<String, u32> = HashMap::new();
    for a in mock.accepted() {
        *seen.entry(a.device_token).or_default() += 1;
    }
    assert_eq!(seen.len() as u64, 3 * PER_APP);
    assert!(seen.values().all(|&c| c == 1), "nothing delivered twice");

    // The apps' keys live on more than one node (hash tags spread apps over slots).
    let owners: std::collections::HashSet<u16> = APPS
        .iter()
        .map(|app| cluster.owner_of(&format!("pushgate:{{{app}}}:receipts")))
        .collect();
    assert!(
        owners.len() >= 2,
        "apps landed on one node only: {owners:?}"
    );

    // Each app's receipts stream replays from the cluster.
    for app in APPS {
        let mut stream = client
            .subscribe_receipts(proto::SubscribeReceiptsRequest {
                app_id: app.to_string(),
                resume_after: "0".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut terminal = 0;
        while terminal < PER_APP {
            let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("receipts replayed from the stream")
                .unwrap()
                .unwrap();
            assert_eq!(r.app_id, app);
            assert!(!r.cursor.is_empty());
            if r.terminal {
                terminal += 1;
            }
        }
    }
    gateway.shutdown().await.unwrap();
}
