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
        self.writes.send(w).is_ok()
    }

    pub(super) async fn write_loop(
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
                        buf.clear();
                        if rx.is_closed() && rx.is_empty() {
                            return;
                        }
                        continue;
                    }
                    self.write_backlog.store(true, Ordering::Release);
                    tokio::time::sleep(Duration::from_millis(100)).await;
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
    /// hash tag, so this is valid on Cluster), then one ack script call. False when it was
    /// written but `redis.min_replicas_acked` replicas did not acknowledge it in time.
    async fn flush(&self, buf: &[Write]) -> redis::RedisResult<bool> {
        #[derive(Default)]
        struct Group<'a> {
            jobs: Vec<(&'a str, &'a str)>,
            due: Vec<(i64, &'a str)>,
            parked: Vec<&'a str>,
            dead: Vec<(&'a str, &'a str)>,
            dead_at: Vec<(i64, &'a str)>,
            dead_ids: Vec<&'a str>,
            outcomes: Vec<(&'a str, &'static str)>,
            unaccepted: Vec<(&'a str, &'a str)>,
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
                Write::Unaccept { app, pairs } => {
                    let g = groups.entry(app).or_default();
                    g.unaccepted
                        .extend(pairs.iter().map(|(id, b)| (id.as_str(), b.as_str())));
                }
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
            if !g.unaccepted.is_empty() {
                self.unaccept_command(&mut pipe, k, app, &g.unaccepted);
                pipe.ignore();
            }
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
                let key = super::super::idempotency::key(&self.store.config().key_prefix, app, id);
                pipe.cmd("SET")
                    .arg(key)
                    .arg(*status)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .ignore();
            }
            if !g.receipts.is_empty() {
                let stream = super::super::feed::key(&self.store.config().key_prefix, app);
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
            let wrote_receipts = !g.receipts.is_empty();
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
            if wrote_receipts {
                self.wake_feed(app);
            }
        }
        self.store.replicated(&mut conn).await
    }
}
