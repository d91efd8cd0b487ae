//! Policy stage: decides *whether and when* an accepted message may go, between ingest and the
//! limit stage. Every decision ends in a receipt; a policy never drops a message silently.
//!
//! *When*: a message with a send time (`send_at_ms`, or `local_send_time` in the recipient's
//! zone, see [`Timing`]; or `send_time = OPTIMAL`, its user's best hour of the coming day by
//! the open-time histograms, `crate::store::send_time`) or deferred by quiet hours is
//! [`Verdict::Schedule`]d: ingest gives it a SCHEDULED receipt and the store holds it until it
//! is due. At acceptance such a message is checked up to quiet hours only (an opted-out user's
//! ends at once, and one whose send time falls in quiet hours with `action = "drop"`); when it
//! comes due, the gate in [`due`] decides it again in full (the order below), so an opt-out, a
//! dead token or a cap reached in between applies.
//!
//! The order is fixed, documented in the README ("Campaign delivery") and tested:
//!
//! 1. **opt-out**: the user opted out of the app's pushes (`SetOptOut`) -> DROPPED, reason
//!    `opted_out`. Transactional messages too, unless the app sets
//!    `opt_out_spares_transactional`.
//! 2. **quiet hours**: the recipient's local time (its `timezone`, else the app's
//!    `default_timezone`, else UTC) at the send time is inside `[apps.<id>.quiet_hours]` ->
//!    DROPPED, reason `quiet_hours` (or, with `action = "defer"`, scheduled for the window's
//!    end once the checks below pass).
//! 3. **suppression**: the device token was reported dead (APNs 410 or `BadDeviceToken`, FCM
//!    `UNREGISTERED`) within the suppression ttl and not registered again since ->
//!    INVALID_TOKEN, reason `suppressed`, without contacting the provider.
//! 4. **frequency caps**: the user already had `max` sends in one of the app's rolling
//!    windows -> DROPPED, reason `frequency_cap`. A message that passes reserves a send, and
//!    [`CapReleases`] gives the reservation back when the message ends without having been
//!    handed to a provider (its terminal receipt says 0 attempts: expired or rejected before
//!    sending, failed at shutdown before an attempt, ...). A message that was sent and then
//!    failed (a transient error, then FAILED) stays counted: the provider had it, and may have
//!    shown it.
//!
//! Transactional messages (`Template.priority = HIGH`, or a batch with `bypass_policies`) skip
//! quiet hours and caps (and are not counted). What the stage remembers (opt-outs, counters,
//! dead tokens) is behind the storage seam, [`PolicyState`]: in this process without Redis,
//! shared by every replica with it. One call decides a chunk of messages, so with Redis a chunk
//! costs one round trip. Time-zone arithmetic is in [`time`].

pub mod due;
pub mod time;

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use crate::domain::{FieldError, Priority, Receipt, ReceiptStatus, Recipient, Resolution};
use crate::metrics::{DecisionLabels, Metrics};
use crate::receipts::ReceiptObserver;
use crate::store::insights::Insights;
use crate::store::policy_state::{Answer, Cap, PolicyState, Query, reservation_of};
use crate::work::{DueCheck, Job};

/// `apps.<id>.frequency_caps` entries: at most `max` sends per user in any `window`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapConfig {
    pub max: u32,
    /// `<n>s`, `<n>m`, `<n>h` or `<n>d`, e.g. `"1d"`.
    pub window: String,
}

/// `[apps.<id>.quiet_hours]`: a daily window of the recipient's local time with no pushes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursConfig {
    /// `HH:MM`, local time; the window wraps midnight when `end` is earlier.
    pub start: String,
    pub end: String,
    #[serde(default)]
    pub action: QuietAction,
}

/// What quiet hours do with a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuietAction {
    /// DROPPED, reason `quiet_hours`.
    #[default]
    Drop,
    /// Held until the window ends (spread over `policy.defer_spread_secs`), then sent.
    Defer,
}

/// `[policy]`: settings of the policy stage shared by every app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How long a dead device token is remembered (and not sent to), in days.
    pub suppression_ttl_days: u64,
    /// Messages deferred by quiet hours go at the window's end plus a random share of this, so
    /// the end of the window is not a thundering herd.
    pub defer_spread_secs: u64,
    /// Without Redis: scheduled messages (and retries) held in memory at most; more are
    /// refused. With Redis they wait in Redis and cost this process nothing.
    pub max_scheduled_in_memory: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            suppression_ttl_days: 90,
            defer_spread_secs: 60,
            max_scheduled_in_memory: 100_000,
        }
    }
}

impl PolicyConfig {
    pub fn suppression_ttl_ms(&self) -> i64 {
        i64::try_from(self.suppression_ttl_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX)
    }
}

/// The policy settings of one app, as the config spells them.
#[derive(Debug, Clone, Default)]
pub struct AppPolicyConfig<'a> {
    pub default_timezone: Option<&'a str>,
    pub frequency_caps: &'a [CapConfig],
    pub quiet_hours: Option<&'a QuietHoursConfig>,
    pub opt_out_spares_transactional: bool,
}

/// The policies of one app, ready to apply.
#[derive(Debug, Clone, Default)]
pub struct AppPolicy {
    caps: Vec<Cap>,
    quiet: Option<(time::Window, QuietAction)>,
    default_zone: Option<jiff::tz::TimeZone>,
    opt_out_spares_transactional: bool,
}

impl AppPolicy {
    /// Checks and builds `app`'s settings; errors name the key under `prefix` (`apps.<id>`).
    pub fn from_config(prefix: &str, c: &AppPolicyConfig<'_>) -> Result<Self, FieldError> {
        let mut caps = Vec::new();
        for (i, cap) in c.frequency_caps.iter().enumerate() {
            let key = format!("{prefix}.frequency_caps[{i}]");
            if cap.max == 0 {
                return Err(FieldError::new(format!("{key}.max"), "must be at least 1"));
            }
            let window_ms = parse_window(&cap.window)
                .map_err(|reason| FieldError::new(format!("{key}.window"), reason))?;
            caps.push(Cap {
                max: cap.max,
                window_ms,
            });
        }
        let quiet = match c.quiet_hours {
            Some(q) => {
                let key = format!("{prefix}.quiet_hours");
                let start = time::Clock::parse(&q.start)
                    .map_err(|r| FieldError::new(format!("{key}.start"), r))?;
                let end = time::Clock::parse(&q.end)
                    .map_err(|r| FieldError::new(format!("{key}.end"), r))?;
                Some((time::Window { start, end }, q.action))
            }
            None => None,
        };
        let default_zone = match c.default_timezone {
            Some(name) => Some(time::zone(name).ok_or_else(|| {
                FieldError::new(
                    format!("{prefix}.default_timezone"),
                    format!("`{name}` is not an IANA time zone name"),
                )
            })?),
            None => None,
        };
        Ok(Self {
            caps,
            quiet,
            default_zone,
            opt_out_spares_transactional: c.opt_out_spares_transactional,
        })
    }
}

/// `"1d"`, `"12h"`, `"30m"`, `"90s"` in milliseconds.
pub fn parse_window(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not a window like \"30m\", \"12h\" or \"7d\"");
    let unit_at = text.len().checked_sub(1).ok_or_else(bad)?;
    let (n, unit) = text.split_at(unit_at);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if n <= 0 || n > 366 * 86_400_000 / ms {
        return Err(format!(
            "`{text}`: a window is more than 0 and at most 366 days"
        ));
    }
    Ok(n * ms)
}

/// Every app's policies and the stage-wide settings.
#[derive(Debug, Clone, Default)]
pub struct PolicySettings {
    pub apps: HashMap<String, AppPolicy>,
    pub config: PolicyConfig,
    /// The clock the stage reads (the system's, unless a test fixes it).
    pub clock: crate::domain::Clock,
}

/// How far ahead a message may be scheduled.
pub const MAX_AHEAD_MS: i64 = 30 * 86_400_000;

/// A batch's send timing (`send_at_ms`, `local_send_time`), checked once per batch.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    send_at_ms: i64,
    local: Option<(Option<jiff::civil::Date>, time::Clock)>,
    late_sends_now: bool,
    /// `send_time = OPTIMAL`.
    optimal: bool,
}

impl Timing {
    /// The timing of `batch`; errors name the batch's field.
    pub fn of(batch: &crate::domain::Batch) -> Result<Self, FieldError> {
        Self::of_at(batch, crate::store::now_ms())
    }

    /// [`Timing::of`] at `now_ms` (the policy stage's clock, [`Policy::now_ms`]).
    pub fn of_at(batch: &crate::domain::Batch, now_ms: i64) -> Result<Self, FieldError> {
        let local = match batch.local_send_time.trim() {
            "" => None,
            text => {
                if batch.send_at_ms > 0 {
                    return Err(FieldError::new(
                        "local_send_time",
                        "set send_at_ms or local_send_time, not both",
                    ));
                }
                let bad = |reason: String| FieldError::new("local_send_time", reason);
                match text.split_once(' ') {
                    Some((date, clock)) => {
                        let date: jiff::civil::Date = date
                            .parse()
                            .map_err(|_| bad(format!("`{date}` is not a date as YYYY-MM-DD")))?;
                        Some((Some(date), time::Clock::parse(clock).map_err(bad)?))
                    }
                    None => Some((None, time::Clock::parse(text).map_err(bad)?)),
                }
            }
        };
        check_ahead("send_at_ms", batch.send_at_ms, now_ms)?;
        if batch.optimal_send_time && (batch.send_at_ms > 0 || local.is_some()) {
            return Err(FieldError::new(
                "send_time",
                "OPTIMAL chooses the send time: not with send_at_ms or local_send_time",
            ));
        }
        Ok(Self {
            send_at_ms: batch.send_at_ms,
            local,
            late_sends_now: batch.late_sends_now,
            optimal: batch.optimal_send_time,
        })
    }
}

/// Refuses an instant more than [`MAX_AHEAD_MS`] from now.
fn check_ahead(field: &str, at_ms: i64, now_ms: i64) -> Result<(), FieldError> {
    if at_ms > now_ms.saturating_add(MAX_AHEAD_MS) {
        return Err(FieldError::new(
            field,
            "more than 30 days ahead (a message may be scheduled up to 30 days ahead)",
        ));
    }
    Ok(())
}

/// What the stage needs to know of one recipient, taken at validation.
#[derive(Debug, Clone)]
pub struct Input {
    user_id: String,
    device_token: String,
    registered_at_ms: i64,
    /// The recipient's zone, resolved only when the app has quiet hours or the batch a local
    /// send time.
    zone: Option<jiff::tz::TimeZone>,
    /// When it is due, if later than now.
    due_ms: Option<i64>,
    /// Due at its user's best hour (`send_time = OPTIMAL`, no send time of its own).
    optimal: bool,
    /// The tag of its cap reservation ([`reservation_of`]).
    reservation: u64,
    /// See [`Query::accepted_at_ms`]: set for a scheduled message come due.
    accepted_at_ms: i64,
}

impl Input {
    /// The input of message `message_id` of batch `batch_id` (the tag of its reservation).
    pub fn reserving(mut self, batch_id: &str, message_id: &str) -> Self {
        self.reservation = reservation_of(batch_id, message_id);
        self
    }

    /// What the stage reads again when this message, scheduled, comes due.
    pub fn due_check(&self, transactional: bool) -> DueCheck {
        DueCheck {
            registered_at_ms: self.registered_at_ms,
            timezone: self
                .zone
                .as_ref()
                .and_then(|z| z.iana_name())
                .unwrap_or_default()
                .to_owned(),
            transactional,
        }
    }

    /// The input of a scheduled job come due.
    fn of_due(job: &Job, check: &DueCheck) -> Self {
        let meta = job.pending.meta();
        Self {
            user_id: meta.user_id.clone(),
            device_token: job.request.device_token().to_owned(),
            registered_at_ms: check.registered_at_ms,
            zone: match check.timezone.as_str() {
                "" => None,
                name => time::zone(name),
            },
            due_ms: None,
            // Its send time was chosen at acceptance.
            optimal: false,
            reservation: reservation_of(&meta.batch_id, &meta.message_id),
            accepted_at_ms: crate::domain::epoch_millis(meta.accepted_at),
        }
    }
}

/// What the policy stage decided for one message.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Go on to the limit stage now.
    Send,
    /// Accepted, to be sent at `due_ms` (its own send time, or the end of quiet hours when
    /// `deferred`).
    Schedule { due_ms: i64, deferred: bool },
    /// End now with this terminal receipt (DROPPED or INVALID_TOKEN, with the reason).
    End(Resolution),
    /// The policy state could not be asked (Redis unreachable): not accepted.
    Unavailable(String),
}

/// The policy stage. See the module docs.
#[derive(Clone, Default)]
pub struct Policy {
    apps: Arc<HashMap<String, AppPolicy>>,
    /// `None`: no policy at all (every message goes), for gateways built without state.
    state: Option<Arc<dyn PolicyState>>,
    /// The open-time histograms `send_time = OPTIMAL` reads; without, such messages go now.
    insights: Option<Arc<dyn Insights>>,
    metrics: Option<Arc<Metrics>>,
    config: PolicyConfig,
    clock: crate::domain::Clock,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("apps", &self.apps.len())
            .field("state", &self.state.is_some())
            .finish()
    }
}

impl Policy {
    pub fn new(
        settings: PolicySettings,
        state: Arc<dyn PolicyState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            apps: Arc::new(settings.apps),
            state: Some(state),
            insights: None,
            metrics: Some(metrics),
            config: settings.config,
            clock: settings.clock,
        }
    }

    /// Reads the open-time histograms from `insights` for `send_time = OPTIMAL`.
    pub fn with_insights(mut self, insights: Arc<dyn Insights>) -> Self {
        self.insights = Some(insights);
        self
    }

    /// Now by the stage's clock, epoch ms: send times are computed and compared with it.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn now(&self) -> jiff::Timestamp {
        time::from_millis(self.now_ms())
    }

    /// Scheduled messages a store without durability may hold.
    pub fn max_scheduled_in_memory(&self) -> usize {
        self.config.max_scheduled_in_memory
    }

    /// What the stage remembers, for the policy RPCs and the deliver stage (dead tokens).
    pub fn state(&self) -> Option<&Arc<dyn PolicyState>> {
        self.state.as_ref()
    }

    /// Validates what the policies read of a recipient (its time zone, when `app` has quiet
    /// hours or the batch a local send time; its send time) and keeps it for
    /// [`Policy::decide`]. Errors name the recipient's field.
    pub fn inspect(
        &self,
        app: &str,
        recipient: &Recipient,
        index: usize,
        timing: &Timing,
    ) -> Result<Input, FieldError> {
        self.inspect_at(self.now(), app, recipient, index, timing)
    }

    /// [`Policy::inspect`] at the instant `now`.
    fn inspect_at(
        &self,
        now: jiff::Timestamp,
        app: &str,
        recipient: &Recipient,
        index: usize,
        timing: &Timing,
    ) -> Result<Input, FieldError> {
        let policy = self.apps.get(app);
        let field = |name: &str| format!("recipients[{index}].{name}");
        let zone = if policy.is_some_and(|p| p.quiet.is_some())
            || timing.local.is_some()
            || timing.optimal
        {
            if recipient.timezone.is_empty() {
                policy.and_then(|p| p.default_zone.clone())
            } else {
                Some(time::zone(&recipient.timezone).ok_or_else(|| {
                    FieldError::new(
                        field("timezone"),
                        format!("`{}` is not an IANA time zone name", recipient.timezone),
                    )
                })?)
            }
        } else {
            None
        };
        let now_ms = time::millis(now);
        let due_ms = if recipient.send_at_ms > 0 {
            check_ahead(&field("send_at_ms"), recipient.send_at_ms, now_ms)?;
            recipient.send_at_ms
        } else if timing.send_at_ms > 0 {
            timing.send_at_ms
        } else if let Some((date, clock)) = timing.local {
            let utc = jiff::tz::TimeZone::UTC;
            let tz = zone.as_ref().unwrap_or(&utc);
            let at = match date {
                Some(day) => time::at(day, clock, tz)
                    .filter(|&t| t >= now || timing.late_sends_now)
                    .map(|t| t.max(now))
                    .ok_or_else(|| {
                        FieldError::new(
                            "local_send_time",
                            format!("already past in {}", tz.iana_name().unwrap_or("UTC")),
                        )
                    })?,
                None => time::next_local(now, tz, clock, timing.late_sends_now)
                    .ok_or_else(|| FieldError::new("local_send_time", "no such local time"))?,
            };
            let at_ms = time::millis(at);
            check_ahead("local_send_time", at_ms, now_ms)?;
            at_ms
        } else {
            0
        };
        Ok(Input {
            user_id: recipient.user_id.clone(),
            device_token: recipient.device_token.clone(),
            registered_at_ms: recipient.token_registered_at_ms,
            zone,
            due_ms: (due_ms > now_ms).then_some(due_ms),
            optimal: timing.optimal && due_ms == 0,
            reservation: 0,
            accepted_at_ms: 0,
        })
    }

    /// The IANA name of `app`'s `default_timezone`, if it has one.
    pub fn default_zone_name(&self, app: &str) -> Option<&str> {
        self.apps.get(app)?.default_zone.as_ref()?.iana_name()
    }

    /// The zone a user of `app` is in: `name` (an IANA zone) when given, else the app's
    /// `default_timezone`, else UTC. The reason names what is wrong with `name`.
    pub fn zone_of(&self, app: &str, name: &str) -> Result<jiff::tz::TimeZone, String> {
        if !name.is_empty() {
            return time::zone(name)
                .ok_or_else(|| format!("`{name}` is not an IANA time zone name"));
        }
        Ok(self
            .apps
            .get(app)
            .and_then(|p| p.default_zone.clone())
            .unwrap_or(jiff::tz::TimeZone::UTC))
    }

    /// The best hour of each `optimal` input (see `crate::store::send_time`), when later than
    /// `now`: one read of the histograms for the chunk.
    async fn optimal_times(
        &self,
        app: &str,
        now: jiff::Timestamp,
        inputs: &[(&Input, bool)],
    ) -> Result<Vec<Option<i64>>, crate::store::StoreError> {
        let (Some(insights), true) = (&self.insights, inputs.iter().any(|(i, _)| i.optimal)) else {
            return Ok(vec![None; inputs.len()]);
        };
        let mut users: Vec<&str> = inputs
            .iter()
            .map(|&(i, _)| i)
            .filter(|i| i.optimal && !i.user_id.is_empty())
            .map(|i| i.user_id.as_str())
            .collect();
        users.sort_unstable();
        users.dedup();
        let histograms = insights.open_histograms(app, &users).await?;
        let now_ms = time::millis(now);
        let utc = jiff::tz::TimeZone::UTC;
        Ok(inputs
            .iter()
            .map(|&(input, _)| {
                if !input.optimal {
                    return None;
                }
                let weights = histograms.weights_for(&input.user_id, now_ms)?;
                let at = time::best_hour(now, input.zone.as_ref().unwrap_or(&utc), &weights)?;
                let at_ms = time::millis(at);
                (at_ms > now_ms).then_some(at_ms)
            })
            .collect())
    }

    /// The verdict for each message of `app` (one chunk of a batch, one call to the state).
    /// `transactional`: HIGH priority or `bypass_policies`. A message with a later send time,
    /// or deferred by quiet hours, is checked up to quiet hours now and in full when it comes
    /// due ([`due`]).
    pub async fn decide(&self, app: &str, transactional: bool, inputs: &[Input]) -> Vec<Verdict> {
        let each: Vec<(&Input, bool)> = inputs.iter().map(|i| (i, transactional)).collect();
        self.decide_each(app, &each).await
    }

    /// The verdicts of scheduled jobs of `app` that came due, each read from its [`DueCheck`].
    pub async fn decide_due(&self, app: &str, jobs: &[(&Job, &DueCheck)]) -> Vec<Verdict> {
        let inputs: Vec<Input> = jobs
            .iter()
            .map(|(job, check)| Input::of_due(job, check))
            .collect();
        let each: Vec<(&Input, bool)> = inputs
            .iter()
            .zip(jobs)
            .map(|(input, (_, check))| (input, check.transactional))
            .collect();
        self.decide_each(app, &each).await
    }

    /// [`Policy::decide`] with each message's own `transactional`.
    async fn decide_each(&self, app: &str, inputs: &[(&Input, bool)]) -> Vec<Verdict> {
        let now = self.now();
        let optimal = match self.optimal_times(app, now, inputs).await {
            Ok(times) => times,
            Err(e) => {
                let reason = format!("{e} (reading open times); the message was not accepted");
                return inputs
                    .iter()
                    .map(|_| Verdict::Unavailable(reason.clone()))
                    .collect();
            }
        };
        // Per message: the instant it is due at (its send time, or its user's best hour).
        let due: Vec<Option<i64>> = inputs
            .iter()
            .zip(&optimal)
            .map(|((input, _), best)| input.due_ms.or(*best))
            .collect();
        let Some(state) = &self.state else {
            return due
                .iter()
                .map(|due_ms| match *due_ms {
                    Some(due_ms) => Verdict::Schedule {
                        due_ms,
                        deferred: false,
                    },
                    None => Verdict::Send,
                })
                .collect();
        };
        let none = AppPolicy::default();
        let policy = self.apps.get(app).unwrap_or(&none);
        let now_ms = time::millis(now);
        let spread_ms = self.config.defer_spread_secs.saturating_mul(1_000);
        // Per message: dropped by quiet hours, and the instant it waits for (its send time, or
        // the end of quiet hours).
        let mut plans: Vec<(bool, Option<(i64, bool)>)> = Vec::with_capacity(inputs.len());
        let queries: Vec<Query<'_>> = inputs
            .iter()
            .zip(&due)
            .map(|(&(input, transactional), due_ms)| {
                // Quiet hours are judged at the instant the message would go.
                let at = due_ms.map_or(now, time::from_millis);
                let quiet_until =
                    policy
                        .quiet
                        .filter(|_| !transactional)
                        .and_then(|(w, action)| {
                            let utc = jiff::tz::TimeZone::UTC;
                            let zone = input.zone.as_ref().unwrap_or(&utc);
                            w.ends_after(at, zone).map(|end| (end, action))
                        });
                let quiet_drop = matches!(quiet_until, Some((_, QuietAction::Drop)));
                let wait = match quiet_until {
                    Some((end, QuietAction::Defer)) => {
                        let jitter = if spread_ms > 0 {
                            rand::random_range(0..spread_ms)
                        } else {
                            0
                        };
                        let at =
                            time::millis(end).saturating_add(i64::try_from(jitter).unwrap_or(0));
                        Some((at, true))
                    }
                    _ => due_ms.map(|due_ms| (due_ms, false)),
                };
                let later = wait.is_some() && !quiet_drop;
                plans.push((quiet_drop, wait.filter(|_| later)));
                Query {
                    user_id: &input.user_id,
                    device_token: &input.device_token,
                    registered_at_ms: input.registered_at_ms,
                    opt_out: !(transactional && policy.opt_out_spares_transactional),
                    // A message that waits stops after the opt-out now: the rest is decided
                    // when it comes due.
                    quiet: quiet_drop || later,
                    capped: !transactional,
                    reservation: input.reservation,
                    accepted_at_ms: input.accepted_at_ms,
                }
            })
            .collect();
        let verdicts: Vec<Verdict> = match state.decide(app, &policy.caps, now_ms, &queries).await {
            Ok(answers) => answers
                .into_iter()
                .zip(plans)
                .map(|(answer, (quiet_drop, wait))| match (answer, wait) {
                    (Answer::Quiet, Some((due_ms, deferred))) if !quiet_drop => {
                        Verdict::Schedule { due_ms, deferred }
                    }
                    (answer, _) => verdict(answer),
                })
                .collect(),
            Err(e) => {
                let reason = format!("{e}; the message was not accepted");
                inputs
                    .iter()
                    .map(|_| Verdict::Unavailable(reason.clone()))
                    .collect()
            }
        };
        self.count(app, &verdicts);
        verdicts
    }

    /// Gives back the cap reservation of a message that was decided but not accepted after
    /// all (the store could not take it; its receipt says `accepted = false`, which
    /// [`CapReleases`] does not read).
    pub fn release_unaccepted(&self, app: &str, batch_id: &str, message_id: &str, user_id: &str) {
        if let Some(state) = &self.state
            && self.apps.get(app).is_some_and(|p| !p.caps.is_empty())
            && !user_id.is_empty()
        {
            state.release(app, user_id, reservation_of(batch_id, message_id));
        }
    }

    /// The receipt observer that gives back the cap reservations of messages that ended
    /// without reaching a provider; `None` without state.
    pub fn releases(&self) -> Option<CapReleases> {
        Some(CapReleases {
            apps: Arc::clone(&self.apps),
            state: Arc::clone(self.state.as_ref()?),
        })
    }

    fn count(&self, app: &str, verdicts: &[Verdict]) {
        let Some(metrics) = &self.metrics else { return };
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for v in verdicts {
            let label = match v {
                Verdict::Send => "send",
                Verdict::Schedule { deferred: true, .. } => "deferred",
                Verdict::Schedule { .. } => "scheduled",
                Verdict::Unavailable(_) => "unavailable",
                Verdict::End(r) => match r.reason.as_str() {
                    OPTED_OUT => OPTED_OUT,
                    QUIET_HOURS => QUIET_HOURS,
                    FREQUENCY_CAP => FREQUENCY_CAP,
                    _ => "suppressed",
                },
            };
            *counts.entry(label).or_default() += 1;
        }
        for (decision, n) in counts {
            let counter: Counter = metrics
                .policy_decisions
                .get_or_create(&DecisionLabels {
                    app: app.to_owned(),
                    decision: decision.to_owned(),
                })
                .clone();
            counter.inc_by(n);
        }
    }
}

/// Gives back the cap reservation of each message that ends without having been handed to a
/// provider (a terminal receipt after 0 attempts), so caps count hand-offs, not decisions. It
/// sees every receipt (it is a [`ReceiptObserver`] of the hub) and ignores those of messages
/// that never took a reservation: refused at ingest, ended by the policy stage itself, held
/// out, cancelled or erased while scheduled, HIGH priority. With Redis the release is one
/// script call, not awaited, made by whichever replica emits the receipt.
pub struct CapReleases {
    apps: Arc<HashMap<String, AppPolicy>>,
    state: Arc<dyn PolicyState>,
}

/// Reasons of terminal receipts whose message took no reservation.
const UNRESERVED: [&str; 7] = [
    OPTED_OUT,
    QUIET_HOURS,
    FREQUENCY_CAP,
    SUPPRESSED,
    crate::render::content::HOLDOUT,
    crate::store::CANCELLED,
    crate::store::FORGOTTEN,
];

impl ReceiptObserver for CapReleases {
    fn observe(&self, receipt: &Arc<Receipt>) {
        let meta = &receipt.meta;
        if !receipt.terminal()
            || !receipt.accepted
            || receipt.attempt > 0
            || meta.user_id.is_empty()
            || meta.priority == Priority::High
            || UNRESERVED.contains(&receipt.reason.as_str())
            || self
                .apps
                .get(meta.app_id.as_ref())
                .is_none_or(|p| p.caps.is_empty())
        {
            return;
        }
        self.state.release(
            &meta.app_id,
            &meta.user_id,
            reservation_of(&meta.batch_id, &meta.message_id),
        );
    }
}

/// Receipt reasons of the policy stage (machine-readable: callers match on them).
pub const OPTED_OUT: &str = "opted_out";
pub const QUIET_HOURS: &str = "quiet_hours";
pub const FREQUENCY_CAP: &str = "frequency_cap";
pub const SUPPRESSED: &str = "suppressed";

fn verdict(answer: Answer) -> Verdict {
    let dropped = |reason: &str| Verdict::End(Resolution::gateway(ReceiptStatus::Dropped, reason));
    match answer {
        Answer::Send => Verdict::Send,
        Answer::OptedOut => dropped(OPTED_OUT),
        Answer::Quiet => dropped(QUIET_HOURS),
        Answer::Capped => dropped(FREQUENCY_CAP),
        Answer::Suppressed { since_ms } => Verdict::End(Resolution {
            token_invalid_since: u64::try_from(since_ms)
                .ok()
                .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
            ..Resolution::gateway(ReceiptStatus::InvalidToken, SUPPRESSED)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paris_recipient() -> Recipient {
        Recipient {
            message_id: "m".into(),
            platform: crate::domain::Platform::Apns,
            device_token: "t".into(),
            vars: Default::default(),
            user_id: "u".into(),
            locale: String::new(),
            timezone: "Europe/Paris".into(),
            apns_json: String::new(),
            fcm_json: String::new(),
            title: None,
            body: None,
            token_registered_at_ms: 0,
            send_at_ms: 0,
        }
    }

    /// `local_send_time` through the stage across the 2026 spring change in Paris: 09:00 on
    /// the Saturday is 08:00 UTC, on the Sunday 07:00 UTC, 23 hours later; "09:00" asked on
    /// the Saturday at 10:00 local goes on the Sunday at 07:00 UTC.
    #[test]
    fn local_send_times_cross_a_dst_change() {
        let policy = Policy::default();
        let now: jiff::Timestamp = "2026-03-27T12:00:00Z".parse().unwrap();
        let due = |local: &str, now: jiff::Timestamp| {
            let timing = Timing {
                local: Some(match local.split_once(' ') {
                    Some((d, c)) => (Some(d.parse().unwrap()), time::Clock::parse(c).unwrap()),
                    None => (None, time::Clock::parse(local).unwrap()),
                }),
                ..Timing::default()
            };
            policy
                .inspect_at(now, "shop", &paris_recipient(), 0, &timing)
                .unwrap()
                .due_ms
                .unwrap()
        };
        let ms = |t: &str| t.parse::<jiff::Timestamp>().unwrap().as_millisecond();
        let saturday = due("2026-03-28 09:00", now);
        let sunday = due("2026-03-29 09:00", now);
        assert_eq!(saturday, ms("2026-03-28T08:00:00Z"));
        assert_eq!(sunday, ms("2026-03-29T07:00:00Z"));
        assert_eq!(sunday - saturday, 23 * 3_600_000);
        let saturday_late = "2026-03-28T09:00:00Z".parse().unwrap();
        assert_eq!(due("09:00", saturday_late), ms("2026-03-29T07:00:00Z"));
        // A past date is refused naming the batch's field.
        let timing = Timing {
            local: Some((
                Some("2026-03-01".parse().unwrap()),
                time::Clock::parse("09:00").unwrap(),
            )),
            ..Timing::default()
        };
        let e = policy
            .inspect_at(now, "shop", &paris_recipient(), 0, &timing)
            .unwrap_err();
        assert_eq!(e.field, "local_send_time");
    }

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window("90s"), Ok(90_000));
        assert_eq!(parse_window("30m"), Ok(1_800_000));
        assert_eq!(parse_window("12h"), Ok(43_200_000));
        assert_eq!(parse_window("7d"), Ok(604_800_000));
        for bad in ["", "d", "0d", "-1d", "1w", "1.5d", "400d"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn app_settings_errors_name_the_key() {
        let caps = [CapConfig {
            max: 3,
            window: "1x".into(),
        }];
        let c = AppPolicyConfig {
            frequency_caps: &caps,
            ..Default::default()
        };
        let e = AppPolicy::from_config("apps.shop", &c).unwrap_err();
        assert_eq!(e.field, "apps.shop.frequency_caps[0].window");
        let c = AppPolicyConfig {
            default_timezone: Some("Nowhere/Land"),
            ..Default::default()
        };
        let e = AppPolicy::from_config("apps.shop", &c).unwrap_err();
        assert_eq!(e.field, "apps.shop.default_timezone");
        let q = QuietHoursConfig {
            start: "22:00".into(),
            end: "8:00".into(),
            action: QuietAction::Drop,
        };
        let c = AppPolicyConfig {
            quiet_hours: Some(&q),
            ..Default::default()
        };
        let e = AppPolicy::from_config("apps.shop", &c).unwrap_err();
        assert_eq!(e.field, "apps.shop.quiet_hours.end");
    }
}
