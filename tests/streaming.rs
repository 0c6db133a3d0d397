//! Big bodies stream through limen without being buffered. Alone in its test binary, so the
//! process's memory is this test's own.

mod common;

use common::*;
use http::StatusCode;

const NAMES: &[&str] = &["app.example.test", "h2c.example.test"];

#[tokio::test]
async fn a_100_mib_body_streams_both_ways_in_bounded_memory() {
    let pki = Pki::new();
    let b = Backend::start("b").await;
    let h2 = H2Backend::start().await;
    let routes = format!(
        "  - {{host: h2c.example.test, upstreams: [\"{}\"]}}\n{}",
        h2.url(),
        route_all_to(&b)
    );
    let proxy = Proxy::start(&pki, NAMES, "", &routes).await;
    let client = Client::new(&pki);
    const SIZE: u64 = 100 * 1024 * 1024;
    let before = rss_kib();
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, "app.example.test", proto).await;
        let req = conn.request("POST", "app.example.test", "/upload", streamed_body(SIZE));
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.echo().body_len, SIZE, "{proto:?} upload");

        let resp = conn
            .send(conn.request(
                "GET",
                "app.example.test",
                &format!("/bytes/{SIZE}"),
                body(""),
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut n = 0u64;
        use http_body_util::BodyExt;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.unwrap().data_ref() {
                n += d.len() as u64;
            }
        }
        assert_eq!(n, SIZE, "{proto:?} download");

        // Through an h2c upstream, both ways at once: it echoes each frame as it arrives.
        let mut conn = client.open(proxy.addr, "h2c.example.test", proto).await;
        let req = conn.request("POST", "h2c.example.test", "/stream", streamed_body(SIZE));
        let resp = conn.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.unwrap().data_ref() {
                n += d.len() as u64;
            }
        }
        assert_eq!(n, SIZE, "{proto:?} echo through h2c");
    }
    let grown = rss_kib().saturating_sub(before);
    // Client, proxy and backends share this process: 8 x 100 MiB went through it.
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} KiB: bodies were buffered"
    );
}
