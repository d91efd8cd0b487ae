//! Dead-letter administration: list, replay and purge the jobs whose attempts ran out (the
//! [`DeadLetters`] of the Redis store, behind the `PushGatewayAdmin` gRPC service).

use redis::Script;

use super::keys::AppKeys;
use super::record::StoredJob;
use super::{RedisClient, RedisStore, unreachable};
use crate::store::{DeadJob, DeadLetter, DeadLetters, StoreError, now_ms};

#[async_trait::async_trait]
impl DeadLetters for RedisStore {
    async fn list(
        &self,
        app: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, u64), StoreError> {
        list(&self.client, app, offset, limit)
            .await
            .map_err(unreachable)
    }

    async fn replay(&self, app: &str, ids: &[String], limit: usize) -> Result<u64, StoreError> {
        replay(&self.client, app, ids, limit)
            .await
            .map_err(unreachable)
    }

    async fn purge(&self, app: &str, ids: &[String]) -> Result<u64, StoreError> {
        purge(&self.client, app, ids).await.map_err(unreachable)
    }
}

fn dead_job(job: StoredJob) -> DeadJob {
    DeadJob {
        platform: job.platform(),
        message_id: job.message_id,
        batch_id: job.batch_id,
        campaign_id: job.campaign_id,
        user_id: job.user_id,
        attempt: job.attempt,
        accepted_at_ms: job.accepted_at_ms,
    }
}

/// Moves dead letters back into this replica's delay set, due now, with attempts reset.
/// ARGV: now, limit, then ids (none = the oldest `limit`).
const REPLAY: &str = r#"
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', KEYS[2], 0, limit - 1)
end
local n = 0
for _, id in ipairs(ids) do
  local rec = redis.call('HGET', KEYS[1], id)
  if rec then
    local ok, t = pcall(cjson.decode, rec)
    if ok and type(t) == 'table' and t.request ~= nil then
      t.attempt = 0
      t.last_error = nil
      redis.call('HSET', KEYS[3], id, cjson.encode(t))
      redis.call('ZADD', KEYS[4], now, id)
      redis.call('HDEL', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      n = n + 1
    end
  end
end
return n
"#;

/// Lists up to `limit` dead letters of `app`, oldest first, from `offset`; and the total.
async fn list(
    store: &RedisClient,
    app: &str,
    offset: usize,
    limit: usize,
) -> redis::RedisResult<(Vec<DeadLetter>, u64)> {
    let keys = AppKeys::new(&store.config().key_prefix, app);
    let mut conn = store.conn();
    let stop = (offset + limit.max(1)) as isize - 1;
    let (ids, total): (Vec<(String, f64)>, u64) = redis::pipe()
        .zrange_withscores(keys.dead_idx(), offset as isize, stop)
        .zcard(keys.dead_idx())
        .query_async(&mut conn)
        .await?;
    if ids.is_empty() {
        return Ok((Vec::new(), total));
    }
    let names: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
    let records: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
        .arg(keys.dead())
        .arg(&names)
        .query_async(&mut conn)
        .await?;
    let letters = ids
        .into_iter()
        .zip(records)
        .map(|((message_id, score), record)| {
            let (job, last_error) = match record.map(|r| StoredJob::from_json(&r)) {
                Some(Ok(job)) => {
                    let e = job.last_error.clone();
                    (Some(dead_job(job)), e)
                }
                Some(Err(e)) => (None, format!("unreadable record: {e}")),
                None => (None, "record missing".into()),
            };
            DeadLetter {
                message_id,
                dead_at_ms: score as i64,
                job,
                last_error,
            }
        })
        .collect();
    Ok((letters, total))
}

/// Replays the dead letters `ids` (all, up to `limit`, when empty): they are attempted again
/// from attempt 1 by this replica. Returns how many were replayed.
async fn replay(
    store: &RedisClient,
    app: &str,
    ids: &[String],
    limit: usize,
) -> redis::RedisResult<u64> {
    let keys = AppKeys::new(&store.config().key_prefix, app);
    let mut conn = store.conn();
    let script = Script::new(REPLAY);
    let mut inv = script.prepare_invoke();
    inv.key(keys.dead())
        .key(keys.dead_idx())
        .key(keys.jobs())
        .key(keys.delay(store.replica()))
        .arg(now_ms())
        .arg(limit.max(1));
    for id in ids {
        inv.arg(id);
    }
    inv.invoke_async(&mut conn).await
}

/// Deletes the dead letters `ids` (all when empty). Returns how many were deleted.
async fn purge(store: &RedisClient, app: &str, ids: &[String]) -> redis::RedisResult<u64> {
    let keys = AppKeys::new(&store.config().key_prefix, app);
    let mut conn = store.conn();
    if ids.is_empty() {
        let (n, _, _): (u64, u64, u64) = redis::pipe()
            .atomic()
            .zcard(keys.dead_idx())
            .del(keys.dead())
            .del(keys.dead_idx())
            .query_async(&mut conn)
            .await?;
        return Ok(n);
    }
    let (n,): (u64,) = redis::pipe()
        .atomic()
        .zrem(keys.dead_idx(), ids)
        .hdel(keys.dead(), ids)
        .ignore()
        .query_async(&mut conn)
        .await?;
    Ok(n)
}
