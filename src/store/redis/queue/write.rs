//! The write path: every write of the queue (park, ack, receipt, outcome, dead letter) goes
//! through one loop that batches them into one MULTI per app, retried while Redis is away.

use super::*;

/// One write for the writer loop.
pub(super) enum Write {
    Park {
        app: Arc<str>,
        id: String,
        record: String,
        due_ms: i64,
    },
    Ack {
        app: Arc<str>,
        id: String,
        /// The campaign counts of its terminal receipt (JSON, see `insights::Count`).
        count: Option<String>,
    },
    /// A receipt for the app's receipts stream (protobuf-encoded).
    Receipt {
        app: Arc<str>,
        encoded: Vec<u8>,
        /// The message whose lease this terminal receipt releases.
        ack: Option<String>,
        /// The campaign counts of a terminal receipt, written with it (or, fenced, not at all).
        count: Option<String>,
    },
    /// The campaign counts of a terminal receipt written to no stream and releasing no lease.
    Count { app: Arc<str>, count: String },
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
    /// Undo an accept whose reply was lost (see `UNACCEPT`): (message id, batch key) pairs;
    /// written before anything else of its batch.
    Unaccept {
        app: Arc<str>,
        pairs: Vec<(String, String)>,
    },
}

impl RedisRetryQueue {
    /// Sends a write to the writer; false when the writer has ended.
    pub(super) fn write(&self, w: Write) -> bool {
        self.writes_sent.fetch_add(1, Ordering::AcqRel);
        self.writes.send(w).is_ok()
    }

    /// See [`crate::store::Store::settled`]. Approximate by design: it waits for as many
    /// writes to be done as had been sent when it was called, which is the caller's own
    /// unless another thread's write was sent between its count and its send. While the
    /// writer is failing (Redis away, or replicas not confirming) nothing waits: deliveries go
    /// on with their outcomes queued in memory, as they did before this bound, rather than
    /// stopping every send for the length of an outage.
    pub(crate) fn settled(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        let sent = self.writes_sent.load(Ordering::Acquire);
        let mut progress = self.writes_done.lock();
        if progress.caught_up(sent) {
            return None;
        }
        let (waiter, woken) = tokio::sync::oneshot::channel();
        progress.waiters.push_back((sent, waiter));
        Some(Box::pin(async move {
            // Dropped unsent only with the queue itself: nothing more will be written.
            let _ = woken.await;
        }))
    }

    /// Counts `n` writes as done (written, or given up at shutdown); the writer is not failing.
    fn done(&self, n: usize) {
        let mut progress = self.writes_done.lock();
        progress.done += n as u64;
        progress.failing = false;
        progress.wake();
    }

    /// The writer could not write its batch and will try again.
    fn failing(&self) {
        let mut progress = self.writes_done.lock();
        progress.failing = true;
        progress.wake();
    }

    /// The writer loop ended: nobody waits for it any more.
    fn ended(&self) {
        let mut progress = self.writes_done.lock();
        progress.ended = true;
        progress.wake();
    }

    pub(super) async fn write_loop(
        &self,
        rx: mpsc::UnboundedReceiver<Write>,
        stop: CancellationToken,
    ) {
        self.write_until_stopped(rx, stop).await;
        self.ended();
    }

    async fn write_until_stopped(
        &self,
        mut rx: mpsc::UnboundedReceiver<Write>,
        stop: CancellationToken,
    ) {
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
                Ok(true) => {
                    // Counted off only once the whole batch is written (a failed one is
                    // written again whole).
                    let unaccepts = buf
                        .iter()
                        .filter(|w| matches!(w, Write::Unaccept { .. }))
                        .count();
                    if unaccepts > 0 {
                        self.unaccepts_pending
                            .fetch_sub(unaccepts, Ordering::AcqRel);
                    }
                    self.done(buf.len());
                    buf.clear();
                    self.write_backlog.store(false, Ordering::Release);
                }
                Ok(false) => {
                    // Written, but fewer replicas than `min_replicas_acked` confirmed it in
                    // time: a failover could still drop it, so the whole batch is written
                    // again (idempotent, except that its receipts may then appear twice in the
                    // receipts stream) until replicas confirm it; claiming waits meanwhile.
                    if stop.is_cancelled() && self.stopped.load(Ordering::Acquire) {
                        // Shutting down without replicas: the primary has the batch; keep it.
                        warn!("shutting down with writes not acknowledged by Redis replicas");
                        self.done(buf.len());
                        buf.clear();
                        if rx.is_closed() && rx.is_empty() {
                            return;
                        }
                        continue;
                    }
                    self.write_backlog.store(true, Ordering::Release);
                    self.failing();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    self.write_backlog.store(true, Ordering::Release);
                    self.failing();
                    self.store.observe::<()>(&Err(e));
                    if stop.is_cancelled() && self.stopped.load(Ordering::Acquire) {
                        // Shutting down with Redis away: give up on these writes.
                        self.done(buf.len());
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

    /// Writes that could not be made at shutdown. A retry that could not be parked is still in
    /// Redis as it was before this attempt, under this replica's lease: the replica that
    /// reclaims the lease retries it and emits its terminal receipt, so its caller here is
    /// handed off (a FAILED receipt here would be a second terminal receipt, disagreeing).
    fn abandon(&self, writes: Vec<Write>) {
        for w in writes {
            if let Write::Park { app, id, .. } = w
                && let Some((_, pending)) = self.local.remove(&(app, id))
            {
                pending.hand_off();
            }
        }
    }

    /// Writes one batch: per app, one MULTI of variadic commands and the scripts that fence
    /// off messages another replica reclaimed (all keys share the app's hash tag, so this is
    /// valid on Cluster). False when it was written but `redis.min_replicas_acked` replicas
    /// did not acknowledge it in time.
    async fn flush(&self, buf: &[Write]) -> redis::RedisResult<bool> {
        #[derive(Default)]
        struct Group<'a> {
            /// (id, due, record) of each retry parked.
            parked: Vec<(&'a str, i64, &'a str)>,
            /// (id, at, record) of each dead letter.
            dead: Vec<(&'a str, i64, &'a str)>,
            outcomes: Vec<(&'a str, &'static str)>,
            unaccepted: Vec<(&'a str, &'a str)>,
            /// Receipts that release no lease (not terminal, or of no message held here).
            receipts: Vec<&'a [u8]>,
            /// Terminal receipts with the message whose lease each releases, and their counts.
            finished: Vec<(&'a str, &'a [u8], &'a str)>,
            acks: Vec<(&'a str, &'a str)>,
            /// Counts of terminal receipts that release no lease.
            counts: Vec<&'a str>,
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
                } => groups
                    .entry(app)
                    .or_default()
                    .parked
                    .push((id, *due_ms, record)),
                Write::Dead {
                    app,
                    id,
                    record,
                    at_ms,
                } => groups
                    .entry(app)
                    .or_default()
                    .dead
                    .push((id, *at_ms, record)),
                Write::Ack { app, id, count } => groups
                    .entry(app)
                    .or_default()
                    .acks
                    .push((id, count.as_deref().unwrap_or(""))),
                Write::Count { app, count } => groups.entry(app).or_default().counts.push(count),
                Write::Unaccept { app, pairs } => {
                    let g = groups.entry(app).or_default();
                    g.unaccepted
                        .extend(pairs.iter().map(|(id, b)| (id.as_str(), b.as_str())));
                }
                Write::Outcome { app, id, status } => {
                    groups.entry(app).or_default().outcomes.push((id, status))
                }
                Write::Receipt {
                    app,
                    encoded,
                    ack,
                    count,
                } => {
                    let g = groups.entry(app).or_default();
                    match ack {
                        Some(id) => g
                            .finished
                            .push((id, encoded, count.as_deref().unwrap_or(""))),
                        None => {
                            g.receipts.push(encoded);
                            g.counts.extend(count.as_deref());
                        }
                    }
                }
            }
        }
        let mut conn = self.store.conn();
        let config = self.store.config();
        let stream_maxlen = config.receipts_stream_maxlen;
        for (app, g) in groups {
            let Some(k) = self.keys(app) else { continue };
            let stream = super::super::feed::key(&config.key_prefix, app);
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !g.unaccepted.is_empty() {
                self.unaccept_command(&mut pipe, k, app, &g.unaccepted);
                pipe.ignore();
            }
            let park = !g.parked.is_empty();
            if park {
                let keys = [k.jobs(), k.delay(me), k.leases(), k.owner()];
                fenced_call(&mut pipe, &self.park_script, &keys, me, k, &g.parked);
            }
            let dead = !g.dead.is_empty();
            if dead {
                let keys = [k.jobs(), k.dead(), k.dead_idx(), k.owner()];
                fenced_call(&mut pipe, &self.dead_script, &keys, me, k, &g.dead);
            }
            for (id, status) in &g.outcomes {
                let key = super::super::idempotency::key(&config.key_prefix, app, id);
                pipe.cmd("SET")
                    .arg(key)
                    .arg(*status)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .ignore();
            }
            for encoded in &g.receipts {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(stream_maxlen)
                    .arg("*")
                    .arg("r")
                    .arg(*encoded)
                    .ignore();
            }
            let (window, retention) = self.insights_ms();
            if !g.counts.is_empty() {
                pipe.cmd("EVAL")
                    .arg(&self.count_script)
                    .arg(0)
                    .arg(k.insights_prefix())
                    .arg(window)
                    .arg(retention)
                    .arg(&g.counts)
                    .ignore();
            }
            let finish = !g.acks.is_empty() || !g.finished.is_empty();
            if finish {
                // EVAL (not EVALSHA) inside the MULTI: no NOSCRIPT round trip; Redis caches it.
                let cmd = pipe
                    .cmd("EVAL")
                    .arg(&self.ack_script)
                    .arg(4)
                    .arg(k.leases())
                    .arg(k.owner())
                    .arg(k.jobs())
                    .arg(&stream)
                    .arg(me)
                    .arg(k.batch_prefix())
                    .arg(stream_maxlen)
                    .arg(g.acks.len())
                    .arg(k.insights_prefix())
                    .arg(window)
                    .arg(retention);
                for (id, count) in &g.acks {
                    cmd.arg(*id).arg(*count);
                }
                for (id, encoded, count) in &g.finished {
                    cmd.arg(*id).arg(*encoded).arg(*count);
                }
            }
            let mut replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
            let mut fenced = 0u64;
            let mut next = replies.drain(..);
            if park {
                let ids: Vec<String> = reply(next.next())?;
                self.hand_off_fenced(app, &ids);
                fenced += ids.len() as u64;
            }
            if dead {
                fenced += reply::<u64>(next.next())?;
            }
            if finish {
                let (acked, refused): (u64, u64) = reply(next.next())?;
                self.stats.acked.fetch_add(acked, Ordering::Relaxed);
                fenced += refused;
            }
            if fenced > 0 {
                self.stats.fenced.fetch_add(fenced, Ordering::Relaxed);
                warn!(%app, fenced, "writes for messages another replica reclaimed were not made: that replica finishes them");
            }
            if !g.receipts.is_empty() || !g.finished.is_empty() {
                self.wake_feed(app);
            }
        }
        self.store.replicated(&mut conn).await
    }

    /// Retries this replica parked for messages another replica had reclaimed: their callers
    /// here hear no more of them; the replica that holds them emits their receipts.
    fn hand_off_fenced(&self, app: &str, ids: &[String]) {
        for id in ids {
            if let Some((_, pending)) = self.local.remove(&(Arc::from(app), id.clone())) {
                pending.hand_off();
            }
        }
    }
}

/// Adds a call of a fenced script (`PARK`, `DEAD`) to `pipe`: its four keys, then the replica,
/// the batch-context prefix and the (id, score, record) triples.
fn fenced_call(
    pipe: &mut redis::Pipeline,
    script: &str,
    keys: &[String; 4],
    me: &str,
    k: &AppKeys,
    triples: &[(&str, i64, &str)],
) {
    let cmd = pipe.cmd("EVAL").arg(script).arg(keys.len()).arg(keys);
    cmd.arg(me).arg(k.batch_prefix());
    for (id, score, record) in triples {
        cmd.arg(*id).arg(*score).arg(*record);
    }
}

/// One reply of a MULTI, decoded; a missing one is a protocol error.
fn reply<T: redis::FromRedisValue>(value: Option<redis::Value>) -> redis::RedisResult<T> {
    match value {
        Some(v) => Ok(redis::from_redis_value(v)?),
        None => Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "a reply of the write MULTI is missing",
        ))),
    }
}
