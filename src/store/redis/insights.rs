//! Campaign measurement in Redis (see `crate::store::insights` for the rules). Events are
//! recorded by one Lua script each, atomically (check the event id, find the exposure, apply
//! the window, set the exposure's flag, count, feed the open-time histograms). Keys are in the
//! app's hash tag (see `keys.rs`), so every script stays in one Cluster slot. Counters are
//! bounded by campaign x variant x provider x status; exposures and event ids expire after the
//! attribution window, counters `retention` after their last update.
//!
//! Terminal receipts are not counted here but by the queue's writer (`queue/write.rs`), in the
//! MULTI that appends the receipt to the receipts stream, and for a message the replica holds
//! inside the `ACK` script that releases its lease: a receipt and its counts are written
//! together or not at all. So a crash loses no count of a receipt in Redis: a terminal receipt
//! still queued in this process when it dies is lost with its counts, and its message (still
//! leased in Redis) is delivered again by the replica that reclaims it, which writes and counts
//! its one terminal receipt. A fenced receipt (another replica reclaimed the message) is neither
//! written nor counted. The counts thus equal the campaign's terminal receipts in the receipts
//! stream, except that a write batch written again because replicas did not confirm it
//! (`redis.min_replicas_acked`) may repeat a receipt that releases no lease, and its count
//! with it, as it repeats the stream entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::client::RedisClient;
use super::keys::AppKeys;
use crate::domain::{Platform, Receipt, ReceiptStatus, epoch_millis};
use crate::receipts::ReceiptObserver;
use crate::store::StoreError;
use crate::store::insights::{
    CampaignCounts, EventKind, ForgottenEvents, Insights, InsightsConfig, TrackEvent, Tracked,
    is_exposure, variant_of,
};
use crate::store::send_time::{self, Histogram, OpenHistograms};

/// Adds an open to an open-time histogram hash (see `crate::store::send_time`): weights relative
/// to the reference `r`, rescaled when the open is more than the rebase distance after it.
const ADD_OPEN_FN: &str = r#"
local function add_open(key, bucket, at, half, rebase, ttl)
  local r = tonumber(redis.call('HGET', key, 'r'))
  if not r then
    r = at
    redis.call('HSET', key, 'r', string.format('%d', at))
  elseif at - r > rebase then
    local all = redis.call('HGETALL', key)
    local f = 2 ^ ((r - at) / half)
    for i = 1, #all, 2 do
      if all[i] ~= 'r' then
        redis.call('HSET', key, all[i], string.format('%.17g', tonumber(all[i + 1]) * f))
      end
    end
    r = at
    redis.call('HSET', key, 'r', string.format('%d', at))
  end
  redis.call('HINCRBYFLOAT', key, bucket, string.format('%.17g', 2 ^ ((at - r) / half)))
  redis.call('PEXPIRE', key, ttl)
end
"#;

/// Records one event. ARGV: key prefix, event id, kind (`o`/`k`), message id, user id,
/// campaign, occurred at, window, event-id ttl, counter retention, then for opens: the instant
/// the histograms count it at, its hour of the week, the half-life, the rebase distance and the
/// histograms' ttl.
const TRACK: &str = r#"
local base = ARGV[1]
local ev = base .. 'ev:' .. ARGV[2]
if redis.call('EXISTS', ev) == 1 then return {'duplicate'} end
local kind, mid, user, campaign = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local at, window = tonumber(ARGV[7]), tonumber(ARGV[8])
if mid == '' then
  if user == '' then return {'unknown'} end
  local field = campaign
  if field == '' then field = '*' end
  mid = redis.call('HGET', base .. 'uexp:' .. user, field)
  if not mid then return {'unknown'} end
end
local xkey = base .. 'exp:' .. mid
local x = redis.call('HMGET', xkey, 'c', 'v', 't', 'u')
if not x[1] then return {'unknown'} end
if campaign ~= '' and x[1] ~= campaign then return {'unknown'} end
local outcome
local t = tonumber(x[3]) or 0
if kind == 'k' and (at < t or at - t > window) then
  outcome = 'window'
elseif redis.call('HSETNX', xkey, kind, 1) == 0 then
  outcome = 'again'
else
  local skey = base .. 'stats:' .. x[1]
  local name = 'opens'
  if kind == 'k' then name = 'conversions' end
  redis.call('HINCRBY', skey, x[2] .. '|' .. name, 1)
  redis.call('PEXPIRE', skey, ARGV[10])
  outcome = 'counted'
  local who = user
  if who == '' then who = x[4] or '' end
  if kind == 'o' and who ~= '' then
    local hat, half, rebase, ttl = tonumber(ARGV[11]), tonumber(ARGV[13]), tonumber(ARGV[14]), ARGV[15]
    add_open(base .. 'hist:' .. who, ARGV[12], hat, half, rebase, ttl)
    add_open(base .. 'hist_pop', ARGV[12], hat, half, rebase, ttl)
  end
end
redis.call('SET', ev, 1, 'PX', ARGV[9])
if x[4] and x[4] ~= '' then
  -- ForgetUser finds the user's events here.
  local mine = base .. 'uev:' .. x[4]
  redis.call('SADD', mine, ARGV[2])
  redis.call('PEXPIRE', mine, ARGV[9])
end
return {outcome, x[1], x[2]}
"#;

/// Erases a user's exposures, the event ids recorded about them and the user's open-time
/// histogram (the population's, which holds no user id, stays). ARGV: the insights key
/// prefix, user. Exposures are found in the values of the user's exposure hash (latest per
/// campaign, and `m:<id>` for each) and, as older versions wrote them, in the user's set; each
/// is erased only if it is the user's. Returns
/// `exposures, events` erased.
const FORGET: &str = r#"
local base, user = ARGV[1], ARGV[2]
local mids = redis.call('SMEMBERS', base .. 'uexps:' .. user)
for _, mid in ipairs(redis.call('HVALS', base .. 'uexp:' .. user)) do
  mids[#mids + 1] = mid
end
local exposures = 0
for _, mid in ipairs(mids) do
  local key = base .. 'exp:' .. mid
  if redis.call('HGET', key, 'u') == user then
    exposures = exposures + redis.call('DEL', key)
  end
end
local events = 0
for _, ev in ipairs(redis.call('SMEMBERS', base .. 'uev:' .. user)) do
  events = events + redis.call('DEL', base .. 'ev:' .. ev)
end
redis.call('DEL', base .. 'uexps:' .. user, base .. 'uev:' .. user, base .. 'uexp:' .. user,
  base .. 'hist:' .. user)
return {exposures, events}
"#;

/// What one terminal receipt of a campaign adds to the counters, as the queue's count scripts
/// read it (`COUNT_FN` in `queue/scripts.rs`): campaign `c`, stats field `f`, and for an
/// exposure the message `m`, user `u`, variant `v` and time `t` (ms).
#[derive(serde::Serialize)]
struct Count<'a> {
    c: &'a str,
    f: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    m: Option<&'a str>,
    u: &'a str,
    v: &'a str,
    t: String,
}

/// The counts of `receipt` (JSON), when it is a terminal receipt of a campaign.
pub(super) fn count_of(receipt: &Receipt) -> Option<String> {
    if !receipt.terminal() || receipt.meta.campaign_id.is_empty() {
        return None;
    }
    let meta = &receipt.meta;
    let variant = variant_of(receipt);
    let exposure = is_exposure(receipt);
    let count = Count {
        c: &meta.campaign_id,
        f: format!(
            "{variant}|{}|{}",
            meta.platform.as_str(),
            receipt.status.as_str()
        ),
        m: exposure.then_some(meta.message_id.as_str()),
        u: &meta.user_id,
        v: variant,
        t: epoch_millis(receipt.completed_at.unwrap_or(meta.accepted_at)).to_string(),
    };
    serde_json::to_string(&count).ok()
}

/// Campaign measurement in Redis. See the module docs.
pub struct RedisInsights {
    client: Arc<RedisClient>,
    config: InsightsConfig,
    /// `ADD_OPEN_FN` + `TRACK`.
    track_script: String,
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisInsights {
    /// The measurement store on `client`. (Receipts are counted by the Redis store's queue,
    /// started with the same `config`.)
    pub fn start(client: Arc<RedisClient>, config: InsightsConfig) -> Arc<Self> {
        Arc::new(Self {
            client,
            config,
            track_script: format!("{ADD_OPEN_FN}{TRACK}"),
        })
    }

    fn keys(&self, app: &str) -> AppKeys {
        AppKeys::new(&self.client.config().key_prefix, app)
    }
}

impl ReceiptObserver for RedisInsights {
    /// Nothing: the queue's writer counts receipts with the receipt itself (module docs).
    fn observe(&self, _receipt: &Arc<Receipt>) {}
}

fn status_from(s: &str) -> Option<ReceiptStatus> {
    Some(match s {
        "delivered" => ReceiptStatus::Delivered,
        "invalid_token" => ReceiptStatus::InvalidToken,
        "rejected" => ReceiptStatus::Rejected,
        "failed" => ReceiptStatus::Failed,
        "expired" => ReceiptStatus::Expired,
        "dropped" => ReceiptStatus::Dropped,
        _ => return None,
    })
}

fn platform_from(s: &str) -> Option<Platform> {
    match s {
        "apns" => Some(Platform::Apns),
        "fcm" => Some(Platform::Fcm),
        _ => None,
    }
}

/// The counts held in a campaign's stats hash.
fn parse_counts(fields: HashMap<String, u64>) -> CampaignCounts {
    let mut counts = CampaignCounts::new();
    for (field, n) in fields {
        let mut parts = field.rsplitn(3, '|').collect::<Vec<_>>();
        parts.reverse();
        match parts.as_slice() {
            [variant, platform, status] => {
                if let (Some(p), Some(s)) = (platform_from(platform), status_from(status)) {
                    *counts
                        .entry((*variant).to_owned())
                        .or_default()
                        .receipts
                        .entry((p, s))
                        .or_default() += n;
                    continue;
                }
                // A variant name with `|` in it, counting opens or conversions.
                let variant = format!("{variant}|{platform}");
                add_event_count(&mut counts, &variant, status, n);
            }
            [variant, what] => add_event_count(&mut counts, variant, what, n),
            _ => {}
        }
    }
    counts
}

fn add_event_count(counts: &mut CampaignCounts, variant: &str, what: &str, n: u64) {
    let c = counts.entry(variant.to_owned()).or_default();
    match what {
        "opens" => c.opens += n,
        "conversions" => c.conversions += n,
        _ => {}
    }
}

fn unreachable(e: redis::RedisError) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

#[async_trait::async_trait]
impl Insights for RedisInsights {
    async fn track(&self, app: &str, events: &[TrackEvent]) -> Result<Vec<Tracked>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = self.keys(app).insights_prefix();
        let window = ms(self.config.attribution_window);
        let retention = ms(self.config.retention);
        let now = crate::store::now_ms();
        let half = send_time::HALF_LIFE_MS;
        let mut pipe = redis::pipe();
        for e in events {
            let open_at = e.occurred_at_ms.min(now);
            pipe.cmd("EVAL")
                .arg(&self.track_script)
                .arg(0)
                .arg(&prefix)
                .arg(&e.event_id)
                .arg(match e.kind {
                    EventKind::Open => "o",
                    EventKind::Conversion => "k",
                })
                .arg(&e.message_id)
                .arg(&e.user_id)
                .arg(&e.campaign_id)
                .arg(e.occurred_at_ms)
                .arg(window)
                .arg(window)
                .arg(retention)
                .arg(open_at)
                .arg(send_time::hour_of_week(open_at, &e.zone))
                .arg(half)
                .arg(send_time::REBASE_HALF_LIVES * half)
                .arg(send_time::TTL_HALF_LIVES * half);
        }
        let mut conn = self.client.conn();
        let replies: Vec<Vec<String>> = pipe.query_async(&mut conn).await.map_err(unreachable)?;
        Ok(replies
            .into_iter()
            .map(|r| {
                let at = |i: usize| r.get(i).cloned().unwrap_or_default();
                let (campaign, variant) = (at(1), at(2));
                match r.first().map(String::as_str) {
                    Some("duplicate") => Tracked::Duplicate,
                    Some("counted") => Tracked::Counted { campaign, variant },
                    Some("again") => Tracked::AlreadyCounted { campaign, variant },
                    Some("window") => Tracked::OutsideWindow { campaign, variant },
                    _ => Tracked::Unknown,
                }
            })
            .collect())
    }

    async fn counts(&self, app: &str, campaign: &str) -> Result<CampaignCounts, StoreError> {
        let mut conn = self.client.conn();
        let fields: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.keys(app).stats(campaign))
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(parse_counts(fields))
    }

    async fn open_histograms(
        &self,
        app: &str,
        users: &[&str],
    ) -> Result<OpenHistograms, StoreError> {
        let prefix = self.keys(app).insights_prefix();
        let mut pipe = redis::pipe();
        pipe.hgetall(format!("{prefix}hist_pop"));
        for user in users {
            pipe.hgetall(format!("{prefix}hist:{user}"));
        }
        let mut conn = self.client.conn();
        let replies: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(unreachable)?;
        let mut replies = replies.into_iter();
        let population = replies
            .next()
            .map(|f| Histogram::from_fields(&f))
            .unwrap_or_default();
        let users = users
            .iter()
            .zip(replies)
            .filter(|(_, f)| !f.is_empty())
            .map(|(u, f)| ((*u).to_owned(), Histogram::from_fields(&f)))
            .collect();
        Ok(OpenHistograms { population, users })
    }

    async fn forget_user(&self, app: &str, user_id: &str) -> Result<ForgottenEvents, StoreError> {
        let mut conn = self.client.conn();
        let (exposures, events): (u64, u64) = redis::cmd("EVAL")
            .arg(FORGET)
            .arg(0)
            .arg(self.keys(app).insights_prefix())
            .arg(user_id)
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(ForgottenEvents { exposures, events })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_fields_parse_back() {
        let fields: HashMap<String, u64> = [
            ("a|apns|delivered", 3),
            ("a|fcm|failed", 1),
            ("a|opens", 2),
            ("holdout|fcm|dropped", 4),
            ("holdout|conversions", 1),
            ("x|y|opens", 5),
            ("junk", 9),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let c = parse_counts(fields);
        assert_eq!(
            c["a"].receipts[&(Platform::Apns, ReceiptStatus::Delivered)],
            3
        );
        assert_eq!(c["a"].receipts[&(Platform::Fcm, ReceiptStatus::Failed)], 1);
        assert_eq!(c["a"].opens, 2);
        assert_eq!(
            c["holdout"].receipts[&(Platform::Fcm, ReceiptStatus::Dropped)],
            4
        );
        assert_eq!(c["holdout"].conversions, 1);
        assert_eq!(c["x|y"].opens, 5);
        assert!(!c.contains_key("junk"));
    }
}
