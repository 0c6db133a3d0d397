//! Client certificates per host (`tls.client_auth`): a host that requires one refuses clients
//! without a valid one at the handshake, says why in its metrics, forwards the verified one
//! (RFC 9440), never lets a client forge it, cannot be reached over another host's connection,
//! and follows its CA bundle on disk.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::*;
use http::StatusCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const ADMIN: &str = "admin.example.test";
const OPT: &str = "opt.example.test";
const APP: &str = "app.example.test";

fn der_of(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A client config trusting the server's CA, with `identity` as its certificate if given.
fn client(
    server_ca: &Pki,
    identity: Option<&Issued>,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.ca_der.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => b
            .with_client_auth_cert(
                vec![der_of(&id.cert_pem)],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One GET with this SNI and Host: the status and the backend's echo, or why it failed.
async fn get(
    cfg: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    sni: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Option<Echo>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::get("/who").header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    // Under TLS 1.3 a refused certificate shows at the first read, as the alert.
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, serde_json::from_slice(&body).ok()))
}

fn b64(der: &CertificateDer<'_>) -> String {
    format!(
        ":{}:",
        base64::engine::general_purpose::STANDARD.encode(der)
    )
}

#[tokio::test]
async fn hosts_that_require_a_client_certificate_get_one_or_refuse_the_handshake() {
    let pki = Pki::new();
    let clients = Pki::named("clients CA");
    let strangers = Pki::named("strangers CA");
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    // One certificate covers all three names: the no-bypass rule must not lean on SNI coverage.
    pki.issue(&["*.example.test"])
        .write(&dir.path().join("certs"), "site");
    std::fs::write(dir.path().join("clients-ca.pem"), &clients.ca_pem).unwrap();
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n  client_auth:\n    - {{hosts: [\"{ADMIN}\"], ca: ./clients-ca.pem, mode: require, forward: true}}\n    - {{hosts: [\"{OPT}\"], ca: ./clients-ca.pem, mode: optional, forward: true}}\nreload:\n  interval: 50ms\nroutes:\n  - {{host: \"*\", upstreams: [\"{}\"]}}\n",
        b.url()
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let good = clients.issue(&["alice"]);
    let expired = clients.issue_expiring(&["bob"], (2021, 1, 1));
    let server_only = clients.issue_with(
        &["carol"],
        (2099, 1, 1),
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
    );
    let stranger = strangers.issue(&["mallory"]);

    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // A valid certificate: served, and forwarded as RFC 9440's byte sequence.
        let cfg = client(&pki, Some(&good), version);
        let (status, echo) = get(&cfg, proxy.addr, ADMIN, ADMIN, &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{version:?}");
        let echo = echo.unwrap();
        assert_eq!(
            echo.header("client-cert"),
            Some(b64(&der_of(&good.cert_pem)).as_str())
        );
        assert!(
            echo.header("client-cert-chain").is_none(),
            "only the leaf was sent"
        );
        // Without one, with an expired one, one from another CA, one not for clients: refused.
        for (who, id) in [
            ("none", None),
            ("expired", Some(&expired)),
            ("stranger", Some(&stranger)),
            ("server-only", Some(&server_only)),
        ] {
            let cfg = client(&pki, id, version);
            let got = get(&cfg, proxy.addr, ADMIN, ADMIN, &[]).await;
            assert!(got.is_err(), "{version:?} {who}: {got:?}");
        }
        // optional: no certificate is fine (and no Client-Cert), a valid one is forwarded.
        let (status, echo) = get(&client(&pki, None, version), proxy.addr, OPT, OPT, &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(echo.unwrap().header("client-cert").is_none());
        let (_, echo) = get(
            &client(&pki, Some(&good), version),
            proxy.addr,
            OPT,
            OPT,
            &[],
        )
        .await
        .unwrap();
        assert!(echo.unwrap().header("client-cert").is_some());
    }
    let m = admin_get(proxy.admin(), "/metrics").await.1;
    for reason in ["missing", "expired", "unknown_ca", "invalid"] {
        let line =
            format!("limen_tls_client_auth_failures_total{{host=\"{ADMIN}\",reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &line), Some(2.0), "{reason}: {m}");
    }

    // No bypass: admin's Host over app's connection (the certificate covers both) is 421, even
    // with a valid client certificate on that connection.
    for id in [None, Some(&good)] {
        let cfg = client(&pki, id, &rustls::version::TLS13);
        let (status, _) = get(&cfg, proxy.addr, APP, ADMIN, &[]).await.unwrap();
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    }
    // Over HTTP/1.1 that connection can never serve admin: it is closed after the 421.
    let mut h1 = Client::new(&pki).open(proxy.addr, APP, Proto::H1).await;
    let refused = h1.get(ADMIN, "/").await.unwrap();
    assert_eq!(refused.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(refused.headers["connection"], "close");
    // HTTP/2 coalescing: a browser reuses app's connection for admin (the certificate covers
    // both); admin answers 421, so it opens one of its own.
    let mut h2 = Client::new(&pki).open(proxy.addr, APP, Proto::H2).await;
    assert_eq!(h2.get(APP, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(
        h2.get(ADMIN, "/").await.unwrap().status,
        StatusCode::MISDIRECTED_REQUEST
    );
    // A client's own Client-Cert never passes: not on a host without a policy, not on optional
    // without a certificate.
    let forged = [("client-cert", ":Zm9v:"), ("client-cert-chain", ":Zm9v:")];
    for host in [APP, OPT] {
        let cfg = client(&pki, None, &rustls::version::TLS13);
        let (_, echo) = get(&cfg, proxy.addr, host, host, &forged).await.unwrap();
        let echo = echo.unwrap();
        assert!(echo.header("client-cert").is_none(), "{host}");
        assert!(echo.header("client-cert-chain").is_none(), "{host}");
    }

    // A connection verified under the current bundle, kept open across the rotation below.
    let kept = {
        let cfg = client(&pki, Some(&good), &rustls::version::TLS13);
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(ADMIN).unwrap(), tcp)
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    };
    let mut kept = Conn::H1(kept);
    assert_eq!(
        kept.get(ADMIN, "/kept").await.unwrap().status,
        StatusCode::OK
    );

    // The CA bundle rotated: the new CA's clients get in, the old one's no longer do.
    let next = Pki::named("next clients CA");
    write_atomic(&proxy.dir.path().join("clients-ca.pem"), &next.ca_pem);
    let newcomer = next.issue(&["dave"]);
    eventually(
        Duration::from_secs(10),
        "the new CA is in force",
        || async {
            let cfg = client(&pki, Some(&newcomer), &rustls::version::TLS13);
            get(&cfg, proxy.addr, ADMIN, ADMIN, &[]).await.is_ok()
        },
    )
    .await;
    let old = client(&pki, Some(&good), &rustls::version::TLS13);
    assert!(get(&old, proxy.addr, ADMIN, ADMIN, &[]).await.is_err());
    // Nor on the connection that stayed open: verified by a CA no longer trusted.
    assert_eq!(
        kept.get(ADMIN, "/kept").await.unwrap().status,
        StatusCode::MISDIRECTED_REQUEST
    );
    let m = admin_get(proxy.admin(), "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "limen_reloads_total{kind=\"client_ca\",result=\"success\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // A broken bundle keeps the last good one.
    write_atomic(
        &proxy.dir.path().join("clients-ca.pem"),
        "not a certificate\n",
    );
    eventually(
        Duration::from_secs(10),
        "the failure is counted",
        || async {
            let m = admin_get(proxy.admin(), "/metrics").await.1;
            metric(
                &m,
                "limen_reloads_total{kind=\"client_ca\",result=\"failure\"}",
            ) == Some(1.0)
        },
    )
    .await;
    let cfg = client(&pki, Some(&newcomer), &rustls::version::TLS13);
    assert!(get(&cfg, proxy.addr, ADMIN, ADMIN, &[]).await.is_ok());
}
