//! Process wiring: builds the gateway from a config, serves gRPC (with health checking and
//! reflection) and Prometheus metrics, and runs the explicit shutdown sequence.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::Api;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::proto;
use crate::registry::AppRegistry;

/// A running gateway process: its gRPC address and a handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
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
    let metrics = Arc::new(Metrics::new());
    let apps = AppRegistry::from_config(&config)?;
    let redis_stop = CancellationToken::new();
    let redis = if config.redis.enabled() {
        Some(
            crate::durable::RedisStore::connect(&config.redis, redis_stop.clone())
                .context("redis.url / redis.cluster_nodes")?,
        )
    } else {
        None
    };
    if let Some(store) = &redis {
        let limit = std::time::Duration::from_millis(config.redis.command_timeout_ms);
        if store.wait_healthy(limit).await {
            info!(
                replica = store.replica(),
                "durable delivery: retry queue in Redis"
            );
        } else {
            warn!("redis is not reachable yet: sends are refused until it is");
        }
    }
    let gateway = Gateway::start_with(
        apps,
        config.pipeline.clone(),
        Arc::clone(&metrics),
        redis.clone(),
    );
    for (id, app) in &config.apps {
        gateway.update_limits(id, app.limits.clone());
    }
    if let Some(store) = &redis {
        // Cluster-wide limits: replicas sharing this Redis split every rate.
        tokio::spawn(crate::limit::cluster::share_through_redis(
            Arc::clone(store),
            Arc::clone(gateway.limits()),
            redis_stop.clone(),
        ));
    }
    if redis.is_none() {
        warn!(
            "no Redis configured: the retry queue is in memory and delivery is not crash-safe \
             (messages in flight are lost if the process is killed)"
        );
    }

    let api_keys = crate::auth::ApiKeys::from_config(&config);
    if !api_keys.enabled() {
        warn!("no API keys configured: the gRPC API accepts every caller (set apps.<id>.api_keys)");
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
    if let Some(store) = &redis {
        tokio::spawn(crate::durable::follow_health(
            store.health(),
            health.clone(),
            stop.clone(),
        ));
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let grace = config.pipeline.shutdown_grace();
    let server_stop = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service({
            let keys = api_keys.clone();
            tonic::service::interceptor::InterceptedService::new(
                Api::new(Arc::clone(&gateway)).into_server(),
                move |request| keys.intercept(request),
            )
        })
        .add_optional_service(redis.clone().map(|store| {
            let keys = api_keys.clone();
            tonic::service::interceptor::InterceptedService::new(
                crate::durable::api::AdminApi::new(store, config.apps.keys().cloned())
                    .into_server(),
                move |request| keys.intercept(request),
            )
        }));
    let serve = router.serve_with_incoming_shutdown(
        // `serve_with_incoming*` ignores the builder's `tcp_nodelay`, so the incoming side sets
        // it: with Nagle on, receipts trickling back to a caller waited for the peer's delayed
        // ACK (a 40 ms stall that was a third of all batches at half the maximum rate).
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        server_stop.clone().cancelled_owned(),
    );
    let done = {
        let gateway = Arc::clone(&gateway);
        let stop = stop.clone();
        tokio::spawn(async move {
            let server = tokio::spawn(serve);
            stop.cancelled().await;
            health
                .set_not_serving::<proto::push_gateway_server::PushGatewayServer<Api>>()
                .await;
            gateway.shutdown(grace).await;
            redis_stop.cancel();
            server_stop.cancel();
            server.await.context("gRPC server task")??;
            info!("gateway stopped");
            Ok(())
        })
    };
    info!(%addr, apps = gateway.apps().ids().count(), "pushgate listening");
    Ok(Running {
        addr,
        metrics_addr,
        gateway,
        stop,
        done,
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
