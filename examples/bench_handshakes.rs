//! Full TLS 1.3 handshakes over TCP with a chosen key exchange, for pricing the post-quantum
//! hybrid (h2load's OpenSSL here has no ML-KEM): N connections, `--concurrency` at a time, each a
//! full handshake (no resumption) and one `GET /` over HTTP/1.1 with `Connection: close`, read to
//! the end.
//!
//! `cargo run --release --example bench_handshakes --
//!     --addr 127.0.0.1:19401 --group x25519mlkem768 --count 4000`
//!
//! Prints `key=value` lines: handshakes (answered 200), errors, rate (per second), group (the one
//! negotiated on the last connection).
#![forbid(unsafe_code)]

#[path = "common/any_cert.rs"]
mod any_cert;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "bench.test")]
    sni: String,
    /// x25519 or x25519mlkem768
    #[arg(long, default_value = "x25519mlkem768")]
    group: String,
    #[arg(long, default_value_t = 4000)]
    count: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let group = match args.group.as_str() {
        "x25519" => rustls::crypto::aws_lc_rs::kx_group::X25519,
        "x25519mlkem768" => rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
        other => anyhow::bail!("unknown group {other}: x25519 or x25519mlkem768"),
    };
    provider.kx_groups = vec![group];
    let tls = any_cert::client_config(Arc::new(provider), b"http/1.1", false)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from(args.sni.clone())?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let next = Arc::new(AtomicU64::new(0));
    let negotiated = Arc::new(std::sync::Mutex::new(String::from("none")));
    let started = Instant::now();
    rt.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..args.concurrency {
            let (connector, name) = (connector.clone(), name.clone());
            let (ok, errors, next) = (ok.clone(), errors.clone(), next.clone());
            let (negotiated, count, addr, sni) =
                (negotiated.clone(), args.count, args.addr, args.sni.clone());
            workers.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    match one(&connector, name.clone(), addr, &sni).await {
                        Ok(g) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut n) = negotiated.lock() {
                                *n = g;
                            }
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
    });
    let secs = started.elapsed().as_secs_f64();
    let done = ok.load(Ordering::Relaxed);
    println!("handshakes={done}");
    println!("errors={}", errors.load(Ordering::Relaxed));
    println!("rate={:.0}", done as f64 / secs);
    println!(
        "group={}",
        negotiated.lock().map(|g| g.clone()).unwrap_or_default()
    );
    Ok(())
}

/// One connection: handshake, `GET /`, the answer read to its end; the group negotiated.
async fn one(
    connector: &tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    addr: SocketAddr,
    sni: &str,
) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name, tcp).await?;
    let group = tls
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map_or("none".to_string(), |g| format!("{:?}", g.name()));
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    anyhow::ensure!(answer.starts_with(b"HTTP/1.1 200"), "not a 200");
    Ok(group)
}
