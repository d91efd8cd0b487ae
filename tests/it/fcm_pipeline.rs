//! End-to-end through the real gateway with both providers: gRPC client -> gateway -> mock APNs
//! and mock FCM (with its OAuth token endpoint).

use crate::harness;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::harness::{
    Options, fcm_recipient, fcm_token, recipient, status, stream_all, template,
    terminal_by_message, token,
};
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::fcm::RetryAfter;

fn batch(n: usize, recipients: Vec<proto::Recipient>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: "shop".into(),
        batch_id: format!("batch-{n}"),
        campaign_id: "winback".into(),
        template: Some(template(
            "Hi {{ first_name }}",
            "We miss you, {{ first_name }}",
        )),
        recipients,
        wait_for_receipts: false,
        campaign_rate_per_minute: 0,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_under_faults_with_token_expiry_mid_run() {
    let h = harness::start(Options {
        fcm: true,
        ..Default::default()
    })
    .await;
    let fcm = h.fcm();
    fcm.faults().set_retry_after(RetryAfter::None);
    fcm.faults().set_unavailable_per_mille(20);
    fcm.faults().set_internal_per_mille(20);
    fcm.faults().set_bad_gateway_per_mille(10);
    h.mock.faults().set_unavailable_per_mille(20);

    const TOTAL: u64 = 4_000;
    let mut expected = HashMap::new();
    let mut recipients = Vec::new();
    for n in 1..=TOTAL {
        let android = n % 2 == 0;
        let want = match (android, n % 100) {
            (false, 1) => {
                h.mock.faults().add_unregistered(&token(n), None);
                (ReceiptStatus::InvalidToken, "Unregistered")
            }
            (true, 2) => {
                fcm.faults().add_unregistered(&fcm_token(n));
                (ReceiptStatus::InvalidToken, "UNREGISTERED")
            }
            (true, 4) => {
                fcm.faults().add_apns_unregistered(&fcm_token(n));
                (ReceiptStatus::InvalidToken, "")
            }
            (true, 6) => {
                fcm.faults().add_invalid_token(&fcm_token(n));
                (ReceiptStatus::InvalidToken, "")
            }
            (true, 8) => {
                fcm.faults().add_sender_id_mismatch(&fcm_token(n));
                (ReceiptStatus::InvalidToken, "SENDER_ID_MISMATCH")
            }
            _ if n % 250 == 10 => (ReceiptStatus::Rejected, ""),
            _ => (ReceiptStatus::Delivered, ""),
        };
        expected.insert(format!("m-{n}"), want);
        let first_name = format!("User{n}");
        let vars: Vec<(&str, &str)> = if n % 250 == 10 {
            vec![]
        } else {
            vec![("first_name", first_name.as_str())]
        };
        recipients.push(if android {
            fcm_recipient(n, &vars)
        } else {
            recipient(n, &vars)
        });
    }
    let mut chunks = recipients.chunks(500).map(|c| c.to_vec()).enumerate();
    let first: Vec<_> = chunks.by_ref().take(4).map(|(i, r)| batch(i, r)).collect();
    let rest: Vec<_> = chunks.map(|(i, r)| batch(i, r)).collect();

    let mut receipts = stream_all(&h, first).await;
    // Every issued access token dies mid-run: the gateway must refresh without losing anything.
    fcm.faults().expire_access_tokens_now();
    receipts.extend(stream_all(&h, rest).await);

    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len() as u64, TOTAL);
    for (id, (want, reason)) in &expected {
        let got = &terminal[id];
        assert_eq!(status(got), *want, "{id}: {got:?}");
        if !reason.is_empty() {
            assert!(got.reason.starts_with(reason), "{id}: {got:?}");
        }
        if *want == ReceiptStatus::Rejected {
            assert!(got.field.ends_with("vars.first_name"), "{got:?}");
        }
        if *want == ReceiptStatus::Delivered && got.platform == proto::Platform::Fcm as i32 {
            assert!(got.provider_message_id.starts_with("projects/"), "{got:?}");
        }
    }
    let stats = fcm.stats();
    assert_eq!(
        stats.tokens_issued, 2,
        "one token, then one refresh: {stats:?}"
    );
    assert!(stats.reason("UNAUTHENTICATED") >= 1, "{stats:?}");
    assert!(stats.status(503) > 0 && stats.status(500) > 0 && stats.status(502) > 0);
    assert_eq!(stats.legacy_requests, 0);

    // The mock received exactly the delivered Android messages, rendered per recipient.
    let delivered_android: Vec<_> = terminal
        .values()
        .filter(|r| {
            status(r) == ReceiptStatus::Delivered && r.platform == proto::Platform::Fcm as i32
        })
        .collect();
    let accepted = fcm.accepted();
    assert_eq!(accepted.len(), delivered_android.len());
    for a in &accepted {
        let n: u64 = a.token[4..a.token.find(':').unwrap()].parse().unwrap();
        let message = &a.message;
        assert_eq!(message["notification"]["title"], format!("Hi User{n}"));
        assert_eq!(
            message["notification"]["body"],
            format!("We miss you, User{n}")
        );
        assert_eq!(message["fcm_options"]["analytics_label"], "winback");
    }
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_retry_after_holds_the_apps_fcm_sends() {
    let h = harness::start(Options {
        fcm: true,
        ..Default::default()
    })
    .await;
    let fcm = h.fcm();
    // Warm up: token fetched, connection up.
    let warm = stream_all(
        &h,
        vec![batch(0, vec![fcm_recipient(1, &[("first_name", "A")])])],
    )
    .await;
    assert_eq!(status(warm.last().unwrap()), ReceiptStatus::Delivered);

    fcm.faults().set_retry_after(RetryAfter::Seconds(1));
    fcm.faults().set_quota_exceeded_per_mille(1000);
    let before = Instant::now();
    // One message meets the 429 ...
    let first = stream_all(
        &h,
        vec![batch(1, vec![fcm_recipient(2, &[("first_name", "B")])])],
    );
    let after_429 = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fcm.stats().status(429) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        fcm.faults().set_quota_exceeded_per_mille(0);
        // ... and the app's next messages, sent right after it, must wait out the Retry-After
        // too, although FCM would now accept them.
        let recipients = (3..=12)
            .map(|n| fcm_recipient(n, &[("first_name", "C")]))
            .collect();
        stream_all(&h, vec![batch(2, recipients)]).await
    };
    let (mut receipts, rest) = tokio::join!(first, after_429);
    receipts.extend(rest);
    let terminal = terminal_by_message(&receipts);
    assert_eq!(terminal.len(), 11);
    assert!(
        terminal
            .values()
            .all(|r| status(r) == ReceiptStatus::Delivered)
    );
    assert_eq!(fcm.stats().status(429), 1);
    let later: Vec<_> = fcm
        .accepted()
        .into_iter()
        .filter(|a| a.received_at > before)
        .collect();
    assert_eq!(later.len(), 11);
    for a in later {
        // The 429 was answered after `before`, so Retry-After (1 s) ends after before + 1 s.
        let waited = a.received_at - before;
        assert!(
            waited >= Duration::from_secs(1),
            "{} reached FCM after {waited:?}",
            a.token
        );
    }
    h.gateway.shutdown().await.unwrap();
}
