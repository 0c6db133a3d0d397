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
    proxy
        .refused_with("cannot bind listen.quic", PATIENCE)
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
    let b = Backend::start("b").await;
    let proxy = common::http3::client_auth_proxy(&pki, &b.url(), "require").await;
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
    // In flight means at the upstream: a request GOAWAY finds not yet accepted is, rightly, not
    // processed (the client may retry it elsewhere).
    eventually(
        PATIENCE,
        "the slow request reaches the upstream",
        || async { b.requests.load(std::sync::atomic::Ordering::SeqCst) == 2 },
    )
    .await;
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

/// The Python interpreter with aioquic that `.ci/run` sets up (target/interop-venv).
fn interop_python() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: python3 -m venv target/interop-venv && target/interop-venv/bin/pip install aioquic==1.2.0 (.ci/run does)",
        p.display()
    );
    p
}

/// A second, independent HTTP/3 implementation (aioquic) gets the same answers: a GET through a
/// route to the upstream, and a POST whose body reaches it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_gets_and_posts_over_http3() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &[HOST], &route_all_to(&b)).await;
    let ca = proxy.path("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/h3_client.py");
    let addr = quic_addr(&proxy).to_string();
    let run = |path: &'static str, post: Option<usize>| {
        let (script, ca, addr) = (script.clone(), ca.clone(), addr.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(interop_python());
            cmd.arg(&script).arg(&addr).arg(HOST).arg(&ca).arg(path);
            if let Some(n) = post {
                cmd.arg(n.to_string());
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "aioquic failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let out = run("/hello", None).await.unwrap();
    assert!(out.contains("status=200"), "{out}");
    assert!(out.contains("header:x-request-id="), "{out}");
    let out = run("/upload", Some(1 << 20)).await.unwrap();
    assert!(out.contains("status=200"), "{out}");
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    // The echo of the POST counted its body: 1 MiB.
    assert!(out.contains("bytes="), "{out}");
}

/// Chromium trusts a certificate over QUIC only by its key's hash (`--ignore-certificate-errors`
/// does not apply to QUIC): base64 of SHA-256 of the SubjectPublicKeyInfo.
fn spki_sha256(cert_pem: &str) -> String {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert.tbs_certificate.subject_pki.raw,
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Headless Chromium loads a page over HTTP/3 (`--origin-to-force-quic-on`), and limen counts it
/// as an h3 request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_over_http3() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    let leaf = pki.issue(&[HOST]);
    leaf.write(&dir.path().join("certs"), "site");
    let spki = spki_sha256(&leaf.cert_pem);
    let routes = "  - {host: \"*\", respond: {body: \"<html><body><p id=m>served-over-h3</p></body></html>\"}}\n";
    let proxy = Proxy::start_in(dir, &with_quic(config_yaml(RELOAD, routes))).await;
    let port = quic_addr(&proxy).port();
    let profile = tempfile::tempdir().unwrap();
    let url = format!("https://{HOST}:{port}/");
    let out = tokio::task::spawn_blocking({
        let profile = profile.path().to_path_buf();
        move || {
            browse(
                &url,
                &profile,
                &[
                    &format!("--ignore-certificate-errors-spki-list={spki}"),
                    "--enable-quic",
                    &format!("--origin-to-force-quic-on={HOST}:{port}"),
                    &format!("--host-resolver-rules=MAP {HOST} 127.0.0.1"),
                    "--dump-dom",
                ],
            )
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("served-over-h3"),
        "{dom:.300}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = admin_get(proxy.admin(), "/metrics").await.1;
    // The request came over QUIC: the HTTPS listener on TCP (same port number) saw none.
    let tcp = metric(&m, "limen_tls_handshakes_total{result=\"ok\"}").unwrap_or(0.0);
    assert_eq!(tcp, 0.0, "Chromium used TCP: {m}");
    let served = metric(&m, "limen_requests_total{route=\"0\",code=\"200\"}");
    assert!(served.is_some_and(|n| n >= 1.0), "{m}");
}

/// 0-RTT is off: a client holding a ticket from an earlier connection cannot send early data
/// (replayable); a request head over `max_header_bytes` is refused; status.json shows the
/// listener.
#[tokio::test]
async fn no_early_data_oversized_heads_are_refused_and_the_listener_is_shown() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = with_quic(config_yaml(
        "limits: {max_header_bytes: 4096}",
        &route_all_to(&b),
    ));
    let proxy = Proxy::start_in(dir, &yaml).await;
    let addr = quic_addr(&proxy);

    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(common::http3::h3_client_config(&pki.ca_der));
    // A first connection leaves a session ticket in the client config's cache.
    let first = endpoint.connect(addr, HOST).unwrap().await.unwrap();
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(first.clone()))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let mut stream = send
        .send_request(
            http::Request::get(format!("https://{HOST}/"))
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    stream.finish().await.unwrap();
    assert_eq!(
        stream.recv_response().await.unwrap().status(),
        StatusCode::OK
    );
    first.close(0u32.into(), b"");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = endpoint.connect(addr, HOST).unwrap();
    match second.into_0rtt() {
        Err(connecting) => {
            // Only a full (or resumed) handshake: fine, and it still serves.
            connecting.await.unwrap();
        }
        Ok((conn, accepted)) => {
            assert!(!accepted.await, "the server accepted 0-RTT data");
            drop(conn);
        }
    }

    let mut h3 = H3Conn::open(&pki, addr, HOST).await.unwrap();
    let big = "x".repeat(8 * 1024);
    let refused = h3
        .request("GET", HOST, "/", &[("x-big", big.as_str())], Bytes::new())
        .await;
    assert!(
        refused.as_ref().map_or(true, |g| g.status
            == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        "{refused:?}"
    );
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    let st = status_json(&proxy).await;
    assert_eq!(st["listeners"]["quic"], addr.to_string());
}

/// gRPC over HTTP/3 (the issue asks only that it fail cleanly) works: a call to an h2c upstream
/// gets its message and its trailers (grpc-status) back, through the same stages.
#[tokio::test]
async fn a_grpc_call_over_http3_gets_its_message_and_trailers() {
    let pki = Pki::new();
    let up = H2Backend::start().await;
    let proxy = start(
        &pki,
        &[HOST],
        &format!("  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n", up.url()),
    )
    .await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();
    // One gRPC message: not compressed, 5 bytes long.
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let got = tokio::time::timeout(
        PATIENCE,
        h3.request(
            "POST",
            HOST,
            "/stream",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            message.clone(),
        ),
    )
    .await
    .expect("the call hung");
    let got = got.unwrap_or_else(|e| panic!("the call failed: {e}"));
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, message);
    let trailers = got.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
}

/// A QUIC connection with no request in flight for `timeouts.idle` is closed by limen (a client's
/// PINGs keep QUIC's own idle timer running), so it cannot hold a `max_connections` place; a
/// body that does not match its Content-Length never reaches the upstream whole.
#[tokio::test]
async fn an_idle_connection_is_closed_and_a_body_must_match_its_length() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    let yaml = with_quic(config_yaml("timeouts: {idle: 1s}", &route_all_to(&b)));
    let proxy = Proxy::start_in(dir, &yaml).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();

    let short = h3
        .request(
            "POST",
            HOST,
            "/upload",
            &[("content-length", "10")],
            Bytes::from_static(b"12345"),
        )
        .await;
    // A 4xx, or the stream reset (also a refusal).
    if let Ok(got) = &short {
        assert!(got.status.is_client_error(), "{got:?}");
    }
    let whole = b.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(whole <= 1, "{whole}");

    let open = |m: &str| metric(m, "limen_connections_open{protocol=\"h3\"}").unwrap_or(0.0);
    eventually(PATIENCE, "the idle connection is closed", || async {
        open(&admin_get(proxy.admin(), "/metrics").await.1) == 0.0
    })
    .await;
    assert!(
        h3.get(HOST, "/").await.is_err(),
        "the connection still served"
    );
}
