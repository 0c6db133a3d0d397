//! A user puts limen in front of app servers: requests reach the right backend with the right
//! headers, over HTTP/1.1 and HTTP/2, and failures come back as clear HTTP errors.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const NAMES: &[&str] = &["app.example.test", "*.example.test", "other.test"];

#[tokio::test]
async fn routes_pick_host_then_longest_prefix_over_h1_and_h2() {
    let pki = Pki::new();
    let (exact, api, wild, any) = (
        Backend::start("exact").await,
        Backend::start("api").await,
        Backend::start("wild").await,
        Backend::start("any").await,
    );
    let routes = format!(
        "  - {{host: app.example.test, upstreams: [\"{}\"]}}\n  - {{host: app.example.test, path: /api, upstreams: [\"{}\"], strip_prefix: true}}\n  - {{host: \"*.example.test\", upstreams: [\"{}\"]}}\n  - {{host: \"*\", upstreams: [\"{}\"]}}\n",
        exact.url(),
        api.url(),
        wild.url(),
        any.url()
    );
    let proxy = Proxy::start(&pki, NAMES, "", &routes).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, "app.example.test", proto).await;
        let cases = [
            ("app.example.test", "/", "exact", "/"),
            ("app.example.test", "/api", "api", "/"),
            ("app.example.test", "/api/v1?q=1", "api", "/v1?q=1"),
            ("app.example.test", "/apix", "exact", "/apix"),
        ];
        for (host, path, backend, seen_path) in cases {
            let got = conn.get(host, path).await.unwrap();
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{proto:?} {host}{path}: {}",
                got.text()
            );
            let echo = got.echo();
            assert_eq!(echo.backend, backend, "{proto:?} {host}{path}");
            assert_eq!(echo.path, seen_path, "{proto:?} {host}{path}");
            assert_eq!(echo.header("host"), Some(host), "the original Host is kept");
        }
        let got = client.get(proxy.addr, "b.example.test", "/anything").await;
        assert_eq!(got.echo().backend, "wild");
        let got = client.get(proxy.addr, "other.test", "/").await;
        assert_eq!(got.echo().backend, "any");
    }
}

#[tokio::test]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_stripped() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, NAMES, "", &route_all_to(&b)).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H1).await;
    let mut req = conn.request("GET", "app.example.test", "/h", body(""));
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    h.insert("forwarded", "for=6.6.6.6".parse().unwrap());
    h.insert("connection", "keep-alive, x-drop-me".parse().unwrap());
    h.insert("x-drop-me", "secret".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert("proxy-connection", "keep-alive".parse().unwrap());
    h.insert("te", "trailers, gzip".parse().unwrap());
    h.insert("x-app", "kept".parse().unwrap());
    let got = conn.fetch(req).await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let echo = got.echo();
    assert_eq!(
        echo.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "an untrusted client's XFF is replaced"
    );
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("x-forwarded-host"), Some("app.example.test"));
    assert_eq!(
        echo.header("forwarded"),
        Some("for=127.0.0.1;host=\"app.example.test\";proto=https")
    );
    for gone in ["x-drop-me", "keep-alive", "proxy-connection"] {
        assert_eq!(echo.header(gone), None, "{gone} must not reach the backend");
    }
    assert_eq!(echo.header("te"), Some("trailers"));
    assert_eq!(echo.header("x-app"), Some("kept"));
    // The backend named x-hop in its Connection header: the client must not see it.
    assert!(got.headers.get("x-hop").is_none());
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarded_for_chain() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "trusted_proxies: [\"127.0.0.0/8\"]",
        &route_all_to(&b),
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H2).await;
    let mut req = conn.request("GET", "app.example.test", "/", body(""));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let echo = conn.fetch(req).await.unwrap().echo();
    assert_eq!(
        echo.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
}

#[tokio::test]
async fn no_route_is_404_and_a_host_outside_the_certificate_is_421() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        &["app.example.test", "other.test"],
        "",
        &format!("  - {{host: app.example.test, path: /api, upstreams: [\"{}\"]}}\n  - {{host: other.test, upstreams: [\"{}\"]}}\n", b.url(), b.url()),
    )
    .await;
    let client = Client::new(&pki);
    let got = client
        .get(proxy.addr, "app.example.test", "/elsewhere")
        .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(got.text().contains("no route"), "{}", got.text());

    // Same certificate covers both names: reusing the connection for other.test is fine.
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H2).await;
    assert_eq!(
        conn.get("other.test", "/").await.unwrap().status,
        StatusCode::OK
    );
    // A name the presented certificate does not cover is domain fronting: 421.
    let got = conn.get("evil.test", "/").await.unwrap();
    assert_eq!(
        got.status,
        StatusCode::MISDIRECTED_REQUEST,
        "{}",
        got.text()
    );
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H1).await;
    let got = conn.get("evil.test", "/").await.unwrap();
    assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST);
}

#[tokio::test]
async fn refused_upstreams_are_skipped_and_all_refused_is_502() {
    let pki = Pki::new();
    let alive = Backend::start("alive").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "",
        &format!(
            "  - {{host: \"*\", path: /mixed, upstreams: [\"http://{dead}\", \"{}\"]}}\n  - {{host: \"*\", path: /dead, upstreams: [\"http://{dead}\"]}}\n",
            alive.url()
        ),
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H1).await;
    for i in 0..6 {
        let req = conn.request("POST", "app.example.test", "/mixed", body(vec![b'z'; 1000]));
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "request {i}: {}", got.text());
        assert_eq!(
            got.echo().body_len,
            1000,
            "the body reaches the live upstream intact"
        );
    }
    let got = conn.get("app.example.test", "/dead").await.unwrap();
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(
        got.text().contains("could not be reached"),
        "{}",
        got.text()
    );
    assert!(
        !got.text().contains("127.0.0.1") && !got.text().contains("refused ("),
        "limen's own answer names no address or OS error: {}",
        got.text()
    );
}

#[tokio::test]
async fn round_robin_spreads_requests() {
    let pki = Pki::new();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "",
        &format!(
            "  - {{host: \"*\", upstreams: [\"{}\", \"{}\"]}}\n",
            a.url(),
            b.url()
        ),
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H2).await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        *seen
            .entry(
                conn.get("app.example.test", "/")
                    .await
                    .unwrap()
                    .echo()
                    .backend,
            )
            .or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5));
    assert_eq!(seen.get("b"), Some(&5));
}

#[tokio::test]
async fn a_slow_upstream_is_504_after_the_route_timeout() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "",
        &format!(
            "  - {{host: \"*\", upstreams: [\"{}\"], timeout: 300ms}}\n",
            b.url()
        ),
    )
    .await;
    let client = Client::new(&pki);
    let started = std::time::Instant::now();
    let got = client
        .get(proxy.addr, "app.example.test", "/sleep/3000")
        .await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        got.text().contains("did not answer in time"),
        "{}",
        got.text()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let got = client
        .get(proxy.addr, "app.example.test", "/sleep/10")
        .await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn upstream_connections_are_pooled_across_requests_and_clients() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, NAMES, "", &route_all_to(&b)).await;
    let client = Client::new(&pki);
    for _ in 0..5 {
        assert_eq!(
            client.get(proxy.addr, "app.example.test", "/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(
        b.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one pooled upstream connection serves all"
    );
}

#[tokio::test]
async fn a_respond_route_needs_no_upstream() {
    let pki = Pki::new();
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "",
        "  - {host: \"*\", respond: {status: 203, body: \"hi\"}}\n",
    )
    .await;
    let client = Client::new(&pki);
    let got = client.get(proxy.addr, "app.example.test", "/").await;
    assert_eq!(got.status, StatusCode::NON_AUTHORITATIVE_INFORMATION);
    assert_eq!(got.text(), "hi");
}

#[tokio::test]
async fn websocket_echoes_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, NAMES, "", &route_all_to(&b)).await;
    let client = Client::new(&pki);
    let tls = client
        .connect(proxy.addr, "app.example.test", Proto::H1)
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://app.example.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..20 {
        let msg = format!("ping {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn chunked_upstream_responses_still_reuse_the_upstream_connection() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, NAMES, "", &route_all_to(&b)).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H1).await;
    for _ in 0..5 {
        let got = conn
            .get("app.example.test", "/chunked/100000")
            .await
            .unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body.len(), 100_000);
        assert!(
            got.headers.get("content-length").is_none(),
            "the response was chunked"
        );
    }
    assert_eq!(b.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_body_idle() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "timeouts:\n  body_idle: 300ms",
        &route_all_to(&b),
    )
    .await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, "app.example.test", proto).await;
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            conn.get("app.example.test", "/stall"),
        )
        .await;
        let result = result.expect("the stalled response must end, not hang");
        assert!(
            result.is_err(),
            "{proto:?}: a truncated body is an error, not a success"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{proto:?}: not before body_idle"
        );
        let got = client.get(proxy.addr, "app.example.test", "/").await;
        assert_eq!(got.status, StatusCode::OK, "others are still served");
    }
}

#[tokio::test]
async fn a_steady_upload_longer_than_the_route_timeout_is_not_a_504() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(
        &pki,
        NAMES,
        "",
        &format!(
            "  - {{host: \"*\", upstreams: [\"{}\"], timeout: 300ms}}\n",
            b.url()
        ),
    )
    .await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, "app.example.test", Proto::H1).await;
    // 10 chunks, 100 ms apart: a 1 s upload against a 300 ms response timeout.
    let stream = futures_util::stream::unfold(0u32, |i| async move {
        if i == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((
            Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"0123456789",
            ))),
            i + 1,
        ))
    });
    use http_body_util::BodyExt;
    let req = conn.request(
        "POST",
        "app.example.test",
        "/upload",
        http_body_util::StreamBody::new(stream).boxed(),
    );
    let got = conn.fetch(req).await.unwrap();
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.echo().body_len, 100);
}

#[tokio::test]
async fn request_edge_cases_cookies_host_connect() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, NAMES, "", &route_all_to(&b)).await;
    let client = Client::new(&pki);

    // HTTP/2 cookies in several fields reach an HTTP/1.1 upstream as one.
    let mut h2 = client.open(proxy.addr, "app.example.test", Proto::H2).await;
    let mut req = h2.request("GET", "app.example.test", "/", body(""));
    req.headers_mut().append("cookie", "a=1".parse().unwrap());
    req.headers_mut().append("cookie", "b=2".parse().unwrap());
    let echo = h2.fetch(req).await.unwrap().echo();
    assert_eq!(
        echo.headers.get("cookie"),
        Some(&vec!["a=1; b=2".to_string()])
    );

    // A client naming Host in Connection cannot take it away from the upstream request.
    let mut h1 = client.open(proxy.addr, "app.example.test", Proto::H1).await;
    let mut req = h1.request("GET", "app.example.test", "/", body(""));
    req.headers_mut()
        .insert("connection", "host".parse().unwrap());
    req.headers_mut()
        .insert("x-real-ip", "6.6.6.6".parse().unwrap());
    let echo = h1.fetch(req).await.unwrap().echo();
    assert_eq!(echo.header("host"), Some("app.example.test"));
    assert_eq!(
        echo.header("x-real-ip"),
        None,
        "an untrusted client's X-Real-IP is dropped"
    );

    // CONNECT and TRACE are refused, not forwarded.
    let mut tls = client
        .connect(proxy.addr, "app.example.test", Proto::H1)
        .await
        .unwrap();
    let (resp, _) = raw_exchange(
        &mut tls,
        b"CONNECT app.example.test:443 HTTP/1.1\r\nHost: app.example.test:443\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_websocket_silent_past_idle_is_closed_and_a_chatty_one_is_not() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = Proxy::start(&pki, NAMES, "timeouts:\n  idle: 600ms", &route_all_to(&b)).await;
    let client = Client::new(&pki);
    let open = || async {
        let tls = client
            .connect(proxy.addr, "app.example.test", Proto::H1)
            .await
            .unwrap();
        tokio_tungstenite::client_async("wss://app.example.test/ws", tls)
            .await
            .unwrap()
            .0
    };

    // Chatty: a message every 200 ms for 2 s, well past `idle`, and every one echoes.
    let mut chatty = open().await;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        chatty.send(Message::text(format!("{i}"))).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(2), chatty.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("{i}"));
    }

    // Silent: the tunnel is closed once nothing moved for `idle`.
    let mut silent = open().await;
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), silent.next()).await;
    let end = end.expect("a silent tunnel must be closed, not held forever");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "nothing was sent, so nothing comes back but the end: {end:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed after {:?}, before idle",
        started.elapsed()
    );
}

/// An HTTP/1.1 upstream that answers `ok` on keep-alive connections and counts the connections
/// it accepted and those the other side closed.
async fn counting_upstream() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (opened, closed) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            o.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                }
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    (url, opened, closed)
}

#[tokio::test]
async fn an_idle_pooled_upstream_connection_is_closed_after_upstream_idle_without_traffic() {
    let pki = Pki::new();
    let (url, opened, closed) = counting_upstream().await;
    let proxy = Proxy::start(
        &pki,
        &["app.test"],
        "timeouts: {upstream_idle: 400ms}",
        &format!("  - {{host: app.test, upstreams: [\"{url}\"]}}\n"),
    )
    .await;
    let client = Client::new(&pki);
    assert_eq!(client.get(proxy.addr, "app.test", "/").await.text(), "ok");
    // Reused while fresh.
    assert_eq!(client.get(proxy.addr, "app.test", "/").await.text(), "ok");
    assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(closed.load(std::sync::atomic::Ordering::SeqCst), 0);
    // No more traffic: the pool gives the connection (and its buffers) back by itself.
    eventually(
        Duration::from_secs(3),
        "the idle connection is closed",
        || async { closed.load(std::sync::atomic::Ordering::SeqCst) == 1 },
    )
    .await;
    // The next request dials afresh.
    assert_eq!(client.get(proxy.addr, "app.test", "/").await.text(), "ok");
    assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 2);
}
