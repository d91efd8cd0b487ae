//! Idempotency: a caller-supplied `message_id` seen for the same app within
//! `redis.idempotency_ttl_secs` is not sent again.
//!
//! At ingest, one pipeline per batch runs `SET <p>:{app}:idem:<id> accepted:<token> NX GET EX
//! ttl` for every caller-supplied id (Redis >= 7.0 for NX with GET; the token is the call's
//! own): a nil reply means the id is new and now claimed; any other reply is the earlier state
//! of that id: `accepted...` while it is in flight, or its terminal status (`delivered`,
//! `failed`, ...) once the receipt was emitted (written by the receipt observer with `SET XX
//! KEEPTTL`). Ids of recipients rejected by validation are released again, so a corrected
//! resend is accepted. A claim pipeline whose reply was lost (a timeout) may have been applied:
//! the call is refused, and [`release_own`] later deletes the keys that still hold its token
//! (never another call's claim nor an outcome), so the ids are not told "in flight" for the
//! rest of the ttl.

use std::collections::{HashMap, HashSet};

use super::RedisClient;
use crate::domain::ReceiptStatus;

/// The value of an idempotency key whose message has no terminal receipt yet starts so; the
/// claiming call's token follows (`accepted:<token>`).
pub const IN_FLIGHT: &str = "accepted";

/// The value a call claims its ids with.
pub fn claim_value(token: &str) -> String {
    format!("{IN_FLIGHT}:{token}")
}

/// Deletes each key (KEYS) that still holds the claim value ARGV[1]. Returns how many.
const RELEASE_OWN: &str = r#"
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
"#;

/// The idempotency key of `id` for `app`.
pub fn key(prefix: &str, app: &str, id: &str) -> String {
    format!("{prefix}:{{{app}}}:idem:{id}")
}

/// Claims `ids` (the first occurrence of each; empty ids are skipped). Returns the ids seen
/// before, with their earlier state.
pub async fn claim<'a>(
    store: &RedisClient,
    app: &str,
    ids: impl IntoIterator<Item = &'a str>,
    value: &str,
) -> redis::RedisResult<HashMap<String, String>> {
    let ttl = store.config().idempotency_ttl_secs;
    if ttl == 0 {
        return Ok(HashMap::new());
    }
    let prefix = &store.config().key_prefix;
    let mut seen = HashSet::new();
    let ids: Vec<&str> = ids
        .into_iter()
        .filter(|id| !id.is_empty() && seen.insert(*id))
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("SET")
            .arg(key(prefix, app, id))
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(ttl);
    }
    let mut conn = store.conn();
    let replies: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
    Ok(ids
        .into_iter()
        .zip(replies)
        .filter_map(|(id, earlier)| earlier.map(|e| (id.to_owned(), e)))
        .collect())
}

/// Releases ids claimed by `claim` whose recipients were not accepted after all.
pub async fn release(store: &RedisClient, app: &str, ids: &[String]) -> redis::RedisResult<()> {
    if ids.is_empty() || store.config().idempotency_ttl_secs == 0 {
        return Ok(());
    }
    let prefix = &store.config().key_prefix;
    let keys: Vec<String> = ids.iter().map(|id| key(prefix, app, id)).collect();
    let mut conn = store.conn();
    redis::cmd("DEL").arg(keys).query_async(&mut conn).await
}

/// Deletes the claims of `ids` that still hold `value` (see the module docs): Ok(n) deleted.
pub async fn release_own(
    store: &RedisClient,
    app: &str,
    ids: &[String],
    value: &str,
) -> redis::RedisResult<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let prefix = &store.config().key_prefix;
    let script = redis::Script::new(RELEASE_OWN);
    let mut invocation = script.prepare_invoke();
    for id in ids {
        invocation.key(key(prefix, app, id));
    }
    invocation.arg(value);
    let mut conn = store.conn();
    invocation.invoke_async(&mut conn).await
}

/// The terminal status recorded for an id, or `None` while it is in flight.
pub fn recorded_status(state: &str) -> Option<ReceiptStatus> {
    use ReceiptStatus as S;
    [
        S::Delivered,
        S::InvalidToken,
        S::Rejected,
        S::Failed,
        S::Expired,
        S::Dropped,
    ]
    .into_iter()
    .find(|s| s.as_str() == state)
}
