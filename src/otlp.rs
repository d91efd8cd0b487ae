//! The optional OpenTelemetry exporter: the gateway's `tracing` spans sent over OTLP/gRPC to a
//! collector (`[otlp] endpoint`), beside the log lines. Built with the `otlp` feature (a default
//! one); off unless the config has an `[otlp]` section.
//!
//! Spans go through their own filter (`otlp.filter`, default `info,pushgate=debug`, which takes
//! the per-message `deliver` span): the log filter stays what `RUST_LOG` says. The exporter
//! batches spans on its own thread; the gRPC channel is made on the tokio runtime, so
//! [`layer`] must be called inside it.

use serde::Deserialize;

/// `[otlp]`: where spans are exported.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// Which spans are exported (`tracing` `EnvFilter` syntax).
    #[serde(default = "default_filter")]
    pub filter: String,
    /// `service.name` of the exported resource.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_filter() -> String {
    "info,pushgate=debug".into()
}

fn default_service_name() -> String {
    "pushgate".into()
}

impl OtlpConfig {
    /// Checks values serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), crate::config_error::ConfigError> {
        use crate::config_error::ConfigError;
        let uri: http::Uri = self
            .endpoint
            .parse()
            .map_err(|e| ConfigError::invalid("otlp.endpoint", format!("not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(ConfigError::invalid(
                "otlp.endpoint",
                "must be an http:// or https:// URL of an OTLP/gRPC collector",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.filter)
            .map_err(|e| ConfigError::invalid("otlp.filter", e.to_string()))?;
        if self.service_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "otlp.service_name",
                "must not be empty",
            ));
        }
        #[cfg(not(feature = "otlp"))]
        return Err(ConfigError::invalid(
            "otlp",
            "this binary was built without the `otlp` feature",
        ));
        #[cfg(feature = "otlp")]
        Ok(())
    }
}

/// Flushes the exporter when dropped (at exit), so the last spans are not lost.
#[cfg(feature = "otlp")]
pub struct OtlpGuard(opentelemetry_sdk::trace::SdkTracerProvider);

#[cfg(feature = "otlp")]
impl Drop for OtlpGuard {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// A `tracing` layer exporting spans to `config.endpoint`, with its own filter. Call inside the
/// tokio runtime.
#[cfg(feature = "otlp")]
pub fn layer<S>(
    config: &OtlpConfig,
) -> anyhow::Result<(
    Box<dyn tracing_subscriber::Layer<S> + Send + Sync + 'static>,
    OtlpGuard,
)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use anyhow::Context;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::Layer as _;

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .context("otlp.endpoint: building the OTLP exporter")?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("pushgate");
    let filter = tracing_subscriber::EnvFilter::try_new(&config.filter).context("otlp.filter")?;
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter)
        .boxed();
    Ok((layer, OtlpGuard(provider)))
}
