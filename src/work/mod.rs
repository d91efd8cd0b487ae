//! The unit of work: what carries one accepted message from ingest to its receipt.
//!
//! A message travels first as a [`Waiting`] (24 bytes pointing into its batch's packed
//! recipients, see [`batch`]), and becomes a rendered [`Job`] when it may go to its provider, or
//! when a store hands it back for another attempt. [`Work`] is either; it is what the channel
//! into the limit stage and the limit stage's queues carry. Every form holds (or becomes) the
//! message's [`Pending`] receipt handle, so none can be lost without a terminal receipt.

mod batch;
mod packed;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use packed::fuzz;

use std::sync::Arc;

pub use batch::{AcceptedBatch, Waiting};
pub use packed::{PackedAt, PackedRecipients};

use crate::domain::{Platform, Priority, ProviderRequest};
use crate::receipts::{Pending, Resolution};
use crate::registry::AppRuntime;

/// One accepted message, rendered, on its way to a provider.
pub struct Job {
    pub pending: Pending,
    pub request: ProviderRequest,
    pub app: Arc<AppRuntime>,
    /// Set on a scheduled message until it comes due: the policy stage decides it then.
    pub due: Option<Box<DueCheck>>,
}

/// What the policy stage reads of a scheduled message when it comes due: a message scheduled
/// hours ahead must see an opt-out, a dead token or a cap that happened in between, so its
/// opt-out, quiet hours, suppression and caps are decided at the due time (the device token and
/// user id are in the job itself). A durable store keeps it with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueCheck {
    /// When the device token was registered (epoch ms, 0 unknown).
    pub registered_at_ms: i64,
    /// The recipient's IANA time zone (its own, else the app's default); empty: UTC.
    pub timezone: String,
    /// HIGH priority or `bypass_policies`: quiet hours and caps do not apply.
    pub transactional: bool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("app", &self.app.id)
            .field("message_id", &self.pending.meta().message_id)
            .finish()
    }
}

/// What the channel into the limit stage and its queues carry: a fresh message in its compact,
/// unrendered form, or a rendered job (claimed from a durable store, or back for another
/// attempt).
#[derive(Debug)]
pub enum Work {
    Waiting(Waiting),
    Job(Box<Job>),
}

impl From<Job> for Work {
    fn from(job: Job) -> Self {
        Work::Job(Box::new(job))
    }
}

impl From<Waiting> for Work {
    fn from(waiting: Waiting) -> Self {
        Work::Waiting(waiting)
    }
}

impl Work {
    pub fn app(&self) -> &Arc<AppRuntime> {
        match self {
            Work::Waiting(w) => w.app(),
            Work::Job(job) => &job.app,
        }
    }

    pub fn message_id(&self) -> &str {
        match self {
            Work::Waiting(w) => w.message_id(),
            Work::Job(job) => &job.pending.meta().message_id,
        }
    }

    pub fn platform(&self) -> Platform {
        match self {
            Work::Waiting(w) => w.platform(),
            Work::Job(job) => job.request.platform(),
        }
    }

    /// Provider attempts made so far.
    pub fn attempt(&self) -> u32 {
        match self {
            Work::Waiting(_) => 0,
            Work::Job(job) => job.pending.attempt(),
        }
    }

    pub fn priority(&self) -> Priority {
        match self {
            Work::Waiting(w) => w.batch().priority,
            Work::Job(job) => job.pending.meta().priority,
        }
    }

    /// The campaign rate limit the request carried (messages per minute, 0 = none), with the
    /// key it applies to: the campaign id, or the batch id when there is none.
    pub fn campaign_limit(&self) -> Option<(&Arc<str>, u32)> {
        let (rate, campaign_id, batch_id) = match self {
            Work::Waiting(w) => {
                let b = w.batch();
                (b.campaign_rate_per_minute, &b.campaign_id, &b.batch_id)
            }
            Work::Job(job) => {
                let m = job.pending.meta();
                (m.campaign_rate_per_minute, &m.campaign_id, &m.batch_id)
            }
        };
        if rate == 0 {
            return None;
        }
        let key = if campaign_id.is_empty() {
            batch_id
        } else {
            campaign_id
        };
        Some((key, rate))
    }

    /// After this instant the message must not be handed to a provider any more.
    pub fn expires_at(&self) -> Option<std::time::SystemTime> {
        match self {
            Work::Waiting(w) => w.expires_at(),
            Work::Job(job) => job.pending.meta().expires_at,
        }
    }

    /// Ends the message without a (further) attempt.
    pub fn resolve(self, resolution: Resolution) {
        match self {
            Work::Waiting(w) => w.resolve(resolution),
            Work::Job(job) => job.pending.resolve(resolution),
        }
    }

    /// Releases the message without a terminal receipt, because a durable store keeps it and
    /// another replica finishes it.
    pub fn hand_off(self) {
        match self {
            Work::Waiting(w) => w.hand_off(),
            Work::Job(job) => job.pending.hand_off(),
        }
    }

    /// The job for a provider attempt: a waiting message is rendered now (and ends with a
    /// receipt, returning `None`, if that fails).
    pub fn into_job(self) -> Option<Job> {
        match self {
            Work::Waiting(w) => w.into_job(),
            Work::Job(job) => Some(*job),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit stage holds one `Work` per accepted message, up to a million of them.
    #[test]
    fn a_queued_message_stays_small() {
        assert!(
            std::mem::size_of::<Work>() <= 24,
            "{} bytes",
            std::mem::size_of::<Work>()
        );
    }
}
