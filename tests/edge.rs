//! limen at the edge: per-route header edits, the admin API behind a token, PROXY protocol from
//! the load balancers allowed to send it.

mod common;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";

#[tokio::test]
async fn a_routes_header_edits_apply_both_ways_and_to_limens_own_errors() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let (dead, _held) = refused_port();
    let edits = "headers: {request: {set: {x-env: prod}, remove: [x-debug]}, response: {set: {strict-transport-security: max-age=31536000}, remove: [content-type, x-hop]}}";
    let routes = format!(
        "  - {{host: \"{HOST}\", upstreams: [\"{}\"], {edits}}}\n  - {{host: \"{HOST}\", path: /down, upstreams: [\"http://{dead}\"], {edits}}}\n  - {{host: \"{HOST}\", path: /plain, upstreams: [\"{}\"]}}\n",
        b.url(),
        b.url()
    );
    let proxy = Proxy::start(&pki, &[HOST], "limits:\n  max_body_bytes: 1000", &routes).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let mut req = conn.request("GET", HOST, "/x", body(""));
        req.headers_mut().insert("x-debug", "1".parse().unwrap());
        req.headers_mut().insert("x-env", "dev".parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{proto:?}");
        let echo = got.echo();
        assert_eq!(
            echo.header("x-env"),
            Some("prod"),
            "{proto:?}: set replaces"
        );
        assert_eq!(echo.headers.get("x-env").map(Vec::len), Some(1));
        assert!(echo.header("x-debug").is_none(), "{proto:?}: removed");
        assert_eq!(
            got.headers["strict-transport-security"], "max-age=31536000",
            "{proto:?}"
        );
        assert!(!got.headers.contains_key("content-type"), "{proto:?}");

        // limen's own 502 on that route carries the route's response edits too.
        let down = conn.get(HOST, "/down").await.unwrap();
        assert_eq!(down.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            down.headers["strict-transport-security"],
            "max-age=31536000"
        );
        assert!(!down.headers.contains_key("content-type"));

        // So does a 413 for a declared body over the limit: the route was matched first.
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let big = conn.request("POST", HOST, "/x", body("x".repeat(2000)));
        let refused = conn.fetch(big).await.unwrap();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE, "{proto:?}");
        assert_eq!(
            refused.headers["strict-transport-security"],
            "max-age=31536000"
        );
        let mut conn = client.open(proxy.addr, HOST, proto).await;

        // Another route is untouched.
        let plain = conn.get(HOST, "/plain").await.unwrap();
        assert!(!plain.headers.contains_key("strict-transport-security"));
        assert_eq!(plain.echo().header("x-env"), None);
    }
}

/// Writes a secret file readable by its owner only, by rename (as a Secret volume update does).
fn write_secret(path: &std::path::Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_admin_api_wants_the_token_and_follows_its_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Proxy::dir();
    let token = dir.path().join("admin-token");
    write_secret(&token, "s3cret-one\n");
    let yaml = "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  admin_token_file: ./admin-token\ntls:\n  self_signed: true\nreload:\n  interval: 50ms\nroutes:\n  - {host: \"*\", respond: {}}\n";
    let proxy = Proxy::start_in(dir, yaml).await;
    let admin = proxy.admin();
    for path in ["/metrics", "/status.json", "/"] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic czNjcmV0LW9uZQ=="),
            Some("Bearer s3cret-on"),
        ] {
            let (status, headers, body) = admin_get_with(admin, path, auth).await;
            assert_eq!(status, 401, "{path} {auth:?}");
            assert_eq!(headers["www-authenticate"], "Bearer");
            assert!(body.is_empty(), "nothing else in the body: {body}");
        }
        let (status, _, _) = admin_get_with(admin, path, Some("Bearer s3cret-one")).await;
        assert_eq!(status, 200, "{path}");
    }
    // Probes need no token: kubelet sends none.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(admin_get(admin, path).await.0, 200, "{path}");
    }

    // Rotated: the new token works, the old one no longer does.
    write_secret(&proxy.dir.path().join("admin-token"), "s3cret-two");
    eventually(
        std::time::Duration::from_secs(5),
        "the new token is in force",
        || async {
            admin_get_with(admin, "/metrics", Some("Bearer s3cret-two"))
                .await
                .0
                == 200
        },
    )
    .await;
    assert_eq!(
        admin_get_with(admin, "/metrics", Some("Bearer s3cret-one"))
            .await
            .0,
        401
    );

    // A world-readable file is refused; the last good token stays.
    let path = proxy.dir.path().join("admin-token");
    write_secret(&path, "s3cret-three");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    eventually(
        std::time::Duration::from_secs(5),
        "the refusal is counted",
        || async {
            let (_, _, m) = admin_get_with(admin, "/metrics", Some("Bearer s3cret-two")).await;
            metric(
                &m,
                "limen_reloads_total{kind=\"admin_token\",result=\"failure\"}",
            ) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        admin_get_with(admin, "/metrics", Some("Bearer s3cret-three"))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn limen_does_not_start_with_a_token_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Proxy::dir();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "t").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  admin_token_file: ./admin-token\ntls:\n  self_signed: true\nroutes:\n  - {host: \"*\", respond: {}}\n").unwrap();
    let err = limen::server::start(&config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("admin-token") && err.contains("chmod o-r"),
        "{err}"
    );
}

/// A PROXY v2 header for a TCP4 client `src` talking to 10.0.0.1:443.
fn proxy_v2(src: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&[10, 0, 0, 1]);
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[tokio::test]
async fn a_proxy_protocol_header_from_an_allowed_balancer_names_the_client() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    // The balancer is 127.0.0.2; 127.0.0.1 connects directly.
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  proxy_protocol: {{from: [\"127.0.0.2/32\"]}}\ntls:\n  cert_dirs: [\"./certs\"]\ntimeouts:\n  handshake: 300ms\nroutes:\n  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n",
        b.url()
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);
    let balancer: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let direct: std::net::IpAddr = "127.0.0.1".parse().unwrap();

    for (preface, client_ip) in [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec(),
            "203.0.113.7",
        ),
        (
            proxy_v2("198.51.100.9:4000".parse().unwrap()),
            "198.51.100.9",
        ),
    ] {
        let mut conn = client
            .open_after(balancer, proxy.addr, HOST, &preface)
            .await
            .unwrap();
        let got = conn.get(HOST, "/who").await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        let echo = got.echo();
        assert_eq!(echo.header("x-forwarded-for"), Some(client_ip));
        assert!(
            echo.header("forwarded")
                .unwrap()
                .contains(&format!("for={client_ip}")),
            "{:?}",
            echo.header("forwarded")
        );
    }

    // The balancer without a header: closed (the TLS handshake never gets an answer).
    assert!(client
        .open_after(balancer, proxy.addr, HOST, b"")
        .await
        .is_err());
    // A broken header (TLS right after half of it): closed.
    assert!(client
        .open_after(balancer, proxy.addr, HOST, b"PROXY TCP4 ")
        .await
        .is_err());
    // Half a header, then silence: closed at timeouts.handshake (300 ms).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(balancer, 0)).unwrap();
        let mut tcp = socket.connect(proxy.addr).await.unwrap();
        tcp.write_all(b"PROXY TCP4 203.0.113.7").await.unwrap();
        let began = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("closed before 5 s");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        let took = began.elapsed();
        assert!(
            took >= std::time::Duration::from_millis(250)
                && took < std::time::Duration::from_secs(3),
            "closed after {took:?}"
        );
    }
    // One budget for the header and the handshake together: a header that takes 200 ms leaves
    // the TLS handshake 100 ms of the 300, so a handshake begun at 400 ms from accept is too
    // late (each used to get the whole 300 ms).
    {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(balancer, 0)).unwrap();
        let mut tcp = socket.connect(proxy.addr).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        tcp.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let connector = tokio_rustls::TlsConnector::from(client.config(Proto::H1));
        let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
        let handshake = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connector.connect(name, tcp),
        )
        .await
        .expect("over before 5 s");
        assert!(
            handshake.is_err(),
            "the handshake began after the one budget ran out"
        );
    }
    // A direct client's header is not read: it is not TLS, so the handshake fails; without one
    // it is served, with its own address.
    let spoof = b"PROXY TCP4 192.0.2.1 10.0.0.1 1 443\r\n";
    assert!(client
        .open_after(direct, proxy.addr, HOST, spoof)
        .await
        .is_err());
    let mut conn = client
        .open_after(direct, proxy.addr, HOST, b"")
        .await
        .unwrap();
    let echo = conn.get(HOST, "/who").await.unwrap().echo();
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));

    let m = admin_get(proxy.admin(), "/metrics").await.1;
    for reason in ["missing", "malformed", "timeout"] {
        assert_eq!(
            metric(
                &m,
                &format!("limen_proxy_protocol_failures_total{{reason=\"{reason}\"}}")
            ),
            Some(1.0),
            "{reason}: {m}"
        );
    }
}

#[tokio::test]
async fn replicas_with_the_same_ticket_keys_resume_each_others_sessions() {
    use base64::Engine;
    let pki = Pki::new();
    let key = |seed: u8| base64::engine::general_purpose::STANDARD.encode([seed; 80]);
    let start = |keys: Option<String>| {
        let pki = &pki;
        async move {
            let dir = Proxy::dir();
            pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
            let extra = match keys {
                Some(k) => {
                    write_secret(&dir.path().join("ticket-keys"), &k);
                    "  ticket_keys: ./ticket-keys\n"
                }
                None => "",
            };
            let yaml = format!(
                "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n{extra}reload:\n  interval: 50ms\nroutes:\n  - {{host: \"{HOST}\", respond: {{}}}}\n"
            );
            Proxy::start_in(dir, &yaml).await
        }
    };
    let shared = format!("# rotated by a CronJob\n{}\n", key(1));
    let a = start(Some(shared.clone())).await;
    let b = start(Some(shared)).await;
    let lone = start(None).await;
    let client = Client::new(&pki);
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let cfg = client.config_with(versions);
        assert!(
            !resumes(&cfg, HOST, a.addr).await,
            "{versions:?}: the first is a full handshake"
        );
        assert!(
            resumes(&cfg, HOST, b.addr).await,
            "{versions:?}: b resumes a's session"
        );
        assert!(
            resumes(&cfg, HOST, a.addr).await,
            "{versions:?}: and a resumes b's"
        );
        assert!(
            !resumes(&cfg, HOST, lone.addr).await,
            "{versions:?}: a replica without the keys cannot"
        );
    }

    // b's file rotated to a key a does not have: a's tickets mean a full handshake there, and
    // b's new tickets resume on b.
    write_secret(&b.dir.path().join("ticket-keys"), &key(2));
    let cfg = client.config_with(&[&rustls::version::TLS13]);
    eventually(
        std::time::Duration::from_secs(5),
        "b uses its new key",
        || async {
            // A fresh ticket from a (key 1), then b: resumed until b has dropped key 1.
            resumes(&cfg, HOST, a.addr).await;
            !resumes(&cfg, HOST, b.addr).await
        },
    )
    .await;
    assert!(
        resumes(&cfg, HOST, b.addr).await,
        "b's own new tickets resume"
    );

    // A broken file keeps the last good keys, counted as a failed reload.
    write_secret(&b.dir.path().join("ticket-keys"), "not base64!");
    eventually(
        std::time::Duration::from_secs(5),
        "the failure is counted",
        || async {
            let m = admin_get(b.admin(), "/metrics").await.1;
            metric(
                &m,
                "limen_reloads_total{kind=\"ticket_keys\",result=\"failure\"}",
            ) == Some(1.0)
        },
    )
    .await;
    assert!(
        resumes(&cfg, HOST, b.addr).await,
        "the last good keys still resume"
    );
}
