//! Policy stage: decides *whether and when* an accepted message may go, between ingest and the
//! limit stage. Schedules, local-time delivery, quiet hours, frequency caps and token
//! suppression will sit here; every decision will end in a receipt (a policy never drops a
//! message silently).
//!
//! No policy is configured yet, so every message goes on at once: [`Policy::check`] is the one
//! place ingest asks, and the place each policy plugs into.

use crate::registry::AppRuntime;

/// What the policy stage decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on to the limit stage now.
    Send,
}

/// The policies in force. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct Policy {}

impl Policy {
    /// The verdict for a message of `app`.
    pub fn check(&self, _app: &AppRuntime) -> Verdict {
        Verdict::Send
    }
}
