//! The `pushgate` binary: `serve` runs the gateway, `check-config` validates a config file, `send`
//! streams an audience file through a running gateway (`pushgate::send`). The
//! demo with mock providers is `cargo run --release --example demo`, so this binary links no mock.

// mimalloc: the profile of a saturated gateway showed a third of its CPU in glibc malloc/free;
// with mimalloc CPU per message fell by about a third (loadtest, same session).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pushgate::config::LogFormat;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "pushgate",
    version,
    about = "Push-notification delivery gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gateway.
    Serve {
        /// TOML config file; `PUSHGATE_*` environment variables override it.
        #[arg(long, short, env = "PUSHGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Loads and validates a config file, then exits.
    CheckConfig {
        #[arg(long, short, env = "PUSHGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Sends an audience file (CSV or NDJSON) through a running gateway with a template file,
    /// writing one receipt per record; run it again to resume after an interruption.
    Send(Box<pushgate::send::SendArgs>),
}

/// Dependencies whose debug and trace events can carry request headers and bodies (device
/// tokens in paths, `authorization` headers, OAuth tokens, Redis `AUTH` commands): they stay at
/// `info` unless `RUST_LOG` names the crate itself.
const QUIET_DEPENDENCIES: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "redis",
    "rustls",
    "reqwest",
];

/// `RUST_LOG` (default `info`) plus `<crate>=info` for every quiet dependency it does not name.
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let base = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    let mut directives = base.to_string();
    for dependency in QUIET_DEPENDENCIES {
        let named = base
            .split(',')
            .any(|d| d.trim().split(['=', '[', ':']).next() == Some(*dependency));
        if !named {
            directives.push_str(&format!(",{dependency}=info"));
        }
    }
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `serve` logs as its config says, so the config is read before logging starts (an error
    // reading it is printed by `main`'s error return).
    let serve_config = match &cli.command {
        Command::Serve { config } => Some(pushgate::config::Config::load(config.as_deref())?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // The OTLP exporter's gRPC channel is made on the runtime; its guard flushes at exit.
    let _otlp = {
        let _entered = runtime.enter();
        init_logging(serve_config.as_ref())?
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config: path } => serve(serve_config, path).await,
            Command::Send(args) => pushgate::send::run(*args).await.map(drop),
            Command::CheckConfig { config } => {
                let config = pushgate::config::Config::load(config.as_deref())?;
                config.registry()?;
                println!("config OK: {} app(s)", config.apps.len());
                Ok(())
            }
        }
    })
}

/// Log lines (text or JSON, filtered by `RUST_LOG`) and, with `[otlp]`, spans exported to a
/// collector through their own filter.
fn init_logging(config: Option<&pushgate::config::Config>) -> anyhow::Result<Option<OtlpGuard>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let logs: Boxed = match config.map(|c| c.log_format) {
        Some(LogFormat::Json) => tracing_subscriber::fmt::layer()
            .json()
            .with_filter(filter)
            .boxed(),
        _ => tracing_subscriber::fmt::layer().with_filter(filter).boxed(),
    };
    #[cfg(feature = "otlp")]
    let (layers, guard) = match config.and_then(|c| c.otlp.as_ref()) {
        Some(otlp) => {
            let (layer, flush) = pushgate::otlp::layer(otlp)?;
            (vec![logs, layer], Some(flush))
        }
        None => (vec![logs], None),
    };
    #[cfg(not(feature = "otlp"))]
    let (layers, guard) = (vec![logs], None);
    tracing_subscriber::registry().with(layers).init();
    Ok(guard)
}

#[cfg(feature = "otlp")]
type OtlpGuard = pushgate::otlp::OtlpGuard;
#[cfg(not(feature = "otlp"))]
type OtlpGuard = ();

/// Runs the gateway on `config` (already loaded from `path` to set up logging) until a signal.
async fn serve(
    config: Option<pushgate::config::Config>,
    path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = match config {
        Some(config) => config,
        None => pushgate::config::Config::load(path.as_deref())?,
    };
    let running = pushgate::app::start(config).await?;
    tokio::spawn(pushgate::app::reload_on_sighup(running.reloadable(), path));
    let stop = running.stop_token();
    tokio::spawn(async move {
        pushgate::app::shutdown_signal().await;
        tracing::info!("signal received: shutting down");
        stop.cancel();
    });
    running.wait().await
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn dependencies_stay_at_info_unless_named() {
        let filter = log_filter(Some("trace")).to_string();
        for dependency in ["h2=info", "hyper=info", "tonic=info", "redis=info"] {
            assert!(filter.contains(dependency), "{filter}");
        }
        let filter = log_filter(Some("trace,h2=trace")).to_string();
        assert!(!filter.contains("h2=info"), "{filter}");
        assert!(filter.contains("hyper=info"), "{filter}");
        assert!(log_filter(None).to_string().contains("h2=info"));
    }
}
