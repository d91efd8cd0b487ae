//! Backoff math, in one place: the retry policy of a message (attempts, exponential backoff with
//! full jitter, Retry-After as a clamped floor) and the jittered delay the HTTP/2 pools and the
//! OAuth client use to reconnect.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// `[retry]` (and `[apps.<id>.retry]`): when and how often transient failures are retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff ceiling; doubles per attempt (full jitter).
    pub base_ms: u64,
    /// Largest backoff ceiling.
    pub cap_ms: u64,
    /// Provider attempts per message, including the first.
    pub max_attempts: u32,
    /// A provider's Retry-After is honoured up to this long.
    pub max_retry_after_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base_ms: 500,
            cap_ms: 60_000,
            max_attempts: 5,
            max_retry_after_secs: 3_600,
        }
    }
}

impl RetryConfig {
    pub fn base(&self) -> Duration {
        Duration::from_millis(self.base_ms)
    }
    pub fn cap(&self) -> Duration {
        Duration::from_millis(self.cap_ms)
    }
    pub fn max_retry_after(&self) -> Duration {
        Duration::from_secs(self.max_retry_after_secs)
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempt-1))].
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = exponential_ceiling(base, cap, attempt);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// The upper bound of the jittered backoff for `attempt` (1-based).
pub fn exponential_ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << shift).min(cap)
}

/// The wait before attempt `attempt + 1`: exponential backoff with full jitter, but never less
/// than the provider's Retry-After (clamped to the policy's maximum).
pub fn retry_delay(policy: &RetryConfig, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let jittered = backoff(policy.base(), policy.cap(), attempt);
    match retry_after {
        Some(after) => jittered.max(after.min(policy.max_retry_after())),
        None => jittered,
    }
}

impl RetryConfig {
    /// The largest wait a retry can be given before `attempt` when the provider sends no
    /// Retry-After (the backoff before jitter).
    pub fn delay_ceiling(&self, attempt: u32) -> Duration {
        retry_delay_ceiling(self, attempt)
    }
}

/// The largest wait `retry_delay` can choose for `attempt` without a Retry-After.
fn retry_delay_ceiling(policy: &RetryConfig, attempt: u32) -> Duration {
    exponential_ceiling(policy.base(), policy.cap(), attempt)
}

/// What follows a transient failure of a message's attempt `attempt` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPlan {
    /// No attempt is left: the message ends (dead letter).
    GiveUp,
    /// The next attempt would come at or after the message's expiry: it ends EXPIRED now.
    Expire,
    /// Another attempt after `delay`, at `at` (`now + delay`), before any expiry.
    Retry { delay: Duration, at: SystemTime },
}

/// Decides what follows a transient failure at `now` of a message expiring at `expires_at`:
/// [`retry_delay`] chooses the wait, and a wait that would reach the expiry (or that no clock
/// can represent) ends the message instead of scheduling an attempt the provider would
/// refuse.
pub fn plan_retry(
    policy: &RetryConfig,
    attempt: u32,
    retry_after: Option<Duration>,
    now: SystemTime,
    expires_at: Option<SystemTime>,
) -> RetryPlan {
    if attempt >= policy.max_attempts {
        return RetryPlan::GiveUp;
    }
    let delay = retry_delay(policy, attempt, retry_after);
    match now.checked_add(delay) {
        Some(at) if expires_at.is_none_or(|expiry| at < expiry) => RetryPlan::Retry { delay, at },
        _ => RetryPlan::Expire,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert_eq!(exponential_ceiling(base, cap, 1), base);
        assert_eq!(
            exponential_ceiling(base, cap, 3),
            Duration::from_millis(400)
        );
        assert_eq!(exponential_ceiling(base, cap, 40), cap);
        for attempt in 1..20 {
            assert!(backoff(base, cap, attempt) <= exponential_ceiling(base, cap, attempt));
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_clamped() {
        let policy = RetryConfig {
            base_ms: 100,
            cap_ms: 1_000,
            max_attempts: 5,
            max_retry_after_secs: 60,
        };
        for attempt in 1..6 {
            let d = retry_delay(&policy, attempt, None);
            assert!(d <= retry_delay_ceiling(&policy, attempt));
            let d = retry_delay(&policy, attempt, Some(Duration::from_secs(30)));
            assert!(d >= Duration::from_secs(30));
            let d = retry_delay(&policy, attempt, Some(Duration::from_secs(7_200)));
            assert_eq!(d, Duration::from_secs(60), "clamped to max_retry_after");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn policy() -> impl Strategy<Value = RetryConfig> {
            (0u64..120_000, 0u64..7_200_000, 1u32..50, 0u64..200_000).prop_map(
                |(base_ms, extra, max_attempts, max_retry_after_secs)| RetryConfig {
                    base_ms,
                    cap_ms: base_ms + extra,
                    max_attempts,
                    max_retry_after_secs,
                },
            )
        }

        fn retry_after() -> impl Strategy<Value = Option<Duration>> {
            proptest::option::of(prop_oneof![
                (0u64..100_000).prop_map(Duration::from_secs),
                any::<u64>().prop_map(Duration::from_secs),
                Just(Duration::MAX),
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Backoff and Retry-After never schedule an attempt at or past the ttl, and the
            /// wait is within the policy's caps and honours the (capped) Retry-After.
            #[test]
            fn no_attempt_is_planned_past_the_expiry(
                policy in policy(),
                attempt in 1u32..64,
                retry_after in retry_after(),
                now_ms in 0u64..4_000_000_000_000,
                ttl_ms in proptest::option::of(0u64..40 * 86_400_000),
            ) {
                let now = SystemTime::UNIX_EPOCH + Duration::from_millis(now_ms);
                let expires_at = ttl_ms.map(|ms| now + Duration::from_millis(ms));
                match plan_retry(&policy, attempt, retry_after, now, expires_at) {
                    RetryPlan::GiveUp => prop_assert!(attempt >= policy.max_attempts),
                    RetryPlan::Expire => {
                        prop_assert!(attempt < policy.max_attempts);
                        prop_assert!(expires_at.is_some(), "expired without a ttl");
                    }
                    RetryPlan::Retry { delay, at } => {
                        prop_assert!(attempt < policy.max_attempts);
                        prop_assert_eq!(Some(at), now.checked_add(delay));
                        if let Some(expiry) = expires_at {
                            prop_assert!(at < expiry, "attempt at {:?} not before {:?}", at, expiry);
                        }
                        prop_assert!(delay <= policy.cap().max(policy.max_retry_after()));
                        if let Some(after) = retry_after {
                            prop_assert!(delay >= after.min(policy.max_retry_after()));
                        }
                        prop_assert!(tokio::time::Instant::now().checked_add(delay).is_some());
                    }
                }
            }

            /// A message with time left is retried, not expired, when the longest wait the
            /// policy could choose fits before its expiry.
            #[test]
            fn a_wait_that_fits_is_never_expired(
                policy in policy(),
                attempt in 1u32..64,
                retry_after in retry_after(),
                slack_ms in 1u64..1_000_000,
            ) {
                let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
                let longest = retry_delay_ceiling(&policy, attempt)
                    .max(retry_after.unwrap_or_default().min(policy.max_retry_after()));
                let expires_at = now + longest + Duration::from_millis(slack_ms);
                let plan = plan_retry(&policy, attempt, retry_after, now, Some(expires_at));
                if attempt < policy.max_attempts {
                    prop_assert!(matches!(plan, RetryPlan::Retry { .. }), "{:?}", plan);
                }
            }
        }
    }
}
