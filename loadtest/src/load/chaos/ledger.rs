//! The three ledgers of a chaos run and their reconciliation: what callers were told was
//! accepted (per message, from `SendBatch` results), what the mocks received (per message, from
//! the device token of every 200 they answered), and what the receipts said (every terminal
//! receipt in the apps' Redis receipts streams).
//!
//! Messages are numbered `0..capacity`; message `n` has the id `c<n>`, and its device token
//! encodes `n` (see [`token_number`]), so each ledger is a flat array indexed by `n`.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

use super::super::env::{apns_token, fcm_token};

/// What the caller was told about message `n`.
pub const UNSENT: u8 = 0;
pub const ACCEPTED: u8 = 1;
pub const REFUSED: u8 = 2;
/// The call failed without an answer (the replica died mid-call), or the gateway said the
/// accept may have been applied: unknown, not counted.
pub const UNKNOWN: u8 = 3;

/// Class bits of a message: what its terminal receipt may honestly say.
pub const DEAD: u8 = 1;
pub const CAPPED: u8 = 2;
pub const SCHEDULED: u8 = 4;

/// Receipt statuses (protobuf numbers).
pub const DELIVERED: u8 = 1;
pub const INVALID_TOKEN: u8 = 2;
pub const DROPPED: u8 = 6;

/// The message id of message `n`.
pub fn message_id(n: u64) -> String {
    format!("c{n}")
}

/// Message `n`'s number back from its id.
pub fn id_number(id: &str) -> Option<u64> {
    id.strip_prefix('c')?.parse().ok()
}

/// The device token of message `n`: APNs for even `n`, FCM for odd.
pub fn token(n: u64) -> String {
    if n.is_multiple_of(2) {
        apns_token(n)
    } else {
        fcm_token(n)
    }
}

/// Message `n`'s number back from its device token (either provider's shape).
pub fn token_number(token: &str) -> Option<u64> {
    if let Some(digits) = token.strip_prefix('d') {
        return digits.get(..10)?.parse().ok();
    }
    if token.len() == 64 {
        return u64::from_str_radix(token.get(48..)?, 16).ok();
    }
    None
}

/// A span of the run during which a fault was active, plus its settling time.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub kind: String,
    /// Milliseconds since the epoch.
    pub from_ms: i64,
    pub to_ms: i64,
}

/// The ledgers; shared by the senders, the mocks' observers and the receipts reader.
pub struct Ledger {
    told: Vec<AtomicU8>,
    class: Vec<AtomicU8>,
    delivered: Vec<AtomicU8>,
    receipts: Vec<AtomicU8>,
    status: Vec<AtomicU8>,
    conflicting: AtomicU64,
    /// Deliveries after the first: (message, epoch ms).
    repeats: Mutex<Vec<(u64, i64)>>,
    /// Terminal receipts after the first with the same status: (message, completed epoch ms).
    repeated_receipts: Mutex<Vec<(u64, i64)>>,
    /// Receipt latency (completed - accepted, ms) by the second of acceptance since `start_ms`.
    latency: Mutex<Vec<Histogram<u64>>>,
    pub start_ms: i64,
    /// Receipts whose message id is not one of ours (counted, not indexed).
    pub foreign: AtomicU64,
}

impl Ledger {
    pub fn new(capacity: u64, start_ms: i64) -> Self {
        let v = || (0..capacity).map(|_| AtomicU8::new(0)).collect::<Vec<_>>();
        Self {
            told: v(),
            class: v(),
            delivered: v(),
            receipts: v(),
            status: v(),
            conflicting: AtomicU64::new(0),
            repeats: Mutex::new(Vec::new()),
            repeated_receipts: Mutex::new(Vec::new()),
            latency: Mutex::new(Vec::new()),
            start_ms,
            foreign: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.told.len() as u64
    }

    pub fn set_class(&self, n: u64, class: u8) {
        if let Some(c) = self.class.get(n as usize) {
            c.store(class, Relaxed);
        }
    }

    pub fn told(&self, n: u64, what: u8) {
        if let Some(t) = self.told.get(n as usize) {
            t.store(what, Relaxed);
        }
    }

    pub fn accepted_count(&self) -> u64 {
        self.told
            .iter()
            .filter(|t| t.load(Relaxed) == ACCEPTED)
            .count() as u64
    }

    /// A mock answered 200 for `token`.
    pub fn delivered(&self, token: &str, now_ms: i64) {
        let Some(n) = token_number(token) else { return };
        let Some(d) = self.delivered.get(n as usize) else {
            return;
        };
        let before = d.fetch_add(1, Relaxed);
        if before == u8::MAX {
            d.store(u8::MAX, Relaxed);
        }
        if before >= 1 {
            self.repeats.lock().push((n, now_ms));
        }
    }

    /// A terminal receipt from a receipts stream.
    pub fn receipt(&self, message_id: &str, status: i32, accepted_ms: i64, completed_ms: i64) {
        let Some(n) = id_number(message_id).filter(|n| *n < self.capacity()) else {
            self.foreign.fetch_add(1, Relaxed);
            return;
        };
        let i = n as usize;
        let status = u8::try_from(status).unwrap_or(u8::MAX);
        let before = self.receipts[i].fetch_add(1, Relaxed);
        if before == 0 {
            self.status[i].store(status, Relaxed);
        } else {
            self.receipts[i].store(before.saturating_add(1), Relaxed);
            if self.status[i].load(Relaxed) != status {
                self.conflicting.fetch_add(1, Relaxed);
            } else {
                self.repeated_receipts.lock().push((n, completed_ms));
            }
            return;
        }
        if self.class[i].load(Relaxed) & SCHEDULED != 0 {
            return; // its latency is its schedule
        }
        let second = usize::try_from((accepted_ms - self.start_ms).max(0) / 1000).unwrap_or(0);
        let latency = u64::try_from((completed_ms - accepted_ms).max(1)).unwrap_or(1);
        let mut hists = self.latency.lock();
        while hists.len() <= second {
            match Histogram::new_with_bounds(1, 3_600_000, 2) {
                Ok(h) => hists.push(h),
                Err(_) => return,
            }
        }
        let _ = hists[second].record(latency.min(3_600_000));
    }

    /// Message numbers accepted and still without a terminal receipt.
    pub fn unfinished(&self) -> u64 {
        (0..self.told.len())
            .filter(|&i| {
                self.told[i].load(Relaxed) == ACCEPTED && self.receipts[i].load(Relaxed) == 0
            })
            .count() as u64
    }

    /// Reconciles the ledgers. `windows` are the fault windows (with their settling time).
    pub fn reconcile(&self, windows: &[Window]) -> Reconciled {
        let mut r = Reconciled::default();
        let in_window = |ms: i64| windows.iter().find(|w| w.from_ms <= ms && ms <= w.to_ms);
        for i in 0..self.told.len() {
            let told = self.told[i].load(Relaxed);
            match told {
                ACCEPTED => r.accepted += 1,
                REFUSED => r.refused += 1,
                UNKNOWN => r.unknown += 1,
                _ => continue,
            }
            let delivered = self.delivered[i].load(Relaxed);
            if told != ACCEPTED {
                if delivered > 0 && told == REFUSED {
                    r.delivered_not_accepted += 1;
                } else if delivered > 0 {
                    r.delivered_unknown += 1;
                }
                continue;
            }
            let class = self.class[i].load(Relaxed);
            let receipts = self.receipts[i].load(Relaxed);
            let status = self.status[i].load(Relaxed);
            if receipts == 0 {
                if delivered == 0 {
                    r.lost += 1;
                    r.lost_examples.push(message_id(i as u64));
                } else {
                    r.no_receipt += 1;
                }
                continue;
            }
            *r.statuses
                .entry(status_name(status).to_string())
                .or_default() += 1;
            let expected = match status {
                DELIVERED => true,
                INVALID_TOKEN => class & DEAD != 0,
                DROPPED => class & CAPPED != 0,
                _ => false,
            };
            if !expected {
                r.wrong_status += 1;
                if r.wrong_examples.len() < 10 {
                    r.wrong_examples.push(format!(
                        "{} {}",
                        message_id(i as u64),
                        status_name(status)
                    ));
                }
            }
            if status == DELIVERED && delivered == 0 {
                // A receipt that says delivered for a message no provider received.
                r.lost += 1;
                r.lost_examples.push(message_id(i as u64));
            }
            if delivered > 1 {
                r.duplicated_messages += 1;
            }
        }
        r.lost_examples.truncate(10);
        r.wrong_status += self.conflicting.load(Relaxed);
        for (n, at) in self.repeats.lock().iter() {
            if self.told.get(*n as usize).map(|t| t.load(Relaxed)) != Some(ACCEPTED) {
                continue;
            }
            r.duplicate_deliveries += 1;
            match in_window(*at) {
                Some(w) => *r.duplicates_by_fault.entry(w.kind.clone()).or_default() += 1,
                None => r.duplicates_outside_faults += 1,
            }
        }
        for (_, at) in self.repeated_receipts.lock().iter() {
            r.repeated_receipts += 1;
            if in_window(*at).is_none() {
                r.repeated_receipts_outside_faults += 1;
            }
        }
        let hists = self.latency.lock();
        let mut quiet = Histogram::<u64>::new_with_bounds(1, 3_600_000, 2).ok();
        let mut all = Histogram::<u64>::new_with_bounds(1, 3_600_000, 2).ok();
        for (second, h) in hists.iter().enumerate() {
            let from = self.start_ms + second as i64 * 1000;
            let faulty = windows
                .iter()
                .any(|w| w.from_ms <= from + 999 && from <= w.to_ms);
            if let Some(a) = all.as_mut() {
                let _ = a.add(h);
            }
            if !faulty && let Some(q) = quiet.as_mut() {
                let _ = q.add(h);
            }
        }
        let p = |h: &Option<Histogram<u64>>, q: f64| {
            h.as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(q))
        };
        r.receipts_outside_faults = quiet.as_ref().map_or(0, Histogram::len);
        r.p50_receipt_ms_outside_faults = p(&quiet, 0.5);
        r.p99_receipt_ms_outside_faults = p(&quiet, 0.99);
        r.p99_receipt_ms_all = p(&all, 0.99);
        r.foreign_receipts = self.foreign.load(Relaxed);
        r
    }
}

pub fn status_name(status: u8) -> &'static str {
    super::super::driver::STATUS_NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("OTHER")
}

/// The reconciled ledgers.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Reconciled {
    /// Messages callers were told were accepted.
    pub accepted: u64,
    /// Messages refused (not accepted) with an answer: UNAVAILABLE while Redis was away, etc.
    pub refused: u64,
    /// Messages of calls that got no answer (their replica was killed mid-call): not counted.
    pub unknown: u64,
    /// Accepted, never received by a provider, and no terminal receipt explaining why (or a
    /// DELIVERED receipt the mocks contradict). Must be 0.
    pub lost: u64,
    pub lost_examples: Vec<String>,
    /// Terminal statuses outside what the message's class allows, or two terminal receipts
    /// that disagree. Must be 0.
    pub wrong_status: u64,
    pub wrong_examples: Vec<String>,
    /// Accepted and received by a provider, but no terminal receipt in the streams.
    pub no_receipt: u64,
    /// Terminal statuses of accepted messages.
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// Messages a provider received more than once, and the extra deliveries.
    pub duplicated_messages: u64,
    pub duplicate_deliveries: u64,
    /// Extra deliveries by the fault window they fell in.
    pub duplicates_by_fault: std::collections::BTreeMap<String, u64>,
    pub duplicates_outside_faults: u64,
    /// Terminal receipts written again with the same status (the receipts stream is
    /// at-least-once across a failover).
    pub repeated_receipts: u64,
    pub repeated_receipts_outside_faults: u64,
    /// Delivered by a provider though the caller was told "not accepted" (must be 0).
    pub delivered_not_accepted: u64,
    /// Delivered, of the messages whose outcome the caller was not told (a call cut by a kill,
    /// or an accept whose reply was lost and which the gateway said may have been applied).
    pub delivered_unknown: u64,
    /// Terminal receipts of messages accepted in seconds outside every fault window (the
    /// latency figures below are over these).
    pub receipts_outside_faults: u64,
    pub p50_receipt_ms_outside_faults: Option<u64>,
    pub p99_receipt_ms_outside_faults: Option<u64>,
    pub p99_receipt_ms_all: Option<u64>,
    pub foreign_receipts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_ids_give_back_their_message() {
        for n in [0, 1, 2, 77, 1_234_567, 9_999_999_999] {
            assert_eq!(token_number(&token(n)), Some(n), "{}", token(n));
            assert_eq!(id_number(&message_id(n)), Some(n));
        }
        assert_eq!(token_number("nope"), None);
    }

    #[test]
    fn reconcile_counts_lost_wrong_and_duplicates_by_window() {
        let l = Ledger::new(6, 0);
        for n in 0..6 {
            l.told(n, ACCEPTED);
        }
        l.set_class(3, DEAD);
        // 0: delivered twice inside a window, one receipt.
        l.delivered(&token(0), 50);
        l.delivered(&token(0), 60);
        l.receipt("c0", DELIVERED as i32, 10, 70);
        // 1: delivered once, no receipt (no_receipt, not lost).
        l.delivered(&token(1), 50);
        // 2: nothing at all: lost.
        // 3: dead token, INVALID_TOKEN: fine.
        l.receipt("c3", INVALID_TOKEN as i32, 10, 20);
        // 4: DROPPED without a cap: wrong status, and lost is not counted (a receipt explains).
        l.receipt("c4", DROPPED as i32, 10, 20);
        // 5: delivered, DELIVERED then a conflicting FAILED.
        l.delivered(&token(5), 5_000);
        l.delivered(&token(5), 5_000);
        l.receipt("c5", DELIVERED as i32, 10, 20);
        l.receipt("c5", 4, 10, 30);
        let windows = [Window {
            kind: "kill".into(),
            from_ms: 40,
            to_ms: 100,
        }];
        let r = l.reconcile(&windows);
        assert_eq!(r.accepted, 6);
        assert_eq!(r.lost, 1, "{r:?}");
        assert_eq!(r.lost_examples, vec!["c2"]);
        assert_eq!(r.no_receipt, 1);
        assert_eq!(r.wrong_status, 2, "{r:?}");
        assert_eq!(r.duplicate_deliveries, 2);
        assert_eq!(r.duplicates_by_fault.get("kill"), Some(&1));
        assert_eq!(r.duplicates_outside_faults, 1);
        assert_eq!(r.duplicated_messages, 2);
    }

    #[test]
    fn a_delivery_of_a_refused_message_is_told_apart_from_one_of_unknown_fate() {
        let l = Ledger::new(4, 0);
        l.told(0, REFUSED);
        l.told(1, UNKNOWN);
        l.told(2, REFUSED);
        l.told(3, UNKNOWN);
        l.delivered(&token(0), 10);
        l.delivered(&token(1), 10);
        let r = l.reconcile(&[]);
        assert_eq!((r.refused, r.unknown), (2, 2));
        assert_eq!(r.delivered_not_accepted, 1, "{r:?}");
        assert_eq!(r.delivered_unknown, 1, "{r:?}");
        assert_eq!(r.lost, 0, "neither was accepted");
    }
}
