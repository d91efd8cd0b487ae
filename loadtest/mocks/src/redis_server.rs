//! A private `redis-server` for tests and benchmarks, on a free port, in a temp dir, that a
//! test can stop (kill -9) and start again on the same port. Killed on drop. Never uses port 6379.

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

    fn start_with(appendonly: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let port = free_port();
        let mut server = Self {
            port,
            dir,
            appendonly,
            child: None,
        };
        server.spawn();
        server
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
        format!("redis://127.0.0.1:{}/", self.port)
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
            let child = Command::new(&binary)
                .arg("--port")
                .arg(self.port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
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
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!("redis-server exited with {status}");
                    break;
                }
                if ping(self.port) {
                    self.child = Some(child);
                    return;
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
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
