//! A route may compress what its upstream sends (issue 24): negotiated with the client's
//! `Accept-Encoding`, streamed piece by piece in bounded memory, and never applied where it would
//! break something (already coded, ranges, event streams, gRPC, `no-transform`, small bodies).
//! Real clients decode it: curl `--compressed`, headless Chromium, and the reference decoders.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;

const HOST: &str = "app.example.test";

/// Text that compresses like real pages and JSON do (about 4:1), not like a run of one byte.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut x: u64 = 7;
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        writeln!(
            out,
            "{{\"id\": {}, \"user\": \"user{}\", \"score\": {}}},",
            x >> 44,
            (x >> 20) % 5000,
            (x >> 8) % 1000
        )
        .unwrap();
    }
    out.truncate(len);
    out
}

const PAGE_MARKER: &str = "decoded-by-the-browser";

fn page() -> String {
    let filler = String::from_utf8(text(20_000)).unwrap();
    format!("<!doctype html><html><head><title>t</title></head><body><p id=\"m\">{PAGE_MARKER}</p><pre>{filler}</pre></body></html>")
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed()
}

/// An app server with the answers these tests need.
struct App {
    addr: SocketAddr,
    /// `/paused` waits for this before its second piece.
    go_on: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(req: Request<Incoming>, go_on: std::sync::Arc<tokio::sync::Notify>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let ranged = req.headers().contains_key(http::header::RANGE);
    if path == "/etag" && req.headers().contains_key(http::header::IF_NONE_MATCH) {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r.headers_mut()
            .insert(http::header::ETAG, "\"v1\"".parse().unwrap());
        return r;
    }
    let (kind, body): (&str, Body) = match path.as_str() {
        "/page" => ("text/html; charset=utf-8", full(page())),
        "/json" | "/etag" | "/no-transform" | "/range" => ("application/json", full(text(50_000))),
        "/small" => ("text/plain", full(text(500))),
        "/image" => ("image/png", full(text(50_000))),
        "/pre-gzipped" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
            e.write_all(&text(50_000)).unwrap();
            ("application/json", full(e.finish().unwrap()))
        }
        "/paused" | "/sse" => {
            let first = if path == "/sse" {
                Bytes::from_static(b"data: first\n\n")
            } else {
                Bytes::from(text(2000))
            };
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let go_on = go_on.clone();
                let first = first.clone();
                async move {
                    match step {
                        0 => Some((Ok(Frame::data(first)), 1)),
                        1 => {
                            go_on.notified().await;
                            Some((Ok(Frame::data(Bytes::from_static(b"second piece\n"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            let kind = if path == "/sse" {
                "text/event-stream"
            } else {
                "text/plain"
            };
            (kind, StreamBody::new(stream).boxed())
        }
        p if p.starts_with("/stream/") => {
            // N MiB in 64 KiB pieces, made as they are sent.
            let mib: usize = p["/stream/".len()..].parse().unwrap();
            let piece = Bytes::from(text(64 * 1024));
            let stream = futures_util::stream::iter(
                (0..mib * 16).map(move |_| Ok::<_, std::io::Error>(Frame::data(piece.clone()))),
            );
            ("text/plain", StreamBody::new(stream).boxed())
        }
        _ => ("text/plain", full("not found")),
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, kind.parse().unwrap());
    match path.as_str() {
        "/etag" => {
            h.insert(http::header::ETAG, "\"v1\"".parse().unwrap());
            h.insert(http::header::ACCEPT_RANGES, "bytes".parse().unwrap());
        }
        "/no-transform" => {
            h.insert(http::header::CACHE_CONTROL, "no-transform".parse().unwrap());
        }
        "/pre-gzipped" => {
            h.insert(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        }
        "/range" if ranged => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            resp.headers_mut().insert(
                http::header::CONTENT_RANGE,
                "bytes 0-49999/50000".parse().unwrap(),
            );
        }
        _ => {}
    }
    resp
}

impl App {
    async fn start() -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let go_on = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = go_on.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let go_on = notify.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let go_on = go_on.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, go_on)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        App { addr, go_on, task }
    }
}

async fn start(pki: &Pki, app: &App) -> Proxy {
    let routes = format!(
        concat!(
            "  - {{host: \"{h}\", path: /gzip-only, strip_prefix: true, compress: {{algorithms: [gzip]}}, upstreams: [\"http://{a}\"]}}\n",
            "  - {{host: \"{h}\", path: /br-only, strip_prefix: true, compress: {{algorithms: [br]}}, upstreams: [\"http://{a}\"]}}\n",
            "  - {{host: \"{h}\", path: /zstd, strip_prefix: true, compress: {{algorithms: [zstd, gzip]}}, upstreams: [\"http://{a}\"]}}\n",
            "  - {{host: \"{h}\", path: /plain, strip_prefix: true, upstreams: [\"http://{a}\"]}}\n",
            "  - {{host: \"{h}\", path: /cors, strip_prefix: true, compress: {{}}, headers: {{response: {{set: {{vary: Origin}}}}}}, upstreams: [\"http://{a}\"]}}\n",
            "  - {{host: \"{h}\", compress: {{}}, upstreams: [\"http://{a}\"]}}\n",
        ),
        h = HOST,
        a = app.addr
    );
    Proxy::start(pki, &[HOST], "", &routes).await
}

/// One request; the response head and its whole (still coded) body.
async fn fetch(
    client: &Client,
    proxy: &Proxy,
    proto: Proto,
    method: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> (http::response::Parts, Bytes) {
    let got = client
        .fetch_with(proxy.addr, HOST, proto, method, path, fields)
        .await;
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = got.status;
    parts.headers = got.headers;
    (parts, got.body)
}

fn decode(coding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out).unwrap();
        }
        Some("br") => brotli::BrotliDecompress(&mut &body[..], &mut out).unwrap(),
        Some("zstd") => out = zstd::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected coding {other}"),
    }
    out
}

fn coding(parts: &http::response::Parts) -> Option<&str> {
    parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_client_gets_the_coding_it_rates_highest_and_decodes_the_same_bytes() {
    let pki = Pki::new();
    let app = App::start().await;
    let proxy = start(&pki, &app).await;
    let client = Client::new(&pki);
    let want = text(50_000);
    for proto in [Proto::H1, Proto::H2] {
        for (path, accept, expect) in [
            ("/json", "gzip, deflate, br, zstd", Some("br")),
            ("/json", "gzip;q=1.0, br;q=0.5", Some("gzip")),
            ("/json", "br;q=0, gzip", Some("gzip")),
            ("/json", "*", Some("br")),
            ("/json", "deflate", None),
            ("/json", "identity", None),
            ("/gzip-only/json", "br, gzip", Some("gzip")),
            ("/zstd/json", "gzip, br, zstd", Some("zstd")),
            // zstd is never on unless the route lists it.
            ("/json", "zstd", None),
        ] {
            let (parts, body) = fetch(
                &client,
                &proxy,
                proto,
                "GET",
                path,
                &[("accept-encoding", accept)],
            )
            .await;
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(coding(&parts), expect, "{proto:?} {path} {accept}");
            assert_eq!(decode(expect, &body), want, "{proto:?} {path} {accept}");
            let vary: Vec<_> = parts.headers.get_all(http::header::VARY).iter().collect();
            assert_eq!(vary, ["accept-encoding"], "{proto:?} {path} {accept}");
            if expect.is_some() {
                assert!(
                    body.len() < want.len() / 2,
                    "{proto:?} {path}: {}",
                    body.len()
                );
                assert!(!parts.headers.contains_key(http::header::CONTENT_LENGTH));
            }
        }
    }
    let m = admin_get(proxy.admin(), "/metrics").await.1;
    for alg in ["br", "gzip", "zstd"] {
        let n = metric(
            &m,
            &format!("limen_compressed_responses_total{{algorithm=\"{alg}\"}}"),
        );
        assert!(n.is_some_and(|n| n >= 2.0), "{alg}: {m}");
    }
    let bytes_in = metric(
        &m,
        "limen_compression_bytes_total{algorithm=\"br\",direction=\"in\"}",
    );
    let bytes_out = metric(
        &m,
        "limen_compression_bytes_total{algorithm=\"br\",direction=\"out\"}",
    );
    assert!(bytes_in.unwrap() > 2.0 * bytes_out.unwrap(), "{m}");
}

#[tokio::test]
async fn what_must_not_be_compressed_passes_untouched() {
    let pki = Pki::new();
    let app = App::start().await;
    let proxy = start(&pki, &app).await;
    let client = Client::new(&pki);
    let gzip = ("accept-encoding", "gzip, br");
    for proto in [Proto::H1, Proto::H2] {
        // Already coded by the app: the very bytes it sent, its coding, no second one.
        let (parts, body) = fetch(&client, &proxy, proto, "GET", "/pre-gzipped", &[gzip]).await;
        assert_eq!(coding(&parts), Some("gzip"));
        assert_eq!(decode(Some("gzip"), &body), text(50_000));
        // Images, no-transform, a body under min_bytes, a route without compress.
        for path in ["/image", "/no-transform", "/small", "/plain/json"] {
            let (parts, body) = fetch(&client, &proxy, proto, "GET", path, &[gzip]).await;
            assert_eq!(coding(&parts), None, "{proto:?} {path}");
            assert!(body.len() >= 500, "{proto:?} {path}");
        }
        // A Range request's answer, 206 or not.
        let (parts, body) = fetch(
            &client,
            &proxy,
            proto,
            "GET",
            "/range",
            &[gzip, ("range", "bytes=0-")],
        )
        .await;
        assert_eq!(parts.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!((coding(&parts), body.len()), (None, 50_000));
        // A small body is coded when the client refuses identity.
        let refuse = ("accept-encoding", "gzip, identity;q=0");
        let (parts, body) = fetch(&client, &proxy, proto, "GET", "/small", &[refuse]).await;
        assert_eq!(coding(&parts), Some("gzip"));
        assert_eq!(decode(Some("gzip"), &body), text(500));
    }
    // A strong validator of the identity body becomes a weak one; ranges are no longer offered.
    let (parts, _) = fetch(&client, &proxy, Proto::H1, "GET", "/etag", &[gzip]).await;
    assert_eq!(parts.headers[http::header::ETAG], "W/\"v1\"");
    assert!(!parts.headers.contains_key(http::header::ACCEPT_RANGES));
    let (parts, _) = fetch(&client, &proxy, Proto::H1, "GET", "/etag", &[]).await;
    assert_eq!(parts.headers[http::header::ETAG], "\"v1\"");
    // A revalidation answered 304 carries the validator and Vary of the coded 200 it renews.
    let revalidate = [gzip, ("if-none-match", "W/\"v1\"")];
    let (parts, _) = fetch(&client, &proxy, Proto::H1, "GET", "/etag", &revalidate).await;
    assert_eq!(parts.status, StatusCode::NOT_MODIFIED);
    assert_eq!(parts.headers[http::header::ETAG], "W/\"v1\"");
    assert_eq!(parts.headers[http::header::VARY], "accept-encoding");
    // HEAD, on both protocols: the head a GET would get, and no body (an HTTP/2 client refuses
    // DATA on a HEAD answer).
    for proto in [Proto::H1, Proto::H2] {
        let (parts, body) = fetch(&client, &proxy, proto, "HEAD", "/json", &[gzip]).await;
        assert_eq!((coding(&parts), body.len()), (Some("br"), 0), "{proto:?}");
    }
    // A route's own `vary` edit (CORS) keeps Accept-Encoding beside it.
    let (parts, body) = fetch(&client, &proxy, Proto::H2, "GET", "/cors/json", &[gzip]).await;
    let vary: Vec<_> = parts.headers.get_all(http::header::VARY).iter().collect();
    assert_eq!(vary, ["Origin", "accept-encoding"]);
    assert_eq!(decode(coding(&parts), &body), text(50_000));
}

/// An event stream is never coded, and a coded response streams: what the app sent before it
/// paused reaches the client, decodable, before the app sends more.
#[tokio::test]
async fn event_streams_are_left_alone_and_a_coded_response_streams() {
    let pki = Pki::new();
    let app = App::start().await;
    let proxy = start(&pki, &app).await;
    let client = Client::new(&pki);
    for proto in [Proto::H1, Proto::H2] {
        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let mut req = conn.request("GET", HOST, "/sse", body(""));
        req.headers_mut()
            .insert("accept-encoding", "gzip, br".parse().unwrap());
        let resp = conn.send(req).await.unwrap();
        assert_eq!(coding(&resp.into_parts().0.clone()), None);
        app.go_on.notify_one();

        let mut conn = client.open(proxy.addr, HOST, proto).await;
        let mut req = conn.request("GET", HOST, "/gzip-only/paused", body(""));
        req.headers_mut()
            .insert("accept-encoding", "gzip".parse().unwrap());
        let resp = conn.send(req).await.unwrap();
        assert_eq!(coding(&resp.parts_ref()), Some("gzip"));
        let mut body = resp.into_body();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        // The first piece arrives while the app waits: decodable as it is.
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            while decoder.get_ref().len() < 2000 {
                let frame = body.frame().await.unwrap().unwrap();
                if let Some(d) = frame.data_ref() {
                    decoder.write_all(d).unwrap();
                    decoder.flush().unwrap();
                }
            }
        })
        .await;
        assert!(
            first.is_ok(),
            "{proto:?}: the first piece did not arrive while the app paused"
        );
        assert_eq!(decoder.get_ref()[..], text(2000)[..]);
        app.go_on.notify_one();
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.unwrap().data_ref() {
                decoder.write_all(d).unwrap();
            }
        }
        let all = decoder.finish().unwrap();
        assert!(all.ends_with(b"second piece\n"), "{proto:?}");
    }
}

trait PartsRef {
    fn parts_ref(&self) -> http::response::Parts;
}

impl PartsRef for Response<Incoming> {
    fn parts_ref(&self) -> http::response::Parts {
        let mut b = Response::builder().status(self.status());
        for (k, v) in self.headers() {
            b = b.header(k, v);
        }
        b.body(()).unwrap().into_parts().0
    }
}

/// 100 MiB streamed through gzip: the process's memory grows by far less than the body, and
/// every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_streamed_response_is_coded_in_bounded_memory() {
    let pki = Pki::new();
    let app = App::start().await;
    let proxy = start(&pki, &app).await;
    let client = Client::new(&pki);
    let mut conn = client.open(proxy.addr, HOST, Proto::H2).await;
    let mut req = conn.request("GET", HOST, "/gzip-only/stream/100", body(""));
    req.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let before = rss_kib();
    let resp = conn.send(req).await.unwrap();
    assert_eq!(coding(&resp.parts_ref()), Some("gzip"));
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut decoder = flate2::write::GzDecoder::new(Count(0));
    let (mut coded, mut peak) = (0u64, before);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            coded += d.len() as u64;
            decoder.write_all(d).unwrap();
            if coded % (1 << 20) < d.len() as u64 {
                peak = peak.max(rss_kib());
            }
        }
    }
    let decoded = decoder.finish().unwrap().0;
    assert_eq!(decoded, 100 << 20);
    assert!(coded < decoded / 2, "{coded}");
    let grew = peak.saturating_sub(before);
    eprintln!(
        "100 MiB coded to {} MiB; RSS grew by {grew} KiB",
        coded >> 20
    );
    assert!(grew < 32 * 1024, "RSS grew by {grew} KiB");
}

/// curl `--compressed` (libcurl's own gzip, brotli and zstd decoders) gets the body back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_decodes_what_limen_codes() {
    let pki = Pki::new();
    let app = App::start().await;
    let proxy = start(&pki, &app).await;
    let ca = proxy.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    for (path, want_coding) in [
        ("/json", "br"),
        ("/gzip-only/json", "gzip"),
        ("/zstd/json", "zstd"),
    ] {
        for http2 in [false, true] {
            let url = format!("https://{HOST}:{}{path}", proxy.addr.port());
            let resolve = format!("{HOST}:{}:127.0.0.1", proxy.addr.port());
            let headers = proxy.dir.path().join("headers.txt");
            let ca = ca.clone();
            let out = tokio::task::spawn_blocking({
                let headers = headers.clone();
                move || {
                    std::process::Command::new("curl")
                        .args(["-sS", "--compressed", "--resolve", &resolve, "--cacert"])
                        .arg(&ca)
                        .arg("-D")
                        .arg(&headers)
                        .arg(if http2 { "--http2" } else { "--http1.1" })
                        .arg(&url)
                        .output()
                        .expect("curl runs (.ci/run installs it)")
                }
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.stdout, text(50_000), "{path} http2={http2}");
            let head = std::fs::read_to_string(&headers)
                .unwrap()
                .to_ascii_lowercase();
            assert!(
                head.contains(&format!("content-encoding: {want_coding}")),
                "{path} http2={http2}: {head}"
            );
        }
    }
}

/// Headless Chromium asks for br and gzip on its own and renders the decoded page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_pages_limen_coded_with_br_and_gzip() {
    let pki = Pki::new();
    let app = App::start().await;
    let proxy = start(&pki, &app).await;
    for (path, alg) in [("/br-only/page", "br"), ("/gzip-only/page", "gzip")] {
        let profile = tempfile::tempdir().unwrap();
        let url = format!("https://{HOST}:{}{path}", proxy.addr.port());
        let out = tokio::task::spawn_blocking({
            let profile = profile.path().to_path_buf();
            move || {
                browse(
                    &url,
                    &profile,
                    &[
                        "--disable-quic",
                        "--ignore-certificate-errors",
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
            dom.contains(PAGE_MARKER),
            "{path}: {dom:.300}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = admin_get(proxy.admin(), "/metrics").await.1;
        let n = metric(
            &m,
            &format!("limen_compressed_responses_total{{algorithm=\"{alg}\"}}"),
        );
        assert!(
            n.is_some_and(|n| n >= 1.0),
            "Chromium got {path} uncoded: {m}"
        );
    }
}
