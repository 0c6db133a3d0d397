//! `https://` upstreams: limen verifies them against the route's CA bundle and name (or an IP
//! URL against IP SANs), authenticates itself with a client certificate when asked, speaks
//! HTTP/2 or HTTP/1.1 as ALPN and `upstream_protocol` say, and follows a rotated CA bundle
//! without a restart while a broken one keeps the last good.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";
const FAST: &str = "reload:\n  interval: 50ms";

/// A proxy whose one route sends everything to `upstream` with `tls` (YAML flow mapping items
/// of `upstream_tls`, or "" for none) and `protocol` (or "" for auto).
async fn proxy_to(
    pki: &Pki,
    upstream: &str,
    tls: &str,
    protocol: &str,
    files: &[(&str, &str)],
) -> Proxy {
    let dir = Proxy::dir();
    pki.issue(&[HOST]).write(&dir.path().join("certs"), "site");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
        set_mode(&dir.path().join(name), 0o600);
    }
    let mut route = format!("  - host: \"*\"\n    upstreams: [\"{upstream}\"]\n");
    if !tls.is_empty() {
        route.push_str(&format!("    upstream_tls: {{{tls}}}\n"));
    }
    if !protocol.is_empty() {
        route.push_str(&format!("    upstream_protocol: {protocol}\n"));
    }
    Proxy::start_in(dir, &config_yaml(FAST, &route)).await
}

async fn backend_seen(client: &Client, proxy: &Proxy) -> (StatusCode, String) {
    let got = client.get(proxy.addr, HOST, "/who").await;
    let who = if got.status == StatusCode::OK {
        got.echo().backend
    } else {
        got.text()
    };
    (got.status, who)
}

#[tokio::test]
async fn https_upstreams_are_verified_by_the_route_ca_and_speak_what_alpn_and_the_config_say() {
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let backend =
        TlsBackend::start(&upstream_pki, &["api.internal"], &["h2", "http/1.1"], None).await;
    let client = Client::new(&pki);
    let files = [("upstream-ca.pem", upstream_pki.ca_pem.as_str())];
    for (protocol, expect) in [
        ("", "tls h2 sni=api.internal client=no"),
        ("http1", "tls http/1.1 sni=api.internal client=no"),
        ("h2", "tls h2 sni=api.internal client=no"),
    ] {
        let proxy = proxy_to(
            &pki,
            &backend.url(),
            "ca: ./upstream-ca.pem, server_name: api.internal",
            protocol,
            &files,
        )
        .await;
        let (status, who) = backend_seen(&client, &proxy).await;
        assert_eq!(status, StatusCode::OK, "{protocol:?}: {who}");
        assert_eq!(who, expect, "{protocol:?}");
    }
}

#[tokio::test]
async fn a_wrong_ca_or_name_is_a_502_counted_as_a_tls_error() {
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let other = Pki::new();
    let backend =
        TlsBackend::start(&upstream_pki, &["api.internal"], &["h2", "http/1.1"], None).await;
    let client = Client::new(&pki);
    for (ca, name) in [
        (other.ca_pem.as_str(), "api.internal"),
        (upstream_pki.ca_pem.as_str(), "wrong.internal"),
    ] {
        let proxy = proxy_to(
            &pki,
            &backend.url(),
            &format!("ca: ./upstream-ca.pem, server_name: {name}"),
            "",
            &[("upstream-ca.pem", ca)],
        )
        .await;
        let (status, text) = backend_seen(&client, &proxy).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
        assert!(
            !text.contains("issuer") && !text.contains("127.0.0.1"),
            "{text}"
        );
        let (_, metrics) = admin_get(proxy.admin(), "/metrics").await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("limen_upstream_requests_total")
                    && l.contains("result=\"tls_error\"")
                    && l.contains("https://")),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn an_ip_url_is_verified_against_ip_sans_and_insecure_skip_verify_skips() {
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let by_ip = TlsBackend::start(&upstream_pki, &["127.0.0.1"], &["http/1.1"], None).await;
    let client = Client::new(&pki);
    let files = [("upstream-ca.pem", upstream_pki.ca_pem.as_str())];
    let proxy = proxy_to(&pki, &by_ip.url(), "ca: ./upstream-ca.pem", "", &files).await;
    let (status, who) = backend_seen(&client, &proxy).await;
    assert_eq!(status, StatusCode::OK, "{who}");
    assert!(who.starts_with("tls http/1.1"), "{who}");

    let unknown = TlsBackend::start(&Pki::new(), &["nobody.internal"], &["h2"], None).await;
    let proxy = proxy_to(&pki, &unknown.url(), "insecure_skip_verify: true", "", &[]).await;
    let (status, who) = backend_seen(&client, &proxy).await;
    assert_eq!(status, StatusCode::OK, "{who}");
}

#[tokio::test]
async fn mtls_to_an_upstream_that_requires_a_client_certificate() {
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let clients_ca = Pki::new();
    let backend =
        TlsBackend::start(&upstream_pki, &["api.internal"], &["h2"], Some(&clients_ca)).await;
    let client = Client::new(&pki);
    let ours = clients_ca.issue(&["limen.internal"]);
    let files = [
        ("upstream-ca.pem", upstream_pki.ca_pem.as_str()),
        ("client.crt", ours.cert_pem.as_str()),
        ("client.key", ours.key_pem.as_str()),
    ];
    let proxy = proxy_to(
        &pki,
        &backend.url(),
        "ca: ./upstream-ca.pem, server_name: api.internal",
        "",
        &files,
    )
    .await;
    let (status, _) = backend_seen(&client, &proxy).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "no client certificate, no entry"
    );
    let proxy = proxy_to(
        &pki,
        &backend.url(),
        "ca: ./upstream-ca.pem, server_name: api.internal, client_cert: ./client.crt, client_key: ./client.key",
        "",
        &files,
    )
    .await;
    let (status, who) = backend_seen(&client, &proxy).await;
    assert_eq!(status, StatusCode::OK, "{who}");
    assert!(who.ends_with("client=yes"), "{who}");
}

#[tokio::test]
async fn a_rotated_upstream_ca_is_picked_up_and_a_broken_one_keeps_the_last_good() {
    let pki = Pki::new();
    let old_pki = Pki::new();
    let new_pki = Pki::new();
    let backend = TlsBackend::start(&new_pki, &["api.internal"], &["h2"], None).await;
    let client = Client::new(&pki);
    let proxy = proxy_to(
        &pki,
        &backend.url(),
        "ca: ./upstream-ca.pem, server_name: api.internal",
        "",
        &[("upstream-ca.pem", old_pki.ca_pem.as_str())],
    )
    .await;
    assert_eq!(
        backend_seen(&client, &proxy).await.0,
        StatusCode::BAD_GATEWAY
    );

    // The upstream moved to a new CA; the bundle is rotated on disk, as a Secret update does.
    let ca = proxy.path("upstream-ca.pem");
    write_atomic(&ca, &new_pki.ca_pem);
    eventually(Duration::from_secs(5), "the rotated CA is used", || async {
        backend_seen(&client, &proxy).await.0 == StatusCode::OK
    })
    .await;

    // A broken bundle: reported, and the last good one stays in use.
    write_atomic(&ca, "-----BEGIN CERTIFICATE-----\nbroken\n");
    eventually(
        Duration::from_secs(5),
        "the broken bundle is reported",
        || async {
            proxy
                .status()
                .certs
                .errors
                .iter()
                .any(|e| e.contains("upstream-ca.pem"))
        },
    )
    .await;
    assert_eq!(backend_seen(&client, &proxy).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_config_edit_whose_upstream_tls_does_not_load_is_refused_and_the_old_routes_stay() {
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let backend = TlsBackend::start(&upstream_pki, &["api.internal"], &["h2"], None).await;
    let client = Client::new(&pki);
    let proxy = proxy_to(
        &pki,
        &backend.url(),
        "ca: ./upstream-ca.pem, server_name: api.internal",
        "",
        &[("upstream-ca.pem", upstream_pki.ca_pem.as_str())],
    )
    .await;
    assert_eq!(backend_seen(&client, &proxy).await.0, StatusCode::OK);
    let gen = proxy.generation();
    let edited = config_yaml(
        FAST,
        &format!(
            "  - host: \"*\"\n    upstreams: [\"{}\"]\n    upstream_tls: {{ca: ./missing-ca.pem, server_name: api.internal}}\n",
            backend.url()
        ),
    );
    write_atomic(&proxy.config_path, &edited);
    eventually(Duration::from_secs(5), "the edit is refused", || async {
        proxy
            .status()
            .config
            .errors
            .iter()
            .any(|e| e.contains("upstream_tls settings did not load"))
    })
    .await;
    assert_eq!(proxy.generation(), gen, "nothing was published");
    assert_eq!(backend_seen(&client, &proxy).await.0, StatusCode::OK);
}

/// Post-quantum key exchange is preferred on both sides of limen: a client offering the
/// X25519MLKEM768 hybrid first (as browsers do) or only it gets it, one offering only X25519 still
/// connects with X25519, and limen's own connections to `https://` upstreams offer the hybrid
/// first, so an upstream that supports it negotiates it (rustls without `prefer-post-quantum`
/// put it last, with an X25519 key share only: X25519 every time).
#[tokio::test]
async fn the_post_quantum_hybrid_key_exchange_is_preferred_on_both_sides() {
    use rustls::crypto::aws_lc_rs::kx_group;
    use rustls::NamedGroup;
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let backend = TlsBackend::start(&upstream_pki, &["api.internal"], &["http/1.1"], None).await;
    let files = [("upstream-ca.pem", upstream_pki.ca_pem.as_str())];
    let proxy = proxy_to(
        &pki,
        &backend.url(),
        "ca: ./upstream-ca.pem, server_name: api.internal",
        "",
        &files,
    )
    .await;
    let client = Client::new(&pki);
    let (status, _) = backend_seen(&client, &proxy).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        backend.groups.lock().unwrap().first().map(String::as_str),
        Some("X25519MLKEM768"),
        "limen's upstream handshake"
    );

    for (groups, expect) in [
        (vec![kx_group::X25519MLKEM768], NamedGroup::X25519MLKEM768),
        (vec![kx_group::X25519], NamedGroup::X25519),
        (
            vec![kx_group::X25519MLKEM768, kx_group::X25519],
            NamedGroup::X25519MLKEM768,
        ),
    ] {
        let got = handshake_group(&pki, &proxy, groups).await;
        assert_eq!(got.ok(), Some(expect));
    }
}

/// The group a client offering only `groups` (in that order) negotiates with limen.
async fn handshake_group(
    pki: &Pki,
    proxy: &Proxy,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Result<rustls::NamedGroup, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: groups,
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await?;
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    let tls = connector.connect(name, tcp).await?;
    let group = tls.get_ref().1.negotiated_key_exchange_group();
    Ok(group
        .map(|g| g.name())
        .expect("TLS 1.3 always negotiates a group"))
}

const PATIENCE: Duration = Duration::from_secs(5);

/// `tls.post_quantum: false` and `upstream_tls.post_quantum: false` take the hybrid out, on a
/// reload: a client offering it and X25519 gets X25519, one offering only the hybrid is refused,
/// and limen's next upstream handshake uses X25519. `limen_tls_key_exchanges_total` counts each
/// group the listener negotiated; turned back on, the hybrid is preferred again.
#[tokio::test]
async fn post_quantum_key_exchange_can_be_turned_off_and_on_at_runtime_on_each_side() {
    use rustls::crypto::aws_lc_rs::kx_group;
    use rustls::NamedGroup;
    let pki = Pki::new();
    let upstream_pki = Pki::new();
    let backend = TlsBackend::start(&upstream_pki, &["api.internal"], &["http/1.1"], None).await;
    let files = [("upstream-ca.pem", upstream_pki.ca_pem.as_str())];
    let upstream_tls = "ca: ./upstream-ca.pem, server_name: api.internal";
    let proxy = proxy_to(&pki, &backend.url(), upstream_tls, "", &files).await;
    let client = Client::new(&pki);
    let both = || vec![kx_group::X25519MLKEM768, kx_group::X25519];
    let last_upstream_group = || backend.groups.lock().unwrap().last().cloned();
    let counted = |group: &str| {
        let text = proxy.running().shared.metrics.encode();
        metric(
            &text,
            &format!("limen_tls_key_exchanges_total{{group=\"{group}\"}}"),
        )
        .unwrap_or(0.0)
    };

    assert_eq!(backend_seen(&client, &proxy).await.0, StatusCode::OK);
    assert_eq!(last_upstream_group().as_deref(), Some("X25519MLKEM768"));
    eventually(PATIENCE, "the client's handshake is counted", || async {
        counted("X25519MLKEM768") >= 1.0
    })
    .await;
    let hybrid_before = counted("X25519MLKEM768");
    assert_eq!(
        handshake_group(&pki, &proxy, both()).await.ok(),
        Some(NamedGroup::X25519MLKEM768)
    );
    eventually(PATIENCE, "the hybrid handshake is counted", || async {
        counted("X25519MLKEM768") == hybrid_before + 1.0
    })
    .await;

    // Off on both sides.
    let route = |pq: &str| {
        format!(
            "  - host: \"*\"\n    upstreams: [\"{}\"]\n    upstream_tls: {{{upstream_tls}{pq}}}\n",
            backend.url()
        )
    };
    proxy
        .reconfigure(
            &config_yaml(
                &format!("  post_quantum: false\n{FAST}"),
                &route(", post_quantum: false"),
            ),
            Duration::from_secs(10),
        )
        .await;
    let x25519_before = counted("X25519");
    assert_eq!(
        handshake_group(&pki, &proxy, both()).await.ok(),
        Some(NamedGroup::X25519)
    );
    eventually(PATIENCE, "the X25519 handshake is counted", || async {
        counted("X25519") == x25519_before + 1.0
    })
    .await;
    assert!(
        handshake_group(&pki, &proxy, vec![kx_group::X25519MLKEM768])
            .await
            .is_err(),
        "a client that offers only the hybrid finds no common group"
    );
    assert_eq!(backend_seen(&client, &proxy).await.0, StatusCode::OK);
    assert_eq!(
        last_upstream_group().as_deref(),
        Some("X25519"),
        "the changed upstream_tls block is a new client config, so a new upstream connection"
    );

    // On again: the defaults.
    proxy
        .reconfigure(&config_yaml(FAST, &route("")), Duration::from_secs(10))
        .await;
    assert_eq!(
        handshake_group(&pki, &proxy, both()).await.ok(),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(backend_seen(&client, &proxy).await.0, StatusCode::OK);
    assert_eq!(last_upstream_group().as_deref(), Some("X25519MLKEM768"));
}
