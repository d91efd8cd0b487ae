//! Durable-mode runs: the Redis the gateway under test uses (a private `redis-server` the tool
//! starts, or a URL), and what Redis spent on the run: commands, bytes and CPU per message, and
//! memory, read from `INFO` before and after.

use anyhow::Context;
use pushgate_mocks::redis_server::RedisServer;
use serde::{Deserialize, Serialize};

/// The Redis of a run. A server started here is killed when this is dropped.
pub struct RedisTarget {
    pub url: String,
    _server: Option<RedisServer>,
}

impl RedisTarget {
    /// Starts a private `redis-server` on a free port (no persistence).
    pub fn start_private() -> anyhow::Result<Self> {
        anyhow::ensure!(
            RedisServer::binary_available(),
            "--redis needs `redis-server` (apt-get install -y redis-server), or give --redis-url"
        );
        let server = RedisServer::start();
        Ok(Self {
            url: server.url(),
            _server: Some(server),
        })
    }

    /// A Redis someone else runs. It is flushed by nobody: give the run a database of its own.
    pub fn external(url: String) -> Self {
        Self { url, _server: None }
    }

    pub async fn snapshot(&self) -> anyhow::Result<RedisSnapshot> {
        let client = redis::Client::open(self.url.as_str()).context("redis url")?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        let info: String = redis::cmd("INFO")
            .arg("everything")
            .query_async(&mut conn)
            .await
            .context("INFO")?;
        Ok(RedisSnapshot::parse(&info))
    }
}

/// The counters of one `INFO` reply that a run's cost is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisSnapshot {
    pub commands: u64,
    /// `INFO commandstats`: per command (lowercase, as Redis names it) its calls and the
    /// microseconds Redis spent in it. Commands a script runs count here under their own name.
    pub per_command: std::collections::BTreeMap<String, (u64, u64)>,
    pub net_input_bytes: u64,
    pub net_output_bytes: u64,
    pub cpu_secs: f64,
    pub used_memory: u64,
    pub used_memory_peak: u64,
}

impl RedisSnapshot {
    pub fn parse(info: &str) -> Self {
        let mut s = Self::default();
        let mut cpu_user = 0.0;
        let mut cpu_sys = 0.0;
        for line in info.lines() {
            let Some((key, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            if let Some(name) = key.strip_prefix("cmdstat_") {
                let field = |wanted: &str| {
                    value
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(wanted)?.strip_prefix('='))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                s.per_command
                    .insert(name.to_string(), (field("calls"), field("usec")));
                continue;
            }
            let int = || value.parse::<u64>().unwrap_or(0);
            match key {
                "total_commands_processed" => s.commands = int(),
                "total_net_input_bytes" => s.net_input_bytes = int(),
                "total_net_output_bytes" => s.net_output_bytes = int(),
                "used_memory" => s.used_memory = int(),
                "used_memory_peak" => s.used_memory_peak = int(),
                "used_cpu_user" => cpu_user = value.parse().unwrap_or(0.0),
                "used_cpu_sys" => cpu_sys = value.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        s.cpu_secs = cpu_user + cpu_sys;
        s
    }
}

/// What Redis spent on a run, per message that reached a terminal receipt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisCost {
    /// Commands Redis processed (a MULTI, each command in it and each EVAL count one each;
    /// a pipeline of N commands is N here but one round trip).
    pub commands: u64,
    pub commands_per_message: f64,
    pub bytes_in_per_message: f64,
    pub bytes_out_per_message: f64,
    pub cpu_secs: f64,
    pub cpu_secs_per_100k: f64,
    /// Redis memory at the end of the run and its peak, MB.
    pub used_memory_mb: f64,
    pub peak_memory_mb: f64,
    /// Where Redis spent: per command, calls and microseconds per message, the costliest first.
    #[serde(default)]
    pub per_command: Vec<CommandCost>,
}

/// One command's share of a run's Redis cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandCost {
    pub command: String,
    pub calls_per_message: f64,
    pub usec_per_message: f64,
}

impl RedisCost {
    pub fn between(before: &RedisSnapshot, after: &RedisSnapshot, messages: u64) -> Self {
        let per = |v: u64| v as f64 / messages.max(1) as f64;
        let cpu = (after.cpu_secs - before.cpu_secs).max(0.0);
        const MB: f64 = 1_048_576.0;
        Self {
            commands: after.commands.saturating_sub(before.commands),
            commands_per_message: per(after.commands.saturating_sub(before.commands)),
            bytes_in_per_message: per(after.net_input_bytes.saturating_sub(before.net_input_bytes)),
            bytes_out_per_message: per(after
                .net_output_bytes
                .saturating_sub(before.net_output_bytes)),
            cpu_secs: cpu,
            cpu_secs_per_100k: cpu * 100_000.0 / messages.max(1) as f64,
            used_memory_mb: after.used_memory as f64 / MB,
            peak_memory_mb: after.used_memory_peak as f64 / MB,
            per_command: command_costs(before, after, messages),
        }
    }

    /// The costliest commands as one line: `evalsha 1.2 calls 14.0 us, ...` per message.
    pub fn top_commands(&self, n: usize) -> String {
        self.per_command
            .iter()
            .take(n)
            .map(|c| {
                format!(
                    "{} {:.2}x {:.1} us",
                    c.command, c.calls_per_message, c.usec_per_message
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn command_costs(before: &RedisSnapshot, after: &RedisSnapshot, messages: u64) -> Vec<CommandCost> {
    let per = |v: u64| v as f64 / messages.max(1) as f64;
    let mut costs: Vec<CommandCost> = after
        .per_command
        .iter()
        .filter_map(|(name, &(calls, usec))| {
            let (calls_before, usec_before) =
                before.per_command.get(name).copied().unwrap_or((0, 0));
            let calls = calls.saturating_sub(calls_before);
            (calls > 0).then(|| CommandCost {
                command: name.clone(),
                calls_per_message: per(calls),
                usec_per_message: per(usec.saturating_sub(usec_before)),
            })
        })
        .collect();
    costs.sort_by(|a, b| b.usec_per_message.total_cmp(&a.usec_per_message));
    costs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_counters_and_their_difference_per_message() {
        let before = RedisSnapshot::parse(
            "# Stats\r\ntotal_commands_processed:100\r\ntotal_net_input_bytes:1000\r\n\
             total_net_output_bytes:500\r\n# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.5\r\n",
        );
        assert_eq!(before.commands, 100);
        assert_eq!(before.cpu_secs, 4.0);
        let after = RedisSnapshot {
            commands: 1100,
            net_input_bytes: 21_000,
            net_output_bytes: 10_500,
            cpu_secs: 5.0,
            used_memory: 2 * 1_048_576,
            used_memory_peak: 3 * 1_048_576,
            per_command: Default::default(),
        };
        let cost = RedisCost::between(&before, &after, 100);
        assert_eq!(cost.commands, 1000);
        assert_eq!(cost.commands_per_message, 10.0);
        assert_eq!(cost.bytes_in_per_message, 200.0);
        assert_eq!(cost.bytes_out_per_message, 100.0);
        assert_eq!(cost.cpu_secs_per_100k, 1000.0);
        assert_eq!(cost.peak_memory_mb, 3.0);
    }

    #[test]
    fn commandstats_become_per_message_costs_costliest_first() {
        let before = RedisSnapshot::parse(
            "# Commandstats\r\ncmdstat_set:calls=10,usec=100,usec_per_call=10.00,rejected_calls=0\r\n",
        );
        let after = RedisSnapshot::parse(
            "# Commandstats\r\ncmdstat_set:calls=110,usec=300,usec_per_call=2.7,rejected_calls=0\r\n\
             cmdstat_evalsha:calls=50,usec=5000,usec_per_call=100.0,rejected_calls=0\r\n\
             cmdstat_ping:calls=0,usec=0\r\n",
        );
        let cost = RedisCost::between(&before, &after, 100);
        assert_eq!(
            cost.per_command,
            vec![
                CommandCost {
                    command: "evalsha".into(),
                    calls_per_message: 0.5,
                    usec_per_message: 50.0
                },
                CommandCost {
                    command: "set".into(),
                    calls_per_message: 1.0,
                    usec_per_message: 2.0
                },
            ]
        );
        assert_eq!(cost.top_commands(1), "evalsha 0.50x 50.0 us");
    }
}
