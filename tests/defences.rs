//! Hostile and broken clients meet limen: oversized or ambiguous requests are refused with the
//! right status, stalled clients are cut off on the configured timeouts, the connection limit
//! holds, aborted bodies never poison the upstream pool, and HTTP/2 floods are shut down while the
//! proxy keeps serving everyone else.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw_h2::*;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "app.example.test";

/// Any request that should be answered at once gets this long at most.
const PROMPT: Duration = Duration::from_secs(10);

/// Routes every host to `upstream`, serving a certificate for `HOST`.
async fn proxy_to(pki: &Pki, upstream: &str, extra: &str) -> Proxy {
    Proxy::start(
        pki,
        &[HOST],
        extra,
        &format!("  - {{host: \"*\", upstreams: [\"{upstream}\"]}}\n"),
    )
    .await
}

/// A normal GET over HTTP/1.1 and over HTTP/2, each on a fresh connection, succeeds.
async fn still_serves(client: &Client, addr: SocketAddr) {
    for proto in [Proto::H1, Proto::H2] {
        let got = tokio::time::timeout(PROMPT, async {
            let mut conn = client.open(addr, HOST, proto).await;
            conn.get(HOST, "/still-here").await
        })
        .await
        .unwrap_or_else(|_| panic!("{proto:?}: no answer within {PROMPT:?}"))
        .unwrap_or_else(|e| panic!("{proto:?}: a normal request failed: {e}"));
        assert_eq!(got.status, StatusCode::OK, "{proto:?}: {}", got.text());
    }
}

/// Reads whatever a TLS connection yields until EOF (or an error, such as a reset or a missing
/// close_notify) and returns (bytes read, true); or (bytes read, false) when `patience` runs out.
async fn drain_to_close<R: AsyncRead + Unpin>(io: &mut R, patience: Duration) -> (u64, bool) {
    let deadline = tokio::time::Instant::now() + patience;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_) => return (total, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n as u64,
        }
    }
}

// ---------------------------------------------------------------- a backend that keeps score

/// What an upstream saw of one request body.
#[derive(Debug, Clone, Copy)]
struct BodySeen {
    bytes: u64,
    /// The body ended as its framing said; false: the connection broke off mid-body.
    complete: bool,
}

/// An upstream that records, for each request, how much body arrived and whether it arrived
/// whole; it answers 200 once the body ends.
struct RecordingBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<BodySeen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingBackend {
    async fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (c, r, b) = (connections.clone(), requests.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, b) = (r.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let b = b.clone();
                        async move {
                            let mut body = req.into_body();
                            let mut seen = BodySeen {
                                bytes: 0,
                                complete: true,
                            };
                            while let Some(frame) = body.frame().await {
                                match frame {
                                    Ok(f) => {
                                        if let Some(d) = f.data_ref() {
                                            seen.bytes += d.len() as u64;
                                        }
                                    }
                                    Err(_) => {
                                        seen.complete = false;
                                        break;
                                    }
                                }
                            }
                            b.lock().unwrap().push(seen);
                            let text = format!("received {} bytes", seen.bytes);
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        RecordingBackend {
            addr,
            connections,
            requests,
            bodies,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn bodies(&self) -> Vec<BodySeen> {
        self.bodies.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- requests that are refused

#[tokio::test]
async fn headers_over_max_header_bytes_are_431_on_h1_and_refused_on_h2() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "limits:\n  max_header_bytes: 16384").await;
    let client = Client::new(&pki);

    // HTTP/1.1: 40 headers of 1 KB each, well over both the limit and hyper's 8 KiB buffer floor.
    let mut req = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(1000)));
    }
    req.push_str("\r\n");
    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "got: {resp:?}");
    assert!(closed, "the connection must close after a 431");

    // HTTP/2: one 40 KB header. The server answers 431 on the stream, or the client or server
    // refuses the stream or the connection; what must not happen is a request reaching upstream.
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let mut req = conn.request("GET", HOST, "/huge", body(""));
    req.headers_mut()
        .insert("x-huge", "a".repeat(40_000).parse().unwrap());
    match tokio::time::timeout(PROMPT, conn.fetch(req)).await {
        Err(_) => panic!("HTTP/2: no answer to a 40 KB header within {PROMPT:?}"),
        Ok(Ok(got)) => assert_eq!(
            got.status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{}",
            got.text()
        ),
        Ok(Err(_refused)) => {}
    }
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        0,
        "no oversized request may reach the upstream"
    );

    still_serves(&client, proxy.addr).await;
}

/// A head that does not fit `max_header_bytes` is 414 when what did not fit is the request line
/// (its target), and 431 when it is a header: on a first request, on one pipelined behind a
/// served request, and on the plain-HTTP listener, which echoes the path into its Location.
#[tokio::test]
async fn a_request_target_too_long_is_414_and_a_header_too_long_is_431() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  http: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\nlimits:\n  max_header_bytes: 16384\nroutes:\n  - {{host: \"*\", upstreams: [\"{}\"]}}\n",
        b.url()
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);
    let long_path = format!("/{}", "a".repeat(40_000));
    let long_target = format!("GET {long_path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let long_header = format!(
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let many_headers = {
        let mut r = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n");
        for i in 0..40 {
            r.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(1000)));
        }
        r + "\r\n"
    };
    let served = format!("GET /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let cases: [(&str, String, &str); 5] = [
        ("a long target", long_target.clone(), "HTTP/1.1 414 "),
        ("one long header", long_header.clone(), "HTTP/1.1 431 "),
        ("many headers", many_headers, "HTTP/1.1 431 "),
        (
            "a long target behind a served request",
            served.clone() + &long_target,
            "HTTP/1.1 414 ",
        ),
        (
            "a long header behind a served request",
            served + &long_header,
            "HTTP/1.1 431 ",
        ),
    ];
    for (what, req, status) in cases {
        let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
        let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), PROMPT).await;
        assert!(closed, "{what}: the connection must close: {resp:?}");
        // The last response on the connection is the refusal; a served request came before it.
        let last = resp.rfind("HTTP/1.1 ").map_or("", |i| &resp[i..]);
        assert!(
            last.starts_with(status),
            "{what}: want {status:?}, got {resp:?}"
        );
        assert!(
            !resp.contains("aaaa"),
            "{what}: the refusal echoes nothing: {resp:?}"
        );
    }
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        2,
        "only the two short requests went upstream"
    );

    // The plain-HTTP listener: the same bound, the same answer, no 40 KB Location.
    let http = proxy.running().http_addr.unwrap();
    for (what, req, status) in [
        ("a long target", &long_target, "HTTP/1.1 414 "),
        ("one long header", &long_header, "HTTP/1.1 431 "),
    ] {
        let mut tcp = TcpStream::connect(http).await.unwrap();
        let (resp, closed) = tcp_exchange(&mut tcp, req.as_bytes(), PROMPT).await;
        assert!(
            closed,
            "http listener, {what}: the connection must close: {resp:?}"
        );
        assert!(
            resp.starts_with(status),
            "http listener, {what}: want {status:?}, got {resp:?}"
        );
    }
    still_serves(&client, proxy.addr).await;
}

#[tokio::test]
async fn http1_without_host_or_with_two_hosts_is_400() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);

    let cases: [(&str, String); 2] = [
        ("no Host", "GET / HTTP/1.1\r\n\r\n".to_string()),
        (
            "two Hosts",
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: other.example.test\r\n\r\n"),
        ),
    ];
    for (what, req) in cases {
        let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
        let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{what}: got {resp:?}");
        assert!(
            resp.contains("Host"),
            "{what}: the reason is given: {resp:?}"
        );
        assert!(closed, "{what}: the connection must close after the 400");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn http2_authority_and_a_different_host_header_is_400() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;

    // :authority is app.example.test, but the host header names another site.
    let mut req = conn.request("GET", HOST, "/", body(""));
    req.headers_mut()
        .insert(http::header::HOST, "evil.example.test".parse().unwrap());
    let got = conn.fetch(req).await.unwrap();
    assert_eq!(got.status, StatusCode::BAD_REQUEST, "{}", got.text());
    assert!(got.text().contains("disagree"), "{}", got.text());
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);

    // A host header that agrees with :authority is fine.
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let mut req = conn.request("GET", HOST, "/", body(""));
    req.headers_mut()
        .insert(http::header::HOST, HOST.parse().unwrap());
    let got = conn.fetch(req).await.unwrap();
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
}

#[tokio::test]
async fn conflicting_or_malformed_content_length_is_400_and_closes() {
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);

    let head = format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\n");
    let cases = [
        (
            "two different Content-Lengths",
            format!("{head}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        (
            "a Content-Length that is not a number",
            format!("{head}Content-Length: abc\r\n\r\nhello"),
        ),
    ];
    for (what, req) in cases {
        let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
        let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(closed, "{what}: the connection must close");
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "{what}: {:?}",
            resp.lines().next()
        );
    }
    assert!(
        b.bodies().is_empty(),
        "nothing reached the upstream: {:?}",
        b.bodies()
    );
}

/// Content-Length with Transfer-Encoding is the classic smuggling vector. hyper's parser applies
/// RFC 9112 6.3: Transfer-Encoding wins, Content-Length is dropped, and the connection is closed
/// after the response, so nothing can hide behind the body. limen keeps that (rather than a
/// 400, which it cannot give: hyper removes the Content-Length before the request reaches it).
#[tokio::test]
async fn content_length_with_transfer_encoding_is_framed_by_chunks_and_closes() {
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);

    let head = format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\n");
    // If Content-Length (3) framed the body, "hel" would go upstream and the rest would be read
    // as a second, smuggled request.
    let chunked = format!("5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    for order in [
        format!("{head}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"),
        format!("{head}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{chunked}"),
    ] {
        let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
        let (resp, closed) = raw_exchange(&mut tls, order.as_bytes(), Duration::from_secs(5)).await;
        assert!(closed, "the connection must close after the response");
        assert_eq!(
            resp.matches("HTTP/1.1 ").count(),
            1,
            "one response only: {resp}"
        );
    }
    let seen = b.bodies();
    assert_eq!(seen.len(), 2, "two requests, no smuggled third: {seen:?}");
    assert!(seen.iter().all(|s| s.bytes == 5 && s.complete), "{seen:?}");
}

// ---------------------------------------------------------------- stalled clients

#[tokio::test]
async fn a_slowloris_that_stalls_mid_headers_is_cut_off_after_header_read() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let header_read = Duration::from_millis(500);
    let proxy = proxy_to(&pki, &b.url(), "timeouts:\n  header_read: 500ms").await;
    let client = Client::new(&pki);

    let started = Instant::now();
    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    // Half a request, then nothing: the header_read clock cannot have started before `started`.
    let partial = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: aaaa");
    let (_, closed) = raw_exchange(&mut tls, partial.as_bytes(), header_read * 4).await;
    let took = started.elapsed();
    assert!(closed, "still open {took:?} after stalling mid-headers");
    assert!(
        took >= header_read - Duration::from_millis(50),
        "closed after {took:?}, before header_read ran out"
    );
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn half_a_head_pipelined_behind_a_request_in_flight_is_cut_off_by_idle() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(
        &pki,
        &b.url(),
        "timeouts:\n  header_read: 500ms\n  idle: 1500ms",
    )
    .await;
    let client = Client::new(&pki);

    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    // A real request that takes 300 ms upstream, and in the same write the first half of the
    // next request head, which never gets finished.
    let pipelined = format!(
        "GET /sleep/300 HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: aaaa"
    );
    let started = Instant::now();
    let (resp, closed) = raw_exchange(&mut tls, pipelined.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "the first request is served: {resp:?}"
    );
    // The rest of the head sits in hyper's buffer, where the watchdog cannot see it; the
    // connection is then bounded by `idle` (documented in docs/configuration.md).
    assert!(
        closed,
        "still open {:?} after a half request head (idle is 1500ms)",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_408_after_body_idle() {
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let body_idle = Duration::from_millis(500);
    let proxy = proxy_to(&pki, &b.url(), "timeouts:\n  body_idle: 500ms").await;
    let client = Client::new(&pki);

    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let req =
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\n0123456789");
    let started = Instant::now();
    let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(resp.starts_with("HTTP/1.1 408"), "got {resp:?}");
    assert!(resp.contains("stopped arriving"), "{resp}");
    assert!(closed, "the connection must close after the 408");
    assert!(
        took >= body_idle - Duration::from_millis(50),
        "408 after only {took:?}"
    );
    // The upstream saw the body break off, never complete.
    eventually(
        Duration::from_secs(5),
        "the upstream saw the body end",
        || {
            let n = b.bodies().len();
            async move { n == 1 }
        },
    )
    .await;
    let seen = b.bodies()[0];
    assert!(!seen.complete && seen.bytes <= 10, "{seen:?}");
}

/// `content-type: application/grpc` is a label any client can send: on its own it must not turn
/// `body_idle` into `timeouts.idle` (nor switch `min_body_rate` off). Only a gRPC call over HTTP/2
/// on a route whose upstreams speak HTTP/2 streams under `idle`; here the route's upstream is
/// `http://`, so a stalled body is 408 after `body_idle` over either HTTP version, not after
/// `idle` (10 s, past the test's 5 s bound).
#[tokio::test]
async fn a_clients_grpc_label_does_not_relax_the_slow_body_defences() {
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let body_idle = Duration::from_millis(500);
    let proxy = proxy_to(&pki, &b.url(), "timeouts:\n  body_idle: 500ms\n  idle: 10s").await;
    let client = Client::new(&pki);

    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let req = format!(
        "POST /svc.Api/Call HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/grpc\r\nContent-Length: 1000\r\n\r\n0123456789"
    );
    let started = Instant::now();
    let (resp, _closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        resp.starts_with("HTTP/1.1 ") && resp.contains("grpc-status: 4"),
        "HTTP/1.1: a gRPC-form 408 (DEADLINE_EXCEEDED) after body_idle, got {resp:?}"
    );
    assert!(took >= body_idle - Duration::from_millis(50), "{took:?}");

    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let (tx, stalled) = channel_body();
    let mut req = conn.request("POST", HOST, "/svc.Api/Call", stalled);
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    tx.send(Frame::data(Bytes::from_static(b"0123456789")))
        .await
        .unwrap();
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(5), conn.fetch(req))
        .await
        .expect("HTTP/2: answered within 5 s, not after timeouts.idle");
    let took = started.elapsed();
    match got {
        Ok(got) => assert_eq!(
            got.headers.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("4"),
            "HTTP/2: {got:?}"
        ),
        // The stream may be reset instead, once the answer is out: ended either way.
        Err(e) => assert!(took < Duration::from_secs(5), "{e}"),
    }
    assert!(took >= body_idle - Duration::from_millis(50), "{took:?}");
    drop(tx);
}

/// An upstream that takes the request head and then stops reading the body (its socket buffers
/// fill, nothing more is taken) holds the client, its `max_connections` place and the upstream
/// connection only for `timeouts.upstream_write`: then 504, as nginx's `proxy_send_timeout`.
/// `body_idle` cannot see it (the body is not asked for, so the client's silence is limen's own).
#[tokio::test]
async fn an_upstream_that_stops_reading_the_body_is_504_after_upstream_write() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let listener = backend_listener("127.0.0.1:0".parse().unwrap());
    let upstream = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            // The head, then nothing: the socket is kept open and never read again.
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut b).await.is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            keep.lock().unwrap().push(tcp);
        }
    });
    let proxy = proxy_to(
        &pki,
        &format!("http://{upstream}"),
        "timeouts:\n  upstream_write: 1s\n  body_idle: 60s\n  upstream_response: 60s",
    )
    .await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let req = conn.request("POST", HOST, "/upload", streamed_body(256 << 20));
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(20), conn.fetch(req))
            .await
            .unwrap_or_else(|_| panic!("{proto:?}: no answer in 20 s"));
        let took = started.elapsed();
        let got = got.unwrap_or_else(|e| panic!("{proto:?}: {e}"));
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{proto:?}");
        assert!(took >= Duration::from_millis(900), "{proto:?}: {took:?}");
    }
    let (_, m) = admin_get(proxy.admin(), "/metrics").await;
    assert!(
        metric(
            &m,
            &format!("limen_upstream_requests_total{{upstream=\"{upstream}\",result=\"timeout\"}}")
        ) >= Some(2.0),
        "{m}"
    );
    task.abort();
}

#[tokio::test]
async fn a_request_body_slower_than_min_body_rate_is_408_after_the_grace_period() {
    // The rate applies only after the first 10 s of a body (RATE_GRACE in proxy.rs), so this test
    // takes about 11 s: the client trickles 10 bytes every 250 ms (40 B/s, under 1000 B/s), never
    // idle long enough for body_idle (2 s).
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let proxy = proxy_to(
        &pki,
        &b.url(),
        "timeouts:\n  body_idle: 2s\nlimits:\n  min_body_rate: 1000",
    )
    .await;
    let client = Client::new(&pki);

    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let started = Instant::now();
    tls.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100000\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 4096];
    let n = loop {
        assert!(
            started.elapsed() < Duration::from_secs(14),
            "no answer to a trickling body within 14 s"
        );
        if tls.write_all(b"0123456789").await.is_err() {
            // The server hung up mid-write; what it said is still readable.
            break tls.read(&mut first).await.unwrap_or(0);
        }
        // `read` is cancel-safe: a timeout loses nothing.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(250), tls.read(&mut first)).await
        {
            break r.unwrap_or(0);
        }
    };
    let took = started.elapsed();
    let (rest, closed) = read_until_close(&mut tls, Duration::from_secs(3)).await;
    let resp = format!("{}{rest}", String::from_utf8_lossy(&first[..n]));
    assert!(resp.starts_with("HTTP/1.1 408"), "after {took:?}: {resp:?}");
    assert!(resp.contains("too slowly"), "{resp}");
    assert!(closed, "the connection must close after the 408");
    assert!(took >= Duration::from_secs(10), "408 after only {took:?}");
}

#[tokio::test]
async fn a_body_over_max_body_bytes_is_413_and_never_reaches_upstream_whole() {
    const MAX: u64 = 65536;
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let proxy = proxy_to(&pki, &b.url(), &format!("limits:\n  max_body_bytes: {MAX}")).await;
    let client = Client::new(&pki);

    // Declared too large: refused before any upstream is involved.
    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let req = format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100000\r\n\r\n");
    let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "got {resp:?}");
    assert!(closed, "the connection must close after the 413");
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);

    // No declared length (chunked on HTTP/1.1, plain DATA on HTTP/2): cut off as it grows.
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let req = conn.request("POST", HOST, "/upload", streamed_body(4 * MAX));
        match tokio::time::timeout(PROMPT, conn.fetch(req)).await {
            Err(_) => panic!("{proto:?}: no answer to an over-limit body within {PROMPT:?}"),
            // The proxy may hang up while the client is still sending: also a refusal.
            Ok(Err(_)) => {}
            Ok(Ok(got)) => assert_eq!(
                got.status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{proto:?}: {}",
                got.text()
            ),
        }
    }
    // Both bodies reached the upstream only in part, and it saw them break off.
    eventually(
        Duration::from_secs(5),
        "the upstream saw both bodies end",
        || {
            let n = b.bodies().len();
            async move { n == 2 }
        },
    )
    .await;
    for seen in b.bodies() {
        assert!(
            !seen.complete && seen.bytes <= MAX,
            "the upstream got more than it should: {seen:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_write_idle() {
    const SIZE: u64 = 200_000_000;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "timeouts:\n  write_idle: 500ms").await;
    let client = Client::new(&pki);

    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    tls.write_all(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read nothing: the socket buffers fill within milliseconds and the proxy's writes block.
    // This stall (4 x write_idle) is what the server must notice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // How to tell the proxy hung up without a side channel: once it closes, only what was already
    // in flight (socket buffers on both ends plus TLS and hyper buffers: a few MB) can still be
    // read, then EOF. A proxy still serving would keep sending the whole 200 MB. So: read at
    // full speed, and require EOF after far fewer bytes than the response.
    let (read, closed) = drain_to_close(&mut tls, Duration::from_secs(10)).await;
    assert!(closed, "the connection is still open ({read} bytes read)");
    assert!(
        read < SIZE / 4,
        "{read} bytes arrived before EOF: the proxy kept writing to a client that did not read"
    );
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let handshake = Duration::from_millis(300);
    let proxy = proxy_to(&pki, &b.url(), "timeouts:\n  handshake: 300ms").await;
    let client = Client::new(&pki);

    // Half of a real ClientHello, as rustls would write it.
    let mut hello = Vec::new();
    let mut tls = rustls::ClientConnection::new(
        client.config(Proto::H2),
        rustls::pki_types::ServerName::try_from(HOST).unwrap(),
    )
    .unwrap();
    tls.write_tls(&mut hello).unwrap();
    assert!(hello.len() > 100, "a ClientHello is a few hundred bytes");
    let half = hello[..hello.len() / 2].to_vec();

    for (what, sent) in [("nothing", Vec::new()), ("half a ClientHello", half)] {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(&sent).await.unwrap();
        let mut buf = [0u8; 1024];
        let r = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
        let took = started.elapsed();
        match r {
            Err(_) => panic!("{what}: still open after {took:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("{what}: the server sent {n} bytes to an incomplete hello"),
        }
        assert!(
            took >= handshake - Duration::from_millis(50),
            "{what}: closed after {took:?}, before the handshake timeout"
        );
    }
    still_serves(&client, proxy.addr).await;
}

// ---------------------------------------------------------------- the connection limit

#[tokio::test]
async fn max_connections_refuses_the_one_too_many_and_admits_again_when_one_closes() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "limits:\n  max_connections: 3").await;
    let client = Client::new(&pki);

    let mut inside = Vec::new();
    for i in 0..3 {
        let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
        let got = conn.get(HOST, &format!("/first/{i}")).await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        inside.push(conn);
    }

    // The fourth is accepted by the kernel and dropped by limen: its handshake fails.
    let fourth = client.connect(proxy.addr, HOST, Proto::H1).await;
    assert!(
        fourth.is_err(),
        "a fourth connection completed its handshake"
    );

    for (i, conn) in inside.iter_mut().enumerate() {
        let got = conn.get(HOST, &format!("/again/{i}")).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "connection {i} was hurt");
    }

    // One leaves; its place is free again once limen has seen it go.
    drop(inside.remove(0));
    let addr = proxy.addr;
    let c = client.clone();
    eventually(
        Duration::from_secs(5),
        "a new connection gets in and is served after one closed",
        move || {
            let c = c.clone();
            async move {
                let Ok(tls) = c.connect(addr, HOST, Proto::H1).await else {
                    return false;
                };
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
                else {
                    return false;
                };
                tokio::spawn(conn);
                let req = http::Request::builder()
                    .uri("/in")
                    .header(http::header::HOST, HOST)
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                matches!(send.send_request(req).await, Ok(r) if r.status() == StatusCode::OK)
            }
        },
    )
    .await;
}

// ---------------------------------------------------------------- the upstream pool

#[tokio::test]
async fn an_upstream_connection_that_carried_an_aborted_body_is_never_reused() {
    let pki = Pki::new();
    let b = RecordingBackend::start().await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);

    // Warm the pool: one upstream connection, idle after this.
    let got = client.get(proxy.addr, HOST, "/warm").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);

    // A client starts a 100000-byte POST, sends 1000 bytes of it, and vanishes.
    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let mut req =
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100000\r\n\r\n")
            .into_bytes();
    req.extend_from_slice(&[b'z'; 1000]);
    tls.write_all(&req).await.unwrap();
    tls.flush().await.unwrap();
    let requests = b.requests.clone();
    eventually(
        Duration::from_secs(5),
        "the POST reached the upstream",
        move || {
            let n = requests.load(Ordering::SeqCst);
            async move { n == 2 }
        },
    )
    .await;
    drop(tls);
    // The proxy must give up that upstream connection: the upstream sees the body break off.
    eventually(
        Duration::from_secs(5),
        "the upstream connection that carried the aborted body was closed",
        || {
            let bodies = b.bodies();
            async move { bodies.iter().any(|s| !s.complete) }
        },
    )
    .await;

    // Normal requests afterwards go on a new upstream connection and succeed. Were the aborted
    // connection reused, the upstream would read these requests as the rest of the POST body.
    for proto in [Proto::H1, Proto::H2, Proto::H1] {
        let got = tokio::time::timeout(PROMPT, async {
            let mut conn = client.open(proxy.addr, HOST, proto).await;
            conn.get(HOST, "/after").await
        })
        .await
        .expect("a request after the abort got no answer")
        .unwrap();
        assert_eq!(got.status, StatusCode::OK, "{proto:?}: {}", got.text());
        assert_eq!(got.text(), "received 0 bytes");
    }
    assert!(
        b.connections.load(Ordering::SeqCst) >= 2,
        "no new upstream connection was opened after the abort"
    );
    let bodies = b.bodies();
    assert_eq!(
        bodies.iter().filter(|s| !s.complete).count(),
        1,
        "{bodies:?}"
    );
}

// ---------------------------------------------------------------- HTTP/2 floods

#[tokio::test]
async fn http2_rapid_reset_gets_goaway_and_others_are_still_served() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);

    let (mut frames, wr) = raw_h2(&client, proxy.addr).await;
    let block = hpack_get();
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    let writer = write_in_background(wr, burst);
    let ended = watch(&mut frames, Duration::from_secs(5), |_| false).await;
    writer.abort();
    assert!(
        matches!(ended, Ended::GoAway(_) | Ended::Closed),
        "2000 HEADERS+RST_STREAM pairs: {ended:?}"
    );
    still_serves(&client, proxy.addr).await;
}

#[tokio::test]
async fn http2_continuation_flood_gets_goaway_and_others_are_still_served() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);

    let (mut frames, wr) = raw_h2(&client, proxy.addr).await;
    // A header block that never ends: HEADERS without END_HEADERS, then 5000 x 1 KB CONTINUATION.
    let mut burst = frame(HEADERS, END_STREAM, 1, &hpack_get());
    let pad = hpack_padding_field();
    for _ in 0..5000 {
        burst.extend(frame(CONTINUATION, 0, 1, &pad));
    }
    let writer = write_in_background(wr, burst);
    let ended = watch(&mut frames, Duration::from_secs(5), |_| false).await;
    writer.abort();
    assert!(
        matches!(ended, Ended::GoAway(_) | Ended::Closed),
        "5000 CONTINUATION frames: {ended:?}"
    );
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    still_serves(&client, proxy.addr).await;
}

#[tokio::test]
async fn http2_ping_flood_is_answered_or_cut_off_in_bounded_memory() {
    const PINGS: u64 = 10_000;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);
    let before = rss_kib();

    let (mut frames, wr) = raw_h2(&client, proxy.addr).await;
    let mut burst = Vec::with_capacity(PINGS as usize * 17);
    for i in 0..PINGS {
        burst.extend(frame(PING, 0, 0, &i.to_be_bytes()));
    }
    let writer = write_in_background(wr, burst);
    let mut acks = 0u64;
    let ended = watch(&mut frames, Duration::from_secs(15), |f| {
        if f.kind == PING && f.flags & ACK != 0 {
            acks += 1;
        }
        acks == PINGS
    })
    .await;
    writer.abort();
    assert!(
        matches!(ended, Ended::Done | Ended::GoAway(_) | Ended::Closed),
        "{PINGS} PINGs: {ended:?} after {acks} ACKs"
    );
    still_serves(&client, proxy.addr).await;
    // Tests in this file share the process, so this bound is loose on purpose.
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 50 * 1024,
        "RSS grew by {grown} KiB during a PING flood"
    );
}

#[tokio::test]
async fn http2_settings_flood_is_answered_or_cut_off_in_bounded_memory() {
    const FRAMES: u64 = 10_000;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = proxy_to(&pki, &b.url(), "").await;
    let client = Client::new(&pki);
    let before = rss_kib();

    let (mut frames, wr) = raw_h2(&client, proxy.addr).await;
    // Each SETTINGS (INITIAL_WINDOW_SIZE = 65535 + i) obliges the server to apply it and ACK.
    let mut burst = Vec::with_capacity(FRAMES as usize * 15);
    for i in 0..FRAMES {
        let mut payload = vec![0x00, 0x04];
        payload.extend_from_slice(&(65_535u32 + i as u32).to_be_bytes());
        burst.extend(frame(SETTINGS, 0, 0, &payload));
    }
    let writer = write_in_background(wr, burst);
    let mut acks = 0u64;
    let ended = watch(&mut frames, Duration::from_secs(15), |f| {
        if f.kind == SETTINGS && f.flags & ACK != 0 {
            acks += 1;
        }
        // The server's ACK of the preface's SETTINGS comes too.
        acks >= FRAMES
    })
    .await;
    writer.abort();
    assert!(
        matches!(ended, Ended::Done | Ended::GoAway(_) | Ended::Closed),
        "{FRAMES} SETTINGS: {ended:?} after {acks} ACKs"
    );
    still_serves(&client, proxy.addr).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 50 * 1024,
        "RSS grew by {grown} KiB during a SETTINGS flood"
    );
}

/// Writes `bytes` on a plain TCP connection and reads until the peer closes or `patience` runs
/// out: what came back, and whether it closed.
async fn tcp_exchange(tcp: &mut TcpStream, bytes: &[u8], patience: Duration) -> (String, bool) {
    tcp.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn the_plain_http_listener_redirects_and_cuts_off_slow_and_idle_clients() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  http: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\ntimeouts:\n  header_read: 200ms\n  idle: 1500ms\nroutes:\n  - {{host: \"{HOST}\", respond: {{}}}}\n"
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let http = proxy.running().http_addr.unwrap();
    let https_port = proxy.addr.port();

    // Two requests on one keep-alive connection, each a 308 to the same path on https.
    let mut tcp = TcpStream::connect(http).await.unwrap();
    for path in ["/a?b=1", "/c"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        let (got, closed) =
            tcp_exchange(&mut tcp, req.as_bytes(), Duration::from_millis(300)).await;
        assert!(!closed, "keep-alive: {got}");
        assert!(got.starts_with("HTTP/1.1 308"), "{got}");
        let want = format!("location: https://{HOST}:{https_port}{path}\r\n");
        assert!(got.to_ascii_lowercase().contains(&want), "{got}");
    }
    // Then silence: closed once `idle` has passed since the last byte (which came up to 300 ms
    // before this point, while the read above waited), not before.
    let quiet = Instant::now();
    let (_, closed) = tcp_exchange(&mut tcp, b"", PROMPT).await;
    assert!(closed);
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(1100) && took < Duration::from_secs(5),
        "an idle redirect connection closed after {took:?}"
    );

    // A head that never ends: cut off at header_read, long before idle.
    let mut slow = TcpStream::connect(http).await.unwrap();
    let began = Instant::now();
    let (got, closed) = tcp_exchange(&mut slow, b"GET / HTTP/1.1\r\nHost: a", PROMPT).await;
    assert!(closed);
    assert!(
        began.elapsed() < Duration::from_millis(1300),
        "a slowloris on the redirect listener lasted {:?}: {got}",
        began.elapsed()
    );

    // No Host: 400, and nothing is echoed into a Location.
    let mut bare = TcpStream::connect(http).await.unwrap();
    let (got, _) = tcp_exchange(
        &mut bare,
        b"GET / HTTP/1.1\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(!got.to_ascii_lowercase().contains("location"), "{got}");
}
