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
//! - **Unaccept** (`unaccept`, Lua): an accept MULTI that failed may still have been applied
//!   (its reply lost); the caller is told "not accepted", so the records this replica owns are
//!   removed with their lease and the ids' claims, at once or, when Redis does not answer,
//!   through the write loop first thing once it does.
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
//! - **Fencing**: park, dead letter and ack (with its terminal receipt) are scripts that skip
//!   every message whose lease another replica now owns, so a replica whose lease lapsed while
//!   it still worked on a message (a stall, a partition) neither overwrites the new owner's
//!   record nor appends a second, possibly different, terminal receipt; its retries' callers are
//!   handed off. The `fenced` counter shows them.
//!
//! Each message is held by one replica at a time; only a lease that expires (crash, or a
//! replica stalled, or a Redis outage, longer than `lease_ms`) lets a second replica attempt
//! it, which the `reclaimed` counter shows. The provider may then see it twice; the receipts
//! stream still gets one terminal receipt, the new owner's (the first replica's own caller has
//! already heard that replica's outcome).

mod claim;
mod scripts;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use redis::Script;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use scripts::{
    ACK, CANCEL, CLAIM, COUNT, COUNT_FN, DEAD, FENCE_FN, PARK, RELEASE, RELEASE_FN, TAKEOVER,
    UNACCEPT,
};
use write::Write;

use super::RedisClient;
use super::keys::AppKeys;
use super::record::{PackedJob, StoredBatch, StoredJob, StoredTemplate};
use crate::domain::{Receipt, ReceiptStatus, epoch_millis};
use crate::receipts::{Pending, ReceiptHub, Resolution};
use crate::registry::AppRuntime;
use crate::render::RenderContext;
use crate::store::insights::InsightsConfig;
use crate::store::{Scheduled, StoreStats, now_ms};
use crate::work::{AcceptedBatch, Job, Waiting, Work};

type JobKey = (Arc<str>, String);

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

/// Counters for tests, benchmarks and logs.
#[derive(Debug, Default)]
struct QueueStats {
    pub scheduled: AtomicU64,
    pub claimed: AtomicU64,
    /// Claimed from an expired lease: possibly attempted twice (crash or stall).
    pub reclaimed: AtomicU64,
    pub acked: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Writes refused because another replica had reclaimed the message's lease.
    pub fenced: AtomicU64,
}

/// What the writer has done (writes written, or given up at shutdown; whether its last batch
/// failed; whether it ended), and the deliveries waiting for it in [`RedisRetryQueue::settled`],
/// each with the count of writes it waits for, in the order they came. A write batch wakes
/// only the waiters it satisfies: at 200 ms provider latency thousands of requests wait, and
/// waking them all on every batch (a watch channel) cost more CPU than the writes.
#[derive(Debug, Default)]
pub(super) struct WriterProgress {
    done: u64,
    failing: bool,
    ended: bool,
    waiters: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl WriterProgress {
    fn caught_up(&self, sent: u64) -> bool {
        self.done >= sent || self.failing || self.ended
    }

    /// Wakes the waiters now satisfied (all of them while failing or ended). One that came
    /// later with a lower count than the one before it waits for that one: one batch more.
    fn wake(&mut self) {
        while let Some((sent, _)) = self.waiters.front() {
            if !self.caught_up(*sent) {
                break;
            }
            if let Some((_, waiter)) = self.waiters.pop_front() {
                let _ = waiter.send(());
            }
        }
    }
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
    /// Writes sent to the writer so far, and (published by the writer) how many of them it
    /// has written or given up on: `settled` compares the two.
    writes_sent: AtomicU64,
    writes_done: parking_lot::Mutex<WriterProgress>,
    /// Per app: changed whenever the writer appended receipts to its stream (wakes the
    /// resumable subscriptions of this replica).
    feed_written: HashMap<String, watch::Sender<()>>,
    stopped: AtomicBool,
    /// Set while a write batch failed and waits to be written again. A failed batch may still
    /// have been applied (its reply lost to an outage or a timeout); writing it again is harmless
    /// only if no job was claimed in between, so claiming pauses until the batch is through.
    write_backlog: AtomicBool,
    /// Undos of unconfirmed accepts queued in the write loop and not yet written.
    unaccepts_pending: AtomicUsize,
    stats: QueueStats,
    claim: Script,
    takeover: Script,
    /// `RELEASE_FN` + `ACK`, `RELEASE_FN` + `FENCE_FN` + `PARK` / `DEAD`, `RELEASE_FN` +
    /// `RELEASE` and `RELEASE_FN` + `UNACCEPT`, sent with EVAL (inside MULTIs).
    ack_script: String,
    /// `COUNT_FN` + `COUNT`.
    count_script: String,
    /// Campaign measurement: terminal receipts of campaigns are counted in the MULTI (and,
    /// releasing a lease, the script) that writes them. `None`: not counted.
    insights: Option<InsightsConfig>,
    park_script: String,
    dead_script: String,
    release_script: String,
    unaccept_script: String,
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
        insights: Option<InsightsConfig>,
    ) -> Arc<Self> {
        let prefix = store.config().key_prefix.clone();
        let apps: HashMap<String, (Arc<AppRuntime>, AppKeys)> = apps
            .into_iter()
            .map(|a| {
                (
                    a.id.to_string(),
                    (Arc::clone(&a), AppKeys::new(&prefix, &a.id)),
                )
            })
            .collect();
        let feed_written = apps
            .keys()
            .map(|app| (app.clone(), watch::channel(()).0))
            .collect();
        let (writes, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Self {
            store,
            hub,
            apps,
            local: DashMap::new(),
            held: DashMap::new(),
            writes,
            writes_sent: AtomicU64::new(0),
            writes_done: parking_lot::Mutex::new(WriterProgress::default()),
            feed_written,
            stopped: AtomicBool::new(false),
            write_backlog: AtomicBool::new(false),
            unaccepts_pending: AtomicUsize::new(0),
            stats: QueueStats::default(),
            claim: Script::new(CLAIM),
            takeover: Script::new(TAKEOVER),
            ack_script: format!("{RELEASE_FN}{COUNT_FN}{ACK}"),
            count_script: format!("{COUNT_FN}{COUNT}"),
            insights,
            park_script: format!("{RELEASE_FN}{FENCE_FN}{PARK}"),
            dead_script: format!("{RELEASE_FN}{FENCE_FN}{DEAD}"),
            release_script: format!("{RELEASE_FN}{RELEASE}"),
            unaccept_script: format!("{RELEASE_FN}{UNACCEPT}"),
        });
        let writer = Arc::clone(&queue);
        let writer_stop = stop.clone();
        let writer_done = tokio::spawn(async move { writer.write_loop(rx, writer_stop).await });
        let maintainer = Arc::clone(&queue);
        let maintainer_stop = stop.clone();
        tokio::spawn(async move { maintainer.maintain_loop(maintainer_stop).await });
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
        // `redis.min_replicas_acked`: the caller hears "accepted" only once replicas hold the
        // messages too, so a failover to one of them loses none.
        let replicated = self.store.replicated(&mut conn).await;
        self.store.observe(&replicated);
        if !replicated? {
            // Not accepted after all: release what was written, so a replica that reclaims the
            // leases does not deliver messages whose caller was told they failed.
            for message in messages {
                self.write(Write::Ack {
                    app: Arc::clone(&message.app().id),
                    id: message.message_id().to_owned(),
                    count: None,
                });
            }
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "fewer Redis replicas than redis.min_replicas_acked acknowledged the messages",
            )));
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

    /// Changes whenever this replica appended receipts of `app` to its stream.
    pub fn feed_written(&self, app: &str) -> Option<watch::Receiver<()>> {
        self.feed_written.get(app).map(watch::Sender::subscribe)
    }

    pub(super) fn wake_feed(&self, app: &str) {
        if let Some(w) = self.feed_written.get(app) {
            w.send_replace(());
        }
    }

    /// Undoes [`Self::persist_accepted`] for `messages` after it failed: a failed MULTI may
    /// still have been applied (its reply lost to a timeout or a broken connection), and a
    /// record left behind would be reclaimed and delivered once its lease expires, although
    /// the caller was told the message was not accepted. Tried at once; if Redis does not
    /// answer, the undo goes to the write loop, which writes it before anything queued after it
    /// (claiming pauses meanwhile), and releases the ids' idempotency keys when it runs.
    /// True when the undo was written at once (the messages are certainly not accepted); false
    /// when it waits in the write loop, which may run after another replica reclaimed them.
    pub async fn unaccept(&self, messages: &[Waiting]) -> bool {
        let mut undone = true;
        let mut by_app: HashMap<&Arc<str>, Vec<(String, String)>> = HashMap::new();
        for message in messages {
            by_app.entry(&message.app().id).or_default().push((
                message.message_id().to_owned(),
                message.batch().key.to_string(),
            ));
        }
        let mut conn = self.store.conn();
        for (app, pairs) in by_app {
            let Some(k) = self.keys(app) else { continue };
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(id, b)| (id.as_str(), b.as_str()))
                .collect();
            let mut pipe = redis::pipe();
            self.unaccept_command(&mut pipe, k, app, &refs);
            let result = pipe.query_async::<(u64,)>(&mut conn).await;
            self.store.observe(&result);
            match result {
                Ok((removed,)) => {
                    debug!(%app, removed, "unconfirmed accept undone");
                }
                Err(e) => {
                    undone = false;
                    warn!(%app, error = %e, messages = pairs.len(), "could not undo an unconfirmed accept; retrying in the write loop");
                    self.write_backlog.store(true, Ordering::Release);
                    self.unaccepts_pending.fetch_add(1, Ordering::AcqRel);
                    if !self.write(Write::Unaccept {
                        app: Arc::clone(app),
                        pairs,
                    }) {
                        self.unaccepts_pending.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
        }
        undone
    }

    /// True while an undo of an unconfirmed accept waits in the write loop: until it is
    /// written, a resend of its ids must not be accepted here (the undo could take it for the
    /// message it undoes), so the store reports itself unavailable for new sends.
    pub fn unaccepts_pending(&self) -> bool {
        self.unaccepts_pending.load(Ordering::Acquire) > 0
    }

    /// The `UNACCEPT` call for (id, batch key) `pairs` of `app`, added to `pipe`.
    pub(super) fn unaccept_command(
        &self,
        pipe: &mut redis::Pipeline,
        k: &AppKeys,
        app: &str,
        pairs: &[(&str, &str)],
    ) {
        let idem_prefix = super::idempotency::key(&self.store.config().key_prefix, app, "");
        let cmd = pipe
            .cmd("EVAL")
            .arg(&self.unaccept_script)
            .arg(3)
            .arg(k.leases())
            .arg(k.owner())
            .arg(k.jobs())
            .arg(self.store.replica())
            .arg(k.batch_prefix())
            .arg(idem_prefix);
        for (id, batch) in pairs {
            cmd.arg(*id).arg(*batch);
        }
    }

    pub fn stats(&self) -> StoreStats {
        let s = &self.stats;
        StoreStats {
            scheduled: s.scheduled.load(Ordering::Relaxed),
            claimed: s.claimed.load(Ordering::Relaxed),
            reclaimed: s.reclaimed.load(Ordering::Relaxed),
            acked: s.acked.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
            fenced: s.fenced.load(Ordering::Relaxed),
        }
    }

    /// Jobs parked by this process whose `Pending` is still held here.
    pub fn parked_here(&self) -> usize {
        self.local.len()
    }

    fn keys(&self, app: &str) -> Option<&AppKeys> {
        self.apps.get(app).map(|(_, k)| k)
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
        let stored = StoredJob::new(&meta, &job.request, job.pending.attempt())
            .with_due_check(job.due.as_deref());
        self.held.remove(&key);
        self.stats.scheduled.fetch_add(1, Ordering::Relaxed);
        let record = stored.to_json();
        if self.stopped.load(Ordering::Acquire) {
            // Its record is still in Redis under this replica's lease: the replica that
            // reclaims it retries it and emits its one terminal receipt (a FAILED here would be
            // a second one, disagreeing).
            job.pending.hand_off();
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

    /// Moves scheduled messages from their lease to this replica's delay set, each until its
    /// due time, as parked jobs, in one MULTI per app that is awaited: when this returns a
    /// crash loses none and sends none early. Their `Pending`s are not kept here: their callers
    /// no longer listen (see `Pending::schedule`), so whichever replica claims one when due
    /// (this one, or the one that takes over after a crash) emits its receipts to the app's
    /// subscribers, and memory here stays the same however many are scheduled. If the MULTI
    /// fails (Redis away), they go through the write loop like parked retries, which writes them
    /// once Redis is back.
    pub async fn schedule(&self, jobs: Vec<(Job, i64)>) {
        const SHUT_DOWN: &str = "gateway shut down before the message was scheduled";
        let mut by_app: HashMap<Arc<str>, Vec<(Job, i64, String)>> = HashMap::new();
        for (job, due_ms) in jobs {
            let meta = Arc::clone(job.pending.meta());
            if self.keys(&meta.app_id).is_none() || self.stopped.load(Ordering::Acquire) {
                job.pending
                    .resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN));
                continue;
            }
            self.held
                .remove(&(Arc::clone(&meta.app_id), meta.message_id.clone()));
            let record = StoredJob::new(&meta, &job.request, job.pending.attempt())
                .with_due_check(job.due.as_deref())
                .to_json();
            by_app
                .entry(Arc::clone(&meta.app_id))
                .or_default()
                .push((job, due_ms, record));
        }
        let me = self.store.replica();
        let mut conn = self.store.conn();
        for (app, list) in by_app {
            let Some(k) = self.keys(&app) else { continue };
            let ids: Vec<&str> = list
                .iter()
                .map(|(job, _, _)| job.pending.meta().message_id.as_str())
                .collect();
            let rows: Vec<(&str, &str)> = list
                .iter()
                .zip(&ids)
                .map(|((_, _, record), id)| (*id, record.as_str()))
                .collect();
            let due: Vec<(i64, &str)> = list
                .iter()
                .zip(&ids)
                .map(|((_, due_ms, _), id)| (*due_ms, *id))
                .collect();
            let mut pipe = redis::pipe();
            pipe.atomic()
                // Before the packed records are replaced: see `RELEASE_FN`.
                .cmd("EVAL")
                .arg(&self.release_script)
                .arg(1)
                .arg(k.jobs())
                .arg(k.batch_prefix())
                .arg(&ids)
                .ignore()
                .hset_multiple(k.jobs(), &rows)
                .ignore()
                .zadd_multiple(k.delay(me), &due)
                .ignore()
                .zrem(k.leases(), &ids)
                .ignore()
                .hdel(k.owner(), &ids)
                .ignore();
            let mut result = pipe.query_async::<()>(&mut conn).await;
            if result.is_ok() {
                // Not replicated as asked: the write loop writes them again until they are.
                result = match self.store.replicated(&mut conn).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "scheduled messages not acknowledged by enough replicas",
                    ))),
                    Err(e) => Err(e),
                };
            }
            self.store.observe(&result);
            let written = result.is_ok();
            for (job, due_ms, record) in list {
                self.stats.scheduled.fetch_add(1, Ordering::Relaxed);
                let queued = written
                    || self.write(Write::Park {
                        app: Arc::clone(&app),
                        id: job.pending.meta().message_id.clone(),
                        record,
                        due_ms,
                    });
                if queued {
                    job.pending.hand_off();
                } else {
                    job.pending
                        .resolve(Resolution::gateway(ReceiptStatus::Failed, SHUT_DOWN));
                }
            }
        }
    }

    /// Cancels the waiting scheduled messages of `app` that `which` selects (see
    /// `Store::cancel_scheduled`). Ids are checked in every replica's delay set (a dead
    /// replica's too, until it is taken over); a campaign or batch is found by reading the
    /// delay sets' records, so that costs a pass over the app's waiting messages.
    pub async fn cancel_scheduled(&self, app: &str, which: &Scheduled) -> redis::RedisResult<u64> {
        let Some((runtime, k)) = self.apps.get(app) else {
            return Ok(0);
        };
        let mut conn = self.store.conn();
        let replicas: Vec<String> = redis::cmd("ZRANGE")
            .arg(k.replicas())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        let mut delay_keys: Vec<String> = replicas.iter().map(|r| k.delay(r)).collect();
        let mine = k.delay(self.store.replica());
        if !delay_keys.contains(&mine) {
            delay_keys.push(mine);
        }
        let ids: Vec<String> = match which {
            Scheduled::Messages(ids) => ids.clone(),
            _ => {
                let mut ids = Vec::new();
                for key in &delay_keys {
                    let members: Vec<String> = redis::cmd("ZRANGE")
                        .arg(key)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn)
                        .await?;
                    for chunk in members.chunks(500) {
                        let records: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                            .arg(k.jobs())
                            .arg(chunk)
                            .query_async(&mut conn)
                            .await?;
                        for (id, record) in chunk.iter().zip(records) {
                            let Some(job) = record.and_then(|r| StoredJob::from_json(&r).ok())
                            else {
                                continue;
                            };
                            if job.attempt == 0
                                && which.selects(
                                    &job.campaign_id,
                                    &job.batch_id,
                                    &job.message_id,
                                    &job.user_id,
                                )
                            {
                                ids.push(id.clone());
                            }
                        }
                    }
                }
                ids
            }
        };
        let script = Script::new(CANCEL);
        let mut cancelled = 0u64;
        for chunk in ids.chunks(500) {
            let mut invocation = script.prepare_invoke();
            invocation.key(k.jobs()).arg(delay_keys.len());
            for key in &delay_keys {
                invocation.arg(key);
            }
            for id in chunk {
                invocation.arg(id);
            }
            let records: Vec<Vec<u8>> = invocation.invoke_async(&mut conn).await?;
            for record in records {
                let Ok(job) = StoredJob::from_json(&record) else {
                    continue;
                };
                cancelled += 1;
                let mut meta = job.meta(Arc::clone(&runtime.id));
                if matches!(which, Scheduled::User(_)) {
                    meta.user_id.clear();
                }
                Pending::detached(Arc::new(meta), Arc::clone(&self.hub), 0)
                    .resolve(Resolution::gateway(ReceiptStatus::Dropped, which.reason()));
            }
        }
        Ok(cancelled)
    }

    /// Keeps a job whose attempts ran out as a dead letter, then emits its terminal receipt.
    pub fn dead_letter(&self, job: Job, resolution: Resolution) {
        // The record is written before the terminal receipt is emitted (same writer order as
        // the job's earlier writes).
        let Job {
            pending,
            request,
            app,
            ..
        } = job;
        let meta = Arc::clone(pending.meta());
        let key: JobKey = (Arc::clone(&meta.app_id), meta.message_id.clone());
        // Still held: its terminal receipt releases the lease (`ACK`), fenced like the dead
        // letter itself, so a replica that lost the lease writes neither.
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

    /// The attribution window and the counters' retention, in ms, for the count scripts.
    fn insights_ms(&self) -> (u64, u64) {
        let config = self.insights.unwrap_or_default();
        (
            super::insights::ms(config.attribution_window),
            super::insights::ms(config.retention),
        )
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
        // Refusals at ingest (and the answers to duplicates, which never reach the hub) hold
        // nothing here: a message of the same id that was accepted must not be released, nor
        // its outcome overwritten, by them; their ids were released or never claimed. Every
        // outcome of an accepted message is recorded, a provider's REJECTED included, so a
        // resend is answered with it instead of being sent again.
        let accepted = receipt.accepted;
        if accepted && terminal && config.idempotency_ttl_secs > 0 {
            self.write(Write::Outcome {
                app: Arc::clone(&app),
                id: id.clone(),
                status: receipt.status.as_str(),
            });
        }
        let key: JobKey = (app, id);
        let ack = accepted && terminal && self.held.remove(&key).is_some();
        let (app, id) = key;
        let count = self
            .insights
            .as_ref()
            .and_then(|_| super::insights::count_of(receipt));
        if config.receipts_stream_maxlen > 0 {
            // The terminal receipt, its campaign counts and the lease release are written in
            // one MULTI: after a crash, a message has either all (done) or none (delivered
            // again, and counted then).
            self.write(Write::Receipt {
                app,
                encoded: super::feed::encode(receipt),
                ack: ack.then_some(id),
                count,
            });
        } else if ack {
            self.write(Write::Ack { app, id, count });
        } else if let Some(count) = count {
            self.write(Write::Count { app, count });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WriterProgress;

    fn waiter(p: &mut WriterProgress, sent: u64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        p.waiters.push_back((sent, tx));
        rx
    }

    /// A write batch wakes the deliveries it satisfies and no other; a failing writer releases
    /// every one (deliveries go on while Redis is away).
    #[test]
    fn the_writer_wakes_only_the_waiters_it_caught_up_with() {
        let mut p = WriterProgress::default();
        let mut first = waiter(&mut p, 2);
        let mut second = waiter(&mut p, 5);
        let mut third = waiter(&mut p, 9);
        p.done = 4;
        p.wake();
        assert!(first.try_recv().is_ok());
        assert!(second.try_recv().is_err(), "needs 5 writes done");
        p.done = 5;
        p.wake();
        assert!(second.try_recv().is_ok());
        assert!(third.try_recv().is_err());
        p.failing = true;
        p.wake();
        assert!(third.try_recv().is_ok(), "released while the writer fails");
        assert!(p.waiters.is_empty());
        assert!(p.caught_up(100));
    }
}
