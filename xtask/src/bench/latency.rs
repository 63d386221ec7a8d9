//! A loopback TCP proxy that gives every HTTP response a fixed first-byte latency.
//!
//! S3 within a region answers a GET after tens of milliseconds whatever the range; moto and the
//! in-process S3 server answer in well under one. The bench puts one of these in front of each S3
//! and points the function (`AWS_ENDPOINT_URL_S3`) and the baselines at it, so every S3 request
//! of either pays the same latency.
//!
//! It does not parse HTTP. HTTP/1.1 clients (the AWS SDK, reqwest) send a request and wait for its
//! response before sending the next one on the same connection (no pipelining), so on each
//! connection: client bytes after the last response bytes begin a request, and the first
//! server bytes after that begin its response. Those first bytes are held for the latency, the
//! rest of the response streams through unchanged. One upstream connection per client connection,
//! so the client's connection pool (and its concurrency) is what the server sees.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// First-byte latency of every S3 request in the bench (S3 within one region: tens of ms).
pub const S3_FIRST_BYTE_LATENCY: Duration = Duration::from_millis(25);

/// Copy buffer per direction and connection: large enough that a 5 MiB object is a few dozen
/// reads and writes.
const BUF: usize = 256 * 1024;

/// The proxy; stops accepting when dropped (connections in progress end with their peers).
pub struct LatencyProxy {
    addr: SocketAddr,
    responses: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    /// Listens on `127.0.0.1:<free port>` and relays every connection to `upstream`, each response's
    /// first bytes held `latency`.
    pub async fn start(upstream: SocketAddr, latency: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the latency proxy")?;
        let addr = listener.local_addr()?;
        let responses = Arc::new(AtomicU64::new(0));
        let counter = responses.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    // A connection ends with an error when a peer resets it; nothing to report.
                    let _ = relay(client, upstream, latency, counter).await;
                });
            }
        });
        Ok(Self {
            addr,
            responses,
            task,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Responses relayed so far (= requests answered).
    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::SeqCst)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    latency: Duration,
    responses: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    // Set when request bytes went upstream, cleared by the first response bytes that follow: it
    // is set before the bytes are written, so a response can never be seen before its request.
    let awaiting = AtomicBool::new(false);
    let requests = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = client_r.read(&mut buf).await?;
            if n == 0 {
                return server_w.shutdown().await;
            }
            awaiting.store(true, Ordering::SeqCst);
            server_w.write_all(&buf[..n]).await?;
        }
    };
    let answers = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = server_r.read(&mut buf).await?;
            if n == 0 {
                return client_w.shutdown().await;
            }
            if awaiting.swap(false, Ordering::SeqCst) {
                responses.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(latency).await;
            }
            client_w.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(requests, answers).map(|_| ())
}
