//! Redis failover under Sentinel: a primary, one replica and three `redis-server --sentinel`
//! processes; the primary is killed with `kill -9` while traffic flows, the Sentinels promote the
//! replica, and the gateway (configured with `redis.sentinels` and `min_replicas_acked = 1`)
//! follows the new primary: NOT_SERVING while there is none it may write to, SERVING after;
//! every accepted message ends in exactly one terminal receipt and reached the mock.

use crate::harness;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::redis_server::{RedisSentinel, RedisServer};
use tonic_health::pb::health_check_response::ServingStatus;

async fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    cmd.query_async(&mut conn).await
}

/// The primary's port as the Sentinel at `url` names it.
async fn sentinel_primary(url: &str) -> Option<u16> {
    let addr: Option<(String, u16)> = query(
        url,
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(RedisSentinel::MASTER),
    )
    .await
    .ok()?;
    addr.map(|(_, port)| port)
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn health(channel: tonic::transport::Channel) -> Option<i32> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pushgate.v1.PushGateway".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// What the senders saw: ids acknowledged as accepted, and every terminal receipt.
#[derive(Default)]
struct Ledger {
    accepted: HashSet<String>,
    refused: u64,
    terminal: HashMap<String, Vec<proto::Receipt>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_nothing_accepted() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    wait_until("the replica to sync", Duration::from_secs(20), || async {
        let info: String = query(&replica.url(), redis::cmd("INFO").arg("replication"))
            .await
            .unwrap_or_default();
        info.contains("master_link_status:up")
    })
    .await;
    let sentinels: Vec<RedisSentinel> = (0..3)
        .map(|_| RedisSentinel::start(primary.port(), 2, 1_000))
        .collect();
    // A failover needs each Sentinel to know the replica and a quorum of the others.
    for s in &sentinels {
        wait_until(
            "the Sentinels to know the replica and each other",
            Duration::from_secs(30),
            || async {
                let replicas: Vec<redis::Value> = query(
                    &s.url(),
                    redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg(RedisSentinel::MASTER),
                )
                .await
                .unwrap_or_default();
                let others: Vec<redis::Value> = query(
                    &s.url(),
                    redis::cmd("SENTINEL")
                        .arg("sentinels")
                        .arg(RedisSentinel::MASTER),
                )
                .await
                .unwrap_or_default();
                replicas.len() == 1 && others.len() == 2
            },
        )
        .await;
    }
    let urls: Vec<String> = sentinels.iter().map(RedisSentinel::url).collect();
    let h = harness::start(harness::Options {
        retry: format!(
            "base_ms = 20\ncap_ms = 200\nmax_attempts = 12\n[redis]\nsentinels = {urls:?}\n\
             sentinel_master = \"{}\"\nmin_replicas_acked = 1\nreplica_ack_timeout_ms = 500\n\
             lease_ms = 3000\npoll_ms = 20\ncommand_timeout_ms = 500",
            RedisSentinel::MASTER
        ),
        mock: Box::new(|m| m.latency = Duration::from_millis(5)),
        ..Default::default()
    })
    .await;
    // Some attempts fail, so retries are parked in (and claimed back from) Redis across the
    // failover, not only accepted messages.
    h.mock.faults().set_unavailable_per_mille(100);
    let channel = h.channel().await;
    wait_until("SERVING", Duration::from_secs(20), || {
        let c = channel.clone();
        async move { health(c).await == Some(ServingStatus::Serving as i32) }
    })
    .await;

    let ledger = Arc::new(parking_lot::Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..4u64 {
        let client = h.client().await;
        let (ledger, stop) = (Arc::clone(&ledger), Arc::clone(&stop));
        senders.push(tokio::spawn(async move {
            let mut client = client;
            let mut b = 0u64;
            while !stop.load(Ordering::Acquire) {
                let first = (s * 1_000_000) + b * 50;
                b += 1;
                let request = harness::apns_batch("shop", first..first + 50);
                match client.send_batch(request).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        let mut l = ledger.lock();
                        for r in &response.results {
                            if r.accepted {
                                l.accepted.insert(r.message_id.clone());
                            } else {
                                l.refused += 1;
                            }
                        }
                        for r in response.receipts.into_iter().filter(|r| r.terminal) {
                            l.terminal.entry(r.message_id.clone()).or_default().push(r);
                        }
                    }
                    // UNAVAILABLE while no primary: nothing of the batch was accepted.
                    Err(_) => {
                        ledger.lock().refused += 50;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ledger.lock().accepted.len();
    assert!(before > 0, "traffic flows before the failover");

    let old_port = primary.port();
    primary.stop();
    wait_until(
        "NOT_SERVING after the kill",
        Duration::from_secs(10),
        || {
            let c = channel.clone();
            async move { health(c).await == Some(ServingStatus::NotServing as i32) }
        },
    )
    .await;
    wait_until(
        "the Sentinels to promote the replica",
        Duration::from_secs(30),
        || {
            let url = urls[0].clone();
            let want = replica.port();
            async move { sentinel_primary(&url).await == Some(want) }
        },
    )
    .await;
    // The old primary comes back as a replica of the new one, so writes can be acknowledged by
    // a replica again (`min_replicas_acked = 1`).
    primary.restart_as_replica_of(replica.port());
    assert_eq!(primary.port(), old_port);
    wait_until(
        "SERVING on the new primary",
        Duration::from_secs(30),
        || {
            let c = channel.clone();
            async move { health(c).await == Some(ServingStatus::Serving as i32) }
        },
    )
    .await;
    let at_recovery = ledger.lock().accepted.len();
    wait_until(
        "traffic after the failover",
        Duration::from_secs(20),
        || {
            let l = Arc::clone(&ledger);
            async move { l.lock().accepted.len() > at_recovery + 500 }
        },
    )
    .await;
    stop.store(true, Ordering::Release);
    for s in senders {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("every batch got its receipts")
            .unwrap();
    }

    // Redis now runs on the promoted replica, and the gateway writes there.
    let role: redis::Role = query(&replica.url(), &redis::cmd("ROLE")).await.unwrap();
    assert!(matches!(role, redis::Role::Primary { .. }), "{role:?}");
    let receipts: u64 = query(
        &replica.url(),
        redis::cmd("XLEN").arg("pushgate:{shop}:receipts"),
    )
    .await
    .unwrap();
    let l = ledger.lock();
    let delivered: HashSet<String> = h
        .mock
        .accepted()
        .into_iter()
        .map(|a| a.device_token)
        .collect();
    let mut lost = Vec::new();
    for id in &l.accepted {
        let receipts = l.terminal.get(id).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            receipts.len(),
            1,
            "{id}: exactly one terminal receipt: {receipts:?}"
        );
        assert_eq!(
            receipts[0].status,
            ReceiptStatus::Delivered as i32,
            "{id}: {:?}",
            receipts[0]
        );
        let n: u64 = id.trim_start_matches("m-").parse().unwrap();
        if !delivered.contains(&harness::token(n)) {
            lost.push(id.clone());
        }
    }
    println!(
        "sentinel failover: {} accepted ({before} before the kill, {} after recovery), {} refused while failing over, {} lost",
        l.accepted.len(),
        l.accepted.len() - at_recovery,
        l.refused,
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "accepted but never delivered: {:?}",
        &lost[..lost.len().min(5)]
    );
    assert_eq!(h.unresolved_drops(), 0);
    assert!(
        receipts >= (l.accepted.len() - at_recovery) as u64,
        "the receipts since the failover are in the new primary's stream ({receipts})"
    );
}
