//! A small TCP fault proxy (no `tc netem` on these kernels): forwards connections to an
//! upstream, optionally holding back each chunk of the *response* direction (requests arrive
//! and execute at once; only their answers come late: a timeout the caller cannot tell from
//! "never happened"), or of the *request* direction (a call that lands long after its caller
//! gave up on it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Knobs {
    response_delay_ms: AtomicU64,
    request_delay_ms: AtomicU64,
    /// Request chunks being held back right now.
    requests_held: AtomicU64,
    /// Request chunks that were held back and then delivered.
    requests_delivered_late: AtomicU64,
}

pub struct FaultProxy {
    pub url: String,
    knobs: Arc<Knobs>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://host:port` or `host:port`); returns once listening.
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let knobs = Arc::new(Knobs::default());
        let k = knobs.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let k = k.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, k).await;
                    }
                });
            }
        });
        FaultProxy { url, knobs }
    }

    /// `host:port` of the proxy (for URLs of other schemes, e.g. `postgres://`).
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    pub fn delay_responses(&self, by: Duration) {
        self.knobs
            .response_delay_ms
            .store(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn delay_requests(&self, by: Duration) {
        self.knobs
            .request_delay_ms
            .store(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn requests_held(&self) -> u64 {
        self.knobs.requests_held.load(Ordering::SeqCst)
    }

    pub fn requests_delivered_late(&self) -> u64 {
        self.knobs.requests_delivered_late.load(Ordering::SeqCst)
    }
}

async fn pipe(client: TcpStream, server: TcpStream, k: Arc<Knobs>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up_knobs = k.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let ms = up_knobs.request_delay_ms.load(Ordering::SeqCst);
            if ms > 0 {
                up_knobs.requests_held.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let sent = sw.write_all(&buf[..n]).await;
            if ms > 0 {
                up_knobs.requests_held.fetch_sub(1, Ordering::SeqCst);
                up_knobs
                    .requests_delivered_late
                    .fetch_add(1, Ordering::SeqCst);
            }
            if sent.is_err() {
                return;
            }
        }
        // The client hung up (often: it gave up waiting). Keep the server's side open a
        // while, so a request that was delivered late is served as a request, not cancelled
        // by the connection closing under it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = sw.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let ms = k.response_delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    up.abort();
}
