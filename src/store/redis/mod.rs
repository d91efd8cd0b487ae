//! Durable delivery with Redis: the [`Store`] that survives a crash, shared safely by several
//! replicas, with the receipts stream and the dead letters its admin RPCs manage.
//!
//! # Design
//! - [`RedisClient`] (`client.rs`) owns the connection (a `redis` `ConnectionManager`: one
//!   multiplexed, auto-reconnecting connection; every hot-path write is pipelined in batches)
//!   and watches Redis health: while Redis is unreachable the gateway reports NOT_SERVING and
//!   refuses new sends with UNAVAILABLE, and it recovers by itself when Redis answers again.
//! - [`RedisStore`] is the store. The deliver stage still decides *when* (backoff, jitter,
//!   Retry-After, ttl -> EXPIRED); the store persists the message and hands it back when due.
//!   See `queue.rs` for the accept/claim/lease protocol and `keys.rs` for the layout.
//! - Every accepted message is persisted (rendered, leased to this replica) before the caller is
//!   told it was accepted, so a crash loses nothing acknowledged. In this process it then waits
//!   in its compact packed form, like in memory, and is rendered again when it may go.
//! - `idempotency.rs`: caller message ids are not sent twice within the window.
//! - `feed.rs`: the per-app receipts stream behind resumable `SubscribeReceipts`.
//! - `dead_letters.rs`: list, replay and purge of dead letters.
//! - `replicas.rs`: replicas count each other, so each applies its share of every rate.
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

mod client;
mod dead_letters;
mod feed;
mod idempotency;
pub mod insights;
mod keys;
mod policy;
mod queue;
mod record;
mod replicas;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use client::{DurableError, RedisClient, RedisConn};
pub use policy::RedisPolicyState;
use queue::RedisRetryQueue;

use super::{
    AcceptError, DeadLetters, Earlier, FeedError, FeedFilter, ReceiptFeed, Scheduled, Store,
    StoreError, StoreStats,
};
use crate::domain::Receipt;
use crate::receipts::{ReceiptHub, ReceiptObserver, Resolution};
use crate::registry::AppRuntime;
use crate::work::{Job, Waiting, Work};

/// `[redis]`: durable delivery settings. Durable delivery is on when `url` is set. Its `Debug`
/// replaces any password in the URLs.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`; absent (and no `cluster_nodes`) means the in-memory queue (not
    /// crash-safe).
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each), instead of `url`. Every call
    /// touches the keys of one app, which share a hash tag, so each lands on one slot.
    pub cluster_nodes: Vec<String>,
    /// Sentinels watching the primary (`redis://host:port` each), instead of `url`: the gateway
    /// asks them for the primary and follows it through a failover.
    pub sentinels: Vec<String>,
    /// The name the Sentinels know the primary by (`sentinel monitor <name> ...`); required
    /// with `sentinels`.
    pub sentinel_master: String,
    /// Replicas that must acknowledge (`WAIT`) the writes of an accept, a schedule and a park
    /// before they count as done; 0 (default) waits for none. With 1 or more, an asynchronous
    /// replication failover cannot lose a message the caller was told was accepted, at the
    /// cost of one replication round trip per accepted chunk, and of availability: while fewer
    /// replicas are attached the gateway reports NOT_SERVING and refuses new sends. Single Redis
    /// or Sentinel only (not `cluster_nodes`).
    pub min_replicas_acked: u32,
    /// How long one `WAIT` for `min_replicas_acked` may take before the writes count as not
    /// replicated (an accept then fails; parked writes are written again).
    pub replica_ack_timeout_ms: u64,
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

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::redact_url;
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field(
                "sentinels",
                &self
                    .sentinels
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_master", &self.sentinel_master)
            .field("min_replicas_acked", &self.min_replicas_acked)
            .field("replica_ack_timeout_ms", &self.replica_ack_timeout_ms)
            .field("key_prefix", &self.key_prefix)
            .field("lease_ms", &self.lease_ms)
            .field("claim_batch", &self.claim_batch)
            .field("poll_ms", &self.poll_ms)
            .field("write_batch", &self.write_batch)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("idempotency_ttl_secs", &self.idempotency_ttl_secs)
            .field("receipts_stream_maxlen", &self.receipts_stream_maxlen)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            min_replicas_acked: 0,
            replica_ack_timeout_ms: 1_000,
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
    /// True when durable delivery is configured (a URL, Sentinels or a cluster seed list).
    pub fn enabled(&self) -> bool {
        self.url.is_some() || !self.cluster_nodes.is_empty() || !self.sentinels.is_empty()
    }

    /// Checks values serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.url.is_some() && !self.cluster_nodes.is_empty() {
            return Err((
                "redis.cluster_nodes".into(),
                "set either redis.url or redis.cluster_nodes, not both".into(),
            ));
        }
        if !self.sentinels.is_empty() {
            if self.url.is_some() || !self.cluster_nodes.is_empty() {
                return Err((
                    "redis.sentinels".into(),
                    "set one of redis.url, redis.cluster_nodes and redis.sentinels".into(),
                ));
            }
            if self.sentinel_master.is_empty() {
                return Err((
                    "redis.sentinel_master".into(),
                    "required with redis.sentinels: the name the Sentinels monitor".into(),
                ));
            }
            if let Err(e) = redis::sentinel::SentinelClient::build(
                self.sentinels.clone(),
                self.sentinel_master.clone(),
                None,
                redis::sentinel::SentinelServerType::Master,
            ) {
                return Err(("redis.sentinels".into(), e.to_string()));
            }
        } else if !self.sentinel_master.is_empty() {
            return Err((
                "redis.sentinel_master".into(),
                "only with redis.sentinels".into(),
            ));
        }
        if self.min_replicas_acked > 0 && !self.cluster_nodes.is_empty() {
            return Err((
                "redis.min_replicas_acked".into(),
                "not supported with redis.cluster_nodes (WAIT is per node)".into(),
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
            ("redis.replica_ack_timeout_ms", self.replica_ack_timeout_ms),
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

/// The durable store. See the module docs.
pub struct RedisStore {
    client: Arc<RedisClient>,
    queue: Arc<RedisRetryQueue>,
    replicas: watch::Receiver<u32>,
}

impl RedisStore {
    /// Starts the writer, the claimer (due retries and reclaimed messages go into `dispatch`,
    /// the limit stage's input) and the replica heartbeat. When `stop` fires, claiming ends,
    /// pending writes are flushed and the parked jobs' `Pending`s are handed off (they stay in
    /// Redis for the next replica); the heartbeat ends with the client's own stop. With
    /// `insights`, every terminal receipt of a campaign is counted for campaign measurement in
    /// the same write as the receipt (see `insights`).
    pub fn start(
        client: Arc<RedisClient>,
        hub: Arc<ReceiptHub>,
        apps: impl IntoIterator<Item = Arc<AppRuntime>>,
        dispatch: mpsc::Sender<Work>,
        stop: CancellationToken,
        insights: Option<crate::store::insights::InsightsConfig>,
    ) -> Arc<Self> {
        let queue =
            RedisRetryQueue::start(Arc::clone(&client), hub, apps, dispatch, stop, insights);
        let replicas = replicas::share(Arc::clone(&client));
        Arc::new(Self {
            client,
            queue,
            replicas,
        })
    }

    /// The connection, health and replica identity this store uses.
    pub fn client(&self) -> &Arc<RedisClient> {
        &self.client
    }
}

fn unreachable(e: redis::RedisError) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

impl ReceiptObserver for RedisStore {
    fn observe(&self, receipt: &Arc<Receipt>) {
        self.queue.observe(receipt);
    }
}

impl RedisStore {
    /// A claim whose reply was lost may have been applied, and its call is refused: its keys
    /// would tell every resend "in flight" until the idempotency ttl. They are deleted (only
    /// those still holding this call's value) once Redis answers, tried for as long as a
    /// claim lives.
    fn release_lost_claim(&self, app: &str, ids: &[&str], value: String) {
        let ids: Vec<String> = ids
            .iter()
            .filter(|id| !id.is_empty())
            .map(|id| (*id).to_owned())
            .collect();
        if ids.is_empty() || self.client.config().idempotency_ttl_secs == 0 {
            return;
        }
        let client = Arc::clone(&self.client);
        let app = app.to_owned();
        let give_up = tokio::time::Instant::now()
            + std::time::Duration::from_secs(self.client.config().idempotency_ttl_secs);
        tokio::spawn(async move {
            while tokio::time::Instant::now() < give_up {
                if client.is_healthy() {
                    match idempotency::release_own(&client, &app, &ids, &value).await {
                        Ok(released) => {
                            tracing::debug!(%app, released, "claims of a refused call released");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%app, error = %e, "could not release the claims of a refused call yet");
                        }
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        });
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// Redis answers, and no undo of an unconfirmed accept still waits to be written.
    fn is_healthy(&self) -> bool {
        self.client.is_healthy() && !self.queue.unaccepts_pending()
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.client.health()
    }

    async fn claim_ids(
        &self,
        app: &str,
        ids: &[&str],
    ) -> Result<HashMap<String, Earlier>, StoreError> {
        let value = idempotency::claim_value(&crate::domain::random_uuid().simple().to_string());
        let earlier = match idempotency::claim(&self.client, app, ids.iter().copied(), &value).await
        {
            Ok(earlier) => earlier,
            Err(e) => {
                self.release_lost_claim(app, ids, value);
                return Err(unreachable(e));
            }
        };
        Ok(earlier
            .into_iter()
            .map(|(id, state)| {
                let earlier = idempotency::recorded_status(&state)
                    .map_or(Earlier::InFlight, Earlier::Finished);
                (id, earlier)
            })
            .collect())
    }

    async fn release_ids(&self, app: &str, ids: &[String]) -> Result<(), StoreError> {
        idempotency::release(&self.client, app, ids)
            .await
            .map_err(unreachable)
    }

    async fn accept(&self, messages: Vec<Waiting>) -> Result<Vec<Work>, AcceptError> {
        match self.queue.persist_accepted(&messages).await {
            Ok(()) => Ok(messages.into_iter().map(Work::Waiting).collect()),
            Err(e) => {
                // The write may have been applied with its reply lost: undo it, so "not
                // accepted" is the truth and a resend with the same ids is accepted once.
                let undone = self.queue.unaccept(&messages).await;
                Err(AcceptError {
                    error: unreachable(e),
                    messages,
                    maybe_applied: !undone,
                })
            }
        }
    }

    fn park(&self, job: Job, due: Instant) {
        self.queue.park(job, super::due_ms(due));
    }

    async fn schedule(&self, jobs: Vec<(Job, Instant)>) {
        let jobs = jobs
            .into_iter()
            .map(|(job, due)| (job, super::due_ms(due)))
            .collect();
        self.queue.schedule(jobs).await;
    }

    async fn cancel_scheduled(&self, app: &str, which: &Scheduled) -> Result<u64, StoreError> {
        self.queue
            .cancel_scheduled(app, which)
            .await
            .map_err(unreachable)
    }

    async fn forget_receipts(&self, app: &str, user_id: &str) -> Result<u64, StoreError> {
        feed::forget_user(&self.client, app, user_id)
            .await
            .map_err(unreachable)
    }

    fn dead_letter(&self, job: Job, resolution: Resolution) {
        self.queue.dead_letter(job, resolution);
    }

    /// Every message this process carries is in Redis (persisted at accept, or claimed from
    /// there): the replica that reclaims its lease finishes it.
    fn abandon(&self, work: Work, _reason: &str) {
        work.hand_off();
    }

    fn settled(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        self.queue.settled()
    }

    fn parked(&self) -> usize {
        self.queue.parked_here()
    }

    fn stats(&self) -> StoreStats {
        self.queue.stats()
    }

    fn receipts_feed(
        &self,
        app: &str,
        cursor: String,
        filter: FeedFilter,
    ) -> Result<ReceiptFeed, FeedError> {
        if !feed::valid_cursor(&cursor) {
            return Err(FeedError::BadCursor);
        }
        Ok(Box::pin(feed::subscribe(
            Arc::clone(&self.client),
            app,
            cursor,
            filter,
            self.queue.feed_written(app),
        )))
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetters> {
        Some(self)
    }

    fn live_replicas(&self) -> Option<watch::Receiver<u32>> {
        Some(self.replicas.clone())
    }
}
#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    #[test]
    fn debug_hides_the_redis_password() {
        let c = Config::from_toml("[redis]\nurl = \"redis://:s3cret-pass-word@127.0.0.1:7000/\"")
            .unwrap();
        let shown = format!("{:?} {:?}", c.redis, c);
        assert!(!shown.contains("s3cret-pass-word"), "{shown}");
        assert!(
            shown.contains("redis://<redacted>@127.0.0.1:7000/"),
            "{shown}"
        );
    }

    #[test]
    fn redis_section_defaults_and_errors_name_the_key() {
        let c = Config::from_toml("").unwrap();
        assert!(c.redis.url.is_none(), "in-memory queue by default");
        assert_eq!(c.redis.lease_ms, 30_000);
        assert_eq!(c.redis.idempotency_ttl_secs, 86_400);
        let c = Config::from_toml("[redis]\nurl = \"redis://127.0.0.1:7000/\"").unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:7000/"));
        let c = Config::from_toml(
            "[redis]\nsentinels = [\"redis://127.0.0.1:26379\", \"redis://127.0.0.1:26380\"]\nsentinel_master = \"mymaster\"\nmin_replicas_acked = 1",
        )
        .unwrap();
        assert!(
            c.redis.enabled(),
            "sentinels alone turn durable delivery on"
        );
        assert_eq!(c.redis.sentinels.len(), 2);
        assert_eq!(c.redis.min_replicas_acked, 1);
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
            (
                "[redis]\nsentinels = [\"redis://127.0.0.1:26379\"]",
                "redis.sentinel_master",
            ),
            (
                "[redis]\nurl = \"redis://a/\"\nsentinels = [\"redis://b:1\"]\nsentinel_master = \"m\"",
                "redis.sentinels",
            ),
            ("[redis]\nsentinel_master = \"m\"", "redis.sentinel_master"),
            (
                "[redis]\nsentinels = [\"http://x\"]\nsentinel_master = \"m\"",
                "redis.sentinels",
            ),
            (
                "[redis]\ncluster_nodes = [\"redis://b:1\"]\nmin_replicas_acked = 1",
                "redis.min_replicas_acked",
            ),
            (
                "[redis]\nreplica_ack_timeout_ms = 0",
                "redis.replica_ack_timeout_ms",
            ),
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
