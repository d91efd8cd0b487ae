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

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
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

/// Per-key rates and open-stream counts. See the module docs.
pub struct Quotas {
    /// Each with its rate per second (and burst).
    batches: Option<(Limiter, u32)>,
    recipients: Option<(Limiter, u32)>,
    streams: Arc<Open>,
    subscriptions: Arc<Open>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").finish_non_exhaustive()
    }
}

fn limiter(per_second: u32) -> Option<(Limiter, u32)> {
    NonZeroU32::new(per_second).map(|n| {
        (
            RateLimiter::keyed(Quota::per_second(n).allow_burst(n)),
            per_second,
        )
    })
}

fn exhausted(key: &str, limit: u32, what: &str) -> Status {
    Status::resource_exhausted(format!(
        "ingress.{key} exceeded: this API key may have {limit} {what}; retry later"
    ))
}

impl Quotas {
    pub fn new(config: &IngressConfig) -> Self {
        Self {
            batches: limiter(config.batches_per_second_per_key),
            recipients: limiter(config.recipients_per_second_per_key),
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
        if let Some((batches, rate)) = &self.batches
            && batches.check_key(&who).is_err()
        {
            return Err(exhausted(
                "batches_per_second_per_key",
                *rate,
                "batches per second",
            ));
        }
        if let (Some((limiter, rate)), Some(n)) = (&self.recipients, recipients_n(recipients)) {
            match limiter.check_key_n(&who, n) {
                Ok(Ok(())) => {}
                // Over the burst: larger than any batch ingest takes; ingest refuses it.
                Err(_) => {}
                Ok(Err(_)) => {
                    return Err(exhausted(
                        "recipients_per_second_per_key",
                        *rate,
                        "recipients per second",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until `who`'s rates allow one batch of `recipients`, then takes it (StreamSend).
    pub async fn pace_batch(&self, who: KeyId, recipients: usize) {
        if let Some((batches, _)) = &self.batches {
            batches.until_key_ready(&who).await;
        }
        if let (Some((limiter, _)), Some(n)) = (&self.recipients, recipients_n(recipients)) {
            // Over the burst: ingest refuses the batch as too large.
            let _ = limiter.until_key_n_ready(&who, n).await;
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
    max: u32,
    key: &'static str,
    what: &'static str,
    counts: Mutex<HashMap<KeyId, u32>>,
}

impl Open {
    fn new(max: u32, key: &'static str, what: &'static str) -> Self {
        Self {
            max,
            key,
            what,
            counts: Mutex::new(HashMap::new()),
        }
    }

    #[allow(clippy::result_large_err)] // tonic::Status
    fn take(this: &Arc<Self>, who: KeyId) -> Result<OpenSlot, Status> {
        if this.max == 0 {
            return Ok(OpenSlot { open: None, who });
        }
        let mut counts = this.counts.lock();
        let n = counts.entry(who).or_insert(0);
        if *n >= this.max {
            return Err(exhausted(this.key, this.max, this.what));
        }
        *n += 1;
        Ok(OpenSlot {
            open: Some(Arc::clone(this)),
            who,
        })
    }
}

/// One open stream or subscription, counted until dropped.
pub struct OpenSlot {
    open: Option<Arc<Open>>,
    who: KeyId,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            let mut counts = open.counts.lock();
            if let Some(n) = counts.get_mut(&self.who) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&self.who);
                }
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
}
