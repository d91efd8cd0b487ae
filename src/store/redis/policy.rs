//! [`PolicyState`] in Redis: opt-outs, frequency-cap counters and dead tokens shared by every
//! replica.
//!
//! One script call decides a whole chunk of messages (opt-out, quiet hours as passed in,
//! suppression, caps, in that order, and counts each send that passes), so a chunk costs one
//! round trip and two replicas deciding for the same user are serialized by Redis: exactly
//! `max` sends per window get through, whichever replica sends them. Per-user counters are
//! sorted sets of send instants trimmed to the longest window and expiring with it, so a user
//! who stops receiving pushes costs nothing after a window. Keys carry the app's hash tag (see
//! `keys.rs`); the per-user keys are reached by name from the script, in the app's slot.

use std::sync::Arc;

use redis::Script;
use tracing::warn;

use super::RedisClient;
use super::keys::AppKeys;
use crate::store::StoreError;
use crate::store::policy_state::{
    Answer, Cap, DeadToken, Forgotten, PolicyState, Query, TokenCursor, longest,
};

/// Decides a chunk. KEYS: optout, dead_tokens, dead_tokens_idx. ARGV: now, nonce, cap key
/// prefix, number of caps, then `max, window` per cap, then `flags, user, token, registered`
/// per message (flags: 1 check opt-out, 2 quiet, 4 count under caps). Returns `answer, since`
/// per message: 0 send, 1 opted out, 2 quiet, 3 suppressed (since = when), 4 capped.
const DECIDE: &str = r#"
local now = tonumber(ARGV[1])
local nonce = ARGV[2]
local prefix = ARGV[3]
local ncaps = tonumber(ARGV[4])
local caps = {}
local longest = 0
for c = 1, ncaps do
  local max = tonumber(ARGV[3 + 2 * c])
  local window = tonumber(ARGV[4 + 2 * c])
  caps[c] = {max, window}
  if window > longest then longest = window end
end
local out = {}
local n = 0
for i = 5 + 2 * ncaps, #ARGV, 4 do
  n = n + 1
  local flags = tonumber(ARGV[i])
  local user = ARGV[i + 1]
  local token = ARGV[i + 2]
  local registered = tonumber(ARGV[i + 3])
  local answer = 0
  local since = 0
  if flags % 2 == 1 and user ~= '' and redis.call('SISMEMBER', KEYS[1], user) == 1 then
    answer = 1
  elseif math.floor(flags / 2) % 2 == 1 then
    answer = 2
  else
    local dead = redis.call('HGET', KEYS[2], token)
    if dead and registered <= tonumber(dead) then
      answer = 3
      since = tonumber(dead)
    else
      if dead then
        -- Registered after it was reported dead: a live token again.
        redis.call('HDEL', KEYS[2], token)
        redis.call('ZREM', KEYS[3], token)
      end
      if math.floor(flags / 4) % 2 == 1 and ncaps > 0 and user ~= '' then
        local key = prefix .. user
        redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - longest))
        for c = 1, ncaps do
          local from = string.format('(%d', now - caps[c][2])
          if redis.call('ZCOUNT', key, from, '+inf') >= caps[c][1] then
            answer = 4
            break
          end
        end
        if answer == 0 then
          redis.call('ZADD', key, now, nonce .. ':' .. n)
          redis.call('PEXPIRE', key, longest)
        end
      end
    end
  end
  out[#out + 1] = answer
  out[#out + 1] = since
end
return out
"#;

/// Remembers a dead token and forgets those reported longer ago than the ttl. KEYS:
/// dead_tokens, dead_tokens_idx. ARGV: token, invalid since, ttl (ms). The report instant is
/// Redis' own clock, so the listing's order is the order of the writes whichever replica made
/// them: a listing resumed from a cursor cannot miss a token written after it with an earlier
/// instant.
const SUPPRESS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local horizon = string.format('(%d', now - tonumber(ARGV[3]))
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon, 'LIMIT', 0, 1000)
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
return #old
"#;

/// Dead tokens read per round trip while listing.
const LIST_PAGE: usize = 500;

/// Policy state in Redis. See the module docs.
pub struct RedisPolicyState {
    client: Arc<RedisClient>,
    decide: Script,
    suppress: Script,
    suppression_ttl_ms: i64,
}

impl RedisPolicyState {
    pub fn new(client: Arc<RedisClient>, suppression_ttl_ms: i64) -> Self {
        Self {
            client,
            decide: Script::new(DECIDE),
            suppress: Script::new(SUPPRESS),
            suppression_ttl_ms,
        }
    }

    fn keys(&self, app: &str) -> AppKeys {
        AppKeys::new(&self.client.config().key_prefix, app)
    }

    fn observe<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        self.client.observe(&result);
        result.map_err(|e| StoreError::Unreachable(e.to_string()))
    }
}

#[async_trait::async_trait]
impl PolicyState for RedisPolicyState {
    async fn decide(
        &self,
        app: &str,
        caps: &[Cap],
        now_ms: i64,
        queries: &[Query<'_>],
    ) -> Result<Vec<Answer>, StoreError> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys(app);
        let mut invocation = self.decide.prepare_invoke();
        invocation
            .key(k.optout())
            .key(k.dead_tokens())
            .key(k.dead_tokens_idx())
            .arg(now_ms)
            // Members of a cap counter must differ across replicas and calls within one ms.
            .arg(crate::domain::random_uuid().simple().to_string())
            .arg(k.cap_prefix())
            .arg(caps.len());
        for cap in caps {
            invocation.arg(cap.max).arg(cap.window_ms);
        }
        debug_assert!(longest(caps) >= 0);
        for q in queries {
            let flags = u8::from(q.opt_out) | (u8::from(q.quiet) << 1) | (u8::from(q.capped) << 2);
            invocation
                .arg(flags)
                .arg(q.user_id)
                .arg(q.device_token)
                .arg(q.registered_at_ms);
        }
        let mut conn = self.client.conn();
        let flat: Vec<i64> = self.observe(invocation.invoke_async(&mut conn).await)?;
        let answers: Vec<Answer> = flat
            .chunks_exact(2)
            .map(|pair| match pair[0] {
                1 => Answer::OptedOut,
                2 => Answer::Quiet,
                3 => Answer::Suppressed { since_ms: pair[1] },
                4 => Answer::Capped,
                _ => Answer::Send,
            })
            .collect();
        if answers.len() != queries.len() {
            return Err(StoreError::Unreachable(format!(
                "the policy script answered {} of {} messages",
                answers.len(),
                queries.len()
            )));
        }
        Ok(answers)
    }

    fn suppress(&self, app: &str, device_token: &str, since_ms: i64) {
        let k = self.keys(app);
        let ttl_ms = self.suppression_ttl_ms;
        let script = self.suppress.clone();
        let token = device_token.to_owned();
        let mut conn = self.client.conn();
        let client = Arc::clone(&self.client);
        let app = app.to_owned();
        tokio::spawn(async move {
            let result = script
                .key(k.dead_tokens())
                .key(k.dead_tokens_idx())
                .arg(token)
                .arg(since_ms)
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut conn)
                .await;
            client.observe(&result);
            if let Err(e) = result {
                warn!(%app, error = %e, "could not remember a dead device token");
            }
        });
    }

    async fn dead_tokens(
        &self,
        app: &str,
        reported_ms: i64,
        after: Option<TokenCursor>,
        limit: usize,
    ) -> Result<Vec<DeadToken>, StoreError> {
        let k = self.keys(app);
        let key = k.dead_tokens_idx();
        let start = after
            .as_ref()
            .map_or(reported_ms, |(t, _)| reported_ms.max(*t));
        let mut conn = self.client.conn();
        let mut out = Vec::new();
        // Keyset paging: each page starts at the last instant seen, skipping the entries of
        // that instant already read (an offset from the start would shift as tokens are added).
        let mut start = start;
        let mut skip = 0usize;
        while out.len() < limit {
            let page: Vec<(String, i64)> = self.observe(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(start)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(skip)
                    .arg(LIST_PAGE)
                    .query_async(&mut conn)
                    .await,
            )?;
            if page.is_empty() {
                break;
            }
            for (_, score) in &page {
                if *score == start {
                    skip += 1;
                } else {
                    start = *score;
                    skip = 1;
                }
            }
            let tokens: Vec<&str> = page.iter().map(|(t, _)| t.as_str()).collect();
            let since: Vec<Option<i64>> = self.observe(
                redis::cmd("HMGET")
                    .arg(k.dead_tokens())
                    .arg(&tokens)
                    .query_async(&mut conn)
                    .await,
            )?;
            for ((device_token, reported_at_ms), since) in page.into_iter().zip(since) {
                // Equal scores are ordered by member, bytewise, as Rust orders strings.
                let past_cursor = after
                    .as_ref()
                    .is_none_or(|(t, token)| (reported_at_ms, &device_token) > (*t, token));
                if past_cursor {
                    out.push(DeadToken {
                        device_token,
                        since_ms: since.unwrap_or(reported_at_ms),
                        reported_at_ms,
                    });
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn set_opt_out(&self, app: &str, user_id: &str, out: bool) -> Result<bool, StoreError> {
        let key = self.keys(app).optout();
        let mut conn = self.client.conn();
        let changed: i64 = self.observe(
            redis::cmd(if out { "SADD" } else { "SREM" })
                .arg(key)
                .arg(user_id)
                .query_async(&mut conn)
                .await,
        )?;
        Ok(changed > 0)
    }

    async fn forget_user(&self, app: &str, user_id: &str) -> Result<Forgotten, StoreError> {
        let k = self.keys(app);
        let cap_key = format!("{}{user_id}", k.cap_prefix());
        let mut conn = self.client.conn();
        let (opt_out, cap_sends, _): (i64, u64, i64) = self.observe(
            redis::pipe()
                .atomic()
                .cmd("SREM")
                .arg(k.optout())
                .arg(user_id)
                .cmd("ZCARD")
                .arg(&cap_key)
                .cmd("DEL")
                .arg(&cap_key)
                .query_async(&mut conn)
                .await,
        )?;
        Ok(Forgotten {
            opt_out: opt_out > 0,
            cap_sends,
        })
    }
}
