//! The open-time histograms behind send-time optimization (`send_time = OPTIMAL`): for each
//! user, and for each app's whole population, how much it opened in each of the 168 hours of
//! the week, with older opens weighing less.
//!
//! # Model
//! An open at instant `t` adds `2^((t - now) / HALF_LIFE)` to the bucket of its hour of the week
//! (Monday 00:00-00:59 is bucket 0) in the user's zone: an open today weighs 1, one
//! [`HALF_LIFE_MS`] ago (28 days) 0.5, one 56 days ago 0.25. So a habit that changed is
//! forgotten in a few weeks, and each histogram is a handful of numbers whatever the number of
//! opens. A user's own histogram is used once it holds [`MIN_USER_OPENS`] opens' worth of
//! weight; until then the app's population histogram (every user's opens together); an app
//! without any is sent now.
//!
//! Weights are stored against a reference instant instead of being decayed on every open (which
//! would rewrite every bucket): an open at `t` adds `2^((t - reference) / HALF_LIFE)`, and a
//! reader multiplies by `2^((reference - now) / HALF_LIFE)`. The reference moves forward (every
//! weight rescaled once) only when an open is more than [`REBASE_HALF_LIVES`] half-lives after
//! it, so stored weights stay below `2^16` times the number of opens.
//!
//! Bounded: memory keeps the histograms of at most `max_exposures` users (the oldest first
//! seen go first) and Redis one hash per user that expires [`TTL_HALF_LIVES`] half-lives after
//! its last open (its weight is then 1/16 of what it was).

use std::collections::HashMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Buckets of a histogram: the hours of a week.
pub const HOURS_OF_WEEK: usize = 168;
/// The weight of an open halves every 28 days.
pub const HALF_LIFE_MS: i64 = 28 * 86_400_000;
/// A user's own histogram is used once its opens weigh this much (3 opens today, or 6 opens of
/// four weeks ago); below it, the population's.
pub const MIN_USER_OPENS: f64 = 3.0;
/// The reference instant moves when an open is this many half-lives after it.
pub const REBASE_HALF_LIVES: i64 = 16;
/// A user's histogram in Redis expires this many half-lives after its last open.
pub const TTL_HALF_LIVES: i64 = 4;

/// The bucket of instant `at_ms` in `zone`: its weekday (Monday first) times 24 plus its hour.
pub fn hour_of_week(at_ms: i64, zone: &TimeZone) -> usize {
    let t = Timestamp::from_millisecond(at_ms).unwrap_or(Timestamp::UNIX_EPOCH);
    let local = t.to_zoned(zone.clone());
    let day = usize::try_from(local.weekday().to_monday_zero_offset()).unwrap_or(0);
    let hour = usize::try_from(local.hour()).unwrap_or(0);
    (day * 24 + hour) % HOURS_OF_WEEK
}

/// `2^((to - from) / HALF_LIFE)`: how much an open at `to` weighs against one at `from`.
pub fn growth(from_ms: i64, to_ms: i64) -> f64 {
    ((to_ms as f64 - from_ms as f64) / HALF_LIFE_MS as f64).exp2()
}

/// A decayed histogram of opens by hour of the week. See the module docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// The instant the stored weights are relative to.
    pub reference_ms: i64,
    /// (bucket, weight at `reference_ms`), only buckets with opens, in no order.
    pub weights: Vec<(u8, f64)>,
}

impl Histogram {
    /// True when no open was ever added.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Adds an open at `at_ms` in `bucket`.
    pub fn add(&mut self, bucket: usize, at_ms: i64) {
        if self.weights.is_empty() {
            self.reference_ms = at_ms;
        } else if at_ms.saturating_sub(self.reference_ms) > REBASE_HALF_LIVES * HALF_LIFE_MS {
            let factor = growth(at_ms, self.reference_ms);
            for (_, w) in &mut self.weights {
                *w *= factor;
            }
            self.reference_ms = at_ms;
        }
        let bucket = u8::try_from(bucket % HOURS_OF_WEEK).unwrap_or(0);
        let w = growth(self.reference_ms, at_ms);
        match self.weights.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, known)) => *known += w,
            None => self.weights.push((bucket, w)),
        }
    }

    /// The weights decayed to `now_ms`, by bucket.
    pub fn at(&self, now_ms: i64) -> [f64; HOURS_OF_WEEK] {
        let mut out = [0.0; HOURS_OF_WEEK];
        let factor = growth(now_ms, self.reference_ms);
        for &(b, w) in &self.weights {
            if let Some(slot) = out.get_mut(usize::from(b)) {
                *slot += w * factor;
            }
        }
        out
    }

    /// Every open's weight at `now_ms` together.
    pub fn total(&self, now_ms: i64) -> f64 {
        let factor = growth(now_ms, self.reference_ms);
        self.weights.iter().map(|&(_, w)| w * factor).sum()
    }

    /// The histogram a Redis hash holds (`r` the reference, each bucket number its weight);
    /// fields that do not parse are skipped.
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        let Some(reference_ms) = fields.get("r").and_then(|r| r.parse::<f64>().ok()) else {
            return Self::default();
        };
        let weights = fields
            .iter()
            .filter_map(|(k, v)| {
                let b: u8 = k.parse().ok()?;
                let w: f64 = v.parse().ok()?;
                (usize::from(b) < HOURS_OF_WEEK && w.is_finite() && w > 0.0).then_some((b, w))
            })
            .collect();
        Self {
            reference_ms: reference_ms as i64,
            weights,
        }
    }
}

/// What the send-time choice reads for one chunk of messages: the app's population histogram
/// and the histograms of the chunk's users (absent: no opens known).
#[derive(Debug, Clone, Default)]
pub struct OpenHistograms {
    pub population: Histogram,
    pub users: HashMap<String, Histogram>,
}

impl OpenHistograms {
    /// The weights to choose `user`'s send time by, at `now_ms`: its own once it has
    /// [`MIN_USER_OPENS`], else the population's; `None` when neither has any open.
    pub fn weights_for(&self, user: &str, now_ms: i64) -> Option<[f64; HOURS_OF_WEEK]> {
        if let Some(own) = self.users.get(user)
            && own.total(now_ms) >= MIN_USER_OPENS
        {
            return Some(own.at(now_ms));
        }
        (!self.population.is_empty()).then(|| self.population.at(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn an_open_halves_its_weight_every_half_life() {
        let now = 1_800_000_000_000;
        let mut h = Histogram::default();
        h.add(5, now - HALF_LIFE_MS);
        h.add(5, now);
        h.add(7, now - 2 * HALF_LIFE_MS);
        let w = h.at(now);
        assert!((w[5] - 1.5).abs() < 1e-12, "{}", w[5]);
        assert!((w[7] - 0.25).abs() < 1e-12, "{}", w[7]);
        assert!((h.total(now) - 1.75).abs() < 1e-12);
        // Read a half-life later, everything weighs half.
        assert!((h.total(now + HALF_LIFE_MS) - 0.875).abs() < 1e-12);
    }

    #[test]
    fn moving_the_reference_changes_no_decayed_weight() {
        let start = 1_700_000_000_000;
        let mut h = Histogram::default();
        h.add(1, start);
        // Far past the rebase distance: the reference moves, the decayed weights stay exact.
        let later = start + (REBASE_HALF_LIVES + 3) * HALF_LIFE_MS;
        h.add(2, later);
        assert_eq!(h.reference_ms, later);
        let w = h.at(later);
        assert!((w[2] - 1.0).abs() < 1e-12);
        let expected = 0.5f64.powi(i32::try_from(REBASE_HALF_LIVES + 3).unwrap());
        assert!((w[1] - expected).abs() < 1e-15, "{} {}", w[1], expected);
        // Stored weights stay small.
        assert!(h.weights.iter().all(|&(_, w)| w <= 1.0));
    }

    #[test]
    fn hours_of_the_week_are_local() {
        // 2026-06-08 is a Monday. 06:30 UTC is 12:00 in Kolkata (UTC+5:30) and 08:30 in Paris.
        let at: Timestamp = "2026-06-08T06:30:00Z".parse().unwrap();
        let ms = at.as_millisecond();
        assert_eq!(hour_of_week(ms, &TimeZone::UTC), 6);
        assert_eq!(
            hour_of_week(ms, &TimeZone::get("Asia/Kolkata").unwrap()),
            12
        );
        assert_eq!(hour_of_week(ms, &TimeZone::get("Europe/Paris").unwrap()), 8);
        // Sunday 23:00 is the last bucket; the Monday after is 0 again.
        let sunday: Timestamp = "2026-06-14T23:10:00Z".parse().unwrap();
        assert_eq!(hour_of_week(sunday.as_millisecond(), &TimeZone::UTC), 167);
        assert_eq!(
            hour_of_week(sunday.as_millisecond() + 3_600_000, &TimeZone::UTC),
            0
        );
    }

    #[test]
    fn a_user_needs_enough_opens_before_its_own_histogram_counts() {
        let now = 1_800_000_000_000;
        let mut data = OpenHistograms::default();
        data.population.add(20, now - DAY);
        let mut own = Histogram::default();
        own.add(9, now - DAY);
        own.add(9, now - 2 * DAY);
        data.users.insert("u".into(), own.clone());
        // Two recent opens weigh less than three: the population decides.
        assert!(data.weights_for("u", now).unwrap()[20] > 0.0);
        own.add(9, now - 3 * DAY);
        own.add(9, now - 4 * DAY);
        data.users.insert("u".into(), own);
        let w = data.weights_for("u", now).unwrap();
        assert!(w[9] > 3.0 && w[20] == 0.0);
        // Unknown users get the population; without one, nothing.
        assert!(data.weights_for("x", now).unwrap()[20] > 0.0);
        assert!(OpenHistograms::default().weights_for("u", now).is_none());
    }

    #[test]
    fn redis_fields_read_back() {
        let fields: HashMap<String, String> = [
            ("r", "1700000000000"),
            ("3", "2.5"),
            ("167", "1"),
            ("168", "9"),
            ("x", "1"),
            ("4", "nan"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let h = Histogram::from_fields(&fields);
        assert_eq!(h.reference_ms, 1_700_000_000_000);
        let w = h.at(h.reference_ms);
        assert_eq!((w[3], w[167]), (2.5, 1.0));
        assert_eq!(h.weights.len(), 2);
        assert!(Histogram::from_fields(&HashMap::new()).is_empty());
    }
}
