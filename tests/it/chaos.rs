//! The short chaos run of the normal suite: `pushgate-loadtest chaos` for 60 s at a modest rate
//! against two `pushgate serve` replicas on one Redis, with every fault the machine allows
//! (provider faults at the mocks, kill -9 and SIGTERM restarts of replicas, Redis killed and
//! restarted, and network faults on Redis' link when network namespaces are available), then
//! the ledgers reconciled: nothing accepted is lost and no status is wrong.

use std::path::PathBuf;

use pushgate_loadtest::load::chaos::{self, ChaosSettings, netns};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_second_chaos_run_loses_nothing() {
    let settings = ChaosSettings {
        gateway_bin: PathBuf::from(env!("CARGO_BIN_EXE_pushgate")),
        duration_secs: 60.0,
        rate: 200.0,
        replicas: 2,
        senders: 2,
        batch_size: 20,
        fault_every_secs: 5.0,
        netns: netns::Mode::Auto,
        drain_secs: 90.0,
        quiet: true,
        ..ChaosSettings::default()
    };
    let report = chaos::run(&settings)
        .await
        .expect("the chaos run set up and ran");
    chaos::print(&report);
    let l = &report.ledger;
    assert!(
        l.accepted > 1_000,
        "the workload ran: {} accepted",
        l.accepted
    );
    assert!(
        report.faults.values().sum::<u64>() >= 6,
        "faults were injected: {:?}",
        report.faults
    );
    for must in [
        "kill_9_replica",
        "redis_restart",
        "apns_429_burst",
        "goaway",
    ] {
        assert!(
            report.faults.contains_key(must),
            "{must} injected: {:?}",
            report.faults
        );
    }
    assert_eq!(l.lost, 0, "lost: {:?}", l.lost_examples);
    assert_eq!(l.wrong_status, 0, "wrong statuses: {:?}", l.wrong_examples);
    assert_eq!(
        report.unfinished_at_end, 0,
        "every accepted message finished"
    );
    assert!(report.pass);
}
