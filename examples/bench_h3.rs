//! The benchmark's HTTP/3 load generator (h2load here has no HTTP/3): closed loop, like
//! `h2load -cC -mM`, over quinn + h3. C QUIC connections each keep M requests in flight (a new
//! one as soon as one ends) for D seconds, GET of one path, bodies read and dropped.
//!
//! `cargo run --release --example bench_h3 --
//!     --addr 127.0.0.1:19401 --sni bench.test --connections 16 --streams 16 --duration 10`
//!
//! Prints `key=value` lines: requests (answered 2xx within the interval), errors (any other
//! outcome), rps. Any server certificate is accepted. Exits 1 when no connection can be opened.
//!
//! `--handshakes N`: instead, N new connections (32 at a time), each with one GET, then closed;
//! no session resumption, so each is a full handshake. Prints handshakes, errors, rate.
//! `--idle K --hold S`: K connections, one GET each, then held open and idle for S seconds;
//! prints `errors=E` and `opened=K` (those that answered) when all were tried (for a memory
//! reading), then exits after S seconds.
#![forbid(unsafe_code)]

#[path = "common/any_cert.rs"]
mod any_cert;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, Bytes};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The QUIC listener, IP:PORT
    #[arg(long)]
    addr: SocketAddr,
    /// SNI and `:authority`
    #[arg(long, default_value = "bench.test")]
    sni: String,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests in flight per connection
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Seconds
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Full handshakes instead of a timed run
    #[arg(long)]
    handshakes: Option<usize>,
    /// Idle connections held instead of a timed run
    #[arg(long)]
    idle: Option<usize>,
    /// Seconds the idle connections are held
    #[arg(long, default_value_t = 20)]
    hold: u64,
}

fn client_config(resume: bool) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = any_cert::client_config(provider, b"h3", resume)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// One request: true when answered 2xx with its whole body.
async fn one(send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>, uri: &str) -> bool {
    let Ok(req) = http::Request::get(uri).body(()) else {
        return false;
    };
    let Ok(mut stream) = send.send_request(req).await else {
        return false;
    };
    if stream.finish().await.is_err() {
        return false;
    }
    let Ok(resp) = stream.recv_response().await else {
        return false;
    };
    loop {
        match stream.recv_data().await {
            Ok(Some(mut d)) => d.advance(d.remaining()),
            Ok(None) => break,
            Err(_) => return false,
        }
    }
    resp.status().is_success()
}

/// A new connection, one GET on it; the connection is returned (kept open) when it succeeded.
async fn connect_once(
    endpoint: &quinn::Endpoint,
    args: &Args,
    uri: &str,
) -> anyhow::Result<quinn::Connection> {
    let conn = endpoint.connect(args.addr, &args.sni)?.await?;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    anyhow::ensure!(one(&mut send, uri).await, "the request failed");
    Ok(conn)
}

async fn handshakes(endpoint: quinn::Endpoint, args: Args, uri: String, n: usize) {
    let endpoint = Arc::new(endpoint);
    let (args, uri) = (Arc::new(args), Arc::new(uri));
    let next = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (endpoint, args, uri, next, bad) = (
            endpoint.clone(),
            args.clone(),
            uri.clone(),
            next.clone(),
            bad.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                match connect_once(&endpoint, &args, &uri).await {
                    Ok(c) => c.close(0u32.into(), b""),
                    Err(_) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let bad = bad.load(Ordering::Relaxed);
    println!("handshakes={}", n as u64 - bad);
    println!("errors={bad}");
    println!("rate={:.0}", (n as u64 - bad) as f64 / secs);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    endpoint.set_default_client_config(client_config(args.handshakes.is_none())?);
    let uri = format!("https://{}{}", args.sni, args.path);
    if let Some(n) = args.handshakes {
        handshakes(endpoint, args, uri, n).await;
        return Ok(());
    }
    if let Some(k) = args.idle {
        let (mut held, mut failed) = (Vec::with_capacity(k), 0);
        for _ in 0..k {
            match connect_once(&endpoint, &args, &uri).await {
                Ok(c) => held.push(c),
                Err(_) => failed += 1,
            }
        }
        anyhow::ensure!(!held.is_empty(), "no connection could be opened");
        println!("errors={failed}");
        println!("opened={}", held.len());
        use std::io::Write;
        std::io::stdout().flush()?;
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
        return Ok(());
    }
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    let mut opened = 0;
    for _ in 0..args.connections {
        let conn = endpoint
            .connect(args.addr, &args.sni)?
            .await
            .context("QUIC handshake")?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        opened += 1;
        for _ in 0..args.streams {
            let (mut send, uri, ok, bad) = (send.clone(), uri.clone(), ok.clone(), bad.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    if one(&mut send, &uri).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    anyhow::ensure!(opened > 0, "no connection could be opened");
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = ok.load(Ordering::Relaxed);
    println!("requests={requests}");
    println!("errors={}", bad.load(Ordering::Relaxed));
    println!("rps={:.0}", requests as f64 / secs);
    Ok(())
}
