//! HTTP/3 (issue 25): a QUIC listener on the same routes, certificates and hot reload, driven by
//! a real quinn + h3 client. Requests take the same stages as over TCP, bodies stream both ways,
//! HTTP/1.1 and HTTP/2 answers advertise it, and the listener follows the config at runtime.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::http3::H3Conn;
use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";
const PATIENCE: Duration = Duration::from_secs(10);
const RELOAD: &str = "reload: {interval: 50ms}";

/// The harness's config with a QUIC listener beside the HTTPS one.
fn with_quic(yaml: String) -> String {
    yaml.replacen(
        "  admin: \"127.0.0.1:0\"\n",
        "  admin: \"127.0.0.1:0\"\n  quic: \"127.0.0.1:0\"\n",
        1,
    )
}

async fn start(pki: &Pki, names: &[&str], routes: &str) -> Proxy {
    let dir = Proxy::dir();
    pki.issue(names).write(&dir.path().join("certs"), "site");
    Proxy::start_in(dir, &with_quic(config_yaml(RELOAD, routes))).await
}

fn quic_addr(proxy: &Proxy) -> std::net::SocketAddr {
    proxy.running().quic_addr.expect("a QUIC listener")
}

#[tokio::test]
async fn requests_over_http3_take_the_same_routes_and_stages() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let routes = format!(
        "  - {{host: \"{HOST}\", path: /api, upstreams: [\"{}\"], headers: {{response: {{set: {{x-route: api}}}}}}}}\n  - {{host: \"{HOST}\", path: /fixed, respond: {{status: 418, body: teapot}}}}\n",
        b.url()
    );
    let proxy = start(&pki, &[HOST], &routes).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();

    let got = h3.get(HOST, "/api/users?x=1").await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["x-route"], "api");
    assert!(got.headers.contains_key("x-request-id"));
    let echo = got.echo();
    assert_eq!(echo.path, "/api/users?x=1");
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("host"), Some(HOST));
    assert_eq!(echo.header("via"), Some("3 limen"));

    let got = h3.get(HOST, "/fixed").await.unwrap();
    assert_eq!(
        (got.status, &got.body[..]),
        (StatusCode::IM_A_TEAPOT, &b"teapot"[..])
    );
    // No route: 404, as over TCP; a host this certificate does not cover: 421.
    assert_eq!(
        h3.get(HOST, "/nothing").await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h3.get("other.test", "/api").await.unwrap().status,
        StatusCode::MISDIRECTED_REQUEST
    );

    let m = admin_get(proxy.admin(), "/metrics").await.1;
    assert_eq!(
        metric(&m, "limen_connections_open{protocol=\"h3\"}"),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_bodies_stream_both_ways_and_streams_run_side_by_side() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &[HOST], &route_all_to(&b)).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();

    let up = Bytes::from(vec![b'u'; 20 << 20]);
    let got = h3.request("POST", HOST, "/upload", &[], up).await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echo().body_len, 20 << 20);

    let got = h3
        .get(HOST, &format!("/chunked/{}", 20 << 20))
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), 20 << 20);

    // Twenty requests at once on one connection, each answered.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut send = h3.send.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(format!("https://{HOST}/n/{i}"))
                .body(())
                .unwrap();
            let mut stream = send.send_request(req).await.unwrap();
            stream.finish().await.unwrap();
            stream.recv_response().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn http1_and_http2_answers_advertise_http3_at_the_bound_port() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &[HOST], &route_all_to(&b)).await;
    let want = format!("h3=\":{}\"; ma=86400", quic_addr(&proxy).port());
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let got = client.get_with(proxy.addr, HOST, proto, "/", &[]).await;
        assert_eq!(got.headers["alt-svc"], want.as_str(), "{proto:?}");
    }
    // An HTTP/3 answer does not advertise what the client already uses.
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();
    assert!(!h3
        .get(HOST, "/")
        .await
        .unwrap()
        .headers
        .contains_key("alt-svc"));
}

/// A certificate rotated on disk serves new QUIC handshakes within a poll, while a connection
/// opened before keeps working; a wildcard certificate covers its names over QUIC too.
#[tokio::test]
async fn a_rotated_certificate_serves_new_quic_handshakes_and_open_ones_keep_working() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(
        &pki,
        &[HOST, "*.wild.test"],
        &format!("  - {{host: \"*\", upstreams: [\"{}\"]}}\n", b.url()),
    )
    .await;
    let addr = quic_addr(&proxy);
    let mut before = H3Conn::open(&pki, addr, HOST).await.unwrap();
    let old_cert = before.peer_cert();
    let mut wild = H3Conn::open(&pki, addr, "a.wild.test").await.unwrap();
    assert_eq!(
        wild.get("a.wild.test", "/").await.unwrap().status,
        StatusCode::OK
    );

    let rotated = pki.issue(&[HOST, "*.wild.test"]);
    rotated.write(&proxy.path("certs"), "site");
    eventually(
        PATIENCE,
        "new QUIC handshakes get the new certificate",
        || async {
            match H3Conn::open(&pki, addr, HOST).await {
                Ok(c) => c.peer_cert() != old_cert,
                Err(_) => false,
            }
        },
    )
    .await;
    // The connection opened before the rotation still serves requests.
    assert_eq!(before.get(HOST, "/").await.unwrap().status, StatusCode::OK);
}

/// `listen.quic` added, moved and removed at runtime, as the other listeners are; a config
/// whose QUIC port cannot be bound is refused whole.
#[tokio::test]
async fn the_quic_listener_follows_the_config_at_runtime() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let plain = config_yaml(RELOAD, &route_all_to(&b));
    let proxy = Proxy::start_in(dir, &plain).await;
    assert!(proxy.running().quic_addr.is_none());

    // Added: a fixed port, found free first.
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let at = |p: u16| {
        plain.replacen(
            "  admin: \"127.0.0.1:0\"\n",
            &format!("  admin: \"127.0.0.1:0\"\n  quic: \"127.0.0.1:{p}\"\n"),
            1,
        )
    };
    proxy.reconfigure(&at(port), PATIENCE).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut h3 = H3Conn::open(&pki, addr, HOST).await.unwrap();
    assert_eq!(h3.get(HOST, "/").await.unwrap().status, StatusCode::OK);

    // A port another socket holds: refused whole, the listener in force stays.
    let squatter = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let gen = proxy.generation();
    write_atomic(&proxy.config_path, &at(taken));
    eventually(PATIENCE, "the edit is refused", || async {
        proxy
            .status()
            .config
            .errors
            .iter()
            .any(|e| e.contains("cannot bind listen.quic"))
    })
    .await;
    assert_eq!(proxy.generation(), gen);
    assert_eq!(h3.get(HOST, "/").await.unwrap().status, StatusCode::OK);

    // Removed: no new QUIC connection is accepted.
    proxy.reconfigure(&plain, PATIENCE).await;
    eventually(PATIENCE, "the QUIC listener is gone", || async {
        tokio::time::timeout(Duration::from_secs(1), H3Conn::open(&pki, addr, HOST))
            .await
            .map_or(true, |r| r.is_err())
    })
    .await;
    drop(squatter);
}

/// A host under `tls.client_auth` is served over QUIC only after the same verification; limen
/// asks no client certificate over QUIC, so such a host answers 421 there (the client retries
/// over TCP), while other hosts on the same connection are served.
#[tokio::test]
async fn a_host_under_client_auth_is_misdirected_over_quic() {
    let pki = Pki::new();
    let clients = Pki::named("clients CA");
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST, "admin.example.test"])
        .write(&dir.path().join("certs"), "site");
    std::fs::write(dir.path().join("clients-ca.pem"), &clients.ca_pem).unwrap();
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  quic: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n  client_auth:\n    - {{hosts: [\"admin.example.test\"], ca: ./clients-ca.pem, mode: require}}\nroutes:\n  - {{host: \"*\", upstreams: [\"{}\"]}}\n",
        b.url()
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let addr = quic_addr(&proxy);
    let mut h3 = H3Conn::open(&pki, addr, "admin.example.test")
        .await
        .unwrap();
    let got = h3.get("admin.example.test", "/").await.unwrap();
    assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    let got = h3.get(HOST, "/").await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
}

/// QUIC connections count under `limits.max_connections` with TLS ones; at shutdown, a request
/// in flight finishes and no new connection is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_count_under_max_connections_and_drain_at_shutdown() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = with_quic(config_yaml(
        "limits: {max_connections: 1}\ntimeouts: {shutdown_grace: 5s}",
        &route_all_to(&b),
    ));
    let mut proxy = Proxy::start_in(dir, &yaml).await;
    let addr = quic_addr(&proxy);
    let mut first = H3Conn::open(&pki, addr, HOST).await.unwrap();
    assert_eq!(first.get(HOST, "/").await.unwrap().status, StatusCode::OK);
    let second = tokio::time::timeout(Duration::from_secs(5), H3Conn::open(&pki, addr, HOST)).await;
    assert!(
        matches!(second, Ok(Err(_))),
        "a second connection past max_connections was not refused"
    );

    // A slow request in flight when shutdown begins still gets its answer.
    let mut send = first.send.clone();
    let slow = tokio::spawn(async move {
        let req = http::Request::get(format!("https://{HOST}/sleep/700"))
            .body(())
            .unwrap();
        let mut stream = send.send_request(req).await.unwrap();
        stream.finish().await.unwrap();
        stream.recv_response().await.map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let drained = proxy.shutdown().await;
    assert!(drained, "connections did not drain within shutdown_grace");
    assert_eq!(slow.await.unwrap().unwrap(), StatusCode::OK);
    let after = tokio::time::timeout(Duration::from_secs(3), H3Conn::open(&pki, addr, HOST)).await;
    assert!(
        !matches!(after, Ok(Ok(_))),
        "a QUIC connection was accepted after shutdown"
    );
}

/// A client that opens a large response and stops reading is cut off after
/// `timeouts.write_idle`, as over HTTP/1.1 and HTTP/2: its stream is reset, and the upstream
/// exchange ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_write_idle() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = with_quic(config_yaml("timeouts: {write_idle: 1s}", &route_all_to(&b)));
    let proxy = Proxy::start_in(dir, &yaml).await;
    let h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();
    let mut send = h3.send.clone();
    let req = http::Request::get(format!("https://{HOST}/chunked/{}", 200 << 20))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(
        stream.recv_response().await.unwrap().status(),
        StatusCode::OK
    );
    // Not reading for longer than write_idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut read = 0usize;
        loop {
            match stream.recv_data().await {
                Ok(Some(d)) => read += bytes::Buf::remaining(&d),
                Ok(None) => return (read, false),
                Err(_) => return (read, true),
            }
        }
    })
    .await
    .expect("the stream neither ended nor was reset");
    assert!(ended.1, "the stream ended cleanly after {} bytes", ended.0);
    assert!(ended.0 < 200 << 20, "{} bytes", ended.0);
}
