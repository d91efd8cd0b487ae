//! The application: wires the stages of the data path together (ingest -> policy -> limit ->
//! deliver -> receipts, all keeping state in one store), serves gRPC (with health checking and
//! reflection) and Prometheus metrics, reloads limits on SIGHUP, and runs the explicit
//! shutdown sequence: stop accepting, drain in flight within a grace period, then stop the rest.
//!
//! [`Gateway`] is the wired data path without the transport (tests and benchmarks drive it
//! directly); [`start`] adds the network around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// A `SendBatchRequest` as the domain batch `Gateway::submit` takes, validated as SendBatch does.
pub use crate::edge::into_batch;
pub use crate::ingest::{BatchResult, SubmitError};

use crate::config::{Config, ConfigError, PipelineConfig};
use crate::deliver::Deliverer;
use crate::domain::Batch;
use crate::edge::{AdminApi, Api, ApiKeys, BatchGuard, InsightsApi, PolicyApi, Quotas, ServerTls};
use crate::ingest::{Ingest, IngestConfig, IngestParts, RequestCaps};
use crate::limit::{LimitConfig, Limits};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicySettings};
use crate::proto;
use crate::receipts::{CallerSink, ReceiptHub};
use crate::registry::AppRegistry;
use crate::store::Store;
use crate::store::insights::{Insights, MemoryInsights};
use crate::store::memory::MemoryStore;
use crate::store::policy_state::{MemoryPolicyState, PolicyState};
use crate::store::redis::insights::RedisInsights;
use crate::store::redis::{RedisClient, RedisPolicyState, RedisStore};

/// HTTP/2 flow-control windows of the gRPC listener. The connection window bounds what one
/// connection can make the gateway buffer; sixteen stalled streams fit in it before the
/// connection's other calls would wait.
const STREAM_WINDOW_BYTES: u32 = 1 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// The wired data path. See the module docs.
pub struct Gateway {
    apps: Arc<AppRegistry>,
    policy: Policy,
    ingest: Arc<Ingest>,
    hub: Arc<ReceiptHub>,
    store: Arc<dyn Store>,
    /// Campaign measurement (receipts counted, opens and conversions tracked).
    insights: Arc<dyn Insights>,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    /// Fires when the shutdown grace period is over: what is still in flight is abandoned.
    hard_stop: CancellationToken,
}

impl Gateway {
    /// Starts the data path on the in-memory store.
    pub fn start(apps: AppRegistry, config: PipelineConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::start_with(apps, config, metrics, None)
    }

    /// Starts the data path on the Redis store when `redis` is given (durable delivery), else
    /// on the in-memory one.
    pub fn start_with(
        apps: AppRegistry,
        config: PipelineConfig,
        metrics: Arc<Metrics>,
        redis: Option<Arc<RedisClient>>,
    ) -> Arc<Self> {
        Self::start_with_policy(apps, config, metrics, redis, PolicySettings::default())
    }

    /// [`Gateway::start_with`] with the apps' delivery policies (opt-outs, quiet hours, dead
    /// token suppression, frequency caps), kept in Redis when `redis` is given.
    pub fn start_with_policy(
        apps: AppRegistry,
        config: PipelineConfig,
        metrics: Arc<Metrics>,
        redis: Option<Arc<RedisClient>>,
        policy: PolicySettings,
    ) -> Arc<Self> {
        let apps = Arc::new(apps);
        let ttl_ms = policy.config.suppression_ttl_ms();
        let policy_state: Arc<dyn PolicyState> = match &redis {
            Some(client) => Arc::new(RedisPolicyState::new(Arc::clone(client), ttl_ms)),
            None => Arc::new(MemoryPolicyState::new(ttl_ms)),
        };
        let hard_stop = CancellationToken::new();
        let hub = Arc::new(ReceiptHub::new(Arc::clone(&metrics)));
        // Everything admitted holds an accept-window slot; the bound backs up the channel into
        // the limit stage for work that does not (claimed from a durable store).
        let limits = Arc::new(Limits::with_queue_bound(
            config.accept_window + config.dispatch_queue,
            (config.accept_window / 2).max(1),
        ));
        let (ready, ready_rx) = mpsc::channel(config.dispatch_queue);
        // What the store hands back (retries, scheduled messages come due, claims) passes the
        // policy stage's due gate on its way to the limit stage.
        let (due, due_rx) = mpsc::channel(config.dispatch_queue);
        let durable = redis.is_some();
        let insights: Arc<dyn Insights> = match &redis {
            Some(client) => RedisInsights::start(Arc::clone(client), config.insights()),
            None => Arc::new(MemoryInsights::new(config.insights())),
        };
        hub.add_observer(Arc::clone(&insights) as _);
        let policy = Policy::new(policy, Arc::clone(&policy_state), Arc::clone(&metrics))
            .with_insights(Arc::clone(&insights));
        let store: Arc<dyn Store> = match redis {
            Some(client) => {
                client.set_metrics(metrics.redis());
                let runtimes = apps.ids().filter_map(|id| apps.get(id).cloned());
                RedisStore::start(
                    client,
                    Arc::clone(&hub),
                    runtimes.collect::<Vec<_>>(),
                    due,
                    hard_stop.clone(),
                    Some(config.insights()),
                )
            }
            None => MemoryStore::start(due, Arc::clone(&metrics), hard_stop.clone()),
        };
        hub.add_observer(Arc::clone(&store) as _);
        if let Some(releases) = policy.releases() {
            hub.add_observer(Arc::new(releases));
        }
        tokio::spawn(crate::policy::due::run_gate(
            policy.clone(),
            due_rx,
            ready.clone(),
            Arc::downgrade(&store),
            hard_stop.clone(),
        ));
        metrics.add_sampler(sampler(&apps, &store, &metrics, durable));
        if let Some(replicas) = store.live_replicas() {
            tokio::spawn(share_rates(replicas, Arc::clone(&limits)));
        }
        let deliverer = Arc::new(Deliverer {
            metrics: Arc::clone(&metrics),
            store: Arc::clone(&store),
            requests: Arc::new(Semaphore::new(config.max_in_flight_requests)),
            hard_stop: hard_stop.clone(),
            limits: Arc::clone(&limits),
            dead_tokens: Some(Arc::clone(&policy_state)),
        });
        tokio::spawn(deliverer.run(ready_rx));
        let ingest = Arc::new(Ingest::new(IngestParts {
            apps: Arc::clone(&apps),
            config: IngestConfig {
                accept_window: config.accept_window,
                max_batch_recipients: config.max_batch_recipients,
                max_unread_receipts: config.max_unread_receipts,
                stream_unread_timeout: Duration::from_secs(config.stream_unread_timeout_secs),
                caps: RequestCaps {
                    max_id_bytes: config.max_id_bytes,
                    max_vars_per_recipient: config.max_vars_per_recipient,
                    max_vars_bytes: config.max_vars_bytes,
                    max_template_field_bytes: config.max_template_field_bytes,
                    max_template_data_entries: config.max_template_data_entries,
                    max_raw_json_bytes: config.max_raw_json_bytes,
                },
            },
            ready,
            store: Arc::clone(&store),
            policy: policy.clone(),
            limits: Arc::clone(&limits),
            hub: Arc::clone(&hub),
            metrics: Arc::clone(&metrics),
        }));
        Arc::new(Self {
            apps,
            policy,
            ingest,
            hub,
            store,
            insights,
            limits,
            metrics,
            hard_stop,
        })
    }

    /// See [`Ingest::submit`].
    pub async fn submit(
        &self,
        batch: &mut Batch,
        sink: Option<&CallerSink>,
        stream_rejections: bool,
    ) -> Result<BatchResult, SubmitError> {
        self.ingest.submit(batch, sink, stream_rejections).await
    }

    /// Replaces `app`'s rate limits, weight and concurrency bounds, effective at once (no
    /// restart). Used at start, on SIGHUP and by tests.
    pub fn update_limits(&self, app: &str, limits: LimitConfig) {
        self.limits.set(app, limits);
    }

    /// The live limit settings and adaptive-concurrency state.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// The store every stage keeps its state in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Campaign measurement.
    pub fn insights(&self) -> &Arc<dyn Insights> {
        &self.insights
    }

    pub fn hub(&self) -> &Arc<ReceiptHub> {
        &self.hub
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn apps(&self) -> &AppRegistry {
        &self.apps
    }

    /// The policy stage (and through it what the policies remember).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// True until shutdown begins.
    pub fn is_accepting(&self) -> bool {
        self.ingest.is_accepting()
    }

    /// The most accepted-but-unfinished messages held at once so far.
    pub fn window_high_water(&self) -> usize {
        self.ingest.window_high_water()
    }

    /// The configured accept window.
    pub fn window_size(&self) -> usize {
        self.ingest.window_size()
    }

    /// The gRPC services over this data path, under the per-key ingress limits `quotas` (one
    /// set shared by every door).
    fn api(&self, quotas: &Arc<Quotas>) -> Api {
        Api::new(
            Arc::clone(&self.ingest),
            Arc::clone(&self.hub),
            Arc::clone(&self.store),
            Arc::clone(&self.apps),
        )
        .with_quotas(Arc::clone(quotas))
    }

    /// Stops accepting, waits up to `grace` for in-flight messages to finish, then abandons what
    /// is left to the store (failed, each with a terminal receipt saying so, or handed off to
    /// the next replica when the store keeps it) and waits for that to be done.
    pub async fn shutdown(&self, grace: Duration) {
        self.ingest.stop();
        let in_flight = self.hub.in_flight();
        info!(
            in_flight = in_flight.get(),
            ?grace,
            "shutting down: draining in-flight messages"
        );
        if !in_flight.wait_drained(grace).await {
            warn!(
                remaining = in_flight.get(),
                "grace period over: abandoning the messages still in flight"
            );
        }
        self.hard_stop.cancel();
        if !in_flight.wait_drained(Duration::from_secs(5)).await {
            warn!(
                remaining = in_flight.get(),
                "messages still unresolved after the hard stop"
            );
        }
        self.hub.close();
    }
}

/// Applies the store's count of live replicas to every rate, so the configured rates hold for
/// the whole cluster.
async fn share_rates(mut replicas: watch::Receiver<u32>, limits: Arc<Limits>) {
    loop {
        limits.set_replicas(*replicas.borrow_and_update());
        if replicas.changed().await.is_err() {
            return;
        }
    }
}

/// A running gateway process: its gRPC address and a handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The HTTP/JSON API's address, when `http_listen` is set.
    pub http_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    /// The API keys in effect (replaced on reload).
    keys: ApiKeys,
    /// The listener's TLS settings, when `[tls]` is set (replaced on reload).
    tls: Option<ServerTls>,
    /// The per-key ingress limits (replaced on reload).
    quotas: Arc<Quotas>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Runs the shutdown sequence (stop accepting, drain within the grace period, fail the rest)
    /// and waits for the server to exit.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.done.await.context("server task panicked")?
    }

    /// What a reload (SIGHUP) changes in this process: limits, ingress limits, API keys, TLS
    /// certificates.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            gateway: Arc::clone(&self.gateway),
            keys: self.keys.clone(),
            tls: self.tls.clone(),
            quotas: Arc::clone(&self.quotas),
        }
    }

    /// A token that starts the shutdown when cancelled (signal handlers).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits for the server to exit (after `stop_token` fires).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("server task panicked")?
    }
}

/// Builds everything from `config` and starts serving on `config.listen` (port 0 picks a free
/// port; see `Running::addr`).
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with_clock(config, crate::domain::Clock::system()).await
}

/// [`start`] with the policy stage reading `clock` (tests: schedules around a chosen date).
pub async fn start_with_clock(
    config: Config,
    clock: crate::domain::Clock,
) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let apps = config.registry()?;
    let redis_stop = CancellationToken::new();
    let redis = if config.redis.enabled() {
        Some(
            RedisClient::connect(&config.redis, redis_stop.clone())
                .context("redis.url / redis.cluster_nodes")?,
        )
    } else {
        None
    };
    if let Some(client) = &redis {
        client.set_metrics(metrics.redis());
        let limit = Duration::from_millis(config.redis.command_timeout_ms);
        if client.wait_healthy(limit).await {
            info!(
                replica = client.replica(),
                "durable delivery: accepted messages and retries kept in Redis"
            );
        } else {
            warn!("redis is not reachable yet: sends are refused until it is");
        }
    }
    let gateway = Gateway::start_with_policy(
        apps,
        config.pipeline.clone(),
        Arc::clone(&metrics),
        redis,
        crate::policy::PolicySettings {
            clock,
            ..config.policy_settings()?
        },
    );
    for (id, app) in &config.apps {
        gateway.update_limits(id, app.limits.clone());
    }
    if gateway.store().dead_letters().is_none() {
        warn!(
            "no Redis configured: the retry queue is in memory and delivery is not crash-safe \
             (messages in flight are lost if the process is killed)"
        );
    }

    let api_keys = ApiKeys::from_config(&config)?;
    if !api_keys.enabled() {
        warn!(
            "no API keys configured: the gRPC API accepts every caller for sending and receipts \
             (set apps.<id>.api_keys); admin RPCs are {}",
            if config.allow_unauthenticated {
                "open too (allow_unauthenticated = true)"
            } else {
                "refused"
            }
        );
    }

    let tls = config.tls.as_ref().map(ServerTls::load).transpose()?;
    match &tls {
        Some(tls) if tls.mutual() => {
            info!("gRPC and HTTP listeners: mutual TLS (client certificates required)")
        }
        Some(_) => info!("gRPC and HTTP listeners: TLS"),
        None if !config.listen.ip().is_loopback() => {
            warn!("gRPC listener is plaintext on a non-loopback address (set [tls])")
        }
        None => {}
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding gRPC listener on {}", config.listen))?;
    let addr = listener.local_addr()?;

    let metrics_addr = match config.metrics_listen {
        Some(listen) => Some(serve_metrics(listen, Arc::clone(&metrics)).await?),
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::push_gateway_server::PushGatewayServer<Api>>()
        .await;
    let stop = CancellationToken::new();
    tokio::spawn(follow_health(
        gateway.store().health(),
        health.clone(),
        stop.clone(),
    ));
    // Both reflection versions: grpcurl and tonic ask `v1`, while Python's grpcio-reflection,
    // older grpcurl/grpcui and several GUI clients ask only `v1alpha`.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) = if config.reflection {
        (
            Some(
                reflection_builder()
                    .build_v1()
                    .context("building the reflection service (v1)")?,
            ),
            Some(
                reflection_builder()
                    .build_v1alpha()
                    .context("building the reflection service (v1alpha)")?,
            ),
        )
    } else {
        (None, None)
    };

    let grace = config.pipeline.shutdown_grace();
    let server_stop = CancellationToken::new();
    let quotas = Arc::new(Quotas::new(&config.ingress));
    // The HTTP/JSON door runs the same service and keys as the gRPC one, until the gRPC server
    // stops (receipt streams keep flowing while in-flight messages drain).
    let http_addr = match config.http_listen {
        Some(listen) => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding HTTP listener on {listen}"))?;
            let http_addr = listener.local_addr()?;
            let ready: crate::edge::http::Readiness = {
                let gateway = Arc::clone(&gateway);
                let health = gateway.store().health();
                Arc::new(move || gateway.is_accepting() && *health.borrow())
            };
            let services = crate::edge::http::Services {
                api: Arc::new(gateway.api(&quotas)),
                policy: PolicyApi::new(
                    gateway.policy(),
                    Arc::clone(gateway.store()),
                    Arc::clone(gateway.insights()),
                    config.apps.keys().cloned(),
                )
                .map(Arc::new),
                insights: Arc::new(InsightsApi::new(
                    Arc::clone(gateway.insights()),
                    Arc::clone(&gateway.apps),
                    gateway.policy().clone(),
                )),
                admin: AdminApi::new(
                    Arc::clone(gateway.store()),
                    config.apps.keys().cloned(),
                    config.pipeline.max_replay_dead_letters,
                )
                .map(Arc::new),
            };
            let http = crate::edge::http::HttpApi::new(
                services,
                api_keys.clone(),
                ready,
                config.http_max_body_bytes(),
                Arc::clone(&metrics),
                tls.clone(),
            );
            let stop = server_stop.clone();
            tokio::spawn(async move {
                if let Err(error) = http.serve(listener, stop).await {
                    warn!(%error, "HTTP API server ended");
                }
            });
            if tls.is_none() && !listen.ip().is_loopback() {
                warn!("HTTP API listener is plaintext on a non-loopback address (set [tls])");
            }
            info!(%http_addr, tls = tls.is_some(), "HTTP/JSON API listening");
            Some(http_addr)
        }
        None => None,
    };
    let admin = AdminApi::new(
        Arc::clone(gateway.store()),
        config.apps.keys().cloned(),
        config.pipeline.max_replay_dead_letters,
    );
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // A stream whose caller stops reading its receipts is no longer read either (back
        // pressure), and its unread request data holds flow-control window. With the stream
        // window a fraction of the connection window, one such stream cannot stall the other
        // calls multiplexed on the same connection.
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_optional_service(reflection_v1alpha)
        .add_service({
            let keys = api_keys.clone();
            tonic::service::interceptor::InterceptedService::new(
                BatchGuard::new(
                    gateway
                        .api(&quotas)
                        .into_server(config.pipeline.max_request_bytes()),
                    crate::edge::batch_guard::refuse_above(config.pipeline.max_batch_recipients),
                ),
                move |request| keys.intercept(request),
            )
        })
        .add_optional_service(
            PolicyApi::new(
                gateway.policy(),
                Arc::clone(gateway.store()),
                Arc::clone(gateway.insights()),
                config.apps.keys().cloned(),
            )
            .map(|api| {
                let keys = api_keys.clone();
                tonic::service::interceptor::InterceptedService::new(
                    api.into_server(),
                    move |request| keys.intercept(request),
                )
            }),
        )
        .add_service({
            let keys = api_keys.clone();
            tonic::service::interceptor::InterceptedService::new(
                InsightsApi::new(
                    Arc::clone(gateway.insights()),
                    Arc::clone(&gateway.apps),
                    gateway.policy().clone(),
                )
                .into_server(),
                move |request| keys.intercept(request),
            )
        })
        .add_optional_service(admin.map(|admin| {
            let keys = api_keys.clone();
            tonic::service::interceptor::InterceptedService::new(
                admin.into_server(),
                move |request| keys.intercept(request),
            )
        }));
    type Serve =
        std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let shutdown = server_stop.clone().cancelled_owned();
    let serve: Serve =
        match &tls {
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                tls.incoming(listener, server_stop.clone()),
                shutdown,
            )),
            None => Box::pin(router.serve_with_incoming_shutdown(
                // `serve_with_incoming*` ignores the builder's `tcp_nodelay`, so the incoming side
                // sets it: with Nagle on, receipts trickling back to a caller waited for the peer's
                // delayed ACK (a 40 ms stall that was a third of all batches at half the maximum
                // rate).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )),
        };
    let done = {
        let gateway = Arc::clone(&gateway);
        let stop = stop.clone();
        tokio::spawn(async move {
            let server = tokio::spawn(serve);
            stop.cancelled().await;
            health
                .set_not_serving::<proto::push_gateway_server::PushGatewayServer<Api>>()
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            gateway.shutdown(grace).await;
            redis_stop.cancel();
            server_stop.cancel();
            server.await.context("gRPC server task")??;
            info!("gateway stopped");
            Ok(())
        })
    };
    info!(%addr, apps = gateway.apps().ids().count(), store = gateway.store().name(), "pushgate listening");
    Ok(Running {
        addr,
        metrics_addr,
        http_addr,
        gateway,
        keys: api_keys,
        tls,
        quotas,
        stop,
        done,
    })
}

/// Mirrors the store's health onto the gRPC health service (NOT_SERVING while, say, Redis is
/// unreachable) until `stop` fires (shutdown owns the status from then on).
async fn follow_health(
    mut store: watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    type Svc = proto::push_gateway_server::PushGatewayServer<Api>;
    loop {
        let healthy = *store.borrow_and_update();
        if stop.is_cancelled() {
            return;
        }
        // The service and the server as a whole (the empty name, what most probes ask).
        let status = if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        if healthy {
            reporter.set_serving::<Svc>().await;
        } else {
            reporter.set_not_serving::<Svc>().await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = store.changed() => if changed.is_err() { return },
        }
    }
}

/// Loads and validates the config at `path` (plus `PUSHGATE_*` overrides) and applies every
/// app's `[limits]`; returns how many apps it applied. Nothing changes when the config is
/// invalid.
pub fn reload_limits(
    gateway: &Gateway,
    path: Option<&std::path::Path>,
) -> Result<usize, ConfigError> {
    let config = crate::config::Config::load(path)?;
    for (id, app) in &config.apps {
        gateway.update_limits(id, app.limits.clone());
    }
    Ok(config.apps.len())
}

/// The parts of a running gateway a reload changes.
#[derive(Clone)]
pub struct Reloadable {
    gateway: Arc<Gateway>,
    keys: ApiKeys,
    tls: Option<ServerTls>,
    quotas: Arc<Quotas>,
}

/// What a reload applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Apps whose limits were applied.
    pub apps: usize,
    /// Distinct API and admin keys now in effect.
    pub keys: usize,
}

/// Loads and validates the config at `path` (plus `PUSHGATE_*` overrides), then applies every
/// app's `[limits]`, the `[ingress]` per-key limits, the API and admin keys (with `allow_unauthenticated`) and the `[tls]`
/// certificate files (new connections use them). Nothing changes when the config is invalid,
/// including when it would leave a non-loopback listener without keys or a certificate file
/// cannot be read. Apps are not added or removed, `listen` is not rebound, and TLS is not
/// turned on or off by a reload.
pub fn reload(
    target: &Reloadable,
    path: Option<&std::path::Path>,
) -> Result<Reloaded, ConfigError> {
    let config = crate::config::Config::load(path)?;
    let tls = match (&target.tls, &config.tls) {
        (Some(current), Some(settings)) => {
            Some((current, crate::edge::tls::server_config(settings)?))
        }
        (None, None) => None,
        _ => {
            return Err(ConfigError::invalid(
                "tls",
                "turning TLS on or off takes a restart",
            ));
        }
    };
    let keys = target.keys.reload(&config)?;
    if let Some((current, server_config)) = tls {
        current.replace(server_config);
    }
    target.quotas.reload(&config.ingress);
    for (id, app) in &config.apps {
        target.gateway.update_limits(id, app.limits.clone());
    }
    Ok(Reloaded {
        apps: config.apps.len(),
        keys,
    })
}

/// Re-reads `path` on every SIGHUP and applies it ([`reload`]: limits and keys). A config that
/// fails to load or validate is logged and what is in effect stays.
pub async fn reload_on_sighup(target: Reloadable, path: Option<PathBuf>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: config reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match reload(&target, path.as_deref()) {
                Ok(Reloaded { apps, keys }) => {
                    tracing::info!(
                        apps,
                        keys,
                        "SIGHUP: limits, ingress limits, API keys and TLS files reloaded"
                    )
                }
                Err(error) => {
                    tracing::warn!(%error, "SIGHUP: config reload failed; nothing changed")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (target, path);
    }
}

/// What `/metrics` reads at scrape time: every provider's pool and credential figures, and with
/// Redis the retry queue depth (the memory store keeps that gauge itself; in Redis the parked
/// retries this replica holds are what it counts). Weak references: the metrics must not keep
/// the data path alive.
fn sampler(
    apps: &Arc<AppRegistry>,
    store: &Arc<dyn Store>,
    metrics: &Metrics,
    durable: bool,
) -> crate::metrics::Sampler {
    let apps = Arc::downgrade(apps);
    let store = Arc::downgrade(store);
    let retry_depth = metrics.retry_queue_depth.clone();
    Arc::new(move |samples: &mut crate::metrics::Samples| {
        if let Some(apps) = apps.upgrade() {
            let mut ids: Vec<&str> = apps.ids().collect();
            ids.sort_unstable();
            for app in ids.into_iter().filter_map(|id| apps.get(id)) {
                for provider in [&app.apns, &app.fcm].into_iter().flatten() {
                    provider.sample(samples);
                }
            }
        }
        if durable && let Some(store) = store.upgrade() {
            retry_depth.set(i64::try_from(store.parked()).unwrap_or(i64::MAX));
        }
    })
}

/// Serves `GET /metrics` in the Prometheus text format.
async fn serve_metrics(listen: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding metrics listener on {listen}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        if request.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found\n")))
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
