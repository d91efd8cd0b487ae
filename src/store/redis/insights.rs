//! Campaign measurement in Redis (see `crate::store::insights` for the rules): receipts are
//! counted by a write loop of their own (one MULTI per app and write batch), events are
//! recorded by one Lua script each, atomically (check the event id, find the exposure, apply
//! the window, set the exposure's flag, count, remember the event id). Keys are in the app's
//! hash tag (see `keys.rs`), so every script and MULTI stays in one Cluster slot. Counters are
//! bounded by campaign x variant x provider x status; exposures and event ids expire after
//! the attribution window, counters `retention` after their last update.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::client::RedisClient;
use super::keys::AppKeys;
use crate::domain::{Platform, Receipt, ReceiptStatus, epoch_millis};
use crate::receipts::ReceiptObserver;
use crate::store::StoreError;
use crate::store::insights::{
    CampaignCounts, EventKind, ForgottenEvents, Insights, InsightsConfig, TrackEvent, Tracked,
    is_exposure, variant_of,
};

/// Receipts counted per write, at most.
const WRITE_BATCH: usize = 512;

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

/// Erases a user's exposures and the event ids recorded about them. ARGV: the insights key
/// prefix, user. Exposures are found in the user's set and, for those written before it
/// existed, in its latest-exposure hash; each is erased only if it is the user's. Returns
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
redis.call('DEL', base .. 'uexps:' .. user, base .. 'uev:' .. user, base .. 'uexp:' .. user)
return {exposures, events}
"#;

/// One terminal receipt to count.
struct Count {
    app: Arc<str>,
    campaign: Arc<str>,
    field: String,
    /// message id, user id, variant, time (ms) when the receipt is an exposure.
    exposure: Option<(String, String, String, i64)>,
}

/// Campaign measurement in Redis. See the module docs.
pub struct RedisInsights {
    client: Arc<RedisClient>,
    config: InsightsConfig,
    writes: mpsc::UnboundedSender<Count>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisInsights {
    /// Starts the counting write loop; it drains and ends when the client's stop token fires.
    pub fn start(client: Arc<RedisClient>, config: InsightsConfig) -> Arc<Self> {
        let (writes, rx) = mpsc::unbounded_channel();
        let me = Arc::new(Self {
            client,
            config,
            writes,
        });
        tokio::spawn(Arc::clone(&me).write_loop(rx));
        me
    }

    fn keys(&self, app: &str) -> AppKeys {
        AppKeys::new(&self.client.config().key_prefix, app)
    }

    async fn write_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Count>) {
        let stop = self.client.stop_token();
        let mut buf = Vec::with_capacity(WRITE_BATCH);
        loop {
            if buf.is_empty() {
                let n = tokio::select! {
                    n = rx.recv_many(&mut buf, WRITE_BATCH) => n,
                    _ = stop.cancelled() => {
                        rx.close();
                        rx.recv_many(&mut buf, usize::MAX).await
                    }
                };
                if n == 0 {
                    return;
                }
            }
            match self.flush(&buf).await {
                Ok(()) => buf.clear(),
                Err(e) => {
                    self.client.observe::<()>(&Err(e));
                    if stop.is_cancelled() {
                        tracing::warn!(
                            lost = buf.len(),
                            "redis unreachable at shutdown: campaign counts not written"
                        );
                        buf.clear();
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn flush(&self, buf: &[Count]) -> redis::RedisResult<()> {
        let mut by_app: HashMap<&str, Vec<&Count>> = HashMap::new();
        for c in buf {
            by_app.entry(&c.app).or_default().push(c);
        }
        let window = ms(self.config.attribution_window);
        let retention = ms(self.config.retention);
        let mut conn = self.client.conn();
        for (app, counts) in by_app {
            let k = self.keys(app);
            let prefix = k.insights_prefix();
            let mut pipe = redis::pipe();
            pipe.atomic();
            for c in counts {
                let stats = k.stats(&c.campaign);
                pipe.hincr(&stats, &c.field, 1).ignore();
                pipe.pexpire(&stats, retention as i64).ignore();
                if let Some((message, user, variant, at)) = &c.exposure {
                    let x = format!("{prefix}exp:{message}");
                    pipe.hset_multiple(
                        &x,
                        &[
                            ("c", c.campaign.as_ref()),
                            ("v", variant.as_str()),
                            ("u", user.as_str()),
                            ("t", at.to_string().as_str()),
                        ],
                    )
                    .ignore();
                    pipe.pexpire(&x, window as i64).ignore();
                    if !user.is_empty() {
                        let u = format!("{prefix}uexp:{user}");
                        pipe.hset_multiple(&u, &[(c.campaign.as_ref(), message), ("*", message)])
                            .ignore();
                        pipe.pexpire(&u, window as i64).ignore();
                        let all = format!("{prefix}uexps:{user}");
                        pipe.sadd(&all, message).ignore();
                        pipe.pexpire(&all, window as i64).ignore();
                    }
                }
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }
}

impl ReceiptObserver for RedisInsights {
    fn observe(&self, receipt: &Arc<Receipt>) {
        if !receipt.terminal() || receipt.meta.campaign_id.is_empty() {
            return;
        }
        let meta = &receipt.meta;
        let variant = variant_of(receipt);
        let exposure = is_exposure(receipt).then(|| {
            (
                meta.message_id.clone(),
                meta.user_id.clone(),
                variant.to_owned(),
                epoch_millis(receipt.completed_at.unwrap_or(meta.accepted_at)),
            )
        });
        let _ = self.writes.send(Count {
            app: Arc::clone(&meta.app_id),
            campaign: Arc::clone(&meta.campaign_id),
            field: format!(
                "{variant}|{}|{}",
                meta.platform.as_str(),
                receipt.status.as_str()
            ),
            exposure,
        });
    }
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
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("EVAL")
                .arg(TRACK)
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
                .arg(retention);
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
