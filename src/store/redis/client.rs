//! The connection to Redis (a single server or a Cluster), this replica's identity, and Redis
//! health: while Redis is unreachable the store reports unhealthy (NOT_SERVING, new sends
//! refused), and it recovers by itself when Redis answers again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::RedisConfig;

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

/// A connection to a single Redis or to a Redis Cluster; the rest of the store does not care
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
pub struct RedisClient {
    client: Backend,
    conn: RedisConn,
    config: RedisConfig,
    replica: String,
    healthy: AtomicBool,
    health: watch::Sender<bool>,
    /// Ends the health monitor and the replica heartbeat.
    stop: CancellationToken,
    /// Error count and PING round trip, once the gateway gives them.
    metrics: std::sync::OnceLock<crate::metrics::RedisMetrics>,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("replica", &self.replica)
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl RedisClient {
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
            stop: stop.clone(),
            metrics: std::sync::OnceLock::new(),
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

    /// Fires when the client's tasks are to end (after the gateway's shutdown).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
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

    /// Counts errors and PING round trips into `metrics` from now on (the first call wins).
    pub fn set_metrics(&self, metrics: crate::metrics::RedisMetrics) {
        let _ = self.metrics.set(metrics);
    }

    fn count_error(&self) {
        if let Some(m) = self.metrics.get() {
            m.errors.inc();
        }
    }

    /// Records the result of a Redis call made elsewhere (so failures are seen at once).
    pub fn observe<T>(&self, result: &redis::RedisResult<T>) {
        if let Err(e) = result {
            self.count_error();
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
            let sent = tokio::time::Instant::now();
            let ping = tokio::time::timeout(
                Duration::from_millis(self.config.command_timeout_ms),
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            match ping {
                Ok(Ok(_)) => {
                    if let Some(m) = self.metrics.get() {
                        m.ping_seconds.observe(sent.elapsed().as_secs_f64());
                    }
                    self.set_healthy(true, None)
                }
                Ok(Err(e)) => {
                    self.count_error();
                    self.set_healthy(false, Some(&e))
                }
                Err(_) => {
                    self.count_error();
                    self.set_healthy(false, None)
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}
