//! Property tests of the invariant that crosses every stage: for any sequence of provider
//! answers, each accepted message gets exactly one terminal receipt (never none, never two),
//! with the status the answers call for, and no retry is scheduled past its ttl.
//!
//! The seam: the real data path (`Gateway::start`: ingest, policy, limit, deliver with its
//! retries, the memory store's retry heap, the receipt hub) with a provider whose answers are
//! scripted per device token by proptest. The scripted answers are HTTP responses as APNs and
//! FCM send them (docs/providers.md), classified by the providers' own classifiers
//! (`provider::{apns,fcm}::response::classify`), plus the transport failures the HTTP/2 pool
//! reports (timeouts, lost connections, no connection), each after a scripted delay. Time is
//! tokio's paused clock, so backoff and Retry-After waits take no real time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use proptest::prelude::*;
use pushgate::app::Gateway;
use pushgate::config::{PipelineConfig, RetryConfig};
use pushgate::domain::{
    Batch, Outcome, Platform, ProviderRequest, Receipt, ReceiptStatus, Recipient, Template,
};
use pushgate::metrics::Metrics;
use pushgate::provider::Provider;
use pushgate::provider::apns::response as apns;
use pushgate::provider::fcm::response as fcm;
use pushgate::receipts::ReceiptEnvelope;
use pushgate::registry::{AppRegistry, AppRuntime};
use tokio::sync::mpsc;

/// One provider answer to one attempt.
#[derive(Debug, Clone)]
enum Answer {
    /// An HTTP response: status, `Retry-After` (FCM only) and body.
    Http(u16, Option<&'static str>, &'static str),
    /// What the HTTP/2 pool reports when the request timed out, the connection was lost
    /// mid-request, or no connection could be had: a transient failure with status 0.
    Transport(&'static str),
}

const APNS_ANSWERS: &[(u16, &str)] = &[
    (200, ""),
    (400, r#"{"reason":"BadDeviceToken"}"#),
    (400, r#"{"reason":"PayloadTooLarge"}"#),
    (400, r#"{"reason":"IdleTimeout"}"#),
    (403, r#"{"reason":"InvalidProviderToken"}"#),
    (
        410,
        r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
    ),
    (413, r#"{"reason":"PayloadTooLarge"}"#),
    (429, r#"{"reason":"TooManyRequests"}"#),
    (500, r#"{"reason":"InternalServerError"}"#),
    (503, r#"{"reason":"ServiceUnavailable"}"#),
    (503, r#"{"reason":"Shutdown"}"#),
    (502, "<html>Bad Gateway</html>"),
];

const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

fn fcm_answers() -> Vec<(u16, Option<&'static str>, &'static str)> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let err = |status: u16, canonical: &str, code: &str| {
        leak(format!(
            r#"{{"error":{{"code":{status},"message":"m","status":"{canonical}","details":[{{"@type":"{FCM_ERROR}","errorCode":"{code}"}}]}}}}"#
        ))
    };
    vec![
        (200, None, r#"{"name":"projects/p/messages/1"}"#),
        (200, None, "{}"),
        (404, None, err(404, "NOT_FOUND", "UNREGISTERED")),
        (400, None, err(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")),
        (
            403,
            None,
            err(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
        ),
        (
            401,
            None,
            err(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"),
        ),
        (
            429,
            Some("7"),
            err(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
        ),
        (429, None, err(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")),
        (
            429,
            Some("100000"),
            err(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
        ),
        (
            503,
            Some("Wed, 21 Oct 2099 07:28:00 GMT"),
            err(503, "UNAVAILABLE", "UNAVAILABLE"),
        ),
        (500, None, err(500, "INTERNAL", "INTERNAL")),
        (502, Some("2"), "<html>502</html>"),
        (
            404,
            None,
            r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND"}}"#,
        ),
    ]
}

const TRANSPORT: &[&str] = &[
    "request timed out after 10s",
    "connection closed: GOAWAY",
    "no healthy connection to api.push.apple.com: connection refused",
];

/// The outcome the real provider reports for `answer` (a 403 that rejects APNs credentials
/// ends the message FAILED, as `ApnsProvider` does).
fn classify(platform: Platform, answer: &Answer) -> Outcome {
    match answer {
        Answer::Transport(reason) => Outcome::Retry {
            reason: (*reason).into(),
            status: 0,
            retry_after: None,
        },
        Answer::Http(status, retry_after, body) => match platform {
            Platform::Apns => match apns::classify(*status, body.as_bytes(), Some("id")) {
                apns::Verdict::Final(outcome) => outcome,
                apns::Verdict::CredentialsRejected(reason) => Outcome::Failed {
                    reason,
                    status: 403,
                },
                apns::Verdict::RefreshToken => unreachable!("not scripted"),
            },
            Platform::Fcm => {
                match fcm::classify(*status, body.as_bytes(), *retry_after, SystemTime::now()) {
                    fcm::Verdict::Final(outcome) => outcome,
                    fcm::Verdict::RefreshToken(_) => unreachable!("not scripted"),
                }
            }
        },
    }
}

/// A step of a script: how long the provider takes, and what it answers.
#[derive(Debug, Clone)]
struct Step {
    delay_ms: u64,
    answer: Answer,
}

fn steps(platform: Platform) -> BoxedStrategy<Vec<Step>> {
    let http: BoxedStrategy<Answer> = match platform {
        Platform::Apns => proptest::sample::select(APNS_ANSWERS)
            .prop_map(|(s, b)| Answer::Http(s, None, b))
            .boxed(),
        Platform::Fcm => proptest::sample::select(fcm_answers())
            .prop_map(|(s, r, b)| Answer::Http(s, r, b))
            .boxed(),
    };
    let answer = prop_oneof![
        4 => http,
        1 => proptest::sample::select(TRANSPORT).prop_map(Answer::Transport),
    ];
    proptest::collection::vec(
        (prop_oneof![3 => Just(0u64), 1 => 1u64..3_000], answer)
            .prop_map(|(delay_ms, answer)| Step { delay_ms, answer }),
        0..6,
    )
    .boxed()
}

/// One message of a case: its platform and the answers to its attempts (after the script, the
/// provider delivers).
#[derive(Debug, Clone)]
struct Message {
    platform: Platform,
    steps: Vec<Step>,
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![Just(Platform::Apns), Just(Platform::Fcm)].prop_flat_map(|platform| {
        steps(platform).prop_map(move |steps| Message { platform, steps })
    })
}

/// Answers each token's attempts from its script; counts the attempts.
struct Scripted {
    platform: Platform,
    scripts: HashMap<String, Vec<Step>>,
    calls: Mutex<HashMap<String, u32>>,
}

impl Provider for Scripted {
    fn platform(&self) -> Platform {
        self.platform
    }

    fn deliver<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Outcome> {
        let token = request.device_token().to_owned();
        let n = {
            let mut calls = self.calls.lock();
            let n = calls.entry(token.clone()).or_default();
            *n += 1;
            *n
        };
        let step = self
            .scripts
            .get(&token)
            .and_then(|s| s.get(n as usize - 1))
            .cloned();
        let platform = self.platform;
        Box::pin(async move {
            match step {
                Some(step) => {
                    tokio::time::sleep(Duration::from_millis(step.delay_ms)).await;
                    classify(platform, &step.answer)
                }
                None => Outcome::Delivered {
                    provider_message_id: "scripted".into(),
                    status: 200,
                },
            }
        })
    }
}

/// What the answers call for: the terminal status, the attempts made, and whether a retry was
/// scheduled on the way (only then may the ttl end the message first, EXPIRED).
fn expected(m: &Message, max_attempts: u32) -> (ReceiptStatus, u32) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = match m.steps.get(attempt as usize - 1) {
            Some(step) => classify(m.platform, &step.answer),
            None => return (ReceiptStatus::Delivered, attempt),
        };
        let status = match outcome {
            Outcome::Delivered { .. } => ReceiptStatus::Delivered,
            Outcome::InvalidToken { .. } => ReceiptStatus::InvalidToken,
            Outcome::Rejected { .. } => ReceiptStatus::Rejected,
            Outcome::Failed { .. } => ReceiptStatus::Failed,
            Outcome::Retry { .. } if attempt >= max_attempts => ReceiptStatus::Failed,
            Outcome::Retry { .. } => continue,
        };
        return (status, attempt);
    }
}

fn token(platform: Platform, i: usize) -> String {
    match platform {
        Platform::Apns => format!("{i:064x}"),
        Platform::Fcm => format!("fcm-token-{i}"),
    }
}

/// Runs one case through the data path; returns every receipt the hub and the caller saw.
fn run_case(messages: &[Message], retry: RetryConfig, ttl: Option<Duration>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let scripts = |platform: Platform| {
            Arc::new(Scripted {
                platform,
                scripts: messages
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.platform == platform)
                    .map(|(i, m)| (token(platform, i), m.steps.clone()))
                    .collect(),
                calls: Mutex::default(),
            })
        };
        let (apns, fcm) = (scripts(Platform::Apns), scripts(Platform::Fcm));
        let app = AppRuntime {
            id: "shop".into(),
            apns_topic: "com.example.shop".into(),
            apns: Some(Arc::clone(&apns) as Arc<dyn Provider>),
            fcm: Some(Arc::clone(&fcm) as Arc<dyn Provider>),
            retry: retry.clone(),
        };
        let metrics = Arc::new(Metrics::new());
        let gateway = Gateway::start(
            AppRegistry::from_apps([app]),
            PipelineConfig {
                shutdown_grace_secs: 0,
                ..Default::default()
            },
            Arc::clone(&metrics),
        );
        let mut hub = gateway.hub().subscribe("shop");
        let (sink, mut caller) = mpsc::unbounded_channel::<ReceiptEnvelope>();
        let mut batch = Batch {
            app_id: "shop".into(),
            batch_id: "b".into(),
            campaign_id: String::new(),
            template: Template {
                title: "Hello".into(),
                body: "there".into(),
                ttl,
                ..Default::default()
            },
            recipients: messages
                .iter()
                .enumerate()
                .map(|(i, m)| Recipient {
                    message_id: format!("m-{i}"),
                    platform: m.platform,
                    device_token: token(m.platform, i),
                    vars: Default::default(),
                    user_id: format!("u-{i}"),
                    locale: String::new(),
                    timezone: String::new(),
                    apns_json: String::new(),
                    fcm_json: String::new(),
                    title: None,
                    body: None,
                    token_registered_at_ms: 0,
                    send_at_ms: 0,
                })
                .collect(),
            campaign_rate_per_minute: 0,
            bypass_policies: false,
            send_at_ms: 0,
            local_send_time: String::new(),
            late_sends_now: false,
            optimal_send_time: false,
        };
        let result = gateway
            .submit(&mut batch, Some(&sink), false)
            .await
            .unwrap();
        assert_eq!(result.accepted(), messages.len(), "{:?}", result.results);

        // Until every message has a terminal receipt on the hub; then ten more (paused)
        // minutes, in which a second one would show.
        let mut seen: Vec<Arc<Receipt>> = Vec::new();
        let terminal = |seen: &[Arc<Receipt>]| seen.iter().filter(|r| r.terminal()).count();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3_600);
        while terminal(&seen) < messages.len() && tokio::time::Instant::now() < deadline {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(60), hub.recv()).await {
                seen.push(r);
            }
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
        while let Ok(r) = hub.try_recv() {
            seen.push(r);
        }
        let mut at_caller = Vec::new();
        while let Ok(envelope) = caller.try_recv() {
            at_caller.push(envelope.receipt);
        }

        for (i, m) in messages.iter().enumerate() {
            let id = format!("m-{i}");
            let mine: Vec<&Arc<Receipt>> =
                seen.iter().filter(|r| r.meta.message_id == id).collect();
            let ends: Vec<&&Arc<Receipt>> = mine.iter().filter(|r| r.terminal()).collect();
            assert_eq!(ends.len(), 1, "{id} ({m:?}): terminal receipts {ends:?}");
            let end = ends[0];
            let caller_ends = at_caller
                .iter()
                .filter(|r| r.meta.message_id == id && r.terminal())
                .count();
            assert_eq!(caller_ends, 1, "{id}: terminal receipts at the caller");

            let calls = match m.platform {
                Platform::Apns => &apns.calls,
                Platform::Fcm => &fcm.calls,
            };
            let calls = calls
                .lock()
                .get(&token(m.platform, i))
                .copied()
                .unwrap_or(0);
            let (status, attempts) = expected(m, retry.max_attempts);
            if end.status == ReceiptStatus::Expired {
                assert!(ttl.is_some(), "{id}: EXPIRED without a ttl");
                assert!(
                    calls < attempts && calls >= 1,
                    "{id}: expired after {calls} of {attempts} attempts"
                );
            } else {
                assert_eq!(end.status, status, "{id} ({m:?}): {end:?}");
                assert_eq!(calls, attempts, "{id}: provider attempts");
            }
            assert_eq!(end.attempt, calls, "{id}: the receipt's attempt count");
            for r in &mine {
                if r.status == ReceiptStatus::Retrying {
                    let next = r.next_attempt_at.expect("a RETRYING receipt says when");
                    if let Some(expires) = r.meta.expires_at {
                        assert!(
                            next < expires,
                            "{id}: retry at {next:?}, after expiry {expires:?}"
                        );
                    }
                }
            }
        }
        assert_eq!(
            gateway.hub().in_flight().get(),
            0,
            "messages left in flight"
        );
        assert_eq!(metrics.unresolved_drops.get(), 0);
    });
}

proptest! {
    // Each case is a gateway on a paused clock: cheap, but not free on two cores.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn each_message_gets_exactly_one_terminal_receipt(
        messages in proptest::collection::vec(message(), 1..7),
        max_attempts in 1u32..6,
        ttl_secs in proptest::option::weighted(0.4, 1u64..120),
    ) {
        let retry = RetryConfig {
            base_ms: 200,
            cap_ms: 5_000,
            max_attempts,
            max_retry_after_secs: 60,
        };
        run_case(&messages, retry, ttl_secs.map(Duration::from_secs));
    }
}
