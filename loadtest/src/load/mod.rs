//! The load generator behind `pushgate-loadtest`: drives a gateway over gRPC with personalized
//! batches (`run`), or blasts the mock providers directly with a raw HTTP/2 client (`ceiling`),
//! and reports throughput, receipt latency and the CPU and memory it cost.
//!
//! - [`settings`]: every knob, loadable from a scenario TOML and overridden by flags.
//! - [`env`]: the mock providers (on their own runtime, so their CPU is measured apart) and the
//!   gateway child process with its generated config.
//! - [`driver`]: the gRPC client side (StreamSend or SendBatch), bounded in count and time.
//! - [`ceiling`]: the raw HTTP/2 client against the same mocks, no gateway.
//! - [`procstat`]: CPU and RSS from `/proc`.
//! - [`redis`]: durable-mode runs: the gateway's Redis and what it spent.
//! - [`report`]: the summary, its JSON and an HTML page with inline SVG charts.
//! - [`hostile`]: what one hostile caller costs the gateway: each abusive request shape in turn,
//!   the gateway's memory and answer, and whether another caller's batches kept flowing.
//! - [`chaos`]: the chaos runner: a long mixed workload against several replicas on one Redis,
//!   faults on a schedule, and the three ledgers reconciled.

pub mod ceiling;
pub mod chaos;
pub mod driver;
pub mod env;
pub mod hostile;
pub mod procstat;
pub mod redis;
pub mod report;
pub mod settings;

pub use pushgate_proto as proto;
