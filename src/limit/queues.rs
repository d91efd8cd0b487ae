//! The scheduler's queues: per-app queues served by deficit round robin (DRR), each app with
//! one flow per provider, each flow with a HIGH lane served before its bulk lane.
//!
//! A message leaves its queue only when (1) its app has DRR credit, (2) its flow's adaptive
//! concurrency has room, (3) its campaign's rate allows (when the request carried one) and
//! (4) its (app, provider) rate allows. While waiting it holds nothing but the accept-window slot
//! it took at ingest, so everything queued here is bounded by the gateway's accept window.
//!
//! Generic over the queued item ([`Schedulable`]) so it is tested without a gateway.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::aimd::{Aimd, Feedback};
use super::rate::Gcra;
use super::{LimitConfig, Limits, Rate};
use crate::domain::Platform;
use crate::metrics::{AppLabels, Metrics};
use crate::provider::{Attempt, Capacity};

/// Messages an app may send per DRR turn, per unit of weight.
pub const QUANTUM: u32 = 8;
/// Campaign buckets unused this long are forgotten.
const CAMPAIGN_IDLE: Duration = Duration::from_secs(600);

/// What the scheduler needs to know about a queued item.
pub trait Schedulable {
    /// The app it belongs to.
    fn app(&self) -> &Arc<str>;
    fn platform(&self) -> Platform;
    /// True for the priority lane (transactional, `priority = HIGH`).
    fn high_priority(&self) -> bool;
    /// The campaign bucket key and its rate per minute, when the request carried one.
    fn campaign_limit(&self) -> Option<(&Arc<str>, u32)>;
    /// True once its ttl has passed at wall-clock `now`.
    fn expired(&self, now: SystemTime) -> bool;
}

/// The concurrency slot a dispatched item holds until its provider request ends. Dropping it
/// frees the slot and wakes the scheduler.
pub struct Slot {
    ctl: Arc<Mutex<Aimd>>,
    wake: Arc<Notify>,
}

impl Slot {
    /// Reports the attempt's outcome and wire time to the adaptive-concurrency controller,
    /// with what the provider's connections carry now.
    pub fn observe(&self, attempt: &Attempt, capacity: Capacity) {
        let mut ctl = self.ctl.lock();
        ctl.capacity(capacity);
        ctl.feedback(
            Instant::now(),
            Feedback::of(&attempt.outcome, attempt.round_trip),
        );
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.ctl.lock().release();
        self.wake.notify_one();
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

/// The result of asking for the next item.
pub enum Next<T> {
    /// Send this now, holding `Slot`; it waited `Duration` in the scheduler.
    Ready(T, Slot, Duration),
    /// Nothing may go now. With an instant, a rate limit frees something then; otherwise only a
    /// finishing request (slot dropped) or a new item changes that.
    Idle(Option<Instant>),
}

struct Queued<T> {
    item: T,
    /// When it was queued, in milliseconds since the queues' epoch: 4 bytes rather than an
    /// `Instant`'s 16, because a queued item costs memory for as long as it waits, and up to a
    /// whole accept window (a million) may wait.
    enqueued_ms: u32,
}

#[derive(Default)]
struct Lane<T> {
    items: VecDeque<Queued<T>>,
    /// The head already took its campaign cell (and waits only for the flow's rate).
    campaign_ok: bool,
}

impl<T> Lane<T> {
    fn new() -> Self {
        Self {
            items: VecDeque::new(),
            campaign_ok: false,
        }
    }
}

struct Flow<T> {
    /// `[HIGH, bulk]`.
    lanes: [Lane<T>; 2],
    rate: Option<Gcra>,
    ctl: Arc<Mutex<Aimd>>,
}

impl<T: Schedulable> Flow<T> {
    fn len(&self) -> usize {
        self.lanes[0].items.len() + self.lanes[1].items.len()
    }

    fn configure(&mut self, rate: Option<Rate>) {
        if self.rate.as_ref().map(Gcra::rate) != rate {
            self.rate = rate.map(Gcra::new);
        }
    }

    fn expire_heads(&mut self, wall: SystemTime, expired: &mut Vec<T>) {
        for lane in &mut self.lanes {
            while lane.items.front().is_some_and(|q| q.item.expired(wall)) {
                if let Some(q) = lane.items.pop_front() {
                    expired.push(q.item);
                }
                lane.campaign_ok = false;
            }
        }
    }

    fn expire_all(&mut self, wall: SystemTime, expired: &mut Vec<T>) {
        for lane in &mut self.lanes {
            if lane.items.front().is_some_and(|q| q.item.expired(wall)) {
                lane.campaign_ok = false;
            }
            if !lane.items.iter().any(|q| q.item.expired(wall)) {
                continue;
            }
            // Rotated through in place: a lane may hold a million items, too many to copy.
            for _ in 0..lane.items.len() {
                let Some(q) = lane.items.pop_front() else {
                    break;
                };
                if q.item.expired(wall) {
                    expired.push(q.item);
                } else {
                    lane.items.push_back(q);
                }
            }
        }
    }

    /// The next item that may go, with its slot and when it was queued.
    fn take(
        &mut self,
        now: Instant,
        campaigns: &mut Campaigns,
        wake: &Arc<Notify>,
        wake_at: &mut Option<Instant>,
    ) -> Option<(T, Slot, u32)> {
        if self.len() == 0 || !self.ctl.lock().has_room() {
            return None;
        }
        for lane in &mut self.lanes {
            let Some(head) = lane.items.front() else {
                continue;
            };
            if !lane.campaign_ok {
                if let Some((key, per_minute)) = head.item.campaign_limit() {
                    let bucket = campaigns.bucket(head.item.app(), key, per_minute, now);
                    if let Err(at) = bucket.check() {
                        earliest(wake_at, at);
                        // Another lane (another campaign) may still go.
                        continue;
                    }
                }
                lane.campaign_ok = true;
            }
            if let Some(rate) = &self.rate
                && let Err(at) = rate.check()
            {
                earliest(wake_at, at);
                return None;
            }
            let queued = lane.items.pop_front()?;
            lane.campaign_ok = false;
            self.ctl.lock().acquire();
            let slot = Slot {
                ctl: Arc::clone(&self.ctl),
                wake: Arc::clone(wake),
            };
            return Some((queued.item, slot, queued.enqueued_ms));
        }
        None
    }
}

fn earliest(slot: &mut Option<Instant>, at: Instant) {
    *slot = Some(slot.map_or(at, |s| s.min(at)));
}

struct AppQueue<T> {
    /// `[APNs, FCM]`.
    flows: [Flow<T>; 2],
    next_flow: usize,
    weight: u32,
    deficit: u32,
    in_ring: bool,
    depth: Gauge,
    wait: Histogram,
}

impl<T: Schedulable> AppQueue<T> {
    fn len(&self) -> usize {
        self.flows[0].len() + self.flows[1].len()
    }

    fn configure(&mut self, config: &LimitConfig, limits: &Limits) {
        self.weight = config.weight.max(1);
        self.flows[0].configure(limits.local_rate(config, Platform::Apns));
        self.flows[1].configure(limits.local_rate(config, Platform::Fcm));
    }
}

/// One campaign's bucket and when it was last used.
struct CampaignBucket {
    per_minute: u32,
    gcra: Gcra,
    used: Instant,
}

impl CampaignBucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            per_minute,
            gcra: Gcra::new(Rate::per_minute(per_minute, None)),
            used: now,
        }
    }
}

/// Per-campaign GCRA buckets, keyed by (app, campaign key).
#[derive(Default)]
struct Campaigns {
    buckets: HashMap<(Arc<str>, Arc<str>), CampaignBucket>,
}

impl Campaigns {
    fn bucket(&mut self, app: &Arc<str>, key: &Arc<str>, per_minute: u32, now: Instant) -> &Gcra {
        let entry = self
            .buckets
            .entry((Arc::clone(app), Arc::clone(key)))
            .or_insert_with(|| CampaignBucket::new(per_minute, now));
        if entry.per_minute != per_minute {
            *entry = CampaignBucket::new(per_minute, now);
        }
        entry.used = now;
        &entry.gcra
    }

    fn forget_idle(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.used) < CAMPAIGN_IDLE);
    }
}

/// All apps' queues and the DRR ring of apps with something queued.
pub struct Queues<T> {
    apps: HashMap<Arc<str>, AppQueue<T>>,
    ring: VecDeque<Arc<str>>,
    campaigns: Campaigns,
    limits: Arc<Limits>,
    seen_version: u64,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    len: usize,
    /// What queued items' enqueue instants count from.
    epoch: Instant,
}

impl<T: Schedulable> Queues<T> {
    /// Empty queues applying `limits`.
    pub fn new(limits: Arc<Limits>, metrics: Arc<Metrics>) -> Self {
        Self {
            apps: HashMap::new(),
            ring: VecDeque::new(),
            campaigns: Campaigns::default(),
            seen_version: limits.version(),
            limits,
            metrics,
            wake: Arc::new(Notify::new()),
            len: 0,
            epoch: Instant::now(),
        }
    }

    fn millis_since_epoch(&self, now: Instant) -> u32 {
        // Wraps after 49 days; waits are measured with wrapping arithmetic.
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// Notified whenever a dispatched item's slot is dropped.
    pub fn wake(&self) -> &Arc<Notify> {
        &self.wake
    }

    /// The shared limit settings.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Items queued, all apps.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` at the back of its app's lane.
    pub fn push(&mut self, item: T) {
        self.push_at(item, Instant::now());
    }

    fn push_at(&mut self, item: T, now: Instant) {
        let enqueued_ms = self.millis_since_epoch(now);
        let app_id = Arc::clone(item.app());
        let app = match self.apps.get_mut(&app_id) {
            Some(app) => app,
            None => {
                let app = self.new_app(&app_id);
                self.apps.entry(Arc::clone(&app_id)).or_insert(app)
            }
        };
        let flow = match item.platform() {
            Platform::Apns => 0,
            Platform::Fcm => 1,
        };
        let lane = if item.high_priority() { 0 } else { 1 };
        app.flows[flow].lanes[lane]
            .items
            .push_back(Queued { item, enqueued_ms });
        app.depth.inc();
        self.len += 1;
        if !app.in_ring {
            app.in_ring = true;
            app.deficit = 0;
            self.ring.push_back(app_id);
        }
    }

    fn new_app(&self, id: &Arc<str>) -> AppQueue<T> {
        let config = self.limits.get(id);
        let labels = AppLabels {
            app: id.to_string(),
        };
        let flow = |platform| Flow {
            lanes: [Lane::new(), Lane::new()],
            rate: self.limits.local_rate(&config, platform).map(Gcra::new),
            ctl: self.limits.controller(id, platform, &config),
        };
        AppQueue {
            flows: [flow(Platform::Apns), flow(Platform::Fcm)],
            next_flow: 0,
            weight: config.weight.max(1),
            deficit: 0,
            in_ring: false,
            depth: self
                .metrics
                .scheduler_queue_depth
                .get_or_create(&labels)
                .clone(),
            wait: self
                .metrics
                .rate_limit_wait_seconds
                .get_or_create(&labels)
                .clone(),
        }
    }

    /// Applies limit changes made since the last call.
    pub fn refresh(&mut self) {
        let version = self.limits.version();
        if version == self.seen_version {
            return;
        }
        self.seen_version = version;
        for (id, app) in &mut self.apps {
            app.configure(&self.limits.get(id), &self.limits);
        }
    }

    /// The next item allowed to go now, by DRR over apps. Items found expired on the way are
    /// moved to `expired` (the caller resolves them).
    pub fn next(&mut self, wall: SystemTime, expired: &mut Vec<T>) -> Next<T> {
        let now = Instant::now();
        let now_ms = self.millis_since_epoch(now);
        let mut wake_at = None;
        let mut stalled = 0;
        while stalled < self.ring.len() {
            let Some(id) = self.ring.front().cloned() else {
                break;
            };
            let Some(app) = self.apps.get_mut(&id) else {
                self.ring.pop_front();
                continue;
            };
            let before = app.len();
            for flow in &mut app.flows {
                flow.expire_heads(wall, expired);
            }
            let dropped = before - app.len();
            self.len -= dropped;
            app.depth.dec_by(dropped as i64);
            if app.len() == 0 {
                self.ring.pop_front();
                app.in_ring = false;
                app.deficit = 0;
                continue;
            }
            if app.deficit == 0 {
                app.deficit = app.weight.saturating_mul(QUANTUM);
            }
            let mut taken = None;
            for k in 0..app.flows.len() {
                let f = (app.next_flow + k) % app.flows.len();
                if let Some(t) =
                    app.flows[f].take(now, &mut self.campaigns, &self.wake, &mut wake_at)
                {
                    app.next_flow = (f + 1) % app.flows.len();
                    taken = Some(t);
                    break;
                }
            }
            match taken {
                Some((item, slot, enqueued_ms)) => {
                    let waited = Duration::from_millis(u64::from(now_ms.wrapping_sub(enqueued_ms)));
                    self.len -= 1;
                    app.depth.dec();
                    app.wait.observe(waited.as_secs_f64());
                    app.deficit -= 1;
                    if app.deficit == 0 || app.len() == 0 {
                        self.ring.rotate_left(1);
                    }
                    return Next::Ready(item, slot, waited);
                }
                None => {
                    self.ring.rotate_left(1);
                    stalled += 1;
                }
            }
        }
        Next::Idle(wake_at)
    }

    /// Moves every expired item to `expired` and forgets idle campaign buckets.
    pub fn expire(&mut self, wall: SystemTime, expired: &mut Vec<T>) {
        for app in self.apps.values_mut() {
            let before = app.len();
            for flow in &mut app.flows {
                flow.expire_all(wall, expired);
            }
            let dropped = before - app.len();
            self.len -= dropped;
            app.depth.dec_by(dropped as i64);
        }
        self.campaigns.forget_idle(Instant::now());
    }

    /// Takes every queued item out (shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for app in self.apps.values_mut() {
            for flow in &mut app.flows {
                for lane in &mut flow.lanes {
                    out.extend(lane.items.drain(..).map(|q| q.item));
                    lane.campaign_ok = false;
                }
            }
            app.depth.set(0);
            app.in_ring = false;
            app.deficit = 0;
        }
        self.ring.clear();
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Outcome;

    #[derive(Debug, Clone)]
    struct Item {
        app: Arc<str>,
        n: u32,
        platform: Platform,
        high: bool,
        campaign: Option<(Arc<str>, u32)>,
        expires: Option<SystemTime>,
    }

    impl Schedulable for Item {
        fn app(&self) -> &Arc<str> {
            &self.app
        }
        fn platform(&self) -> Platform {
            self.platform
        }
        fn high_priority(&self) -> bool {
            self.high
        }
        fn campaign_limit(&self) -> Option<(&Arc<str>, u32)> {
            self.campaign.as_ref().map(|(k, r)| (k, *r))
        }
        fn expired(&self, now: SystemTime) -> bool {
            self.expires.is_some_and(|t| now >= t)
        }
    }

    fn item(app: &str, n: u32) -> Item {
        Item {
            app: app.into(),
            n,
            platform: Platform::Apns,
            high: false,
            campaign: None,
            expires: None,
        }
    }

    fn queues(limits: &[(&str, LimitConfig)]) -> Queues<Item> {
        let l = Limits::new();
        for (app, c) in limits {
            l.set(app, c.clone());
        }
        Queues::new(Arc::new(l), Arc::new(Metrics::new()))
    }

    /// Takes up to `n` ready items, dropping each slot at once (instant provider).
    fn take(q: &mut Queues<Item>, n: usize) -> Vec<Item> {
        let mut out = Vec::new();
        let mut expired = Vec::new();
        while out.len() < n {
            match q.next(SystemTime::now(), &mut expired) {
                Next::Ready(i, _slot, _) => out.push(i),
                Next::Idle(_) => break,
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn backlog_of_one_app_does_not_delay_another() {
        let mut q = queues(&[]);
        for n in 0..10_000 {
            q.push(item("flood", n));
        }
        for n in 0..100 {
            q.push(item("small", n));
        }
        // Turns alternate: 8 (QUANTUM) of flood, 8 of small, ...; small is done in 13 turns.
        let first = take(&mut q, 208);
        let small = first.iter().filter(|i| &*i.app == "small").count();
        assert_eq!(small, 100, "all of small within the first 208");
        // Order inside an app is kept.
        let ns: Vec<u32> = first
            .iter()
            .filter(|i| &*i.app == "small")
            .map(|i| i.n)
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(q.len(), 10_000 - 108);
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_in_proportion() {
        let mut q = queues(&[(
            "heavy",
            LimitConfig {
                weight: 3,
                ..Default::default()
            },
        )]);
        for n in 0..1_000 {
            q.push(item("heavy", n));
            q.push(item("light", n));
        }
        // 12 full rounds of 3 * 8 + 1 * 8.
        let first = take(&mut q, 384);
        let heavy = first.iter().filter(|i| &*i.app == "heavy").count();
        assert_eq!(heavy, 288, "3:1");
    }

    #[tokio::test(start_paused = true)]
    async fn high_priority_overtakes_bulk_within_an_app() {
        let mut q = queues(&[]);
        for n in 0..50 {
            q.push(item("a", n));
        }
        for n in 100..103 {
            q.push(Item {
                high: true,
                ..item("a", n)
            });
        }
        let first: Vec<u32> = take(&mut q, 4).iter().map(|i| i.n).collect();
        assert_eq!(first, vec![100, 101, 102, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_items_and_says_when() {
        let mut q = queues(&[(
            "a",
            LimitConfig {
                apns_per_second: Some(10),
                burst: Some(2),
                ..Default::default()
            },
        )]);
        for n in 0..5 {
            q.push(item("a", n));
        }
        // A different app is not held back by a's rate.
        q.push(item("b", 0));
        let t0 = Instant::now();
        let first = take(&mut q, 10);
        assert_eq!(first.len(), 3, "burst of 2 from a, plus b");
        let mut expired = Vec::new();
        match q.next(SystemTime::now(), &mut expired) {
            Next::Idle(Some(at)) => assert_eq!(at - t0, Duration::from_millis(100)),
            _ => panic!("expected to wait for the rate"),
        }
        let mut times = Vec::new();
        while !q.is_empty() {
            match q.next(SystemTime::now(), &mut expired) {
                Next::Ready(..) => times.push(Instant::now() - t0),
                Next::Idle(Some(at)) => tokio::time::sleep_until(at).await,
                Next::Idle(None) => panic!("a rate-limited queue always says when"),
            }
        }
        assert_eq!(
            times,
            [100, 200, 300].map(Duration::from_millis).to_vec(),
            "spaced at 10/s after the burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_holds_until_a_slot_is_dropped() {
        let mut q = queues(&[(
            "a",
            LimitConfig {
                initial_concurrency: 2,
                max_concurrency: 2,
                ..Default::default()
            },
        )]);
        for n in 0..3 {
            q.push(item("a", n));
        }
        let mut expired = Vec::new();
        let Next::Ready(_, s1, _) = q.next(SystemTime::now(), &mut expired) else {
            panic!()
        };
        let Next::Ready(_, _s2, _) = q.next(SystemTime::now(), &mut expired) else {
            panic!()
        };
        assert!(matches!(
            q.next(SystemTime::now(), &mut expired),
            Next::Idle(None)
        ));
        drop(s1);
        let Next::Ready(_, _s3, _) = q.next(SystemTime::now(), &mut expired) else {
            panic!("a dropped slot makes room")
        };
        let snap = q.limits().concurrency("a", Platform::Apns).unwrap();
        assert_eq!((snap.limit, snap.in_flight), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn backpressure_on_one_app_leaves_the_other_alone() {
        let mut q = queues(&[]);
        for n in 0..400 {
            q.push(item("a", n));
            q.push(item("b", n));
        }
        let mut expired = Vec::new();
        let mut slots = Vec::new();
        while let Next::Ready(i, slot, _) = q.next(SystemTime::now(), &mut expired) {
            slots.push((i, slot));
        }
        // Both hit their initial concurrency (100 each) with nothing finished.
        assert_eq!(slots.len(), 200);
        for (i, slot) in &slots {
            let outcome = if &*i.app == "a" {
                Outcome::Retry {
                    reason: "TooManyRequests".into(),
                    status: 429,
                    retry_after: None,
                }
            } else {
                Outcome::Delivered {
                    provider_message_id: String::new(),
                    status: 200,
                }
            };
            let attempt = Attempt {
                outcome,
                round_trip: Some(Duration::from_millis(10)),
            };
            slot.observe(&attempt, Capacity::default());
        }
        drop(slots);
        let limits = q.limits();
        assert_eq!(limits.concurrency("a", Platform::Apns).unwrap().limit, 50);
        assert!(limits.concurrency("b", Platform::Apns).unwrap().limit >= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn campaign_rate_applies_per_campaign() {
        let mut q = queues(&[]);
        let camp: Arc<str> = "spring".into();
        for n in 0..3 {
            q.push(Item {
                campaign: Some((Arc::clone(&camp), 60)),
                ..item("a", n)
            });
        }
        // A transactional message of another campaign is not held by spring's rate.
        q.push(Item {
            high: true,
            ..item("a", 10)
        });
        let first: Vec<u32> = take(&mut q, 10).iter().map(|i| i.n).collect();
        assert_eq!(first, vec![10, 0], "60/min = 1/s, burst 1");
        tokio::time::advance(Duration::from_secs(1)).await;
        let next: Vec<u32> = take(&mut q, 10).iter().map(|i| i.n).collect();
        assert_eq!(next, vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_items_leave_without_taking_a_cell() {
        let mut q = queues(&[(
            "a",
            LimitConfig {
                apns_per_second: Some(1),
                burst: Some(1),
                ..Default::default()
            },
        )]);
        let past = SystemTime::now() - Duration::from_secs(1);
        q.push(Item {
            expires: Some(past),
            ..item("a", 0)
        });
        q.push(item("a", 1));
        q.push(Item {
            expires: Some(past),
            ..item("a", 2)
        });
        let mut expired = Vec::new();
        let Next::Ready(i, _, _) = q.next(SystemTime::now(), &mut expired) else {
            panic!()
        };
        assert_eq!(i.n, 1);
        assert_eq!(expired.len(), 1);
        q.expire(SystemTime::now(), &mut expired);
        assert_eq!(expired.len(), 2);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_split_the_rate() {
        let mut q = queues(&[(
            "a",
            LimitConfig {
                apns_per_second: Some(30),
                burst: Some(9),
                ..Default::default()
            },
        )]);
        q.limits().set_replicas(3);
        for n in 0..40 {
            q.push(item("a", n));
        }
        // Alone: burst 9; with 3 replicas: burst 3, then one every 100 ms (10/s).
        assert_eq!(take(&mut q, 40).len(), 3);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(take(&mut q, 40).len(), 3, "10/s, capped by the burst of 3");
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(take(&mut q, 40).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn reload_changes_the_rate() {
        let mut q = queues(&[(
            "a",
            LimitConfig {
                apns_per_second: Some(1),
                burst: Some(1),
                ..Default::default()
            },
        )]);
        for n in 0..20 {
            q.push(item("a", n));
        }
        assert_eq!(take(&mut q, 20).len(), 1);
        q.limits().set(
            "a",
            LimitConfig {
                apns_per_second: Some(100),
                burst: Some(10),
                ..Default::default()
            },
        );
        q.refresh();
        assert_eq!(take(&mut q, 20).len(), 10);
    }
}
