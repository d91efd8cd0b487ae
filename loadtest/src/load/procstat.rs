//! CPU time and peak memory of a process, or of some threads of this one, from `/proc` (Linux).
//!
//! The mocks run on their own tokio runtime whose threads are named [`MOCK_THREAD`], the load
//! client on threads named [`CLIENT_THREAD`]; summing `/proc/self/task/*/stat` by thread name
//! separates what the mocks cost from what the client costs inside this one process.

use std::path::Path;

/// Thread-name prefix of the mock providers' runtime.
pub const MOCK_THREAD: &str = "lt-mock";
/// Thread-name prefix of the load client's runtime.
pub const CLIENT_THREAD: &str = "lt-client";

/// Clock ticks per second for `/proc/*/stat` times (`getconf CLK_TCK`, 100 when unknown).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// (command name, utime + stime in ticks) from a `stat` file.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // After ")": state(3) ppid(4) ... utime(14) stime(15); index 0 here is field 3.
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU seconds (user + system) used so far by process `pid`.
pub fn process_cpu_secs(pid: u32, ticks: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|(_, t)| t as f64 / ticks)
}

/// CPU seconds used so far by this process.
pub fn self_cpu_secs(ticks: f64) -> Option<f64> {
    process_cpu_secs(std::process::id(), ticks)
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix`
/// (exited threads are not counted).
pub fn threads_cpu_secs(prefix: &str, ticks: f64) -> f64 {
    let Ok(dir) = std::fs::read_dir(Path::new("/proc/self/task")) else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .filter(|(comm, _)| comm.starts_with(prefix))
        .map(|(_, t)| t as f64 / ticks)
        .sum()
}

/// Peak resident set size (`VmHWM`) of process `pid`, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let line = "42 (lt mock) S 1 2 3 4 5 6 7 8 9 10 120 30 0 0";
        assert_eq!(parse_stat(line), Some(("lt mock".to_string(), 150)));
    }

    #[test]
    fn reads_this_process() {
        let t = clock_ticks();
        assert!(self_cpu_secs(t).is_some());
        assert!(peak_rss_bytes(std::process::id()).unwrap_or(0) > 0);
    }
}
