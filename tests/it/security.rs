//! Security through the real gateway: the authorization matrix (every RPC x own app / other app /
//! unknown app / no key / wrong key / wrong scope), `sha256:` keys, keys and certificates
//! reloaded as on SIGHUP, reflection off, TLS and mutual TLS with certificates made here, the
//! refusal to start open on 0.0.0.0, and each request cap refused with the field named while
//! another caller's traffic keeps flowing.

use crate::harness::tls::TestCa;
use crate::harness::{self, MoreApp, Options, recipient, status, template};

use std::time::{Duration, Instant};

use pushgate::proto::push_gateway_admin_client::PushGatewayAdminClient;
use pushgate::proto::push_gateway_client::PushGatewayClient;
use pushgate::proto::push_gateway_insights_client::PushGatewayInsightsClient;
use pushgate::proto::push_gateway_policy_client::PushGatewayPolicyClient;
use pushgate::proto::{self, ReceiptStatus};
use pushgate_mocks::redis_server::RedisServer;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

const SHOP_KEY: &str = "shop-api-key-0123456789";
const SHOP_ADMIN: &str = "shop-admin-key-0123456789";
const NEWS_KEY: &str = "news-api-key-0123456789";

fn digest(key: &str) -> String {
    let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A request carrying `key` as its bearer token (none: no header).
fn signed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

fn batch(app: &str, ids: std::ops::Range<u64>) -> proto::SendBatchRequest {
    proto::SendBatchRequest {
        app_id: app.into(),
        template: Some(template("Hi", "there")),
        recipients: ids.map(|n| recipient(n, &[])).collect(),
        wait_for_receipts: true,
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    SendBatch,
    StreamSend,
    SubscribeReceipts,
    ListDeadLetters,
    ReplayDeadLetters,
    PurgeDeadLetters,
    ListInvalidTokens,
    SetOptOut,
    ClearOptOut,
    ForgetUser,
    CancelScheduled,
    TrackEvents,
    GetCampaignStats,
}

const RPCS: [Rpc; 13] = [
    Rpc::SendBatch,
    Rpc::StreamSend,
    Rpc::SubscribeReceipts,
    Rpc::ListDeadLetters,
    Rpc::ReplayDeadLetters,
    Rpc::PurgeDeadLetters,
    Rpc::ListInvalidTokens,
    Rpc::SetOptOut,
    Rpc::ClearOptOut,
    Rpc::ForgetUser,
    Rpc::CancelScheduled,
    Rpc::TrackEvents,
    Rpc::GetCampaignStats,
];

/// Calls `rpc` for `app` with `key`: `Ok` when served, else the code and message. A StreamSend
/// batch refused for authorization comes back as REJECTED receipts naming `app_id`; that is
/// reported as PERMISSION_DENIED with the receipt's reason.
async fn call(
    channel: &Channel,
    rpc: Rpc,
    app: &str,
    key: Option<&str>,
    n: u64,
) -> Result<(), (Code, String)> {
    let err = |s: tonic::Status| (s.code(), s.message().to_string());
    let mut api = PushGatewayClient::new(channel.clone());
    let mut admin = PushGatewayAdminClient::new(channel.clone());
    let mut policy = PushGatewayPolicyClient::new(channel.clone());
    let mut insights = PushGatewayInsightsClient::new(channel.clone());
    let opt_out = || proto::OptOutRequest {
        app_id: app.into(),
        user_id: format!("u-matrix-{n}"),
    };
    match rpc {
        Rpc::SendBatch => {
            let response = api
                .send_batch(signed(batch(app, n..n + 1), key))
                .await
                .map_err(err)?
                .into_inner();
            assert_eq!(response.accepted, 1, "{response:?}");
            Ok(())
        }
        Rpc::StreamSend => {
            let mut b = batch(app, n..n + 1);
            b.wait_for_receipts = false;
            let outbound = tokio_stream::iter(vec![b]);
            let mut inbound = api
                .stream_send(signed(outbound, key))
                .await
                .map_err(err)?
                .into_inner();
            let mut last = None;
            while let Some(r) = inbound.message().await.map_err(err)? {
                last = Some(r);
            }
            let r = last.expect("one receipt");
            if status(&r) == ReceiptStatus::Rejected && r.field == "app_id" {
                return Err((Code::PermissionDenied, r.reason));
            }
            assert_eq!(status(&r), ReceiptStatus::Delivered, "{r:?}");
            Ok(())
        }
        Rpc::SubscribeReceipts => {
            api.subscribe_receipts(signed(
                proto::SubscribeReceiptsRequest {
                    app_id: app.into(),
                    ..Default::default()
                },
                key,
            ))
            .await
            .map_err(err)?;
            Ok(())
        }
        Rpc::ListDeadLetters => {
            admin
                .list_dead_letters(signed(
                    proto::ListDeadLettersRequest {
                        app_id: app.into(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map_err(err)?;
            Ok(())
        }
        Rpc::ReplayDeadLetters => {
            let replayed = admin
                .replay_dead_letters(signed(
                    proto::ReplayDeadLettersRequest {
                        app_id: app.into(),
                        message_ids: vec!["no-such-letter".into()],
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map_err(err)?
                .into_inner()
                .replayed;
            assert_eq!(replayed, 0);
            Ok(())
        }
        Rpc::PurgeDeadLetters => {
            let purged = admin
                .purge_dead_letters(signed(
                    proto::PurgeDeadLettersRequest {
                        app_id: app.into(),
                        message_ids: vec!["no-such-letter".into()],
                    },
                    key,
                ))
                .await
                .map_err(err)?
                .into_inner()
                .purged;
            assert_eq!(purged, 0);
            Ok(())
        }
        Rpc::ListInvalidTokens => {
            let mut stream = policy
                .list_invalid_tokens(signed(
                    proto::ListInvalidTokensRequest {
                        app_id: app.into(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map_err(err)?
                .into_inner();
            while stream.message().await.map_err(err)?.is_some() {}
            Ok(())
        }
        Rpc::SetOptOut => {
            let changed = policy
                .set_opt_out(signed(opt_out(), key))
                .await
                .map_err(err)?
                .into_inner()
                .changed;
            assert!(changed, "a new user id is opted out");
            Ok(())
        }
        Rpc::ClearOptOut => {
            policy
                .clear_opt_out(signed(opt_out(), key))
                .await
                .map_err(err)?;
            Ok(())
        }
        Rpc::ForgetUser => {
            policy
                .forget_user(signed(
                    proto::ForgetUserRequest {
                        app_id: app.into(),
                        user_id: format!("u-matrix-{n}"),
                    },
                    key,
                ))
                .await
                .map_err(err)?;
            Ok(())
        }
        Rpc::CancelScheduled => {
            let cancelled = policy
                .cancel_scheduled(signed(
                    proto::CancelScheduledRequest {
                        app_id: app.into(),
                        campaign_id: "no-such-campaign".into(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map_err(err)?
                .into_inner()
                .cancelled;
            assert_eq!(cancelled, 0);
            Ok(())
        }
        Rpc::TrackEvents => {
            insights
                .track_events(signed(
                    proto::TrackEventsRequest {
                        app_id: app.into(),
                        events: vec![proto::TrackedEvent {
                            event_id: format!("e-{n}"),
                            r#type: proto::EventType::Open as i32,
                            message_id: format!("m-{n}"),
                            ..Default::default()
                        }],
                    },
                    key,
                ))
                .await
                .map_err(err)?;
            Ok(())
        }
        Rpc::GetCampaignStats => {
            insights
                .get_campaign_stats(signed(
                    proto::GetCampaignStatsRequest {
                        app_id: app.into(),
                        campaign_id: "spring".into(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .map_err(err)?;
            Ok(())
        }
    }
}

fn is_admin(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::ListDeadLetters | Rpc::ReplayDeadLetters | Rpc::PurgeDeadLetters
    )
}

/// Every RPC of the four services (send, admin, policy, insights) x {own app, other tenant's
/// app, unknown app} x {no key, unknown key, api key,
/// admin key (configured as a `sha256:` digest)}; plus: "other" and "unknown" get the very same
/// answer, and a StreamSend batch refused for another tenant's app reaches none of that app's
/// subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let redis = RedisServer::start();
    let h = harness::start(Options {
        api_keys: vec![SHOP_KEY.into()],
        admin_keys: vec![digest(SHOP_ADMIN)],
        more_apps: vec![MoreApp {
            id: "news".into(),
            api_keys: vec![digest(NEWS_KEY)],
            admin_keys: Vec::new(),
        }],
        pipeline: "shutdown_grace_secs = 5\nmax_replay_dead_letters = 2".into(),
        extra: format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
        ..Default::default()
    })
    .await;
    let channel = h.channel().await;

    // A subscriber of `news`, to prove refused batches for `news` never reach it.
    let mut news_feed = PushGatewayClient::new(channel.clone())
        .subscribe_receipts(signed(
            proto::SubscribeReceiptsRequest {
                app_id: "news".into(),
                ..Default::default()
            },
            Some(NEWS_KEY),
        ))
        .await
        .unwrap()
        .into_inner();

    let mut n = 0;
    for rpc in RPCS {
        for key in [None, Some("not-a-configured-key-0123")] {
            for app in ["shop", "news", "ghost"] {
                n += 1;
                let got = call(&channel, rpc, app, key, n).await;
                assert!(
                    matches!(&got, Err((Code::Unauthenticated, _))),
                    "{rpc:?} {app} {key:?}: {got:?}"
                );
            }
        }
        for key in [SHOP_KEY, SHOP_ADMIN] {
            n += 1;
            let own = call(&channel, rpc, "shop", Some(key), n).await;
            if is_admin(rpc) && key == SHOP_KEY {
                // Wrong scope: an api key on an admin RPC.
                assert!(
                    matches!(&own, Err((Code::PermissionDenied, _))),
                    "{rpc:?} with the api key: {own:?}"
                );
            } else {
                assert!(own.is_ok(), "{rpc:?} shop {key}: {own:?}");
            }
            n += 1;
            let other = call(&channel, rpc, "news", Some(key), n).await;
            n += 1;
            let unknown = call(&channel, rpc, "ghost", Some(key), n).await;
            let Err((code, message)) = &other else {
                panic!("{rpc:?} news with {key}: {other:?}")
            };
            assert_eq!(*code, Code::PermissionDenied, "{rpc:?}: {message}");
            assert_eq!(
                other, unknown,
                "{rpc:?}: other tenant's app and unknown app alike"
            );
            assert!(
                !message.contains("news") && !message.contains("ghost"),
                "{message}"
            );
        }
        // The news key, for its own app (a `sha256:` api key) and not for shop.
        n += 1;
        let own = call(&channel, rpc, "news", Some(NEWS_KEY), n).await;
        if is_admin(rpc) {
            assert!(
                matches!(&own, Err((Code::PermissionDenied, _))),
                "{rpc:?}: {own:?}"
            );
        } else {
            assert!(own.is_ok(), "{rpc:?} news with its key: {own:?}");
        }
        n += 1;
        let shop = call(&channel, rpc, "shop", Some(NEWS_KEY), n).await;
        assert!(
            matches!(&shop, Err((Code::PermissionDenied, _))),
            "{rpc:?}: {shop:?}"
        );
    }

    // The news subscriber saw only the news app's own two deliveries (SendBatch, StreamSend):
    // the batches shop's keys tried to send as `news` over StreamSend came earlier and would
    // have come first, but left no receipt there.
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(10), news_feed.next())
            .await
            .expect("the news app's own receipts")
            .unwrap()
            .unwrap();
        assert_eq!(r.app_id, "news");
        assert_eq!(status(&r), ReceiptStatus::Delivered, "{r:?}");
    }

    // ReplayDeadLetters has an upper limit (here 2).
    let err = PushGatewayAdminClient::new(channel.clone())
        .replay_dead_letters(signed(
            proto::ReplayDeadLettersRequest {
                app_id: "shop".into(),
                message_ids: vec!["a".into(), "b".into(), "c".into()],
                ..Default::default()
            },
            Some(SHOP_ADMIN),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("message_ids"), "{}", err.message());
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

/// Open mode (no key at all): sending works as before, admin RPCs are refused unless
/// `allow_unauthenticated = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_serves_admin_rpcs_only_when_allowed() {
    let redis = RedisServer::start();
    for allowed in [false, true] {
        let h = harness::start(Options {
            top: format!("allow_unauthenticated = {allowed}"),
            extra: format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
            ..Default::default()
        })
        .await;
        let channel = h.channel().await;
        let n = u64::from(allowed);
        assert!(
            call(&channel, Rpc::SendBatch, "shop", None, n)
                .await
                .is_ok()
        );
        for rpc in [
            Rpc::ListDeadLetters,
            Rpc::ReplayDeadLetters,
            Rpc::PurgeDeadLetters,
        ] {
            let got = call(&channel, rpc, "shop", None, 0).await;
            if allowed {
                assert!(got.is_ok(), "{rpc:?}: {got:?}");
            } else {
                assert!(
                    matches!(&got, Err((Code::PermissionDenied, m)) if m.contains("allow_unauthenticated")),
                    "{rpc:?}: {got:?}"
                );
            }
        }
        h.gateway.shutdown().await.unwrap();
    }
}

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    Ok(tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pushgate.v1.PushGateway".into(),
        })
        .await?
        .into_inner()
        .status)
}

/// The services listed by `v1alpha` reflection (what grpcio-reflection and older grpcurl ask).
async fn reflection_v1alpha(channel: Channel) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, server_reflection_request};
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut inbound = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let answer = inbound.message().await?;
    Ok(match answer.and_then(|a| a.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        _ => Vec::new(),
    })
}

async fn reflection(channel: Channel) -> Result<(), tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request};
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut inbound = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    inbound.message().await?;
    Ok(())
}

/// Health stays open to probes with keys configured; reflection is on by default and off with
/// `reflection = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_open_and_reflection_can_be_turned_off() {
    for on in [true, false] {
        let h = harness::start(Options {
            api_keys: vec![SHOP_KEY.into()],
            top: format!("reflection = {on}"),
            ..Default::default()
        })
        .await;
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        assert_eq!(health(h.channel().await).await.unwrap(), serving);
        let got = reflection(h.channel().await).await;
        let alpha = reflection_v1alpha(h.channel().await).await;
        if on {
            assert!(got.is_ok(), "{got:?}");
            let services = alpha.unwrap();
            assert!(
                services.iter().any(|s| s == "pushgate.v1.PushGateway"),
                "v1alpha lists the API: {services:?}"
            );
        } else {
            assert_eq!(got.unwrap_err().code(), Code::Unimplemented);
            assert_eq!(alpha.unwrap_err().code(), Code::Unimplemented);
        }
        h.gateway.shutdown().await.unwrap();
    }
}

/// Keys are replaced by a reload (what SIGHUP runs): a rotated-out key is refused at once, the
/// new one works, and a config that fails validation changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reload_as_on_sighup() {
    let h = harness::start(Options::default()).await;
    let file = h.dir.path().join("pushgate.toml");
    let key_file = h.dir.path().join("AuthKey.p8");
    let config = |keys: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\n[apps.shop]\napi_keys = {keys}\n[apps.shop.apns]\nkey_file = \"{}\"\nkey_id = \"{}\"\nteam_id = \"{}\"\ntopic = \"{}\"\nendpoint = \"{}\"\n",
            key_file.display(),
            h.key.key_id,
            h.key.team_id,
            harness::TOPIC,
            h.mock.url()
        )
    };
    std::fs::write(&file, config(&format!("[\"{SHOP_KEY}\"]"))).unwrap();
    let running = pushgate::app::start(pushgate::config::Config::load(Some(&file)).unwrap())
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(
        call(&channel, Rpc::SendBatch, "shop", Some(SHOP_KEY), 1)
            .await
            .is_ok()
    );

    let rotated = "shop-rotated-key-0123456789";
    std::fs::write(&file, config(&format!("[\"{}\"]", digest(rotated)))).unwrap();
    let reloaded = pushgate::app::reload(&running.reloadable(), Some(&file)).unwrap();
    assert_eq!(reloaded.keys, 1);
    let old = call(&channel, Rpc::SendBatch, "shop", Some(SHOP_KEY), 2).await;
    assert!(matches!(old, Err((Code::Unauthenticated, _))), "{old:?}");
    assert!(
        call(&channel, Rpc::SendBatch, "shop", Some(rotated), 3)
            .await
            .is_ok()
    );

    // An invalid key in the file: the reload fails naming it, the rotated key still works.
    std::fs::write(&file, config("[\"short\"]")).unwrap();
    let err = pushgate::app::reload(&running.reloadable(), Some(&file)).unwrap_err();
    assert!(err.to_string().contains("apps.shop.api_keys[0]"), "{err}");
    assert!(
        call(&channel, Rpc::SendBatch, "shop", Some(rotated), 4)
            .await
            .is_ok()
    );
    running.shutdown().await.unwrap();
    h.gateway.shutdown().await.unwrap();
}

/// The binary refuses to start with no key on a non-loopback address, says why naming
/// `listen`, and starts when `allow_unauthenticated = true` says so; then a real SIGHUP
/// reloads its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_open_on_all_interfaces_and_reloads_keys_on_sighup() {
    let h = harness::start(Options::default()).await;
    let file = h.dir.path().join("pushgate.toml");
    let key_file = h.dir.path().join("AuthKey.p8");
    let port = {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = |top: &str, keys: &str| {
        format!(
            "listen = \"0.0.0.0:{port}\"\n{top}\n[apps.shop]\napi_keys = {keys}\n[apps.shop.apns]\nkey_file = \"{}\"\nkey_id = \"{}\"\nteam_id = \"{}\"\ntopic = \"{}\"\nendpoint = \"{}\"\n",
            key_file.display(),
            h.key.key_id,
            h.key.team_id,
            harness::TOPIC,
            h.mock.url()
        )
    };
    let serve = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"));
        command
            .args(["serve", "--config"])
            .arg(&file)
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .stdout(std::process::Stdio::null());
        command
    };

    std::fs::write(&file, config("", "[]")).unwrap();
    let out = serve()
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started open on 0.0.0.0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`listen`") && stderr.contains("allow_unauthenticated"),
        "{stderr}"
    );

    // Open on purpose: it starts (and serves sending without a key).
    std::fs::write(&file, config("allow_unauthenticated = true", "[]")).unwrap();
    let mut child = serve().stderr(std::process::Stdio::null()).spawn().unwrap();
    let channel = connect_retrying(port).await;
    assert!(
        call(&channel, Rpc::SendBatch, "shop", None, 1)
            .await
            .is_ok()
    );

    // Keys added by a SIGHUP: anonymous callers are now refused, the key works.
    std::fs::write(
        &file,
        config(
            "allow_unauthenticated = true",
            &format!("[\"{}\"]", digest(SHOP_KEY)),
        ),
    )
    .unwrap();
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call(&channel, Rpc::SendBatch, "shop", None, 2).await {
            Err((Code::Unauthenticated, _)) => break,
            other => {
                assert!(Instant::now() < deadline, "SIGHUP never applied: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        call(&channel, Rpc::SendBatch, "shop", Some(SHOP_KEY), 3)
            .await
            .is_ok()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = child.wait();
    h.gateway.shutdown().await.unwrap();
}

async fn connect_retrying(port: u16) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(e) => {
                assert!(Instant::now() < deadline, "the gateway never listened: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The field a refusal names (its first BadRequest field violation).
fn field_of(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

/// Another caller (the `news` app, its own key) keeping a StreamSend open: each call sends one
/// message and waits for its DELIVERED receipt.
struct Neighbour {
    tx: tokio::sync::mpsc::Sender<proto::SendBatchRequest>,
    inbound: tonic::Streaming<proto::Receipt>,
    n: u64,
}

impl Neighbour {
    async fn open(channel: &Channel) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let inbound = PushGatewayClient::new(channel.clone())
            .stream_send(signed(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                Some(NEWS_KEY),
            ))
            .await
            .unwrap()
            .into_inner();
        Self {
            tx,
            inbound,
            n: 1_000_000,
        }
    }

    async fn flows(&mut self) {
        self.n += 1;
        let mut b = batch("news", self.n..self.n + 1);
        b.wait_for_receipts = false;
        self.tx.send(b).await.unwrap();
        let want = format!("m-{}", self.n);
        loop {
            let r = self.inbound.message().await.unwrap().expect("stream open");
            if r.message_id == want && r.terminal {
                assert_eq!(status(&r), ReceiptStatus::Delivered, "{r:?}");
                return;
            }
        }
    }
}

/// Each cap is answered before any work with INVALID_ARGUMENT naming the field (the decode
/// limit with OUT_OF_RANGE, before decoding), while another caller's stream keeps delivering
/// between the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_caps_refuse_the_batch_naming_the_field() {
    let h = harness::start(Options {
        api_keys: vec![SHOP_KEY.into()],
        more_apps: vec![MoreApp {
            id: "news".into(),
            api_keys: vec![NEWS_KEY.into()],
            admin_keys: Vec::new(),
        }],
        pipeline: [
            "shutdown_grace_secs = 5",
            "max_batch_recipients = 5",
            "max_id_bytes = 32",
            "max_vars_per_recipient = 3",
            "max_vars_bytes = 64",
            "max_template_field_bytes = 100",
            "max_template_data_entries = 2",
            "max_raw_json_bytes = 50",
            "max_request_bytes = 20000",
        ]
        .join("\n"),
        ..Default::default()
    })
    .await;
    let channel = h.channel().await;
    let mut neighbour = Neighbour::open(&channel).await;
    neighbour.flows().await;

    let long = |n: usize| "x".repeat(n);
    let ok = || batch("shop", 0..2);
    type Edit = Box<dyn Fn(&mut proto::SendBatchRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("recipients", Box::new(|b| b.recipients.clear())),
        ("recipients", Box::new(|b| *b = batch("shop", 0..6))),
        ("batch_id", Box::new(move |b| b.batch_id = long(33))),
        ("campaign_id", Box::new(move |b| b.campaign_id = long(33))),
        (
            "recipients[1].message_id",
            Box::new(move |b| b.recipients[1].message_id = long(33)),
        ),
        (
            "recipients[0].user_id",
            Box::new(move |b| b.recipients[0].user_id = long(33)),
        ),
        (
            "recipients[1].vars",
            Box::new(|b| {
                for k in ["a", "b", "c", "d"] {
                    b.recipients[1].vars.insert(k.into(), "v".into());
                }
            }),
        ),
        (
            "recipients[0].vars",
            Box::new(move |b| {
                b.recipients[0].vars.insert("a".into(), long(40));
                b.recipients[0].vars.insert("b".into(), long(40));
            }),
        ),
        (
            "template.title",
            Box::new(move |b| b.template.as_mut().unwrap().title = long(101)),
        ),
        (
            "template.data",
            Box::new(|b| {
                let data = &mut b.template.as_mut().unwrap().data;
                for k in ["a", "b", "c"] {
                    data.insert(k.into(), "v".into());
                }
            }),
        ),
        (
            "template.data.k",
            Box::new(move |b| {
                b.template
                    .as_mut()
                    .unwrap()
                    .data
                    .insert("k".into(), long(101));
            }),
        ),
        (
            "template.apns_json",
            Box::new(move |b| {
                b.template.as_mut().unwrap().apns_json = format!("{{\"a\":\"{}\"}}", long(60))
            }),
        ),
        (
            "recipients[0].fcm_json",
            Box::new(move |b| b.recipients[0].fcm_json = format!("{{\"a\":\"{}\"}}", long(60))),
        ),
        (
            "recipients[1].body",
            Box::new(move |b| b.recipients[1].body = Some(long(101))),
        ),
    ];
    let mut client = PushGatewayClient::new(channel.clone());
    for (field, edit) in &cases {
        let mut b = ok();
        edit(&mut b);
        let err = client
            .send_batch(signed(b, Some(SHOP_KEY)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(field_of(&err), *field, "{}", err.message());
        assert!(err.message().starts_with(field), "{}", err.message());
        neighbour.flows().await;
    }
    // A request over the decode limit is refused by its length, before decoding.
    let mut big = batch("shop", 0..5);
    for r in &mut big.recipients {
        r.device_token = long(5_000);
    }
    let err = client
        .send_batch(signed(big, Some(SHOP_KEY)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    neighbour.flows().await;

    // Nothing was accepted by the refused batches; a batch within the caps still goes.
    let response = client
        .send_batch(signed(ok(), Some(SHOP_KEY)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 2);
    assert_eq!(h.mock.accepted().len(), neighbour_count(&neighbour) + 2);
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

/// A request far over the batch cap (here 1,000 empty recipients, 2 bytes each on the wire,
/// against a cap of 5) is refused while it arrives, before tonic decodes it: SendBatch answers
/// INVALID_ARGUMENT naming `recipients`, a StreamSend carrying it gets the receipts of what it
/// sent before and then the same status; a batch just over the cap still gets ingest's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_far_over_the_batch_cap_is_refused_before_it_is_decoded() {
    let h = harness::start(Options {
        api_keys: vec![SHOP_KEY.into()],
        pipeline: "shutdown_grace_secs = 5\nmax_batch_recipients = 5".into(),
        ..Default::default()
    })
    .await;
    let channel = h.channel().await;
    let mut client = PushGatewayClient::new(channel.clone());
    let mut flood = batch("shop", 0..0);
    flood.recipients = vec![proto::Recipient::default(); 1000];

    let err = client
        .send_batch(signed(flood.clone(), Some(SHOP_KEY)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("recipients: more than 10 recipients")
            && err.message().contains("refused before decoding"),
        "{}",
        err.message()
    );
    // Just over the cap: decoded, and answered by ingest with the count.
    let err = client
        .send_batch(signed(batch("shop", 0..6), Some(SHOP_KEY)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("recipients: 6 recipients"),
        "{}",
        err.message()
    );

    // StreamSend: a good batch, then the flood. The good batch's receipts arrive, then the
    // status that says why the gateway stopped reading.
    let mut good = batch("shop", 100..102);
    good.wait_for_receipts = false;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut inbound = client
        .stream_send(signed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(SHOP_KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    tx.send(good).await.unwrap();
    let mut delivered = 0;
    while delivered < 2 {
        let r = inbound.message().await.unwrap().expect("stream open");
        if r.terminal {
            assert_eq!(status(&r), ReceiptStatus::Delivered, "{r:?}");
            delivered += 1;
        }
    }
    tx.send(flood).await.unwrap();
    let end = match inbound.message().await {
        Ok(Some(r)) => panic!("no receipt expected after the good batch: {r:?}"),
        Ok(None) => panic!("the stream ended without saying why"),
        Err(status) => status,
    };
    assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
    assert!(
        end.message().contains("refused before decoding"),
        "{}",
        end.message()
    );
    assert_eq!(
        h.mock.accepted().len(),
        2,
        "only the good batch reached APNs"
    );
    assert_eq!(h.unresolved_drops(), 0);
    h.gateway.shutdown().await.unwrap();
}

fn neighbour_count(n: &Neighbour) -> usize {
    (n.n - 1_000_000) as usize
}

/// A StreamSend batch refused as a whole gives each recipient one short receipt: its own error
/// when one names it, else the first error and a count, never every error copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_send_refusals_are_one_short_error_per_recipient() {
    let h = harness::start(Options::default()).await;
    let unspecified = |mut r: proto::Recipient| {
        r.platform = proto::Platform::Unspecified as i32;
        r
    };
    // Every recipient wrong: each its own error.
    let mut all_bad = batch("shop", 0..200);
    all_bad.wait_for_receipts = false;
    all_bad.recipients = all_bad.recipients.into_iter().map(unspecified).collect();
    // One recipient wrong: the others get the first error and how many there were.
    let mut one_bad = batch("shop", 200..210);
    one_bad.wait_for_receipts = false;
    one_bad.recipients[3] = unspecified(one_bad.recipients[3].clone());
    // Over a cap (a 100 KB title is over the default 4 KB field cap).
    let mut over = batch("shop", 300..305);
    over.wait_for_receipts = false;
    over.template.as_mut().unwrap().title = "t".repeat(100_000);
    let receipts = harness::stream_all(&h, vec![all_bad, one_bad, over]).await;
    assert_eq!(receipts.len(), 215);
    for r in &receipts {
        assert_eq!(status(r), ReceiptStatus::Rejected, "{r:?}");
        assert!(
            r.reason.len() <= 300,
            "a short reason: {} bytes",
            r.reason.len()
        );
        assert!(
            !r.reason.contains("; "),
            "not a list of errors: {}",
            r.reason
        );
    }
    for (i, r) in receipts[..200].iter().enumerate() {
        assert_eq!(r.field, format!("recipients[{i}].platform"));
    }
    for (i, r) in receipts[200..210].iter().enumerate() {
        assert_eq!(r.field, "recipients[3].platform", "{i}");
        if i != 3 {
            assert!(
                r.reason
                    .starts_with("batch refused: recipients[3].platform"),
                "{}",
                r.reason
            );
        }
    }
    for r in &receipts[210..] {
        assert_eq!(r.field, "template.title");
    }

    // Fields each within their cap whose fixed text together can fit no provider payload: the
    // batch fails once, naming the template, before any recipient is rendered.
    let mut too_big = batch("shop", 400..410);
    too_big.template = Some(template(&"t".repeat(3_000), &"b".repeat(3_000)));
    let err = h.client().await.send_batch(too_big).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field_of(&err), "template", "{}", err.message());
    assert_eq!(h.mock.accepted().len(), 0);
    h.gateway.shutdown().await.unwrap();
}

/// A `StreamSend` caller that sends refused batches and never reads its receipts is not read
/// either once `max_unread_receipts` of them wait: the gateway stops taking its batches
/// instead of queueing their REJECTED receipts without end. When it reads, every recipient
/// still gets its receipt.
#[tokio::test]
async fn stream_send_caller_that_never_reads_is_not_read_either() {
    const CAP: u64 = 500;
    const BATCH: u64 = 100;
    const BATCHES: u64 = 1000;
    let h = harness::start(Options {
        pipeline: format!("shutdown_grace_secs = 5\nmax_unread_receipts = {CAP}"),
        ..Options::default()
    })
    .await;
    // Rejections go through the receipt hub, so a subscriber counts what the gateway took.
    let mut seen = h
        .client()
        .await
        .subscribe_receipts(proto::SubscribeReceiptsRequest {
            app_id: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (batches, outbound) = tokio::sync::mpsc::channel::<proto::SendBatchRequest>(16);
    let sender = tokio::spawn(async move {
        for n in 0..BATCHES {
            let mut b = batch("shop", n * BATCH..(n + 1) * BATCH);
            b.wait_for_receipts = false;
            for r in &mut b.recipients {
                r.platform = proto::Platform::Unspecified as i32;
            }
            if batches.send(b).await.is_err() {
                break;
            }
        }
    });
    // HTTP/2 windows of 64 KiB (hyper's default stream window is 2 MiB, room for some 20,000
    // short receipts on the wire), so what the windows buffer stays small beside the cap.
    let small_windows =
        tonic::transport::Endpoint::from_shared(format!("http://{}", h.gateway.addr))
            .unwrap()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .unwrap();
    let mut receipts = PushGatewayClient::new(small_windows)
        .stream_send(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();

    // Count what the gateway refuses while nobody reads the stream, until it stops.
    let mut taken = 0u64;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(2), seen.message()).await {
            Ok(Ok(Some(r))) => {
                assert_eq!(status(&r), ReceiptStatus::Rejected);
                taken += 1;
            }
            Ok(other) => panic!("subscription ended: {other:?}"),
            Err(_) => break,
        }
    }
    // The cap, plus the batch being refused when it was reached, plus what the HTTP/2 windows
    // and socket buffers hold (some hundreds of short receipts each way).
    assert!(
        taken < CAP + BATCH + 3_000,
        "{taken} of {} refused with no receipt read",
        BATCH * BATCHES
    );
    assert!(
        taken >= CAP,
        "only {taken} refused: the cap stopped the stream early"
    );
    drop(seen);

    // Reading again: the stream is read again, and every recipient gets its receipt.
    let mut count = 0u64;
    while let Some(r) = receipts.message().await.unwrap() {
        assert_eq!(status(&r), ReceiptStatus::Rejected);
        count += 1;
        if count == BATCH * BATCHES {
            break;
        }
    }
    assert_eq!(count, BATCH * BATCHES);
    sender.await.unwrap();
    h.gateway.shutdown().await.unwrap();
}

/// A TLS client of the gateway at `addr` trusting `ca`, with a client certificate when given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// SendBatch over `channel` (open mode), or why it failed (handshake or call).
async fn send_over(
    channel: Result<Channel, tonic::transport::Error>,
    n: u64,
) -> Result<(), String> {
    let channel = channel.map_err(|e| format!("connect: {e}"))?;
    call(&channel, Rpc::SendBatch, "shop", None, n)
        .await
        .map_err(|(code, message)| format!("{code:?}: {message}"))
}

/// TLS and mutual TLS on the listener with certificates made here: a client that trusts the
/// server's CA is served, a plaintext client or one trusting another CA is not; with
/// `client_ca_file`, only clients presenting a certificate signed by that CA are served; a
/// reload puts new certificate files in effect for new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let h = harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let rogue_ca = TestCa::new("rogue CA");
    let (cert, key) = server_ca.leaf("pushgate");
    let cert_file = write("tls.crt", &cert);
    let key_file = write("tls.key", &key);
    let client_ca_file = write("client-ca.crt", &client_ca.pem);
    let file = dir.path().join("pushgate.toml");
    let config = |mutual: bool| {
        let client_ca = if mutual {
            format!("client_ca_file = \"{}\"\n", client_ca_file.display())
        } else {
            String::new()
        };
        format!(
            "listen = \"127.0.0.1:0\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{client_ca}[apps.shop.apns]\nkey_file = \"{}\"\nkey_id = \"{}\"\nteam_id = \"{}\"\ntopic = \"{}\"\nendpoint = \"{}\"\n",
            cert_file.display(),
            key_file.display(),
            h.dir.path().join("AuthKey.p8").display(),
            h.key.key_id,
            h.key.team_id,
            harness::TOPIC,
            h.mock.url()
        )
    };

    // TLS.
    std::fs::write(&file, config(false)).unwrap();
    let running = pushgate::app::start(pushgate::config::Config::load(Some(&file)).unwrap())
        .await
        .unwrap();
    let addr = running.addr;
    send_over(tls_channel(addr, &server_ca.pem, None).await, 1)
        .await
        .unwrap();
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(send_over(plaintext, 2).await.is_err(), "plaintext refused");
    assert!(
        send_over(tls_channel(addr, &rogue_ca.pem, None).await, 3)
            .await
            .is_err(),
        "a server certificate from another CA is not trusted"
    );

    // A reload re-reads the files: a certificate from a new CA is served to new connections.
    let new_ca = TestCa::new("new server CA");
    let (cert, key) = new_ca.leaf("pushgate");
    write("tls.crt", &cert);
    write("tls.key", &key);
    pushgate::app::reload(&running.reloadable(), Some(&file)).unwrap();
    send_over(tls_channel(addr, &new_ca.pem, None).await, 4)
        .await
        .unwrap();
    assert!(
        send_over(tls_channel(addr, &server_ca.pem, None).await, 5)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    // Unreadable files: the reload fails naming the key, the current certificate stays.
    write("tls.key", "not a key");
    let err = pushgate::app::reload(&running.reloadable(), Some(&file)).unwrap_err();
    assert!(err.to_string().contains("tls.key_file"), "{err}");
    send_over(tls_channel(addr, &new_ca.pem, None).await, 6)
        .await
        .unwrap();
    running.shutdown().await.unwrap();

    // Mutual TLS.
    let (cert, key) = server_ca.leaf("pushgate");
    write("tls.crt", &cert);
    write("tls.key", &key);
    std::fs::write(&file, config(true)).unwrap();
    let running = pushgate::app::start(pushgate::config::Config::load(Some(&file)).unwrap())
        .await
        .unwrap();
    let addr = running.addr;
    let client = client_ca.leaf("a client");
    send_over(tls_channel(addr, &server_ca.pem, Some(&client)).await, 7)
        .await
        .unwrap();
    assert!(
        send_over(tls_channel(addr, &server_ca.pem, None).await, 8)
            .await
            .is_err(),
        "no client certificate"
    );
    let rogue = rogue_ca.leaf("a rogue client");
    assert!(
        send_over(tls_channel(addr, &server_ca.pem, Some(&rogue)).await, 9)
            .await
            .is_err(),
        "a client certificate from another CA"
    );
    // Still serving the right client after the refusals.
    send_over(tls_channel(addr, &server_ca.pem, Some(&client)).await, 10)
        .await
        .unwrap();
    running.shutdown().await.unwrap();
    h.gateway.shutdown().await.unwrap();
}

/// Kills a child process when dropped (a failed assertion must not leave it running).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `rediss://`: the gateway binary reaches a TLS-only redis-server (certificate from a CA made
/// here, trusted through `SSL_CERT_FILE`), reports SERVING and delivers durably through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_reach_a_tls_redis() {
    let h = harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca = TestCa::new("redis CA");
    let (cert, key) = ca.leaf("redis");
    let ca_file = write("ca.crt", &ca.pem);
    let cert_file = write("redis.crt", &cert);
    let key_file = write("redis.key", &key);
    let redis_port = free_port();
    let _redis = Reaped(
        std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &redis_port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .arg("--tls-ca-cert-file")
            .arg(&ca_file)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = free_port();
    let file = write(
        "pushgate.toml",
        &format!(
            "listen = \"127.0.0.1:{port}\"\n[redis]\nurl = \"rediss://127.0.0.1:{redis_port}/\"\npoll_ms = 20\n[apps.shop.apns]\nkey_file = \"{}\"\nkey_id = \"{}\"\nteam_id = \"{}\"\ntopic = \"{}\"\nendpoint = \"{}\"\n",
            h.dir.path().join("AuthKey.p8").display(),
            h.key.key_id,
            h.key.team_id,
            harness::TOPIC,
            h.mock.url()
        ),
    );
    let _gateway = Reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
            .args(["serve", "--config"])
            .arg(&file)
            .env("SSL_CERT_FILE", &ca_file)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = connect_retrying(port).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = health(channel.clone()).await;
        if matches!(got, Ok(s) if s == serving) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never SERVING over rediss: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = PushGatewayClient::new(channel)
        .send_batch(batch("shop", 0..3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 3, "{response:?}");
    assert!(
        response
            .receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Delivered),
        "{response:?}"
    );
    h.gateway.shutdown().await.unwrap();
}

/// A 64-hex device token nobody else uses, so finding it in a log is never a coincidence.
fn secret_token(n: u64) -> String {
    let d: [u8; 32] = Sha256::digest(format!("device-{n}").as_bytes()).into();
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lines of a PEM block between its armour, each long enough to be a real find.
fn pem_body(pem: &str) -> Vec<String> {
    pem.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(String::from)
        .collect()
}

/// The gateway binary at `RUST_LOG=trace` with API keys loaded, APNs JWTs signed, FCM OAuth
/// tokens fetched from the mock, deliveries on both providers, an app whose APNs key the
/// provider refuses (a failed credential) and Redis behind a password: its whole output holds
/// none of the API keys, the .p8 and service-account private keys, any JWT (`eyJ`), any issued
/// access token (`ya29.`), the Redis password, a device token, a user id, a personalization
/// variable's value or a template's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_device_token_in_trace_output() {
    use pushgate_mocks::apns::{MockApns, MockApnsConfig};
    use pushgate_mocks::fcm::{MockFcm, MockFcmConfig};
    const PASSWORD: &str = "redis-pw-7c1e0b5d2a9f";
    const BAD_KEY: &str = "bad-app-api-key-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let key = pushgate_mocks::keys::generate_apns_key();
    let wrong = pushgate_mocks::keys::generate_apns_key();
    let mut apns_config = MockApnsConfig::new(&key.team_id, &key.key_id, &key.public_pem);
    apns_config.tls = false;
    apns_config.topics = vec![harness::TOPIC.into()];
    let apns = MockApns::start(apns_config).await.unwrap();
    let account =
        pushgate_mocks::keys::generate_service_account("pushgate-secrets", "https://127.0.0.1:1/t");
    let mut fcm_config = MockFcmConfig::new(
        &account.project_id,
        &account.client_email,
        &account.public_pem,
    );
    fcm_config.tls = false;
    let fcm = MockFcm::start(fcm_config).await.unwrap();
    let mut account_json: serde_json::Value = serde_json::from_str(&account.json).unwrap();
    account_json["token_uri"] = serde_json::Value::from(fcm.token_uri());
    let account_file = write("service-account.json", &account_json.to_string());
    let key_file = write("AuthKey.p8", &key.private_p8_pem);
    let wrong_file = write("Wrong.p8", &wrong.private_p8_pem);

    let redis_port = free_port();
    let _redis = Reaped(
        std::process::Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--requirepass", PASSWORD])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = free_port();
    let config = write(
        "pushgate.toml",
        &format!(
            r#"
            listen = "127.0.0.1:{port}"
            [retry]
            base_ms = 10
            cap_ms = 20
            max_attempts = 2
            [redis]
            url = "redis://:{PASSWORD}@127.0.0.1:{redis_port}/"
            poll_ms = 20
            [apps.shop]
            api_keys = ["{SHOP_KEY}"]
            admin_keys = ["{SHOP_ADMIN}"]
            [apps.shop.apns]
            key_file = "{key_file}"
            key_id = "{key_id}"
            team_id = "{team_id}"
            topic = "{topic}"
            endpoint = "{apns_url}"
            [apps.shop.fcm]
            credentials_file = "{account_file}"
            endpoint = "{fcm_url}"
            [apps.bad]
            api_keys = ["{BAD_KEY}"]
            [apps.bad.apns]
            key_file = "{wrong_file}"
            key_id = "{wrong_key_id}"
            team_id = "{team_id}"
            topic = "{topic}"
            endpoint = "{apns_url}"
            "#,
            key_file = key_file.display(),
            wrong_file = wrong_file.display(),
            account_file = account_file.display(),
            key_id = key.key_id,
            wrong_key_id = wrong.key_id,
            team_id = key.team_id,
            topic = harness::TOPIC,
            apns_url = apns.url(),
            fcm_url = fcm.url(),
        ),
    );
    let log_path = dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let gateway = Reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "trace")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let channel = connect_retrying(port).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(health(channel.clone()).await, Ok(s) if s == serving) {
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    const VAR_VALUE: &str = "var-secret-value-9d1c55";
    const TEMPLATE_TEXT: &str = "template-secret-text-4b7a";
    let user = |n: u64| format!("user-secret-{n:08}");
    let fcm_token = |n: u64| format!("fcm-{}:APA91b{n:016}", &secret_token(n)[..24]);
    let mut recipients = Vec::new();
    for n in 0..4 {
        let mut r = recipient(n, &[("name", VAR_VALUE)]);
        r.user_id = user(n);
        if n % 2 == 0 {
            r.device_token = secret_token(n);
        } else {
            r.platform = proto::Platform::Fcm as i32;
            r.device_token = fcm_token(n);
        }
        recipients.push(r);
    }
    let mut sent: Vec<String> = recipients.iter().map(|r| r.device_token.clone()).collect();
    sent.extend(recipients.iter().map(|r| r.user_id.clone()));
    let mut client = PushGatewayClient::new(channel.clone());
    let good = client
        .send_batch(signed(
            proto::SendBatchRequest {
                app_id: "shop".into(),
                template: Some(template(
                    &format!("{TEMPLATE_TEXT} {{{{ name }}}}"),
                    TEMPLATE_TEXT,
                )),
                recipients,
                wait_for_receipts: true,
                ..Default::default()
            },
            Some(SHOP_KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(good.accepted, 4, "{good:?}");
    assert!(
        good.receipts
            .iter()
            .all(|r| status(r) == ReceiptStatus::Delivered),
        "{good:?}"
    );
    let mut bad_recipient = recipient(10, &[]);
    bad_recipient.device_token = secret_token(10);
    bad_recipient.user_id = user(10);
    sent.push(bad_recipient.device_token.clone());
    sent.push(bad_recipient.user_id.clone());
    let bad = client
        .send_batch(signed(
            proto::SendBatchRequest {
                app_id: "bad".into(),
                template: Some(template("Hi", "there")),
                recipients: vec![bad_recipient],
                wait_for_receipts: true,
                ..Default::default()
            },
            Some(BAD_KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        bad.receipts
            .iter()
            .all(|r| status(r) != ReceiptStatus::Delivered),
        "the wrong key must be refused by the provider: {bad:?}"
    );
    // A wrong key is refused too (and must not be echoed).
    let wrong_key = "wrong-api-key-abcdef0123456789";
    let refused = client
        .send_batch(signed(batch("shop", 20..21), Some(wrong_key)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    drop(client);
    drop(channel);
    drop(gateway);

    let output = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        output.contains("TRACE") || output.contains("DEBUG"),
        "the gateway logged at trace: {} bytes",
        output.len()
    );
    let mut secrets: Vec<(String, String)> = vec![
        ("api key".into(), SHOP_KEY.into()),
        ("admin key".into(), SHOP_ADMIN.into()),
        ("api key".into(), BAD_KEY.into()),
        ("refused api key".into(), wrong_key.into()),
        ("redis password".into(), PASSWORD.into()),
        ("JWT".into(), "eyJ".into()),
        ("personalization variable".into(), VAR_VALUE.into()),
        ("template text".into(), TEMPLATE_TEXT.into()),
        ("access token".into(), "ya29.".into()),
    ];
    for line in pem_body(&key.private_p8_pem)
        .into_iter()
        .chain(pem_body(&wrong.private_p8_pem))
    {
        secrets.push(("APNs private key".into(), line));
    }
    let account_key = account_json["private_key"].as_str().unwrap_or_default();
    assert!(!account_key.is_empty());
    for line in pem_body(account_key) {
        secrets.push(("service-account private key".into(), line));
    }
    for s in sent {
        secrets.push(("device token or user id".into(), s));
    }
    for (what, secret) in &secrets {
        if let Some(at) = output.find(secret.as_str()) {
            let line_start = output[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = output[at..].find('\n').map_or(output.len(), |i| at + i);
            panic!(
                "{what} in the trace output: {}",
                &output[line_start..line_end]
            );
        }
    }
}
