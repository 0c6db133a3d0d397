//! Upstreams that speak HTTP/2 (`h2c://`): HTTP/1.1 and HTTP/2 clients reach them over one
//! multiplexed connection, gRPC streams pass message by message with trailers both ways, and the
//! errors limen makes itself reach a gRPC client as gRPC statuses.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Frame;

const HOST: &str = "grpc.example.test";
const PROMPT: Duration = Duration::from_secs(10);

async fn proxy_to(pki: &Pki, upstream: &str) -> Proxy {
    Proxy::start(
        pki,
        &[HOST],
        "",
        &format!("  - {{host: \"{HOST}\", upstreams: [\"{upstream}\"]}}\n"),
    )
    .await
}

#[tokio::test]
async fn http1_and_http2_clients_reach_an_h2c_upstream_over_one_multiplexed_connection() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let proxy = proxy_to(&pki, &backend.url()).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let got = conn.get(HOST, "/hello?x=1").await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{proto:?}: {}", got.text());
        let echo = got.echo();
        assert_eq!(echo.backend, "h2c");
        assert_eq!(echo.path, format!("{HOST}/hello?x=1"), "{proto:?}");
        assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
        assert!(
            echo.header("host").is_none(),
            "HTTP/2 carries it as :authority"
        );
    }
    let conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let Conn::H2(send) = conn else { unreachable!() };
    let answers = futures_util::future::join_all((0..20).map(|_| {
        let mut c = Conn::H2(send.clone());
        async move { c.get(HOST, "/sleep/300").await }
    }))
    .await;
    for a in answers {
        assert_eq!(a.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "every request shared one upstream connection"
    );
    assert!(
        backend.max_concurrent.load(Ordering::SeqCst) > 1,
        "and were multiplexed"
    );
}

#[tokio::test]
async fn a_grpc_stream_passes_message_by_message_with_trailers_both_ways() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let proxy = proxy_to(&pki, &backend.url()).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let (tx, body) = channel_body();
    let mut req = conn.request("POST", HOST, "/stream/Echo", body);
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        "application/grpc".parse().unwrap(),
    );
    h.insert(http::header::TE, "trailers".parse().unwrap());
    tx.send(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a")))
        .await
        .unwrap();
    let resp = tokio::time::timeout(PROMPT, conn.send(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[http::header::CONTENT_TYPE],
        "application/grpc"
    );
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: nothing is buffered on the way.
    for i in 0..5u8 {
        let frame = tokio::time::timeout(PROMPT, body.frame())
            .await
            .expect("the echo arrives while the stream is open")
            .unwrap()
            .unwrap();
        assert!(
            frame.data_ref().is_some_and(|d| !d.is_empty()),
            "message {i}"
        );
        tx.send(Frame::data(Bytes::from(vec![0, 0, 0, 0, 1, b'b' + i])))
            .await
            .unwrap();
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "abc".parse().unwrap());
    tx.send(Frame::trailers(trailers)).await.unwrap();
    drop(tx);
    let rest = tokio::time::timeout(PROMPT, body.collect())
        .await
        .unwrap()
        .unwrap();
    let t = rest
        .trailers()
        .cloned()
        .expect("the upstream's trailers arrive");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-custom"], "yes");
    assert_eq!(
        t["x-saw-trailer"], "abc",
        "the request's trailers reached the upstream"
    );
}

/// A gRPC unary request for `path` on a new HTTP/2 connection with SNI `sni`; the status, and
/// `grpc-status` / `grpc-message` from the headers or the trailers.
async fn grpc_call(
    client: &Client,
    proxy: &Proxy,
    sni: &str,
    host: &str,
    path: &str,
    timeout: Option<&str>,
) -> (StatusCode, Option<String>, Option<String>) {
    let mut conn = client.open(proxy.addr, sni, Proto::H2).await;
    let mut req = conn.request("POST", host, path, body(Bytes::from_static(b"\0\0\0\0\0")));
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        "application/grpc+proto".parse().unwrap(),
    );
    h.insert(http::header::TE, "trailers".parse().unwrap());
    if let Some(t) = timeout {
        h.insert("grpc-timeout", t.parse().unwrap());
    }
    let resp = conn.send(req).await.unwrap();
    let status = resp.status();
    let head = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        head.get(name)
            .or_else(|| trailers.get(name))
            .map(|v| v.to_str().unwrap().to_string())
    };
    (status, get("grpc-status"), get("grpc-message"))
}

#[tokio::test]
async fn errors_limen_makes_reach_a_grpc_client_as_grpc_statuses() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = Proxy::start(
        &pki,
        &[HOST, "other.example.test"],
        "",
        &format!(
            "  - {{host: \"{HOST}\", path: /svc, strip_prefix: true, upstreams: [\"{}\"]}}\n  - {{host: \"{HOST}\", path: /dead, upstreams: [\"h2c://{dead_addr}\"]}}\n",
            backend.url()
        ),
    )
    .await;
    let client = Client::new(&pki);

    let (status, code, msg) = grpc_call(&client, &proxy, HOST, HOST, "/nothing/Here", None).await;
    assert_eq!(
        (status, code.as_deref()),
        (StatusCode::OK, Some("12")),
        "{msg:?}"
    );
    assert!(msg.is_some_and(|m| m.contains("no route")));

    let (status, code, _) = grpc_call(&client, &proxy, HOST, HOST, "/dead/Call", None).await;
    assert_eq!((status, code.as_deref()), (StatusCode::OK, Some("14")));

    let started = Instant::now();
    let (status, code, _) =
        grpc_call(&client, &proxy, HOST, HOST, "/svc/sleep/3000", Some("300m")).await;
    assert_eq!((status, code.as_deref()), (StatusCode::OK, Some("4")));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "grpc-timeout bounded the wait: {:?}",
        started.elapsed()
    );

    // A connection for HOST asked for another host: 421 stays 421, with a gRPC status too.
    let (status, code, _) = grpc_call(
        &client,
        &proxy,
        HOST,
        "unknown.example.test",
        "/svc/x",
        None,
    )
    .await;
    assert_eq!(
        (status, code.as_deref()),
        (StatusCode::MISDIRECTED_REQUEST, Some("14"))
    );

    // And a real call still works.
    let (status, code, _) = grpc_call(&client, &proxy, HOST, HOST, "/svc/stream", None).await;
    assert_eq!((status, code.as_deref()), (StatusCode::OK, Some("0")));
}

#[tokio::test]
async fn an_upstream_that_says_goaway_mid_load_loses_no_request() {
    let pki = Pki::new();
    let backend = H2Backend::start_with_goaway_after(10).await;
    let proxy = proxy_to(&pki, &backend.url()).await;
    let client = Client::new(&pki);
    let conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let Conn::H2(send) = conn else { unreachable!() };
    all_ok_in_waves(&send, "/sleep/20", 6, 8).await;
    // How many requests each connection takes before its GOAWAY lands depends on timing (the
    // first GOAWAY lets streams in until a PING round trip); that a new one was opened does not.
    assert!(
        backend.connections.load(Ordering::SeqCst) >= 2,
        "a GOAWAY sent new requests to a new connection"
    );
}

#[tokio::test]
async fn more_streams_than_one_upstream_connection_carries_open_a_second_one() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let proxy = proxy_to(&pki, &backend.url()).await;
    let client = Client::new(&pki);
    let conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let Conn::H2(send) = conn else { unreachable!() };
    let n = limen::upstream::H2_STREAMS_PER_CONNECTION + 20;
    let answers = futures_util::future::join_all((0..n).map(|_| {
        let mut c = Conn::H2(send.clone());
        async move { c.get(HOST, "/sleep/500").await }
    }))
    .await;
    for a in answers {
        assert_eq!(a.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        2,
        "{n} streams at once need exactly two upstream connections"
    );
    assert!(
        backend.max_concurrent.load(Ordering::SeqCst) <= limen::upstream::H2_STREAMS_PER_CONNECTION
    );
}

#[tokio::test]
async fn an_upstream_killed_and_restarted_is_reached_again() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let addr = backend.addr;
    let proxy = proxy_to(&pki, &backend.url()).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    assert_eq!(conn.get(HOST, "/a").await.unwrap().status, StatusCode::OK);
    backend.kill();
    drop(backend);
    let down = conn.get(HOST, "/b").await.unwrap();
    assert_eq!(down.status, StatusCode::BAD_GATEWAY, "{}", down.text());
    let restarted = H2Backend::start_at(addr, usize::MAX).await;
    let deadline = Instant::now() + PROMPT;
    while conn
        .get(HOST, "/c")
        .await
        .map_or(true, |g| g.status != StatusCode::OK)
    {
        assert!(
            Instant::now() < deadline,
            "the restarted upstream is never reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(restarted.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_removed_h2c_upstream_has_its_connection_closed() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let other = Backend::start("other").await;
    let mut proxy = Proxy::start(
        &pki,
        &[HOST],
        "reload:\n  interval: 50ms",
        &format!(
            "  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n",
            backend.url()
        ),
    )
    .await;
    let client = Client::new(&pki);
    assert_eq!(
        client.get(proxy.addr, HOST, "/a").await.status,
        StatusCode::OK
    );
    assert_eq!(backend.closed.load(Ordering::SeqCst), 0);
    proxy
        .reconfigure(
            &config_yaml(
                "reload:\n  interval: 50ms",
                &format!(
                    "  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n",
                    other.url()
                ),
            ),
            PROMPT,
        )
        .await;
    eventually(
        PROMPT,
        "the removed upstream's connection closes",
        || async { backend.closed.load(Ordering::SeqCst) == 1 },
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_black_holed_upstream_connection_is_found_by_ping_and_replaced() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let relay = Relay::start(backend.addr).await;
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "timeouts:\n  upstream_ping_interval: 200ms\n  upstream_ping_timeout: 300ms",
        &format!(
            "  - {{host: \"{HOST}\", upstreams: [\"h2c://{}\"]}}\n",
            relay.addr
        ),
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    assert_eq!(conn.get(HOST, "/a").await.unwrap().status, StatusCode::OK);
    // The upstream host vanishes without a FIN: a request sent now waits for an answer that
    // never comes, until the unanswered PING closes the connection (not the 60 s response timeout).
    relay.black_hole();
    let began = Instant::now();
    let lost = conn.get(HOST, "/b").await.unwrap();
    assert_eq!(lost.status, StatusCode::BAD_GATEWAY, "{}", lost.text());
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "found by the PING timeout, after {:?}",
        began.elapsed()
    );
    eventually(PROMPT, "limen closes the dead connection", || async {
        relay.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(conn.get(HOST, "/c").await.unwrap().status, StatusCode::OK);
    assert_eq!(
        relay.connections.load(Ordering::SeqCst),
        2,
        "the next request went on a new connection"
    );
}

/// How an h2c upstream built on the h2 crate (hyper's server cannot do either) turns streams
/// away unprocessed.
#[derive(Clone, Copy)]
enum Refusal {
    /// Each connection resets its first `n` streams with REFUSED_STREAM (a server at its limit).
    FirstStreams(usize),
    /// Each connection says GOAWAY once it has answered `n` streams (as nginx does at
    /// `keepalive_requests`), answers the streams it had already taken, and closes. Requests
    /// sent on it after the GOAWAY are refused.
    GoawayAfter(usize),
}

/// The upstream's address, and the requests it answered (each with `ok`).
async fn refusing_upstream(refusal: Refusal) -> (String, Arc<AtomicUsize>) {
    h2c_upstream(move |tcp, counted| async move {
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            return;
        };
        let mut streams = 0usize;
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            streams += 1;
            if matches!(refusal, Refusal::FirstStreams(n) if streams <= n) {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let Ok(mut body) = respond.send_response(http::Response::new(()), false) else {
                continue;
            };
            if matches!(refusal, Refusal::GoawayAfter(n) if streams == n) {
                // The last stream is answered slowly: the connection stays open after its
                // GOAWAY, for limen to send (refused) requests on.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = body.send_data(Bytes::from_static(b"ok"), true);
                });
                conn.graceful_shutdown();
                continue;
            }
            let _ = body.send_data(Bytes::from_static(b"ok"), true);
        }
    })
    .await
}

/// An h2c upstream on a loopback port that runs `serve` for each connection, with the count of
/// requests answered (which `serve` keeps); its URL and that count.
async fn h2c_upstream<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream, Arc<AtomicUsize>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("h2c://{}", listener.local_addr().unwrap());
    let answered = Arc::new(AtomicUsize::new(0));
    let counted = answered.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp, counted.clone()));
        }
    });
    (url, answered)
}

/// `total` GETs over one HTTP/2 client connection, one started every `gap`: every one must be
/// answered by the upstream.
async fn every_get_is_answered(refusal: Refusal, total: usize, gap: Duration) {
    let pki = Pki::new();
    let (url, answered) = refusing_upstream(refusal).await;
    let proxy = proxy_to(&pki, &url).await;
    let client = Client::new(&pki);
    let Conn::H2(send) = client.open(proxy.addr, HOST, Proto::H2).await else {
        unreachable!()
    };
    let answers = futures_util::future::join_all((0..total).map(|i| {
        let mut c = Conn::H2(send.clone());
        async move {
            tokio::time::sleep(gap * i as u32).await;
            c.get(HOST, "/").await
        }
    }))
    .await;
    for (i, a) in answers.into_iter().enumerate() {
        let got = a.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(got.status, StatusCode::OK, "request {i}: {}", got.text());
        assert_eq!(got.text(), "ok");
    }
    assert_eq!(answered.load(Ordering::SeqCst), total);
}

#[tokio::test]
async fn streams_an_upstream_refuses_unprocessed_are_sent_again() {
    every_get_is_answered(Refusal::FirstStreams(4), 48, Duration::ZERO).await;
}

#[tokio::test]
async fn requests_sent_after_an_upstream_goaway_go_to_a_new_connection() {
    every_get_is_answered(Refusal::GoawayAfter(5), 40, Duration::from_millis(10)).await;
}

/// An h2c upstream written frame by frame, as nginx behaves at `keepalive_requests`: each
/// connection answers its first `n` streams, then sends GOAWAY naming the n-th as its last stream
/// while later streams are already on their way, answers nothing more, and closes 200 ms later.
/// Streams beyond the GOAWAY's last one were not processed (RFC 9113 6.8).
async fn nginx_like_goaway_upstream(n: usize) -> (String, Arc<AtomicUsize>) {
    use common::raw_h2::{frame, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, SETTINGS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    h2c_upstream(move |mut tcp, counted| async move {
        let mut preface = [0u8; 24];
        if tcp.read_exact(&mut preface).await.is_err() {
            return;
        }
        let _ = tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await;
        let (mut buf, mut taken, mut last) = (Vec::new(), 0usize, None::<u32>);
        let mut chunk = [0u8; 16384];
        loop {
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let payload = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                let mut out = Vec::new();
                match kind {
                    SETTINGS if flags & 1 == 0 => out = frame(SETTINGS, 1, 0, &[]),
                    PING if flags & 1 == 0 => out = frame(PING, 1, 0, &payload),
                    HEADERS if last.is_none() => {
                        taken += 1;
                        counted.fetch_add(1, Ordering::SeqCst);
                        // :status 200 (static table index 8), then "ok".
                        out = frame(HEADERS, END_HEADERS, stream, &[0x88]);
                        out.extend(frame(0x0, END_STREAM, stream, b"ok"));
                        if taken == n {
                            let mut goaway = stream.to_be_bytes().to_vec();
                            goaway.extend_from_slice(&0u32.to_be_bytes());
                            out.extend(frame(GOAWAY, 0, 0, &goaway));
                            last = Some(stream);
                        }
                    }
                    _ => {}
                }
                if !out.is_empty() && tcp.write_all(&out).await.is_err() {
                    return;
                }
            }
            let read = if last.is_some() {
                match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut chunk)).await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                tcp.read(&mut chunk).await
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    })
    .await
}

#[tokio::test]
async fn requests_in_flight_beyond_an_upstream_goaway_are_sent_again() {
    let pki = Pki::new();
    let (url, answered) = nginx_like_goaway_upstream(10).await;
    let proxy = proxy_to(&pki, &url).await;
    let client = Client::new(&pki);
    let Conn::H2(send) = client.open(proxy.addr, HOST, Proto::H2).await else {
        unreachable!()
    };
    all_ok_in_waves(&send, "/", 3, 32).await;
    assert_eq!(
        answered.load(Ordering::SeqCst),
        96,
        "each request answered once"
    );
}

/// `waves` of `concurrent` GETs of `path` over one HTTP/2 client connection, a wave at a time:
/// every answer must be 200.
async fn all_ok_in_waves(
    send: &hyper::client::conn::http2::SendRequest<BackendBody>,
    path: &str,
    waves: usize,
    concurrent: usize,
) {
    for wave in 0..waves {
        let answers = futures_util::future::join_all((0..concurrent).map(|_| {
            let mut c = Conn::H2(send.clone());
            async move { c.get(HOST, path).await }
        }))
        .await;
        for a in answers {
            let got = a.unwrap_or_else(|e| panic!("wave {wave}: {e}"));
            assert_eq!(got.status, StatusCode::OK, "wave {wave}: {}", got.text());
        }
    }
}

/// Twenty requests arrive at once for an `h2c://` (or `https://`) upstream whose connects hang.
/// None waits behind another's dial: they share the one dial in flight (and the next, for their
/// second try), so each is answered after two connect timeouts, far within the route's
/// `timeout`. (They were answered one connect timeout apart, up to the route's timeout: one dial
/// at a time under a lock, each its own.)
#[tokio::test(flavor = "multi_thread")]
async fn a_black_holed_upstream_holds_no_request_behind_another() {
    let pki = Pki::new();
    for scheme in ["h2c", "https"] {
        let (hole, _fill, _listener) = black_holed();
        let url = format!("{scheme}://{hole}");
        let tls = if scheme == "https" {
            ", upstream_tls: {insecure_skip_verify: true}"
        } else {
            ""
        };
        let proxy = Proxy::start(
            &pki,
            &[HOST],
            "timeouts: {upstream_connect: 400ms}\n",
            &format!(
                "  - {{name: app, host: \"{HOST}\", upstreams: [\"{url}\"], timeout: 4s{tls}}}\n"
            ),
        )
        .await;
        let client = Client::new(&pki);
        let started = Instant::now();
        let requests: Vec<_> = (0..20)
            .map(|_| {
                let client = client.clone();
                let addr = proxy.addr;
                tokio::spawn(async move {
                    let mut conn = client.open(addr, HOST, Proto::H1).await;
                    let t = Instant::now();
                    let status = conn.get(HOST, "/").await.unwrap().status;
                    (status, t.elapsed())
                })
            })
            .collect();
        for r in requests {
            let (status, took) = r.await.unwrap();
            assert!(status.is_server_error(), "{scheme}: {status}");
            assert!(
                took < Duration::from_millis(2500),
                "{scheme}: a request waited {took:?}, behind other requests' dials"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(6), "{scheme}");
        let up = upstream_state(&proxy, "app", &url).await;
        let dials = up["dials"].as_u64().unwrap_or(0);
        assert!(
            (1..=3).contains(&dials),
            "{scheme}: one dial per try shared by the twenty, not one each: {up}"
        );
    }
}

/// An h2c upstream that advertises `max_streams` concurrent streams and answers each request
/// after `delay`: its URL, the connections it accepted, and the most streams one connection
/// carried at once.
async fn limited_h2c_upstream(
    max_streams: u32,
    delay: Duration,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let connections = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (conns, peak) = (connections.clone(), most.clone());
    let (url, _) = h2c_upstream(move |tcp, _| {
        let (conns, peak) = (conns.clone(), peak.clone());
        async move {
            conns.fetch_add(1, Ordering::SeqCst);
            let Ok(mut conn) = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(tcp)
                .await
            else {
                return;
            };
            let open = Arc::new(AtomicUsize::new(0));
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let open = open.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    })
    .await;
    (url, connections, most)
}

/// The HTTP/2 pool follows the upstream's SETTINGS: one that allows 2 concurrent streams gets 6
/// concurrent requests on 3 connections at once, none queued inside a connection (they all end
/// within one answer's delay); one that allows 1,000 gets 300 on one connection when
/// `limits.upstream_h2_streams` allows that many.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_pool_follows_the_peers_max_concurrent_streams() {
    let pki = Pki::new();
    let delay = Duration::from_millis(600);
    for (allows, requests, cap, want_connections) in [
        (2, 6, "", 3),
        (
            1000,
            300,
            "limits: {upstream_h2_streams: 1000, h2_max_concurrent_streams: 1000}\n",
            1,
        ),
    ] {
        let (url, connections, most) = limited_h2c_upstream(allows, delay).await;
        let proxy = Proxy::start(
            &pki,
            &[HOST],
            cap,
            &format!("  - {{host: \"{HOST}\", upstreams: [\"{url}\"]}}\n"),
        )
        .await;
        let client = Client::new(&pki);
        let Conn::H2(send) = client.open(proxy.addr, HOST, Proto::H2).await else {
            unreachable!()
        };
        let started = Instant::now();
        let answers = futures_util::future::join_all((0..requests).map(|_| {
            let mut c = Conn::H2(send.clone());
            async move { c.get(HOST, "/").await }
        }))
        .await;
        let took = started.elapsed();
        for a in answers {
            assert_eq!(a.unwrap().status, StatusCode::OK);
        }
        let up = status_json(&proxy).await["routes"][0]["upstream_health"][0].clone();
        assert_eq!(
            connections.load(Ordering::SeqCst),
            want_connections,
            "{requests} requests to an upstream allowing {allows} streams (took {took:?}, at most {} on one connection; {up})",
            most.load(Ordering::SeqCst)
        );
        assert!(most.load(Ordering::SeqCst) <= allows as usize);
        assert!(
            took < delay * 2,
            "{requests} requests took {took:?}: some queued behind others"
        );
    }
}

/// Where failover meets gRPC and HTTP/2: a gRPC call is never sent twice once an upstream took
/// it, but a call no upstream took (the first `h2c://` upstream refuses connections) fails over
/// to the live one, with default settings, for every call before and after the dead one is ejected.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_fail_over_from_a_refusing_h2c_upstream() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let (refused, _held) = refused_port();
    let dead = format!("h2c://{refused}");
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "",
        &format!(
            "  - {{name: app, host: \"{HOST}\", upstreams: [\"{dead}\", \"{}\"], balance: round_robin}}\n",
            backend.url()
        ),
    )
    .await;
    let client = Client::new(&pki);
    for i in 0..20 {
        let (status, code, msg) =
            grpc_call(&client, &proxy, HOST, HOST, "/stream/Echo", None).await;
        assert_eq!(
            (status, code.as_deref()),
            (StatusCode::OK, Some("0")),
            "call {i}: {msg:?}"
        );
    }
    let dead_state = upstream_state(&proxy, "app", &dead).await;
    assert_eq!(dead_state["state"], "ejected", "{dead_state}");
}

/// The largest response head an upstream may send is `limits.max_header_bytes`, whatever the
/// upstream's protocol: a 20,000-byte field passes from `http://` and `h2c://` upstreams alike
/// under the default (64 KiB; hyper's own HTTP/2 default of 16 KiB made it a 502 from `h2c://`
/// only), and is a 502 from both under 16 KiB (hyper's HTTP/1.1 default of about 400 KB let it
/// through from `http://` only).
#[tokio::test]
async fn an_upstreams_response_head_limit_is_max_header_bytes_for_every_protocol() {
    let pki = Pki::new();
    let (h1, h2) = (Backend::start("h1").await, H2Backend::start().await);
    let routes = format!(
        "  - {{host: \"{HOST}\", path: /h1, strip_prefix: true, upstreams: [\"{}\"]}}\n  - {{host: \"{HOST}\", path: /h2, strip_prefix: true, upstreams: [\"{}\"]}}\n",
        h1.url(),
        h2.url()
    );
    let client = Client::new(&pki);
    for (extra, expect) in [
        ("", StatusCode::OK),
        (
            "limits:\n  max_header_bytes: 16384\n",
            StatusCode::BAD_GATEWAY,
        ),
    ] {
        let proxy = Proxy::start(&pki, &[HOST], extra, &routes).await;
        // The client side is HTTP/1.1: the test's HTTP/2 client takes 16 KiB heads at most.
        for upstream in ["/h1", "/h2"] {
            let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
            let got = conn
                .get(HOST, &format!("{upstream}/big-header/20000"))
                .await
                .unwrap();
            assert_eq!(got.status, expect, "{extra:?} {upstream}");
            if expect == StatusCode::OK {
                assert_eq!(got.headers["x-big"].len(), 20000);
            }
        }
    }
}
