//! An HTTP/1.1 keep-alive connection that goes quiet between requests is parked: hyper's
//! connection (its 16 KiB of buffers and its request slot) is dropped, and limen holds only the
//! TLS session until the client's next bytes. The client cannot tell: the same connection serves
//! its next request, bytes that arrive in pieces are kept, and the idle timeout and shutdown
//! still close it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const HOST: &str = "app.test";
/// Anything limen should do at once gets this long at most.
const PROMPT: Duration = Duration::from_secs(10);

/// limen answering `ok` for any host. `write_idle: 400ms` makes the watchdog tick every 100 ms,
/// so a connection quiet for a tick is parked within about 200 ms.
async fn start(pki: &Pki, idle: &str) -> Proxy {
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n\
         timeouts:\n  idle: {idle}\n  write_idle: 400ms\nroutes:\n  - {{host: \"*\", respond: {{body: ok}}}}\n"
    );
    Proxy::start_in(dir, &yaml).await
}

async fn parked(proxy: &Proxy) -> f64 {
    let (_, m) = admin_get(proxy.admin(), "/metrics").await;
    metric(&m, "limen_connections_parked").unwrap_or(-1.0)
}

/// One request written as `pieces` (each sent `gap` apart), and the status of its answer.
async fn ask_in_pieces(tls: &mut TlsStream<TcpStream>, pieces: &[&str], gap: Duration) -> u16 {
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        tls.write_all(p.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
        }
        let n = tokio::time::timeout(PROMPT, tls.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "limen closed the connection instead of answering");
        got.extend_from_slice(&buf[..n]);
    }
}

fn request() -> String {
    format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
}

#[tokio::test]
async fn a_quiet_keep_alive_connection_is_parked_and_serves_its_next_request() {
    let pki = Pki::new();
    let proxy = start(&pki, "30s").await;
    let client = Client::new(&pki);
    let mut conn = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(
        parked(&proxy).await,
        0.0,
        "nothing parked before any request"
    );

    for round in 0..3 {
        assert_eq!(
            ask_in_pieces(&mut conn, &[&request()], Duration::ZERO).await,
            200,
            "round {round}"
        );
        eventually(PROMPT, "the quiet connection is parked", || async {
            parked(&proxy).await == 1.0
        })
        .await;
    }
    // Woken by the next request: no longer parked while it is served, parked again after.
    let req = request();
    let (head, rest) = req.split_at(10);
    let status = ask_in_pieces(&mut conn, &[head, rest], Duration::from_millis(500)).await;
    assert_eq!(status, 200, "a request sent in two pieces 500 ms apart");
}

#[tokio::test]
async fn a_request_head_arriving_in_pieces_is_not_parked_away() {
    let pki = Pki::new();
    let proxy = start(&pki, "30s").await;
    let client = Client::new(&pki);
    let mut conn = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(
        ask_in_pieces(&mut conn, &[&request()], Duration::ZERO).await,
        200
    );
    eventually(PROMPT, "parked after the first request", || async {
        parked(&proxy).await == 1.0
    })
    .await;

    // The first piece wakes the connection; while the rest is awaited (several ticks) it must
    // stay awake, and the bytes already read must not be lost.
    let req = request();
    let asking = tokio::spawn(async move {
        let pieces = [&req[..4], &req[4..20], &req[20..]];
        let status = ask_in_pieces(&mut conn, &pieces, Duration::from_millis(300)).await;
        (status, conn)
    });
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        parked(&proxy).await,
        0.0,
        "a connection with half a request head read is not parked"
    );
    let (status, _conn) = asking.await.unwrap();
    assert_eq!(status, 200, "the request sent in three pieces is answered");
}

#[tokio::test]
async fn a_parked_connection_is_closed_when_its_idle_timeout_runs_out() {
    let pki = Pki::new();
    let proxy = start(&pki, "800ms").await;
    let client = Client::new(&pki);
    let mut conn = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(
        ask_in_pieces(&mut conn, &[&request()], Duration::ZERO).await,
        200
    );
    let idle_since = Instant::now();
    eventually(PROMPT, "parked", || async { parked(&proxy).await == 1.0 }).await;
    let (_, closed) = read_until_close(&mut conn, Duration::from_secs(5)).await;
    let took = idle_since.elapsed();
    assert!(closed, "a parked connection idle for 5 s is still open");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "closed after {took:?} idle, for an idle timeout of 800 ms"
    );
    eventually(PROMPT, "no longer counted as parked", || async {
        parked(&proxy).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let pki = Pki::new();
    let mut proxy = start(&pki, "30s").await;
    let client = Client::new(&pki);
    let mut conn = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(
        ask_in_pieces(&mut conn, &[&request()], Duration::ZERO).await,
        200
    );
    eventually(PROMPT, "parked", || async { parked(&proxy).await == 1.0 }).await;
    let stopping = Instant::now();
    let (closed, drained) = tokio::join!(
        read_until_close(&mut conn, Duration::from_secs(8)),
        proxy.shutdown()
    );
    assert!(closed.1, "the parked connection was closed by shutdown");
    assert!(
        drained,
        "shutdown drained every connection within the grace"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

static RELEASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_release() {
    RELEASES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

fn releases() -> usize {
    RELEASES.load(std::sync::atomic::Ordering::SeqCst)
}

/// The binary hands glibc's `malloc_trim` to `release_memory_with`; here a counter stands in for
/// it. It is called once connections parked or ended and churn settled, never while nothing
/// happens (an idle proxy does not trim every second).
#[tokio::test]
async fn freed_memory_is_given_back_once_connections_park_or_end_and_not_while_idle() {
    use limen::server::RELEASE_TICK;
    let pki = Pki::new();
    let mut proxy = start(&pki, "30s").await;
    proxy
        .running
        .as_mut()
        .unwrap()
        .release_memory_with(count_release);
    // Nothing ended or parked yet: three ticks go by without a call.
    tokio::time::sleep(RELEASE_TICK * 3).await;
    assert_eq!(releases(), 0, "an idle proxy gives nothing back");

    let client = Client::new(&pki);
    let mut conn = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    assert_eq!(
        ask_in_pieces(&mut conn, &[&request()], Duration::ZERO).await,
        200
    );
    eventually(PROMPT, "released after the connection parked", || async {
        releases() >= 1
    })
    .await;
    let after_park = releases();
    tokio::time::sleep(RELEASE_TICK * 3).await;
    assert_eq!(releases(), after_park, "one release per settled churn");

    drop(conn);
    eventually(PROMPT, "released after the connection ended", || async {
        releases() > after_park
    })
    .await;
}
