//! GCRA rate limits (governor) on tokio's clock, so paused-time tests control them.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::Rate;

/// governor's clock, read from tokio (which a test may pause and advance).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        Instant::now().into_std()
    }
}

/// One GCRA bucket: `rate.per_second` with `rate.burst`.
pub struct Gcra {
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>,
    rate: Rate,
}

impl std::fmt::Debug for Gcra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gcra").field("rate", &self.rate).finish()
    }
}

impl Gcra {
    /// A bucket for `rate` (validated config: positive and finite).
    pub fn new(rate: Rate) -> Self {
        let period = if rate.per_second.is_finite() && rate.per_second > 0.0 {
            Duration::from_secs_f64(1.0 / rate.per_second)
        } else {
            Duration::from_secs(3_600)
        };
        let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::direct_with_clock(quota, TokioClock),
            rate,
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one cell now, or says when one will be available (taking nothing).
    pub fn check(&self) -> Result<(), Instant> {
        self.limiter
            .check()
            .map_err(|not_until| Instant::from_std(not_until.earliest_possible()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_spaced_on_paused_time() {
        let g = Gcra::new(Rate {
            per_second: 10.0,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(g.check().is_ok());
        }
        let next = g.check().unwrap_err();
        assert_eq!(next - t0, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(g.check().is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(g.check().is_ok());
        assert!(g.check().is_err());
    }
}
