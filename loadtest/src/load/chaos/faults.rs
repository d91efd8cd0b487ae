//! The faults of a chaos run, how each is injected and undone, and the log of when each was
//! active (its window, widened by its settling time: retries, lease expiry, reconnection).

use std::collections::BTreeMap;
use std::time::Duration;

use super::ChaosSettings;
use super::cluster::{Redis, Replica};
use super::ledger::Window;
use super::netns::Net;
use crate::load::env::Mocks;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// APNs answers 429 `TooManyRequests` to 30% of requests for 4 s.
    Apns429Burst,
    /// FCM answers 429 `RESOURCE_EXHAUSTED` to 30% for 4 s.
    Fcm429Burst,
    /// APNs answers 500 to 30% for 4 s.
    Apns500Burst,
    /// FCM answers 503 `UNAVAILABLE` to 30% for 4 s.
    Fcm503Burst,
    /// Both mocks send GOAWAY on every open connection.
    Goaway,
    /// Twenty requests answered RST_STREAM(INTERNAL_ERROR), at each mock.
    StreamResets,
    /// Responses slower than the replicas' request timeout for 3 s.
    SlowResponses,
    /// New connections advertise MAX_CONCURRENT_STREAMS 1 (open ones get GOAWAY) for 5 s.
    MaxStreamsOne,
    /// 20 APNs requests answer 403 `ExpiredProviderToken`; every FCM access token is revoked.
    ExpiredTokens,
    /// One replica `kill -9`, started again 1 s later.
    KillReplica,
    /// Every replica in turn: SIGTERM, wait for the orderly exit, start, wait for SERVING.
    RollingRestart,
    /// Redis `kill -9`, restarted from its AOF 2 s later; with Sentinels, a failover instead.
    RedisDown,
    /// 50 ms +- 20 ms of latency on the Redis link (netns) for 5 s.
    NetLatency,
    /// 10% packet loss on the Redis link for 5 s.
    NetLoss,
    /// The Redis link limited to 2 Mbit/s (tc tbf: queueing delay, drops past 50 ms) for 5 s.
    NetThrottle,
    /// The Redis link cut (100% loss both ways) for 3 s, then restored.
    NetPartition,
}

pub const ALL: [Fault; 16] = [
    Fault::Apns429Burst,
    Fault::KillReplica,
    Fault::Fcm503Burst,
    Fault::Goaway,
    Fault::RedisDown,
    Fault::SlowResponses,
    Fault::NetLatency,
    Fault::Apns500Burst,
    Fault::StreamResets,
    Fault::RollingRestart,
    Fault::Fcm429Burst,
    Fault::NetLoss,
    Fault::MaxStreamsOne,
    Fault::NetThrottle,
    Fault::ExpiredTokens,
    Fault::NetPartition,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Apns429Burst => "apns_429_burst",
            Fault::Fcm429Burst => "fcm_429_burst",
            Fault::Apns500Burst => "apns_500_burst",
            Fault::Fcm503Burst => "fcm_503_burst",
            Fault::Goaway => "goaway",
            Fault::StreamResets => "stream_resets",
            Fault::SlowResponses => "slow_responses",
            Fault::MaxStreamsOne => "max_concurrent_streams_1",
            Fault::ExpiredTokens => "expired_tokens",
            Fault::KillReplica => "kill_9_replica",
            Fault::RollingRestart => "sigterm_rolling_restart",
            Fault::RedisDown => "redis_down",
            Fault::NetLatency => "net_latency",
            Fault::NetLoss => "net_loss",
            Fault::NetThrottle => "net_throttle",
            Fault::NetPartition => "net_partition",
        }
    }

    fn is_net(self) -> bool {
        matches!(
            self,
            Fault::NetLatency | Fault::NetLoss | Fault::NetThrottle | Fault::NetPartition
        )
    }

    /// At most how long the injection takes (for the schedule not to run past the end).
    pub fn budget(self, s: &ChaosSettings) -> Duration {
        match self {
            Fault::RollingRestart => Duration::from_secs(15 * s.replicas as u64),
            Fault::RedisDown => Duration::from_secs(if s.sentinel { 20 } else { 10 }),
            Fault::KillReplica => Duration::from_secs(10),
            _ => Duration::from_secs(6),
        }
    }

    /// How long after the fault its effects may still show (retries in backoff, leases of a
    /// killed replica expiring and being claimed, reconnections).
    pub fn settle(self, s: &ChaosSettings) -> Duration {
        match self {
            Fault::KillReplica | Fault::RollingRestart | Fault::RedisDown | Fault::NetPartition => {
                Duration::from_millis(s.lease_ms + 5_000)
            }
            _ => Duration::from_secs(5),
        }
    }
}

/// The faults this run rotates through, and those it cannot inject here (with why).
pub struct Schedule {
    pub faults: Vec<Fault>,
    pub skipped: Vec<String>,
}

pub fn schedule(s: &ChaosSettings, net: &Net) -> Schedule {
    let mut faults = Vec::new();
    let mut skipped = Vec::new();
    for f in ALL {
        if !s.only.is_empty() && !s.only.iter().any(|o| o == f.name()) {
            continue;
        }
        if f.is_net() && s.sentinel {
            skipped.push(format!(
                "{}: network faults cover the single-Redis setup only",
                f.name()
            ));
            continue;
        }
        if f.is_net() && !net.available() {
            skipped.push(format!("{}: {}", f.name(), net.why_not()));
            continue;
        }
        if matches!(f, Fault::NetLatency | Fault::NetLoss) && !net.netem() {
            skipped.push(format!(
                "{}: this kernel has no tc netem (sch_netem)",
                f.name()
            ));
            continue;
        }
        faults.push(f);
    }
    Schedule { faults, skipped }
}

/// What was injected and when.
#[derive(Default)]
pub struct FaultLog {
    pub counts: BTreeMap<String, u64>,
    pub windows: Vec<Window>,
    pub skipped: Vec<String>,
}

impl FaultLog {
    pub fn record(&mut self, kind: &str, from_ms: i64, to_ms: i64, settle: Duration) {
        *self.counts.entry(kind.to_string()).or_default() += 1;
        self.windows.push(Window {
            kind: kind.to_string(),
            from_ms,
            to_ms: to_ms + settle.as_millis() as i64,
        });
    }
}

const BURST_PER_MILLE: u32 = 300;

/// Injects `fault` and undoes it; returns the name it is logged under.
pub async fn inject(
    fault: Fault,
    s: &ChaosSettings,
    mocks: &Mocks,
    replicas: &mut [Replica],
    redis: &mut Redis,
    net: &Net,
) -> anyhow::Result<String> {
    let (a, f) = (mocks.apns.faults(), mocks.fcm.faults());
    let burst = Duration::from_secs(4);
    match fault {
        Fault::Apns429Burst => {
            a.set_too_many_requests_per_mille(BURST_PER_MILLE);
            tokio::time::sleep(burst).await;
            a.set_too_many_requests_per_mille(0);
        }
        Fault::Fcm429Burst => {
            f.set_quota_exceeded_per_mille(BURST_PER_MILLE);
            tokio::time::sleep(burst).await;
            f.set_quota_exceeded_per_mille(0);
        }
        Fault::Apns500Burst => {
            a.set_internal_error_per_mille(BURST_PER_MILLE);
            tokio::time::sleep(burst).await;
            a.set_internal_error_per_mille(0);
        }
        Fault::Fcm503Burst => {
            f.set_unavailable_per_mille(BURST_PER_MILLE);
            tokio::time::sleep(burst).await;
            f.set_unavailable_per_mille(0);
        }
        Fault::Goaway => {
            a.goaway_after(0);
            f.goaway_after(0);
        }
        Fault::StreamResets => {
            for _ in 0..20 {
                a.reset_after(1);
                f.reset_after(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Fault::SlowResponses => {
            let slow = Duration::from_millis(s.request_timeout_ms + 500);
            a.set_latency(slow);
            f.set_latency(slow);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let normal = Duration::from_millis(s.latency_ms);
            a.set_latency(normal);
            f.set_latency(normal);
        }
        Fault::MaxStreamsOne => {
            a.set_max_concurrent_streams(Some(1));
            f.set_max_concurrent_streams(Some(1));
            tokio::time::sleep(Duration::from_secs(5)).await;
            a.set_max_concurrent_streams(None);
            f.set_max_concurrent_streams(None);
        }
        Fault::ExpiredTokens => {
            a.force_expired_provider_token(20);
            f.expire_access_tokens_now();
        }
        Fault::KillReplica => {
            let count = replicas.len();
            let victim = replicas.iter().map(|r| r.starts as usize).sum::<usize>() % count;
            let r = &mut replicas[victim];
            r.kill().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            r.start().await?;
            r.wait_serving(Duration::from_secs(30)).await;
        }
        Fault::RollingRestart => {
            for r in replicas.iter_mut() {
                r.terminate(Duration::from_secs(10)).await;
                r.start().await?;
                r.wait_serving(Duration::from_secs(30)).await;
            }
        }
        Fault::RedisDown => {
            let kind = redis.break_primary(Duration::from_secs(2)).await?;
            for r in replicas.iter() {
                r.wait_serving(Duration::from_secs(30)).await;
            }
            return Ok(kind);
        }
        Fault::NetLatency => {
            net.impair("netem delay 50ms 20ms", Duration::from_secs(5))
                .await?
        }
        Fault::NetLoss => net.impair("netem loss 10%", Duration::from_secs(5)).await?,
        Fault::NetThrottle => {
            net.impair(
                "tbf rate 2mbit burst 32kbit latency 50ms",
                Duration::from_secs(5),
            )
            .await?
        }
        Fault::NetPartition => net.partition(Duration::from_secs(3)).await?,
    }
    Ok(fault.name().to_string())
}
