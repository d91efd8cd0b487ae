//! Durable delivery with Redis: the retry queue that survives a crash, shared safely by several
//! replicas, and the dead letters its admin RPCs manage.
//!
//! # Design
//! - [`RedisStore`] owns the connection (a `redis` `ConnectionManager`: one multiplexed,
//!   auto-reconnecting connection; every hot-path write is pipelined in batches) and watches
//!   Redis health: while Redis is unreachable the gateway reports NOT_SERVING and refuses new
//!   sends with UNAVAILABLE, and it recovers by itself when Redis answers again.
//! - [`RedisRetryQueue`] implements the pipeline's `RetryQueue` seam. The pipeline still decides
//!   *when* (backoff, jitter, Retry-After, ttl -> EXPIRED); this queue persists the job and hands
//!   it back when due. See `queue.rs` for the claim/lease protocol and `keys.rs` for the layout.
//!
//! - With durable delivery on, the gateway persists every accepted message (leased to this
//!   replica) before acknowledging it, so a crash loses nothing acknowledged; see `queue.rs`.
//! - `idempotency.rs`: caller message ids are not sent twice within the window.
//! - `receipts.rs`: the per-app receipts stream behind resumable `SubscribeReceipts`.
//! - `admin.rs` / `api.rs`: dead letters and the `PushGatewayAdmin` service.
//!
//! # Receipts of parked jobs
//! A parked job's `Pending` (the caller's receipt sink and accept-window slot) cannot live in
//! Redis. We keep it simple and honest: while a job is parked, this process keeps its `Pending`
//! in a map keyed by app and message id, so the original caller still gets every receipt when
//! this replica claims the job back (each replica claims its own delay set while it is alive).
//! A job claimed after a crash or restart, by this or another replica, gets a fresh *detached*
//! `Pending`: its receipts go to the app's subscribers (SubscribeReceipts) only, because the
//! original caller's stream died with the process that held it. On an orderly shutdown, parked
//! jobs stay in Redis and their `Pending`s are handed off without a terminal receipt: the
//! replica that finishes the job emits it.

pub mod admin;
pub mod api;
pub mod idempotency;
pub mod keys;
pub mod queue;
pub mod receipts;
pub mod record;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use queue::RedisRetryQueue;

/// `[redis]`: durable delivery settings. Durable delivery is on when `url` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`; absent (and no `cluster_nodes`) means the in-memory queue (not
    /// crash-safe).
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each), instead of `url`. Every call
    /// touches the keys of one app, which share a hash tag, so each lands on one slot.
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// How long a claimed job stays leased to a replica without renewal; also how long a
    /// silent replica is considered alive before others take over its delay set.
    pub lease_ms: u64,
    /// Jobs claimed per app in one script call.
    pub claim_batch: usize,
    /// Pause between claim rounds when nothing was due.
    pub poll_ms: u64,
    /// Operations per pipelined write.
    pub write_batch: usize,
    /// How long a command may take before Redis counts as unreachable.
    pub command_timeout_ms: u64,
    /// A caller-supplied `message_id` seen this recently (same app) is not sent again; 0 turns
    /// idempotency off.
    pub idempotency_ttl_secs: u64,
    /// Receipts kept per app in the receipts stream (approximately); 0 turns the stream off.
    pub receipts_stream_maxlen: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: Vec::new(),
            key_prefix: "pushgate".into(),
            lease_ms: 30_000,
            claim_batch: 512,
            poll_ms: 50,
            write_batch: 1_024,
            command_timeout_ms: 2_000,
            idempotency_ttl_secs: 86_400,
            receipts_stream_maxlen: 100_000,
        }
    }
}

impl RedisConfig {
    /// True when durable delivery is configured (a URL or a cluster seed list).
    pub fn enabled(&self) -> bool {
        self.url.is_some() || !self.cluster_nodes.is_empty()
    }

    /// Checks values serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.url.is_some() && !self.cluster_nodes.is_empty() {
            return Err((
                "redis.cluster_nodes".into(),
                "set either redis.url or redis.cluster_nodes, not both".into(),
            ));
        }
        if !self.cluster_nodes.is_empty()
            && let Err(e) = redis::cluster::ClusterClient::new(self.cluster_nodes.clone())
        {
            return Err(("redis.cluster_nodes".into(), e.to_string()));
        }
        if let Some(url) = &self.url
            && let Err(e) = redis::Client::open(url.as_str())
        {
            return Err(("redis.url".into(), e.to_string()));
        }
        for (key, value) in [
            ("redis.lease_ms", self.lease_ms),
            ("redis.poll_ms", self.poll_ms),
            ("redis.command_timeout_ms", self.command_timeout_ms),
        ] {
            if value == 0 {
                return Err((key.into(), "must be at least 1".into()));
            }
        }
        // Scripts unpack a batch into one command; Redis' Lua allows about 8,000 arguments.
        if !(1..=2_000).contains(&self.claim_batch) {
            return Err(("redis.claim_batch".into(), "must be in 1..=2000".into()));
        }
        if !(1..=4_000).contains(&self.write_batch) {
            return Err(("redis.write_batch".into(), "must be in 1..=4000".into()));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err((
                "redis.key_prefix".into(),
                "must not contain `{` or `}` (they delimit hash tags)".into(),
            ));
        }
        Ok(())
    }
}

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis is not configured")]
    NotConfigured,
}

enum Backend {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A cluster connection made on first use, so startup does not need the cluster up.
pub struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// A connection to a single Redis or to a Redis Cluster; the rest of `durable` does not care
/// which. Cluster routing works because every call touches the keys of one app, which share the
/// hash tag `{app}`.
#[derive(Clone)]
pub enum RedisConn {
    /// The shared, auto-reconnecting connection to a single Redis.
    Single(ConnectionManager),
    /// A connection of its own to a single Redis (blocking reads).
    Dedicated(redis::aio::MultiplexedConnection),
    /// A Redis Cluster connection, routing each command to the node owning its slot.
    Cluster(Arc<LazyCluster>),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Dedicated(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(lazy) => {
                let lazy = Arc::clone(lazy);
                Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(lazy) => {
                let lazy = Arc::clone(lazy);
                Box::pin(async move {
                    lazy.get()
                        .await?
                        .req_packed_commands(pipeline, offset, count)
                        .await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Dedicated(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// The shared Redis connection, this replica's identity, and Redis health.
pub struct RedisStore {
    client: Backend,
    conn: RedisConn,
    config: RedisConfig,
    replica: String,
    healthy: AtomicBool,
    health: watch::Sender<bool>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("replica", &self.replica)
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily (startup does not need Redis up) and starts the health monitor, which
    /// ends with `stop`.
    pub fn connect(
        config: &RedisConfig,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, DurableError> {
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let (client, conn) = if config.cluster_nodes.is_empty() {
            let url = config.url.as_deref().ok_or(DurableError::NotConfigured)?;
            let client = redis::Client::open(url)?;
            let manager_config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
            (Backend::Single(client), RedisConn::Single(conn))
        } else {
            let client = redis::cluster::ClusterClient::builder(config.cluster_nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()?;
            let lazy = Arc::new(LazyCluster {
                client: client.clone(),
                conn: tokio::sync::OnceCell::new(),
            });
            (Backend::Cluster(client), RedisConn::Cluster(lazy))
        };
        let (health, _) = watch::channel(false);
        let store = Arc::new(Self {
            client,
            conn,
            config: config.clone(),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            healthy: AtomicBool::new(false),
            health,
        });
        let monitor = Arc::clone(&store);
        tokio::spawn(async move { monitor.monitor(stop).await });
        Ok(store)
    }

    /// A new connection of its own, for blocking reads that must not hold up the shared one.
    pub async fn dedicated_conn(&self) -> redis::RedisResult<RedisConn> {
        match &self.client {
            Backend::Single(client) => Ok(RedisConn::Dedicated(
                client.get_multiplexed_async_connection().await?,
            )),
            Backend::Cluster(client) => Ok(RedisConn::Cluster(Arc::new(LazyCluster {
                client: client.clone(),
                conn: tokio::sync::OnceCell::new_with(Some(client.get_async_connection().await?)),
            }))),
        }
    }

    /// A handle on the shared multiplexed connection.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// This process's replica id (random per start).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// True while Redis answers.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Follows Redis health (for the gRPC health service).
    pub fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    /// Records the result of a Redis call made elsewhere (so failures are seen at once).
    pub fn observe<T>(&self, result: &redis::RedisResult<T>) {
        if let Err(e) = result {
            self.set_healthy(false, Some(e));
        }
    }

    fn set_healthy(&self, healthy: bool, error: Option<&redis::RedisError>) {
        let was = self.healthy.swap(healthy, Ordering::AcqRel);
        if was != healthy {
            if healthy {
                info!("redis reachable: durable delivery available");
            } else {
                warn!(error = ?error.map(|e| e.to_string()), "redis unreachable: refusing new sends until it is back");
            }
        }
        self.health
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// Waits until Redis answers a PING (startup, tests), at most `limit`.
    pub async fn wait_healthy(&self, limit: Duration) -> bool {
        let mut rx = self.health();
        tokio::time::timeout(limit, rx.wait_for(|h| *h))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn monitor(self: Arc<Self>, stop: CancellationToken) {
        let period = Duration::from_millis(250);
        loop {
            let mut conn = self.conn();
            let ping = tokio::time::timeout(
                Duration::from_millis(self.config.command_timeout_ms),
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            match ping {
                Ok(Ok(_)) => self.set_healthy(true, None),
                Ok(Err(e)) => self.set_healthy(false, Some(&e)),
                Err(_) => self.set_healthy(false, None),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    crate::model::epoch_millis(std::time::SystemTime::now())
}

/// Mirrors Redis health onto the gRPC health service (NOT_SERVING while Redis is unreachable)
/// until `stop` fires (shutdown owns the status from then on).
pub async fn follow_health(
    mut redis: watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    type Svc = crate::proto::push_gateway_server::PushGatewayServer<crate::api::Api>;
    loop {
        let healthy = *redis.borrow_and_update();
        if stop.is_cancelled() {
            return;
        }
        if healthy {
            reporter.set_serving::<Svc>().await;
        } else {
            reporter.set_not_serving::<Svc>().await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = redis.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    #[test]
    fn redis_section_defaults_and_errors_name_the_key() {
        let c = Config::from_toml("").unwrap();
        assert!(c.redis.url.is_none(), "in-memory queue by default");
        assert_eq!(c.redis.lease_ms, 30_000);
        assert_eq!(c.redis.idempotency_ttl_secs, 86_400);
        let c = Config::from_toml("[redis]\nurl = \"redis://127.0.0.1:7000/\"").unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:7000/"));
        for (toml, key) in [
            ("[redis]\nurl = \"http://x\"", "redis.url"),
            (
                "[redis]\nurl = \"redis://a/\"\ncluster_nodes = [\"redis://b:1\"]",
                "redis.cluster_nodes",
            ),
            (
                "[redis]\ncluster_nodes = [\"http://x\"]",
                "redis.cluster_nodes",
            ),
            ("[redis]\nlease_ms = 0", "redis.lease_ms"),
            ("[redis]\nclaim_batch = 5000", "redis.claim_batch"),
            ("[redis]\nkey_prefix = \"a{b}\"", "redis.key_prefix"),
            ("[redis]\nbogus = 1", "redis"),
        ] {
            match Config::from_toml(toml) {
                Err(ConfigError::Invalid { key: k, .. }) => {
                    assert!(k.starts_with(key), "{toml}: {k}")
                }
                Err(ConfigError::Parse(p)) => assert!(p.contains("bogus"), "{toml}: {p}"),
                Ok(_) => panic!("{toml} accepted"),
            }
        }
    }
}
