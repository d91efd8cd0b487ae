//! [`PolicyState`] in Redis: opt-outs, frequency-cap counters and dead tokens shared by every
//! replica.
//!
//! One script call decides a whole chunk of messages (opt-out, quiet hours as passed in,
//! suppression, caps, in that order, and counts each send that passes), so a chunk costs one
//! round trip and two replicas deciding for the same user are serialized by Redis: exactly
//! `max` sends per window get through, whichever replica sends them. Per-user counters are
//! sorted sets of reservations (member `<tag>:<nonce>:<n>`, or `<tag>:a<accepted ms>` for a
//! scheduled message decided when due, which a second decision after a crash finds and does
//! not count again; scored by the decision instant)
//! trimmed to the longest window and expiring with it, so a user who stops receiving pushes
//! costs nothing after a window; a release removes one member of a tag (a message that ended
//! without reaching a provider). Releases are queued and written with the app's next decision
//! (in its script, so they are applied before it) or by a flusher within 50 ms. Keys carry the app's hash tag (see
//! `keys.rs`); the per-user keys are reached by name from the script, in the app's slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use tracing::warn;

use super::RedisClient;
use super::keys::AppKeys;
use crate::store::StoreError;
use crate::store::policy_state::{
    Answer, Cap, DeadToken, Forgotten, PolicyState, Query, TokenCursor, longest,
};

/// Gives back one reservation of `tag` (hex) in the cap counter `key`: its newest member of the
/// tag. The counter holds at most the sends of the longest window, so reading it whole is
/// cheap. Prepended to the scripts that release.
const GIVE_BACK_FN: &str = r#"
local function give_back(key, tag)
  local members = redis.call('ZRANGE', key, 0, -1)
  local p = tag .. ':'
  for j = #members, 1, -1 do
    if string.sub(members[j], 1, #p) == p then
      return redis.call('ZREM', key, members[j])
    end
  end
  return 0
end
"#;

/// Decides a chunk. KEYS: optout, dead_tokens, dead_tokens_idx, dead_tokens_user. ARGV: now,
/// nonce, cap key prefix, number of caps, then `max, window` per cap, then the number of
/// reservations to give back first and `user, tag` of each, then `flags, user, token,
/// registered, tag, accepted` per message (flags: 1 check opt-out, 2 quiet, 4 count under caps;
/// tag: the reservation's, hex; accepted: `Query::accepted_at_ms`, 0 for a message decided
/// once). A message with `accepted` reserves member `<tag>:a<accepted>`, and one that finds
/// that member already there (decided before a crash) passes without counting again. Returns
/// `answer, since` per message: 0 send, 1 opted out, 2 quiet, 3 suppressed (since = when), 4
/// capped.
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
local r = 5 + 2 * ncaps
local nrel = tonumber(ARGV[r])
for j = 1, nrel do
  give_back(prefix .. ARGV[r + 2 * j - 1], ARGV[r + 2 * j])
end
local out = {}
local n = 0
for i = r + 1 + 2 * nrel, #ARGV, 6 do
  n = n + 1
  local flags = tonumber(ARGV[i])
  local user = ARGV[i + 1]
  local token = ARGV[i + 2]
  local registered = tonumber(ARGV[i + 3])
  local tag = ARGV[i + 4]
  local accepted = ARGV[i + 5]
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
        redis.call('HDEL', KEYS[4], token)
      end
      if math.floor(flags / 4) % 2 == 1 and ncaps > 0 and user ~= '' then
        local key = prefix .. user
        redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - longest))
        local member = tag .. ':' .. nonce .. ':' .. n
        if accepted ~= '0' then member = tag .. ':a' .. accepted end
        if accepted == '0' or not redis.call('ZSCORE', key, member) then
          for c = 1, ncaps do
            local from = string.format('(%d', now - caps[c][2])
            if redis.call('ZCOUNT', key, from, '+inf') >= caps[c][1] then
              answer = 4
              break
            end
          end
          if answer == 0 then
            redis.call('ZADD', key, now, member)
            redis.call('PEXPIRE', key, longest)
          end
        end
      end
    end
  end
  out[#out + 1] = answer
  out[#out + 1] = since
end
return out
"#;

/// Gives back reservations. ARGV: the cap key prefix, then `user, tag` of each. Returns how
/// many were found.
const RELEASE: &str = r#"
local n = 0
for j = 2, #ARGV, 2 do
  n = n + give_back(ARGV[1] .. ARGV[j], ARGV[j + 1])
end
return n
"#;

/// Remembers a dead token and forgets those reported longer ago than the ttl. KEYS:
/// dead_tokens, dead_tokens_idx, dead_tokens_user. ARGV: token, invalid since, ttl (ms), user
/// id (empty: none), the per-user token set prefix. The report instant is
/// Redis' own clock, so the listing's order is the order of the writes whichever replica made
/// them: a listing resumed from a cursor cannot miss a token written after it with an earlier
/// instant.
const SUPPRESS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  local mine = ARGV[5] .. ARGV[4]
  redis.call('SADD', mine, ARGV[1])
  redis.call('PEXPIRE', mine, ARGV[3])
else
  redis.call('HDEL', KEYS[3], ARGV[1])
end
local horizon = string.format('(%d', now - tonumber(ARGV[3]))
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon, 'LIMIT', 0, 1000)
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
  redis.call('HDEL', KEYS[3], unpack(old))
end
return #old
"#;

/// Erases a user. KEYS: optout, dead_tokens, dead_tokens_idx, dead_tokens_user, the user's cap
/// counter, the user's dead-token set. ARGV: user. A token in the user's set is erased only if
/// it is still the user's (it may have been reported since for another user). Returns
/// `opt-out erased, cap sends erased, dead tokens erased`.
const FORGET: &str = r#"
local user = ARGV[1]
local optout = redis.call('SREM', KEYS[1], user)
local sends = redis.call('ZCARD', KEYS[5])
redis.call('DEL', KEYS[5])
local tokens = 0
for _, token in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  if redis.call('HGET', KEYS[4], token) == user then
    redis.call('HDEL', KEYS[2], token)
    redis.call('ZREM', KEYS[3], token)
    redis.call('HDEL', KEYS[4], token)
    tokens = tokens + 1
  end
end
redis.call('DEL', KEYS[6])
return {optout, sends, tokens}
"#;

/// Dead tokens read per round trip while listing.
const LIST_PAGE: usize = 500;

/// Policy state in Redis. See the module docs.
pub struct RedisPolicyState {
    client: Arc<RedisClient>,
    decide: Script,
    suppress: Script,
    forget: Script,
    suppression_ttl_ms: i64,
    releases: Arc<Releases>,
}

/// Reservations to give back, per app, until they are written: by the next decision of the
/// app (in the same script, so a release this replica has seen is applied before any later
/// decision of it), else by the flusher within [`RELEASE_FLUSH`].
#[derive(Default)]
struct Releases {
    by_app: Mutex<HashMap<String, Vec<(String, u64)>>>,
    queued: AtomicUsize,
}

/// How long a release waits for a decision of its app before the flusher writes it.
const RELEASE_FLUSH: Duration = Duration::from_millis(50);
/// Releases queued at most (Redis away): beyond it one is dropped with a warning, and its
/// send stays counted until its window ends.
const MAX_QUEUED_RELEASES: usize = 100_000;

impl Releases {
    fn push(&self, app: &str, user_id: &str, reservation: u64) -> bool {
        if self.queued.load(Ordering::Relaxed) >= MAX_QUEUED_RELEASES {
            return false;
        }
        let mut by_app = self.by_app.lock();
        match by_app.get_mut(app) {
            Some(list) => list.push((user_id.to_owned(), reservation)),
            None => {
                by_app.insert(app.to_owned(), vec![(user_id.to_owned(), reservation)]);
            }
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn take(&self, app: &str) -> Vec<(String, u64)> {
        let list = self.by_app.lock().remove(app).unwrap_or_default();
        self.queued.fetch_sub(list.len(), Ordering::Relaxed);
        list
    }

    fn take_all(&self) -> Vec<(String, Vec<(String, u64)>)> {
        let all: Vec<_> = self.by_app.lock().drain().collect();
        let n: usize = all.iter().map(|(_, list)| list.len()).sum();
        self.queued.fetch_sub(n, Ordering::Relaxed);
        all
    }

    /// Puts back releases whose write failed (written with the next decision or flush).
    fn put_back(&self, app: &str, list: Vec<(String, u64)>) {
        if list.is_empty() {
            return;
        }
        let room = MAX_QUEUED_RELEASES.saturating_sub(self.queued.load(Ordering::Relaxed));
        let lost = list.len().saturating_sub(room);
        if lost > 0 {
            warn!(%app, lost, "frequency-cap releases dropped: Redis unreachable for long");
        }
        let kept = list.len() - lost;
        self.by_app
            .lock()
            .entry(app.to_owned())
            .or_default()
            .extend(list.into_iter().take(kept));
        self.queued.fetch_add(kept, Ordering::Relaxed);
    }
}

/// Writes queued releases every [`RELEASE_FLUSH`] until the state is dropped.
async fn flush_releases(releases: Weak<Releases>, client: Arc<RedisClient>, script: Script) {
    loop {
        tokio::time::sleep(RELEASE_FLUSH).await;
        let Some(releases) = releases.upgrade() else {
            return;
        };
        for (app, list) in releases.take_all() {
            let prefix = AppKeys::new(&client.config().key_prefix, &app).cap_prefix();
            let mut invocation = script.prepare_invoke();
            invocation.arg(&prefix);
            for (user, tag) in &list {
                invocation.arg(user).arg(format!("{tag:016x}"));
            }
            let mut conn = client.conn();
            let result = invocation.invoke_async::<i64>(&mut conn).await;
            client.observe(&result);
            if let Err(e) = result {
                warn!(%app, error = %e, "could not give back frequency-cap reservations; retrying");
                releases.put_back(&app, list);
            }
        }
        drop(releases);
    }
}

impl RedisPolicyState {
    pub fn new(client: Arc<RedisClient>, suppression_ttl_ms: i64) -> Self {
        let releases = Arc::new(Releases::default());
        tokio::spawn(flush_releases(
            Arc::downgrade(&releases),
            Arc::clone(&client),
            Script::new(&format!("{GIVE_BACK_FN}{RELEASE}")),
        ));
        Self {
            client,
            decide: Script::new(&format!("{GIVE_BACK_FN}{DECIDE}")),
            suppress: Script::new(SUPPRESS),
            forget: Script::new(FORGET),
            suppression_ttl_ms,
            releases,
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
            .key(k.dead_tokens_user())
            .arg(now_ms)
            // Members of a cap counter must differ across replicas and calls within one ms.
            .arg(crate::domain::random_uuid().simple().to_string())
            .arg(k.cap_prefix())
            .arg(caps.len());
        for cap in caps {
            invocation.arg(cap.max).arg(cap.window_ms);
        }
        debug_assert!(longest(caps) >= 0);
        let releases = self.releases.take(app);
        invocation.arg(releases.len());
        for (user, tag) in &releases {
            invocation.arg(user).arg(format!("{tag:016x}"));
        }
        for q in queries {
            let flags = u8::from(q.opt_out) | (u8::from(q.quiet) << 1) | (u8::from(q.capped) << 2);
            invocation
                .arg(flags)
                .arg(q.user_id)
                .arg(q.device_token)
                .arg(q.registered_at_ms)
                .arg(format!("{:016x}", q.reservation))
                .arg(q.accepted_at_ms);
        }
        let mut conn = self.client.conn();
        let flat: Vec<i64> = match self.observe(invocation.invoke_async(&mut conn).await) {
            Ok(flat) => flat,
            Err(e) => {
                self.releases.put_back(app, releases);
                return Err(e);
            }
        };
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

    fn release(&self, app: &str, user_id: &str, reservation: u64) {
        if !self.releases.push(app, user_id, reservation) {
            warn!(%app, "frequency-cap release dropped: too many queued (Redis unreachable)");
        }
    }

    async fn suppress(
        &self,
        app: &str,
        user_id: &str,
        device_token: &str,
        since_ms: i64,
    ) -> Result<(), StoreError> {
        let k = self.keys(app);
        let mut conn = self.client.conn();
        let _: i64 = self.observe(
            self.suppress
                .key(k.dead_tokens())
                .key(k.dead_tokens_idx())
                .key(k.dead_tokens_user())
                .arg(device_token)
                .arg(since_ms)
                .arg(self.suppression_ttl_ms)
                .arg(user_id)
                .arg(k.user_tokens_prefix())
                .invoke_async(&mut conn)
                .await,
        )?;
        Ok(())
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
        let mut conn = self.client.conn();
        let (opt_out, cap_sends, suppressed_tokens): (i64, u64, u64) = self.observe(
            self.forget
                .key(k.optout())
                .key(k.dead_tokens())
                .key(k.dead_tokens_idx())
                .key(k.dead_tokens_user())
                .key(format!("{}{user_id}", k.cap_prefix()))
                .key(format!("{}{user_id}", k.user_tokens_prefix()))
                .arg(user_id)
                .invoke_async(&mut conn)
                .await,
        )?;
        Ok(Forgotten {
            opt_out: opt_out > 0,
            cap_sends,
            suppressed_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pushgate_mocks::redis_server::RedisServer;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::store::policy_state::MemoryPolicyState;
    use crate::store::redis::RedisConfig;

    /// A private Redis (kept alive by the first value) and a client connected to it.
    async fn connected() -> (RedisServer, Arc<RedisClient>) {
        let redis = RedisServer::start();
        let config = RedisConfig {
            url: Some(redis.url()),
            ..Default::default()
        };
        let client = RedisClient::connect(&config, CancellationToken::new()).unwrap();
        assert!(client.wait_healthy(Duration::from_secs(5)).await);
        (redis, client)
    }

    /// The Redis scripts and the in-memory state answer the same scenario alike: the stage's
    /// order, rolling windows at chosen instants, a later registration lifting a suppression,
    /// listing resumed inside a run of equal instants, a released reservation freeing its
    /// send, and ForgetUser erasing the user's counter and dead tokens (not another user's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_and_memory_state_answer_alike() {
        let (_redis, client) = connected().await;
        let day = 86_400_000;
        let states: [Box<dyn PolicyState>; 2] = [
            Box::new(MemoryPolicyState::new(10 * day)),
            Box::new(RedisPolicyState::new(client, 10 * day)),
        ];
        for state in &states {
            let now = crate::store::now_ms();
            for (user, t) in [("u", "d1"), ("u", "d2"), ("w", "d3")] {
                state.suppress("app", user, t, now - 1_000).await.unwrap();
            }
            state.set_opt_out("app", "out", true).await.unwrap();
            let q = |user: &'static str, token: &'static str, tag: u64| Query {
                user_id: user,
                device_token: token,
                registered_at_ms: 0,
                opt_out: true,
                quiet: false,
                capped: true,
                reservation: tag,
                accepted_at_ms: 0,
            };
            let quiet = Query {
                quiet: true,
                ..q("u", "t", 1)
            };
            let quiet_out = Query {
                quiet: true,
                ..q("out", "d1", 1)
            };
            let revived = Query {
                registered_at_ms: now,
                ..q("u", "d2", 2)
            };
            let caps = [Cap {
                max: 2,
                window_ms: day,
            }];
            let answers = state
                .decide(
                    "app",
                    &caps,
                    now,
                    &[
                        quiet_out,
                        quiet,
                        q("u", "d1", 1),
                        revived,
                        q("u", "t", 3),
                        q("u", "t", 4),
                        q("v", "t", 5),
                    ],
                )
                .await
                .unwrap();
            use Answer::*;
            assert_eq!(
                answers,
                [
                    OptedOut,
                    Quiet,
                    Suppressed {
                        since_ms: now - 1_000
                    },
                    Send,
                    Send,
                    Capped,
                    Send
                ]
            );
            // A released reservation frees its send; an unknown tag frees none.
            state.release("app", "u", 99);
            state.release("app", "u", 3);
            // (With Redis the release is not awaited: wait until it shows.)
            let mut freed = Vec::new();
            for _ in 0..100 {
                freed = state
                    .decide("app", &caps, now + 1, &[q("u", "t", 6), q("u", "t", 7)])
                    .await
                    .unwrap();
                if freed[0] == Send {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(freed, [Send, Capped]);
            // The window rolls: a day later u may send again.
            let later = state
                .decide("app", &caps, now + day, &[q("u", "t", 8)])
                .await
                .unwrap();
            assert_eq!(later, [Send]);
            let listed = state.dead_tokens("app", 0, None, 10).await.unwrap();
            let mut names: Vec<_> = listed.iter().map(|t| t.device_token.as_str()).collect();
            names.sort();
            assert_eq!(names, ["d1", "d3"], "d2 was registered again");
            assert!(listed.iter().all(|t| t.since_ms == now - 1_000));
            let first = &listed[0];
            let rest = state
                .dead_tokens(
                    "app",
                    0,
                    Some((first.reported_at_ms, first.device_token.clone())),
                    10,
                )
                .await
                .unwrap();
            assert_eq!(rest, listed[1..].to_vec());
            let f = state.forget_user("app", "u").await.unwrap();
            assert_eq!(f.cap_sends, 2, "the sends of the open windows are left");
            assert_eq!(f.suppressed_tokens, 1, "d1 (d2 was revived, d3 is w's)");
            let left = state.dead_tokens("app", 0, None, 10).await.unwrap();
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].device_token, "d3");
        }
    }

    /// A scheduled message decided when due, then again by another replica after a crash
    /// (same tag, same acceptance instant), holds one reservation: the second decision passes
    /// and takes no second send of the window; a different message is still capped, and a
    /// release gives the one reservation back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_message_decided_again_after_a_crash_is_counted_once() {
        let (_redis, client) = connected().await;
        let day = 86_400_000;
        let replica_a = RedisPolicyState::new(Arc::clone(&client), day);
        let replica_b = RedisPolicyState::new(client, day);
        let caps = [Cap {
            max: 2,
            window_ms: day,
        }];
        let now = crate::store::now_ms();
        let due = |tag: u64, accepted_at_ms: i64| Query {
            user_id: "u",
            device_token: "t",
            registered_at_ms: 0,
            opt_out: true,
            quiet: false,
            capped: true,
            reservation: tag,
            accepted_at_ms,
        };
        let first = replica_a
            .decide("app", &caps, now, &[due(1, now - 5_000)])
            .await
            .unwrap();
        assert_eq!(first, [Answer::Send]);
        // Replica A died before the attempt; B decides the same message again, twice over.
        for _ in 0..2 {
            let again = replica_b
                .decide("app", &caps, now + 1, &[due(1, now - 5_000)])
                .await
                .unwrap();
            assert_eq!(again, [Answer::Send], "the message already holds its send");
        }
        // One send of two is taken: another message passes, a third is capped.
        let others = replica_b
            .decide(
                "app",
                &caps,
                now + 2,
                &[due(2, now - 4_000), due(3, now - 3_000)],
            )
            .await
            .unwrap();
        assert_eq!(others, [Answer::Send, Answer::Capped]);
        // The same tag accepted at another instant is another message (a batch sent again).
        let resent = replica_b
            .decide("app", &caps, now + 3, &[due(1, now - 1_000)])
            .await
            .unwrap();
        assert_eq!(resent, [Answer::Capped]);
        // Released, the reservation frees its send (the release goes with the next decision).
        replica_b.release("app", "u", 1);
        let freed = replica_b
            .decide("app", &caps, now + 4, &[due(4, now - 500)])
            .await
            .unwrap();
        assert_eq!(freed, [Answer::Send]);
    }
}
