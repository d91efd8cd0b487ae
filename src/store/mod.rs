//! The storage seam: every stage that keeps state goes through one [`Store`], without knowing
//! which one it is.
//!
//! - [`memory::MemoryStore`], the embedded default: accepted messages go straight to the limit
//!   stage, retries wait in a heap in this process. Not crash-safe: what it holds is lost with the
//!   process (each message still gets a terminal receipt on an orderly shutdown).
//! - [`redis::RedisStore`], durable delivery: accepted messages are persisted (leased to this
//!   replica) before the caller hears they were accepted, retries are parked in Redis and claimed
//!   back under a lease, terminal receipts release them, several replicas share the work, and the
//!   receipts stream and dead letters live there too.
//!
//! Both feed due work into the same channel, the input of the limit stage: ingest hands it what
//! [`Store::accept`] returns, the store's own tasks add retries that came due (and, with Redis,
//! messages reclaimed from a replica that died). Acknowledgement is [`ReceiptObserver`]: the
//! hub shows every receipt to the store, which releases what a terminal receipt finished.

pub mod insights;
pub mod memory;
pub mod policy_state;
pub mod redis;
pub mod send_time;

use std::collections::HashMap;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::{Platform, ReceiptStatus, Resolution};
use crate::proto;
use crate::receipts::ReceiptObserver;
use crate::work::{Job, Waiting, Work};

/// Why the store could not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("redis is unreachable: {0}")]
    Unreachable(String),
}

/// Messages [`Store::accept`] could not make safe, given back untouched with the reason.
#[derive(Debug)]
pub struct AcceptError {
    pub error: StoreError,
    pub messages: Vec<Waiting>,
    /// The write may have been applied all the same (its reply was lost) and could not be
    /// undone yet: the messages may still be delivered, so the caller must not hear a plain
    /// "not accepted", and their ids stay claimed (a resend is answered from the idempotency
    /// record instead of being accepted a second time).
    pub maybe_applied: bool,
}

/// What the store knows of a caller-supplied message id seen before (idempotency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earlier {
    /// Accepted and without a terminal receipt yet.
    InFlight,
    /// Finished with this terminal status.
    Finished(ReceiptStatus),
}

/// Which scheduled messages a cancellation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheduled {
    Campaign(String),
    Batch(String),
    Messages(Vec<String>),
    /// A user's, erased by ForgetUser: their receipts carry no user id.
    User(String),
}

impl Scheduled {
    /// Whether a message of this campaign, batch, id and user is selected.
    pub fn selects(&self, campaign_id: &str, batch_id: &str, message_id: &str, user: &str) -> bool {
        match self {
            Scheduled::Campaign(c) => c == campaign_id,
            Scheduled::Batch(b) => b == batch_id,
            Scheduled::Messages(ids) => ids.iter().any(|id| id == message_id),
            Scheduled::User(u) => !u.is_empty() && u == user,
        }
    }

    /// The reason of the DROPPED receipt of a message this selects.
    pub fn reason(&self) -> &'static str {
        match self {
            Scheduled::User(_) => FORGOTTEN,
            _ => CANCELLED,
        }
    }
}

/// The reason of the receipt of a cancelled scheduled message.
pub const CANCELLED: &str = "cancelled";
/// The reason of the receipt of a scheduled message erased with its user (ForgetUser).
pub const FORGOTTEN: &str = "user_forgotten";

/// Which receipts a resumable subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct FeedFilter {
    pub campaign_id: String,
    pub include_non_terminal: bool,
}

/// Why a resumable receipts feed cannot be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    #[error("resume_after needs durable delivery (redis.url); this gateway has none")]
    Unsupported,
    #[error("must be `0`, `$` or a receipt's cursor")]
    BadCursor,
}

/// Receipts of one app from a cursor on, then live; each carries its own cursor.
pub type ReceiptFeed = Pin<Box<dyn Stream<Item = proto::Receipt> + Send>>;

/// Counters of what a store did, for logs, tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Retries parked.
    pub scheduled: u64,
    /// Messages claimed back (due retries, reclaimed leases).
    pub claimed: u64,
    /// Claimed from an expired lease: possibly attempted twice (crash or stall).
    pub reclaimed: u64,
    /// Messages released by their terminal receipt.
    pub acked: u64,
    pub dead_lettered: u64,
    /// Writes (park, dead letter, terminal receipt) not made because another replica had
    /// reclaimed the message's lease meanwhile: that replica finishes it.
    pub fenced: u64,
}

/// A message whose attempts ran out, kept for the admin RPCs.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: String,
    pub dead_at_ms: i64,
    /// The last error, or why the record is unreadable.
    pub last_error: String,
    /// The message, when its record could be read back.
    pub job: Option<DeadJob>,
}

/// What a dead letter says of its message.
#[derive(Debug, Clone)]
pub struct DeadJob {
    pub message_id: String,
    pub batch_id: String,
    pub campaign_id: String,
    pub user_id: String,
    pub platform: Platform,
    /// Provider attempts made.
    pub attempt: u32,
    pub accepted_at_ms: i64,
}

/// Dead-letter administration (list, replay, purge), where the store keeps dead letters.
#[async_trait::async_trait]
pub trait DeadLetters: Send + Sync {
    /// Up to `limit` dead letters of `app`, oldest first, from `offset`; and the total.
    async fn list(
        &self,
        app: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, u64), StoreError>;
    /// Puts dead letters back for delivery now, attempts reset (`ids` empty: the oldest
    /// `limit`); returns how many.
    async fn replay(&self, app: &str, ids: &[String], limit: usize) -> Result<u64, StoreError>;
    /// Deletes dead letters (`ids` empty: all of `app`'s); returns how many.
    async fn purge(&self, app: &str, ids: &[String]) -> Result<u64, StoreError>;
}

/// The storage seam. See the module docs.
#[async_trait::async_trait]
pub trait Store: ReceiptObserver + Send + Sync + 'static {
    /// `memory` or `redis`, for logs.
    fn name(&self) -> &'static str;

    /// True while the store can take new messages.
    fn is_healthy(&self) -> bool;

    /// Follows [`Store::is_healthy`] (the gRPC health service mirrors it).
    fn health(&self) -> watch::Receiver<bool>;

    /// Claims caller-supplied message ids of `app` (empty ids skipped) for idempotency; returns
    /// the ids seen within the window, with what became of them.
    async fn claim_ids(
        &self,
        app: &str,
        ids: &[&str],
    ) -> Result<HashMap<String, Earlier>, StoreError>;

    /// Releases ids claimed by [`Store::claim_ids`] whose recipients were not accepted after all.
    async fn release_ids(&self, app: &str, ids: &[String]) -> Result<(), StoreError>;

    /// Makes freshly accepted messages safe (a durable store persists them before this
    /// returns) and gives them back as work for the limit stage, in order.
    async fn accept(&self, messages: Vec<Waiting>) -> Result<Vec<Work>, AcceptError>;

    /// Parks `job` until `due`, then feeds it to the limit stage again.
    fn park(&self, job: Job, due: Instant);

    /// Holds scheduled messages (never attempted, already accepted) until each is due, then
    /// feeds them to the limit stage. A durable store has them stored as scheduled when this
    /// returns (a crash then neither loses one nor sends it early) and lets exactly one replica
    /// send each; the memory store keeps them with its retries.
    async fn schedule(&self, jobs: Vec<(Job, Instant)>) {
        for (job, due) in jobs {
            self.park(job, due);
        }
    }

    /// Ends the scheduled messages of `app` that `which` selects and that have not gone yet
    /// (never attempted, still waiting), each with a terminal DROPPED receipt, reason
    /// `cancelled`; returns how many. A message being sent at that moment is not taken.
    async fn cancel_scheduled(&self, app: &str, which: &Scheduled) -> Result<u64, StoreError>;

    /// Deletes the receipts of `user_id` from `app`'s receipts feed (ForgetUser); returns how
    /// many. A store without a feed has none.
    async fn forget_receipts(&self, _app: &str, _user_id: &str) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Ends a job whose attempts are exhausted with `resolution`; a store that keeps dead
    /// letters keeps it (with its last error) for the admin RPCs.
    fn dead_letter(&self, job: Job, resolution: Resolution);

    /// Ends this process's part in `work` at shutdown: a durable store keeps the message and
    /// the replica that reclaims it finishes it; otherwise it ends FAILED with `reason`.
    fn abandon(&self, work: Work, reason: &str);

    /// `None` when every write this store queued so far is written; otherwise a future that
    /// ends once the writer has caught up with them (or has ended). The deliver stage holds a
    /// request permit across it, so messages delivered but not yet recorded as such (the ones
    /// a crash would deliver again) are bounded by `pipeline.max_in_flight_requests` however
    /// far behind the writer falls.
    fn settled(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        None
    }

    /// Retries parked by this process.
    fn parked(&self) -> usize;

    /// Counters of what the store did.
    fn stats(&self) -> StoreStats;

    /// The receipts of `app` after `cursor`, then live.
    fn receipts_feed(
        &self,
        app: &str,
        cursor: String,
        filter: FeedFilter,
    ) -> Result<ReceiptFeed, FeedError>;

    /// Dead-letter administration, when this store keeps dead letters.
    fn dead_letters(&self) -> Option<&dyn DeadLetters>;

    /// How many replicas share this store's work (and so every rate limit), when it can tell.
    fn live_replicas(&self) -> Option<watch::Receiver<u32>>;
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    crate::domain::epoch_millis(std::time::SystemTime::now())
}

/// How long a wait until `due` is, as an epoch-millisecond instant.
pub(crate) fn due_ms(due: Instant) -> i64 {
    let wait = due.saturating_duration_since(Instant::now());
    now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2)
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_instants_become_epoch_millis() {
        let before = now_ms();
        let due = due_ms(Instant::now() + std::time::Duration::from_secs(2));
        assert!(due >= before + 1_900 && due <= now_ms() + 2_100, "{due}");
        assert!(due_ms(Instant::now()) >= before, "a past instant is now");
    }
}
