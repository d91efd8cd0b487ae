//! A private `redis-server` for tests and benchmarks, on a free port, in a temp dir, that a
//! test can stop (kill -9) and start again on the same port. Killed on drop. Never uses port 6379.
//! Also a replica of another one ([`RedisServer::start_replica_of`]) and [`RedisSentinel`], a
//! `redis-server --sentinel` watching a primary, for failover tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "redis-server";

/// A redis-server owned by one test.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
    /// The port of the primary this server starts as a replica of.
    replica_of: Option<u16>,
    /// A network namespace to run in (`ip netns exec`), and the address bound there.
    netns: Option<(String, String)>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without persistence (`--save "" --appendonly no`).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a server with `--appendonly yes`, so a restart keeps the data.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    /// Starts a server without persistence that replicates `primary` (`--replicaof`).
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        Self::start_inner(false, Some(primary.port()))
    }

    fn start_with(appendonly: bool) -> Self {
        Self::start_inner(appendonly, None)
    }

    /// Starts a persistent server inside network namespace `netns` (`ip netns exec`, which
    /// needs root), bound to `addr` there: a chaos run reaches it over a veth pair it can slow
    /// down or cut.
    pub fn start_persistent_in_netns(netns: &str, addr: &str) -> Self {
        let mut server = Self::unstarted(true, None);
        server.netns = Some((netns.to_string(), addr.to_string()));
        server.spawn();
        server
    }

    fn start_inner(appendonly: bool, replica_of: Option<u16>) -> Self {
        let mut server = Self::unstarted(appendonly, replica_of);
        server.spawn();
        server
    }

    fn unstarted(appendonly: bool, replica_of: Option<u16>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let port = free_port();
        Self {
            port,
            dir,
            appendonly,
            replica_of,
            netns: None,
            child: None,
        }
    }

    fn host(&self) -> &str {
        self.netns
            .as_ref()
            .map_or("127.0.0.1", |(_, addr)| addr.as_str())
    }

    /// Whether a `redis-server` binary is installed (a caller that is not a test can then say
    /// so instead of the panic `start` gives).
    pub fn binary_available() -> bool {
        find_binary().is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host(), self.port)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after `stop`).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the server again on the same port as a replica of `primary_port` (an old primary
    /// rejoining after a failover, before a Sentinel reconfigures it).
    pub fn restart_as_replica_of(&mut self, primary_port: u16) {
        self.stop();
        self.replica_of = Some(primary_port);
        self.spawn();
    }

    /// The PID of the running server (to signal it: SIGSTOP, SIGTERM).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        let binary = find_binary().unwrap_or_else(|| {
            panic!(
                "`{BINARY}` not found (looked in PATH and /usr/bin): the Redis integration tests \
                 need it; install it as the README's test set-up says (`apt-get install -y \
                 redis-server`)"
            )
        });
        let mut last_error = String::new();
        // The port may be taken briefly by the previous instance's socket; retry a few times.
        for _ in 0..50 {
            let mut command = match &self.netns {
                Some((netns, _)) => {
                    let mut c = Command::new("ip");
                    c.arg("netns").arg("exec").arg(netns).arg(&binary);
                    c
                }
                None => Command::new(&binary),
            };
            if let Some(primary) = self.replica_of {
                command
                    .arg("--replicaof")
                    .arg("127.0.0.1")
                    .arg(primary.to_string());
            }
            let child = command
                .arg("--port")
                .arg(self.port.to_string())
                .arg("--bind")
                .arg(self.host())
                .arg("--dir")
                .arg(self.dir.path())
                .arg("--save")
                .arg("")
                .arg("--appendonly")
                .arg(if self.appendonly { "yes" } else { "no" })
                .arg("--appendfsync")
                .arg("always")
                .arg("--protected-mode")
                .arg("no")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let mut child = match child {
                Ok(child) => child,
                Err(e) => panic!("starting {}: {e}", binary.display()),
            };
            let mut deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!("redis-server exited with {status}");
                    break;
                }
                match ping_reply(self.host(), self.port) {
                    Reply::Pong => {
                        self.child = Some(child);
                        return;
                    }
                    // Replaying a large AOF: it is up, give it time (killing it here would
                    // restart the replay forever).
                    Reply::Loading => {
                        last_error = "still loading its data".into();
                        deadline = deadline.max(Instant::now() + Duration::from_secs(1));
                    }
                    Reply::Nothing => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "redis-server did not come up on port {}: {last_error}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-server --sentinel` on a free port watching one primary under the name
/// [`RedisSentinel::MASTER`], with a short `down-after-milliseconds` so tests fail over in a
/// couple of seconds. Killed on drop.
pub struct RedisSentinel {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisSentinel {
    /// The name the Sentinel monitors the primary by.
    pub const MASTER: &'static str = "mymaster";

    /// Starts a Sentinel for the primary on `primary_port`; `quorum` Sentinels must agree it is
    /// down; it counts as down after `down_after_ms` without an answer.
    pub fn start(primary_port: u16, quorum: u32, down_after_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis-sentinel");
        let port = free_port();
        let mut sentinel = Self {
            port,
            dir,
            child: None,
        };
        let m = Self::MASTER;
        // The Sentinel rewrites its config file (known replicas, epochs), so it lives in the
        // temp dir.
        let config = sentinel.dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {m} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {m} {down_after_ms}\n\
                 sentinel failover-timeout {m} 10000\n\
                 sentinel parallel-syncs {m} 1\n",
                dir = sentinel.dir.path().display(),
            ),
        )
        .expect("writing sentinel.conf");
        let binary = find_binary().expect("`redis-server` not found (it also runs Sentinels)");
        let child = Command::new(&binary)
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} --sentinel: {e}", binary.display()));
        sentinel.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(port) {
            assert!(
                Instant::now() < deadline,
                "redis-sentinel did not come up on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sentinel
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, as `[redis] sentinels` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the Sentinel (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(BINARY))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
        let port = listener.local_addr().expect("local addr").port();
        if port != 6379 {
            return port;
        }
    }
}

fn ping(port: u16) -> bool {
    ping_at("127.0.0.1", port)
}

fn ping_at(host: &str, port: u16) -> bool {
    ping_reply(host, port) == Reply::Pong
}

#[derive(PartialEq)]
enum Reply {
    Pong,
    /// `-LOADING`: up, replaying its AOF or RDB.
    Loading,
    Nothing,
}

fn ping_reply(host: &str, port: u16) -> Reply {
    let Ok(addr) = format!("{host}:{port}").parse::<std::net::SocketAddr>() else {
        return Reply::Nothing;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return Reply::Nothing;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return Reply::Nothing;
    }
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(n) if buf[..n].starts_with(b"+PONG") => Reply::Pong,
        Ok(n) if buf[..n].starts_with(b"-LOADING") => Reply::Loading,
        _ => Reply::Nothing,
    }
}
