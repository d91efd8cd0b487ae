//! Per-key ingress limits (`[ingress]`): how much one API key may ask of the gateway, so one
//! hostile or buggy caller cannot crowd out the others before any app's limits apply. Batches
//! and recipients per second (GCRA on governor, keyed by the caller), and concurrent
//! `StreamSend` streams and `SubscribeReceipts` subscriptions. A caller over a limit is answered
//! RESOURCE_EXHAUSTED with the key it exceeded; a `StreamSend` stream is paced instead (its
//! next batch is read once the key's rates allow it, so HTTP/2 flow control slows the caller).
//!
//! Callers are told apart by their key's digest; with no key configured (open mode) every
//! caller is one and the same. Only authenticated callers get here, so the keyed state is
//! bounded by the configured keys.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};
use tonic::Status;

pub use crate::config::IngressConfig;

/// Who a limit counts: one API key (by digest), or every caller of an open gateway. Its
/// `Debug` shows two bytes of the digest, enough to tell keys apart in a log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyId {
    Open,
    Key([u8; 32]),
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyId::Open => f.write_str("Open"),
            KeyId::Key(d) => write!(f, "Key(sha256:{:02x}{:02x}…)", d[0], d[1]),
        }
    }
}

type Limiter = DefaultKeyedRateLimiter<KeyId>;

/// Per-key rates and open-stream counts, replaced by a reload (SIGHUP). See the module docs.
pub struct Quotas {
    rates: RwLock<Rates>,
    streams: Arc<Open>,
    subscriptions: Arc<Open>,
}

/// The two rates, each with its per-second figure (and burst); `None` when turned off.
struct Rates {
    batches: Option<Rate>,
    recipients: Option<Rate>,
}

#[derive(Clone)]
struct Rate {
    limiter: Arc<Limiter>,
    per_second: u32,
}

impl Rate {
    fn new(per_second: u32) -> Option<Self> {
        NonZeroU32::new(per_second).map(|n| Self {
            limiter: Arc::new(RateLimiter::keyed(Quota::per_second(n).allow_burst(n))),
            per_second,
        })
    }

    /// This rate under `per_second`: itself (keeping what callers have used) when unchanged.
    fn renewed(current: &Option<Self>, per_second: u32) -> Option<Self> {
        match current {
            Some(rate) if rate.per_second == per_second => Some(rate.clone()),
            _ => Self::new(per_second),
        }
    }
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").finish_non_exhaustive()
    }
}

fn exhausted(key: &str, limit: u32, what: &str) -> Status {
    Status::resource_exhausted(format!(
        "ingress.{key} exceeded: this API key may have {limit} {what}; retry later"
    ))
}

impl Quotas {
    pub fn new(config: &IngressConfig) -> Self {
        Self {
            rates: RwLock::new(Rates {
                batches: Rate::new(config.batches_per_second_per_key),
                recipients: Rate::new(config.recipients_per_second_per_key),
            }),
            streams: Arc::new(Open::new(
                config.streams_per_key,
                "streams_per_key",
                "StreamSend streams open at once",
            )),
            subscriptions: Arc::new(Open::new(
                config.subscriptions_per_key,
                "subscriptions_per_key",
                "SubscribeReceipts subscriptions open at once",
            )),
        }
    }

    /// Applies `config` (SIGHUP): a changed rate starts afresh, an unchanged one keeps what
    /// callers have used of it; streams and subscriptions already open stay open when their
    /// limit is lowered, and new ones are refused until the count is under it.
    pub fn reload(&self, config: &IngressConfig) {
        {
            let mut rates = self.rates.write();
            rates.batches = Rate::renewed(&rates.batches, config.batches_per_second_per_key);
            rates.recipients =
                Rate::renewed(&rates.recipients, config.recipients_per_second_per_key);
        }
        self.streams
            .max
            .store(config.streams_per_key, Ordering::Relaxed);
        self.subscriptions
            .max
            .store(config.subscriptions_per_key, Ordering::Relaxed);
    }

    fn rates(&self) -> (Option<Rate>, Option<Rate>) {
        let rates = self.rates.read();
        (rates.batches.clone(), rates.recipients.clone())
    }

    /// No limit at all (tests, embedding).
    pub fn unlimited() -> Self {
        Self::new(&IngressConfig {
            batches_per_second_per_key: 0,
            recipients_per_second_per_key: 0,
            streams_per_key: 0,
            subscriptions_per_key: 0,
        })
    }

    /// Takes one batch of `recipients` from `who`'s rates, or says which rate it is over (and
    /// takes nothing of the other).
    #[allow(clippy::result_large_err)] // tonic::Status
    pub fn admit_batch(&self, who: KeyId, recipients: usize) -> Result<(), Status> {
        let (batches, per_recipient) = self.rates();
        if let Some(rate) = &batches
            && rate.limiter.check_key(&who).is_err()
        {
            return Err(exhausted(
                "batches_per_second_per_key",
                rate.per_second,
                "batches per second",
            ));
        }
        if let (Some(rate), Some(n)) = (&per_recipient, recipients_n(recipients)) {
            match rate.limiter.check_key_n(&who, n) {
                Ok(Ok(())) => {}
                // Over the burst: larger than any batch ingest takes; ingest refuses it.
                Err(_) => {}
                Ok(Err(_)) => {
                    return Err(exhausted(
                        "recipients_per_second_per_key",
                        rate.per_second,
                        "recipients per second",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until `who`'s rates allow one batch of `recipients`, then takes it (StreamSend).
    pub async fn pace_batch(&self, who: KeyId, recipients: usize) {
        let (batches, per_recipient) = self.rates();
        if let Some(rate) = &batches {
            rate.limiter.until_key_ready(&who).await;
        }
        if let (Some(rate), Some(n)) = (&per_recipient, recipients_n(recipients)) {
            // Over the burst: ingest refuses the batch as too large.
            let _ = rate.limiter.until_key_n_ready(&who, n).await;
        }
    }

    /// Counts one more open stream of `who`, until the returned slot is dropped.
    #[allow(clippy::result_large_err)] // tonic::Status
    pub fn open_stream(&self, who: KeyId) -> Result<OpenSlot, Status> {
        Open::take(&self.streams, who)
    }

    /// Counts one more open subscription of `who`, until the returned slot is dropped.
    #[allow(clippy::result_large_err)] // tonic::Status
    pub fn open_subscription(&self, who: KeyId) -> Result<OpenSlot, Status> {
        Open::take(&self.subscriptions, who)
    }
}

fn recipients_n(recipients: usize) -> Option<NonZeroU32> {
    NonZeroU32::new(u32::try_from(recipients).unwrap_or(u32::MAX))
}

/// Open streams (or subscriptions) per key, at most `max`.
struct Open {
    /// 0: no limit.
    max: AtomicU32,
    key: &'static str,
    what: &'static str,
    counts: Mutex<HashMap<KeyId, u32>>,
}

impl Open {
    fn new(max: u32, key: &'static str, what: &'static str) -> Self {
        Self {
            max: AtomicU32::new(max),
            key,
            what,
            counts: Mutex::new(HashMap::new()),
        }
    }

    #[allow(clippy::result_large_err)] // tonic::Status
    fn take(this: &Arc<Self>, who: KeyId) -> Result<OpenSlot, Status> {
        // Counted even while unlimited, so a limit set by a reload sees what is open.
        let max = this.max.load(Ordering::Relaxed);
        let mut counts = this.counts.lock();
        let n = counts.entry(who).or_insert(0);
        if max != 0 && *n >= max {
            return Err(exhausted(this.key, max, this.what));
        }
        *n += 1;
        Ok(OpenSlot {
            open: Arc::clone(this),
            who,
        })
    }
}

/// One open stream or subscription, counted until dropped.
pub struct OpenSlot {
    open: Arc<Open>,
    who: KeyId,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let mut counts = self.open.counts.lock();
        if let Some(n) = counts.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.who);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_slots_count_per_key_and_free_on_drop() {
        let q = Quotas::new(&IngressConfig {
            streams_per_key: 2,
            ..Default::default()
        });
        let a = KeyId::Key([1; 32]);
        let b = KeyId::Key([2; 32]);
        let first = q.open_stream(a).unwrap();
        let _second = q.open_stream(a).unwrap();
        let refused = q.open_stream(a).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("ingress.streams_per_key"),
            "{refused:?}"
        );
        assert!(q.open_stream(b).is_ok(), "another key is not affected");
        drop(first);
        assert!(q.open_stream(a).is_ok(), "a closed stream frees its slot");
    }

    #[test]
    fn rates_are_per_key_and_name_what_was_exceeded() {
        let q = Quotas::new(&IngressConfig {
            batches_per_second_per_key: 2,
            recipients_per_second_per_key: 10,
            ..Default::default()
        });
        let a = KeyId::Key([1; 32]);
        // Ten recipients is the whole second's allowance: the next batch is over it.
        q.admit_batch(a, 10).unwrap();
        let e = q.admit_batch(a, 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message()
                .contains("ingress.recipients_per_second_per_key"),
            "{e:?}"
        );
        // That refusal took a batch cell (batches are checked first): the next is over too.
        let e = q.admit_batch(a, 1).unwrap_err();
        assert!(
            e.message().contains("ingress.batches_per_second_per_key"),
            "{e:?}"
        );
        assert!(q.admit_batch(KeyId::Open, 10).is_ok(), "another caller");
    }

    #[test]
    fn validation_names_the_key() {
        let c = IngressConfig {
            recipients_per_second_per_key: 5,
            ..Default::default()
        };
        let (key, _) = c.validate(10).unwrap_err();
        assert_eq!(key, "ingress.recipients_per_second_per_key");
        assert!(IngressConfig::default().validate(10_000).is_ok());
    }

    #[test]
    fn a_reload_applies_new_limits_and_keeps_unchanged_ones() {
        let q = Quotas::new(&IngressConfig {
            batches_per_second_per_key: 1,
            recipients_per_second_per_key: 0,
            streams_per_key: 0,
            subscriptions_per_key: 2,
        });
        let a = KeyId::Key([1; 32]);
        q.admit_batch(a, 1).unwrap();
        let streams: Vec<_> = (0..3).map(|_| q.open_stream(a).unwrap()).collect();

        // Unchanged batch rate: the used cell stays used. Streams: a limit below what is
        // open refuses new ones and closes none.
        q.reload(&IngressConfig {
            batches_per_second_per_key: 1,
            recipients_per_second_per_key: 0,
            streams_per_key: 2,
            subscriptions_per_key: 2,
        });
        assert!(
            q.admit_batch(a, 1).is_err(),
            "unchanged rate keeps its state"
        );
        let e = q.open_stream(a).err().unwrap();
        assert!(e.message().contains("ingress.streams_per_key"), "{e:?}");
        drop(streams);
        assert!(q.open_stream(a).is_ok(), "under the new limit once closed");

        // A changed rate applies at once; a limit turned off lets everything through.
        q.reload(&IngressConfig {
            batches_per_second_per_key: 1000,
            recipients_per_second_per_key: 10,
            streams_per_key: 0,
            subscriptions_per_key: 1,
        });
        q.admit_batch(a, 10).unwrap();
        let e = q.admit_batch(a, 1).unwrap_err();
        assert!(
            e.message()
                .contains("ingress.recipients_per_second_per_key exceeded"),
            "{e:?}"
        );
        let _one = q.open_subscription(a).unwrap();
        let e = q.open_subscription(a).err().unwrap();
        assert!(e.message().contains("1 SubscribeReceipts"), "{e:?}");
    }
}
