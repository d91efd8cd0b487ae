//! The Redis queue behind [`super::RedisStore`]: persists accepted messages under a lease, parks
//! transiently failed jobs by due time, claims due ones in batches under a lease, releases what
//! a terminal receipt finished, and dead-letters jobs whose attempts are exhausted.
//!
//! # Protocol
//! - **Park** (`schedule`): one pipelined MULTI per write batch: `HSET jobs id record`,
//!   `ZADD delay:<me> due id`, and the job's lease (if it had one) is dropped.
//! - **Claim** (Lua, per app, up to `claim_batch` jobs): due ids move from this replica's delay
//!   set to `leases` (score = lease deadline) with `owner[id] = me`; leases that expired
//!   (their replica died or stalled) are taken over in the same call and counted as reclaimed.
//! - **Renew**: every `lease_ms / 3`, the leases of jobs this replica still holds are pushed
//!   forward (`ZADD XX GT`, pipelined), and the replica's heartbeat in `replicas` too.
//! - **Take over**: the delay set of a replica whose heartbeat expired is merged into ours (Lua),
//!   so jobs parked by a dead replica are still delivered.
//! - **Accept** (`persist_accepted`): every accepted message is written to `jobs` packed and
//!   unrendered, as it waits in memory (a reference into its batch's context, which is written
//!   once per batch with a count of the records that refer to it), and leased to this replica
//!   (one MULTI per chunk of a batch) before the caller is told it was accepted, so a `kill -9`
//!   loses nothing acknowledged. A claimed packed record is rendered from its batch's context.
//! - **Release**: whenever a packed record is replaced (park, dead letter) or deleted (ack), the
//!   same script that reads it lowers its batch's count, and the context goes with the last
//!   record. Scripts reach the context keys by name (`<p>:{app}:batch:<id>`, the app's hash
//!   tag, so the same Cluster slot as the keys they declare).
//! - **Ack** (Lua inside the MULTI that appends the terminal receipt to the receipts stream):
//!   the lease, owner and record are removed, only if this replica still owns the lease. A
//!   message thus has both its terminal receipt and its release in Redis, or neither (then it is
//!   delivered again after a crash: provider-side duplicates are bounded by the crashed
//!   replica's in-flight requests plus one write batch).
//! - **Dead letter**: after the last attempt the record (with its last error) moves to
//!   `dead` / `dead_idx`; admin RPCs list, replay (back into a delay set with attempts reset) or
//!   purge them.
//!
//! Each message is held by one replica at a time; only a lease that expires (crash, or a
//! replica stalled, or a Redis outage, longer than `lease_ms`) lets a second replica attempt
//! it, which the `reclaimed` counter shows.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use redis::Script;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::RedisClient;
use super::keys::AppKeys;
use super::record::{PackedJob, StoredBatch, StoredJob, StoredTemplate};
use crate::domain::{Receipt, ReceiptStatus, epoch_millis};
use crate::receipts::{Pending, ReceiptHub, Resolution};
use crate::registry::AppRuntime;
use crate::render::RenderContext;
use crate::store::{StoreStats, now_ms};
use crate::work::{AcceptedBatch, Job, Waiting, Work};

type JobKey = (Arc<str>, String);

/// What one claim call returned: the jobs (`id, record, reclaimed`) and the raw context (`ctx`,
/// `buf`) of each batch their packed records refer to.
struct Claimed {
    jobs: Vec<(String, Vec<u8>, bool)>,
    batches: HashMap<String, RawContext>,
}

/// A batch context as Redis returned it: `ctx` and `buf`, each absent if the key is gone.
type RawContext = (Option<Vec<u8>>, Option<Vec<u8>>);

/// A claim with its batch contexts restored.
struct Restored {
    jobs: Vec<(String, Vec<u8>, bool)>,
    batches: HashMap<String, Result<Arc<AcceptedBatch>, String>>,
}

/// The saved form of a batch's context (its packed recipients are saved beside it).
fn stored_batch(batch: &AcceptedBatch) -> StoredBatch {
    StoredBatch {
        batch_id: batch.batch_id.to_string(),
        campaign_id: batch.campaign_id.to_string(),
        template: StoredTemplate::from(&batch.source),
        apns_topic: batch.ctx.apns_topic.clone(),
        analytics_label: batch.ctx.analytics_label.clone(),
        ttl_ms: batch
            .ttl
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        campaign_rate_per_minute: batch.campaign_rate_per_minute,
        started_ms: epoch_millis(batch.started()),
    }
}

/// Lua shared by the scripts that read a record before replacing or deleting it: lowers the
/// count of each packed record's batch context, and deletes a context no record refers to.
/// The batch is read with a pattern, not a JSON decode: a packed record always starts
/// `{"packed":{"batch":"<hex>"` (`PackedJob` serializes `batch` first; the tests pin it).
const RELEASE_FN: &str = r#"
local BATCH_OF = '^{"packed":{"batch":"([^"]+)"'
local function release(jobs, prefix, ids)
  if #ids == 0 then return end
  local recs = redis.call('HMGET', jobs, unpack(ids))
  local counts = {}
  for i = 1, #ids do
    local batch = recs[i] and string.match(recs[i], BATCH_OF)
    if batch then counts[batch] = (counts[batch] or 0) + 1 end
  end
  for batch, n in pairs(counts) do
    local key = prefix .. batch
    if redis.call('HINCRBY', key, 'left', -n) <= 0 then redis.call('DEL', key) end
  end
end
"#;

/// Releases packed records about to be replaced or deleted (park, dead letter).
const RELEASE: &str = r#"
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
release(KEYS[1], ARGV[1], ids)
return 1
"#;

/// Claims due and expired-lease jobs. Returns `{jobs, contexts}`: `jobs` as flat
/// `id, record, reclaimed` triples, and `contexts` as flat `batch, ctx, buf` triples, once per
/// batch that a claimed packed record refers to (`ctx`/`buf` false if the context is gone).
const CLAIM: &str = r#"
local now = tonumber(ARGV[1])
local deadline = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local me = ARGV[4]
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
if #ids > 0 then
  -- The due ids are the lowest ranks.
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #ids - 1)
  local recs = redis.call('HMGET', KEYS[4], unpack(ids))
  local lease = {}
  local own = {}
  for i, id in ipairs(ids) do
    local rec = recs[i]
    if rec then
      lease[#lease + 1] = deadline
      lease[#lease + 1] = id
      own[#own + 1] = id
      own[#own + 1] = me
      out[#out + 1] = id
      out[#out + 1] = rec
      out[#out + 1] = '0'
    end
  end
  if #lease > 0 then
    redis.call('ZADD', KEYS[2], unpack(lease))
    redis.call('HSET', KEYS[3], unpack(own))
  end
end
local left = limit - #ids
if left > 0 then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, left)
  for _, id in ipairs(expired) do
    local rec = redis.call('HGET', KEYS[4], id)
    if redis.call('HGET', KEYS[3], id) == me then
      -- Still ours (renewal lagged, e.g. after a Redis outage): extend, do not re-run.
      redis.call('ZADD', KEYS[2], deadline, id)
    elseif rec then
      redis.call('ZADD', KEYS[2], deadline, id)
      redis.call('HSET', KEYS[3], id, me)
      out[#out + 1] = id
      out[#out + 1] = rec
      out[#out + 1] = '1'
    else
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
    end
  end
end
local contexts = {}
local seen = {}
for i = 2, #out, 3 do
  local batch = string.match(out[i], '^{"packed":{"batch":"([^"]+)"')
  if batch and not seen[batch] then
    seen[batch] = true
    local ctx = redis.call('HMGET', ARGV[5] .. batch, 'ctx', 'buf')
    contexts[#contexts + 1] = batch
    contexts[#contexts + 1] = ctx[1]
    contexts[#contexts + 1] = ctx[2]
  end
end
return {out, contexts}
"#;

/// Releases the leases this replica still owns and deletes their records (after `RELEASE_FN`).
const ACK: &str = r#"
local me = ARGV[1]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local mine = {}
for i, id in ipairs(ids) do
  if owners[i] == me then mine[#mine + 1] = id end
end
if #mine > 0 then
  release(KEYS[3], ARGV[2], mine)
  redis.call('ZREM', KEYS[1], unpack(mine))
  redis.call('HDEL', KEYS[2], unpack(mine))
  redis.call('HDEL', KEYS[3], unpack(mine))
end
return #mine
"#;

const TAKEOVER: &str = r#"
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MIN')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"#;

/// Counters for tests, benchmarks and logs.
#[derive(Debug, Default)]
struct QueueStats {
    pub scheduled: AtomicU64,
    pub claimed: AtomicU64,
    /// Claimed from an expired lease: possibly attempted twice (crash or stall).
    pub reclaimed: AtomicU64,
    pub acked: AtomicU64,
    pub dead_lettered: AtomicU64,
}

enum Write {
    Park {
        app: Arc<str>,
        id: String,
        record: String,
        due_ms: i64,
    },
    Ack {
        app: Arc<str>,
        id: String,
    },
    /// A receipt for the app's receipts stream (protobuf-encoded).
    Receipt {
        app: Arc<str>,
        encoded: Vec<u8>,
        /// The message whose lease this terminal receipt releases.
        ack: Option<String>,
    },
    /// The terminal status of a message, for idempotent resends.
    Outcome {
        app: Arc<str>,
        id: String,
        status: &'static str,
    },
    Dead {
        app: Arc<str>,
        id: String,
        record: String,
        at_ms: i64,
    },
}

/// The queue. See the module docs.
pub(super) struct RedisRetryQueue {
    store: Arc<RedisClient>,
    hub: Arc<ReceiptHub>,
    apps: HashMap<String, (Arc<AppRuntime>, AppKeys)>,
    /// Pendings of jobs parked by this process, for their original caller.
    local: DashMap<JobKey, Pending>,
    /// Jobs this replica holds a lease on (renewed until their terminal receipt).
    held: DashMap<JobKey, ()>,
    writes: mpsc::UnboundedSender<Write>,
    stopped: AtomicBool,
    /// Set while a write batch failed and waits to be written again. A failed batch may still
    /// have been applied (its reply lost to an outage or a timeout); writing it again is harmless
    /// only if no job was claimed in between, so claiming pauses until the batch is through.
    write_backlog: AtomicBool,
    stats: QueueStats,
    claim: Script,
    takeover: Script,
    /// `RELEASE_FN` + `ACK`, and `RELEASE_FN` + `RELEASE`, sent with EVAL inside MULTIs.
    ack_script: String,
    release_script: String,
}

impl RedisRetryQueue {
    /// Starts the writer and the claimer. Due jobs go into `dispatch`; when `stop` fires, claiming
    /// ends, pending writes are flushed and the parked jobs' `Pending`s are handed off (they stay
    /// in Redis for the next replica).
    pub fn start(
        store: Arc<RedisClient>,
        hub: Arc<ReceiptHub>,
        apps: impl IntoIterator<Item = Arc<AppRuntime>>,
        dispatch: mpsc::Sender<Work>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let prefix = store.config().key_prefix.clone();
        let apps = apps
            .into_iter()
            .map(|a| {
                (
                    a.id.to_string(),
                    (Arc::clone(&a), AppKeys::new(&prefix, &a.id)),
                )
            })
            .collect();
        let (writes, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Self {
            store,
            hub,
            apps,
            local: DashMap::new(),
            held: DashMap::new(),
            writes,
            stopped: AtomicBool::new(false),
            write_backlog: AtomicBool::new(false),
            stats: QueueStats::default(),
            claim: Script::new(CLAIM),
            takeover: Script::new(TAKEOVER),
            ack_script: format!("{RELEASE_FN}{ACK}"),
            release_script: format!("{RELEASE_FN}{RELEASE}"),
        });
        let writer = Arc::clone(&queue);
        let writer_stop = stop.clone();
        let writer_done = tokio::spawn(async move { writer.write_loop(rx, writer_stop).await });
        let claimer = Arc::clone(&queue);
        tokio::spawn(async move {
            claimer.claim_loop(dispatch, stop).await;
            let _ = writer_done.await;
            claimer.hand_off_parked();
        });
        queue
    }

    /// Persists freshly accepted messages, packed and leased to this replica, before they are
    /// acknowledged to the caller: one MULTI per app, which also saves the context of each
    /// batch seen for the first time and counts the records that refer to it. If this process
    /// dies, the leases expire and another replica (or this one restarted) renders and delivers
    /// them. The terminal receipt releases them (ack).
    pub async fn persist_accepted(&self, messages: &[Waiting]) -> redis::RedisResult<()> {
        #[derive(Default)]
        struct Rows<'a> {
            records: Vec<(&'a str, String)>,
            leases: Vec<(i64, &'a str)>,
            owners: Vec<(&'a str, &'a str)>,
            /// Per batch of this call: the batch, and how many records refer to it.
            batches: Vec<(&'a Arc<AcceptedBatch>, i64)>,
        }
        let me = self.store.replica();
        let deadline =
            now_ms() + i64::try_from(self.store.config().lease_ms).unwrap_or(i64::MAX / 2);
        let mut by_app: HashMap<&str, Rows<'_>> = HashMap::new();
        for message in messages {
            let batch = message.batch();
            let (at, index, accepted_ms) = message.packed_position();
            let id = message.message_id();
            let rows = by_app.entry(&batch.app.id).or_default();
            let record = PackedJob {
                batch: batch.key.to_string(),
                at,
                index,
                accepted_ms,
            }
            .to_json();
            rows.records.push((id, record));
            rows.leases.push((deadline, id));
            rows.owners.push((id, me));
            match rows.batches.last_mut() {
                Some((last, n)) if Arc::ptr_eq(last, batch) => *n += 1,
                _ => rows.batches.push((batch, 1)),
            }
        }
        let mut conn = self.store.conn();
        for (app, rows) in &by_app {
            let Some(k) = self.keys(app) else { continue };
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (batch, n) in &rows.batches {
                let key = k.batch(&batch.key);
                if !batch.is_saved() {
                    pipe.hset_multiple(
                        &key,
                        &[
                            ("ctx", stored_batch(batch).to_json().into_bytes()),
                            ("buf", batch.packed_recipients().to_vec()),
                        ],
                    )
                    .ignore();
                }
                pipe.hincr(&key, "left", *n).ignore();
            }
            pipe.hset_multiple(k.jobs(), &rows.records)
                .ignore()
                .zadd_multiple(k.leases(), &rows.leases)
                .ignore()
                .hset_multiple(k.owner(), &rows.owners)
                .ignore();
            let result = pipe.query_async::<()>(&mut conn).await;
            self.store.observe(&result);
            result?;
            for (batch, _) in &rows.batches {
                batch.mark_saved();
            }
        }
        for message in messages {
            self.held.insert(
                (
                    Arc::clone(&message.app().id),
                    message.message_id().to_owned(),
                ),
                (),
            );
        }
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        let s = &self.stats;
        StoreStats {
            scheduled: s.scheduled.load(Ordering::Relaxed),
            claimed: s.claimed.load(Ordering::Relaxed),
            reclaimed: s.reclaimed.load(Ordering::Relaxed),
            acked: s.acked.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
        }
    }

    /// Jobs parked by this process whose `Pending` is still held here.
    pub fn parked_here(&self) -> usize {
        self.local.len()
    }

    fn keys(&self, app: &str) -> Option<&AppKeys> {
        self.apps.get(app).map(|(_, k)| k)
    }

    /// Sends a write to the writer; false when the writer has ended.
    fn write(&self, w: Write) -> bool {
        self.writes.send(w).is_ok()
    }

    async fn write_loop(&self, mut rx: mpsc::UnboundedReceiver<Write>, stop: CancellationToken) {
        let batch = self.store.config().write_batch;
        let mut buf = Vec::with_capacity(batch);
        loop {
            if buf.is_empty() {
                let n = tokio::select! {
                    n = rx.recv_many(&mut buf, batch) => n,
                    _ = stop.cancelled() => {
                        // Drain what was queued before the stop, then end.
                        rx.close();
                        rx.recv_many(&mut buf, usize::MAX).await
                    }
                };
                if n == 0 {
                    return;
                }
            }
            match self.flush(&buf).await {
                Ok(()) => {
                    buf.clear();
                    self.write_backlog.store(false, Ordering::Release);
                }
                Err(e) => {
                    self.write_backlog.store(true, Ordering::Release);
                    self.store.observe::<()>(&Err(e));
                    if stop.is_cancelled() && self.stopped.load(Ordering::Acquire) {
                        // Shutting down with Redis away: give up on these writes.
                        self.abandon(std::mem::take(&mut buf));
                        if rx.is_closed() && rx.is_empty() {
                            return;
                        }
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Writes that could not be made durable at shutdown: the caller gets a FAILED receipt.
    fn abandon(&self, writes: Vec<Write>) {
        for w in writes {
            if let Write::Park { app, id, .. } = w
                && let Some((_, pending)) = self.local.remove(&(app, id))
            {
                pending.resolve(Resolution::gateway(
                    ReceiptStatus::Failed,
                    "gateway shut down and Redis was unreachable; the retry was not persisted",
                ));
            }
        }
    }

    /// Writes one batch: per app, one MULTI of variadic commands (all keys share the app's
    /// hash tag, so this is valid on Cluster), then one ack script call.
    async fn flush(&self, buf: &[Write]) -> redis::RedisResult<()> {
        #[derive(Default)]
        struct Group<'a> {
            jobs: Vec<(&'a str, &'a str)>,
            due: Vec<(i64, &'a str)>,
            parked: Vec<&'a str>,
            dead: Vec<(&'a str, &'a str)>,
            dead_at: Vec<(i64, &'a str)>,
            dead_ids: Vec<&'a str>,
            outcomes: Vec<(&'a str, &'static str)>,
            receipts: Vec<&'a [u8]>,
            acks: Vec<&'a str>,
        }
        let me = self.store.replica();
        let mut groups: HashMap<&str, Group<'_>> = HashMap::new();
        for w in buf {
            match w {
                Write::Park {
                    app,
                    id,
                    record,
                    due_ms,
                } => {
                    let g = groups.entry(app).or_default();
                    g.jobs.push((id, record));
                    g.due.push((*due_ms, id));
                    g.parked.push(id);
                }
                Write::Dead {
                    app,
                    id,
                    record,
                    at_ms,
                } => {
                    let g = groups.entry(app).or_default();
                    g.dead.push((id, record));
                    g.dead_at.push((*at_ms, id));
                    g.dead_ids.push(id);
                }
                Write::Ack { app, id } => groups.entry(app).or_default().acks.push(id),
                Write::Outcome { app, id, status } => {
                    groups.entry(app).or_default().outcomes.push((id, status))
                }
                Write::Receipt { app, encoded, ack } => {
                    let g = groups.entry(app).or_default();
                    g.receipts.push(encoded);
                    if let Some(id) = ack {
                        g.acks.push(id);
                    }
                }
            }
        }
        let mut conn = self.store.conn();
        for (app, g) in groups {
            let Some(k) = self.keys(app) else { continue };
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !g.parked.is_empty() || !g.dead_ids.is_empty() {
                // Before the records are replaced or deleted: see `RELEASE_FN`.
                pipe.cmd("EVAL")
                    .arg(&self.release_script)
                    .arg(1)
                    .arg(k.jobs())
                    .arg(k.batch_prefix())
                    .arg(&g.parked)
                    .arg(&g.dead_ids)
                    .ignore();
            }
            if !g.parked.is_empty() {
                pipe.hset_multiple(k.jobs(), &g.jobs).ignore();
                pipe.zadd_multiple(k.delay(me), &g.due).ignore();
                pipe.zrem(k.leases(), &g.parked).ignore();
                pipe.hdel(k.owner(), &g.parked).ignore();
            }
            if !g.dead_ids.is_empty() {
                pipe.hset_multiple(k.dead(), &g.dead).ignore();
                pipe.zadd_multiple(k.dead_idx(), &g.dead_at).ignore();
                pipe.hdel(k.jobs(), &g.dead_ids).ignore();
                pipe.zrem(k.leases(), &g.dead_ids).ignore();
                pipe.hdel(k.owner(), &g.dead_ids).ignore();
            }
            for (id, status) in &g.outcomes {
                let key = super::idempotency::key(&self.store.config().key_prefix, app, id);
                pipe.cmd("SET")
                    .arg(key)
                    .arg(*status)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .ignore();
            }
            if !g.receipts.is_empty() {
                let stream = super::feed::key(&self.store.config().key_prefix, app);
                let maxlen = self.store.config().receipts_stream_maxlen;
                for encoded in &g.receipts {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(maxlen)
                        .arg("*")
                        .arg("r")
                        .arg(*encoded)
                        .ignore();
                }
            }
            if g.acks.is_empty() {
                pipe.query_async::<()>(&mut conn).await?;
            } else {
                // EVAL (not EVALSHA) inside the MULTI: no NOSCRIPT round trip; Redis caches it.
                pipe.cmd("EVAL")
                    .arg(&self.ack_script)
                    .arg(3)
                    .arg(k.leases())
                    .arg(k.owner())
                    .arg(k.jobs())
                    .arg(me)
                    .arg(k.batch_prefix())
                    .arg(&g.acks);
                let (n,): (u64,) = pipe.query_async(&mut conn).await?;
                self.stats.acked.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    async fn claim_loop(&self, dispatch: mpsc::Sender<Work>, stop: CancellationToken) {
        let config = self.store.config().clone();
        let poll = Duration::from_millis(config.poll_ms);
        let maintain_every = Duration::from_millis((config.lease_ms / 3).max(1));
        let mut next_maintenance = Instant::now();
        'outer: loop {
            if stop.is_cancelled() {
                break;
            }
            if Instant::now() >= next_maintenance {
                if let Err(e) = self.maintain().await {
                    self.store.observe::<()>(&Err(e));
                }
                next_maintenance = Instant::now() + maintain_every;
            }
            let mut full = false;
            if self.write_backlog.load(Ordering::Acquire) {
                // See `write_backlog`: no claim until the failed write batch is through.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(poll) => {}
                }
                continue;
            }
            for (app_id, (app, keys)) in &self.apps {
                let claimed = match self.claim_batch(keys, config.claim_batch).await {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        debug!(app = %app_id, error = %e, "claim failed");
                        self.store.observe::<()>(&Err(e));
                        continue;
                    }
                };
                full |= claimed.jobs.len() >= config.claim_batch;
                let Restored { jobs, batches } = self.restore_batches(app, claimed);
                for (id, record, reclaimed) in jobs {
                    let Some(job) = self.job_of(app, id, &record, reclaimed, &batches) else {
                        continue;
                    };
                    let slot = tokio::select! {
                        biased;
                        _ = stop.cancelled() => None,
                        slot = dispatch.reserve() => slot.ok(),
                    };
                    match slot {
                        Some(slot) => slot.send(job.into()),
                        None => {
                            // Leave the lease to expire: another replica (or our restart)
                            // reclaims the job; this process hands the receipt duty off.
                            job.pending.hand_off();
                            break 'outer;
                        }
                    }
                }
            }
            if !full {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
        self.stopped.store(true, Ordering::Release);
    }

    async fn claim_batch(&self, keys: &AppKeys, limit: usize) -> redis::RedisResult<Claimed> {
        let now = now_ms();
        let deadline = now + i64::try_from(self.store.config().lease_ms).unwrap_or(i64::MAX / 2);
        let me = self.store.replica();
        let mut conn = self.store.conn();
        let (flat, contexts): (Vec<redis::Value>, Vec<redis::Value>) = self
            .claim
            .key(keys.delay(me))
            .key(keys.leases())
            .key(keys.owner())
            .key(keys.jobs())
            .arg(now)
            .arg(deadline)
            .arg(limit)
            .arg(me)
            .arg(keys.batch_prefix())
            .invoke_async(&mut conn)
            .await?;
        let mut jobs = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(id), Some(rec), Some(flag)) = (it.next(), it.next(), it.next()) {
            let id: String = redis::from_redis_value(id)?;
            let rec: Vec<u8> = redis::from_redis_value(rec)?;
            let flag: String = redis::from_redis_value(flag)?;
            jobs.push((id, rec, flag == "1"));
        }
        let mut batches = HashMap::new();
        let mut it = contexts.into_iter();
        while let (Some(name), Some(ctx), Some(buf)) = (it.next(), it.next(), it.next()) {
            let name: String = redis::from_redis_value(name)?;
            let ctx: Option<Vec<u8>> = redis::from_redis_value(ctx)?;
            let buf: Option<Vec<u8>> = redis::from_redis_value(buf)?;
            batches.insert(name, (ctx, buf));
        }
        Ok(Claimed { jobs, batches })
    }

    /// The batch contexts of one claim, restored (template compiled) once each; a context that
    /// is gone or does not parse is kept as its error, for the records that refer to it.
    fn restore_batches(&self, app: &Arc<AppRuntime>, claimed: Claimed) -> Restored {
        let batches = claimed
            .batches
            .into_iter()
            .map(|(name, (ctx, buf))| {
                let restored = match (ctx, buf) {
                    (Some(ctx), Some(buf)) => self.restore_batch(app, &name, &ctx, buf),
                    _ => Err(format!("batch context `{name}` is missing")),
                };
                (name, restored.map(Arc::new))
            })
            .collect();
        Restored {
            jobs: claimed.jobs,
            batches,
        }
    }

    fn restore_batch(
        &self,
        app: &Arc<AppRuntime>,
        name: &str,
        ctx: &[u8],
        buf: Vec<u8>,
    ) -> Result<AcceptedBatch, String> {
        let stored = StoredBatch::from_json(ctx).map_err(|e| e.to_string())?;
        let source = stored.template.template().map_err(|e| e.to_string())?;
        AcceptedBatch::restore(
            Arc::clone(app),
            name.into(),
            stored.batch_id.as_str().into(),
            stored.campaign_id.as_str().into(),
            source,
            RenderContext {
                apns_topic: stored.apns_topic.clone(),
                analytics_label: stored.analytics_label.clone(),
            },
            stored.ttl(),
            stored.campaign_rate_per_minute,
            stored.started(),
            buf.into_boxed_slice(),
            Arc::clone(&self.hub),
        )
        .map_err(|e| format!("batch context `{name}`: {}: {}", e.field, e.reason))
    }

    /// Turns a claimed record into a job, with the local `Pending` when this process parked it.
    /// A packed record is rendered from its batch's context; one that does not render ends
    /// REJECTED naming the field, as it would have in memory.
    fn job_of(
        &self,
        app: &Arc<AppRuntime>,
        id: String,
        record: &[u8],
        reclaimed: bool,
        batches: &HashMap<String, Result<Arc<AcceptedBatch>, String>>,
    ) -> Option<Job> {
        self.stats.claimed.fetch_add(1, Ordering::Relaxed);
        if reclaimed {
            self.stats.reclaimed.fetch_add(1, Ordering::Relaxed);
            self.hub.metrics().redis_reclaimed.inc();
            warn!(app = %app.id, message_id = %id, "reclaimed an expired lease: the job may be attempted twice");
        }
        let key: JobKey = (Arc::clone(&app.id), id);
        if let Some(packed) = PackedJob::from_record(record) {
            let restored =
                packed
                    .map_err(|e| e.to_string())
                    .and_then(|p| match batches.get(&p.batch) {
                        Some(Ok(batch)) => Ok((Arc::clone(batch), p)),
                        Some(Err(e)) => Err(e.clone()),
                        None => Err(format!("batch context `{}` was not claimed", p.batch)),
                    });
            let (batch, p) = match restored {
                Ok(ok) => ok,
                Err(e) => {
                    self.dead_letter_corrupt(key, record, &e);
                    return None;
                }
            };
            let (meta, rendered) = batch.job_at(p.at, p.index, p.accepted_ms);
            let pending = Pending::detached(Arc::new(meta), Arc::clone(&self.hub), 0);
            self.held.insert(key, ());
            return match rendered {
                Ok(request) => Some(Job {
                    pending,
                    request,
                    app: Arc::clone(app),
                }),
                Err(error) => {
                    pending.resolve(Resolution {
                        field: error.field,
                        ..Resolution::gateway(ReceiptStatus::Rejected, error.reason)
                    });
                    None
                }
            };
        }
        let parsed = StoredJob::from_json(record).and_then(|r| {
            let request = r.provider_request()?;
            Ok((r, request))
        });
        let (stored, request) = match parsed {
            Ok(ok) => ok,
            Err(e) => {
                self.dead_letter_corrupt(key, record, &e.to_string());
                return None;
            }
        };
        let pending = match self.local.remove(&key) {
            Some((_, pending)) => pending,
            None => Pending::detached(
                Arc::new(stored.meta(Arc::clone(&app.id))),
                Arc::clone(&self.hub),
                stored.attempt,
            ),
        };
        self.held.insert(key, ());
        Some(Job {
            pending,
            request,
            app: Arc::clone(app),
        })
    }

    /// A record that cannot become a job is kept as a dead letter with its raw bytes.
    fn dead_letter_corrupt(&self, key: JobKey, record: &[u8], error: &str) {
        error!(app = %key.0, message_id = %key.1, %error, "corrupt job record: dead-lettered");
        let record = serde_json::json!({
            "raw": String::from_utf8_lossy(record),
            "last_error": error,
        })
        .to_string();
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.write(Write::Dead {
            app: key.0,
            id: key.1,
            record,
            at_ms: now_ms(),
        });
    }

    /// Lease renewal, heartbeat, and takeover of dead replicas' delay sets.
    async fn maintain(&self) -> redis::RedisResult<()> {
        let me = self.store.replica();
        let now = now_ms();
        let deadline = now + i64::try_from(self.store.config().lease_ms).unwrap_or(i64::MAX / 2);
        let mut by_app: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for entry in self.held.iter() {
            let (app, id) = entry.key();
            by_app.entry(Arc::clone(app)).or_default().push(id.clone());
        }
        let mut conn = self.store.conn();
        // One pipeline per app: each app's keys share a hash tag, so on a Redis Cluster every
        // pipeline goes to one node (a pipeline spanning apps would cross slots).
        for (app, (_, keys)) in &self.apps {
            let mut pipe = redis::pipe();
            pipe.zadd(keys.replicas(), me, deadline).ignore();
            if let Some(ids) = by_app.get(app.as_str()) {
                for chunk in ids.chunks(1_000) {
                    let mut cmd = redis::cmd("ZADD");
                    cmd.arg(keys.leases()).arg("XX").arg("GT");
                    for id in chunk {
                        cmd.arg(deadline).arg(id);
                    }
                    pipe.add_command(cmd).ignore();
                }
            }
            pipe.zrangebyscore(keys.replicas(), "-inf", now);
            let (dead,): (Vec<String>,) = pipe.query_async(&mut conn).await?;
            for replica in dead.iter().filter(|r| r.as_str() != me) {
                warn!(%replica, "replica heartbeat expired: taking over its parked jobs");
                let _: i64 = self
                    .takeover
                    .key(keys.delay(replica))
                    .key(keys.delay(me))
                    .key(keys.replicas())
                    .arg(replica)
                    .invoke_async(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// At shutdown: parked jobs stay in Redis; their `Pending`s are released without a terminal
    /// receipt, which the replica that finishes each job emits.
    fn hand_off_parked(&self) {
        let keys: Vec<JobKey> = self.local.iter().map(|e| e.key().clone()).collect();
        for key in keys {
            if let Some((_, pending)) = self.local.remove(&key) {
                pending.hand_off();
            }
        }
    }

    /// Parks `job` until `due_ms` (epoch milliseconds).
    pub fn park(&self, job: Job, due_ms: i64) {
        let meta = Arc::clone(job.pending.meta());
        let key: JobKey = (Arc::clone(&meta.app_id), meta.message_id.clone());
        if self.keys(&meta.app_id).is_none() {
            job.pending.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "app unknown to the retry queue",
            ));
            return;
        }
        let stored = StoredJob::new(&meta, &job.request, job.pending.attempt());
        self.held.remove(&key);
        self.stats.scheduled.fetch_add(1, Ordering::Relaxed);
        let record = stored.to_json();
        if self.stopped.load(Ordering::Acquire) {
            job.pending.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "gateway shut down before the retry was attempted",
            ));
            return;
        }
        self.local.insert(key.clone(), job.pending);
        if !self.write(Write::Park {
            app: Arc::clone(&key.0),
            id: key.1.clone(),
            record,
            due_ms,
        }) && let Some((_, pending)) = self.local.remove(&key)
        {
            pending.resolve(Resolution::gateway(
                ReceiptStatus::Failed,
                "gateway shut down before the retry was attempted",
            ));
        }
    }
}

impl RedisRetryQueue {
    /// Keeps a job whose attempts ran out as a dead letter, then emits its terminal receipt.
    pub fn dead_letter(&self, job: Job, resolution: Resolution) {
        // The record is written before the terminal receipt is emitted (same writer order as
        // the job's earlier writes); the lease is released by the dead-letter write itself.
        let Job {
            pending,
            request,
            app,
        } = job;
        let meta = Arc::clone(pending.meta());
        let key: JobKey = (Arc::clone(&meta.app_id), meta.message_id.clone());
        self.held.remove(&key);
        let mut stored = StoredJob::new(&meta, &request, pending.attempt());
        stored.last_error = resolution.reason.clone();
        if self.keys(&app.id).is_some() {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            self.write(Write::Dead {
                app: key.0,
                id: key.1,
                record: stored.to_json(),
                at_ms: now_ms(),
            });
        }
        pending.resolve(resolution);
    }

    /// Sees every receipt (the store's acknowledgement): records terminal outcomes for
    /// idempotency, appends the receipt to the app's stream and releases the lease a terminal
    /// receipt finished.
    pub fn observe(&self, receipt: &Arc<Receipt>) {
        let app = Arc::clone(&receipt.meta.app_id);
        if self.keys(&app).is_none() {
            return;
        }
        let config = self.store.config();
        let terminal = receipt.terminal();
        let id = receipt.meta.message_id.clone();
        // Refusals at ingest hold nothing here: a message of the same id that was accepted
        // must not be released by them. Rejections never claimed an idempotency key (or
        // released it).
        let accepted = receipt.accepted;
        if accepted
            && terminal
            && config.idempotency_ttl_secs > 0
            && receipt.status != ReceiptStatus::Rejected
        {
            self.write(Write::Outcome {
                app: Arc::clone(&app),
                id: id.clone(),
                status: receipt.status.as_str(),
            });
        }
        let key: JobKey = (app, id);
        let ack = accepted && terminal && self.held.remove(&key).is_some();
        let (app, id) = key;
        if config.receipts_stream_maxlen > 0 {
            // The terminal receipt and the lease release are written in one MULTI: after a
            // crash, a message has either both (done) or neither (delivered again).
            self.write(Write::Receipt {
                app,
                encoded: super::feed::encode(receipt),
                ack: ack.then_some(id),
            });
        } else if ack {
            self.write(Write::Ack { app, id });
        }
    }
}
