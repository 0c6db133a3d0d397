//! A user mounts certificates in a directory: limen finds them in every supported layout and picks
//! the right one for each handshake by SNI.

mod common;

use common::*;
use http::StatusCode;

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_default_and_refuses_unknown() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    pki.issue(&["app.example.test"]).write(&certs, "app");
    pki.issue(&["*.example.test"]).write(&certs, "wild");
    pki.issue(&["fallback.test"]).write(&certs, "fallback");
    let proxy = Proxy::start_in(dir, &config_yaml("", &route_all_to(&b))).await;
    let client = Client::new(&pki);

    assert_eq!(
        client
            .served_names(proxy.addr, "app.example.test")
            .await
            .unwrap(),
        ["app.example.test"]
    );
    assert_eq!(
        client
            .served_names(proxy.addr, "x.example.test")
            .await
            .unwrap(),
        ["*.example.test"]
    );
    assert!(
        client
            .served_names(proxy.addr, "nobody.test")
            .await
            .is_err(),
        "an unknown name without default_cert must be refused"
    );
    assert!(
        client
            .served_names(proxy.addr, "a.b.example.test")
            .await
            .is_err(),
        "a wildcard covers one label only"
    );

    // With a default, unknown names get it (the client then rejects it, as it should).
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    pki.issue(&["app.example.test"]).write(&certs, "app");
    pki.issue(&["fallback.test"]).write(&certs, "fallback");
    let proxy = Proxy::start_in(
        dir,
        &config_yaml("", &route_all_to(&b))
            .replace("tls:\n", "tls:\n  default_cert: fallback.test\n"),
    )
    .await;
    let tls = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let names = default_names(tls).await;
    assert_eq!(names, ["fallback.test"]);
}

/// Names presented to a client that sends no SNI (an IP address as server name).
async fn default_names(tcp: tokio::net::TcpStream) -> Vec<String> {
    let ip = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    // A client that records what it is shown instead of verifying it.
    let verifier = Recorder::default();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(verifier.clone()))
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let _ = connector.connect(ip, tcp).await;
    let der = verifier
        .0
        .lock()
        .unwrap()
        .clone()
        .expect("a certificate was presented");
    limen::tls::leaf_facts(&der).unwrap().0
}

#[derive(Debug, Default, Clone)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>);

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn every_directory_layout_is_found_including_kubernetes_symlinks() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    // NAME.crt + NAME.key, and NAME.pem + NAME.key
    pki.issue(&["plain.test"]).write(&certs, "plain");
    let pem = pki.issue(&["pem.test"]);
    std::fs::write(certs.join("pemfile.pem"), &pem.cert_pem).unwrap();
    std::fs::write(certs.join("pemfile.key"), &pem.key_pem).unwrap();
    // A sub-directory holding a Kubernetes TLS secret, laid out as kubelet does it.
    let secret = certs.join("secret-a");
    let data = secret.join("..2026_11_25_08_00_00.1");
    pki.issue(&["k8s.test"]).write(&data, "tls");
    std::os::unix::fs::symlink("..2026_11_25_08_00_00.1", secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    // Dot entries are not certificates, even when they hold a pair.
    pki.issue(&["hidden.test"])
        .write(&certs.join(".hidden"), "tls");
    // The cert dir itself as a secret: a second cert_dir.
    let own = dir.path().join("own");
    pki.issue(&["own.test"]).write(&own, "tls");
    let yaml = config_yaml("", &route_all_to(&b)).replace(
        "cert_dirs: [\"./certs\"]",
        "cert_dirs: [\"./certs\", \"./own\"]",
    );
    let proxy = Proxy::start_in(dir, &yaml).await;
    let client = Client::new(&pki);
    for name in ["plain.test", "pem.test", "k8s.test", "own.test"] {
        assert_eq!(client.served_names(proxy.addr, name).await.unwrap(), [name]);
        assert_eq!(
            client.get(proxy.addr, name, "/").await.status,
            StatusCode::OK
        );
    }
    assert!(client
        .served_names(proxy.addr, "hidden.test")
        .await
        .is_err());
    let snap = proxy.running().shared.snapshot.load();
    assert_eq!(snap.certs.certs().len(), 4);
}

#[tokio::test]
async fn two_certificates_for_one_name_serve_the_one_expiring_last() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    pki.issue_until(&["app.test", "old-only.test"], 2090)
        .write(&certs, "a-old");
    pki.issue_until(&["app.test", "new-only.test"], 2095)
        .write(&certs, "b-new");
    pki.issue_until(&["app.test", "older.test"], 2080)
        .write(&certs, "c-older");
    let proxy = Proxy::start_in(dir, &config_yaml("", &route_all_to(&b))).await;
    let client = Client::new(&pki);
    assert_eq!(
        client.served_names(proxy.addr, "app.test").await.unwrap(),
        ["app.test", "new-only.test"]
    );
}

#[tokio::test]
async fn an_expired_certificate_is_still_loaded() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let dir = Proxy::dir();
    pki.issue_until(&["expired.test"], 2021)
        .write(&dir.path().join("certs"), "expired");
    let proxy = Proxy::start_in(dir, &config_yaml("", &route_all_to(&b))).await;
    let snap = proxy.running().shared.snapshot.load();
    assert_eq!(snap.certs.certs().len(), 1);
    assert!(snap.certs.find("expired.test").is_some());
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_is_reported_naming_both_files() {
    let pki = Pki::new();
    let dir = Proxy::dir();
    let certs = dir.path().join("certs");
    let a = pki.issue(&["a.test"]);
    let b = pki.issue(&["b.test"]);
    std::fs::write(certs.join("a.crt"), &a.cert_pem).unwrap();
    std::fs::write(certs.join("a.key"), &b.key_pem).unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_yaml("", "  - {host: a.test, respond: {}}\n")).unwrap();
    let err = match limen::server::start(&path).await {
        Ok(_) => panic!("a mismatched pair must not start"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("a.key") && err.contains("a.crt"), "{err}");
    assert!(err.contains("does not belong"), "{err}");
}

#[tokio::test]
async fn self_signed_development_mode_covers_route_hosts() {
    let dir = Proxy::dir();
    let yaml = "listen: {https: \"127.0.0.1:0\"}\ntls: {cert_dirs: [./certs], self_signed: true}\nroutes:\n  - {host: dev.test, respond: {body: dev}}\n  - {host: \"*\", respond: {body: any}}\n";
    let proxy = Proxy::start_in(dir, yaml).await;
    let snap = proxy.running().shared.snapshot.load();
    let names: Vec<String> = snap
        .certs
        .certs()
        .iter()
        .flat_map(|c| c.names.clone())
        .collect();
    assert!(names.contains(&"dev.test".to_string()), "{names:?}");
    assert!(names.contains(&"localhost".to_string()), "{names:?}");
    assert!(
        snap.certs.default_cert().is_some(),
        "the generated cert is the default"
    );
}
