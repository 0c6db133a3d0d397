//! The benchmark's open-loop load generator: HTTP/1.1 over TLS at a fixed request rate, reporting
//! the latency distribution at that rate.
//!
//! wrk and h2load are closed loop: a connection sends its next request only once the previous
//! answer is in, so a slow server is simply sent less, and the requests that a stall holds back are
//! never measured (coordinated omission). Their percentiles describe the server at saturation, not
//! what clients arriving at a given rate would see. Here request i is due at t0 + i/R whatever the
//! server does: it goes out at that time on an idle keep-alive connection, or waits in a FIFO queue
//! for one (it is never skipped), and its latency runs from when it was due to the end of its body,
//! as wrk2 counts it. Comparing proxies at the same R then compares their queueing below
//! saturation.
//!
//! `cargo run --release --example bench_openloop --
//!     --url https://127.0.0.1:19401/ --rate 20000 --duration 10`
//!
//! Prints `key=value` lines: rate_target, rate_achieved, requests, errors, p50_ms, p90_ms, p99_ms,
//! p999_ms, max_ms. `requests` are those due in the measured interval (after --warmup); `errors`
//! those answered with a non-2xx, failed with an I/O error, or unanswered 5 s after the interval
//! (timeouts); the percentiles are over the answered ones (empty when there are none);
//! rate_achieved is answered / max(duration, last answer − interval start), so a backlog drained
//! after the end does not pass for throughput. Any server certificate is accepted. Exits 1 only
//! when no connection can be opened.
#![forbid(unsafe_code)]

#[path = "common/any_cert.rs"]
mod any_cert;
use any_cert::AcceptAnyCert;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

/// How long requests still outstanding at the end may take before they count as timeouts.
const DRAIN: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Error messages printed to stderr; the rest are only counted.
const MAX_LOGGED: u32 = 10;

#[derive(Parser)]
#[command(about = "Open-loop (fixed-rate) HTTP/1.1-over-TLS load generator")]
struct Args {
    /// https://HOST:PORT/PATH
    #[arg(long)]
    url: String,
    /// Requests per second
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Measured seconds
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Keep-alive connections
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// Seconds at the same rate before the measured interval, not recorded
    #[arg(long, default_value_t = 1)]
    warmup: u64,
}

struct Target {
    addr: String,
    name: ServerName<'static>,
    authority: String,
    path: String,
    tls: TlsConnector,
}

impl Target {
    fn new(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("--url {url}"))?;
        if uri.scheme_str() != Some("https") {
            bail!("--url must be https://HOST:PORT/PATH, got {url}");
        }
        let authority = uri.authority().context("--url has no host")?;
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(443);
        // an IP address becomes ServerName::IpAddress, for which rustls sends no SNI
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_string())
            .with_context(|| format!("bad host in --url: {host}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let algs = provider.signature_verification_algorithms;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(algs)))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Target {
            addr: format!("{host}:{port}"),
            name,
            authority: authority.as_str().to_string(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            tls: TlsConnector::from(Arc::new(cfg)),
        })
    }
}

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(t: &Target) -> anyhow::Result<Sender> {
    let open = async {
        let tcp = tokio::net::TcpStream::connect(&t.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = t.tls.connect(t.name.clone(), tcp).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        // the connection's errors also fail the request in flight, where they are counted
        tokio::spawn(async move {
            let _ = conn.await;
        });
        anyhow::Ok(sender)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connect to {}", t.addr))
}

/// Ok(true) for a 2xx whose body was read to the end.
async fn request(s: &mut Sender, t: &Target) -> anyhow::Result<bool> {
    let req = Request::get(t.path.as_str())
        .header(hyper::header::HOST, t.authority.as_str())
        .body(Empty::new())?;
    let resp = s.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    Ok(ok)
}

struct Job {
    due: Instant,
    measured: bool,
}

#[derive(Default)]
struct Stats {
    latencies_us: Vec<u32>,
    errors: u64,
    /// measured requests answered or failed
    finished: u64,
    last_answer: Option<Instant>,
    logged: u32,
}

impl Stats {
    fn log(&mut self, msg: impl std::fmt::Display) {
        self.logged += 1;
        if self.logged <= MAX_LOGGED {
            eprintln!("bench_openloop: {msg}");
        } else if self.logged == MAX_LOGGED + 1 {
            eprintln!("bench_openloop: further errors are only counted");
        }
    }
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Queue = tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>;

async fn worker(
    t: Arc<Target>,
    mut conn: Option<Sender>,
    queue: Arc<Queue>,
    stats: Arc<Mutex<Stats>>,
) {
    loop {
        // a failed connection is replaced before the next job is taken, so no job waits on it
        let mut s = match conn.take() {
            Some(s) => s,
            None => match connect(&t).await {
                Ok(s) => s,
                Err(e) => {
                    lock(&stats).log(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            continue;
        }
        // tokio's Mutex is fair: idle workers take the queued jobs in turn, oldest job first
        let Some(job) = queue.lock().await.recv().await else {
            return;
        };
        let result = request(&mut s, &t).await;
        let now = Instant::now();
        let mut st = lock(&stats);
        match result {
            Ok(ok) => {
                if job.measured {
                    let us = now.saturating_duration_since(job.due).as_micros();
                    st.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    st.last_answer = Some(now);
                    st.errors += u64::from(!ok);
                }
                conn = Some(s);
            }
            Err(e) => {
                st.errors += u64::from(job.measured);
                st.log(format!("request: {e:#}"));
            }
        }
        st.finished += u64::from(job.measured);
    }
}

/// Nearest-rank percentile in ms, empty without samples.
fn pct(sorted: &[u32], q: f64) -> String {
    if sorted.is_empty() {
        return String::new();
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    format!("{:.3}", f64::from(sorted[rank - 1]) / 1000.0)
}

async fn run(args: Args, t: Arc<Target>) -> anyhow::Result<()> {
    let opening: Vec<_> = (0..args.connections)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { connect(&t).await })
        })
        .collect();
    let (mut conns, mut last_err) = (Vec::new(), None);
    for h in opening {
        match h.await {
            Ok(Ok(s)) => conns.push(s),
            Ok(Err(e)) => last_err = Some(e),
            Err(e) => last_err = Some(e.into()),
        }
    }
    if let Some(e) = &last_err {
        if conns.is_empty() {
            bail!("no connection could be opened: {e:#}");
        }
        eprintln!(
            "bench_openloop: {} of {} connections opened; {e:#}",
            conns.len(),
            args.connections
        );
    }

    let warm = args.warmup.saturating_mul(args.rate);
    let measured = args.duration.saturating_mul(args.rate);
    let stats = Arc::new(Mutex::new(Stats {
        latencies_us: Vec::with_capacity(usize::try_from(measured.min(10_000_000)).unwrap_or(0)),
        ..Stats::default()
    }));
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(tokio::sync::Mutex::new(rx));
    for s in conns {
        tokio::spawn(worker(t.clone(), Some(s), queue.clone(), stats.clone()));
    }

    let t0 = Instant::now();
    let start = t0 + Duration::from_secs(args.warmup);
    let end = start + Duration::from_secs(args.duration);
    let rate = args.rate;
    // A thread of its own, because tokio's timer wheel has 1 ms resolution: every request would
    // go out up to 1 ms late, and that lateness counts in its latency, which on loopback is less
    // than that. thread::sleep is good to tens of µs; requests already due go out together.
    std::thread::spawn(move || {
        for i in 0..warm.saturating_add(measured) {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let job = Job {
                due,
                measured: i >= warm,
            };
            if tx.send(job).is_err() {
                return;
            }
        }
    });

    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    // the guard must be gone before sleeping: the workers run on this same thread
    while Instant::now() < end + DRAIN {
        let finished = lock(&stats).finished;
        if finished >= measured {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut st = lock(&stats);
    let timeouts = measured.saturating_sub(st.finished);
    if timeouts > 0 {
        eprintln!("bench_openloop: {timeouts} requests unanswered {DRAIN:?} after the end");
    }
    let mut lat = std::mem::take(&mut st.latencies_us);
    lat.sort_unstable();
    let span = st
        .last_answer
        .map_or(Duration::ZERO, |a| a.saturating_duration_since(start))
        .max(Duration::from_secs(args.duration));
    println!("rate_target={rate}");
    println!("rate_achieved={:.1}", lat.len() as f64 / span.as_secs_f64());
    println!("requests={measured}");
    println!("errors={}", st.errors + timeouts);
    for (key, q) in [
        ("p50_ms", 0.5),
        ("p90_ms", 0.9),
        ("p99_ms", 0.99),
        ("p999_ms", 0.999),
        ("max_ms", 1.0),
    ] {
        println!("{key}={}", pct(&lat, q));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let target = Arc::new(Target::new(&args.url)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, target))
}
