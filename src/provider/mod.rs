//! Deliver stage: one trait, one implementation per push service.
//!
//! A provider owns its HTTP/2 connection pool, its credentials (JWT/OAuth caching and refresh)
//! and the mapping from its status codes and reason strings to an [`Outcome`]. The pipeline never
//! looks inside a provider response; it only acts on the `Outcome`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use parking_lot::Mutex;

use crate::domain::{Outcome, Platform, ProviderRequest};

pub mod apns;
mod coalesce;
pub mod config;
pub mod fcm;
mod h2pool;
pub(crate) mod retry_after;

/// A boxed, sendable future, so providers can sit behind `dyn Provider`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A push service that can attempt delivery of one rendered message.
pub trait Provider: Send + Sync + 'static {
    /// The platform this provider serves.
    fn platform(&self) -> Platform;

    /// Makes one delivery attempt (the provider may transparently re-send once for credential
    /// refresh or a refused stream) and classifies the result. Never panics; every transport or
    /// protocol failure becomes an `Outcome`.
    fn deliver<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Outcome>;

    /// As [`Provider::deliver`], also saying how long the request was on the wire, which is
    /// what the adaptive concurrency measures. The default times the whole call; providers
    /// with a connection pool time from the request leaving its stream to its answer, without
    /// the time spent waiting for a stream or a credential.
    fn deliver_timed<'a>(&'a self, request: &'a ProviderRequest) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let outcome = self.deliver(request).await;
            Attempt {
                outcome,
                round_trip: Some(started.elapsed()),
            }
        })
    }

    /// What the provider's connections can carry at once (unknown: zeros).
    fn capacity(&self) -> Capacity {
        Capacity::default()
    }

    /// Adds its connection pool's and credential's figures, at scrape time.
    fn sample(&self, _samples: &mut crate::metrics::Samples) {}
}

/// A pool's figures for the metrics.
pub(crate) fn pool_sample(
    provider: &'static str,
    pool: &h2pool::H2Pool,
) -> crate::metrics::PoolSample {
    crate::metrics::PoolSample {
        provider,
        pool: pool.name().to_string(),
        open: pool.open_connections() as u64,
        opened: pool.connects(),
        goaways: pool.goaways(),
        reconnects: pool.reconnects(),
    }
}

/// One delivery attempt's outcome and its time on the wire.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outcome: Outcome,
    /// From the last request of the attempt leaving to its answer; `None` when no request got
    /// onto the wire (no connection, credentials refused locally).
    pub round_trip: Option<Duration>,
}

/// Concurrent requests a provider's connections carry, as their servers allow
/// (SETTINGS_MAX_CONCURRENT_STREAMS summed over connections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Over the connections open now.
    pub open: usize,
    /// Over as many connections as the pool may open.
    pub most: usize,
}

/// Builds an outcome for a request routed to the wrong provider: a gateway bug, reported, not hidden.
pub(crate) fn wrong_platform(expected: Platform, got: &ProviderRequest) -> Outcome {
    Outcome::Failed {
        reason: format!(
            "internal routing error: {} request sent to the {} provider",
            got.platform().as_str(),
            expected.as_str()
        ),
        status: 0,
    }
}

/// The `authorization` header for the current credential token, built once per token and shared
/// by every request until the token changes. Indexable in HPACK on purpose (tokens live for
/// minutes to an hour): after the first request it costs a table index instead of the token.
/// It never reaches a log: requests are not logged.
#[derive(Default)]
pub(crate) struct BearerHeader(Mutex<Option<(Arc<str>, HeaderValue)>>);

impl BearerHeader {
    /// `"{scheme} {token}"`; the error says what is wrong, naming `what` the token is.
    pub(crate) fn get(
        &self,
        scheme: &str,
        token: &Arc<str>,
        what: &str,
    ) -> Result<HeaderValue, String> {
        let mut cached = self.0.lock();
        if let Some((for_token, header)) = cached.as_ref()
            && Arc::ptr_eq(for_token, token)
        {
            return Ok(header.clone());
        }
        let header = HeaderValue::from_str(&format!("{scheme} {token}"))
            .map_err(|_| format!("{what} is not a valid header value"))?;
        *cached = Some((Arc::clone(token), header.clone()));
        Ok(header)
    }
}
