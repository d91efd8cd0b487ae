//! A TCP proxy between the gateway and a `redis-server` that can lose replies: from the first
//! client write carrying a marker on, that write (and every later one) still reaches Redis, but
//! nothing Redis answers on that connection reaches the client, as when a connection breaks
//! after a command got through. [`ReplyCutProxy::heal`] then closes such connections (a lost
//! reply leaves a connection unusable), so the client reconnects; new connections are whole.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Shared {
    /// Armed marker: the next client write containing it cuts its connection's replies.
    marker: Mutex<Option<Vec<u8>>>,
    cuts: AtomicUsize,
    /// Kill switches of connections whose replies were cut.
    cut_conns: Mutex<Vec<CancellationToken>>,
}

pub struct ReplyCutProxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl ReplyCutProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let (accept_shared, accept_stop) = (Arc::clone(&shared), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                tokio::spawn(forward(
                    client,
                    server,
                    Arc::clone(&accept_shared),
                    accept_stop.child_token(),
                ));
            }
        });
        Self { port, shared, stop }
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The next client write containing `marker` is forwarded, and from then on its
    /// connection's replies are dropped.
    pub fn cut_replies_after(&self, marker: &[u8]) {
        *self.shared.marker.lock() = Some(marker.to_vec());
    }

    /// Connections whose replies were cut so far.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::Acquire)
    }

    /// Closes every connection whose replies were cut.
    pub fn heal(&self) {
        for kill in self.shared.cut_conns.lock().drain(..) {
            kill.cancel();
        }
    }
}

impl Drop for ReplyCutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn forward(
    client: TcpStream,
    server: TcpStream,
    shared: Arc<Shared>,
    kill: CancellationToken,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut = Arc::new(AtomicBool::new(false));
    let up = {
        let (shared, cut, kill) = (Arc::clone(&shared), Arc::clone(&cut), kill.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            // The tail of the previous read, so a marker split across two reads is found.
            let mut tail: Vec<u8> = Vec::new();
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                {
                    let mut marker = shared.marker.lock();
                    if let Some(m) = marker.as_ref() {
                        let mut seen = tail.clone();
                        seen.extend_from_slice(chunk);
                        if contains(&seen, m) {
                            *marker = None;
                            cut.store(true, Ordering::Release);
                            shared.cuts.fetch_add(1, Ordering::AcqRel);
                            shared.cut_conns.lock().push(kill.clone());
                        }
                    }
                    let keep = chunk.len().min(256);
                    tail = chunk[chunk.len() - keep..].to_vec();
                }
                if server_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut.load(Ordering::Acquire) {
                continue;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = kill.cancelled() => {}
        _ = up => {}
        _ = down => {}
    }
}
