//! Network faults below the application: Redis runs in a network namespace of its own, joined
//! to the host by a veth pair on private addresses (10.201.x.0/30), and the runner degrades or
//! cuts that link: `tc netem` latency and loss when the kernel has `sch_netem`, a `tc tbf`
//! bandwidth limit (queueing delay, and drops once its queue is full), and a partition (both
//! ends of the link set down, so packets vanish without a reset, then set up again).
//!
//! Everything is set up and torn down by the runner itself (also on error and Ctrl-C, and on
//! drop). Without root or `ip netns`, the runner says so and skips these faults; it never fakes
//! them.

use std::process::Stdio;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

/// Whether to use network namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Mode {
    /// When the machine allows it.
    Auto,
    Off,
    /// Fail the run when it cannot.
    Require,
}

/// The namespace and its link, when available.
pub struct Net {
    link: Option<Link>,
    why_not: String,
    netem: bool,
}

struct Link {
    ns: String,
    host_if: String,
    ns_if: String,
    pub ns_addr: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    fn unavailable(why: impl Into<String>) -> Self {
        Net {
            link: None,
            why_not: why.into(),
            netem: false,
        }
    }

    /// Creates the namespace and the veth pair (or says why not).
    pub async fn prepare(mode: Mode) -> anyhow::Result<Net> {
        if mode == Mode::Off {
            return Ok(Net::unavailable("network faults are off (--netns off)"));
        }
        let id = std::process::id();
        let ns = format!("pgchaos{id}");
        let host_if = format!("pgc{}h", id % 100_000);
        let ns_if = format!("pgc{}n", id % 100_000);
        let subnet = id % 250 + 1;
        let host_addr = format!("10.201.{subnet}.1");
        let ns_addr = format!("10.201.{subnet}.2");
        let link = Link {
            ns: ns.clone(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            ns_addr: ns_addr.clone(),
        };
        let steps: Vec<Vec<String>> = vec![
            vec!["ip".into(), "netns".into(), "add".into(), ns.clone()],
            vec![
                "ip".into(),
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_if.clone(),
            ],
            vec![
                "ip".into(),
                "link".into(),
                "set".into(),
                ns_if.clone(),
                "netns".into(),
                ns.clone(),
            ],
            vec![
                "ip".into(),
                "addr".into(),
                "add".into(),
                format!("{host_addr}/30"),
                "dev".into(),
                host_if.clone(),
            ],
            vec![
                "ip".into(),
                "link".into(),
                "set".into(),
                host_if.clone(),
                "up".into(),
            ],
            vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                ns.clone(),
                "ip".into(),
                "addr".into(),
                "add".into(),
                format!("{ns_addr}/30"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                ns.clone(),
                "ip".into(),
                "link".into(),
                "set".into(),
                ns_if.clone(),
                "up".into(),
            ],
            vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                ns.clone(),
                "ip".into(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        let mut net = Net {
            link: Some(link),
            why_not: String::new(),
            netem: false,
        };
        for step in &steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = run(&args) {
                net.teardown().await;
                if mode == Mode::Require {
                    bail!("network namespaces unavailable: {e}");
                }
                eprintln!("network faults skipped: {e}");
                return Ok(Net::unavailable(format!(
                    "network namespaces unavailable: {e}"
                )));
            }
        }
        // Does the kernel have netem? (Some VM kernels are built without it.)
        net.netem = run(&[
            "tc", "qdisc", "add", "dev", &host_if, "root", "netem", "delay", "1ms",
        ])
        .is_ok();
        let _ = run(&["tc", "qdisc", "del", "dev", &host_if, "root"]);
        if !net.netem {
            eprintln!(
                "tc netem is missing from this kernel: latency and loss faults skipped (tbf and partitions still run)"
            );
        }
        Ok(net)
    }

    pub fn available(&self) -> bool {
        self.link.is_some()
    }

    pub fn netem(&self) -> bool {
        self.netem
    }

    pub fn why_not(&self) -> &str {
        &self.why_not
    }

    /// The namespace Redis runs in and the address it binds there.
    pub fn redis_home(&self) -> Option<(&str, &str)> {
        self.link
            .as_ref()
            .map(|l| (l.ns.as_str(), l.ns_addr.as_str()))
    }

    /// Puts the qdisc `spec` (`netem delay 50ms`, `tbf rate ...`) on both ends of the link
    /// for `for_`, then removes it.
    pub async fn impair(&self, spec: &str, for_: Duration) -> anyhow::Result<()> {
        let Some(l) = &self.link else {
            bail!("no network namespace");
        };
        let words: Vec<&str> = spec.split_whitespace().collect();
        let mut host = vec!["tc", "qdisc", "add", "dev", l.host_if.as_str(), "root"];
        host.extend(&words);
        let mut inside = vec![
            "ip",
            "netns",
            "exec",
            l.ns.as_str(),
            "tc",
            "qdisc",
            "add",
            "dev",
            l.ns_if.as_str(),
            "root",
        ];
        inside.extend(&words);
        run(&host).map_err(anyhow::Error::msg)?;
        let inner = run(&inside).map_err(anyhow::Error::msg);
        if inner.is_ok() {
            tokio::time::sleep(for_).await;
        }
        let _ = run(&["tc", "qdisc", "del", "dev", &l.host_if, "root"]);
        let _ = run(&[
            "ip", "netns", "exec", &l.ns, "tc", "qdisc", "del", "dev", &l.ns_if, "root",
        ]);
        inner
    }

    /// Cuts the link (both ends down) for `for_`, then restores it.
    pub async fn partition(&self, for_: Duration) -> anyhow::Result<()> {
        let Some(l) = &self.link else {
            bail!("no network namespace");
        };
        run(&["ip", "link", "set", &l.host_if, "down"]).map_err(anyhow::Error::msg)?;
        let _ = run(&[
            "ip", "netns", "exec", &l.ns, "ip", "link", "set", &l.ns_if, "down",
        ]);
        tokio::time::sleep(for_).await;
        let _ = run(&[
            "ip", "netns", "exec", &l.ns, "ip", "link", "set", &l.ns_if, "up",
        ]);
        run(&["ip", "link", "set", &l.host_if, "up"]).map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// Removes the link and the namespace (idempotent).
    pub async fn teardown(&self) {
        if let Some(l) = &self.link {
            l.remove();
        }
    }
}

impl Link {
    fn remove(&self) {
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.ns]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(l) = self.link.take() {
            l.remove();
        }
    }
}
