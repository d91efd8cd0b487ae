//! Campaign measurement behind the storage seam: per campaign and variant, the terminal
//! receipts by provider and status, and tracked opens and conversions attributed to an
//! *exposure* (a delivered message, or a holdout recipient).
//!
//! Receipts come in through [`ReceiptObserver`] (the hub shows every receipt to the insights
//! store as it does to the message store); events through [`Insights::track`]. Both
//! implementations keep the same rules:
//!
//! - An event id counts once; a repeat is `Duplicate` (for as long as the event is
//!   remembered: the attribution window).
//! - An event is about an exposure: by `message_id`, or (conversions) by `user_id`, the user's
//!   latest exposure (of `campaign_id` when given). Exposures are kept for the attribution
//!   window; an event about an exposure not (or no longer) known is `Unknown`, and is not
//!   remembered, so it can be sent again once the receipt is in.
//! - A conversion counts when it happened within the window after the exposure. Each exposure
//!   counts at most one open and one conversion (rates are proportions of exposures).
//!
//! [`MemoryInsights`] keeps everything in this process, bounded by `max_exposures` (the oldest
//! exposures and event ids are forgotten first) and `MAX_CAMPAIGNS` campaigns per app;
//! `super::redis::insights::RedisInsights` keeps it in Redis, with TTLs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::StoreError;
use super::send_time::{Histogram, OpenHistograms, hour_of_week};
use crate::domain::{Platform, Receipt, ReceiptStatus};
use crate::receipts::ReceiptObserver;

/// Campaigns whose counters one app keeps in memory, at most (the oldest go first).
pub const MAX_CAMPAIGNS: usize = 10_000;
/// The variant name of messages sent without an experiment.
pub const NO_VARIANT: &str = crate::render::content::DEFAULT_VARIANT;
/// [`NO_VARIANT`] shared, so an exposure without an experiment allocates no name.
static NO_VARIANT_SHARED: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| Arc::from(NO_VARIANT));

/// What happened after a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Open,
    Conversion,
}

/// One tracked event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackEvent {
    pub event_id: String,
    pub kind: EventKind,
    pub message_id: String,
    pub user_id: String,
    pub campaign_id: String,
    /// When it happened, Unix epoch ms.
    pub occurred_at_ms: i64,
    /// The user's zone, whose hours of the week an open counts in for send-time optimization
    /// (`super::send_time`).
    pub zone: jiff::tz::TimeZone,
}

/// What became of one tracked event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// Counted for this campaign and variant.
    Counted { campaign: String, variant: String },
    /// This event id was recorded before.
    Duplicate,
    /// The exposure already has an event of this kind.
    AlreadyCounted { campaign: String, variant: String },
    /// A conversion outside the attribution window (or before the exposure).
    OutsideWindow { campaign: String, variant: String },
    /// No known exposure for this message or user.
    Unknown,
}

/// Counts of one variant of one campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VariantCounts {
    /// Terminal receipts by provider and status.
    pub receipts: BTreeMap<(Platform, ReceiptStatus), u64>,
    /// Exposures with an open, and with a conversion.
    pub opens: u64,
    pub conversions: u64,
}

/// Counts of one campaign, by variant name.
pub type CampaignCounts = BTreeMap<String, VariantCounts>;

/// Settings of campaign measurement (`pipeline.attribution_window_secs`, ...).
#[derive(Debug, Clone, Copy)]
pub struct InsightsConfig {
    pub attribution_window: Duration,
    /// Exposures (and as many event ids) kept in memory, at most.
    pub max_exposures: usize,
    /// How long Redis keeps a campaign's counters after its last update.
    pub retention: Duration,
}

impl Default for InsightsConfig {
    fn default() -> Self {
        Self {
            attribution_window: Duration::from_secs(3 * 24 * 3600),
            max_exposures: 1_000_000,
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What [`Insights::forget_user`] erased.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForgottenEvents {
    pub exposures: u64,
    pub events: u64,
}

/// The measurement store. See the module docs.
#[async_trait::async_trait]
pub trait Insights: ReceiptObserver + Send + Sync + 'static {
    /// Records `events` of `app`; one outcome per event, in order.
    async fn track(&self, app: &str, events: &[TrackEvent]) -> Result<Vec<Tracked>, StoreError>;

    /// The counts of `campaign` of `app` (empty when nothing is known of it).
    async fn counts(&self, app: &str, campaign: &str) -> Result<CampaignCounts, StoreError>;

    /// The open-time histograms of `app`'s population and of `users` (those with opens), for
    /// send-time optimization. Every counted open feeds them: its exposure's first open.
    async fn open_histograms(
        &self,
        app: &str,
        users: &[&str],
    ) -> Result<OpenHistograms, StoreError>;

    /// Erases the user's exposures, the event ids recorded about them and the user's open-time
    /// histogram (ForgetUser). The campaign counters and the population's histogram, which hold
    /// no user id, stay. An exposure whose receipt is still being counted (Redis counts
    /// receipts in the queue's writer) may land after this.
    async fn forget_user(&self, app: &str, user_id: &str) -> Result<ForgottenEvents, StoreError>;
}

/// The variant name a receipt counts under.
pub(crate) fn variant_of(receipt: &Receipt) -> &str {
    receipt
        .meta
        .content
        .variant
        .as_deref()
        .unwrap_or(NO_VARIANT)
}

/// True when a receipt makes an exposure: delivered, or held out.
pub(crate) fn is_exposure(receipt: &Receipt) -> bool {
    match receipt.status {
        ReceiptStatus::Delivered => true,
        ReceiptStatus::Dropped => {
            receipt.meta.content.variant.as_deref() == Some(crate::render::content::HOLDOUT)
        }
        _ => false,
    }
}

/// The attribution rule, shared by both stores: true when a conversion does not count (it
/// happened before the exposure, or more than the window after it). Opens always may.
pub(crate) fn outside_window(
    kind: EventKind,
    exposed_at_ms: i64,
    occurred_at_ms: i64,
    window: Duration,
) -> bool {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    kind == EventKind::Conversion
        && (occurred_at_ms < exposed_at_ms
            || occurred_at_ms.saturating_sub(exposed_at_ms) > window_ms)
}

#[derive(Debug, Clone)]
struct Exposure {
    /// The user it was sent to (ForgetUser), shared with `AppState::users`.
    user: Option<Arc<str>>,
    campaign: Arc<str>,
    variant: Arc<str>,
    at_ms: i64,
    opened: bool,
    converted: bool,
}

#[derive(Default)]
struct AppState {
    campaigns: HashMap<Arc<str>, CampaignCounts>,
    campaign_order: VecDeque<Arc<str>>,
    /// message id -> exposure.
    /// (Ids are shared `Arc<str>`: one allocation per exposure and per user, however many
    /// maps and queues name it; this runs for every delivered message of a campaign.)
    exposures: HashMap<Arc<str>, Exposure>,
    exposure_order: VecDeque<Arc<str>>,
    /// user id -> its latest exposures' message ids, newest last (a few per user).
    users: HashMap<Arc<str>, VecDeque<Arc<str>>>,
    /// Users in the order they were first seen, to forget the oldest in O(1).
    user_order: VecDeque<Arc<str>>,
    /// Event id -> the user of the exposure it was about (ForgetUser).
    events: HashMap<String, Option<Arc<str>>>,
    event_order: VecDeque<String>,
    /// Open-time histograms: the population's, and per user (at most `max_exposures` users,
    /// the first seen forgotten first).
    population: Histogram,
    histograms: HashMap<Arc<str>, Histogram>,
    histogram_order: VecDeque<Arc<str>>,
}

/// Exposures remembered per user for attribution by user id, at most.
const EXPOSURES_PER_USER: usize = 16;

impl AppState {
    fn counts(&mut self, campaign: &Arc<str>) -> &mut CampaignCounts {
        if !self.campaigns.contains_key(campaign) {
            if self.campaign_order.len() >= MAX_CAMPAIGNS
                && let Some(old) = self.campaign_order.pop_front()
            {
                self.campaigns.remove(&old);
            }
            self.campaign_order.push_back(Arc::clone(campaign));
        }
        self.campaigns.entry(Arc::clone(campaign)).or_default()
    }

    fn expose(&mut self, message_id: &str, user_id: &str, mut exposure: Exposure, max: usize) {
        let user: Option<Arc<str>> = match self.users.get_key_value(user_id) {
            _ if user_id.is_empty() => None,
            Some((known, _)) => Some(Arc::clone(known)),
            None => Some(Arc::from(user_id)),
        };
        exposure.user = user.clone();
        let id: Arc<str> = Arc::from(message_id);
        if self.exposures.insert(Arc::clone(&id), exposure).is_none() {
            self.exposure_order.push_back(Arc::clone(&id));
        }
        while self.exposure_order.len() > max {
            if let Some(old) = self.exposure_order.pop_front() {
                self.exposures.remove(&old);
            }
        }
        let Some(user) = user else {
            return;
        };
        if let Some(ids) = self.users.get_mut(user_id) {
            ids.retain(|known| *known != id);
            ids.push_back(id);
            while ids.len() > EXPOSURES_PER_USER {
                ids.pop_front();
            }
            return;
        }
        // A new user: the oldest user goes first. (Scanning for users whose exposures were
        // all forgotten made every new user cost a pass over all of them once the map was
        // full: a load run stalled at 100,000 users.)
        self.user_order.push_back(Arc::clone(&user));
        while self.user_order.len() > max {
            if let Some(old) = self.user_order.pop_front() {
                self.users.remove(&old);
            }
        }
        self.users.insert(user, VecDeque::from([id]));
    }

    fn remember_event(&mut self, id: &str, user: Option<Arc<str>>, max: usize) {
        if self.events.insert(id.to_owned(), user).is_none() {
            self.event_order.push_back(id.to_owned());
        }
        while self.event_order.len() > max {
            if let Some(old) = self.event_order.pop_front() {
                self.events.remove(&old);
            }
        }
    }

    /// The message id of the exposure an event is about.
    fn exposure_of(&self, e: &TrackEvent) -> Option<Arc<str>> {
        if !e.message_id.is_empty() {
            return self
                .exposures
                .get_key_value(e.message_id.as_str())
                .map(|(id, _)| Arc::clone(id));
        }
        if e.user_id.is_empty() {
            return None;
        }
        let ids = self.users.get(e.user_id.as_str())?;
        ids.iter()
            .rev()
            .find(|id| {
                self.exposures
                    .get(id.as_ref())
                    .is_some_and(|x| e.campaign_id.is_empty() || *x.campaign == *e.campaign_id)
            })
            .cloned()
    }

    /// Adds an open of `user` at `at_ms` to its histogram and the population's.
    fn add_open(&mut self, user: &Arc<str>, bucket: usize, at_ms: i64, max: usize) {
        self.population.add(bucket, at_ms);
        if let Some(h) = self.histograms.get_mut(user) {
            h.add(bucket, at_ms);
            return;
        }
        self.histogram_order.push_back(Arc::clone(user));
        while self.histogram_order.len() > max {
            if let Some(old) = self.histogram_order.pop_front() {
                self.histograms.remove(&old);
            }
        }
        let mut h = Histogram::default();
        h.add(bucket, at_ms);
        self.histograms.insert(Arc::clone(user), h);
    }

    fn track(&mut self, e: &TrackEvent, config: &InsightsConfig, now_ms: i64) -> Tracked {
        if self.events.contains_key(&e.event_id) {
            return Tracked::Duplicate;
        }
        let Some(id) = self.exposure_of(e) else {
            return Tracked::Unknown;
        };
        let Some(x) = self.exposures.get_mut(&id) else {
            return Tracked::Unknown;
        };
        if !e.campaign_id.is_empty() && *x.campaign != *e.campaign_id {
            return Tracked::Unknown;
        }
        let (campaign, variant) = (x.campaign.to_string(), x.variant.to_string());
        let user = x.user.clone();
        let outcome =
            if outside_window(e.kind, x.at_ms, e.occurred_at_ms, config.attribution_window) {
                Tracked::OutsideWindow { campaign, variant }
            } else {
                let flag = match e.kind {
                    EventKind::Open => &mut x.opened,
                    EventKind::Conversion => &mut x.converted,
                };
                if *flag {
                    Tracked::AlreadyCounted { campaign, variant }
                } else {
                    *flag = true;
                    let (c, v) = (Arc::clone(&x.campaign), Arc::clone(&x.variant));
                    let counts = self.counts(&c).entry(v.to_string()).or_default();
                    match e.kind {
                        EventKind::Open => counts.opens += 1,
                        EventKind::Conversion => counts.conversions += 1,
                    }
                    let opener = if e.user_id.is_empty() {
                        user.clone()
                    } else {
                        Some(Arc::from(e.user_id.as_str()))
                    };
                    if let (EventKind::Open, Some(opener)) = (e.kind, opener) {
                        // An open reported from the future (a device's clock) counts as now.
                        let at = e.occurred_at_ms.min(now_ms);
                        let bucket = hour_of_week(at, &e.zone);
                        self.add_open(&opener, bucket, at, config.max_exposures);
                    }
                    Tracked::Counted { campaign, variant }
                }
            };
        self.remember_event(&e.event_id, user, config.max_exposures);
        outcome
    }

    /// Erases the user's exposures, the events about them and the user's open-time histogram
    /// (the population's stays); O(what the app keeps), as ForgetUser is rare and an index per
    /// user would cost every receipt.
    fn forget(&mut self, user_id: &str) -> ForgottenEvents {
        let mine = |u: &Option<Arc<str>>| u.as_deref() == Some(user_id);
        self.users.remove(user_id);
        self.user_order.retain(|u| **u != *user_id);
        if self.histograms.remove(user_id).is_some() {
            self.histogram_order.retain(|u| **u != *user_id);
        }
        let before = (self.exposures.len(), self.events.len());
        self.exposures.retain(|_, x| !mine(&x.user));
        let exposures = &self.exposures;
        self.exposure_order.retain(|id| exposures.contains_key(id));
        self.events.retain(|_, u| !mine(u));
        let events = &self.events;
        self.event_order.retain(|id| events.contains_key(id));
        ForgottenEvents {
            exposures: (before.0 - self.exposures.len()) as u64,
            events: (before.1 - self.events.len()) as u64,
        }
    }
}

/// Campaign measurement in this process. See the module docs.
pub struct MemoryInsights {
    config: InsightsConfig,
    apps: Mutex<HashMap<Arc<str>, AppState>>,
}

impl MemoryInsights {
    pub fn new(config: InsightsConfig) -> Self {
        Self {
            config,
            apps: Mutex::new(HashMap::new()),
        }
    }
}

impl ReceiptObserver for MemoryInsights {
    fn observe(&self, receipt: &Arc<Receipt>) {
        if !receipt.terminal() || receipt.meta.campaign_id.is_empty() {
            return;
        }
        let meta = &receipt.meta;
        let mut apps = self.apps.lock();
        let app = apps.entry(Arc::clone(&meta.app_id)).or_default();
        let variant = variant_of(receipt);
        let counts = app.counts(&meta.campaign_id);
        let of_variant = match counts.get_mut(variant) {
            Some(known) => known,
            None => counts.entry(variant.to_owned()).or_default(),
        };
        *of_variant
            .receipts
            .entry((meta.platform, receipt.status))
            .or_default() += 1;
        if is_exposure(receipt) {
            let exposure = Exposure {
                user: None,
                campaign: Arc::clone(&meta.campaign_id),
                variant: meta
                    .content
                    .variant
                    .clone()
                    .unwrap_or_else(|| Arc::clone(&NO_VARIANT_SHARED)),
                at_ms: crate::domain::epoch_millis(
                    receipt.completed_at.unwrap_or(meta.accepted_at),
                ),
                opened: false,
                converted: false,
            };
            app.expose(
                &meta.message_id,
                &meta.user_id,
                exposure,
                self.config.max_exposures,
            );
        }
    }
}

#[async_trait::async_trait]
impl Insights for MemoryInsights {
    async fn track(&self, app: &str, events: &[TrackEvent]) -> Result<Vec<Tracked>, StoreError> {
        let now_ms = crate::store::now_ms();
        let mut apps = self.apps.lock();
        let state = apps.entry(Arc::from(app)).or_default();
        Ok(events
            .iter()
            .map(|e| state.track(e, &self.config, now_ms))
            .collect())
    }

    async fn open_histograms(
        &self,
        app: &str,
        users: &[&str],
    ) -> Result<OpenHistograms, StoreError> {
        let apps = self.apps.lock();
        let Some(state) = apps.get(app) else {
            return Ok(OpenHistograms::default());
        };
        Ok(OpenHistograms {
            population: state.population.clone(),
            users: users
                .iter()
                .filter_map(|u| {
                    let h = state.histograms.get(*u)?;
                    Some(((*u).to_owned(), h.clone()))
                })
                .collect(),
        })
    }

    async fn counts(&self, app: &str, campaign: &str) -> Result<CampaignCounts, StoreError> {
        Ok(self
            .apps
            .lock()
            .get(app)
            .and_then(|a| a.campaigns.get(campaign))
            .cloned()
            .unwrap_or_default())
    }

    async fn forget_user(&self, app: &str, user_id: &str) -> Result<ForgottenEvents, StoreError> {
        Ok(self
            .apps
            .lock()
            .get_mut(app)
            .map(|a| a.forget(user_id))
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ContentLabel, MessageMeta, Priority, Resolution};
    use std::time::SystemTime;

    fn receipt(id: &str, user: &str, variant: &str, status: ReceiptStatus) -> Arc<Receipt> {
        let meta = Arc::new(MessageMeta {
            app_id: "app".into(),
            batch_id: "b".into(),
            campaign_id: "spring".into(),
            message_id: id.into(),
            platform: Platform::Fcm,
            user_id: user.into(),
            priority: Priority::Default,
            accepted_at: SystemTime::now(),
            expires_at: None,
            campaign_rate_per_minute: 0,
            content: ContentLabel {
                variant: Some(variant.into()),
                locale: None,
            },
        });
        Arc::new(Receipt::new(meta, 1, Resolution::gateway(status, ""), None))
    }

    fn event(id: &str, kind: EventKind, message: &str, user: &str, at: i64) -> TrackEvent {
        TrackEvent {
            event_id: id.into(),
            kind,
            message_id: message.into(),
            user_id: user.into(),
            campaign_id: String::new(),
            occurred_at_ms: at,
            zone: jiff::tz::TimeZone::UTC,
        }
    }

    #[tokio::test]
    async fn events_count_once_per_id_and_exposure_within_the_window() {
        let config = InsightsConfig {
            attribution_window: Duration::from_secs(3600),
            max_exposures: 100,
            retention: Duration::from_secs(60),
        };
        let s = MemoryInsights::new(config);
        s.observe(&receipt("m1", "u1", "a", ReceiptStatus::Delivered));
        s.observe(&receipt("m2", "u2", "holdout", ReceiptStatus::Dropped));
        s.observe(&receipt("m3", "u3", "a", ReceiptStatus::Failed));
        let now = crate::store::now_ms();
        let out = s
            .track(
                "app",
                &[
                    event("e1", EventKind::Open, "m1", "", now),
                    event("e1", EventKind::Open, "m1", "", now),
                    event("e2", EventKind::Open, "m1", "", now),
                    event("e3", EventKind::Conversion, "", "u2", now),
                    event("e4", EventKind::Conversion, "m3", "", now),
                    event("e5", EventKind::Conversion, "m1", "", now + 7_200_000),
                    event("e6", EventKind::Conversion, "", "u1", now + 60_000),
                ],
            )
            .await
            .unwrap();
        let counted = |v: &str| Tracked::Counted {
            campaign: "spring".into(),
            variant: v.into(),
        };
        assert_eq!(out[0], counted("a"));
        assert_eq!(out[1], Tracked::Duplicate);
        assert!(matches!(out[2], Tracked::AlreadyCounted { .. }));
        assert_eq!(out[3], counted("holdout"));
        assert_eq!(out[4], Tracked::Unknown, "a failed message is no exposure");
        assert!(matches!(out[5], Tracked::OutsideWindow { .. }));
        assert_eq!(out[6], counted("a"));
        let counts = s.counts("app", "spring").await.unwrap();
        assert_eq!((counts["a"].opens, counts["a"].conversions), (1, 1));
        assert_eq!(counts["holdout"].conversions, 1);
        assert_eq!(
            counts["a"].receipts[&(Platform::Fcm, ReceiptStatus::Delivered)],
            1
        );
        assert_eq!(
            counts["a"].receipts[&(Platform::Fcm, ReceiptStatus::Failed)],
            1
        );
        // An unknown event is not remembered: once its receipt is in, it counts.
        assert_eq!(
            s.track("app", &[event("e7", EventKind::Open, "m9", "", now)])
                .await
                .unwrap(),
            [Tracked::Unknown]
        );
        s.observe(&receipt("m9", "u9", "a", ReceiptStatus::Delivered));
        assert_eq!(
            s.track("app", &[event("e7", EventKind::Open, "m9", "", now)])
                .await
                .unwrap(),
            [counted("a")]
        );
    }

    #[tokio::test]
    async fn counted_opens_feed_the_open_time_histograms() {
        let s = MemoryInsights::new(InsightsConfig {
            max_exposures: 3,
            ..InsightsConfig::default()
        });
        for (m, u) in [("m1", "u1"), ("m2", "u1"), ("m3", "u2")] {
            s.observe(&receipt(m, u, "a", ReceiptStatus::Delivered));
        }
        let now = crate::store::now_ms();
        let hour = 3_600_000;
        let out = s
            .track(
                "app",
                &[
                    // By message id: the exposure's user.
                    event("e1", EventKind::Open, "m1", "", now - hour),
                    // A repeat and a second open of the same exposure feed nothing.
                    event("e1", EventKind::Open, "m1", "", now - hour),
                    event("e2", EventKind::Open, "m1", "", now - hour),
                    // From the future: counted as now.
                    event("e3", EventKind::Open, "m2", "", now + 400 * hour),
                    event("e4", EventKind::Open, "m3", "", now),
                    // Conversions are no opens.
                    event("e5", EventKind::Conversion, "m3", "", now),
                ],
            )
            .await
            .unwrap();
        assert_eq!(out.len(), 6);
        let h = s.open_histograms("app", &["u1", "u2", "u9"]).await.unwrap();
        let read_at = crate::store::now_ms();
        let u1 = h.users["u1"].at(read_at);
        let utc = jiff::tz::TimeZone::UTC;
        assert!(u1[hour_of_week(now - hour, &utc)] > 0.99);
        assert!(u1[hour_of_week(now, &utc)] > 0.99);
        // One open an hour old, one (from the future) as of now: 2^(-1h/28d) + 1.
        let weight = |at: i64| crate::store::send_time::growth(read_at, at);
        let u1_total = weight(now - hour) + weight(now);
        assert!((h.users["u1"].total(read_at) - u1_total).abs() < 1e-6);
        assert!((h.users["u2"].total(read_at) - weight(now)).abs() < 1e-6);
        assert!(!h.users.contains_key("u9"));
        let population = u1_total + weight(now);
        assert!((h.population.total(read_at) - population).abs() < 1e-6);
        // At most `max_exposures` users keep a histogram: the first seen goes first.
        s.observe(&receipt("m4", "u3", "a", ReceiptStatus::Delivered));
        s.observe(&receipt("m5", "u4", "a", ReceiptStatus::Delivered));
        s.track(
            "app",
            &[
                event("e6", EventKind::Open, "m4", "", now),
                event("e7", EventKind::Open, "m5", "", now),
            ],
        )
        .await
        .unwrap();
        let h = s
            .open_histograms("app", &["u1", "u2", "u3", "u4"])
            .await
            .unwrap();
        assert_eq!(h.users.len(), 3);
        assert!(!h.users.contains_key("u1"));
    }

    /// ForgetUser erases the user's exposures (all of them, not only the latest per user), the
    /// events about them and the user's open-time histogram, and leaves other users, the
    /// campaign counters and the population's histogram.
    #[tokio::test]
    async fn forgetting_a_user_erases_exposures_and_events() {
        let s = MemoryInsights::new(InsightsConfig::default());
        for i in 0..20 {
            s.observe(&receipt(
                &format!("m{i}"),
                "u1",
                "a",
                ReceiptStatus::Delivered,
            ));
        }
        s.observe(&receipt("other", "u2", "a", ReceiptStatus::Delivered));
        let now = crate::store::now_ms();
        let out = s
            .track(
                "app",
                &[
                    event("e1", EventKind::Open, "m0", "", now),
                    event("e2", EventKind::Conversion, "", "u1", now),
                    event("e3", EventKind::Open, "other", "", now),
                ],
            )
            .await
            .unwrap();
        assert!(
            out.iter().all(|t| matches!(t, Tracked::Counted { .. })),
            "{out:?}"
        );
        let f = s.forget_user("app", "u1").await.unwrap();
        assert_eq!(
            f,
            ForgottenEvents {
                exposures: 20,
                events: 2
            }
        );
        // The user's open-time histogram goes too; the others' and the population's stay.
        let h = s.open_histograms("app", &["u1", "u2"]).await.unwrap();
        assert!(!h.users.contains_key("u1"));
        assert!(h.users.contains_key("u2"));
        assert!(h.population.total(crate::store::now_ms()) > 1.5);
        let again = s
            .track(
                "app",
                &[
                    event("e1", EventKind::Open, "m0", "", now),
                    event("e4", EventKind::Open, "m5", "", now),
                    event("e3", EventKind::Open, "other", "", now),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            again,
            [Tracked::Unknown, Tracked::Unknown, Tracked::Duplicate]
        );
        assert_eq!(s.counts("app", "spring").await.unwrap()["a"].opens, 2);
        assert_eq!(
            s.forget_user("app", "u1").await.unwrap(),
            ForgottenEvents::default()
        );
    }

    #[test]
    fn memory_is_bounded() {
        let s = MemoryInsights::new(InsightsConfig {
            max_exposures: 10,
            ..InsightsConfig::default()
        });
        for i in 0..1_000 {
            s.observe(&receipt(
                &format!("m{i}"),
                &format!("u{i}"),
                "a",
                ReceiptStatus::Delivered,
            ));
        }
        let apps = s.apps.lock();
        let app = &apps["app"];
        assert_eq!(app.exposures.len(), 10);
        assert!(app.users.len() <= 10, "{}", app.users.len());
        assert!(app.user_order.len() <= 10, "{}", app.user_order.len());
    }
}
