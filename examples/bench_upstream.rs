//! The benchmark's upstream: a tiny HTTP/1.1 server on one thread answering `200 hello` to every
//! request, with keep-alive; a path ending in `/json` gets 64 KiB of JSON instead (the compression
//! rows). `cargo run --release --example bench_upstream -- 127.0.0.1:9000`

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
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("bench upstream on {addr}");
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let json = json.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = if req.uri().path().ends_with("/json") {
                        let mut r = Response::new(Full::new(json.clone()));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        r
                    } else {
                        Response::new(Full::new(Bytes::from_static(b"hello")))
                    };
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}
