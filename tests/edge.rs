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
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = spare.local_addr().unwrap();
    drop(spare);
    let edits = "headers: {request: {set: {x-env: prod}, remove: [x-debug]}, response: {set: {strict-transport-security: max-age=31536000}, remove: [content-type, x-hop]}}";
    let routes = format!(
        "  - {{host: \"{HOST}\", upstreams: [\"{}\"], {edits}}}\n  - {{host: \"{HOST}\", path: /down, upstreams: [\"http://{dead}\"], {edits}}}\n  - {{host: \"{HOST}\", path: /plain, upstreams: [\"{}\"]}}\n",
        b.url(),
        b.url()
    );
    let proxy = Proxy::start(&pki, &[HOST], "", &routes).await;
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

        // Another route is untouched.
        let plain = conn.get(HOST, "/plain").await.unwrap();
        assert!(!plain.headers.contains_key("strict-transport-security"));
        assert_eq!(plain.echo().header("x-env"), None);
    }
}
