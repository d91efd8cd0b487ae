//! Backoff math, in one place: the retry policy of a message (attempts, exponential backoff with
//! full jitter, Retry-After as a clamped floor) and the jittered delay the HTTP/2 pools and the
//! OAuth client use to reconnect.

use std::time::Duration;

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

/// The largest wait `retry_delay` can choose for `attempt` without a Retry-After.
pub fn retry_delay_ceiling(policy: &RetryConfig, attempt: u32) -> Duration {
    exponential_ceiling(policy.base(), policy.cap(), attempt)
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
}
