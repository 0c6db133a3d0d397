//! An attacker's afternoon with limen: idle HTTP/2 clients that ignore GOAWAY, upstreams that
//! answer 101 to anything, paths that climb out of their route, headers that pose as limen's own,
//! HTTP/2 readers that never open their window, upstreams with ambiguous framing, and what limen's
//! own answers give away. Each is refused, closed or cleaned, and everyone else is still served.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw_h2::{self, Ended};
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const HOST: &str = raw_h2::HOST;

/// Anything limen should answer or do at once gets this long at most.
const PROMPT: Duration = Duration::from_secs(10);

fn routes_to(upstream: &str) -> String {
    format!("  - {{host: \"*\", upstreams: [\"{upstream}\"]}}\n")
}

// ---------------------------------------------------------------- connections that will not end

#[tokio::test]
async fn an_idle_http2_client_that_ignores_goaway_is_closed_anyway() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "timeouts: {idle: 300ms}",
        &routes_to(&backend.url()),
    )
    .await;
    let client = Client::new(&pki);
    let started = Instant::now();
    // The client sends its preface and SETTINGS, then nothing: it never acknowledges the PING
    // that would let a graceful close finish.
    let (mut frames, _wr) = raw_h2::raw_h2(&client, proxy.addr).await;
    let mut goaway = false;
    let ended = loop {
        match raw_h2::watch(&mut frames, PROMPT, |_| false).await {
            Ended::GoAway(_) => goaway = true,
            other => break other,
        }
    };
    assert!(goaway, "limen says GOAWAY when the connection idles");
    assert_eq!(ended, Ended::Closed, "and then closes it");
    let took = started.elapsed();
    let bound = Duration::from_millis(300) + limen::server::GOAWAY_GRACE + Duration::from_secs(2);
    assert!(took < bound, "closed after {took:?}, bound {bound:?}");
}

#[tokio::test]
async fn a_connection_still_busy_when_shutdown_grace_runs_out_is_closed() {
    for proto in [Proto::H1, Proto::H2] {
        let pki = Pki::new();
        let backend = Backend::start("b").await;
        let mut proxy = Proxy::start(
            &pki,
            &[HOST],
            "timeouts: {shutdown_grace: 300ms}",
            &routes_to(&backend.url()),
        )
        .await;
        let client = Client::new(&pki);
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let pending = tokio::spawn(async move { conn.get(HOST, "/sleep/30000").await });
        eventually(PROMPT, "the slow request reached the upstream", || async {
            backend.requests.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(
            !proxy.shutdown().await,
            "{proto:?}: shutdown reports that a connection was still open"
        );
        let after = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(3), pending)
            .await
            .unwrap_or_else(|_| panic!("{proto:?}: the connection outlived shutdown_grace"))
            .unwrap();
        assert!(
            result.is_err(),
            "{proto:?}: the cut-off request fails: {result:?}"
        );
        assert!(after.elapsed() < Duration::from_secs(3));
    }
}

// ---------------------------------------------------------------- upgrades

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_a_502_not_a_tunnel() {
    let pki = Pki::new();
    let upstream = Canned::start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nRAW-PIPE",
        false,
    )
    .await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&upstream.url())).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let got = conn.get(HOST, "/").await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{proto:?}");
        assert!(
            !got.text().contains("RAW-PIPE"),
            "{proto:?}: {}",
            got.text()
        );
        if proto == Proto::H1 {
            assert_eq!(got.headers[http::header::CONNECTION], "close");
        }
    }
    // The same with a request that carries an Upgrade header but no `Connection: upgrade`.
    let (status, text, _) = raw_request(
        &client,
        proxy.addr,
        HOST,
        &format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n\r\n"),
        PROMPT,
    )
    .await;
    assert_eq!(status, 502, "{text}");
    assert!(!text.contains("RAW-PIPE"), "{text}");
}

#[tokio::test]
async fn a_101_that_names_a_protocol_the_client_did_not_offer_is_a_502() {
    let pki = Pki::new();
    let client = Client::new(&pki);
    let answers: [&'static [u8]; 2] = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\nRAW-PIPE",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\nRAW-PIPE",
    ];
    for answer in answers {
        let upstream = Canned::start(answer, false).await;
        let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&upstream.url())).await;
        let (status, text, closed) = raw_request(
            &client,
            proxy.addr,
            HOST,
            &format!("GET /chat HTTP/1.1\r\nHost: {HOST}\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"),
            PROMPT,
        )
        .await;
        assert_eq!(status, 502, "{text}");
        assert!(closed, "the connection is closed after the refusal");
        assert!(!text.contains("RAW-PIPE"), "{text}");
    }
}

#[tokio::test]
async fn h2c_upgrade_headers_never_reach_the_upstream() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&backend.url())).await;
    let client = Client::new(&pki);
    let (status, text, _) = raw_request(
        &client,
        proxy.addr,
        HOST,
        &format!("GET /h2c HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        PROMPT,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let echo = echoed(&text);
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(
            echo.header(name).is_none(),
            "{name} reached the upstream: {:?}",
            echo.headers
        );
    }
}

// ---------------------------------------------------------------- paths

/// `/admin` is answered by limen (403), `/public` goes to the backend.
async fn admin_and_public(pki: &Pki, backend: &Backend, extra: &str) -> Proxy {
    Proxy::start(
        pki,
        &[HOST],
        extra,
        &format!(
            "  - {{host: \"*\", path: /admin, respond: {{status: 403, body: denied}}}}\n  - {{host: \"*\", path: /public, upstreams: [\"{}\"]}}\n",
            backend.url()
        ),
    )
    .await
}

async fn raw_get(client: &Client, addr: SocketAddr, target: &str) -> (u16, String) {
    let (status, text, _) = raw_request(
        client,
        addr,
        HOST,
        &format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
        PROMPT,
    )
    .await;
    (status, text)
}

/// The backend's echo in a raw HTTP/1.1 response.
fn echoed(text: &str) -> Echo {
    let json = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<Echo>(json).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn echoed_path(text: &str) -> String {
    echoed(text).path
}

#[tokio::test]
async fn routes_match_the_path_the_upstream_will_resolve() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = admin_and_public(&pki, &backend, "").await;
    let client = Client::new(&pki);
    for target in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/.%2E/admin",
        "/public/./../admin/x",
        "//admin",
        "/%61dmin",
        "/%61%64%6D%69%6E/",
        // Servlet containers strip `;parameters` before resolving: `/admin;x/secret` is
        // `/admin/secret` to them.
        "/admin;x/secret",
    ] {
        let (status, text) = raw_get(&client, proxy.addr, target).await;
        assert_eq!(status, 403, "{target} is /admin: {text}");
    }
    for (target, upstream_sees) in [
        ("/public/./a//b", "/public/a/b"),
        ("/public/%7Euser?q=/../x", "/public/~user?q=/../x"),
        ("/public/a%2fb", "/public/a%2Fb"),
        ("/public/x/..", "/public/"),
    ] {
        let (status, text) = raw_get(&client, proxy.addr, target).await;
        assert_eq!(status, 200, "{target}: {text}");
        assert_eq!(echoed_path(&text), upstream_sees, "{target}");
    }
    for target in [
        "/public/../../etc/passwd",
        "/..",
        "/public/%zz",
        "/a\\..\\admin",
    ] {
        let (status, text) = raw_get(&client, proxy.addr, target).await;
        assert_eq!(status, 400, "{target}: {text}");
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn encoded_slashes_are_refused_when_configured() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = admin_and_public(
        &pki,
        &backend,
        "path_normalization: {escaped_slashes: reject}",
    )
    .await;
    let client = Client::new(&pki);
    for target in ["/public/a%2Fb", "/public/a%5cb"] {
        let (status, text) = raw_get(&client, proxy.addr, target).await;
        assert_eq!(status, 400, "{target}: {text}");
    }
    let (status, text) = raw_get(&client, proxy.addr, "/public/a%20b").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(echoed_path(&text), "/public/a%20b");
}

// ---------------------------------------------------------------- headers

#[tokio::test]
async fn header_names_with_underscores_are_dropped_and_look_alikes_always() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let client = Client::new(&pki);
    for allow in [false, true] {
        let proxy = Proxy::start(
            &pki,
            &[HOST],
            &format!("allow_underscores_in_headers: {allow}"),
            &routes_to(&backend.url()),
        )
        .await;
        for proto in [Proto::H1, Proto::H2] {
            let mut conn = client.open(proxy.addr, HOST, proto).await;
            let mut req = conn.request("GET", HOST, "/", body(""));
            let h = req.headers_mut();
            h.insert("x_forwarded_for", "6.6.6.6".parse().unwrap());
            h.insert("x_real_ip", "6.6.6.6".parse().unwrap());
            h.insert("x_forwarded_host", "evil.test".parse().unwrap());
            h.insert("x_custom", "1".parse().unwrap());
            let echo = conn.fetch(req).await.unwrap().echo();
            for spoof in ["x_forwarded_for", "x_real_ip", "x_forwarded_host"] {
                assert!(
                    echo.header(spoof).is_none(),
                    "allow={allow} {proto:?}: {spoof} passed"
                );
            }
            assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
            assert_eq!(
                echo.header("x_custom").is_some(),
                allow,
                "allow={allow} {proto:?}: {:?}",
                echo.headers
            );
        }
    }
}

// ---------------------------------------------------------------- HTTP/2 readers that never read

/// An upstream that answers with an endless body and records when limen hangs up on it.
struct Firehose {
    addr: SocketAddr,
    hung_up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Firehose {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Firehose {
    async fn start() -> Firehose {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hung_up = Arc::new(AtomicBool::new(false));
        let flag = hung_up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
                        .await;
                    let chunk = vec![b'x'; 64 * 1024];
                    while tcp.write_all(&chunk).await.is_ok() {}
                    flag.store(true, Ordering::SeqCst);
                });
            }
        });
        Firehose {
            addr,
            hung_up,
            task,
        }
    }
}

type H2Send = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 client whose streams start with a flow-control window of 0 and that never reads a
/// body, so it never opens one: limen cannot send it a byte of any body.
async fn never_reading_h2(
    client: &Client,
    addr: SocketAddr,
) -> (H2Send, tokio::task::JoinHandle<()>) {
    let tls = client.connect(addr, HOST, Proto::H2).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("https://{HOST}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn stalled_stream_proxy(pki: &Pki, firehose: &Firehose, backend: &Backend) -> Proxy {
    Proxy::start(
        pki,
        &[HOST],
        "timeouts: {write_idle: 500ms}",
        &format!(
            "  - {{host: \"*\", path: /big, upstreams: [\"http://{}\"]}}\n  - {{host: \"*\", upstreams: [\"{}\"]}}\n",
            firehose.addr,
            backend.url()
        ),
    )
    .await
}

#[tokio::test]
async fn an_http2_connection_whose_every_stream_is_stalled_is_closed_and_frees_its_upstream() {
    let pki = Pki::new();
    let firehose = Firehose::start().await;
    let backend = Backend::start("b").await;
    let proxy = stalled_stream_proxy(&pki, &firehose, &backend).await;
    let client = Client::new(&pki);
    let (mut send, conn_task) = never_reading_h2(&client, proxy.addr).await;
    send.ready().await.unwrap();
    let resp = send.send_request(get("/big")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    eventually(
        PROMPT,
        "limen hangs up on the stalled stream's upstream",
        || async { firehose.hung_up.load(Ordering::SeqCst) },
    )
    .await;
    eventually(
        PROMPT,
        "limen closes the connection whose every stream is stalled",
        || async { conn_task.is_finished() },
    )
    .await;
    drop(resp);
}

#[tokio::test]
async fn a_stalled_http2_stream_is_reset_while_its_connection_serves_the_others() {
    let pki = Pki::new();
    let firehose = Firehose::start().await;
    let backend = Backend::start("b").await;
    let proxy = stalled_stream_proxy(&pki, &firehose, &backend).await;
    let client = Client::new(&pki);
    let (mut send, conn_task) = never_reading_h2(&client, proxy.addr).await;
    send.ready().await.unwrap();
    let stalled = send.send_request(get("/big")).await.unwrap();
    // A second stream that waits on its upstream, not on the client: it is not stalled.
    let mut send2 = send.clone();
    let waiting = tokio::spawn(async move {
        send2.ready().await.unwrap();
        send2.send_request(get("/sleep/2500")).await
    });
    eventually(
        PROMPT,
        "limen hangs up on the stalled stream's upstream",
        || async { firehose.hung_up.load(Ordering::SeqCst) },
    )
    .await;
    assert!(
        !conn_task.is_finished(),
        "the connection stays open for the other stream"
    );
    let frame = tokio::time::timeout(PROMPT, stalled.into_body().frame())
        .await
        .expect("the stalled stream ends");
    assert!(
        matches!(frame, Some(Err(_))),
        "the stalled stream was reset: {frame:?}"
    );
    let other = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the other stream is answered")
        .unwrap()
        .expect("the other stream is answered");
    assert_eq!(other.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_slow_but_steady_http2_reader_is_never_taken_for_a_stalled_one() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "timeouts: {write_idle: 500ms}",
        &routes_to(&backend.url()),
    )
    .await;
    let client = Client::new(&pki);
    let tls = client.connect(proxy.addr, HOST, Proto::H2).await.unwrap();
    // A 16 KiB window, opened again 16 KiB at a time every 200 ms: about 80 KB/s, steady. A 64 KiB
    // chunk from the upstream would take 800 ms to drain at that pace, longer than write_idle.
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap();
    let resp = send.send_request(get("/bytes/262144")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| panic!("reset after {got} bytes: {e}"));
        if let Some(d) = frame.data_ref() {
            got += d.len();
            // 200 ms per 16 KiB, whatever the frame sizes.
            let pause = Duration::from_micros(d.len() as u64 * 200_000 / 16_384);
            tokio::time::sleep(pause).await;
        }
        assert!(Instant::now() < deadline);
    }
    assert_eq!(got, 262_144);
}

// ---------------------------------------------------------------- upstream framing

#[tokio::test]
async fn an_upstream_response_with_length_and_chunked_is_framed_by_chunks_and_not_reused() {
    let pki = Pki::new();
    let upstream = Canned::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        true,
    )
    .await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&upstream.url())).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        for _ in 0..2 {
            let got = conn.get(HOST, "/").await.unwrap();
            assert_eq!(got.status, StatusCode::OK, "{proto:?}");
            assert_eq!(got.text(), "hello", "{proto:?}");
            assert_ne!(
                got.headers
                    .get(http::header::CONTENT_LENGTH)
                    .map(|v| v.as_bytes()),
                Some(&b"3"[..]),
                "{proto:?}: the stale Content-Length is gone"
            );
        }
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 4);
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        4,
        "a connection whose framing was ambiguous is never reused"
    );
}

#[tokio::test]
async fn an_upstream_transfer_coding_other_than_chunked_is_a_502() {
    let pki = Pki::new();
    let client = Client::new(&pki);
    // The class: a coding before chunked (whose chunks hyper would read, relaying the gzip bytes
    // as the content), the same split over two field lines, and chunked applied twice.
    let answers: [&'static [u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\ngzip\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ngzip\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n4\r\ngzip\r\n0\r\n\r\n",
    ];
    for answer in answers {
        let upstream = Canned::start(answer, false).await;
        let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&upstream.url())).await;
        for proto in [Proto::H1, Proto::H2] {
            let mut conn = client.open(proxy.addr, HOST, proto).await;
            let got = conn.get(HOST, "/").await.unwrap();
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{proto:?}");
            assert!(!got.text().contains("gzip"), "{}", got.text());
        }
    }
}

/// A client's body in a transfer coding limen does not decode (`gzip, chunked`: hyper reads the
/// chunks, and the gzip bytes would reach the upstream as the content) is 501 and close, before
/// any upstream sees it; chunked twice is 400.
#[tokio::test]
async fn a_request_transfer_coding_other_than_chunked_is_a_501_and_never_forwarded() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&b.url())).await;
    let client = Client::new(&pki);
    for (coding, status) in [
        ("gzip, chunked", "501"),
        ("deflate, chunked", "501"),
        ("chunked, chunked", "400"),
    ] {
        let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: {coding}\r\n\r\n4\r\ngzip\r\n0\r\n\r\n"
        );
        let (resp, closed) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{coding}: {resp:?}"
        );
        assert!(closed, "{coding}: the connection closes");
    }
    // A plain chunked body still goes through.
    let mut tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
    );
    let (resp, _) = raw_exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        1,
        "only the chunked request reached the upstream"
    );
}

/// RFC 9113 8.2.1: an HTTP/2 field value that starts or ends with whitespace is malformed. From a
/// client it is 400 before any upstream sees it; from an HTTP/2 upstream it is 502, to HTTP/1.1
/// and HTTP/2 clients alike. (HTTP/1.1 parsers trim such whitespace, so only HTTP/2 carries it.)
#[tokio::test]
async fn http2_field_values_padded_with_whitespace_are_malformed_both_ways() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let h2 = H2Backend::start().await;
    let routes = format!(
        "  - {{host: \"{HOST}\", path: /padded, upstreams: [\"{}\"]}}\n  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n",
        h2.url(),
        b.url()
    );
    let proxy = Proxy::start(&pki, &[HOST], "", &routes).await;
    let client = Client::new(&pki);
    for padded in [" v", "v ", "\tv"] {
        let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
        let mut req = conn.request("GET", HOST, "/", body(""));
        req.headers_mut()
            .insert("x-pad", http::HeaderValue::from_str(padded).unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{padded:?}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0, "no upstream saw them");
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let got = conn.get(HOST, "/padded").await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{proto:?}");
        assert!(got.headers.get("x-pad").is_none());
    }
}

/// The same rule for trailer fields, which arrive after the head has gone on: a client's padded
/// trailer fails its request body, so the upstream never receives it; an upstream's ends the
/// response broken (a reset stream on HTTP/2, no clean chunked end on HTTP/1.1), so the client
/// never receives it.
#[tokio::test]
async fn http2_trailer_fields_padded_with_whitespace_never_cross_the_proxy() {
    let pki = Pki::new();
    let h2 = H2Backend::start().await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&h2.url())).await;
    let client = Client::new(&pki);

    // The client's: a streamed request whose trailers carry " v", and one with a clean value.
    for (value, reaches) in [(" v", false), ("v", true)] {
        let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
        let (tx, req_body) = channel_body();
        let req = conn.request("POST", HOST, "/stream", req_body);
        let sent = tokio::spawn(async move {
            tx.send(Frame::data(Bytes::from_static(b"hello")))
                .await
                .ok()?;
            let mut t = http::HeaderMap::new();
            t.insert("x-client-trailer", http::HeaderValue::from_static(value));
            tx.send(Frame::trailers(t)).await.ok()
        });
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = conn.send(req).await?;
            resp.into_body().collect().await.map_err(BoxError::from)
        })
        .await
        .expect("an answer or an error within 10 s");
        let _ = sent.await;
        let saw = got
            .ok()
            .and_then(|c| c.trailers().cloned())
            .and_then(|t| t.get("x-saw-trailer").cloned());
        if reaches {
            assert_eq!(saw.as_ref().map(|v| v.as_bytes()), Some(&b"v"[..]));
        } else {
            assert!(
                saw.as_ref().is_none_or(|v| v.as_bytes() != b"padded"),
                "the padded trailer reached the upstream"
            );
        }
    }

    // The upstream's: the body's bytes may arrive, the padded trailer never does.
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let req = conn.request("GET", HOST, "/padded-trailer", body(""));
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = conn.send(req).await?;
            resp.into_body().collect().await.map_err(BoxError::from)
        })
        .await
        .expect("an answer or an error within 10 s");
        assert!(
            got.is_err(),
            "{proto:?}: the response must end broken, got trailers {:?}",
            got.ok().and_then(|c| c.trailers().cloned())
        );
    }
}

/// 1xx from an upstream (103 Early Hints with `Link`) cannot be relayed yet: hyper's server has no
/// way to send an informational response (hyperium/hyper#3815 and #4114 are open). What limen
/// must do meanwhile, pinned here: the final answer arrives intact, and nothing of the 103 leaks
/// into its head.
#[tokio::test]
async fn an_upstreams_early_hints_are_dropped_cleanly_and_the_final_answer_arrives() {
    let pki = Pki::new();
    let client = Client::new(&pki);
    let upstream = Canned::start(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        false,
    )
    .await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&upstream.url())).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let got = conn.get(HOST, "/").await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{proto:?}");
        assert_eq!(got.text(), "ok", "{proto:?}");
        assert!(got.headers.get("link").is_none(), "{proto:?}");
    }
}

// ---------------------------------------------------------------- limen's own answers

#[tokio::test]
async fn limen_made_answers_say_nothing_internal_carry_nosniff_and_have_no_body_when_forbidden() {
    let pki = Pki::new();
    // Nothing listens on this port: every request to /dead is a 502.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "",
        &format!(
            "  - {{host: \"*\", path: /dead, upstreams: [\"http://{dead_addr}\"]}}\n  - {{host: \"*\", path: /empty, respond: {{status: 204, body: \"not sent\"}}}}\n  - {{host: \"*\", path: /same, respond: {{status: 304, body: \"not sent\"}}}}\n"
        ),
    )
    .await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let got = conn.get(HOST, "/dead").await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        let text = got.text();
        let port = dead_addr.port().to_string();
        for secret in ["127.0.0.1", port.as_str(), "os error", "refused ("] {
            assert!(!text.contains(secret), "{proto:?}: {secret:?} in {text:?}");
        }
        assert_eq!(got.headers["x-content-type-options"], "nosniff");

        let got = conn.get(HOST, "/nowhere").await.unwrap();
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert_eq!(got.headers["x-content-type-options"], "nosniff");
        let get_len = got.body.len();

        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let head = conn.request("HEAD", HOST, "/nowhere", body(""));
        let got = conn.fetch(head).await.unwrap();
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert!(got.body.is_empty(), "{proto:?}: HEAD has no body");
        assert_eq!(
            got.headers[http::header::CONTENT_LENGTH],
            get_len.to_string().as_str(),
            "{proto:?}: HEAD gives the GET's length"
        );
        for path in ["/empty", "/same"] {
            let got = conn.get(HOST, path).await.unwrap();
            assert!(got.body.is_empty(), "{proto:?} {path}: {:?}", got.text());
        }
        // The connection is still good after all of that.
        let got = conn.get(HOST, "/nowhere").await.unwrap();
        assert_eq!(got.status, StatusCode::NOT_FOUND);
    }
    // Raw HTTP/1.1: no body bytes follow a 204's head.
    let (status, text, _) = raw_request(
        &client,
        proxy.addr,
        HOST,
        &format!("GET /empty HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
        PROMPT,
    )
    .await;
    assert_eq!(status, 204);
    assert!(text.ends_with("\r\n\r\n"), "{text:?}");
}

// ---------------------------------------------------------------- what an intermediary must do

#[tokio::test]
async fn requests_carry_via_and_options_honours_max_forwards() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&backend.url())).await;
    let client = Client::new(&pki);
    for (proto, ours) in [(Proto::H1, "1.1 limen"), (Proto::H2, "2 limen")] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let echo = conn.get(HOST, "/").await.unwrap().echo();
        assert_eq!(echo.header("via"), Some(ours), "{proto:?}");
        let mut req = conn.request("GET", HOST, "/", body(""));
        req.headers_mut()
            .insert(http::header::VIA, "1.0 corp-proxy".parse().unwrap());
        let echo = conn.fetch(req).await.unwrap().echo();
        assert_eq!(
            echo.header("via"),
            Some(format!("1.0 corp-proxy, {ours}").as_str())
        );

        let before = backend.requests.load(Ordering::SeqCst);
        let mut req = conn.request("OPTIONS", HOST, "/", body(""));
        req.headers_mut()
            .insert(http::header::MAX_FORWARDS, "0".parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            backend.requests.load(Ordering::SeqCst),
            before,
            "not forwarded"
        );
        let mut req = conn.request("OPTIONS", HOST, "/", body(""));
        req.headers_mut()
            .insert(http::header::MAX_FORWARDS, "5".parse().unwrap());
        let echo = conn.fetch(req).await.unwrap().echo();
        assert_eq!(echo.header("max-forwards"), Some("4"));
    }
}

#[tokio::test]
async fn trailers_pass_without_their_hop_by_hop_and_framing_fields() {
    let pki = Pki::new();
    let upstream = Canned::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\nkeep-alive: timeout=5\r\ncontent-length: 99\r\nx-forwarded-for: 6.6.6.6\r\n\r\n",
        false,
    )
    .await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&upstream.url())).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let mut req = conn.request("GET", HOST, "/", body(""));
    req.headers_mut()
        .insert(http::header::TE, "trailers".parse().unwrap());
    let resp = conn.send(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(collected.to_bytes(), "hello");
    assert_eq!(trailers["x-checksum"], "abc");
    assert!(trailers.get("keep-alive").is_none(), "{trailers:?}");
    assert!(trailers.get("content-length").is_none(), "{trailers:?}");
    assert!(trailers.get("x-forwarded-for").is_none(), "{trailers:?}");
}

#[tokio::test]
async fn options_asterisk_goes_where_the_root_goes() {
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(&pki, &[HOST], "", &routes_to(&backend.url())).await;
    let client = Client::new(&pki);
    let (status, text, _) = raw_request(
        &client,
        proxy.addr,
        HOST,
        &format!("OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
        PROMPT,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(echoed_path(&text), "*");
    let (status, text) = raw_get(&client, proxy.addr, "*").await;
    assert_eq!(status, 400, "asterisk-form is for OPTIONS only: {text}");
}

#[tokio::test]
async fn a_websocket_still_open_when_shutdown_grace_runs_out_is_closed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let backend = Backend::start("b").await;
    let mut proxy = Proxy::start(
        &pki,
        &[HOST],
        "timeouts: {shutdown_grace: 300ms}",
        &routes_to(&backend.url()),
    )
    .await;
    let client = Client::new(&pki);
    let tls = client.connect(proxy.addr, HOST, Proto::H1).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{HOST}/ws"), tls)
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert!(ws.next().await.unwrap().is_ok());
    assert!(!proxy.shutdown().await, "the tunnel was still open");
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(m)) if m.is_close() => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel outlived shutdown_grace");
}
