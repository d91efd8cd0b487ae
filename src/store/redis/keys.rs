//! The Redis key layout. Every key of an app carries the hash tag `{app}`, so all keys a script
//! or a MULTI touches live in one Cluster slot.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<p>:{app}:jobs` | HASH | message_id -> job record (JSON) while parked or leased |
//! | `<p>:{app}:delay:<replica>` | ZSET | message_id scored by due time (ms), per replica |
//! | `<p>:{app}:leases` | ZSET | message_id scored by lease deadline (ms) |
//! | `<p>:{app}:owner` | HASH | message_id -> replica holding the lease |
//! | `<p>:{app}:replicas` | ZSET | replica id scored by "alive until" (ms) |
//! | `<p>:{app}:dead` | HASH | message_id -> dead-letter record (JSON, with last error) |
//! | `<p>:{app}:dead_idx` | ZSET | message_id scored by dead-letter time (ms) |
//! | `<p>:{app}:optout` | SET | user ids opted out of the app's pushes |
//! | `<p>:{app}:cap:<user>` | ZSET | the user's sends in the longest cap window (score = ms), expiring with it |
//! | `<p>:{app}:dead_tokens` | HASH | device token reported dead -> since (ms) |
//! | `<p>:{app}:dead_tokens_idx` | ZSET | the same tokens scored by the report instant (ms), for listing and expiry |
//! | `<p>:{app}:dead_tokens_user` | HASH | dead token -> the user id it was reported for |
//! | `<p>:{app}:utok:<user>` | SET | the dead tokens reported for the user (ForgetUser), expiring with the suppression ttl |
//! | `<p>:{app}:batch:<id>` | HASH | a batch's context (`ctx`, JSON), its packed recipients (`buf`, bytes) and how many packed records still refer to it (`left`) |
//! | `<p>:{app}:stats:<campaign>` | HASH | `<variant>\|<platform>\|<status>`, `<variant>\|opens`, `<variant>\|conversions` -> count (expires `pipeline.insights_retention_days` after the last update) |
//! | `<p>:{app}:exp:<message_id>` | HASH | an exposure: campaign `c`, variant `v`, user `u`, time `t` (ms), flags `o`/`c` once counted (expires after the attribution window) |
//! | `<p>:{app}:uexp:<user_id>` | HASH | campaign -> the user's latest exposure (message id) in it, `*` -> its latest overall, `m:<message id>` -> every exposure of the user (ForgetUser; expires after the window) |
//! | `<p>:{app}:ev:<event_id>` | STRING | a tracked event id already recorded (expires after the window) |
//! | `<p>:{app}:hist:<user_id>` | HASH | the user's open-time histogram (send-time optimization): reference instant `r` (ms), hour of the week `0`..`167` -> weight (expires four half-lives after its last open) |
//! | `<p>:{app}:hist_pop` | HASH | the app's population histogram, the same fields |
//! | `<p>:{app}:uexps:<user_id>` | SET | every exposure of the user, as written before the `m:` fields of `uexp` held them (read by ForgetUser only; expires after the window) |
//! | `<p>:{app}:uev:<user_id>` | SET | the event ids recorded about the user's exposures (ForgetUser; expires after the window) |
//!
//! `<p>` is `redis.key_prefix` (default `pushgate`).

/// Key builder for one app.
#[derive(Debug, Clone)]
pub struct AppKeys {
    base: String,
}

impl AppKeys {
    pub fn new(prefix: &str, app: &str) -> Self {
        Self {
            base: format!("{prefix}:{{{app}}}"),
        }
    }
    pub fn jobs(&self) -> String {
        format!("{}:jobs", self.base)
    }
    pub fn delay(&self, replica: &str) -> String {
        format!("{}:delay:{replica}", self.base)
    }
    pub fn leases(&self) -> String {
        format!("{}:leases", self.base)
    }
    pub fn owner(&self) -> String {
        format!("{}:owner", self.base)
    }
    pub fn replicas(&self) -> String {
        format!("{}:replicas", self.base)
    }
    pub fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }
    pub fn dead_idx(&self) -> String {
        format!("{}:dead_idx", self.base)
    }
    pub fn optout(&self) -> String {
        format!("{}:optout", self.base)
    }
    /// The prefix of the per-user cap counters; the user id is the rest.
    pub fn cap_prefix(&self) -> String {
        format!("{}:cap:", self.base)
    }
    pub fn dead_tokens(&self) -> String {
        format!("{}:dead_tokens", self.base)
    }
    pub fn dead_tokens_idx(&self) -> String {
        format!("{}:dead_tokens_idx", self.base)
    }
    pub fn dead_tokens_user(&self) -> String {
        format!("{}:dead_tokens_user", self.base)
    }
    /// The prefix of the per-user sets of dead tokens; the user id is the rest.
    pub fn user_tokens_prefix(&self) -> String {
        format!("{}:utok:", self.base)
    }
    /// The prefix of the batch-context keys; a packed record names the rest.
    pub fn batch_prefix(&self) -> String {
        format!("{}:batch:", self.base)
    }
    pub fn batch(&self, id: &str) -> String {
        format!("{}:batch:{id}", self.base)
    }
    /// The prefix of the campaign-measurement keys (`stats:`, `exp:`, `uexp:`, `uexps:`, `ev:`,
    /// `uev:`, `hist:`, `hist_pop` follow).
    pub fn insights_prefix(&self) -> String {
        format!("{}:", self.base)
    }
    pub fn stats(&self, campaign: &str) -> String {
        format!("{}:stats:{campaign}", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_the_app_hash_tag() {
        let k = AppKeys::new("pg", "shop");
        for key in [
            k.jobs(),
            k.delay("r1"),
            k.leases(),
            k.owner(),
            k.replicas(),
            k.dead(),
            k.dead_idx(),
            k.batch("b1"),
            k.optout(),
            k.cap_prefix(),
            k.dead_tokens(),
            k.dead_tokens_idx(),
            k.dead_tokens_user(),
            k.user_tokens_prefix(),
            k.stats("c1"),
            k.insights_prefix(),
        ] {
            assert!(key.starts_with("pg:{shop}:"), "{key}");
        }
    }
}
