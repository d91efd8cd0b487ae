//! The connection to Redis (a single server, a Sentinel-managed primary, or a Cluster), this
//! replica's identity, and Redis health: while Redis is unreachable the store reports unhealthy
//! (NOT_SERVING, new sends refused), and it recovers by itself when Redis answers again.
//!
//! # Sentinel
//! With `redis.sentinels`, the primary's address is asked of the Sentinels (the `redis` crate's
//! `SentinelClient`, which walks the Sentinel list, reads `SENTINEL MASTERS` and checks that the
//! node it names answers `ROLE` as a primary). We use the crate rather than our own discovery
//! because that walk (skipping dead Sentinels, flags like `s_down`/`o_down`, the role check) is
//! the fiddly part and the crate has it tested. What the crate does not offer is a connection
//! that follows a failover: its `ConnectionManager` reconnects to one fixed address. So
//! [`SentinelPrimary`] keeps a `ConnectionManager` per discovered primary and swaps in a new one
//! when the Sentinels name another: the health monitor asks them every second, at once after a
//! connection error or a `READONLY` reply (an old primary demoted to replica), and on every tick
//! while Redis is unhealthy. A demoted or replica-less primary is not healthy (see `monitor`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelServerType};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    Sentinel(Arc<SentinelPrimary>),
}

/// The primary a set of Sentinels names, and a connection to it that follows failovers (see the
/// module docs).
pub struct SentinelPrimary {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The primary last discovered, and the connection to it; `None` before the first discovery.
    current: RwLock<Option<(redis::Client, ConnectionManager)>>,
    manager_config: ConnectionManagerConfig,
    /// Signalled when a command failed in a way that suggests the primary moved.
    lost: Notify,
}

impl SentinelPrimary {
    fn new(
        config: &RedisConfig,
        manager_config: ConnectionManagerConfig,
    ) -> redis::RedisResult<Self> {
        let sentinel = SentinelClient::build(
            config.sentinels.clone(),
            config.sentinel_master.clone(),
            None,
            SentinelServerType::Master,
        )?;
        Ok(Self {
            sentinel: tokio::sync::Mutex::new(sentinel),
            current: RwLock::new(None),
            manager_config,
            lost: Notify::new(),
        })
    }

    fn manager(&self) -> redis::RedisResult<ConnectionManager> {
        self.current
            .read()
            .as_ref()
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis primary discovered through the Sentinels yet",
                ))
            })
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        self.current
            .read()
            .as_ref()
            .map(|(c, _)| c.clone())
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis primary discovered through the Sentinels yet",
                ))
            })
    }

    /// Notes a failed command: a dropped connection or a `READONLY` reply means the primary may
    /// have moved, so the monitor asks the Sentinels at once.
    fn note<T>(&self, result: &redis::RedisResult<T>) {
        if let Err(e) = result
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly))
        {
            self.lost.notify_one();
        }
    }

    /// Asks the Sentinels for the primary; when it is another node than the one in use, a new
    /// connection to it replaces the old one. Returns true when the primary changed.
    async fn discover(&self) -> redis::RedisResult<bool> {
        let client = self.sentinel.lock().await.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let same = self
            .current
            .read()
            .as_ref()
            .is_some_and(|(c, _)| c.get_connection_info().addr().to_string() == addr);
        if same {
            return Ok(false);
        }
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), self.manager_config.clone())?;
        let old = self.current.write().replace((client, manager));
        match old {
            Some((c, _)) => info!(
                from = %c.get_connection_info().addr(),
                to = %addr,
                "redis primary moved (Sentinel failover): following it"
            ),
            None => info!(primary = %addr, "redis primary discovered through the Sentinels"),
        }
        Ok(true)
    }
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
    /// The connection to the primary the Sentinels name, following failovers.
    Sentinel(Arc<SentinelPrimary>),
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
            RedisConn::Sentinel(primary) => {
                let primary = Arc::clone(primary);
                Box::pin(async move {
                    let result = match primary.manager() {
                        Ok(mut m) => m.req_packed_command(cmd).await,
                        Err(e) => Err(e),
                    };
                    primary.note(&result);
                    result
                })
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
            RedisConn::Sentinel(primary) => {
                let primary = Arc::clone(primary);
                Box::pin(async move {
                    let result = match primary.manager() {
                        Ok(mut m) => m.req_packed_commands(pipeline, offset, count).await,
                        Err(e) => Err(e),
                    };
                    primary.note(&result);
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Dedicated(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
            RedisConn::Sentinel(primary) => primary.manager().map_or(0, |m| m.get_db()),
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
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let (client, conn) = if !config.sentinels.is_empty() {
            let primary = Arc::new(SentinelPrimary::new(config, manager_config)?);
            (
                Backend::Sentinel(Arc::clone(&primary)),
                RedisConn::Sentinel(primary),
            )
        } else if config.cluster_nodes.is_empty() {
            let url = config.url.as_deref().ok_or(DurableError::NotConfigured)?;
            let client = redis::Client::open(url)?;
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
            Backend::Sentinel(primary) => Ok(RedisConn::Dedicated(
                primary.client()?.get_multiplexed_async_connection().await?,
            )),
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

    /// Waits until `redis.min_replicas_acked` replicas have acknowledged every write made so far
    /// on `conn` (`WAIT n timeout`), at most `redis.replica_ack_timeout_ms`. True when enough
    /// did, or when no acknowledgement is asked for. `WAIT` counts the writes of its own
    /// connection, so `conn` must be the one the writes went through.
    pub async fn replicated(&self, conn: &mut RedisConn) -> redis::RedisResult<bool> {
        let wanted = self.config.min_replicas_acked;
        if wanted == 0 {
            return Ok(true);
        }
        let acked: u64 = redis::cmd("WAIT")
            .arg(wanted)
            .arg(self.config.replica_ack_timeout_ms)
            .query_async(conn)
            .await?;
        if acked < u64::from(wanted) {
            debug!(
                acked,
                wanted, "fewer Redis replicas acknowledged the writes than asked"
            );
            if let Some(m) = self.metrics.get() {
                m.errors.inc();
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// One health check. A plain Redis answers PING. Behind Sentinels, or when writes must be
    /// acknowledged by replicas, the node must answer `ROLE` as a primary (a demoted one answers
    /// as a replica) with at least `min_replicas_acked` replicas attached.
    async fn check(&self, conn: &mut RedisConn) -> Result<(), Option<redis::RedisError>> {
        let needs_role =
            matches!(self.client, Backend::Sentinel(_)) || self.config.min_replicas_acked > 0;
        if !needs_role {
            return redis::cmd("PING")
                .query_async::<String>(conn)
                .await
                .map(drop)
                .map_err(Some);
        }
        match redis::cmd("ROLE").query_async::<redis::Role>(conn).await {
            Ok(redis::Role::Primary { replicas, .. })
                if replicas.len() >= self.config.min_replicas_acked as usize =>
            {
                Ok(())
            }
            Ok(role) => {
                debug!(?role, "redis node is not a primary with enough replicas");
                if let Backend::Sentinel(primary) = &self.client {
                    primary.lost.notify_one();
                }
                Err(None)
            }
            Err(e) => Err(Some(e)),
        }
    }

    async fn monitor(self: Arc<Self>, stop: CancellationToken) {
        let period = Duration::from_millis(250);
        let mut tick: u64 = 0;
        let mut rediscover = true;
        loop {
            if let Backend::Sentinel(primary) = &self.client
                && (rediscover || !self.is_healthy() || tick.is_multiple_of(4))
            {
                let found = tokio::time::timeout(
                    Duration::from_millis(self.config.command_timeout_ms),
                    primary.discover(),
                )
                .await;
                match found {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "asking the Redis Sentinels for the primary"),
                    Err(_) => warn!("asking the Redis Sentinels for the primary timed out"),
                }
            }
            tick += 1;
            let mut conn = self.conn();
            let sent = tokio::time::Instant::now();
            let checked = tokio::time::timeout(
                Duration::from_millis(self.config.command_timeout_ms),
                self.check(&mut conn),
            )
            .await;
            match checked {
                Ok(Ok(())) => {
                    if let Some(m) = self.metrics.get() {
                        m.ping_seconds.observe(sent.elapsed().as_secs_f64());
                    }
                    self.set_healthy(true, None)
                }
                Ok(Err(e)) => {
                    self.count_error();
                    self.set_healthy(false, e.as_ref())
                }
                Err(_) => {
                    self.count_error();
                    self.set_healthy(false, None)
                }
            }
            rediscover = match &self.client {
                Backend::Sentinel(primary) => tokio::select! {
                    _ = stop.cancelled() => return,
                    // At most 20 discoveries a second however many commands fail.
                    _ = async {
                        primary.lost.notified().await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } => true,
                    _ = tokio::time::sleep(period) => false,
                },
                _ => tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(period) => false,
                },
            };
        }
    }
}
