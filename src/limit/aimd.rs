//! Adaptive concurrency for one (app, provider), in the manner of TCP congestion control and
//! Vector's adaptive request concurrency:
//!
//! - **Seeded** from what the provider's open connections can carry (their servers'
//!   SETTINGS_MAX_CONCURRENT_STREAMS summed), so the first round trip already fills them.
//! - **Slow start**: while nothing pushed back, every answered request of a full window adds
//!   one, so the limit doubles per round trip; at 200 ms a limit of thousands is reached in a
//!   second or two, not minutes. The first back-pressure or RTT rise ends slow start.
//! - **Recovery and probing** (as BIC/CUBIC, not Reno): after a cut the limit climbs back half
//!   the way to where it was cut per round trip, then probes above it by an eighth per round
//!   trip. Reno's one more per round trip would need 10 minutes at 200 ms to win back a
//!   halving of 6,000; this needs a few round trips, so a burst of 429s costs a second, not
//!   the campaign.
//! - **Multiplicative decrease**, at most once per round trip: halved on back-pressure (HTTP 429
//!   / QUOTA_EXCEEDED / 503); on a round trip above three times the baseline, cut in
//!   proportion to the rise (a tenth just over it, half far over it), since that is often the
//!   gateway's own CPU at its limit, where the window should settle, not collapse.
//! - **Latency shifts are not congestion**: the round trip is measured on the wire (request
//!   leaving its stream to its answer, not time queued in the gateway), against a baseline that
//!   is the lowest RTT seen. When the RTT stays high though the cuts brought the limit to a
//!   quarter, the load was not the cause (the provider moved farther away): the high RTT
//!   becomes the new baseline and the limit goes back to where it was before the cuts.
//!
//! The limit never exceeds the configured ceiling nor what the provider's pool can carry at
//! most. The controller is plain state with time passed in, so it is tested on scheduled
//! instants.

use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::domain::Outcome;
use crate::provider::Capacity;

/// Fast RTT average weight per sample (recent behaviour).
const FAST_ALPHA: f64 = 0.2;
/// RTT counts as rising when the fast average exceeds the baseline by this factor...
///
/// The wire round trip includes the time a busy gateway takes to read the answer, and that
/// delay is shared by every (app, provider): measured at 200 ms, a gateway at its CPU limit
/// sees about 2.1 times the baseline on every pair, whatever each pair's own window. A factor
/// of 2 then cut every window, the small ones most, down to a fraction of the CPU's rate; 3
/// leaves that to the CPU and still catches a provider that slows down under our load.
const RTT_RISE_FACTOR: f64 = 3.0;
/// ...and by at least this much (ignores jitter and scheduling delay on short round trips).
const RTT_RISE_SLACK: f64 = 0.05;
/// A rise counts as over once the fast average is back under this factor of the baseline.
const RTT_RECOVERED_FACTOR: f64 = 2.0;
/// Samples before RTT may cause a decrease.
const RTT_WARMUP_SAMPLES: u32 = 20;
/// An RTT still high after RTT-caused cuts brought the limit down by this factor is taken as
/// the new baseline.
const REBASELINE_REDUCTION: f64 = 4.0;
/// The gentlest RTT-caused cut (a round trip just over the threshold).
const MILDEST_RTT_CUT: f64 = 0.9;
/// Past the limit last cut, the limit grows by itself divided by this per round trip.
const PROBE_DIVISOR: f64 = 8.0;
/// After a decrease, further back-pressure within max(this, fast RTT) is the same episode.
const MIN_DECREASE_HOLD: Duration = Duration::from_millis(50);

/// What one finished provider request tells the controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feedback {
    /// The provider answered normally; the request was on the wire this long.
    Ok(Duration),
    /// The provider asked us to slow down (429, 503).
    Backpressure,
    /// Says nothing about load (a 500, a dropped connection, credentials, no request sent...).
    Neutral,
}

impl Feedback {
    /// Classifies a provider outcome; `round_trip` is `None` when no request reached the wire.
    pub fn of(outcome: &Outcome, round_trip: Option<Duration>) -> Self {
        match (outcome, round_trip) {
            (
                Outcome::Retry {
                    status: 429 | 503, ..
                },
                _,
            ) => Feedback::Backpressure,
            (Outcome::Retry { .. } | Outcome::Failed { .. }, _) | (_, None) => Feedback::Neutral,
            (
                Outcome::Delivered { .. } | Outcome::InvalidToken { .. } | Outcome::Rejected { .. },
                Some(rtt),
            ) => Feedback::Ok(rtt),
        }
    }
}

/// Adaptive concurrency limit with its in-flight count.
#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    /// The configured ceiling.
    max: f64,
    /// What the provider's pool can carry at most (0: unknown).
    pool_most: usize,
    slow_start: bool,
    /// The limit when it was last cut: recovery climbs back toward it.
    last_cut_from: f64,
    in_flight: usize,
    fast_rtt: Option<f64>,
    baseline_rtt: Option<f64>,
    samples: u32,
    last_decrease: Option<Instant>,
    /// RTT-caused cuts since the RTT was last back near the baseline.
    rtt_cuts: u32,
    /// The limit, and whether slow start was on, before the first of those cuts.
    limit_before_rtt_cuts: f64,
    slow_start_before_rtt_cuts: bool,
    backpressure_decreases: u64,
    rebaselines: u64,
}

impl Aimd {
    /// Starts at `initial` requests in flight, never above `max` nor below 1.
    pub fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1) as f64;
        Self {
            limit: (initial.max(1) as f64).min(max),
            max,
            pool_most: 0,
            slow_start: true,
            last_cut_from: 0.0,
            in_flight: 0,
            fast_rtt: None,
            baseline_rtt: None,
            samples: 0,
            last_decrease: None,
            rtt_cuts: 0,
            limit_before_rtt_cuts: 0.0,
            slow_start_before_rtt_cuts: false,
            backpressure_decreases: 0,
            rebaselines: 0,
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

    /// Times a lasting RTT rise was taken as a new baseline rather than congestion.
    #[cfg(test)]
    pub fn rebaselines(&self) -> u64 {
        self.rebaselines
    }

    /// True until the first back-pressure or RTT rise.
    #[cfg(test)]
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// The round-trip baseline, once measured.
    #[cfg(test)]
    pub fn baseline_rtt(&self) -> Option<Duration> {
        self.baseline_rtt.map(Duration::from_secs_f64)
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
        self.limit = self.limit.min(self.ceiling());
    }

    /// Tells the controller what the provider's connections carry: during slow start the limit
    /// is raised to what the open ones carry (a full first window), and it never exceeds what
    /// the pool can carry at most.
    pub fn capacity(&mut self, capacity: Capacity) {
        self.pool_most = capacity.most;
        let ceiling = self.ceiling();
        if self.slow_start {
            self.limit = self.limit.max(capacity.open as f64);
        }
        self.limit = self.limit.min(ceiling);
    }

    fn ceiling(&self) -> f64 {
        if self.pool_most == 0 {
            self.max
        } else {
            self.max.min(self.pool_most as f64).max(1.0)
        }
    }

    /// Adjusts the limit from a finished request, while it still counts as in flight.
    pub fn feedback(&mut self, now: Instant, feedback: Feedback) {
        match feedback {
            Feedback::Neutral => {}
            Feedback::Backpressure => {
                self.slow_start = false;
                if self.decrease(now, 0.5) {
                    self.backpressure_decreases += 1;
                    debug!(limit = self.limit(), "back-pressure: concurrency halved");
                }
            }
            Feedback::Ok(rtt) => {
                self.sample(rtt.as_secs_f64());
                if self.rtt_rising() {
                    self.on_rtt_rise(now);
                } else {
                    if self.rtt_recovered() {
                        self.rtt_cuts = 0;
                    }
                    if self.window_full() {
                        // The window was (about) full and latency held: each answer adds its
                        // share of the growth per round trip.
                        let step = if self.slow_start {
                            1.0
                        } else {
                            self.growth_per_round_trip() / self.limit
                        };
                        self.limit = (self.limit + step).min(self.ceiling());
                    }
                }
            }
        }
    }

    /// Outside slow start: half the way back to the limit last cut, then an eighth above it.
    fn growth_per_round_trip(&self) -> f64 {
        let gap = self.last_cut_from - self.limit;
        if gap > 1.0 {
            // At least half the probing pace, so the last stretch is not approached forever.
            (gap / 2.0).max(self.limit / (2.0 * PROBE_DIVISOR)).max(1.0)
        } else {
            (self.limit / PROBE_DIVISOR).max(1.0)
        }
    }

    /// True when the sender is using (nine tenths of) the window: requests released a moment
    /// ago may not have been replaced yet when the next answer arrives.
    fn window_full(&self) -> bool {
        self.in_flight * 10 >= self.limit() * 9
    }

    fn sample(&mut self, rtt: f64) {
        let fast = match self.fast_rtt {
            Some(a) => a + FAST_ALPHA * (rtt - a),
            None => rtt,
        };
        self.fast_rtt = Some(fast);
        // The baseline only falls: a window kept just under the threshold holds the round trip
        // above the true minimum, and a baseline drifting up toward it would let the gateway's
        // own queue grow without end. A provider that really moved away is found by
        // `on_rtt_rise` instead.
        self.baseline_rtt = Some(self.baseline_rtt.map_or(fast, |base| base.min(fast)));
        self.samples = self.samples.saturating_add(1);
    }

    fn rtt_rising(&self) -> bool {
        match (self.fast_rtt, self.baseline_rtt) {
            (Some(fast), Some(base)) => {
                self.samples >= RTT_WARMUP_SAMPLES
                    && fast > base * RTT_RISE_FACTOR
                    && fast - base > RTT_RISE_SLACK
            }
            _ => false,
        }
    }

    fn rtt_recovered(&self) -> bool {
        match (self.fast_rtt, self.baseline_rtt) {
            (Some(fast), Some(base)) => fast <= base * RTT_RECOVERED_FACTOR,
            _ => true,
        }
    }

    /// Cuts for a rising RTT, in proportion to the rise: a round trip just over the threshold
    /// trims a tenth, one far over it halves. (A rising round trip is a soft signal, often the
    /// gateway's own CPU at its limit; halving on it would leave the window below what the
    /// round trip needs. Back-pressure, the provider's explicit signal, always halves.) When
    /// the RTT stays high though the limit fell to a quarter of where the rise began, the load
    /// was not the cause (the provider moved farther away): the RTT becomes the baseline and
    /// the limit goes back.
    fn on_rtt_rise(&mut self, now: Instant) {
        let before = self.limit;
        if self.rtt_cuts > 0 && self.limit * REBASELINE_REDUCTION <= self.limit_before_rtt_cuts {
            if !self.may_decrease(now) {
                return;
            }
            self.baseline_rtt = self.fast_rtt;
            self.limit = self.limit_before_rtt_cuts.min(self.ceiling());
            self.slow_start = self.slow_start_before_rtt_cuts;
            self.rtt_cuts = 0;
            self.rebaselines += 1;
            self.last_decrease = Some(now);
            debug!(
                limit = self.limit(),
                "round trip stayed high: taken as the new baseline"
            );
            return;
        }
        let factor = match (self.fast_rtt, self.baseline_rtt) {
            (Some(fast), Some(base)) if fast > 0.0 => {
                (RTT_RISE_FACTOR * base / fast).clamp(0.5, MILDEST_RTT_CUT)
            }
            _ => 0.5,
        };
        if !self.decrease(now, factor) {
            return;
        }
        if self.rtt_cuts == 0 {
            self.limit_before_rtt_cuts = before;
            self.slow_start_before_rtt_cuts = self.slow_start;
        }
        self.slow_start = false;
        self.rtt_cuts += 1;
        debug!(
            limit = self.limit(),
            fast_rtt_ms = self.fast_rtt.unwrap_or(0.0) * 1e3,
            baseline_rtt_ms = self.baseline_rtt.unwrap_or(0.0) * 1e3,
            cuts = self.rtt_cuts,
            "round trip rising: concurrency cut"
        );
    }

    /// False within a round trip of the last cut: its effect is not visible yet.
    fn may_decrease(&self, now: Instant) -> bool {
        let hold = MIN_DECREASE_HOLD.max(Duration::from_secs_f64(self.fast_rtt.unwrap_or(0.0)));
        self.last_decrease.is_none_or(|t| now >= t + hold)
    }

    /// Multiplies the limit by `factor` unless it was cut within the last round trip; true
    /// when it did.
    fn decrease(&mut self, now: Instant, factor: f64) -> bool {
        if !self.may_decrease(now) {
            return false;
        }
        self.last_cut_from = self.limit;
        self.limit = (self.limit * factor).max(1.0);
        self.last_decrease = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(10);

    /// A busy sender for `rounds` round trips: every request in flight is answered with
    /// `feedback` after `rtt`, and each answer is replaced at once while the window has room
    /// (the replacements are answered in the next round).
    async fn run_rounds(a: &mut Aimd, rounds: usize, rtt: Duration, feedback: Feedback) {
        while a.has_room() {
            a.acquire();
        }
        for _ in 0..rounds {
            tokio::time::advance(rtt).await;
            for _ in 0..a.in_flight() {
                a.feedback(Instant::now(), feedback);
                a.release();
                while a.has_room() {
                    a.acquire();
                }
            }
        }
    }

    fn ok(rtt: Duration) -> Feedback {
        Feedback::Ok(rtt)
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_doubles_per_round_trip_up_to_max() {
        let mut a = Aimd::new(10, 100_000);
        run_rounds(&mut a, 1, RTT, ok(RTT)).await;
        assert_eq!(a.limit(), 20);
        run_rounds(&mut a, 3, RTT, ok(RTT)).await;
        assert_eq!(a.limit(), 160);
        assert!(a.in_slow_start());
        run_rounds(&mut a, 20, RTT, ok(RTT)).await;
        assert_eq!(a.limit(), 100_000, "capped at max");
    }

    #[tokio::test(start_paused = true)]
    async fn after_backpressure_recovers_within_a_few_round_trips_then_probes() {
        let mut a = Aimd::new(6_400, 100_000);
        a.feedback(Instant::now(), Feedback::Backpressure);
        assert!(!a.in_slow_start());
        assert_eq!(a.limit(), 3_200);
        // About half the gap back per round trip (each answer closes its share of what is
        // left, so a little less): 3,200 -> ~4,300 -> ... -> ~6,300.
        run_rounds(&mut a, 1, RTT, ok(RTT)).await;
        assert!((4_000..=4_900).contains(&a.limit()), "{}", a.limit());
        run_rounds(&mut a, 4, RTT, ok(RTT)).await;
        assert!((6_000..=7_000).contains(&a.limit()), "{}", a.limit());
        // Then above the old limit, by about an eighth per round trip.
        run_rounds(&mut a, 4, RTT, ok(RTT)).await;
        let probed = a.limit();
        assert!((7_000..=11_000).contains(&probed), "{probed}");
        assert!(!a.in_slow_start());
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_grow_when_the_window_is_not_used() {
        let mut a = Aimd::new(4, 10);
        for _ in 0..50 {
            a.acquire();
            a.feedback(Instant::now(), ok(RTT));
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
    async fn a_short_rtt_rise_is_congestion_and_cuts() {
        let base = Duration::from_millis(5);
        let mut a = Aimd::new(200, 1_000);
        run_rounds(&mut a, 3, base, ok(base)).await;
        let before = a.limit();
        // One round trip of high latency, then back to normal: a single halving, kept.
        run_rounds(
            &mut a,
            1,
            Duration::from_millis(400),
            ok(Duration::from_millis(400)),
        )
        .await;
        assert!(a.limit() <= before / 2, "{before} -> {}", a.limit());
        assert!(!a.in_slow_start());
        run_rounds(&mut a, 20, base, ok(base)).await;
        assert_eq!(a.rebaselines(), 0, "a passing rise is not a new baseline");
        assert!(
            a.baseline_rtt()
                .is_some_and(|b| b < Duration::from_millis(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_latency_shift_becomes_the_new_baseline() {
        let near = Duration::from_millis(20);
        let far = Duration::from_millis(1_000);
        let mut a = Aimd::new(100, 100_000);
        run_rounds(&mut a, 4, near, ok(near)).await;
        let before = a.limit();
        // The provider is now 1 s away and stays there, whatever we send.
        run_rounds(&mut a, 6, far, ok(far)).await;
        assert_eq!(a.rebaselines(), 1);
        let baseline = a.baseline_rtt().unwrap_or_default();
        assert!(baseline > Duration::from_millis(500), "{baseline:?}");
        assert!(a.limit() >= before, "restored: {before} -> {}", a.limit());
        // And it keeps growing at the new latency instead of cutting again.
        let restored = a.limit();
        run_rounds(&mut a, 5, far, ok(far)).await;
        assert!(a.limit() > restored, "{restored} -> {}", a.limit());
        assert_eq!(a.rebaselines(), 1);
    }

    /// A sender whose own CPU is the bottleneck: 10,000 requests/s at most, so past 2,000 in
    /// flight at 200 ms the round trip grows with the window. The limit must settle where the
    /// CPU is kept busy (at least 0.9 of it), without taking its own queueing for a new
    /// baseline (which would let the queue grow without end).
    #[tokio::test(start_paused = true)]
    async fn settles_at_the_cpu_limit_without_collapsing_or_bloating() {
        let base = Duration::from_millis(200);
        let per_second = 10_000.0;
        let round_trip =
            |window: usize| base.max(Duration::from_secs_f64(window as f64 / per_second));
        let mut a = Aimd::new(100, 100_000);
        let mut lowest = usize::MAX;
        let mut highest = 0;
        for round in 0..120 {
            let rtt = round_trip(a.limit());
            run_rounds(&mut a, 1, rtt, ok(rtt)).await;
            if round >= 40 {
                lowest = lowest.min(a.limit());
                highest = highest.max(a.limit());
            }
        }
        assert_eq!(
            a.rebaselines(),
            0,
            "its own queueing taken for a farther provider"
        );
        assert!(lowest >= 1_800, "window fell to {lowest}: the CPU idles");
        assert!(
            highest <= 8_000,
            "window grew to {highest}: a queue of 4 round trips"
        );
        assert!(
            a.baseline_rtt()
                .is_some_and(|b| b < Duration::from_millis(250)),
            "{:?}",
            a.baseline_rtt()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_seeds_slow_start_and_caps_the_limit() {
        let mut a = Aimd::new(100, 25_000);
        a.capacity(Capacity {
            open: 2_000,
            most: 20_000,
        });
        assert_eq!(a.limit(), 2_000, "seeded from the open connections");
        run_rounds(&mut a, 10, RTT, ok(RTT)).await;
        assert_eq!(a.limit(), 20_000, "never above what the pool can carry");
        a.feedback(Instant::now(), Feedback::Backpressure);
        a.capacity(Capacity {
            open: 20_000,
            most: 20_000,
        });
        assert_eq!(a.limit(), 10_000, "no re-seeding after back-pressure");
        a.set_max(500);
        assert_eq!(a.limit(), 500);
    }

    #[test]
    fn classifies_outcomes() {
        let retry = |status| Outcome::Retry {
            reason: String::new(),
            status,
            retry_after: None,
        };
        assert_eq!(Feedback::of(&retry(429), Some(RTT)), Feedback::Backpressure);
        assert_eq!(Feedback::of(&retry(503), None), Feedback::Backpressure);
        assert_eq!(Feedback::of(&retry(500), Some(RTT)), Feedback::Neutral);
        let ok = Outcome::Delivered {
            provider_message_id: String::new(),
            status: 200,
        };
        assert_eq!(Feedback::of(&ok, Some(RTT)), Feedback::Ok(RTT));
        assert_eq!(
            Feedback::of(&ok, None),
            Feedback::Neutral,
            "nothing went out"
        );
    }
}
