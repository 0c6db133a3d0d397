//! Every request carries an id (issue 24): made here unless a trusted sender brought one, sent
//! upstream and returned, on HTTP/1.1 and HTTP/2, on the upstream's answers and limen's own.

mod common;

use common::*;
use http::StatusCode;

const HOST: &str = "app.example.test";

fn is_uuid_v4(s: &str) -> bool {
    s.len() == 36
        && s.as_bytes()[14] == b'4'
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[tokio::test]
async fn a_request_without_an_id_gets_a_new_one_upstream_and_back() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let routes = format!(
        "  - {{host: \"{HOST}\", path: /gone, respond: {{status: 410}}}}\n  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n",
        b.url()
    );
    let proxy = Proxy::start(&pki, &[HOST], "", &routes).await;
    let client = Client::new(&pki);
    let mut seen = std::collections::HashSet::new();
    for proto in [Proto::H1, Proto::H2] {
        let got = client.get_with(proxy.addr, HOST, proto, "/x", &[]).await;
        let back = got.headers["x-request-id"].to_str().unwrap().to_owned();
        assert!(is_uuid_v4(&back), "{back}");
        assert_eq!(
            got.echo().header("x-request-id"),
            Some(back.as_str()),
            "{proto:?}"
        );
        assert!(seen.insert(back), "ids differ");
        // limen's own answers carry one too.
        let own = client.get_with(proxy.addr, HOST, proto, "/gone", &[]).await;
        assert_eq!(own.status, StatusCode::GONE);
        assert!(is_uuid_v4(own.headers["x-request-id"].to_str().unwrap()));
    }
}

/// An incoming id is kept only from a sender `request_id.trust` covers, and only when it is
/// printable and short; otherwise it is replaced, so a client cannot plant ids in the logs.
#[tokio::test]
async fn an_incoming_id_is_kept_only_from_a_trusted_sender() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let route = format!("  - {{host: \"{HOST}\", upstreams: [\"{}\"]}}\n", b.url());
    let client = Client::new(&pki);
    let long = "a".repeat(300);
    for (extra, incoming, kept) in [
        ("", "abc-123", false),
        ("trusted_proxies: [\"127.0.0.1\"]", "abc-123", true),
        ("trusted_proxies: [\"127.0.0.1\"]", "has space", false),
        ("trusted_proxies: [\"127.0.0.1\"]", long.as_str(), false),
        ("request_id: {trust: all}", "abc-123", true),
        (
            "trusted_proxies: [\"127.0.0.1\"]\nrequest_id: {trust: none}",
            "abc-123",
            false,
        ),
        (
            "request_id: {header: x-correlation-id, trust: all}",
            "corr-9",
            true,
        ),
    ] {
        let proxy = Proxy::start(&pki, &[HOST], extra, &route).await;
        let name = if extra.contains("x-correlation-id") {
            "x-correlation-id"
        } else {
            "x-request-id"
        };
        for proto in [Proto::H1, Proto::H2] {
            let got = client
                .get_with(proxy.addr, HOST, proto, "/", &[(name, incoming)])
                .await;
            let back = got.headers[name].to_str().unwrap().to_owned();
            assert_eq!(got.echo().header(name), Some(back.as_str()));
            if kept {
                assert_eq!(back, incoming, "{extra}, {proto:?}");
            } else {
                assert!(is_uuid_v4(&back), "{extra}, {proto:?}: {back}");
            }
        }
    }
}
