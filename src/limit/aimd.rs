//! Adaptive concurrency for one (app, provider): additive increase while latency holds,
//! multiplicative decrease on back-pressure (HTTP 429 / QUOTA_EXCEEDED / 503) and on rising
//! round-trip time, in the manner of Vector's adaptive request concurrency.
//!
//! The controller is plain state with time passed in, so it is tested on scheduled instants.

use std::time::Duration;

use tokio::time::Instant;

use crate::domain::Outcome;

/// Fast RTT average weight (recent behaviour).
const FAST_ALPHA: f64 = 0.2;
/// Slow RTT average weight (the baseline the fast one is compared with).
const SLOW_ALPHA: f64 = 0.02;
/// RTT counts as rising when the fast average exceeds the baseline by this factor...
const RTT_RISE_FACTOR: f64 = 2.0;
/// ...and by at least this much (ignores jitter of sub-millisecond round trips).
const RTT_RISE_SLACK: f64 = 0.025;
/// Samples before RTT may cause a decrease.
const RTT_WARMUP_SAMPLES: u32 = 20;
/// After a decrease, further back-pressure within max(this, fast RTT) is the same episode.
const MIN_DECREASE_HOLD: Duration = Duration::from_millis(50);

/// What one finished provider request tells the controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feedback {
    /// The provider answered normally after `rtt`.
    Ok(Duration),
    /// The provider asked us to slow down (429, 503).
    Backpressure,
    /// Says nothing about load (a 500, a dropped connection, credentials...).
    Neutral,
}

impl Feedback {
    /// Classifies a provider outcome.
    pub fn of(outcome: &Outcome, rtt: Duration) -> Self {
        match outcome {
            Outcome::Retry {
                status: 429 | 503, ..
            } => Feedback::Backpressure,
            Outcome::Retry { .. } | Outcome::Failed { .. } => Feedback::Neutral,
            Outcome::Delivered { .. } | Outcome::InvalidToken { .. } | Outcome::Rejected { .. } => {
                Feedback::Ok(rtt)
            }
        }
    }
}

/// AIMD concurrency limit with its in-flight count.
#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    max: f64,
    in_flight: usize,
    fast_rtt: Option<f64>,
    slow_rtt: Option<f64>,
    samples: u32,
    last_decrease: Option<Instant>,
    backpressure_decreases: u64,
}

impl Aimd {
    /// Starts at `initial` requests in flight, never above `max` nor below 1.
    pub fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1) as f64;
        Self {
            limit: (initial.max(1) as f64).min(max),
            max,
            in_flight: 0,
            fast_rtt: None,
            slow_rtt: None,
            samples: 0,
            last_decrease: None,
            backpressure_decreases: 0,
        }
    }

    /// Requests allowed in flight now.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Times the limit was cut because the provider pushed back (429/503).
    pub fn backpressure_decreases(&self) -> u64 {
        self.backpressure_decreases
    }

    /// True when another request may start.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.limit()
    }

    /// Counts a request as started.
    pub fn acquire(&mut self) {
        self.in_flight += 1;
    }

    /// Counts a request as finished (call after [`Aimd::feedback`], if any).
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Changes the ceiling (config reload); the current limit is clamped to it.
    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1) as f64;
        self.limit = self.limit.min(self.max);
    }

    /// Adjusts the limit from a finished request, while it still counts as in flight.
    pub fn feedback(&mut self, now: Instant, feedback: Feedback) {
        match feedback {
            Feedback::Neutral => {}
            Feedback::Backpressure => {
                if self.decrease(now) {
                    self.backpressure_decreases += 1;
                }
            }
            Feedback::Ok(rtt) => {
                let rtt = rtt.as_secs_f64();
                let ewma = |avg: Option<f64>, alpha: f64| match avg {
                    Some(a) => a + alpha * (rtt - a),
                    None => rtt,
                };
                self.fast_rtt = Some(ewma(self.fast_rtt, FAST_ALPHA));
                self.slow_rtt = Some(ewma(self.slow_rtt, SLOW_ALPHA));
                self.samples = self.samples.saturating_add(1);
                if self.rtt_rising() {
                    self.decrease(now);
                } else if self.in_flight >= self.limit() {
                    // The window was full and latency held: one more per window's worth.
                    self.limit = (self.limit + 1.0 / self.limit).min(self.max);
                }
            }
        }
    }

    fn rtt_rising(&self) -> bool {
        match (self.fast_rtt, self.slow_rtt) {
            (Some(fast), Some(slow)) => {
                self.samples >= RTT_WARMUP_SAMPLES
                    && fast > slow * RTT_RISE_FACTOR
                    && fast - slow > RTT_RISE_SLACK
            }
            _ => false,
        }
    }

    /// Halves the limit unless it was halved within the last round trip; true when it did.
    fn decrease(&mut self, now: Instant) -> bool {
        let hold = MIN_DECREASE_HOLD.max(Duration::from_secs_f64(self.fast_rtt.unwrap_or(0.0)));
        if self.last_decrease.is_some_and(|t| now < t + hold) {
            return false;
        }
        self.limit = (self.limit / 2.0).max(1.0);
        self.last_decrease = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(10);

    /// Keeps the window full (a busy sender), completing `rounds` windows' worth of requests
    /// with `feedback`, then lets the window drain.
    fn run_rounds(a: &mut Aimd, rounds: usize, feedback: Feedback) {
        for _ in 0..rounds {
            for _ in 0..a.limit() {
                while a.has_room() {
                    a.acquire();
                }
                a.feedback(Instant::now(), feedback);
                a.release();
            }
        }
        while a.in_flight() > 0 {
            a.release();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_by_about_one_per_full_window_up_to_max() {
        let mut a = Aimd::new(4, 10);
        run_rounds(&mut a, 2, Feedback::Ok(RTT));
        assert!(a.limit() >= 5, "{}", a.limit());
        run_rounds(&mut a, 100, Feedback::Ok(RTT));
        assert_eq!(a.limit(), 10, "capped at max");
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_grow_when_the_window_is_not_used() {
        let mut a = Aimd::new(4, 10);
        for _ in 0..50 {
            a.acquire();
            a.feedback(Instant::now(), Feedback::Ok(RTT));
            a.release();
        }
        assert_eq!(a.limit(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn halves_once_per_backpressure_episode() {
        let mut a = Aimd::new(64, 100);
        // A burst of 429s answering the same window halves once.
        for _ in 0..10 {
            a.feedback(Instant::now(), Feedback::Backpressure);
        }
        assert_eq!(a.limit(), 32);
        tokio::time::advance(Duration::from_millis(60)).await;
        a.feedback(Instant::now(), Feedback::Backpressure);
        assert_eq!(a.limit(), 16);
        assert_eq!(a.backpressure_decreases(), 2);
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(60)).await;
            a.feedback(Instant::now(), Feedback::Backpressure);
        }
        assert_eq!(a.limit(), 1, "never below 1");
        assert!(a.has_room());
        a.acquire();
        assert!(!a.has_room());
    }

    #[tokio::test(start_paused = true)]
    async fn rising_rtt_decreases() {
        let mut a = Aimd::new(20, 100);
        run_rounds(&mut a, 3, Feedback::Ok(Duration::from_millis(5)));
        let before = a.limit();
        run_rounds(&mut a, 1, Feedback::Ok(Duration::from_millis(400)));
        assert!(a.limit() < before, "{} -> {}", before, a.limit());
    }

    #[test]
    fn classifies_outcomes() {
        let retry = |status| Outcome::Retry {
            reason: String::new(),
            status,
            retry_after: None,
        };
        assert_eq!(Feedback::of(&retry(429), RTT), Feedback::Backpressure);
        assert_eq!(Feedback::of(&retry(503), RTT), Feedback::Backpressure);
        assert_eq!(Feedback::of(&retry(500), RTT), Feedback::Neutral);
        let ok = Outcome::Delivered {
            provider_message_id: String::new(),
            status: 200,
        };
        assert_eq!(Feedback::of(&ok, RTT), Feedback::Ok(RTT));
    }
}
