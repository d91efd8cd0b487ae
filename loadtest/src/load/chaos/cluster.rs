//! The processes a chaos run starts and breaks: the gateway replicas (`pushgate serve` children
//! it can `kill -9`, SIGTERM and start again on the same port), and Redis: one persistent
//! `redis-server` (AOF, fsync always, so a restart keeps every write), or a primary with a
//! replica under three Sentinels.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pushgate_mocks::redis_server::{RedisSentinel, RedisServer};

use super::super::proto::push_gateway_client::PushGatewayClient;

/// One gateway replica.
pub struct Replica {
    pub index: usize,
    pub port: u16,
    pub config: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    child: Option<tokio::process::Child>,
    /// How many times it was started (logs are kept per start).
    pub starts: u32,
}

impl Replica {
    pub fn new(index: usize, port: u16, config: PathBuf, dir: &Path, bin: &Path) -> Self {
        Self {
            index,
            port,
            config,
            log: dir.join(format!("gateway-{index}.log")),
            bin: bin.to_path_buf(),
            child: None,
            starts: 0,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Starts `pushgate serve` and waits until it listens (at most 30 s).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let err = log.try_clone()?;
        let mut child = crate::load::env::gateway_command(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                // The cause, not the end of a backtrace: from the first error or panic line.
                let first = lines
                    .iter()
                    .position(|l| l.contains("panicked at") || l.starts_with("Error"))
                    .unwrap_or(lines.len().saturating_sub(15));
                let tail: Vec<&str> = lines.iter().skip(first).take(15).copied().collect();
                bail!(
                    "gateway {} exited at start ({status}): {tail:?}",
                    self.index
                );
            }
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway {} did not listen on {addr} within 30 s",
                    self.index
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, then waits for the orderly shutdown (SIGKILL after `limit`).
    pub async fn terminate(&mut self, limit: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            signal(pid, "TERM").await;
        }
        if tokio::time::timeout(limit, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }

    /// Waits until the replica reports SERVING (at most `limit`).
    pub async fn wait_serving(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if serving(&self.url()).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The gRPC client of this replica.
    pub async fn client(&self) -> anyhow::Result<PushGatewayClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(self.url())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        Ok(PushGatewayClient::new(channel))
    }
}

/// Sends `kill -<sig> pid` (a process this run started).
pub async fn signal(pid: u32, sig: &str) {
    let _ = tokio::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// True when the gateway at `url` answers health SERVING for `pushgate.v1.PushGateway`.
pub async fn serving(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_string()) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pushgate.v1.PushGateway".into(),
        })
        .await
        .is_ok_and(|r| {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
}

/// The Redis of a chaos run.
pub enum Redis {
    /// One persistent server.
    Single(RedisServer),
    /// Two servers (`primary` indexes the one the Sentinels name) and three Sentinels.
    Sentinel {
        servers: [RedisServer; 2],
        primary: usize,
        sentinels: Vec<RedisSentinel>,
    },
}

impl Redis {
    pub fn single() -> anyhow::Result<Self> {
        anyhow::ensure!(
            RedisServer::binary_available(),
            "chaos runs need `redis-server` (apt-get install -y redis-server)"
        );
        Ok(Redis::Single(RedisServer::start_persistent()))
    }

    /// One persistent server inside the network namespace `ns`, bound to `addr` there.
    pub fn single_in_netns(ns: &str, addr: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            RedisServer::binary_available(),
            "chaos runs need `redis-server` (apt-get install -y redis-server)"
        );
        Ok(Redis::Single(RedisServer::start_persistent_in_netns(
            ns, addr,
        )))
    }

    /// A primary, a replica in sync, and three Sentinels (quorum 2, down after 1 s) that know
    /// both and each other.
    pub async fn sentinel() -> anyhow::Result<Self> {
        anyhow::ensure!(
            RedisServer::binary_available(),
            "chaos runs need `redis-server` (apt-get install -y redis-server)"
        );
        let primary = RedisServer::start_persistent();
        let replica = RedisServer::start_replica_of(&primary);
        wait_for("the replica to sync", Duration::from_secs(30), || async {
            info(&replica.url(), "replication")
                .await
                .is_some_and(|i| i.contains("master_link_status:up"))
        })
        .await?;
        let sentinels: Vec<RedisSentinel> = (0..3)
            .map(|_| RedisSentinel::start(primary.port(), 2, 1_000))
            .collect();
        for s in &sentinels {
            let url = s.url();
            wait_for(
                "the Sentinels to know the replica and each other",
                Duration::from_secs(30),
                || {
                    let url = url.clone();
                    async move {
                        let replicas = sentinel_count(&url, "replicas").await;
                        let others = sentinel_count(&url, "sentinels").await;
                        replicas == Some(1) && others == Some(2)
                    }
                },
            )
            .await?;
        }
        Ok(Redis::Sentinel {
            servers: [primary, replica],
            primary: 0,
            sentinels,
        })
    }

    /// The `[redis]` keys that point a gateway at this Redis.
    pub fn config_keys(&self) -> String {
        match self {
            Redis::Single(s) => format!("url = \"{}\"\n", s.url()),
            Redis::Sentinel { sentinels, .. } => {
                let urls: Vec<String> = sentinels.iter().map(RedisSentinel::url).collect();
                format!(
                    "sentinels = {urls:?}\nsentinel_master = \"{}\"\n",
                    RedisSentinel::MASTER
                )
            }
        }
    }

    /// The URL of the node that is primary now.
    pub fn primary_url(&self) -> String {
        match self {
            Redis::Single(s) => s.url(),
            Redis::Sentinel {
                servers, primary, ..
            } => servers[*primary].url(),
        }
    }

    /// Every node's URL (the receipts reader tries them for the primary).
    pub fn node_urls(&self) -> Vec<String> {
        match self {
            Redis::Single(s) => vec![s.url()],
            Redis::Sentinel { servers, .. } => servers.iter().map(RedisServer::url).collect(),
        }
    }

    /// `kill -9` of the (primary) server, restarted after `down`; with Sentinels, a failover:
    /// waits until the Sentinels promote the replica, then starts the old primary again as a
    /// replica of the new one.
    pub async fn break_primary(&mut self, down: Duration) -> anyhow::Result<String> {
        match self {
            Redis::Single(s) => {
                s.stop();
                tokio::time::sleep(down).await;
                s.restart();
                Ok("redis_restart".into())
            }
            Redis::Sentinel {
                servers,
                primary,
                sentinels,
            } => {
                let old = *primary;
                let new = 1 - old;
                servers[old].stop();
                let want = servers[new].port();
                let url = sentinels[0].url();
                wait_for(
                    "the Sentinels to promote the replica",
                    Duration::from_secs(60),
                    || {
                        let url = url.clone();
                        async move { sentinel_primary(&url).await == Some(want) }
                    },
                )
                .await?;
                servers[old].restart_as_replica_of(want);
                *primary = new;
                Ok("sentinel_failover".into())
            }
        }
    }
}

async fn info(url: &str, section: &str) -> Option<String> {
    let mut conn = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .ok()
}

async fn sentinel_count(url: &str, what: &str) -> Option<usize> {
    let mut conn = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let v: Vec<redis::Value> = redis::cmd("SENTINEL")
        .arg(what)
        .arg(RedisSentinel::MASTER)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(v.len())
}

async fn sentinel_primary(url: &str) -> Option<u16> {
    let mut conn = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(RedisSentinel::MASTER)
        .query_async(&mut conn)
        .await
        .ok()?;
    addr.map(|(_, port)| port)
}

pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
