//! The claim path: claiming due and expired-lease jobs under a lease, turning records back
//! into jobs (packed ones rendered from their batch's context), and lease maintenance.

use super::*;

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

impl RedisRetryQueue {
    pub(super) async fn claim_loop(&self, dispatch: mpsc::Sender<Work>, stop: CancellationToken) {
        let config = self.store.config().clone();
        let poll = Duration::from_millis(config.poll_ms);
        'outer: loop {
            if stop.is_cancelled() {
                break;
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
                    due: None,
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
        let due = stored.due_check().map(Box::new);
        Some(Job {
            pending,
            request,
            app: Arc::clone(app),
            due,
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
            app: Arc::clone(&key.0),
            id: key.1.clone(),
            record,
            at_ms: now_ms(),
        });
        // The dead letter keeps the lease for a terminal receipt to release; this one has
        // none to follow.
        self.write(Write::Ack {
            app: key.0,
            id: key.1,
            count: None,
        });
    }

    /// Renews leases and the heartbeat every `lease_ms / 3` until `stop`. Its own loop, not a
    /// step of the claim loop: that one waits for room in the deliver stage, which under
    /// overload can take longer than a lease, and leases that lapse while their messages are
    /// still in flight here let other replicas deliver them a second time.
    pub(super) async fn maintain_loop(&self, stop: CancellationToken) {
        let every = Duration::from_millis((self.store.config().lease_ms / 3).max(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.maintain().await {
                self.store.observe::<()>(&Err(e));
            }
        }
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
}
