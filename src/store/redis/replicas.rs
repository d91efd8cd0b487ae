//! Cluster-wide limits: replicas sharing one Redis count each other, so that each applies its
//! share of every app's rate (the limit stage splits by the count this publishes).
//!
//! Each replica heartbeats into a sorted set (`<prefix>:limit:replicas`, member = replica id,
//! score = last heartbeat in ms) and counts the members seen within [`LIVE_FOR`]; with `n` live
//! replicas each applies `rate / n` (burst `ceil(burst / n)`). The hot path stays local: only
//! the replica count crosses the network, once per [`HEARTBEAT`]. While Redis is unreachable a
//! replica keeps the last count it saw. The split is even, so the cluster holds the limit when
//! traffic is spread evenly over replicas (a load balancer's job); a replica with no traffic for
//! an app leaves its share unused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::debug;

use super::RedisClient;

/// How often a replica announces itself and recounts.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A replica silent this long no longer counts.
pub const LIVE_FOR: Duration = Duration::from_millis(2_000);

/// Starts heartbeating; the receiver follows the live replica count (1 until the first count).
/// Ends with the client's stop, leaving the set.
pub fn share(store: Arc<RedisClient>) -> watch::Receiver<u32> {
    let (count, rx) = watch::channel(1);
    tokio::spawn(heartbeat(store, count));
    rx
}

async fn heartbeat(store: Arc<RedisClient>, count: watch::Sender<u32>) {
    let stop = store.stop_token();
    let key = format!("{}:limit:replicas", store.config().key_prefix);
    let replica = store.replica().to_string();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = epoch_ms();
        let stale = now.saturating_sub(LIVE_FOR.as_millis() as i64);
        let mut conn = store.conn();
        let counted: redis::RedisResult<(i64, i64, i64)> = redis::pipe()
            .atomic()
            .zadd(&key, &replica, now)
            .zrembyscore(&key, "-inf", stale)
            .zcard(&key)
            .query_async(&mut conn)
            .await;
        store.observe(&counted);
        match counted {
            Ok((_, _, n)) => {
                count.send_replace(u32::try_from(n.max(1)).unwrap_or(u32::MAX));
            }
            Err(error) => debug!(%error, "limit heartbeat failed; keeping the last replica count"),
        }
    }
    let mut conn = store.conn();
    let left: redis::RedisResult<i64> = redis::cmd("ZREM")
        .arg(&key)
        .arg(&replica)
        .query_async(&mut conn)
        .await;
    store.observe(&left);
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
