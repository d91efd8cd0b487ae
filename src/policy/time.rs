//! Wall-clock time in a recipient's own time zone: quiet-hours windows and the next occurrence
//! of a local time, correct across daylight-saving changes.
//!
//! Built on `jiff`: IANA zones with the tz database bundled into the binary (so a distroless
//! image without `/usr/share/zoneinfo` still knows every zone), and DST handled by its
//! "compatible" disambiguation: a local time that does not exist (the spring-forward gap) is
//! taken after the gap, one that happens twice (the fall-back fold) at its first occurrence.
//! Everything here is a pure function of an instant, so the DST cases are unit-tested on fixed
//! instants.

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A wall-clock time of day, `HH:MM` (24-hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Clock {
    pub hour: i8,
    pub minute: i8,
}

impl Clock {
    /// Parses `HH:MM` (00:00 to 23:59).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a time of day as HH:MM (00:00 to 23:59)");
        let (h, m) = text.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let hour: i8 = h.parse().map_err(|_| bad())?;
        let minute: i8 = m.parse().map_err(|_| bad())?;
        if !(0..24).contains(&hour) || !(0..60).contains(&minute) {
            return Err(bad());
        }
        Ok(Self { hour, minute })
    }

    fn time(self) -> Time {
        Time::constant(self.hour, self.minute, 0, 0)
    }
}

/// Looks up an IANA zone name (`Europe/Paris`); `None` when the database has no such zone.
pub fn zone(name: &str) -> Option<TimeZone> {
    TimeZone::get(name).ok()
}

/// A daily window of local time, `[start, end)`; it wraps midnight when `end` is earlier than
/// `start` (22:00 to 08:00). `start == end` is an empty window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Clock,
    pub end: Clock,
}

impl Window {
    /// Whether the local time of day `t` is inside the window.
    fn contains(&self, t: Clock) -> bool {
        if self.start <= self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// When `now` falls inside the window in `tz`: the instant the window ends (the next
    /// occurrence of `end` in local time). `None` outside the window.
    pub fn ends_after(&self, now: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = now.to_zoned(tz.clone());
        let t = Clock {
            hour: local.hour(),
            minute: local.minute(),
        };
        if !self.contains(t) {
            return None;
        }
        // Inside a wrapping window after midnight, or a plain window: the end is today;
        // inside a wrapping window before midnight: tomorrow.
        let day = if t < self.end {
            local.date()
        } else {
            local.date().tomorrow().ok()?
        };
        let end = at(day, self.end, tz)?;
        // A DST gap can put "today at end" at or before now (the end time does not exist
        // today and is taken after the gap): the window is over.
        (end > now).then_some(end)
    }
}

/// The instant of local time `clock` on `day` in `tz`, DST-disambiguated as the module says.
pub fn at(day: Date, clock: Clock, tz: &TimeZone) -> Option<Timestamp> {
    let local = day.to_datetime(clock.time());
    tz.to_ambiguous_zoned(local)
        .compatible()
        .ok()
        .map(|z| z.timestamp())
}

/// The next instant, at or after `now`, whose local time in `tz` is `clock` (today if it has
/// not passed, else tomorrow). With `late_sends_now`, a time already past today is `now`.
pub fn next_local(
    now: Timestamp,
    tz: &TimeZone,
    clock: Clock,
    late_sends_now: bool,
) -> Option<Timestamp> {
    let today = now.to_zoned(tz.clone()).date();
    let t = at(today, clock, tz)?;
    if t >= now {
        return Some(t);
    }
    if late_sends_now {
        return Some(now);
    }
    at(today.checked_add(1.day()).ok()?, clock, tz)
}

/// The instant within the next 24 hours to send at, by `weights` of the hours of the week in
/// `tz` (see `crate::store::send_time`): the start of the local hour of highest weight (the
/// earliest of equals), or `now` when that is the current hour. `None` when every weight of the
/// coming 24 hours is zero. Hours are stepped in absolute time, so across a DST change the
/// day has 23 or 25 local hours and each is looked up as it is.
pub fn best_hour(
    now: Timestamp,
    tz: &TimeZone,
    weights: &[f64; crate::store::send_time::HOURS_OF_WEEK],
) -> Option<Timestamp> {
    let local = now.to_zoned(tz.clone());
    let hour_start = local
        .with()
        .minute(0)
        .second(0)
        .subsec_nanosecond(0)
        .build()
        .ok()?
        .timestamp()
        .min(now);
    let mut best: Option<(f64, Timestamp)> = None;
    for k in 0..24i64 {
        let slot = hour_start
            .checked_add(jiff::SignedDuration::from_hours(k))
            .ok()?;
        let w = weights[crate::store::send_time::hour_of_week(millis(slot), tz)];
        if w > 0.0 && best.is_none_or(|(top, _)| w > top) {
            best = Some((w, slot.max(now)));
        }
    }
    best.map(|(_, at)| at)
}

/// Milliseconds since the Unix epoch of a timestamp.
pub fn millis(t: Timestamp) -> i64 {
    t.as_millisecond()
}

/// The timestamp of epoch milliseconds (clamped to jiff's range).
pub fn from_millis(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn clock(text: &str) -> Clock {
        Clock::parse(text).unwrap()
    }

    fn quiet(start: &str, end: &str) -> Window {
        Window {
            start: clock(start),
            end: clock(end),
        }
    }

    #[test]
    fn clocks_parse_strictly() {
        assert_eq!(clock("08:05"), Clock { hour: 8, minute: 5 });
        for bad in ["8:05", "24:00", "12:60", "12-00", "", "ab:cd", "12:5"] {
            assert!(Clock::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_zones_are_not_found() {
        assert!(zone("Europe/Paris").is_some());
        assert!(zone("America/New_York").is_some());
        assert!(zone("Mars/Olympus_Mons").is_none());
    }

    #[test]
    fn a_window_that_wraps_midnight() {
        let paris = zone("Europe/Paris").unwrap();
        let w = quiet("22:00", "08:00");
        // 23:30 in Paris (CET, UTC+1) in January: quiet until 08:00 the next morning.
        assert_eq!(
            w.ends_after(ts("2026-01-15T22:30:00Z"), &paris),
            Some(ts("2026-01-16T07:00:00Z"))
        );
        // 03:00 local: quiet until 08:00 the same day.
        assert_eq!(
            w.ends_after(ts("2026-01-16T02:00:00Z"), &paris),
            Some(ts("2026-01-16T07:00:00Z"))
        );
        // 08:00 and 21:59 local are outside.
        assert_eq!(w.ends_after(ts("2026-01-16T07:00:00Z"), &paris), None);
        assert_eq!(w.ends_after(ts("2026-01-16T20:59:00Z"), &paris), None);
        // A plain window (13:00-14:00) and an empty one.
        let lunch = quiet("13:00", "14:00");
        assert_eq!(
            lunch.ends_after(ts("2026-01-16T12:30:00Z"), &paris),
            Some(ts("2026-01-16T13:00:00Z"))
        );
        assert_eq!(lunch.ends_after(ts("2026-01-16T13:00:00Z"), &paris), None);
        assert_eq!(
            quiet("09:00", "09:00").ends_after(ts("2026-01-16T08:00:00Z"), &paris),
            None
        );
    }

    #[test]
    fn the_same_local_window_moves_in_utc_across_dst() {
        let paris = zone("Europe/Paris").unwrap();
        let w = quiet("22:00", "08:00");
        // Paris moves to CEST (UTC+2) on 2026-03-29 at 02:00 local. A night that spans the
        // change ends at 08:00 CEST = 06:00 UTC, not 07:00 UTC as the night before.
        assert_eq!(
            w.ends_after(ts("2026-03-28T22:00:00Z"), &paris),
            Some(ts("2026-03-29T06:00:00Z"))
        );
        assert_eq!(
            w.ends_after(ts("2026-03-27T22:00:00Z"), &paris),
            Some(ts("2026-03-28T07:00:00Z"))
        );
        // 21:30 UTC on the 28th is 22:30 CET: quiet. 20:30 UTC on the 29th is 22:30 CEST too.
        assert!(w.ends_after(ts("2026-03-28T21:30:00Z"), &paris).is_some());
        assert!(w.ends_after(ts("2026-03-29T20:30:00Z"), &paris).is_some());
        // 20:30 UTC on the 28th is 21:30 CET: not yet quiet.
        assert!(w.ends_after(ts("2026-03-28T20:30:00Z"), &paris).is_none());
    }

    #[test]
    fn a_window_ending_in_a_dst_gap_ends_after_the_gap() {
        // New York springs forward on 2026-03-08: 02:00-03:00 local does not exist.
        let ny = zone("America/New_York").unwrap();
        let w = quiet("22:00", "02:30");
        // 01:30 EST (06:30 UTC): quiet; 02:30 does not exist, so the window ends at 03:30 EDT
        // (the compatible reading: the gap's length later), 07:30 UTC.
        assert_eq!(
            w.ends_after(ts("2026-03-08T06:30:00Z"), &ny),
            Some(ts("2026-03-08T07:30:00Z"))
        );
    }

    #[test]
    fn the_best_hour_is_the_heaviest_of_the_next_24_in_local_time() {
        use crate::store::send_time::HOURS_OF_WEEK;
        let kolkata = zone("Asia/Kolkata").unwrap();
        // Monday 2026-06-08 10:20 in Kolkata (04:50 UTC).
        let now = ts("2026-06-08T04:50:00Z");
        let mut w = [0.0; HOURS_OF_WEEK];
        // Monday 15:00 local weighs most; Tuesday 15:00 (beyond 24 h) would weigh more.
        w[15] = 2.0;
        w[24 + 15] = 9.0;
        w[12] = 1.0;
        assert_eq!(
            best_hour(now, &kolkata, &w),
            Some(ts("2026-06-08T09:30:00Z"))
        );
        // The current hour wins: now, not its start.
        w[10] = 5.0;
        assert_eq!(best_hour(now, &kolkata, &w), Some(now));
        // Tuesday 09:00 local (within 24 h) beats everything today.
        w[24 + 9] = 7.0;
        assert_eq!(
            best_hour(now, &kolkata, &w),
            Some(ts("2026-06-09T03:30:00Z"))
        );
        // Equal weights: the earliest.
        let mut even = [1.0; HOURS_OF_WEEK];
        even[10] = 0.0;
        assert_eq!(
            best_hour(now, &kolkata, &even),
            Some(ts("2026-06-08T05:30:00Z"))
        );
        assert_eq!(best_hour(now, &kolkata, &[0.0; HOURS_OF_WEEK]), None);
    }

    #[test]
    fn the_best_hour_across_a_dst_change() {
        use crate::store::send_time::HOURS_OF_WEEK;
        let paris = zone("Europe/Paris").unwrap();
        // Saturday 2026-03-28 12:00 CET. Sunday 09:00 local is after the change: 07:00 UTC.
        let now = ts("2026-03-28T11:00:00Z");
        let mut w = [0.0; HOURS_OF_WEEK];
        w[6 * 24 + 9] = 1.0;
        assert_eq!(best_hour(now, &paris, &w), Some(ts("2026-03-29T07:00:00Z")));
    }

    #[test]
    fn next_local_time_is_today_tomorrow_or_now() {
        let paris = zone("Europe/Paris").unwrap();
        let nine = clock("09:00");
        // 07:00 local: 09:00 today.
        assert_eq!(
            next_local(ts("2026-06-10T05:00:00Z"), &paris, nine, false),
            Some(ts("2026-06-10T07:00:00Z"))
        );
        // 10:00 local: tomorrow, or now when late sends go now.
        assert_eq!(
            next_local(ts("2026-06-10T08:00:00Z"), &paris, nine, false),
            Some(ts("2026-06-11T07:00:00Z"))
        );
        assert_eq!(
            next_local(ts("2026-06-10T08:00:00Z"), &paris, nine, true),
            Some(ts("2026-06-10T08:00:00Z"))
        );
    }

    #[test]
    fn next_local_time_across_dst_changes() {
        let paris = zone("Europe/Paris").unwrap();
        let nine = clock("09:00");
        // Saturday 2026-03-28 at 10:00 CET: the next 09:00 is Sunday, after the change to
        // CEST, so 07:00 UTC (not 08:00, which a fixed 24 h later would give).
        assert_eq!(
            next_local(ts("2026-03-28T09:00:00Z"), &paris, nine, false),
            Some(ts("2026-03-29T07:00:00Z"))
        );
        // Fall back on 2026-10-25: Saturday 10:00 CEST, next 09:00 is 08:00 UTC (CET).
        assert_eq!(
            next_local(ts("2026-10-24T08:00:00Z"), &paris, nine, false),
            Some(ts("2026-10-25T08:00:00Z"))
        );
        // 02:30 on the fall-back night happens twice: the first one (CEST, 00:30 UTC).
        assert_eq!(
            next_local(ts("2026-10-24T22:00:00Z"), &paris, clock("02:30"), false),
            Some(ts("2026-10-25T00:30:00Z"))
        );
        // 02:30 on the spring-forward night does not exist: 03:30 CEST (01:30 UTC).
        assert_eq!(
            next_local(ts("2026-03-28T22:00:00Z"), &paris, clock("02:30"), false),
            Some(ts("2026-03-29T01:30:00Z"))
        );
    }
}
