//! A route may answer with a redirect (issue 24): each status, each placeholder, over HTTP/1.1
//! and HTTP/2, and on the plain-HTTP listener in one hop.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP: &str = "app.example.test";
const OLD: &str = "old.example.test";

async fn start(pki: &Pki, b: &Backend) -> Proxy {
    let dir = Proxy::dir();
    pki.issue(&[APP, OLD])
        .write(&dir.path().join("certs"), "site");
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  http: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\nroutes:\n  - {{host: {OLD}, redirect: {{to: \"https://new.example.test{{path}}{{query}}\"}}}}\n  - {{host: {APP}, path: /v1, strip_prefix: true, redirect: {{to: \"/v2{{path}}{{query}}\", status: 301}}}}\n  - {{host: {APP}, path: /moved, redirect: {{to: \"/new\", status: 302}}}}\n  - {{host: {APP}, path: /form, redirect: {{to: \"{{scheme}}://{{host}}/done\", status: 303}}}}\n  - {{host: {APP}, path: /tmp, redirect: {{to: \"https://{{host}}/later{{path}}\", status: 307}}}}\n  - {{host: {APP}, upstreams: [\"{}\"]}}\n",
        b.url()
    );
    Proxy::start_in(dir, &yaml).await
}

#[tokio::test]
async fn redirect_routes_answer_with_each_status_and_placeholder() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &b).await;
    let client = Client::new(&pki);
    let cases = [
        (OLD, "/a/b?x=1", 308, "https://new.example.test/a/b?x=1"),
        (OLD, "/", 308, "https://new.example.test/"),
        (APP, "/v1/users?id=7", 301, "/v2/users?id=7"),
        (APP, "/v1", 301, "/v2/"),
        (APP, "/moved/deep?q=1", 302, "/new"),
        (APP, "/form", 303, "https://app.example.test/done"),
        (APP, "/tmp/x", 307, "https://app.example.test/later/tmp/x"),
        // Normalized first: the dot segments are gone before {path} is filled in.
        (APP, "/v1/a/../b/%2e/c", 301, "/v2/b/c"),
    ];
    for proto in [Proto::H1, Proto::H2] {
        for (host, path, status, location) in cases {
            let mut conn = client.open(proxy.addr, host, proto).await;
            let got = conn.get(host, path).await.unwrap();
            assert_eq!(got.status.as_u16(), status, "{host}{path} {proto:?}");
            assert_eq!(got.headers["location"], location, "{host}{path} {proto:?}");
            assert!(got.body.len() < 64, "a short body: {}", got.text());
        }
    }
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        0,
        "no redirect went upstream"
    );
    assert_eq!(
        client.get(proxy.addr, APP, "/other").await.status,
        StatusCode::OK
    );
}

/// On the plain-HTTP listener a redirect route answers itself, with `{scheme}` = http, instead of
/// the usual hop to https first; other routes still get the hop to https.
#[tokio::test]
async fn the_plain_http_listener_answers_a_redirect_route_in_one_hop() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let proxy = start(&pki, &b).await;
    let http = proxy.running().http_addr.unwrap();
    let https_port = proxy.addr.port();
    for (host, path, status, location) in [
        (
            OLD,
            "/a?b=1",
            "308",
            "https://new.example.test/a?b=1".to_owned(),
        ),
        (
            APP,
            "/form",
            "303",
            "http://app.example.test/done".to_owned(),
        ),
        (
            APP,
            "/other?x",
            "308",
            format!("https://{APP}:{https_port}/other?x"),
        ),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut resp))
            .await
            .unwrap()
            .unwrap();
        let resp = String::from_utf8_lossy(&resp).to_ascii_lowercase();
        assert!(resp.starts_with(&format!("http/1.1 {status}")), "{resp}");
        assert!(
            resp.contains(&format!("location: {}\r\n", location.to_ascii_lowercase())),
            "{resp}"
        );
    }
}
