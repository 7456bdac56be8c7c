//! A small TCP fault proxy (no `tc netem` on these kernels): forwards a connection to an
//! upstream, optionally holding back each chunk of the *response* direction. Requests still
//! arrive and execute at once; only their answers come late, which is exactly a timeout that
//! the caller cannot tell from "never happened".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct FaultProxy {
    pub url: String,
    response_delay_ms: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://host:port`); returns once listening.
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let delay = Arc::new(AtomicU64::new(0));
        let d = delay.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let d = d.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, d).await;
                    }
                });
            }
        });
        FaultProxy {
            url,
            response_delay_ms: delay,
        }
    }

    pub fn delay_responses(&self, by: Duration) {
        self.response_delay_ms
            .store(by.as_millis() as u64, Ordering::SeqCst);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, delay_ms: Arc<AtomicU64>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let ms = delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    up.abort();
}
