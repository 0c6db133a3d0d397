//! The benchmark's upstream: a tiny HTTP/1.1 server on one thread answering `200 hello` to every
//! request, with keep-alive; a path ending in `/json` gets 64 KiB of JSON instead (the compression
//! rows). With a second address it also serves HTTP/2 cleartext (prior knowledge) there, on the
//! same thread: the upstream of the h2c rows, as fast as the HTTP/1.1 one, so the proxies' HTTP/2
//! client is measured against an upstream that keeps up.
//! `cargo run --release --example bench_upstream -- 127.0.0.1:9000 [127.0.0.1:9005]`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let h2c_addr = std::env::args().nth(2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Records that compress about 4:1 with gzip, as API answers do; made once.
    let mut json = String::from("[");
    let mut x: u64 = 7;
    while json.len() < 64 * 1024 - 128 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        json.push_str(&format!(
            "{{\"id\":{},\"user\":\"user{}\",\"score\":{},\"active\":{}}},\n",
            x >> 44,
            (x >> 20) % 5000,
            (x >> 8) % 1000,
            x % 2 == 0
        ));
    }
    json.push_str("{}]");
    let json = Bytes::from(json);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        if let Some(h2c_addr) = h2c_addr {
            let listener = tokio::net::TcpListener::bind(&h2c_addr).await?;
            eprintln!("bench upstream (h2c) on {h2c_addr}");
            tokio::task::spawn_local(serve_h2c(listener, json.clone()));
        }
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("bench upstream on {addr}");
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let json = json.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = answer(&req, &json);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

fn answer(req: &Request<hyper::body::Incoming>, json: &Bytes) -> Response<Full<Bytes>> {
    if req.uri().path().ends_with("/json") {
        let mut r = Response::new(Full::new(json.clone()));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    } else {
        Response::new(Full::new(Bytes::from_static(b"hello")))
    }
}

/// HTTP/2 cleartext with prior knowledge; streams run on this one thread.
async fn serve_h2c(listener: tokio::net::TcpListener, json: Bytes) -> std::io::Result<()> {
    #[derive(Clone, Copy)]
    struct Local;
    impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for Local {
        fn execute(&self, fut: F) {
            tokio::task::spawn_local(fut);
        }
    }
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let json = json.clone();
        tokio::task::spawn_local(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = answer(&req, &json);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http2::Builder::new(Local)
                .max_concurrent_streams(1000)
                // A load generator stopping mid-run makes each proxy cancel its streams in flight:
                // not an attack here, so the connection stays (h2's default would GOAWAY it).
                .max_pending_accept_reset_streams(Some(100_000))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
