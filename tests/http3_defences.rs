//! HTTP/3's defences and seams (issue 25): what a hostile QUIC client can make limen hold or
//! send, and where HTTP/3 meets retries, mutual TLS, shared ticket keys and gRPC streams. Raw
//! frames go over a real quinn connection; everything else through the quinn + h3 client.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::http3::{h3_client_config, H3Conn};
use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";
const PATIENCE: Duration = Duration::from_secs(10);
/// H3_EXCESSIVE_LOAD (RFC 9114, 8.1).
const EXCESSIVE_LOAD: u32 = 0x107;

fn with_quic(yaml: String) -> String {
    yaml.replacen(
        "  admin: \"127.0.0.1:0\"\n",
        "  admin: \"127.0.0.1:0\"\n  quic: \"127.0.0.1:0\"\n",
        1,
    )
}

async fn start(pki: &Pki, extra: &str, routes: &str) -> Proxy {
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    Proxy::start_in(dir, &with_quic(config_yaml(extra, routes))).await
}

fn quic_addr(proxy: &Proxy) -> SocketAddr {
    proxy.running().quic_addr.expect("a QUIC listener")
}

/// A bare QUIC connection speaking ALPN h3, for frames no HTTP/3 client would send.
async fn raw_quic(pki: &Pki, addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(h3_client_config(&pki.ca_der));
    let conn = endpoint.connect(addr, HOST).unwrap().await.unwrap();
    (endpoint, conn)
}

/// The application error code limen closed `conn` with, waiting at most `PATIENCE`.
async fn closed_with(conn: &quinn::Connection) -> Option<u64> {
    match tokio::time::timeout(PATIENCE, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => None,
    }
}

/// Writes `total` zero bytes to `send` in pieces, until done or the stream fails.
async fn pour(send: &mut quinn::SendStream, total: usize) {
    let piece = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        if send.write_all(&piece).await.is_err() {
            return;
        }
        sent += piece.len();
    }
}

/// A frame's header may declare any length; h3 would buffer a HEADERS or unknown frame whole
/// before looking at it. limen closes the connection at the header of one larger than a request
/// head can be (H3_EXCESSIVE_LOAD), on a request stream and on the control stream alike, before
/// its payload is read; other connections go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declared_larger_than_a_head_closes_its_connection_at_the_header() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, "", &route_all_to(&b)).await;
    let addr = quic_addr(&proxy);

    // A request stream: HEADERS declaring 2^30 - 1 bytes, then 4 MiB of them.
    let (_e1, conn) = raw_quic(&pki, addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0x01, 0xbf, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let pouring = tokio::spawn(async move { pour(&mut send, 4 << 20).await });
    assert_eq!(closed_with(&conn).await, Some(EXCESSIVE_LOAD.into()));
    let _ = pouring.await;

    // The control stream: its type, an empty SETTINGS, then a reserved (grease) frame type
    // declaring 1 MiB.
    let (_e2, conn) = raw_quic(&pki, addr).await;
    let mut control = conn.open_uni().await.unwrap();
    control
        .write_all(&[0x00, 0x04, 0x00, 0x21, 0x80, 0x10, 0x00, 0x00])
        .await
        .unwrap();
    let pouring = tokio::spawn(async move { pour(&mut control, 1 << 20).await });
    assert_eq!(closed_with(&conn).await, Some(EXCESSIVE_LOAD.into()));
    let _ = pouring.await;

    let mut h3 = H3Conn::open(&pki, addr, HOST).await.unwrap();
    assert_eq!(h3.get(HOST, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);
}

/// limen's QPACK has no dynamic table (it advertises a capacity of 0): a head that refers to one
/// is a decompression failure that ends the connection, not a wait for table entries that never
/// come; and a client's QPACK encoder stream, never read, holds no more than its stream window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qpack_dynamic_table_references_fail_and_its_stream_is_bounded() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, "", &route_all_to(&b)).await;
    let addr = quic_addr(&proxy);

    let (_e1, conn) = raw_quic(&pki, addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // HEADERS: Required Insert Count 1 (encoded 2), base 0, "indexed field line, dynamic, 0".
    send.write_all(&[0x01, 0x03, 0x02, 0x00, 0x80])
        .await
        .unwrap();
    send.finish().unwrap();
    // QPACK_DECOMPRESSION_FAILED
    assert_eq!(closed_with(&conn).await, Some(0x200));
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);

    // An encoder stream of 4 MiB: flow control stops the client at the stream's window (256 KiB)
    // over the whole second it tries, and the connection still serves.
    let (_e2, conn) = raw_quic(&pki, addr).await;
    let mut encoder = conn.open_uni().await.unwrap();
    encoder.write_all(&[0x02]).await.unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let pouring = tokio::spawn(async move {
        let piece = vec![0x3fu8; 16 * 1024];
        while w.load(Ordering::SeqCst) < 4 << 20 {
            match encoder.write(&piece).await {
                Ok(n) => w.fetch_add(n, Ordering::SeqCst),
                Err(_) => return,
            };
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = written.load(Ordering::SeqCst);
    assert!(
        held <= 300 * 1024,
        "{held} bytes taken on a stream never read"
    );
    pouring.abort();
    let mut h3 = H3Conn::open(&pki, addr, HOST).await.unwrap();
    assert_eq!(h3.get(HOST, "/").await.unwrap().status, StatusCode::OK);
}

/// Empty DATA frames mean nothing (RFC 9114, 7.2.1); h3 alone would end the body at the first.
#[tokio::test]
async fn empty_data_frames_between_pieces_keep_the_body_whole() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, "", &route_all_to(&b)).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();
    let req = http::Request::post(format!("https://{HOST}/upload"))
        .header("content-length", "6")
        .body(())
        .unwrap();
    let mut stream = h3.send.send_request(req).await.unwrap();
    for piece in ["abc", "", "", "def"] {
        stream
            .send_data(Bytes::from_static(piece.as_bytes()))
            .await
            .unwrap();
    }
    stream.finish().await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        use bytes::Buf;
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!((echo.method.as_str(), echo.body_len), ("POST", 6));
}

/// A GET over HTTP/3 has no body once its stream ends with its head, so a reset upstream is
/// retried on the next one, as over TCP; and a gRPC stream over HTTP/3 is held to
/// `timeouts.idle`, not `body_idle`, between messages, as over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_get_is_retried_and_a_grpc_stream_may_pause_over_http3() {
    let pki = Pki::new();
    let (a, b) = (Switch::start("a").await, Switch::start("b").await);
    a.answer.store(0, Ordering::SeqCst);
    let grpc = H2Backend::start().await;
    let routes = format!(
        "  - {{name: app, host: \"{HOST}\", upstreams: [\"{}\", \"{}\"], retry: {{attempts: 1, on: [reset], budget: 100%}}, passive: {{consecutive_failures: 0}}}}\n  - {{name: rpc, host: \"{HOST}\", path: /stream, upstreams: [\"{}\"]}}\n",
        a.url(),
        b.url(),
        grpc.url()
    );
    let proxy = start(&pki, "timeouts: {body_idle: 1s}", &routes).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();
    for _ in 0..4 {
        let got = h3.get(HOST, "/").await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(&got.body[..], b"b 0");
    }
    assert!(a.hits.load(Ordering::SeqCst) >= 2, "a was tried in turn");

    // Two messages 1.5 s apart: past body_idle, well within idle.
    let req = http::Request::post(format!("https://{HOST}/stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut stream = h3.send.send_request(req).await.unwrap();
    stream
        .send_data(Bytes::from_static(b"\x00\x00\x00\x00\x03one"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream
        .send_data(Bytes::from_static(b"\x00\x00\x00\x00\x03two"))
        .await
        .unwrap();
    stream.finish().await.unwrap();
    let resp = tokio::time::timeout(PATIENCE, stream.recv_response())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        use bytes::Buf;
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    assert_eq!(body, b"\x00\x00\x00\x00\x03one\x00\x00\x00\x00\x03two");
    let trailers = stream.recv_trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
}

/// Alt-Svc sends browsers to QUIC only for hosts QUIC serves: not to one under a client
/// certificate policy (421 there).
#[tokio::test]
async fn alt_svc_is_not_offered_for_a_host_under_client_auth() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = common::http3::client_auth_proxy(&pki, &b.url(), "optional").await;
    let client = Client::new(&pki);
    let plain = client.get(proxy.addr, HOST, "/").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(plain.headers.contains_key("alt-svc"), "{:?}", plain.headers);
    // Under the policy (optional: served without a certificate, on its own SNI).
    let mut conn = client
        .open(proxy.addr, "admin.example.test", Proto::H2)
        .await;
    let got = conn.get("admin.example.test", "/").await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert!(!got.headers.contains_key("alt-svc"), "{:?}", got.headers);
    // Named on a connection without the policy (the certificate covers both names): 421, and
    // no Alt-Svc with it.
    let mut conn = client.open(proxy.addr, HOST, Proto::H1).await;
    let got = conn.get("admin.example.test", "/").await.unwrap();
    assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(!got.headers.contains_key("alt-svc"), "{:?}", got.headers);
}

/// Counts the server certificates a client verifies: a resumed TLS 1.3 handshake shows none.
#[derive(Debug)]
struct CountingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verified: AtomicU64,
}

impl rustls::client::danger::ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.verified.fetch_add(1, Ordering::SeqCst);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client's session cache, counting the TLS 1.3 tickets servers send it.
#[derive(Debug)]
struct CountingStore {
    inner: rustls::client::ClientSessionMemoryCache,
    tickets: AtomicU64,
}

impl rustls::client::ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, name: rustls_pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }
    fn set_tls12_session(
        &self,
        name: rustls_pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(name, value)
    }
    fn tls12_session(
        &self,
        name: &rustls_pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &rustls_pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(
        &self,
        name: rustls_pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(
        &self,
        name: &rustls_pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

/// Session resumption over QUIC uses the same ticket keys as TLS over TCP: a replica with the
/// same `ticket_keys` file resumes another's QUIC session; one without it does a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sessions_resume_across_replicas_sharing_ticket_keys() {
    use base64::Engine;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 80]);
    let replica = |keys: bool| {
        let (pki, b, key) = (&pki, &b, key.clone());
        async move {
            let dir = Proxy::dir();
            pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
            let extra = if keys {
                let path = dir.path().join("ticket-keys");
                std::fs::write(&path, format!("{key}\n")).unwrap();
                set_mode(&path, 0o600);
                "  ticket_keys: ./ticket-keys\n"
            } else {
                ""
            };
            let yaml = format!(
                "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  quic: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n{extra}routes:\n  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n",
                b.url()
            );
            Proxy::start_in(dir, &yaml).await
        }
    };
    let (first, second, lone) = (
        replica(true).await,
        replica(true).await,
        replica(false).await,
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(CountingVerifier {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap(),
        verified: AtomicU64::new(0),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let store = Arc::new(CountingStore {
        inner: rustls::client::ClientSessionMemoryCache::new(32),
        tickets: AtomicU64::new(0),
    });
    tls.resumption = rustls::client::Resumption::store(store.clone());
    let quic = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    // One request on each replica in turn, with the one client config (its session cache).
    let visit = |proxy: &Proxy| {
        let (addr, quic, store) = (quic_addr(proxy), quic.clone(), store.clone());
        async move {
            let tickets = store.tickets.load(Ordering::SeqCst);
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(quic);
            let conn = endpoint.connect(addr, HOST).unwrap().await.unwrap();
            let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
                .await
                .unwrap();
            let drive = tokio::spawn(async move {
                let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            });
            let req = http::Request::get(format!("https://{HOST}/"))
                .body(())
                .unwrap();
            let mut stream = send.send_request(req).await.unwrap();
            stream.finish().await.unwrap();
            let status = stream.recv_response().await.unwrap().status();
            while stream.recv_data().await.unwrap().is_some() {}
            // The server's session tickets come after the handshake: the next visit needs one.
            eventually(PATIENCE, "a session ticket arrives", || {
                let store = store.clone();
                async move { store.tickets.load(Ordering::SeqCst) > tickets }
            })
            .await;
            conn.close(0u32.into(), b"");
            drive.abort();
            status
        }
    };
    let verified = || verifier.verified.load(Ordering::SeqCst);
    assert_eq!(visit(&first).await, StatusCode::OK);
    assert_eq!(verified(), 1, "the first is a full handshake");
    assert_eq!(visit(&second).await, StatusCode::OK);
    assert_eq!(
        verified(),
        1,
        "the second replica resumed the first's session"
    );
    assert_eq!(visit(&lone).await, StatusCode::OK);
    assert_eq!(verified(), 2, "a replica without the keys cannot resume it");
}

/// Counts what goes each way between a QUIC client and limen, and can stop passing limen's
/// answers on: the client then looks like a spoofed source address, which never sees them.
struct UdpTap {
    addr: SocketAddr,
    to_server: Arc<AtomicU64>,
    from_server: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpTap {
    /// With `deaf`, nothing limen sends reaches the client.
    async fn start(server: SocketAddr, deaf: bool) -> UdpTap {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let (to_server, from_server) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (up, down) = (to_server.clone(), from_server.clone());
        let task = tokio::spawn(async move {
            // One back socket per client address, as a NAT would.
            let mut backs: std::collections::HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> =
                Default::default();
            let front = Arc::new(front);
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else {
                    return;
                };
                let back = match backs.get(&client) {
                    Some(b) => b.clone(),
                    None => {
                        let back =
                            Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        back.connect(server).await.unwrap();
                        let (front, back2, down) = (front.clone(), back.clone(), down.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = back2.recv(&mut buf).await {
                                down.fetch_add(n as u64, Ordering::SeqCst);
                                if !deaf {
                                    let _ = front.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        backs.insert(client, back.clone());
                        back
                    }
                };
                up.fetch_add(n as u64, Ordering::SeqCst);
                let _ = back.send(&buf[..n]).await;
            }
        });
        UdpTap {
            addr,
            to_server,
            from_server,
            task,
        }
    }
}

/// Connection attempts from addresses that never answer (spoofed sources) get one small Retry
/// packet each: limen sends less than it receives (far under QUIC's 3x amplification limit),
/// starts no handshake and holds no connection place; a real client behind the same path
/// proves its address and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_connection_attempts_get_a_retry_each_and_no_handshake() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, "limits: {max_connections: 4}", &route_all_to(&b)).await;
    let addr = quic_addr(&proxy);
    let deaf = UdpTap::start(addr, true).await;
    let mut attempts = Vec::new();
    for _ in 0..50 {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(h3_client_config(&pki.ca_der));
        let connecting = endpoint.connect(deaf.addr, HOST).unwrap();
        attempts.push((endpoint, tokio::spawn(connecting)));
    }
    // Every attempt's first Initial (at least 1200 bytes each) reaches limen.
    eventually(PATIENCE, "the attempts reach limen", || async {
        deaf.to_server.load(Ordering::SeqCst) >= 50 * 1200
    })
    .await;
    // Over the whole window the attempts retransmit, limen must never send more than it got,
    // nor open a connection for any of them.
    let open = |m: &str| metric(m, "limen_connections_open{protocol=\"h3\"}").unwrap_or(0.0);
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let (sent, got) = (
            deaf.from_server.load(Ordering::SeqCst),
            deaf.to_server.load(Ordering::SeqCst),
        );
        assert!(sent <= got, "limen sent {sent} bytes for {got} received");
        assert_eq!(open(&admin_get(proxy.admin(), "/metrics").await.1), 0.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, got) = (
        deaf.from_server.load(Ordering::SeqCst),
        deaf.to_server.load(Ordering::SeqCst),
    );
    assert!(sent > 0 && sent * 3 <= got, "{sent} bytes sent for {got}");
    for (endpoint, attempt) in attempts {
        attempt.abort();
        endpoint.close(0u32.into(), b"");
    }

    // A client that hears the Retry proves its address, within max_connections (4) even
    // after 50 attempts.
    let hearing = UdpTap::start(addr, false).await;
    let mut h3 = H3Conn::open(&pki, hearing.addr, HOST).await.unwrap();
    assert_eq!(h3.get(HOST, "/").await.unwrap().status, StatusCode::OK);
}

/// `limits.quic_max_streams` bounds the request streams a connection has open at once: past it
/// the client cannot open another (QUIC's stream credit) until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opens_no_more_streams_than_quic_max_streams() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, "limits: {quic_max_streams: 4}", &route_all_to(&b)).await;
    let (_e, conn) = raw_quic(&pki, quic_addr(&proxy)).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        // A stream exists for the server once a byte of it arrives: a HEADERS frame's type.
        send.write_all(&[0x01]).await.unwrap();
        open.push((send, recv));
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), conn.open_bi())
            .await
            .is_err(),
        "a fifth stream opened"
    );
    let (mut first, _) = open.remove(0);
    first.reset(0u32.into()).unwrap();
    tokio::time::timeout(PATIENCE, conn.open_bi())
        .await
        .expect("no stream credit after one ended")
        .unwrap();
}

/// The policy steps run over HTTP/3 as over TCP: an access list, basic auth, a rewrite, and a
/// rate limit whose bucket a client shares between its QUIC and its TCP connections (both come
/// from one address).
#[tokio::test]
async fn access_auth_rewrite_and_one_rate_limit_bucket_apply_over_http3_and_tcp_alike() {
    use base64::Engine;
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    std::fs::write(
        dir.path().join("users.htpasswd"),
        format!("alice:{}\n", bcrypt::hash("wonderland", 4).unwrap()),
    )
    .unwrap();
    let u = b.url();
    let routes = format!(
        "  - {{host: \"{HOST}\", path: /private, access: {{deny: [\"127.0.0.0/8\"]}}, upstreams: [\"{u}\"]}}\n  - {{host: \"{HOST}\", path: /admin, auth: {{basic: {{users_file: ./users.htpasswd}}}}, upstreams: [\"{u}\"]}}\n  - {{host: \"{HOST}\", path: /v1, rewrite: {{path_prefix: /api/v1}}, upstreams: [\"{u}\"]}}\n  - {{name: limited, host: \"{HOST}\", path: /limited, rate_limit: {{rate: 1/h, burst: 2}}, upstreams: [\"{u}\"]}}\n"
    );
    let proxy = Proxy::start_in(dir, &with_quic(config_yaml("", &routes))).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();

    assert_eq!(
        h3.get(HOST, "/private").await.unwrap().status,
        StatusCode::FORBIDDEN
    );
    let refused = h3.get(HOST, "/admin").await.unwrap();
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.headers.contains_key("www-authenticate"));
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:wonderland")
    );
    let got = h3
        .request(
            "GET",
            HOST,
            "/admin",
            &[("authorization", &basic)],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echo().header("x-forwarded-user"), Some("alice"));
    assert_eq!(
        h3.get(HOST, "/v1/users").await.unwrap().echo().path,
        "/api/v1/users"
    );

    // Two tokens: one spent over HTTP/3, one over TCP; the third request, over HTTP/3, is 429.
    assert_eq!(
        h3.get(HOST, "/limited").await.unwrap().status,
        StatusCode::OK
    );
    let tcp = Client::new(&pki).get(proxy.addr, HOST, "/limited").await;
    assert_eq!(tcp.status, StatusCode::OK);
    let limited = h3.get(HOST, "/limited").await.unwrap();
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));
    // Forwarded: the admitted /admin, /v1 and the two /limited.
    assert_eq!(b.requests.load(Ordering::SeqCst), 4);
}

/// A team's routes_dir file added at runtime is served over a QUIC connection already open (the
/// snapshot is the same for every protocol), and a broken edit of it changes nothing there.
#[tokio::test]
async fn a_routes_dir_file_added_at_runtime_is_served_over_an_open_quic_connection() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    std::fs::create_dir(dir.path().join("routes.d")).unwrap();
    let yaml = with_quic(config_yaml(
        "reload: {interval: 50ms}\nroutes_dir: ./routes.d",
        &format!("  - {{host: \"{HOST}\", path: /main, respond: {{}}}}\n"),
    ));
    let proxy = Proxy::start_in(dir, &yaml).await;
    let mut h3 = H3Conn::open(&pki, quic_addr(&proxy), HOST).await.unwrap();
    assert_eq!(
        h3.get(HOST, "/team").await.unwrap().status,
        StatusCode::NOT_FOUND
    );

    let file = proxy.path("routes.d/team.yaml");
    let gen = proxy.generation();
    write_atomic(
        &file,
        &format!(
            "routes:\n  - {{host: \"{HOST}\", path: /team, upstreams: [\"{}\"]}}\n",
            b.url()
        ),
    );
    eventually(PATIENCE, "the file's route is published", || async {
        proxy.generation() > gen
    })
    .await;
    let got = h3.get(HOST, "/team/x").await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.echo().path, "/team/x");

    let gen = proxy.generation();
    write_atomic(&file, "routes:\n  - {host: [broken\n");
    proxy.refused_with("team.yaml", PATIENCE).await;
    assert_eq!(proxy.generation(), gen);
    assert_eq!(
        h3.get(HOST, "/team/y").await.unwrap().status,
        StatusCode::OK
    );
}
