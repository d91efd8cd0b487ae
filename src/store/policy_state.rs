//! What the policy stage remembers between messages, behind the storage seam: per-app opt-outs
//! by user id, frequency-cap counters per user, and the device tokens reported dead (with the
//! user they were reported for, so ForgetUser can erase them).
//!
//! A cap counter holds *reservations*: a message that passes the caps takes one at its decision
//! (so two replicas deciding at once cannot both take the last send of a window), and it is
//! given back ([`PolicyState::release`]) when the message ends without having been handed to a
//! provider. Each reservation is tagged with [`reservation_of`] the message, which the message's
//! terminal receipt names again.
//!
//! [`PolicyState`] is the trait; [`MemoryPolicyState`] keeps it in this process (lost on exit,
//! like the in-memory store), `redis::RedisPolicyState` in Redis, shared exactly by every
//! replica (one script per decision chunk). Both prune as they go: a cap counter holds only the
//! sends of its longest open window, and a dead token is forgotten after the suppression ttl, so
//! memory is bounded by the users active in a window and the tokens that died in the ttl.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use dashmap::DashMap;
use parking_lot::Mutex;

use super::StoreError;

/// One frequency cap: at most `max` sends per user in any `window_ms` (a rolling window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub max: u32,
    pub window_ms: i64,
}

/// What the policy stage asks about one message, in the order it decides: opt-out, quiet
/// hours (decided by the caller, passed in), suppression, caps.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub user_id: &'a str,
    pub device_token: &'a str,
    /// When the token was registered (epoch ms, 0 unknown): a later registration than its
    /// suppression sends again and lifts the suppression.
    pub registered_at_ms: i64,
    /// Check the user's opt-out.
    pub opt_out: bool,
    /// The message is in the recipient's quiet hours: it ends there unless opted out first.
    pub quiet: bool,
    /// Count it under the app's frequency caps.
    pub capped: bool,
    /// The tag of the reservation it takes under the caps ([`reservation_of`] the message).
    pub reservation: u64,
    /// When the message was accepted (epoch ms), for a message that may be decided twice: a
    /// scheduled one is decided when due, and a replica that dies between that decision and
    /// the attempt leaves the message to another, which decides again. Its reservation is then
    /// kept under this instant, and a decision that finds it already taken passes without
    /// counting the message a second time. 0: decided once (at ingest). [`MemoryPolicyState`]
    /// needs no such check: a crash loses its schedules with it.
    pub accepted_at_ms: i64,
}

/// The tag of a message's cap reservation: a hash of its batch and message ids, which its
/// terminal receipt carries, so the reservation can be found to give it back. Two messages with
/// one tag (a batch sent again) hold one reservation each; a release gives back one of them.
pub fn reservation_of(batch_id: &str, message_id: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(batch_id.as_bytes());
    h.update(&[0]);
    h.update(message_id.as_bytes());
    h.digest()
}

/// The state's answer for one [`Query`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// May go; counted under the caps when the query asked.
    Send,
    OptedOut,
    Quiet,
    /// The token was reported dead at this instant (epoch ms).
    Suppressed {
        since_ms: i64,
    },
    /// Over one of the caps.
    Capped,
}

/// A token reported dead, for ListInvalidTokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadToken {
    pub device_token: String,
    /// Since when it is invalid (the provider's timestamp, else when it was reported).
    pub since_ms: i64,
    /// When the gateway learned it: the order of the listing, and what the ttl counts from.
    pub reported_at_ms: i64,
}

/// Where a listing of dead tokens resumes: after (`reported_at_ms`, `device_token`).
pub type TokenCursor = (i64, String);

/// What ForgetUser erased.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub opt_out: bool,
    pub cap_sends: u64,
    /// Dead-token entries reported for the user's messages.
    pub suppressed_tokens: u64,
}

/// The policy stage's memory. See the module docs.
#[async_trait::async_trait]
pub trait PolicyState: Send + Sync + 'static {
    /// Answers each query of `app` in order, at `now_ms`, and reserves under `caps` a send for
    /// every message that may go and asked to be counted. Atomic per call: two replicas deciding
    /// for one user never both take the last send of a window.
    async fn decide(
        &self,
        app: &str,
        caps: &[Cap],
        now_ms: i64,
        queries: &[Query<'_>],
    ) -> Result<Vec<Answer>, StoreError>;

    /// Gives back the reservation tagged `reservation` of `user_id` (one of them, if several),
    /// taken by a message that ended without being handed to a provider. Fire and forget: the
    /// receipt hub calls it, which must not wait.
    fn release(&self, app: &str, user_id: &str, reservation: u64);

    /// Remembers `device_token` of `app` as dead since `since_ms`, reported now (kept for the
    /// suppression ttl from now) for a message of `user_id` (empty: none). The deliver stage
    /// awaits it before the message's INVALID_TOKEN receipt, so whoever sees that receipt
    /// (a ListInvalidTokens, the next send to the token) sees the token suppressed.
    async fn suppress(
        &self,
        app: &str,
        user_id: &str,
        device_token: &str,
        since_ms: i64,
    ) -> Result<(), StoreError>;

    /// Up to `limit` dead tokens of `app` reported at or after `reported_ms`, in the order they
    /// were reported, after `after` when given.
    async fn dead_tokens(
        &self,
        app: &str,
        reported_ms: i64,
        after: Option<TokenCursor>,
        limit: usize,
    ) -> Result<Vec<DeadToken>, StoreError>;

    /// Sets or clears a user's opt-out; true when that changed something.
    async fn set_opt_out(&self, app: &str, user_id: &str, out: bool) -> Result<bool, StoreError>;

    /// Erases what is kept about a user of `app`: the opt-out, the cap counter, and the dead
    /// tokens reported for the user's messages.
    async fn forget_user(&self, app: &str, user_id: &str) -> Result<Forgotten, StoreError>;
}

/// The longest window of `caps`, in ms (0 with none).
pub fn longest(caps: &[Cap]) -> i64 {
    caps.iter().map(|c| c.window_ms).max().unwrap_or(0)
}

#[derive(Default)]
struct AppState {
    opted_out: HashSet<String>,
    /// Reservations per user (instant, tag), oldest first, within the longest window.
    sends: HashMap<String, VecDeque<(i64, u64)>>,
    /// Users in `sends` after the last sweep, to sweep again when that doubles.
    swept_at: usize,
    /// Dead token -> (invalid since, reported at, the user it was reported for).
    dead: HashMap<String, (i64, i64, String)>,
    /// (reported at, token), for listing and expiry.
    dead_order: BTreeSet<(i64, String)>,
}

impl AppState {
    fn answer(&mut self, caps: &[Cap], now_ms: i64, q: &Query<'_>) -> Answer {
        if q.opt_out && !q.user_id.is_empty() && self.opted_out.contains(q.user_id) {
            return Answer::OptedOut;
        }
        if q.quiet {
            return Answer::Quiet;
        }
        if let Some(&(since_ms, reported, _)) = self.dead.get(q.device_token) {
            if q.registered_at_ms <= since_ms {
                return Answer::Suppressed { since_ms };
            }
            self.dead.remove(q.device_token);
            self.dead_order
                .remove(&(reported, q.device_token.to_owned()));
        }
        if !q.capped || caps.is_empty() || q.user_id.is_empty() {
            return Answer::Send;
        }
        let horizon = now_ms - longest(caps);
        let sends = self.sends.entry(q.user_id.to_owned()).or_default();
        while sends.front().is_some_and(|&(t, _)| t <= horizon) {
            sends.pop_front();
        }
        let over = caps.iter().any(|cap| {
            let from = now_ms - cap.window_ms;
            let n = sends.iter().rev().take_while(|&&(t, _)| t > from).count();
            n >= cap.max as usize
        });
        if over {
            return Answer::Capped;
        }
        // Instants stay in order: a decision earlier than the newest (clocks of replicas
        // differ) is counted at the newest.
        let at = sends.back().map_or(now_ms, |&(t, _)| t.max(now_ms));
        sends.push_back((at, q.reservation));
        Answer::Send
    }

    /// Drops counters whose sends all left the longest window, once the map has doubled since
    /// the last sweep (amortized: memory stays proportional to the users active in a window).
    fn sweep(&mut self, caps: &[Cap], now_ms: i64) {
        if self.sends.len() < 1_024 || self.sends.len() < self.swept_at * 2 {
            return;
        }
        let horizon = now_ms - longest(caps);
        self.sends
            .retain(|_, sends| sends.back().is_some_and(|&(t, _)| t > horizon));
        self.swept_at = self.sends.len();
    }
}

/// Policy state in this process. See the module docs.
pub struct MemoryPolicyState {
    apps: DashMap<String, Mutex<AppState>>,
    suppression_ttl_ms: i64,
}

impl MemoryPolicyState {
    pub fn new(suppression_ttl_ms: i64) -> Self {
        Self {
            apps: DashMap::new(),
            suppression_ttl_ms,
        }
    }

    /// [`PolicyState::suppress`] as reported at `reported_ms` (now when `None`, read under the
    /// app's lock so the listing's order is the order of the reports).
    pub fn suppress_at(
        &self,
        app: &str,
        user_id: &str,
        device_token: &str,
        since_ms: i64,
        reported_ms: Option<i64>,
    ) {
        let horizon = super::now_ms() - self.suppression_ttl_ms;
        self.with(app, |state| {
            let reported_ms = reported_ms.unwrap_or_else(super::now_ms);
            let token = device_token.to_owned();
            let entry = (since_ms, reported_ms, user_id.to_owned());
            if let Some((_, old, _)) = state.dead.insert(token.clone(), entry) {
                state.dead_order.remove(&(old, token.clone()));
            }
            state.dead_order.insert((reported_ms, token));
            while let Some((t, token)) = state.dead_order.first().cloned()
                && t < horizon
            {
                state.dead_order.remove(&(t, token.clone()));
                state.dead.remove(&token);
            }
        });
    }

    fn with<T>(&self, app: &str, f: impl FnOnce(&mut AppState) -> T) -> T {
        if let Some(state) = self.apps.get(app) {
            return f(&mut state.lock());
        }
        let state = self.apps.entry(app.to_owned()).or_default();
        f(&mut state.lock())
    }
}

#[async_trait::async_trait]
impl PolicyState for MemoryPolicyState {
    async fn decide(
        &self,
        app: &str,
        caps: &[Cap],
        now_ms: i64,
        queries: &[Query<'_>],
    ) -> Result<Vec<Answer>, StoreError> {
        Ok(self.with(app, |state| {
            state.sweep(caps, now_ms);
            queries
                .iter()
                .map(|q| state.answer(caps, now_ms, q))
                .collect()
        }))
    }

    fn release(&self, app: &str, user_id: &str, reservation: u64) {
        self.with(app, |state| {
            if let Some(sends) = state.sends.get_mut(user_id)
                && let Some(i) = sends.iter().rposition(|&(_, tag)| tag == reservation)
            {
                sends.remove(i);
            }
        });
    }

    async fn suppress(
        &self,
        app: &str,
        user_id: &str,
        device_token: &str,
        since_ms: i64,
    ) -> Result<(), StoreError> {
        self.suppress_at(app, user_id, device_token, since_ms, None);
        Ok(())
    }

    async fn dead_tokens(
        &self,
        app: &str,
        reported_ms: i64,
        after: Option<TokenCursor>,
        limit: usize,
    ) -> Result<Vec<DeadToken>, StoreError> {
        Ok(self.with(app, |state| {
            let from = (reported_ms, String::new());
            state
                .dead_order
                .range(from..)
                .filter(|entry| after.as_ref().is_none_or(|a| *entry > a))
                .take(limit)
                .map(|(reported, token)| DeadToken {
                    device_token: token.clone(),
                    since_ms: state.dead.get(token).map_or(*reported, |d| d.0),
                    reported_at_ms: *reported,
                })
                .collect()
        }))
    }

    async fn set_opt_out(&self, app: &str, user_id: &str, out: bool) -> Result<bool, StoreError> {
        Ok(self.with(app, |state| {
            if out {
                state.opted_out.insert(user_id.to_owned())
            } else {
                state.opted_out.remove(user_id)
            }
        }))
    }

    async fn forget_user(&self, app: &str, user_id: &str) -> Result<Forgotten, StoreError> {
        Ok(self.with(app, |state| {
            // A scan of the app's dead tokens: ForgetUser is rare, and an index by user would
            // cost every report.
            let tokens: Vec<(String, i64)> = state
                .dead
                .iter()
                .filter(|(_, (_, _, user))| !user_id.is_empty() && user == user_id)
                .map(|(token, &(_, reported, _))| (token.clone(), reported))
                .collect();
            for (token, reported) in &tokens {
                state.dead.remove(token);
                state.dead_order.remove(&(*reported, token.clone()));
            }
            Forgotten {
                opt_out: state.opted_out.remove(user_id),
                cap_sends: state.sends.remove(user_id).map_or(0, |s| s.len() as u64),
                suppressed_tokens: tokens.len() as u64,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(user: &str, token: &str) -> Query<'static> {
        Query {
            user_id: Box::leak(user.to_owned().into_boxed_str()),
            device_token: Box::leak(token.to_owned().into_boxed_str()),
            registered_at_ms: 0,
            opt_out: true,
            quiet: false,
            capped: true,
            reservation: 0,
            accepted_at_ms: 0,
        }
    }

    const DAY: i64 = 86_400_000;

    #[tokio::test]
    async fn caps_count_rolling_windows_per_user() {
        let s = MemoryPolicyState::new(DAY);
        let caps = [
            Cap {
                max: 2,
                window_ms: DAY,
            },
            Cap {
                max: 3,
                window_ms: 7 * DAY,
            },
        ];
        let a = [q("u1", "t1")];
        let mut answers = Vec::new();
        for now in [0, 1, 2, DAY + 1, DAY + 2, 2 * DAY + 5] {
            answers.push(s.decide("app", &caps, now, &a).await.unwrap()[0]);
        }
        use Answer::*;
        // Two in the first day; the third is over the daily cap; the next day one more fits
        // the daily cap, then the weekly cap of 3 holds.
        assert_eq!(answers, [Send, Send, Capped, Send, Capped, Capped]);
        // Another user is counted apart; an uncounted message passes.
        assert_eq!(
            s.decide("app", &caps, 3, &[q("u2", "t2")]).await.unwrap(),
            [Send]
        );
        let mut free = q("u1", "t1");
        free.capped = false;
        assert_eq!(s.decide("app", &caps, 4, &[free]).await.unwrap(), [Send]);
        // After a week, u1's window is empty again.
        assert_eq!(s.decide("app", &caps, 9 * DAY, &a).await.unwrap(), [Send]);
    }

    /// A released reservation frees its send in the window; releasing one of two with the
    /// same tag leaves the other counted, and an unknown tag releases nothing.
    #[tokio::test]
    async fn released_reservations_free_their_send() {
        let s = MemoryPolicyState::new(DAY);
        let caps = [Cap {
            max: 2,
            window_ms: DAY,
        }];
        let tagged = |tag| Query {
            reservation: tag,
            accepted_at_ms: 0,
            ..q("u1", "t1")
        };
        use Answer::*;
        let a = s
            .decide("app", &caps, 1, &[tagged(7), tagged(7), tagged(8)])
            .await
            .unwrap();
        assert_eq!(a, [Send, Send, Capped]);
        s.release("app", "u1", 9);
        assert_eq!(
            s.decide("app", &caps, 2, &[tagged(8)]).await.unwrap(),
            [Capped]
        );
        s.release("app", "u1", 7);
        assert_eq!(
            s.decide("app", &caps, 3, &[tagged(8)]).await.unwrap(),
            [Send]
        );
        assert_eq!(
            s.decide("app", &caps, 4, &[tagged(9)]).await.unwrap(),
            [Capped]
        );
        assert_eq!(s.forget_user("app", "u1").await.unwrap().cap_sends, 2);
    }

    #[tokio::test]
    async fn opt_out_first_then_quiet_then_suppression() {
        let s = MemoryPolicyState::new(DAY);
        let since = crate::store::now_ms() - 1_000;
        s.suppress("app", "u9", "dead", since).await.unwrap();
        assert!(s.set_opt_out("app", "u1", true).await.unwrap());
        assert!(!s.set_opt_out("app", "u1", true).await.unwrap());
        let mut quiet = q("u2", "dead");
        quiet.quiet = true;
        let mut registered_later = q("u3", "dead");
        registered_later.registered_at_ms = since + 1;
        let answers = s
            .decide(
                "app",
                &[],
                5_000,
                &[
                    q("u1", "dead"),
                    quiet,
                    q("u2", "dead"),
                    registered_later,
                    q("u2", "dead"),
                ],
            )
            .await
            .unwrap();
        use Answer::*;
        assert_eq!(
            answers,
            [OptedOut, Quiet, Suppressed { since_ms: since }, Send, Send],
            "a later registration lifts the suppression"
        );
        let f = s.forget_user("app", "u1").await.unwrap();
        assert!(f.opt_out);
        assert_eq!(f.suppressed_tokens, 0, "`dead` was reported for u9");
        s.suppress("app", "u9", "dead2", since).await.unwrap();
        s.suppress("app", "u8", "dead3", since).await.unwrap();
        let f = s.forget_user("app", "u9").await.unwrap();
        assert_eq!(f.suppressed_tokens, 1, "dead2 (`dead` was revived)");
        let left = s.dead_tokens("app", 0, None, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].device_token, "dead3");
        assert_eq!(
            s.decide("app", &[], 6_000, &[q("u1", "t")]).await.unwrap(),
            [Send]
        );
    }

    #[tokio::test]
    async fn dead_tokens_list_resumes_after_a_cursor_and_expire() {
        let s = MemoryPolicyState::new(DAY);
        let now = crate::store::now_ms();
        for (i, token) in ["a", "b", "c", "d"].iter().enumerate() {
            s.suppress_at("app", "", token, 5, Some(now + i as i64));
        }
        let first = s.dead_tokens("app", 0, None, 2).await.unwrap();
        assert_eq!(
            first
                .iter()
                .map(|t| t.device_token.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        let last = first.last().unwrap();
        let rest = s
            .dead_tokens(
                "app",
                0,
                Some((last.reported_at_ms, last.device_token.clone())),
                10,
            )
            .await
            .unwrap();
        assert_eq!(
            rest.iter()
                .map(|t| t.device_token.as_str())
                .collect::<Vec<_>>(),
            ["c", "d"]
        );
        let since = s.dead_tokens("app", now + 3, None, 10).await.unwrap();
        assert_eq!(since.len(), 1);
        assert_eq!(
            since[0].since_ms, 5,
            "the provider's instant, not the report's"
        );
        // A token reported longer ago than the ttl is dropped at the next report, however
        // long it had been invalid.
        s.suppress_at("app", "", "old", 5, Some(now - 2 * DAY));
        s.suppress("app", "", "e", 1).await.unwrap();
        let all = s.dead_tokens("app", 0, None, 10).await.unwrap();
        assert!(all.iter().all(|t| t.device_token != "old"), "{all:?}");
    }
}
