//! Policy stage: decides *whether* an accepted message may go, between ingest and the limit
//! stage. Every decision ends in a receipt; a policy never drops a message silently.
//!
//! The order is fixed, documented in the README ("Campaign delivery") and tested:
//!
//! 1. **opt-out**: the user opted out of the app's pushes (`SetOptOut`) -> DROPPED, reason
//!    `opted_out`. Transactional messages too, unless the app sets
//!    `opt_out_spares_transactional`.
//! 2. **quiet hours**: the recipient's local time (its `timezone`, else the app's
//!    `default_timezone`, else UTC) is inside `[apps.<id>.quiet_hours]` -> DROPPED, reason
//!    `quiet_hours`.
//! 3. **suppression**: the device token was reported dead (APNs 410 or `BadDeviceToken`, FCM
//!    `UNREGISTERED`) within the suppression ttl and not registered again since ->
//!    INVALID_TOKEN, reason `suppressed`, without contacting the provider.
//! 4. **frequency caps**: the user already had `max` sends in one of the app's rolling
//!    windows -> DROPPED, reason `frequency_cap`. A message that passes is counted.
//!
//! Transactional messages (`Template.priority = HIGH`, or a batch with `bypass_policies`) skip
//! quiet hours and caps (and are not counted). What the stage remembers (opt-outs, counters,
//! dead tokens) is behind the storage seam, [`PolicyState`]: in this process without Redis,
//! shared by every replica with it. One call decides a chunk of messages, so with Redis a chunk
//! costs one round trip. Time-zone arithmetic is in [`time`].

pub mod time;

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use crate::domain::{FieldError, ReceiptStatus, Recipient, Resolution};
use crate::metrics::{DecisionLabels, Metrics};
use crate::store::policy_state::{Answer, Cap, PolicyState, Query};

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
    /// Held until the window ends. Not built yet: refused by validation.
    Defer,
}

/// `[policy]`: settings of the policy stage shared by every app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How long a dead device token is remembered (and not sent to), in days.
    pub suppression_ttl_days: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            suppression_ttl_days: 90,
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
    quiet: Option<time::Window>,
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
                if q.action == QuietAction::Defer {
                    return Err(FieldError::new(
                        format!("{key}.action"),
                        "`defer` is not supported by this version (it needs scheduled sends); use `drop`",
                    ));
                }
                let start = time::Clock::parse(&q.start)
                    .map_err(|r| FieldError::new(format!("{key}.start"), r))?;
                let end = time::Clock::parse(&q.end)
                    .map_err(|r| FieldError::new(format!("{key}.end"), r))?;
                Some(time::Window { start, end })
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
}

/// What the stage needs to know of one recipient, taken at validation.
#[derive(Debug, Clone)]
pub struct Input {
    user_id: String,
    device_token: String,
    registered_at_ms: i64,
    /// The recipient's zone, resolved only when the app has quiet hours.
    zone: Option<jiff::tz::TimeZone>,
}

/// What the policy stage decided for one message.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Go on to the limit stage now.
    Send,
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
    metrics: Option<Arc<Metrics>>,
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
        apps: HashMap<String, AppPolicy>,
        state: Arc<dyn PolicyState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            apps: Arc::new(apps),
            state: Some(state),
            metrics: Some(metrics),
        }
    }

    /// What the stage remembers, for the policy RPCs and the deliver stage (dead tokens).
    pub fn state(&self) -> Option<&Arc<dyn PolicyState>> {
        self.state.as_ref()
    }

    /// Validates what the policies read of a recipient (its time zone, when `app` has quiet
    /// hours) and keeps it for [`Policy::decide`]. Errors name the recipient's field.
    pub fn inspect(
        &self,
        app: &str,
        recipient: &Recipient,
        index: usize,
    ) -> Result<Input, FieldError> {
        let policy = self.apps.get(app);
        let zone = match policy.filter(|p| p.quiet.is_some()) {
            Some(p) if recipient.timezone.is_empty() => p.default_zone.clone(),
            Some(_) => Some(time::zone(&recipient.timezone).ok_or_else(|| {
                FieldError::new(
                    format!("recipients[{index}].timezone"),
                    format!("`{}` is not an IANA time zone name", recipient.timezone),
                )
            })?),
            None => None,
        };
        Ok(Input {
            user_id: recipient.user_id.clone(),
            device_token: recipient.device_token.clone(),
            registered_at_ms: recipient.token_registered_at_ms,
            zone,
        })
    }

    /// The verdict for each message of `app` (one chunk of a batch, one call to the state).
    /// `transactional`: HIGH priority or `bypass_policies`.
    pub async fn decide(&self, app: &str, transactional: bool, inputs: &[Input]) -> Vec<Verdict> {
        let Some(state) = &self.state else {
            return inputs.iter().map(|_| Verdict::Send).collect();
        };
        let none = AppPolicy::default();
        let policy = self.apps.get(app).unwrap_or(&none);
        let now = jiff::Timestamp::now();
        let now_ms = time::millis(now);
        let queries: Vec<Query<'_>> = inputs
            .iter()
            .map(|input| {
                let quiet = !transactional
                    && policy.quiet.is_some_and(|w| {
                        let utc = jiff::tz::TimeZone::UTC;
                        let zone = input.zone.as_ref().unwrap_or(&utc);
                        w.ends_after(now, zone).is_some()
                    });
                Query {
                    user_id: &input.user_id,
                    device_token: &input.device_token,
                    registered_at_ms: input.registered_at_ms,
                    opt_out: !(transactional && policy.opt_out_spares_transactional),
                    quiet,
                    capped: !transactional,
                }
            })
            .collect();
        let verdicts: Vec<Verdict> = match state.decide(app, &policy.caps, now_ms, &queries).await {
            Ok(answers) => answers.into_iter().map(verdict).collect(),
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

    fn count(&self, app: &str, verdicts: &[Verdict]) {
        let Some(metrics) = &self.metrics else { return };
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for v in verdicts {
            let label = match v {
                Verdict::Send => "send",
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
